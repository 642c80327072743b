"""Executors: jobs run in local worker processes or on a real (private, one-node) Slurm give the same bytes as
inline; a failing job is named with its log while the others finish; a job cancelled mid-run is submitted
again by the next command and resumes from its checkpoint to the same numbers.

The Slurm tests need root on Debian (the fixture installs Debian's Slurm, munge and MariaDB packages with
apt-get when they are missing and starts the daemons itself); elsewhere they are skipped, saying why.
"""
import _thread
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fmnist_core.chapters.classification import ClassificationConfig
from fmnist_core.chapters.classification import plan_jobs as plan_classification
from fmnist_core.chapters.fixmatch.study import FixMatchStudyConfig
from fmnist_core.chapters.fixmatch.study import plan_jobs as plan_fixmatch
from fmnist_core.core.jobs import Job, prepare_job, run_job
from fmnist_core.pipeline.executors import LocalExecutor, job_log, waves
from fmnist_core.pipeline.runner import load_profiles

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
CLI = [sys.executable, "-m", "fmnist_core.pipeline.cli"]
QUIET = dict(log=lambda *_: None)
# The inline runs of the smoke book use torch's default thread count; workers given as many give the same bytes.
INLINE_THREADS = __import__("torch").get_num_threads()


@pytest.fixture
def tests_importable(monkeypatch):
    """Workers import ``flaky_jobs`` (it registers the ``flaky`` kind) from this folder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))


def flaky_jobs(folder: Path) -> list[Job]:
    from flaky_jobs import FlakyConfig
    jobs = [Job("flaky", FlakyConfig(seed=s, fail=s == 1), folder / f"job{s}") for s in range(3)]
    for job in jobs:
        job.out_dir.mkdir(parents=True)
        prepare_job(job)
    return jobs


def assert_one_named_failure(failures, jobs):
    assert len(failures) == 1, failures
    [failure] = failures
    assert failure.label == "job1" and failure.log == job_log(jobs[1].out_dir) and failure.log.exists()
    assert "job asked to fail (seed 1)" in failure.error and "job asked to fail" in failure.log.read_text()
    assert jobs[0].finished() and jobs[2].finished() and not jobs[1].finished()


def test_a_failing_local_job_is_named_with_its_log_while_the_others_finish(tmp_path, tests_importable):
    jobs = flaky_jobs(tmp_path)
    assert_one_named_failure(LocalExecutor(workers=2).run({"toy": jobs}, **QUIET), jobs)


@pytest.mark.skipif(not __import__("fmnist_core.pipeline.job_server", fromlist=["x"]).fork_available(),
                    reason="job servers fork their jobs on Linux only")
def test_a_job_server_forks_each_job_from_one_process_that_imported_torch_once(tmp_path, tests_importable):
    from flaky_jobs import FlakyConfig
    from fmnist_core.pipeline.workers import JobServer, worker_env
    jobs = [Job("flaky", FlakyConfig(seed=s, fail=s == 1), tmp_path / f"job{s}") for s in range(3)]
    for job in jobs:
        job.out_dir.mkdir(parents=True)
        prepare_job(job)
    server = JobServer(worker_env(threads=1))
    try:
        codes, pids = [], []
        for job in jobs:
            handle = server.start(job.out_dir, job_log(job.out_dir))
            codes.append(handle.wait())
            pids.append(handle.pid)
        slow = Job("flaky", FlakyConfig(seed=5, sleep=60), tmp_path / "slow")
        slow.out_dir.mkdir()
        prepare_job(slow)
        handle = server.start(slow.out_dir, job_log(slow.out_dir))
        handle.terminate()  # as the executor does on Ctrl-C
        assert handle.wait() != 0 and not slow.finished()
        assert server.proc.poll() is None  # the server outlives its jobs
    finally:
        server.close()
    assert codes == [0, 1, 0] and jobs[0].finished() and jobs[2].finished() and not jobs[1].finished()
    assert "job asked to fail (seed 1)" in job_log(jobs[1].out_dir).read_text()
    started = [json.loads((job.out_dir / "started.json").read_text())["pid"] for job in jobs]
    assert started == pids and len(set(pids)) == 3 and server.proc.pid not in pids
    assert worker_threads([jobs[0], jobs[2]]) == [1, 1]


def worker_threads(jobs: list[Job]) -> list[int]:
    return [json.loads((job.out_dir / "metrics.json").read_text())["torch_threads"] for job in jobs]


def test_local_workers_share_the_cores_out_or_use_the_threads_asked(tmp_path, tests_importable, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert LocalExecutor(workers=2).threads == 2 and LocalExecutor(workers=8).threads == 1
    assert LocalExecutor(gpus=["0", "1", "2", "3"]).threads == 1
    jobs = [job for job in flaky_jobs(tmp_path) if not job.config.fail]
    assert LocalExecutor(workers=2, threads=3).run({"toy": jobs}, **QUIET) == []
    assert worker_threads(jobs) == [3, 3]
    with pytest.raises(Exception, match="--threads-per-worker must be at least 1"):
        LocalExecutor(workers=2, threads=0)


def test_local_workers_start_the_costliest_jobs_first(tmp_path, monkeypatch):
    from flaky_jobs import FlakyConfig
    jobs = [Job("flaky", FlakyConfig(seed=s), tmp_path / f"job{s}", cost=c) for s, c in enumerate([1, 5, 1, 3])]
    started = []

    class Finished:
        returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(LocalExecutor, "_start", staticmethod(lambda job, *_: started.append(job.label) or Finished()))
    monkeypatch.setattr(LocalExecutor, "_finished", staticmethod(lambda *_: []))
    assert LocalExecutor(workers=1).run({"toy": jobs[:2], "other": jobs[2:]}, **QUIET) == []
    assert started == ["job1", "job3", "job0", "job2"]  # by cost; equal costs keep their planned order


def test_the_studies_estimate_which_of_their_jobs_take_longest(tmp_path):
    from fmnist_core.chapters.semisupervised.model import SEMISUP_MODELS
    from fmnist_core.chapters.semisupervised.study import STEP_COST
    from fmnist_core.pipeline.executors import longest_first
    from fmnist_core.pipeline.scale import planned_jobs
    assert set(STEP_COST) == set(SEMISUP_MODELS)
    semisup = [job.label for _, job in longest_first([("s", j) for j in planned_jobs("semisupervised", "quick", tmp_path)])]
    assert semisup[0].startswith("cnn_ceiling_s") and all(label.startswith("m2_") for label in semisup[1:4])
    fixmatch = [job.label for _, job in longest_first([("f", j) for j in planned_jobs("fixmatch", "quick", tmp_path)])]
    first = sum(not x.startswith("supervised-only") for x in fixmatch)
    assert first >= 2 and all(x.startswith(("fixmatch_", "fully_supervised")) for x in fixmatch[:first])  # (1+mu)B
    assert all(x.startswith("supervised-only") for x in fixmatch[first:])  # B images a step


def test_a_job_folder_with_a_live_worker_gets_no_second_one(tmp_path, tests_importable):
    from fmnist_core.core.io import write_json
    from fmnist_core.core.jobs import worker_record
    [job, *_] = flaky_jobs(tmp_path)
    write_json(job.out_dir / "started.json", worker_record())  # this process stands for an earlier worker
    [failure] = LocalExecutor(workers=1).run({"toy": [job]}, **QUIET)
    assert f"already running in process {os.getpid()}" in failure.error and not job_log(job.out_dir).exists()


def test_experiments_wait_for_the_runs_they_require():
    assert waves(["dataset", "classification", "layerwise", "fixmatch"]) == [
        ["dataset", "classification", "fixmatch"], ["layerwise"]]


def fake_pipeline(monkeypatch, seconds: dict):
    """run_with_executor with stand-ins for the planner and the notebooks: each notebook sleeps ``seconds`` and
    records when it ran; a study's jobs are recorded when they are run."""
    from fmnist_core.pipeline import executors, runner
    events, lock = [], threading.Lock()

    def note(*what):
        with lock:
            events.append((time.perf_counter(), *what))

    class Executor(LocalExecutor):
        def run(self, studies, log=print):
            note("jobs", tuple(studies))
            return []

    def notebook(experiment, *args, **kwargs):
        note("start", experiment)
        time.sleep(seconds.get(experiment, 0.05))
        note("end", experiment)
        return experiment

    monkeypatch.setattr(executors, "plan_study", lambda e, *a, **k: ["job"] if e != "layerwise" else None)
    monkeypatch.setattr(runner, "run_experiment", notebook)
    return Executor, events


