"""The GPU session: the training deadline, the session script rehearsed end to end on the CPU, and its recording."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fmnist_core.core import deadline, jobs, loop
from fmnist_core.core.config import Config, param
from fmnist_core.core.errors import ConfigError, RunError
from fmnist_core.core.io import PROJECT_ROOT, load_checkpoint, read_json
from fmnist_core.core.jobs import Job, job_kind, run_job
from fmnist_core.core.loop import Algorithm, Plan, Selection
from fmnist_core.core.train import OptimizerConfig
from fmnist_core.pipeline import gpu_session, summary
from fmnist_core.pipeline.scale import step_times

SCRIPT = PROJECT_ROOT / "scripts" / "gpu-session.sh"
RECORD = PROJECT_ROOT / "scripts" / "record-gpu-results.sh"
PAST, FUTURE = "1", str(int(time.time()) + 10 ** 6)


class Pulled(Algorithm):
    """A one-parameter model pulled towards 1; evaluates to minus its distance."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1, bias=False)

    def train_step(self, step, generator):
        return (self.model.weight - 1).pow(2).sum(), {}

    def evaluate(self):
        return {"val_score": -float((self.model.weight.detach() - 1).abs().sum())}


def train(out_dir, steps=12, selection=None):
    return loop.train(Pulled(), Plan(steps=steps, log_every=3, eval_every=6, checkpoint_every=6, selection=selection),
                      OptimizerConfig.from_overrides({"optimizer": "sgd", "lr": 0.1}), "constant", 0, out_dir,
                      {"name": "pulled"}, log=lambda *_: None)


# --------------------------------------------------------------------------------------------- the deadline
def test_a_passed_deadline_stops_at_the_next_record_with_an_evaluation_and_a_resumable_checkpoint(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.setenv(deadline.DEADLINE_ENV, PAST)
    history = train(tmp_path)
    assert [r["step"] for r in history] == [3] and "val_score" in history[0]  # an evaluation off the grid of 6
    assert read_json(tmp_path / deadline.STOPPED_FILE) | {"stopped_at": None} == {
        "steps_done": 3, "steps_planned": 12, "stopped_at": None}
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 3 and load_checkpoint(tmp_path / "best.pt")["step"] == 3
    # Without the deadline the same folder resumes to the full plan, like a run never stopped.
    monkeypatch.delenv(deadline.DEADLINE_ENV)
    resumed = train(tmp_path)
    assert [r["step"] for r in resumed] == [3, 6, 9, 12]
    assert not (tmp_path / deadline.STOPPED_FILE).exists() and not (tmp_path / "last.pt").exists()
    whole = train(tmp_path / "whole")
    assert torch.equal(load_checkpoint(tmp_path / "final.pt")["model"]["weight"],
                       load_checkpoint(tmp_path / "whole" / "final.pt")["model"]["weight"])
    assert [r["val_score"] for r in resumed if r["step"] == 12] == [r["val_score"] for r in whole if r["step"] == 12]


def test_a_deadline_to_come_changes_nothing_and_a_selection_still_chooses_best(tmp_path, monkeypatch):
    monkeypatch.setenv(deadline.DEADLINE_ENV, FUTURE)
    history = train(tmp_path, selection=Selection("val_score"))
    assert [r["step"] for r in history] == [3, 6, 9, 12] and not (tmp_path / deadline.STOPPED_FILE).exists()
    monkeypatch.setenv(deadline.DEADLINE_ENV, PAST)
    stopped = train(tmp_path / "stopped", selection=Selection("val_score"))
    assert load_checkpoint(tmp_path / "stopped" / "best.pt")["step"] == stopped[-1]["step"] == 3


@pytest.mark.parametrize("value", ["soon", "12:00", "1e"])
def test_a_malformed_deadline_is_one_clear_message(monkeypatch, tmp_path, value):
    monkeypatch.setenv(deadline.DEADLINE_ENV, value)
    with pytest.raises(ConfigError, match=r"FMNIST_DEADLINE must be a time in seconds since the epoch .*got"):
        train(tmp_path)


@dataclass
class PulledConfig(Config):
    steps: int = param(12, "steps")


@job_kind("pulled", PulledConfig)
def run_pulled(cfg, out_dir, log=print):
    return {"steps": len(train(out_dir, cfg.steps))}


def test_a_stopped_job_is_finished_only_while_its_deadline_holds(tmp_path, monkeypatch):
    job = Job("pulled", PulledConfig(), tmp_path / "job")
    monkeypatch.setenv(deadline.DEADLINE_ENV, PAST)
    assert run_job(job, log=lambda *_: None) == {"steps": 1}
    assert read_json(job.out_dir / "done.json")["stopped_early"]["steps_done"] == 3
    assert job.finished()  # while the passed deadline is set: the chapter gathers what it has
    assert deadline.stopped_jobs(tmp_path) == {"job": read_json(job.out_dir / deadline.STOPPED_FILE)}
    monkeypatch.delenv(deadline.DEADLINE_ENV)
    assert not job.finished()  # without it: resumed to the full budget
    assert run_job(job, log=lambda *_: None) == {"steps": 4}
    assert "stopped_early" not in read_json(job.out_dir / "done.json") and job.finished()
    assert deadline.stopped_jobs(tmp_path) == {}


def test_the_note_names_each_stopped_job_with_its_steps():
    note = deadline.stopped_note({"models/resnet18": {"steps_done": 1290, "steps_planned": 12900},
                                  "models/mlp": {}}, jobs=9)
    assert note == ("stopped at a deadline, short of the profile's budget: 2 of 9 jobs "
                    "(resnet18 1,290 of 12,900 steps; mlp)")


# --------------------------------------------------------------------------------------------- time slots
def test_slots_share_the_time_left_by_estimate_and_tests_keep_their_cap():
    steps = gpu_session.PLANS["book"][1]
    shares = {"classification": 3.0, "vae": 1.0}
    assert gpu_session.slot(steps[0], steps, 400, shares) == 120
    assert gpu_session.slot(steps[0], steps, 50, shares) == 50
    assert gpu_session.slot(steps[2], steps[2:], 400, shares) == 300
    assert gpu_session.slot(steps[3], steps[3:], 130, shares) == 130
    assert gpu_session.slot(steps[3], steps[3:], -5, shares) == 0
    # The recorded estimate gives the shares when a step names none.
    estimate = gpu_session.chapter_shares()
    assert estimate["classification"] > estimate["vae"] > 0


def test_an_archive_that_would_not_fit_leaves_out_the_large_files_first(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "models" / "a").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "models" / "a" / "best.pt").write_bytes(b"w" * 1000)
    (run / "models" / "a" / "test_probs.npy").write_bytes(os.urandom(30_000))
    (run / "models" / "a" / ".half.tmp").write_bytes(b"x")
    monkeypatch.setattr(gpu_session, "MAX_FILE_BYTES", 20_000)
    assert gpu_session.pack_run(run, tmp_path / "run.tar.gz", "run") == "left out: *.pt, *.npy, *.npz, tensorboard/"
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == ["run/metrics.json"]
    monkeypatch.setattr(gpu_session, "MAX_FILE_BYTES", 10)
    with pytest.raises(RunError, match="do not fit in 0 MiB"):
        gpu_session.pack_run(run, tmp_path / "run.tar.gz", "run")


