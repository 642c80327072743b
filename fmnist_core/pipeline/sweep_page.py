"""The book's sweep pages: an experiment's headline metrics against the swept value(s), mean ± std over seeds.

One page per recorded sweep (``results/<profile>/sweeps/*.json``, :mod:`fmnist_core.pipeline.sweep`): a figure
(error bars for one parameter, a heat map of the first metric for two), a table with each point's runs, keys and
links to their executed notebooks (pages of the book under the sweep's page), and a sentence per metric saying
which points differ from the best by more than the seed spread. Every number is read from the points' results.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.io import read_json, write_bytes_atomic
from fmnist_core.pipeline.reader_notebook import reader_notebook
from fmnist_core.pipeline.sweep import headline_metrics, mean_std, recorded_sweeps
from fmnist_core.pipeline.variants import format_value


@dataclass
class SweepRow:
    """One point of a sweep (its seeds together).

    Attributes
    ----------
    values : dict
        Swept parameter -> value.
    runs : list of Path
        The point's finished run folders (one per seed).
    keys : list of str
        Their run keys.
    metrics : dict
        Metric name -> (mean, std, number of runs).
    missing : list of str
        Variants of the point with no finished run (failed or not run), by name.
    """

    values: dict
    runs: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)


def summarise(record: dict, results_dir: Path) -> list[SweepRow]:
    """The rows of a sweep record: each point's runs read from ``results/<profile>/<experiment>@<variant>/``."""
    from fmnist_core.pipeline.runner import failure_path, run_name
    profile_dir = Path(results_dir) / record["profile"]
    rows: dict[str, SweepRow] = {}
    samples: dict[str, dict[str, list]] = {}
    for point in record["points"]:
        label = json.dumps(point["values"], sort_keys=True)
        row = rows.setdefault(label, SweepRow(point["values"]))
        run_dir = profile_dir / run_name(record["experiment"], point["variant"])
        if not (run_dir / "env.json").is_file() or failure_path(run_dir).exists():
            row.missing.append(point["variant"])
            continue
        row.runs.append(run_dir)
        row.keys.append(read_json(run_dir / "env.json")["key"])
        for name, value in headline_metrics(record["experiment"], read_json(run_dir / "metrics.json")).items():
            samples.setdefault(label, {}).setdefault(name, []).append(value)
    for label, row in rows.items():
        row.metrics = {name: (*mean_std(values), len(values)) for name, values in samples.get(label, {}).items()}
    return list(rows.values())


def metric_names(rows: list[SweepRow]) -> list[str]:
    """Every metric of the rows, in first-seen order."""
    return list(dict.fromkeys(name for row in rows for name in row.metrics))


def _is_fraction(name: str) -> bool:
    return "accuracy" in name or "variance" in name


def fmt(name: str, mean: float, std: float | None = None) -> str:
    """``83.1 ± 0.4 %`` for an accuracy, ``231.5 ± 1.2`` otherwise."""
    if _is_fraction(name):
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "") + " %"
    return f"{mean:.4g}" + (f" ± {std:.3g}" if std is not None else "")


def sweep_figure(record: dict, rows: list[SweepRow]):
    """The sweep's figure: each metric against the swept value with std error bars, or a heat map (two
    parameters) of the first metric's mean. Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params, names = list(record["parameters"]), metric_names(rows)
    if len(params) == 1:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        values = record["parameters"][params[0]]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        for name in names:
            have = [r for r in rows if name in r.metrics]
            xs = [r.values[params[0]] if numeric else values.index(r.values[params[0]]) for r in have]
            scale = 100 if _is_fraction(name) else 1
            ax.errorbar(xs, [scale * r.metrics[name][0] for r in have], yerr=[scale * r.metrics[name][1] for r in have],
                        marker="o", capsize=4, label=name)
        if not numeric:
            ax.set_xticks(range(len(values)), [format_value(v) for v in values])
        ax.set_xlabel(params[0])
        ax.set_ylabel("%" if names and all(_is_fraction(n) for n in names) else "value")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        first, second = (record["parameters"][p] for p in params)
        name = names[0] if names else ""
        grid = [[float("nan")] * len(second) for _ in first]
        stds = [[float("nan")] * len(second) for _ in first]
        for row in rows:
            if name in row.metrics:
                i, j = first.index(row.values[params[0]]), second.index(row.values[params[1]])
                grid[i][j], stds[i][j] = row.metrics[name][0], row.metrics[name][1]
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label=name)
        for i in range(len(first)):
            for j in range(len(second)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, fmt(name, grid[i][j], stds[i][j]), ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(second)), [format_value(v) for v in second])
        ax.set_yticks(range(len(first)), [format_value(v) for v in first])
        ax.set_xlabel(params[1])
        ax.set_ylabel(params[0])
    ax.set_title(f"{record['experiment']}: mean ± std over seeds")
    fig.tight_layout()
    return fig


def spread_sentences(rows: list[SweepRow]) -> list[str]:
    """Per metric: which points are farther from the best point's mean than the two points' std together."""
    sentences = []
    for name in metric_names(rows):
        have = [r for r in rows if name in r.metrics]
        if len(have) < 2:
            continue
        lower_is_better = "ELBO" in name
        best = (min if lower_is_better else max)(have, key=lambda r: r.metrics[name][0])
        if max(r.metrics[name][2] for r in have) < 2:
            sentences.append(f"{name}: one run per point, so the seed spread is unknown; the best point is "
                             f"{_point(best)} ({fmt(name, best.metrics[name][0])}).")
            continue
        beyond = [r for r in have if r is not best and abs(r.metrics[name][0] - best.metrics[name][0])
                  > r.metrics[name][1] + best.metrics[name][1]]
        within = [r for r in have if r is not best and r not in beyond]
        text = f"{name}: the best point is {_point(best)} ({fmt(name, *best.metrics[name][:2])}); "
        text += (f"{', '.join(_point(r) for r in beyond)} differ(s) from it by more than the seed spread (the two "
                 f"stds together)" if beyond else "no point differs from it by more than the seed spread")
        text += f"; {', '.join(_point(r) for r in within)} within it." if beyond and within else "."
        sentences.append(text)
    return sentences


def _point(row: SweepRow) -> str:
    return ", ".join(f"{k} = {format_value(v)}" for k, v in row.values.items())


def page_name(sweep_name: str) -> str:
    """The book page of a sweep: ``sweep-<name>`` with only letters, digits and dashes."""
    return "sweep-" + re.sub(r"[^A-Za-z0-9]+", "-", sweep_name).strip("-")


def _introduction(record: dict, params: list[str]) -> list[str]:
    """The sweep page's title and its first paragraph: what was swept, over which values and seeds."""
    seeds = record.get("seeds")
    return [f"# Sweep: {record['experiment']}, {' × '.join(params)}", "",
            f"The `{record['experiment']}` experiment of the `{record['profile']}` profile with "
            + " and ".join(f"`{p}` ∈ {{{', '.join(format_value(v) for v in record['parameters'][p])}}}" for p in params)
            + (f", {seeds} seed(s) per point" if seeds else ", the profile's seed(s)")
            + ("; every point also sets " + ", ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in record["set"].items())
               if record.get("set") else "") + ". Each point is a variant run (its own folder and key); the "
            "profile's own run is not one of them.", ""]


