"""Faults a run survives: SIGKILL of the kernel or of the command, kills during writes, concurrent commands,
NaN losses, a failing chapter during ``build``, corrupt files, and code changed after a cached run.

The runs here are real (papermill, smoke profile); the classification run is cut down to one small model
so that a kill lands in the middle of its training and the whole file stays within a few minutes.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmnist_core.pipeline import book
from fmnist_core.pipeline import cli
from fmnist_core.pipeline import runner
from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import load_checkpoint, read_json, save_checkpoint, write_json

from conftest import CLI, visible_text

pytestmark = pytest.mark.slow

# One LeNet, four epochs of 4,000 images: a few seconds of training, checkpointed after every epoch.
SMALL_CLASSIFICATION = ["-p", "models", "[lenet_avg]", "-p", "sgd_model", "''", "-p", "epochs", "4",
                        "-p", "train_images", "4000"]


def start(results: Path, *argv) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["--results-dir", str(results), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_classification(results: Path) -> subprocess.Popen:
    return start(results, "run", "classification", "--profile", "smoke", *SMALL_CLASSIFICATION)


def wait_until(condition, what: str, timeout: float = 300, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the command ended before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kernels_of(process: subprocess.Popen) -> list[int]:
    """The ipykernel processes the command started (none before papermill has launched one)."""
    found = []
    for pid in children(process.pid):
        try:
            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # it ended meanwhile
            continue
    return found


def kernel_of(process: subprocess.Popen) -> int:
    kernels = kernels_of(process)
    assert len(kernels) == 1, kernels
    return kernels[0]


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """``dataset`` twice at once (the second must be refused) and ``classification`` beside them."""
    results = tmp_path_factory.mktemp("concurrent") / "results"
    first = start(results, "run", "dataset", "--profile", "smoke")
    wait_until(lambda: (results / "smoke" / "dataset.partial").exists(), "the first run started", process=first)
    other = start_classification(results)
    second = subprocess.run(CLI + ["--results-dir", str(results), "run", "dataset", "--profile", "smoke"],
                            capture_output=True, text=True, timeout=120)
    refused_while_running = first.poll() is None
    return {"results": results, "first": finish(first), "second": second, "other": finish(other),
            "refused_while_running": refused_while_running}


@pytest.fixture(scope="module")
def reference_metrics(concurrent) -> bytes:
    """``metrics.json`` of the uninterrupted small classification run."""
    return (concurrent["results"] / "smoke" / "classification" / "metrics.json").read_bytes()


def test_a_second_run_of_the_same_experiment_is_refused_while_another_experiment_runs(concurrent):
    results, second = concurrent["results"] / "smoke", concurrent["second"]
    assert concurrent["refused_while_running"]
    assert second.returncode == 2
    assert "another run of 'dataset' with profile 'smoke' is in progress" in second.stderr
    assert "Traceback" not in second.stderr
    assert concurrent["first"][0] == 0 and concurrent["other"][0] == 0, (concurrent["first"], concurrent["other"])
    for experiment in ("dataset", "classification"):
        assert read_json(results / experiment / "metrics.json")["summary"]
        assert not runner.failure_path(results / experiment).exists()
    assert not list(results.glob("*.partial"))


def start_and_wait_for_the_first_checkpoint(results: Path) -> tuple[subprocess.Popen, Path, Path]:
    """The small classification run, once its first ``last.pt`` exists: (command, final folder, last.pt)."""
    final = results / "smoke" / "classification"
    last = final.with_name("classification.partial") / "models" / "lenet_avg" / "last.pt"
    command = start_classification(results)
    wait_until(last.exists, "the first checkpoint", process=command)
    return command, final, last


def assert_rerun_resumes_to(results: Path, final: Path, reference_metrics: bytes) -> None:
    code, _, err = finish(start_classification(results))
    assert code == 0, err
    assert "resuming from" in (final / "classification.ipynb").read_text()
    assert (final / "metrics.json").read_bytes() == reference_metrics


def test_killing_the_kernel_mid_training_then_rerunning_resumes_to_the_same_metrics(tmp_path, reference_metrics):
    results = tmp_path / "results"
    command, final, last = start_and_wait_for_the_first_checkpoint(results)
    os.kill(kernel_of(command), signal.SIGKILL)
    code, _, err = finish(command)
    assert code == 1 and "classification failed" in err and "Traceback" not in err
    assert not final.exists()  # nothing claims a finished run
    assert 1 <= len(load_checkpoint(last)["history"]) < 4  # killed after an epoch's checkpoint, before the end
    assert "FAILED" in runner.results_table("smoke", results)

    assert_rerun_resumes_to(results, final, reference_metrics)
    assert not runner.failure_path(final).exists()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_killing_the_command_mid_training_then_rerunning_resumes_to_the_same_metrics(tmp_path, reference_metrics):
    """The command is SIGKILLed mid-training and its kernel does not finish the job behind its back.

    The kernel is frozen (SIGSTOP) the moment the first checkpoint exists, before the command is killed, so
    the job cannot end in between however fast the machine; the frozen orphan is then killed, as it would
    stop itself (that it does is :func:`test_the_kernel_of_a_killed_command_stops_by_itself`).
    """
    results = tmp_path / "results"
    final = results / "smoke" / "classification"
    last = final.with_name("classification.partial") / "models" / "lenet_avg" / "last.pt"
    command = start_classification(results)
    wait_until(lambda: kernels_of(command), "the kernel started", process=command)
    kernel = kernel_of(command)
    wait_until(last.exists, "the first checkpoint", process=command)
    os.kill(kernel, signal.SIGSTOP)
    try:
        command.send_signal(signal.SIGKILL)
        command.wait()  # not communicate(): the frozen kernel holds the command's output pipes open
        assert parent_of(kernel) != command.pid  # the kernel is an orphan now
        assert 1 <= len(load_checkpoint(last)["history"]) < 4  # frozen after an epoch's checkpoint, before the end
    finally:
        os.kill(kernel, signal.SIGKILL)
        command.stdout.close()
        command.stderr.close()
    wait_until(lambda: not alive(kernel), "the frozen kernel to be killed", timeout=60)
    assert not final.exists()
    states = dict(runner.run_states("smoke", results))
    assert states["classification"].startswith("not run (an interrupted run waits to be resumed)")

    assert_rerun_resumes_to(results, final, reference_metrics)


def test_the_kernel_of_a_killed_command_stops_by_itself(tmp_path, reference_metrics):
    """An orphaned kernel notices that its command is gone and exits (it may finish the job first: the
    re-run then reaches the same metrics whether it resumes or only collects the finished job)."""
    results = tmp_path / "results"
    command, final, _ = start_and_wait_for_the_first_checkpoint(results)
    kernel = kernel_of(command)
    command.send_signal(signal.SIGKILL)
    command.communicate()
    wait_until(lambda: not alive(kernel), "the orphaned kernel to notice and exit", timeout=60)
    assert not final.exists()
    code, _, err = finish(start_classification(results))
    assert code == 0, err
    assert (final / "metrics.json").read_bytes() == reference_metrics


WRITER = """
import sys, torch
from fmnist_core.core.io import save_checkpoint, write_json
folder, i = sys.argv[1], 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(folder + "/state.pt", {"version": i, "weights": torch.full((1_000_000,), float(i))})
    write_json(folder + "/metrics.json", {"version": i, "values": [i] * 100_000})