def test_recording_a_folder_without_a_session_record_is_one_clear_message(tmp_path):
    result = subprocess.run(["bash", str(RECORD), str(tmp_path), "--root", str(tmp_path / "root")],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not a GPU session's output (no session.json)" in result.stderr


# --------------------------------------------------------------------------------------------- rehearsal
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """scripts/gpu-session.sh --rehearsal: the device's steps on this CPU, smoke budgets."""
    base = tmp_path_factory.mktemp("gpu-session")
    out, work = base / "out", base / "work"
    started = time.time()
    result = subprocess.run(["bash", str(SCRIPT), "--rehearsal", "--out", str(out), "--work", str(work)],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=480)
    return out, work, result, time.time() - started


@pytest.mark.slow
def test_the_rehearsal_runs_every_step_and_packs_what_comes_back_within_the_limits(rehearsal):
    out, work, result, seconds = rehearsal
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["classification.tar.gz", "fixmatch_bench.json", "gpu-session.log", "session.json", "vae.tar.gz"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).stat().st_size <= 16 * 2 ** 20 for f in files)
    session = read_json(out / "session.json")
    assert session["rehearsal"] and session["profile"] == "smoke"
    assert session["seconds"] <= seconds + 1  # the script counts from a whole second
    assert session["files"] == files and session["git_commit"]
    steps = {s["name"]: s for s in session["steps"]}
    assert list(steps) == ["tests", "bench", "classification", "vae"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    # The CUDA-only tests were collected and, on this CPU, skipped; the benchmark measured both pipelines.
    assert steps["tests"]["tests"] == {"tests": 2, "failures": 0, "errors": 0, "skipped": 2}
    assert all(rate > 0 for rate in steps["bench"]["steps_per_s"].values())
    bench = read_json(out / "fixmatch_bench.json")
    assert bench["device_type"] == "cpu" and bench["gpu_memory"] is None and bench["args"]["steps"] == 2
    # The rehearsal stops classification's jobs at their first record; the VAE runs its whole smoke budget.
    stopped = steps["classification"]["stopped_early"]
    assert sorted(stopped) == ["models/lenet_max", "models/mlp"]
    assert all(s["steps_done"] < s["steps_planned"] for s in stopped.values())
    assert steps["vae"]["stopped_early"] == {} and steps["vae"]["training_deadline_s"] > 0
    log = (out / "gpu-session.log").read_text()
    assert "install: nothing missing" in log and "data: verified" in log and "every step ok" in log
    for name in steps:
        assert re.search(rf"{name}: exit status 0 in \d+ s", log)
    # Each archive holds a finished run: results, histories, figures, the notebook; no checkpoint.
    with tarfile.open(out / "classification.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"classification/metrics.json", "classification/env.json", "classification/classification.ipynb",
            "classification/models/mlp/history.json", "classification/models/mlp/stopped.json"} <= names
    assert any(n.startswith("classification/figures/") and n.endswith(".png") for n in names)
    assert not any(n.endswith(".pt") for n in names)


@pytest.mark.slow
def test_recording_the_rehearsal_fills_the_reference_the_glance_page_and_plan_read(rehearsal, tmp_path, monkeypatch):
    out, work, result, _ = rehearsal
    assert result.returncode == 0
    refused = subprocess.run(["bash", str(RECORD), str(out)], capture_output=True, text=True,
                             env={**os.environ, "PYTHON": sys.executable})
    assert refused.returncode == 2 and "never recorded into the project" in refused.stderr
    root = tmp_path / "root"
    recorded = subprocess.run(["bash", str(RECORD), str(out), "--root", str(root), "--min-steps", "1"],
                              capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert recorded.returncode == 0, recorded.stderr
    reference = root / "reference" / "smoke"
    for chapter in ("classification", "vae"):
        assert {"metrics.json", "env.json", "figures"} <= {p.name for p in (reference / chapter).iterdir()}
        assert not list((reference / chapter).rglob("*.pt")) and not list((reference / chapter).rglob("*.ipynb"))
    env = read_json(reference / "classification" / "env.json")
    assert env["git_commit"] and env["recorded_from"]["plan"] == "book"
    assert read_json(reference / "classification" / "models" / "mlp" / "history.json")
    assert read_json(reference / "session-book.json")["steps"][0]["name"] == "tests"
    # The glance page's recorded column (the standard profile's, here the rehearsal's) says what stopped.
    monkeypatch.setattr(summary, "RECORDED_PROFILE", "smoke")
    rows = {row.experiment: row for row in summary.glance_rows("smoke", tmp_path / "no-results", root=root)}
    assert "test accuracy" in rows["classification"].recorded[0]
    assert any(line.startswith("stopped at a deadline") for line in rows["classification"].recorded)
    assert "nats per image" in rows["vae"].recorded[0]
    assert not any("stopped" in line for line in rows["vae"].recorded)
    assert rows["vae"].recorded[-1].startswith(f"({env['device']}, ") and rows["dataset"].recorded is None
    # A build of one's own that a deadline stopped says so too.
    built = {row.experiment: row for row in summary.glance_rows("smoke", work / "results", root=tmp_path)}
    assert built["classification"].this_build[-1].startswith("stopped at a deadline, short of the profile's budget")
    assert not any("stopped" in line for line in built["vae"].this_build)
    # fmnist-book plan's seconds per step: the chapters' jobs and the benchmark's FixMatch step.
    times = step_times(env["device"], root / "bench" / "results" / "step_times.json")
    assert {"classifier/mlp/b128", "classifier/lenet_max/b128", "vae/z20/b128"} <= set(times)
    assert "fixmatch/smallcnn/b8/mu2" in times and all(t > 0 for t in times.values())
    assert json.loads((root / "bench" / "results" / "fixmatch_cpu.json").read_text())["args"]["batch_size"] == 8


# --------------------------------------------------------------------------------------------- runs and plans
def test_a_run_with_stopped_jobs_is_up_to_date_only_while_its_deadline_holds(tmp_path, monkeypatch):
    from fmnist_core.core.io import write_json
    from fmnist_core.pipeline import runner
    final = tmp_path / "smoke" / "vae"
    write_json(final / "env.json", {"key": "k", "stopped_early": {"models/main": {"steps_done": 16,
                                                                                  "steps_planned": 32}}})
    monkeypatch.setenv(deadline.DEADLINE_ENV, PAST)
    assert runner._up_to_date(final, "k") and runner.stopped_early(final)
    monkeypatch.delenv(deadline.DEADLINE_ENV)
    assert not runner._up_to_date(final, "k")  # the next run resumes the stopped job
    write_json(final / "env.json", {"key": "k"})
    assert runner._up_to_date(final, "k") and runner.stopped_early(final) == {}


@pytest.mark.parametrize("plan", ["semisupervised", "fixmatch"])
def test_the_later_plans_are_valid_and_their_estimated_jobs_fit_one_command(plan, tmp_path):
    from fmnist_core.pipeline.experiments import get_experiment
    from fmnist_core.pipeline.runner import resolve_params
    [step] = gpu_session.PLANS[plan][1]
    resolve_params(step.name, "smoke", step.rehearsal_overrides)  # the rehearsal's parameters are valid too
    exp = get_experiment(step.name)
    jobs = exp.plan(exp.config.from_overrides(resolve_params(step.name, "standard", step.overrides)), tmp_path)
    estimate = read_json(PROJECT_ROOT / "bench" / "results" / "standard_estimate.json")
    seconds = {job["job"]: job["seconds"] for job in estimate["jobs"][step.name]}
    assert jobs and all(job.label in seconds for job in jobs)
    # One job after the other (no credit for the workers sharing the GPU), before the training deadline of the
    # default budget: the 2-minute start-up, install and data check of a device run left aside.
    training_s = 540 - gpu_session.PACK_RESERVE_S - step.finish_s
    assert sum(seconds[job.label] for job in jobs) < training_s
    assert sum(seconds.values()) > training_s  # the whole chapter would not fit: the plan is what makes it