def test_notebooks_run_side_by_side_as_soon_as_the_runs_they_need_are_done(monkeypatch, tmp_path):
    from fmnist_core.pipeline.executors import run_with_executor
    experiments = ["dataset", "classification", "layerwise", "vae", "semisupervised", "fixmatch"]
    Executor, events = fake_pipeline(monkeypatch, {"classification": 0.1, "layerwise": 0.6, "semisupervised": 0.2})
    assert run_with_executor(Executor(workers=2), experiments, "quick", results_dir=tmp_path, log=lambda *_: None) \
        == experiments
    at = {(kind, rest[0]): t for t, kind, *rest in events if kind != "jobs"}
    assert events[0][1] == "jobs" and set(events[0][2]) == {"dataset", "classification", "vae", "semisupervised",
                                                             "fixmatch"}
    assert at["start", "layerwise"] >= at["end", "classification"]  # it requires classification's run
    assert at["start", "fixmatch"] >= at["end", "semisupervised"]  # it reads the semi-supervised run
    # Two lanes: layerwise starts as soon as classification is done and runs beside the other notebooks.
    assert at["start", "vae"] < at["end", "layerwise"] and at["start", "semisupervised"] < at["end", "layerwise"]
    running = 0
    for _, kind, *_ in sorted(e for e in events if e[1] != "jobs"):
        running += {"start": 1, "end": -1}[kind]
        assert running <= 2


