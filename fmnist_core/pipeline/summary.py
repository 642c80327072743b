"""Results at a glance: per chapter, this build's headline figures beside the source report's and the literature's.

This build's figures are read from each run's ``metrics.json`` and ``env.json`` (its parameters give the budget);
the quoted figures come from ``references.yml`` only (:mod:`fmnist_core.pipeline.references`), each labelled as a
source report's or as literature, with its citation. Results recorded for the ``standard`` profile under
``reference/standard/<experiment>/`` (committed with the project) form a separate, labelled column when present.
The same rows feed the book's first chapter (``{{glance}}`` in ``book/glance.md``) and
``fmnist-book results --summary``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.chapters.classification import REFERENCE_DIR
from fmnist_core.core.deadline import stopped_note
from fmnist_core.core.io import read_json
from fmnist_core.core.resources import project_root
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.pipeline.references import LITERATURE_LABEL, SOURCE_LABEL, Cited, load_references

RECORDED_PROFILE = "standard"
RECORDED_LABEL = f"recorded, {RECORDED_PROFILE} profile"
DATASETS = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "lfw": "LFW faces"}

# The quoted figures set beside each chapter: (report, figure) keys of source_reports and (entry, figure) keys of
# literature in references.yml. The values themselves live only there.
QUOTED = {
    "dataset": {"source": [("lenet_layerwise_vae", "dataset_images")],
                "literature": [("xiao2017_benchmark", "human")]},
    "classification": {"source": [("mlp_resnet", "resnet18_test_acc"), ("cnn_comparison", "alexnet_accuracy"),
                                  ("lenet_layerwise_vae", "lenet_final_test_acc")],
                       "literature": [("xiao2017_benchmark", "resnet18"), ("xiao2017_benchmark", "mlp_256_128_64")]},
    "layerwise": {"source": [("lenet_layerwise_vae", "embedded_per_class")], "literature": []},
    "vae": {"source": [("lenet_layerwise_vae", "vae_latent_dim"), ("lenet_layerwise_vae", "vae_epochs")],
            "literature": []},
    "semisupervised": {"source": [("semisupvae", "test_acc_semisupvae"), ("semisupvae", "test_acc_cnn"),
                                  ("semisupvae", "labels")],
                       "literature": [("kingma2014_m2", "mnist_100_m2_error")]},
    "fixmatch": {"source": [("fixmatch", "own_40_final"), ("fixmatch", "own_250_final"), ("fixmatch", "own_4000_final")],
                 "literature": [("sohn2020_fixmatch", "cifar10_40_error_ra"), ("sohn2020_fixmatch", "cifar10_250_error_ra"),
                                ("sohn2020_fixmatch", "cifar10_4000_error_ra")]},
}


@dataclass
class GlanceRow:
    """One chapter of the table.

    Attributes
    ----------
    experiment, title : str
        The chapter's experiment name and title.
    this_build : list of str or None
        Its headline figures in this build; ``None`` when the chapter has not finished for the profile.
    budget : str
        What the run was allowed (epochs, steps, images), from its parameters.
    recorded : list of str or None
        The same headlines from the recorded standard-profile run, with its device, date and commit; ``None``
        when nothing is recorded.
    source, literature : list of Cited
        The quoted figures, from ``references.yml``.
    """

    experiment: str
    title: str
    this_build: list | None
    budget: str
    recorded: list | None
    source: list = field(default_factory=list)
    literature: list = field(default_factory=list)


def _pct(value) -> str:
    return f"{100 * value:.1f} %"


def _images(n: int) -> str:
    return "all training images" if not n else f"{n:,} training images"


def _spread(row: dict) -> str:
    """`` ± std (k seeds)`` for a row averaged over several seeds."""
    if row.get("seeds", 1) <= 1:
        return ""
    return f" ± {100 * row['test_accuracy_std']:.1f} ({row['seeds']} seeds)"


def _labels(n: int) -> str:
    return "all labels" if not n else f"{n:,} labels"


# ----------------------------------------------------------------------------------------------- headlines

def _dataset(metrics: dict, params: dict) -> list[str]:
    return [f"{metrics['train_images']:,} training / {metrics['test_images']:,} test images",
            f"raw pixels, 2 PCA components: {_pct(sum(metrics['pca_explained_variance_ratio']))} of the variance"]


def _classification(metrics: dict, params: dict) -> list[str]:
    models, apart = metrics["models"], set(metrics.get("budget_limited", []))
    best = metrics["best_model"]
    lines = [f"{best} (best on validation): {_pct(models[best]['accuracy'])} test accuracy"]
    for name in ("resnet18", "lenet_avg"):
        if name in models and name != best:
            note = " (budget-limited in this profile, not ranked)" if name in apart else ""
            lines.append(f"{name}: {_pct(models[name]['accuracy'])}{note}")
    return lines


def _layerwise(metrics: dict, params: dict) -> list[str]:
    first = params["models"][0]
    trained = [row for row in metrics["layers"] if row["run"] == first]
    untrained = [row for row in metrics["layers"] if row["run"] == f"{first} (untrained)"]
    lines = [f"{first}: 5-NN accuracy {_pct(trained[0]['knn_accuracy'])} on pixels, "
             f"{_pct(trained[-1]['knn_accuracy'])} at {trained[-1]['layer']}"]
    if untrained:
        lines.append(f"untrained {first} at {untrained[-1]['layer']}: {_pct(untrained[-1]['knn_accuracy'])}")
    return lines


def _vae(metrics: dict, params: dict) -> list[str]:
    return [f"test negative ELBO {metrics['test']['neg_elbo']:.1f} nats per image "
            f"(z = {metrics['latent_dim']}, {metrics['architecture']} network)"]


def _semisupervised(metrics: dict, params: dict) -> list[str]:
    focus = params["focus_labels"]
    rows = [r for r in metrics["study"] if r["num_labels"] == focus] or metrics["study"]
    return [f"{r['model']} @ {_labels(r['num_labels'])}: {_pct(r['test_accuracy'])}{_spread(r)}" for r in rows]


def _fixmatch(metrics: dict, params: dict) -> list[str]:
    return [f"{r['model']} @ {_labels(r['num_labels'])}: {_pct(r['test_accuracy'])}{_spread(r)}"
            for r in metrics["study"]]


HEADLINES = {"dataset": _dataset, "classification": _classification, "layerwise": _layerwise, "vae": _vae,
             "semisupervised": _semisupervised, "fixmatch": _fixmatch}


def _budget(experiment: str, params: dict) -> str:
    data = DATASETS.get(params.get("dataset", "fashion_mnist"), params.get("dataset", ""))
    if experiment == "dataset":
        return f"{data}; {params['embed_images']:,} test images embedded"
    if experiment == "layerwise":
        return f"{params['per_class']} test images per class; t-SNE {params['tsne_iter']} iterations"
    if experiment == "fixmatch":
        return (f"{data}; {params['backbone']}, {params['steps']:,} steps of {params['batch_size']} labeled + "
                f"{params['mu'] * params['batch_size']} unlabeled images; {len(params['seeds'])} seed(s)")
    text = f"{data}; {params['epochs']} epoch(s), {_images(params.get('train_images', 0))}"
    if experiment == "semisupervised":
        text += f"; {len(params['seeds'])} seed(s)"
    return text


# ----------------------------------------------------------------------------------------------- rows

def _read_run(run_dir: Path):
    """``(metrics, env)`` of a finished run folder, or ``None``."""
    if not (run_dir / "metrics.json").exists() or not (run_dir / "env.json").exists():
        return None
    return read_json(run_dir / "metrics.json"), read_json(run_dir / "env.json")


def _recorded(experiment: str, root: Path) -> list | None:
    run = _read_run(root / REFERENCE_DIR / RECORDED_PROFILE / experiment)
    if run is None:
        return None
    metrics, env = run
    origin = (f"({env.get('device', 'device not recorded')}, {str(env.get('finished_at', ''))[:10]}, "
              f"commit {str(env.get('git_commit', ''))[:10]})")
    try:
        lines = HEADLINES[experiment](metrics, env["params"])
    except (KeyError, IndexError, TypeError):
        return [f"recorded, but in a results format this book no longer reads {origin}"]
    return lines + _stopped(env) + [origin]


def _stopped(env: dict) -> list[str]:
    """A line naming the jobs a deadline stopped short of their budget (``env.json``'s ``stopped_early``)."""
    return [stopped_note(env["stopped_early"])] if env.get("stopped_early") else []


def glance_rows(profile: str, results_dir, root=None, references=None) -> list[GlanceRow]:
    """The table's rows, one per chapter, in the order of the book.

    Parameters
    ----------
    profile : str
        The profile whose runs are read (``results_dir/<profile>/<experiment>/``).
    results_dir : str or Path
        Where runs are stored.
    root : str or Path, optional
        The project root holding ``reference/`` (recorded results); the repository by default.
    references : str or Path, optional
        Another references file (tests).

    Returns
    -------
    list of GlanceRow
    """
    refs = load_references(references)
    root = Path(root) if root is not None else project_root()
    rows = []
    for name, experiment in EXPERIMENTS.items():
        run = _read_run(Path(results_dir) / profile / name)
        this_build, budget = (None, "") if run is None else (
            HEADLINES[name](run[0], run[1]["params"]) + _stopped(run[1]), _budget(name, run[1]["params"]))
        rows.append(GlanceRow(name, experiment.title, this_build, budget, _recorded(name, root),
                              [refs.figure(*keys) for keys in QUOTED[name]["source"]],
                              [refs.literature_figure(*keys) for keys in QUOTED[name]["literature"]]))
    return rows


# ----------------------------------------------------------------------------------------------- rendering

def _origin(cited: Cited, refs) -> str:
    """Short name of where a quoted figure comes from: the report's name or the paper's short citation."""
    if cited.kind == SOURCE_LABEL:
        return refs.report(cited.source_key)["name"]
    return refs.entry(cited.source_key)["short"]


def _quoted_lines(figures: list, refs) -> list[str]:
    return [f"{f.text}: {f.description} ({_origin(f, refs)})" for f in figures]


def _cell(lines, empty: str = "—", markdown: bool = True) -> list[str]:
    lines = [" ".join(str(line).split()) for line in lines] if lines else [empty]
    return [line.replace("|", "\\|") for line in lines] if markdown else lines


def _list_table_row(cells: list[list[str]]) -> list[str]:
    out = []
    for i, lines in enumerate(cells):
        out.append(("* - " if i == 0 else "  - ") + lines[0])
        for line in lines[1:]:
            out += ["", "    " + line]
    return out


def _cited_sources(rows: list[GlanceRow], refs) -> list[str]:
    """The full citation of every quoted source, once, in the order of first use."""
    seen, out = set(), []
    for row in rows:
        for cited in row.source + row.literature:
            if (cited.kind, cited.source_key) in seen:
                continue
            seen.add((cited.kind, cited.source_key))
            if cited.kind == SOURCE_LABEL:
                report = refs.report(cited.source_key)
                out.append(f"{report['name'][:1].upper()}{report['name'][1:]} ({SOURCE_LABEL}): "
                           f"{' '.join(report['document'].split())}")
            else:
                entry = refs.entry(cited.source_key)
                out.append(f"{entry['short']} ({LITERATURE_LABEL}): {' '.join(entry['citation'].split())}")
    return out


def render_glance(profile: str, results_dir, root=None, references=None) -> str:
    """The book's "Results at a glance" table as MyST Markdown (the ``{{glance}}`` placeholder).

    Parameters
    ----------
    profile, results_dir, root, references
        As for :func:`glance_rows`.

    Returns
    -------
    str
        A ``list-table`` (class ``fmnist-glance``), a note on recorded results, and the cited sources.
    """
    refs = load_references(references)
    rows = glance_rows(profile, results_dir, root, references)
    recorded = any(row.recorded for row in rows)
    header = ["Chapter", f"This build (`{profile}` profile)"] + ([f"{RECORDED_LABEL.capitalize()}"] if recorded else [])
    header += [f"Source report (its own figures, as printed: {SOURCE_LABEL})",
               f"Published reference ({LITERATURE_LABEL})", "Budget of this build"]
    out = ["```{list-table}", ":header-rows: 1", ":class: fmnist-glance", ""]
    out += _list_table_row([[h] for h in header])
    for row in rows:
        cells = [[f"{{doc}}`{row.title} <{row.experiment}>`"],
                 _cell(row.this_build, f"no finished run for this profile: `fmnist-book run {row.experiment} --profile {profile}`")]
        if recorded:
            cells.append(_cell(row.recorded, "not recorded"))
        cells += [_cell(_quoted_lines(row.source, refs)), _cell(_quoted_lines(row.literature, refs)),
                  _cell([row.budget] if row.budget else None)]
        out += _list_table_row(cells)
    out += ["```", ""]
    if not recorded:
        out += [f"No results of the `{RECORDED_PROFILE}` profile are recorded in this repository yet "
                f"(`{REFERENCE_DIR}/{RECORDED_PROFILE}/<experiment>/`); once they are, they appear in this table as a "
                f"column of their own, labelled with the device, date and commit of their run.", ""]
    out += ["**Sources of the quoted figures** (none was computed by this book; see {doc}`sources` for every "
            "figure of the source reports):", ""]
    out += [f"- {line}" for line in _cited_sources(rows, refs)]
    return "\n".join(out) + "\n"


def format_glance(profile: str, results_dir, root=None, references=None) -> str:
    """The same table as plain text for ``fmnist-book results --summary``: one block per chapter."""
    refs = load_references(references)
    rows = glance_rows(profile, results_dir, root, references)
    recorded = any(row.recorded for row in rows)
    width = len(RECORDED_LABEL) + 2
    out = [f"Results at a glance: profile {profile} (this build) beside the source reports and the literature", ""]

    def block(label: str, lines) -> None:
        for i, line in enumerate(_cell(lines, markdown=False)):
            out.append(f"  {(label + ':') if i == 0 else '':<{width}}{line}")

    for row in rows:
        out.append(f"{row.experiment}: {row.title}")
        block("this build", row.this_build or [f"no finished run for this profile (fmnist-book run "
                                               f"{row.experiment} --profile {profile})"])
        if recorded:
            block(RECORDED_LABEL, row.recorded or ["not recorded"])
        block(SOURCE_LABEL, _quoted_lines(row.source, refs))
        block(LITERATURE_LABEL, _quoted_lines(row.literature, refs))
        block("budget", [row.budget] if row.budget else None)
        out.append("")
    if not recorded:
        out += [f"No {RECORDED_PROFILE}-profile results are recorded ({REFERENCE_DIR}/{RECORDED_PROFILE}/).", ""]
    out += ["Sources:"] + [f"  - {line}" for line in _cited_sources(rows, refs)]
    return "\n".join(out).replace("`", "") + "\n"
