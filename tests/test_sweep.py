"""Variants and sweeps: a smoke sweep keeps the profile's run byte for byte and creates every point; local workers
give the inline points' bytes; a re-run with one more value trains only it; the sweep page shows error bars;
``compare`` prints two runs side by side; bad input is refused before anything runs, with one message.

The sweeps train the MLP alone on the smoke budget (~20 s a point on 2 cores, most of it the notebook's start).
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_core.pipeline import cli
from fmnist_core.pipeline.sweep import MAX_POINTS, recorded_sweeps, run_headlines
from fmnist_core.pipeline.sweep_page import render_sweep, summarise, sweep_figure

CLI = [sys.executable, "-m", "fmnist_core.pipeline.cli"]
INLINE_THREADS = __import__("torch").get_num_threads()
MLP_ONLY = ["--set", "models", "[mlp]", "--set", "sgd_model", "''", "--set", "budget_limited", "[]"]
PREFIX = "classification@models=mlp,sgd_model=,budget_limited="


def sweep_cli(results: Path, *args) -> subprocess.CompletedProcess:
    done = subprocess.run(CLI + ["--results-dir", str(results), "sweep", "classification", "--profile", "smoke",
                                 *MLP_ONLY, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def point(results: Path, lr: float, seed: int) -> Path:
    return results / "smoke" / f"{PREFIX},lr={lr},seed={seed}"


@pytest.fixture(scope="module")
def swept(smoke_book, tmp_path_factory):
    """The smoke runs (copied) with a sweep of lr in {0.001, 0.003} x 2 seeds: (results, profile run digest, stdout)."""
    results = tmp_path_factory.mktemp("sweep") / "results"
    shutil.copytree(smoke_book[0], results / "smoke", ignore=shutil.ignore_patterns(".*.lock"))
    before = tree_digest(results / "smoke" / "classification")
    done = sweep_cli(results, "-p", "lr", "[0.001, 0.003]", "--seeds", "2")
    return results, before, done.stdout


def test_a_sweep_keeps_the_profiles_run_and_creates_every_point(swept):
    results, before, stdout = swept
    assert tree_digest(results / "smoke" / "classification") == before
    points = [point(results, lr, s) for lr in (0.001, 0.003) for s in (0, 1)]
    for run_dir in points:
        env = json.loads((run_dir / "env.json").read_text())
        assert (run_dir / "models" / "mlp" / "metrics.json").is_file()
        assert env["variant"] == run_dir.name.partition("@")[2] and env["params"]["models"] == ["mlp"]
    assert len({json.loads((p / "env.json").read_text())["key"] for p in points}) == 4  # a key of its own each
    assert "4 run(s) trained, 0 up to date, 0 failed" in stdout
    status = subprocess.run(CLI + ["--results-dir", str(results), "status", "--profile", "smoke"],
                            capture_output=True, text=True).stdout
    assert all(f"{p.name} up to date" in " ".join(status.split()) for p in points), status


def test_local_workers_give_the_inline_points(swept, tmp_path):
    inline = swept[0]
    results = tmp_path / "results"  # classification reads no other run: an empty results folder will do
    done = sweep_cli(results, "-p", "lr", "[0.001, 0.003]", "--seeds", "1", "--executor", "local", "--workers", "2",
                     "--threads-per-worker", str(INLINE_THREADS))
    assert "local: 2 job(s) of 2 point(s) [smoke]" in done.stdout
    for lr in (0.001, 0.003):
        ours, theirs = point(results, lr, 0), point(inline, lr, 0)
        for name in ("metrics.json", "models/mlp/metrics.json"):
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), (lr, name)


def test_a_rerun_with_a_third_value_trains_only_it(swept):
    results = swept[0]
    envs = {p: p.read_bytes() for p in (results / "smoke").glob(f"{PREFIX}*/env.json")}
    done = sweep_cli(results, "-p", "lr", "[0.001, 0.003, 0.01]", "--seeds", "2")
    assert "2 run(s) trained, 4 up to date, 0 failed" in done.stdout
    assert {p: p.read_bytes() for p in envs} == envs  # the first four points were not run again
    assert point(results, 0.01, 0).is_dir() and point(results, 0.01, 1).is_dir()
    [record] = recorded_sweeps(results, "smoke")
    assert record["parameters"] == {"lr": [0.001, 0.003, 0.01]} and len(record["points"]) == 6


def test_the_sweep_page_shows_error_bars(swept, tmp_path):
    results = swept[0]
    [record] = recorded_sweeps(results, "smoke")
    rows = summarise(record, results)
    accuracies = {lr: [run_headlines(point(results, lr, s))["mlp test accuracy"] for s in (0, 1)]
                  for lr in record["parameters"]["lr"]}
    [axes] = sweep_figure(record, rows).axes
    [bars] = axes.containers
    assert bars.has_yerr
    segments = bars.lines[2][0].get_segments()  # one vertical bar per point: mean -/+ std (in %)
    assert len(segments) == len(accuracies)
    for (lr, values), segment in zip(accuracies.items(), segments):
        mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2 ** 0.5
        assert segment[0][1] == pytest.approx(100 * (mean - std)) and segment[1][1] == pytest.approx(100 * (mean + std))
    page, sections = render_sweep(record, results, tmp_path)
    text = (tmp_path / f"{page}.md").read_text()
    assert (tmp_path / page / "sweep.png").is_file() and "± " in text and "seed spread" in text
    assert len(sections) == 2 * len(accuracies) and all(f"({s}.ipynb)" in text for s in sections)
    assert all((tmp_path / f"{s}.ipynb").is_file() for s in sections)
    key = json.loads((point(results, 0.001, 0) / "env.json").read_text())["key"]
    assert f"`{key[:12]}`" in text


def test_compare_prints_two_runs_side_by_side_with_their_difference(swept, capsys):
    results = swept[0]
    a, b = point(results, 0.001, 0), point(results, 0.003, 0)
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    va, vb = run_headlines(a)["mlp test accuracy"], run_headlines(b)["mlp test accuracy"]
    [line] = [line for line in out.splitlines() if line.startswith("mlp test accuracy")]
    assert line.split()[-3:] == [f"{va:.4f}", f"{vb:.4f}", f"{vb - va:+.4f}"]


@pytest.mark.parametrize("args, message", [
    (["sweep", "classification", "-p", "lr", "[]"], "parameter 'lr': the list of values is empty"),
    (["sweep", "classification", "-p", "lrr", "[0.1]"], "unknown parameter 'lrr'; did you mean 'lr'?"),
    (["sweep", "classification", "-p", "epochs", "[1, two]"], "parameter 'epochs' must be int, got 'two'"),
    (["sweep", "classification", "-p", "lr", "0.1"], "give its values as a list"),
    (["sweep", "classification", "-p", "lr", "[0.1, 0.2, 0.3, 0.4, 0.5]", "--seeds", "5"],
     f"25 runs (5 point(s) x 5 seed(s)) is more than {MAX_POINTS}; add --yes"),
    (["sweep", "classification", "-p", "seed", "[0, 1]", "--seeds", "2"], "--seeds sets 'seed'"),
    (["run", "classification", "--variant"], "--variant needs at least one override"),
    (["run", "classification", "--variant", "../x", "-p", "lr", "0.1"], "variant name '../x'"),
])
def test_bad_sweeps_and_variants_are_refused_before_anything_runs(args, message, tmp_path, capsys):
    results = tmp_path / "results"
    assert cli.main(["--results-dir", str(results), *args[:2], "--profile", "smoke", *args[2:]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not results.exists()