"""


def test_a_kill_while_writing_leaves_the_previous_good_copy(tmp_path):
    save_checkpoint(tmp_path / "state.pt", {"version": 0, "weights": torch.zeros(1_000_000)})
    write_json(tmp_path / "metrics.json", {"version": 0, "values": [0] * 100_000})
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):  # different points of the write cycle
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        time.sleep(delay)
        writer.kill()
        writer.wait()
        state, metrics = load_checkpoint(tmp_path / "state.pt"), read_json(tmp_path / "metrics.json")
        assert torch.equal(state["weights"], torch.full((1_000_000,), float(state["version"])))
        assert metrics["values"] == [metrics["version"]] * 100_000
    assert state["version"] > 0  # the writer did replace the files between kills


def test_a_nan_loss_stops_the_run_and_the_book_shows_the_failure(tmp_path, capsys):
    results = tmp_path / "results"
    code = cli.main(["--results-dir", str(results), "run", "classification", "--profile", "smoke",
                     "-p", "models", "[mlp]", "-p", "sgd_model", "''", "-p", "lr", "1.0e+30"])
    err = capsys.readouterr().err
    assert code == 1
    assert "classification failed" in err and "mlp: loss is nan in steps 1-" in err and "epoch 1;" in err
    final = results / "smoke" / "classification"
    assert not final.exists()
    source = tmp_path / "source"
    missing = book.assemble("smoke", results, source)
    assert "classification" in missing
    page = (source / "classification.md").read_text()
    assert "loss is nan" in page and "fmnist-book run classification --profile smoke" in page
    assert not (source / "classification.ipynb").exists()


def test_one_failing_chapter_does_not_stop_the_build(smoke_copy, tmp_path, capsys):
    """A killed ``classification`` re-run left a failure record and a corrupt checkpoint: ``build`` runs it
    again, it fails with a message naming the file, its page says so, the other chapters stay, exit status 1."""
    profile_dir = smoke_copy / "smoke"
    write_json(runner.failure_path(profile_dir / "classification"), {"error": "killed"})
    params = runner.resolve_params("classification", "smoke")
    partial = profile_dir / "classification.partial"
    (partial / "models" / "mlp").mkdir(parents=True)
    write_json(partial / "run.json", {"key": runner.run_key("classification", "smoke", params, smoke_copy)})
    (partial / "models" / "mlp" / "last.pt").write_bytes(b"PK\x03\x04 truncated")

    output = tmp_path / "build"
    code = cli.main(["--results-dir", str(smoke_copy), "build", "--profile", "smoke", "--output-dir", str(output)])
    out, err = capsys.readouterr()
    assert code == 1 and "failed experiments: classification" in err
    page = visible_text((output / "_build" / "html" / "classification.html").read_text())
    assert "models/mlp/last.pt: not a readable checkpoint" in page and "fmnist-book run classification --profile smoke" in page
    for chapter in ("dataset", "layerwise", "vae", "fixmatch"):
        assert "missing from" not in (output / "_build" / "html" / f"{chapter}.html").read_text(), chapter
    assert (profile_dir / "classification" / "metrics.json").exists()  # the previous finished run is kept


def test_corrupt_results_files_are_named_in_one_message(smoke_copy, capsys):
    metrics = smoke_copy / "smoke" / "vae" / "metrics.json"
    intact = metrics.read_text()
    metrics.write_text(intact[:100])
    code = cli.main(["--results-dir", str(smoke_copy), "results", "--profile", "smoke"])
    err = capsys.readouterr().err
    assert code == 2 and f"{metrics}: not a readable JSON file" in err and "Traceback" not in err
    with pytest.raises(FmnistBookError, match="vae/metrics.json: not a readable JSON file"):
        book.assemble("smoke", smoke_copy, smoke_copy / "source")  # the glance page reads every run's metrics

    metrics.write_text(intact)
    notebook = smoke_copy / "smoke" / "dataset" / "dataset.ipynb"
    notebook.write_bytes(b"\x00garbage")
    with pytest.raises(FmnistBookError, match="dataset.ipynb: not a readable JSON file"):
        book.assemble("smoke", smoke_copy, smoke_copy / "source")


def test_changed_source_reruns_only_the_experiments_that_use_it(smoke_copy, monkeypatch):
    assert all(state == "up to date" for _, state in runner.run_states("smoke", smoke_copy))
    original, changed = runner.source_hashes, "fmnist_core/core/generative.py"
    monkeypatch.setattr(runner, "source_hashes",
                        lambda modules: {k: v + ("-changed" if k == changed else "") for k, v in original(modules).items()})
    states = dict(runner.run_states("smoke", smoke_copy))
    assert states["vae"] == states["semisupervised"] == f"out of date: changed {changed}"
    assert all(states[e] == "up to date" for e in ("dataset", "classification", "layerwise"))
    assert states["fixmatch"] == "out of date: re-runs after semisupervised"  # it shows that chapter's results
    quiet = {"log": lambda *_: None, "results_dir": smoke_copy}
    assert runner.run_experiment("dataset", "smoke", **quiet).status == "cached"
    before = read_json(smoke_copy / "smoke" / "vae" / "env.json")["key"]
    assert runner.run_experiment("vae", "smoke", **quiet).status == "done"
    assert read_json(smoke_copy / "smoke" / "vae" / "env.json")["key"] != before
    assert dict(runner.run_states("smoke", smoke_copy))["vae"] == "up to date"
