"""The live progress of a run: the job's ``progress.json``, the command's display, and a clean Ctrl-C."""
import io
import os
import re
import shlex
import signal
import subprocess
import time

import pytest
import torch

from fmnist_core.core.data import make_splits
from fmnist_core.core.io import read_json, write_json
from fmnist_core.core.jobs import DONE_FILE, JOB_FILE
from fmnist_core.core.models import build_model, model_meta
from fmnist_core.core.progress import PLAN_FILE, read_progress
from fmnist_core.core.supervised import fit
from fmnist_core.core.train import TrainConfig
from fmnist_core.pipeline.progress import JobState, ProgressView, experiment_eta, scan_jobs

from conftest import CLI
from test_faults import alive, kernel_of, wait_until

# A job line of the display: "<experiment> [<profile>]: job 2/7 lenet_max: epoch 1/1, step 4/4, ..."
JOB_LINE = re.compile(r"^\S+ \[\w+\]: job \d+/\d+ \S+: .*step (\d+)/(\d+)", re.M)
ESTIMATE = re.compile(r"(job left|experiment left ~)\d+:\d\d")


def test_training_writes_its_progress_at_every_record(toy_fashion_dataset, tmp_path, one_thread):
    splits, _ = make_splits(toy_fashion_dataset, 50, 0)
    cfg = TrainConfig.from_overrides({"epochs": 3, "batch_size": 50, "device": "cpu"})
    out = tmp_path / "job"
    seen = []  # progress.json as the command would read it when each record's log line is written
    torch.manual_seed(0)
    model = build_model("lenet_avg", in_channels=1, image_size=28, num_classes=10)
    history = fit(model, splits.train, splits.val, cfg, out, meta=model_meta("lenet_avg", toy_fashion_dataset),
                  log=lambda line: seen.append(read_progress(out)))
    assert [p["step"] for p in seen] == [r["step"] for r in history] == [3, 6, 9]
    for progress, record in zip(seen, history):
        assert progress["steps"] == 9 and progress["epochs"] == 3 and progress["epoch"] == record["epoch"]
        assert progress["stats"]["train_loss"] == pytest.approx(record["train_loss"])
        assert progress["stats"]["val_accuracy"] == pytest.approx(record["val_accuracy"])
        assert progress["elapsed_s"] > 0 and abs(progress["time"] - time.time()) < 600
    assert seen[0]["eta_s"] > 0 and seen[-1]["eta_s"] == 0
    assert set(seen[-1]) == {"step", "steps", "epoch", "epochs", "stats", "elapsed_s", "eta_s", "time"}


def make_job(base, label, progress=None, seconds=None, age=0.0):
    folder = base / "models" / label
    folder.mkdir(parents=True)
    write_json(folder / JOB_FILE, {"label": label})
    if progress:
        write_json(folder / "progress.json", progress)
    if seconds is not None:
        write_json(folder / DONE_FILE, {"key": "k", "seconds": seconds})
    for path in folder.iterdir():  # written by an earlier run, ``age`` seconds ago
        os.utime(path, (time.time() - age,) * 2)
    return folder


def test_the_display_lists_jobs_with_their_step_and_the_time_left(tmp_path):
    run = tmp_path / "exp.partial"
    make_job(run, "mlp", {"step": 10, "steps": 10}, seconds=20.0, age=3600)  # finished before this run: kept
    view = ProgressView(run, "exp [smoke]", io.StringIO(), every=10.0, tty=False)
    write_json(run / "models" / PLAN_FILE, {"jobs": [{"label": x, "dir": x} for x in ("mlp", "lenet", "cnn")]})
    lenet = make_job(run, "lenet", {"step": 40, "steps": 100, "epoch": 2, "epochs": 5, "eta_s": 30.0,
                                    "elapsed_s": 20.0, "stats": {"train_loss": 0.5, "lr": 0.1}})
    jobs = scan_jobs(run, view.started - 1)
    assert [(j.label, j.state) for j in jobs] == [("mlp", "kept"), ("lenet", "running"), ("cnn", "planned")]
    assert experiment_eta(jobs) == 30.0 + 20.0  # the running job's estimate + one job of the finished one's length
    view.poll()
    view.poll()  # within the ten seconds: no second status line
    write_json(lenet / DONE_FILE, {"key": "k", "seconds": 50.0})
    view.poll()  # a finished job always gets its line
    lines = view.stream.getvalue().splitlines()
    assert lines == ["exp [smoke]: job 2/3 lenet: epoch 2/5, step 40/100 | train_loss 0.5 | job left 0:30 | "
                     "experiment left ~0:50, elapsed 0:00",
                     "exp [smoke]: job 2/3 lenet: epoch 2/5, step 40/100, done in 0:50 | "
                     "experiment left ~0:35, elapsed 0:00"]


