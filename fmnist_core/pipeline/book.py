"""Assembles the Jupyter Book of one profile from the executed notebooks and builds its HTML.

The pages of finished chapters are their executed notebooks (figures inline as PNG, numbers glued);
a chapter whose run failed becomes a page that says what failed and how to re-run it, never stale numbers.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.core.io import read_json, write_bytes_atomic
from fmnist_core.core.resources import project_file
from fmnist_core.pipeline.reader_notebook import reader_notebook
from fmnist_core.pipeline.rootbook import record_last_book
from fmnist_core.pipeline.runner import failure_path, finished_key, get_profile

BOOK_DIR = project_file("book")
CONFIG_PATH = project_file("_config.yml")
TOC_PATH = project_file("_toc.yml")
BIBFILE = "references.bib"  # ``bibtex_bibfiles`` of _config.yml


def chapter_pages() -> list[str]:
    """The page names of the table of contents, in order."""
    toc = yaml.safe_load(TOC_PATH.read_text())
    return [toc["root"]] + [entry["file"] for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}])
                            for entry in part["chapters"]]


def assemble(profile: str, results_dir: Path, source: Path) -> list[str]:
    """Write the book's source pages for ``profile`` into ``source``; returns the missing chapters."""
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    shutil.copytree(BOOK_DIR / "_static", source / "_static")  # the book's CSS (jupyter-book adds every .css)
    from fmnist_core.pipeline.references import bibtex
    write_bytes_atomic(source / BIBFILE, bibtex().encode())  # the bibliography page's, from references.yml
    missing = []
    for page in chapter_pages():
        if page in EXPERIMENTS:
            if not _copy_chapter(page, profile, results_dir, source):
                missing.append(page)
        else:
            text = (BOOK_DIR / f"{page}.md").read_text()
            write_bytes_atomic(source / f"{page}.md", _fill(text, profile, results_dir).encode())
    return missing


def _copy_chapter(name: str, profile: str, results_dir: Path, source: Path) -> bool:
    run_dir = results_dir / profile / name
    failure = failure_path(run_dir)
    if finished_key(run_dir) and not failure.exists():
        page = reader_notebook(run_dir / f"{name}.ipynb", downloads_markdown(name, run_dir, source))
        write_bytes_atomic(source / f"{name}.ipynb", page.encode())
        return True
    if failure.exists():
        info = read_json(failure)
        reason = f"Its last run failed:\n\n```text\n{info['error']}\n```\n"
    else:
        reason = "It has not been run for this profile.\n"
    rerun = f"fmnist-book run {name} --profile {profile}"
    page = (f"# {EXPERIMENTS[name].title}\n\n```{{warning}}\nThis chapter is missing from the `{profile}` book.\n```\n\n"
            f"{reason}\nRe-run it with\n\n```bash\n{rerun}\nfmnist-book build --profile {profile}\n```\n")
    write_bytes_atomic(source / f"{name}.md", page.encode())
    return False


DOWNLOADS = "downloads"  # under the book's source; Sphinx's {download} role copies each file into the HTML


def downloads_markdown(name: str, run_dir: Path, source: Path) -> str:
    """Copy what a reader may take away from a finished run into ``source/downloads/<name>/`` and return the
    chapter's "Downloads" section linking it: ``metrics.json``, the executed notebook and, per job, its
    training history as CSV (``<job>.csv``)."""
    target = source / DOWNLOADS / name
    target.mkdir(parents=True, exist_ok=True)
    histories = []
    for csv in sorted(run_dir.glob("*/*/history.csv")):  # models/<job>/ or runs/<job>/
        shutil.copyfile(csv, target / f"{csv.parent.name}.csv")
        histories.append(csv.parent.name)
    for file in ("metrics.json", f"{name}.ipynb"):
        shutil.copyfile(run_dir / file, target / file)

    def link(file: str) -> str:
        return f"{{download}}`{file} <{DOWNLOADS}/{name}/{file}>`"

    lines = ["## Downloads", "",
             f"The numbers of this page, to take away: {link('metrics.json')} (everything the run measured; "
             f"the tables and sentences above are read from it) and the executed notebook {link(name + '.ipynb')}."]
    if histories:
        lines += ["", "Training histories, one CSV per job (one row per epoch or logged step): "
                  + ", ".join(link(f"{job}.csv") for job in histories) + "."]
    return "\n".join(lines) + "\n"


