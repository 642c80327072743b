"""The ecosystem's conventions: ``jupyter-book build .`` at the root builds the last assembled book (or stops with
one line saying what to run first) and never reads ``.venv/``; ``papermill notebooks/X.ipynb ...`` runs a chapter
notebook as it is; a wheel carries the project files and its ``fmnist-book`` runs from any directory."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_core.core import resources
from fmnist_core.core.errors import FmnistBookError
from fmnist_core.pipeline.cli import experiments_and_profiles, main
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.pipeline.rootbook import LAST_BOOK, last_book_source, record_last_book

ROOT = resources.project_root()
JUPYTER_BOOK = str(Path(sys.executable).parent / "jupyter-book")
OUTPUTS = {"results", "_build", "data", "build"}  # what the commands write at the root, never package data


def tree_ignore(folder, names):
    """What a copy of the tree leaves out: the environment, git, caches and the root's outputs."""
    skipped = {".venv", ".git", "__pycache__", ".pytest_cache"} | (OUTPUTS if Path(folder) == ROOT else set())
    return {n for n in names if n in skipped or n.endswith(".egg-info")}


def root_copy(tmp_path) -> Path:
    """The root's book configuration, beside a ``.venv/`` and a ``results/`` that break Sphinx if it reads them."""
    root = tmp_path / "root"
    for name in ("_config.yml", "_toc.yml", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    for folder in (".venv/lib", "results", "notebooks"):
        trap = root / folder / "must_not_be_read.ipynb"
        trap.parent.mkdir(parents=True)
        trap.write_text("{ not a notebook")
    return root


def jupyter_book_here(root: Path):
    return subprocess.run([JUPYTER_BOOK, "build", ".", "-W", "--keep-going"], cwd=root, capture_output=True,
                          text=True, timeout=600)


def test_the_last_built_book_is_recorded_and_found(tmp_path):
    with pytest.raises(FmnistBookError, match=r"no book has been built here yet.*fmnist-book build --profile"):
        last_book_source(tmp_path)
    source = tmp_path / "_build" / "smoke" / "source"
    source.mkdir(parents=True)
    record = record_last_book(tmp_path / "_build" / "smoke", "smoke", source)
    assert record == tmp_path / "_build" / LAST_BOOK
    assert json.loads(record.read_text()) == {"profile": "smoke", "source": "smoke/source"}
    assert last_book_source(tmp_path) == source.resolve()
    source.rmdir()
    with pytest.raises(FmnistBookError, match="pages of the last 'smoke' book .* are gone"):
        last_book_source(tmp_path)


def test_jupyter_book_at_the_root_stops_with_one_line_when_nothing_was_built(tmp_path):
    completed = jupyter_book_here(root_copy(tmp_path))
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: no book has been built here yet; its pages are assembled from run results: run "
        "`fmnist-book build --profile quick` (or another profile) first"]


@pytest.mark.slow
def test_jupyter_book_at_the_root_builds_the_last_built_book(tmp_path, smoke_book):
    output = smoke_book[1].parents[1]  # the smoke build's --output-dir
    assert json.loads((output.parent / LAST_BOOK).read_text())["profile"] == "smoke"  # fmnist-book build records it
    root = root_copy(tmp_path)
    record_last_book(root / "_build" / "smoke", "smoke", output / "source")
    completed = jupyter_book_here(root)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    html = root / "_build" / "html"
    assert sorted(p.stem for p in html.glob("*.html")) == sorted(p.stem for p in smoke_book[1].glob("*.html"))
    assert "must_not_be_read" not in completed.stdout + completed.stderr
    assert not list(html.rglob("*must_not_be_read*"))


@pytest.mark.slow
def test_papermill_runs_a_chapter_notebook_directly(tmp_path):
    """The notebook as a user runs it by hand: papermill from the root, the parameters on its command line."""
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "papermill"), "notebooks/dataset.ipynb", str(tmp_path / "out.ipynb"),
               "-p", "profile", "smoke", "-p", "run_dir", str(run_dir),
               "-y", "params: {embed_images: 100, examples_per_class: 2}"]  # smaller than the defaults, for speed
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["summary"] and (run_dir / "figures").is_dir()


def test_run_and_build_help_list_the_experiments_and_profiles(capsys):
    text = experiments_and_profiles()
    for name in [*EXPERIMENTS, "smoke", "quick", "standard", "paper"]:
        assert f"\n  {name} " in text
    for command in ("run", "build"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and text in capsys.readouterr().out


@pytest.mark.slow
def test_a_wheel_carries_the_project_files_and_runs_from_any_directory(tmp_path):
    """Proves: the wheel built from a copy of the tree holds the notebooks, profiles, references and the book's
    files; installed into a folder of its own (the dependencies come from this environment), its ``fmnist-book``
    imports the installed package, not the checkout, and runs the smoke dataset chapter from an unrelated
    directory, writing its results under that directory."""
    tree, wheels, site, elsewhere = (tmp_path / name for name in ("tree", "wheels", "site", "elsewhere"))
    shutil.copytree(ROOT, tree, ignore=tree_ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(tree), "-w", str(wheels)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next(wheels.glob("fmnist_book-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    data = site / "fmnist_core" / "_data"
    for name in ("profiles.yml", "references.yml", "_config.yml", "_toc.yml", "book/intro.md", "bench/results/tsne.json",
                 *(f"notebooks/{e}.ipynb" for e in EXPERIMENTS)):
        assert (data / name).read_bytes() == (ROOT / name).read_bytes(), name
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fmnist_core; print(fmnist_core.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    fmnist_book = [str(site / "bin" / "fmnist-book")]
    help_text = subprocess.run(fmnist_book + ["run", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert help_text.returncode == 0 and "classification" in help_text.stdout and "smoke" in help_text.stdout
    run = subprocess.run(fmnist_book + ["run", "dataset", "--profile", "smoke"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    env_record = json.loads((elsewhere / "results" / "smoke" / "dataset" / "env.json").read_text())
    assert env_record["git_commit"] is None and (elsewhere / "results" / "smoke" / "dataset" / "metrics.json").exists()