def test_a_job_without_a_timed_record_yet_counts_as_one_of_mean_length(tmp_path):
    done = JobState("mlp", tmp_path / "mlp", "done", seconds=4.0)
    starting = JobState("lenet", tmp_path / "lenet", "running", {"step": 0, "steps": 10, "eta_s": None})
    planned = JobState("cnn", tmp_path / "cnn", "planned")
    assert experiment_eta([done, starting, planned]) == 8.0
    assert experiment_eta([starting, planned]) is None  # nothing to go by yet: shown as "?"


def test_on_a_terminal_the_display_redraws_in_place(tmp_path):
    run = tmp_path / "exp.partial"
    stream = io.StringIO()
    view = ProgressView(run, "exp [smoke]", stream, tty=True)
    make_job(run, "lenet", {"step": 40, "steps": 100, "eta_s": 30.0, "elapsed_s": 20.0, "stats": {}})
    view.poll()
    view.close()
    shown = stream.getvalue()
    assert "lenet |" in shown and "step 40/100" in shown and "job left 0:30" in shown
    assert "exp [smoke] jobs 0/1" in shown and "experiment left ~0:30" in shown
    assert "\x1b[A" in shown and "\r" in shown  # back up a line and over it: redrawn in place


@pytest.mark.slow
def test_a_builds_output_shows_each_job_with_its_step_and_the_time_left(smoke_book):
    stdout = smoke_book[2]
    lines = [m.group(0) for m in JOB_LINE.finditer(stdout)]
    assert lines, stdout[-3000:]
    with_estimate = [line for line in stdout.splitlines() if JOB_LINE.match(line) and ESTIMATE.search(line)]
    assert with_estimate, stdout[-3000:]
    # work outside jobs: its state and the elapsed time, from the first poll of every experiment on
    outside = re.compile(r"^dataset \[smoke\]: no training job running: [^|]* \| elapsed \d+:\d\d$", re.M)
    assert outside.search(stdout), stdout[-3000:]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_what_was_kept_and_how_to_resume(tmp_path):
    argv = ["--results-dir", str(tmp_path / "results"), "run", "classification", "--profile", "smoke",
            "-p", "models", "[lenet_avg]", "-p", "sgd_model", "''", "-p", "epochs", "6", "-p", "train_images", "2000"]
    partial = tmp_path / "results" / "smoke" / "classification.partial"
    command = subprocess.Popen(CLI + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_until((partial / "models" / "lenet_avg" / "last.pt").exists, "the first checkpoint", process=command)
    kernel = kernel_of(command)
    command.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends (the kernel has its own session)
    out, err = command.communicate(timeout=120)
    assert command.returncode == 130, err
    wait_until(lambda: not alive(kernel), "the kernel to stop", timeout=30)
    assert "Traceback" not in err and "Error" not in err, err
    assert f"kept in {partial}: 0 of 1 jobs finished; the checkpoints of lenet_avg" in err
    resume = err.split("to resume: ")[1].strip()
    assert shlex.split(resume) == ["fmnist-book", *argv]
    assert (partial / "models" / "lenet_avg" / "last.pt").exists() and "classification [smoke]: " in out
    assert read_json(partial / "run.json")["key"]