def _fill(text: str, profile: str, results_dir: Path) -> str:
    """Replace the ``{{profile}}``-style placeholders of the static pages."""
    from fmnist_core.pipeline.references import render_sources
    description = get_profile(profile).get("description", "")
    from fmnist_core.pipeline.summary import render_glance
    table = appendix_table(profile, results_dir) if "{{appendix}}" in text else ""
    sources = render_sources() if "{{sources}}" in text else ""
    glance = render_glance(profile, results_dir) if "{{glance}}" in text else ""
    if "{{fixmatch_labels}}" in text:
        text = text.replace("{{fixmatch_labels}}", label_counts("fixmatch", profile))
    return (text.replace("{{profile}}", profile).replace("{{profile_description}}", description)
            .replace("{{appendix}}", table).replace("{{sources}}", sources).replace("{{glance}}", glance))


def label_counts(experiment: str, profile: str) -> str:
    """The label counts ``experiment`` runs in ``profile``, in words ("40, 250 and 4,000"; 0 = "all")."""
    from fmnist_core.pipeline.runner import resolve_params
    counts = [f"{n:,}" if n else "all" for n in resolve_params(experiment, profile)["label_counts"]]
    return counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} and {counts[-1]}"


NUMERICS = {
    "cpu": "CPU (bit-identical on a re-run with the same thread count)",
    "speed": "CUDA, speed mode (cuDNN benchmark; re-runs agree to within a tolerance, not bit for bit)",
    "deterministic": "CUDA, deterministic mode (deterministic algorithms, fixed cuBLAS workspace, no cuDNN benchmark)",
}


def appendix_table(profile: str, results_dir: Path) -> str:
    """Per experiment: command, parameters hash, seed, device, precision, versions, commit and wall time."""
    from fmnist_core.core.train import describe_precision
    blocks = []
    for name in EXPERIMENTS:
        env_path = results_dir / profile / name / "env.json"
        if not env_path.exists():
            continue
        env = read_json(env_path)
        versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        params = "\n".join(f"| `{k}` | `{v}` |" for k, v in env["params"].items())
        blocks.append(
            f"## {EXPERIMENTS[name].title} (`{name}`)\n\n"
            f"- command: `{env['command']}`\n- parameters hash (run key): `{env['key'][:16]}`\n"
            f"- seed(s): {env['seed']}\n- device: {env['device']}; numerics: {NUMERICS.get(env.get('numerics'), 'not recorded')}\n"
            f"- precision: {describe_precision(env.get('precision'))}\n"
            f"- Python {env['python']}; {versions}\n"
            f"- commit: `{env['git_commit']}`\n- wall time: {env['wall_seconds']} s; finished {env['finished_at']}\n\n"
            f"| parameter | value |\n|---|---|\n{params}\n")
    return "\n".join(blocks) or "No experiment of this profile has finished yet."


def build(profile: str, results_dir: Path, output_dir: Path) -> Path:
    """Assemble and build the HTML book; returns the path of its ``index.html``."""
    source = output_dir / "source"
    assemble(profile, results_dir, source)
    from fmnist_core.pipeline.sweep_page import add_sweep_pages
    toc = add_sweep_pages(profile, results_dir, source, TOC_PATH)  # the profile's sweeps, when it has any
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(source), "--config", str(CONFIG_PATH),
               "--toc", str(toc), "--path-output", str(output_dir), "-W", "--keep-going"]  # warnings fail it
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"jupyter-book failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    record_last_book(output_dir, profile, source)  # what `jupyter-book build .` at the root builds
    return output_dir / "_build" / "html" / "index.html"