def test_one_lane_runs_the_notebooks_one_after_the_other_in_order(monkeypatch, tmp_path):
    from fmnist_core.pipeline.executors import run_with_executor
    experiments = ["dataset", "classification", "layerwise", "vae", "semisupervised", "fixmatch"]
    Executor, events = fake_pipeline(monkeypatch, {})
    run_with_executor(Executor(workers=1), experiments, "quick", results_dir=tmp_path, log=lambda *_: None)
    assert [e[2] for e in events if e[1] == "start"] == experiments
    assert [e[1] for e in events if e[1] != "jobs"] == ["start", "end"] * len(experiments)


# --------------------------------------------------------------------------- same bytes as inline
SMALL_CLASSIFICATION = {"models": ["mlp", "lenet_avg"], "sgd_model": "", "budget_limited": []}


def smoke_params(experiment: str, **overrides) -> dict:
    return {**(load_profiles()["smoke"]["experiments"][experiment] or {}), **overrides}


def assert_same_job_bytes(jobs: list[Job], reference_dir: Path):
    """Each job's metrics.json equals the inline one of the smoke book (same relative folder)."""
    assert jobs
    for job in jobs:
        inline = reference_dir / job.out_dir.parent.name / job.out_dir.name / "metrics.json"
        assert (job.out_dir / "metrics.json").read_bytes() == inline.read_bytes(), job.label


def classification_jobs(run_dir: Path) -> list[Job]:
    cfg = ClassificationConfig.from_overrides(smoke_params("classification", **SMALL_CLASSIFICATION))
    return plan_classification(cfg, run_dir)