def _table(record: dict, rows: list, params: list[str], names: list[str], page: str,
           source: Path) -> tuple[list[str], list[str]]:
    """The table of the points (values, metrics, runs, keys, notebook links); writes the points' notebooks.

    Returns the table's Markdown lines and the names of the notebook pages written.
    """
    header = params + [f"{n}" for n in names] + ["runs", "keys", "notebooks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sections = []
    for row in rows:
        links = []
        for run_dir in row.runs:
            # beside the chapters (not in a folder), so that the notebook's own links to other pages still resolve
            section = f"{page}--{re.sub(r'[^A-Za-z0-9]+', '-', run_dir.name.partition('@')[2]).strip('-')}"
            write_bytes_atomic(source / f"{section}.ipynb",
                               reader_notebook(run_dir / f"{record['experiment']}.ipynb").encode())
            sections.append(section)
            links.append(f"[{run_dir.name.partition('@')[2]}]({section}.ipynb)")
        cells = [f"`{format_value(row.values[p])}`" for p in params]
        cells += [fmt(n, row.metrics[n][0], row.metrics[n][1]) if n in row.metrics else "–" for n in names]
        cells += [str(len(row.runs)) + (f" ({len(row.missing)} missing)" if row.missing else ""),
                  " ".join(f"`{k[:12]}`" for k in row.keys), "<br>".join(links)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, sections


def render_sweep(record: dict, results_dir: Path, source: Path) -> tuple[str, list[str]]:
    """Write a sweep's page (``<page>.md``), its figure and its points' notebooks into ``source``.

    Parameters
    ----------
    record : dict
        A sweep record (:func:`fmnist_core.pipeline.sweep.recorded_sweeps`).
    results_dir : Path
        The results folder holding ``<profile>/``.
    source : Path
        The book's source folder.

    Returns
    -------
    tuple of (str, list of str)
        The page's name and the names of the points' notebook pages (sections under it).
    """
    rows = summarise(record, results_dir)
    page = page_name(record["name"])
    folder = source / page
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params, names = list(record["parameters"]), metric_names(rows)
    lines = _introduction(record, params)
    if names:
        sweep_figure_path = folder / "sweep.png"
        fig = sweep_figure(record, rows)
        fig.savefig(sweep_figure_path, dpi=110)
        __import__("matplotlib.pyplot").pyplot.close(fig)
        lines += [f"![{record['experiment']} against {', '.join(params)}]({page}/sweep.png)", ""]
        lines += spread_sentences(rows) + [""]
    table, sections = _table(record, rows, params, names, page, source)
    lines += table
    missing = [v for row in rows for v in row.missing]
    if missing:
        lines += ["", "```{warning}", "No finished run for: " + ", ".join(missing) + ". Re-run the sweep's command "
                  "(`fmnist-book sweep ...`): the finished points are kept.", "```"]
    lines += ["", "± is the sample standard deviation over the point's runs (seeds); a key is the first 12 hex "
              "digits of the run's key (`env.json`)."]
    write_bytes_atomic(source / f"{page}.md", ("\n".join(lines) + "\n").encode())
    return page, sections


def add_sweep_pages(profile: str, results_dir: Path, source: Path, toc_path: Path, before: str = "sources") -> Path:
    """Render every recorded sweep of ``profile`` into ``source``; the table of contents to build with.

    Returns ``toc_path`` itself when the profile has no sweep, else a copy with the sweep pages (their points'
    notebooks as sections) before the page ``before``, written as ``source/_sweeps_toc.yml``.
    """
    import yaml
    records = recorded_sweeps(results_dir, profile)
    if not records:
        return toc_path
    toc = yaml.safe_load(Path(toc_path).read_text())
    entries = []
    for record in records:
        page, sections = render_sweep(record, results_dir, source)
        entries.append({"file": page, **({"sections": [{"file": s} for s in sections]} if sections else {})})
    chapters = toc["chapters"]
    at = next((i for i, entry in enumerate(chapters) if entry.get("file") == before), len(chapters))
    toc["chapters"] = chapters[:at] + entries + chapters[at:]
    out = source / "_sweeps_toc.yml"
    out.write_text(yaml.safe_dump(toc, sort_keys=False))
    return out