def run_cli(results: Path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["--results-dir", str(results), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def assert_gathered_only(run_dir: Path, experiment: str):
    """The notebook found every job finished: it shows no training step."""
    outputs = json.dumps([c.get("outputs") for c in json.loads((run_dir / f"{experiment}.ipynb").read_text())["cells"]])
    assert "step 4/4" not in outputs and "epoch 1/1" not in outputs


@pytest.mark.slow
def test_local_workers_give_the_inline_bytes(smoke_book, tmp_path):
    results = tmp_path / "results"
    done = run_cli(results, "run", "fixmatch", "--profile", "smoke", "--executor", "local", "--workers", "2",
                   "--threads-per-worker", str(INLINE_THREADS))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"local: 3 job(s) of fixmatch [smoke]; workers 2 at a time, {INLINE_THREADS} CPU thread(s) each" in done.stdout
    run_dir = results / "smoke" / "fixmatch"
    assert_gathered_only(run_dir, "fixmatch")
    assert_same_job_bytes(plan_fixmatch(FixMatchStudyConfig.from_overrides(smoke_params("fixmatch")), run_dir),
                          smoke_book[0] / "fixmatch")
    jobs = classification_jobs(tmp_path / "classification")
    for job in jobs:
        job.out_dir.mkdir(parents=True)
        prepare_job(job)
    assert LocalExecutor(workers=2, threads=INLINE_THREADS).run({"classification": jobs}, **QUIET) == []
    assert_same_job_bytes(jobs, smoke_book[0] / "classification")


# --------------------------------------------------------------------------------------- real Slurm
@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A private one-node Slurm (with accounting), up for this module's tests, then stopped and wiped."""
    if os.geteuid() != 0 or not shutil.which("apt-get") or not shutil.which("dpkg"):
        pytest.skip("a private Slurm needs root on Debian (apt-get, setpriv, munge user): not this machine")
    state = Path("/tmp/fmnist-slurm-test")  # fixed: `up` finds and stops the leftovers of a killed session
    env = {**os.environ, "FMNIST_SLURM_DIR": str(state)}
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, env=env, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    conf = str(state / "etc" / "slurm.conf")
    previous, os.environ["SLURM_CONF"] = os.environ.get("SLURM_CONF"), conf
    yield conf
    subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, env=env, timeout=120)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def slurm_executor(folder: Path, cpus: int = 1):
    from fmnist_core.pipeline.slurm import SlurmExecutor, SlurmOptions
    return SlurmExecutor(SlurmOptions(time=30, cpus_per_job=cpus), folder, poll_s=0.3)


def test_a_failing_slurm_job_is_named_with_its_log_while_the_others_finish(tmp_path, local_slurm,
                                                                           tests_importable):
    jobs = flaky_jobs(tmp_path / "jobs")
    failures = slurm_executor(tmp_path / ".slurm").run({"toy": jobs}, **QUIET)
    assert_one_named_failure(failures, jobs)
    assert "Slurm job" in failures[0].error and str(tmp_path / ".slurm" / "toy") in failures[0].error
    assert worker_threads([jobs[0], jobs[2]]) == [1, 1]  # as many threads as the CPUs Slurm gave each task


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even where the tests were started in the background
    (a shell starts background commands with SIGINT ignored, and Python then leaves it ignored)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_leaves_the_slurm_jobs_running_and_says_how_to_reattach(tmp_path, local_slurm, tests_importable,
                                                                        ctrl_c_raises):
    from flaky_jobs import FlakyConfig
    from fmnist_core.pipeline.slurm import read_record, slurm_states
    job = Job("flaky", FlakyConfig(sleep=60), tmp_path / "jobs" / "slow")
    job.out_dir.mkdir(parents=True)
    prepare_job(job)
    said = []
    def interrupt_once_submitted():
        while not (tmp_path / ".slurm" / "toy" / "submitted.json").exists():
            time.sleep(0.1)
        time.sleep(0.5)
        _thread.interrupt_main()
    threading.Thread(target=interrupt_once_submitted, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        slurm_executor(tmp_path / ".slurm").run({"toy": [job]}, log=said.append)
    slurm_id = read_record(tmp_path / ".slurm" / "toy")[str(job.out_dir)]
    try:
        assert slurm_states([slurm_id])[slurm_id] in ("PENDING", "RUNNING")
        assert "keep running" in said[-1] and "Re-attach with" in said[-1] and "scancel" in said[-1]
    finally:
        subprocess.run(["scancel", slurm_id.split("_")[0]])


def test_plan_lists_the_jobs_of_a_profile_with_their_cost(tmp_path):
    done = run_cli(tmp_path, "plan", "--profile", "smoke")
    assert done.returncode == 0, done.stderr
    assert "fixmatch: 3 job(s)" in done.stdout and "fixmatch_n40_s0" in done.stdout
    assert "18 jobs: " in done.stdout and "unknown" in done.stdout


@pytest.mark.slow
def test_slurm_job_arrays_give_the_inline_bytes(smoke_book, tmp_path, local_slurm):
    results = tmp_path / "results"
    done = run_cli(results, "run", "fixmatch", "--profile", "smoke", "--executor", "slurm",
                   "--slurm-cpus-per-job", str(INLINE_THREADS))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "submitted 3 job(s) as array" in done.stdout
    run_dir = results / "smoke" / "fixmatch"
    assert_gathered_only(run_dir, "fixmatch")
    assert_same_job_bytes(plan_fixmatch(FixMatchStudyConfig.from_overrides(smoke_params("fixmatch")), run_dir),
                          smoke_book[0] / "fixmatch")
    assert (run_dir / "runs" / "fixmatch_n40_s0.log").exists()  # the job's log, beside its folder
    jobs = classification_jobs(tmp_path / "classification")
    for job in jobs:
        job.out_dir.mkdir(parents=True)
        prepare_job(job)
    assert slurm_executor(tmp_path / ".slurm", INLINE_THREADS).run({"classification": jobs}, **QUIET) == []
    assert_same_job_bytes(jobs, smoke_book[0] / "classification")


# Long enough to be interrupted after its first checkpoint (step 2) even when both jobs run at once (one CPU
# thread each), short enough to stay cheap.
LONG_FIXMATCH = ["-p", "steps", "200", "-p", "checkpoint_every", "2", "-p", "eval_every", "0", "-p", "log_every",
                 "2", "-p", "ceiling_labels", "0"]


@pytest.mark.slow
def test_preempted_and_cancelled_slurm_jobs_resume_to_the_same_numbers(tmp_path, local_slurm, one_thread):
    """One job is preempted (Slurm's warning signal): submitit requeues it and it resumes in the same command.
    The other is cancelled: it is named as failed while the first finishes, and the next command submits it
    again; it resumes too. Both end with the bytes of an uninterrupted inline run with as many threads (one: each
    task has one CPU)."""
    from fmnist_core.pipeline.slurm import read_record
    results = tmp_path / "results"
    command = CLI + ["--results-dir", str(results), "run", "fixmatch", "--profile", "smoke", "--executor", "slurm",
                     *LONG_FIXMATCH]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = results / "smoke" / "fixmatch.partial" / "runs"
    preempted, cancelled = runs / "fixmatch_n40_s0", runs / "supervised-only_n40_s0"
    deadline = time.time() + 300
    while not all((d / "last.pt").exists() for d in (preempted, cancelled)) and time.time() < deadline:
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.05)
    record = read_record(results / "smoke" / ".slurm" / "fixmatch")
    subprocess.run(["scancel", "--signal=USR2", record[str(preempted)]], check=True)
    subprocess.run(["scancel", record[str(cancelled)]], check=True)
    assert not (preempted / "done.json").exists() and not (cancelled / "done.json").exists()
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 1, (first.returncode, output)
    assert "job fixmatch/supervised-only_n40_s0 failed" in output and "CANCELLED" in output, output
    assert str(job_log(cancelled)) in output
    assert (preempted / "done.json").exists() and "resuming from" in job_log(preempted).read_text()
    status = run_cli(results, "status", "--profile", "smoke")
    assert "fixmatch jobs: 1 done, 1 failed" in status.stdout, status.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "submitted 1 job(s)" in again.stdout
    run_dir = results / "smoke" / "fixmatch"
    assert "resuming from" in job_log(run_dir / "runs" / cancelled.name).read_text()
    params = smoke_params("fixmatch", **{k: int(v) for k, v in zip(LONG_FIXMATCH[1::3], LONG_FIXMATCH[2::3])})
    inline = plan_fixmatch(FixMatchStudyConfig.from_overrides(params), tmp_path / "inline")
    assert [j.label for j in inline] == [preempted.name, cancelled.name]
    for job in inline:
        run_job(job, **QUIET)
        assert (run_dir / "runs" / job.label / "metrics.json").read_bytes() == (job.out_dir / "metrics.json").read_bytes()


# ---------------------------------------------------------------------------------- a profile's executor
def executor_args(*argv: str):
    """The ``build`` options of ``argv``, as the command line parses them."""
    import argparse
    from fmnist_core.pipeline.executors import add_executor_options
    parser = argparse.ArgumentParser()
    add_executor_options(parser)
    return parser.parse_args(list(argv))


def with_profile_executor(monkeypatch, settings):
    from fmnist_core.pipeline import runner
    profiles = {"p": {"experiments": {}, **({"executor": settings} if settings is not None else {})}}
    monkeypatch.setattr(runner, "load_profiles", lambda *a, **k: profiles)


def test_a_profile_names_where_its_jobs_run_and_the_command_line_overrides_it(tmp_path, monkeypatch):
    from fmnist_core.pipeline.executors import make_executor
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    with_profile_executor(monkeypatch, {"executor": "local", "workers": 4})
    executor = make_executor(executor_args(), "p", tmp_path)
    assert isinstance(executor, LocalExecutor) and len(executor.slots) == 4 and executor.threads == 1
    assert make_executor(executor_args("--executor", "inline"), "p", tmp_path) is None
    assert len(make_executor(executor_args("--workers", "2"), "p", tmp_path).slots) == 2
    with_profile_executor(monkeypatch, None)
    assert make_executor(executor_args(), "p", tmp_path) is None  # no setting: inline
    with_profile_executor(monkeypatch, {"executor": "local"})
    assert len(make_executor(executor_args(), "p", tmp_path).slots) == 2


@pytest.mark.parametrize("settings, expected", [
    ("local", "'executor' must be a mapping"),
    ({"executor": "slurm"}, "'executor.executor' must be one of inline, local, got 'slurm'"),
    ({"executor": "local", "workers": 0}, "'executor.workers' must be a whole number of at least 1, got 0"),
    ({"executor": "local", "workers": "two"}, "'executor.workers' must be a whole number"),
    ({"executor": "local", "worker": 2}, "'executor' has no setting 'worker'"),
])
def test_a_bad_executor_setting_in_the_profile_file_is_refused_naming_file_and_profile(tmp_path, settings,
                                                                                        expected):
    import yaml
    from fmnist_core.core.errors import ConfigError
    from fmnist_core.pipeline import runner
    path = tmp_path / "profiles.yml"
    path.write_text(yaml.safe_dump({"p": {"experiments": {}, "executor": settings}}))
    with pytest.raises(ConfigError) as info:
        runner.load_profiles(path)
    assert f"{path}: profile 'p'" in str(info.value) and expected in str(info.value)
