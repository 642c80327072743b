"""A GPU session: one command records the ``standard`` profile's numbers on a bare CUDA machine with a time limit;
another records what came back into the project.

``scripts/gpu-session.sh`` installs what the machine lacks, then runs ``python -m fmnist_core.pipeline.gpu_session
session``: the steps of one :data:`PLANS` entry, one after the other, each with its share of the time left
before ``--budget-s`` (counted from the script's start) and killed if it outlives it. A chapter's share also
sets its training deadline (:mod:`fmnist_core.core.deadline`), ``finish_s`` seconds before its share ends, so
that its jobs stop at a history record and the notebook still evaluates, plots and writes its results. Whatever
happened, the output folder ends with at most :data:`MAX_FILES` files of at most :data:`MAX_FILE_BYTES` each:

* ``session.json``: the plan, device, commit, times, and each step's command, exit status, seconds, deadline
  and outcome (the tests' counts, the chapters' stopped jobs);
* ``gpu-session.log``: everything the steps printed;
* ``fixmatch_bench.json``: ``bench/fixmatch_bench.py``'s record (both pipelines, GPU memory);
* ``<experiment>.tar.gz``: the chapter's run folder (metrics, histories, ``env.json``, figures, timings, the
  executed notebook), checkpoints left out.

``--rehearsal`` runs the same steps on a CPU with the ``smoke`` profile's budgets (``make test`` does, in
``tests/test_gpu_session.py``): the CUDA-only tests are then collected and skipped, the benchmark runs a few
steps of the small CNN, and the classification chapter's jobs are stopped by a deadline at their first record.

``python -m fmnist_core.pipeline.gpu_session record FOLDER`` (``scripts/record-gpu-results.sh``) unpacks such a
folder: each chapter's results into ``reference/<profile>/<experiment>/`` (what the glance page's recorded column
and the classification chapter read), the benchmark into ``bench/results/fixmatch_<device type>.json`` and the
jobs' seconds per step into ``bench/results/step_times.json`` (what ``fmnist-book plan`` reads), the session's
record into ``reference/<profile>/session.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.deadline import DEADLINE_ENV, stopped_note
from fmnist_core.core.errors import FmnistBookError, RunError
from fmnist_core.core.io import PROJECT_ROOT, read_json, write_json

SESSION_FILE, LOG_FILE, BENCH_FILE = "session.json", "gpu-session.log", "fixmatch_bench.json"
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2 ** 20  # what a device run's output folder brings back
PACK_RESERVE_S = 25.0  # kept at the end of the budget for packing
MIN_SLOT_S = 20.0  # a step with less time than this left is skipped
COMMIT_ENV = "FMNIST_SESSION_COMMIT"  # the commit of the copied checkout, when it travels without .git
# The tests that run only with CUDA (skipped on a CPU), and those whose CUDA branch checks more there.
CUDA_ONLY_TESTS = ["tests/test_fixmatch.py::test_a_step_and_the_ema_update_never_wait_for_the_gpu"]
CUDA_TESTS = CUDA_ONLY_TESTS + [
    "tests/test_host_sync.py", "tests/test_train.py::test_speed_options_are_read_on_every_device_and_act_on_cuda_only",
    "tests/test_train.py::test_deterministic_mode_sets_the_cuda_switches_and_speed_mode_clears_them"]
BENCH_ARGS = ["--device", "cuda", "--backbone", "wrn28_2", "--dtype", "bfloat16", "--batch-size", "64", "--mu", "7",
              "--steps", "60", "--rounds", "2", "--warmup", "5", "--workers", "4"]
REHEARSAL_BENCH_ARGS = ["--device", "cpu", "--backbone", "smallcnn", "--dtype", "float32", "--batch-size", "8",
                        "--mu", "2", "--steps", "2", "--rounds", "1", "--warmup", "1", "--workers", "1",
                        "--threads", "1"]
# Left out of a chapter's archive: checkpoints and TensorBoard events always, then (only when the archive would
# exceed MAX_FILE_BYTES) the test-set probabilities and split indices, then the executed notebook.
PACK_TIERS = ((".pt",), (".pt", ".npy", ".npz"), (".pt", ".npy", ".npz", ".ipynb"))
# What `record` keeps of a chapter's run folder (the archive keeps more).
RECORDED_TOP = ("metrics.json", "env.json", "timings.json")
RECORDED_JOB = ("history.json", "history.csv", "metrics.json", "timings.json", "done.json", "job.json", "stopped.json")


@dataclass(frozen=True)
class Step:
    """One step of a plan.

    Attributes
    ----------
    name : str
        ``tests``, ``bench``, or the experiment a ``chapter`` step runs.
    kind : str
        ``tests`` | ``bench`` | ``chapter``.
    cap_s : float
        Tests and benchmark: at most this many seconds.
    share : float
        Chapters: their relative share of the time left (the estimated minutes, by default from
        ``bench/results/standard_estimate.json``).
    finish_s : float
        Chapters: seconds between the training deadline and the end of the share (evaluation, figures).
    overrides : dict
        Chapters: parameters given with ``-p`` on top of the profile (a plan that runs part of a chapter).
    rehearsal_overrides : dict
        Chapters: what the rehearsal gives instead, on top of the ``smoke`` profile.
    workers : int
        Chapters: local workers (``--executor local``) sharing the GPU: the steps are host-bound there.
    """

    name: str
    kind: str
    cap_s: float = 0.0
    share: float = 0.0
    finish_s: float = 60.0
    overrides: dict = field(default_factory=dict)
    rehearsal_overrides: dict = field(default_factory=dict)
    workers: int = 4


PLANS = {
    "book": ("the CUDA tests, the FixMatch step benchmark, the classification and VAE chapters",
             [Step("tests", "tests", cap_s=120), Step("bench", "bench", cap_s=120),
              Step("classification", "chapter", finish_s=90,
                   rehearsal_overrides={"models": ["mlp", "lenet_max"], "sgd_model": "", "budget_limited": [],
                                        "epochs": 2}),
              Step("vae", "chapter", finish_s=50)]),
    "semisupervised": ("the semi-supervised chapter, one seed",
                       [Step("semisupervised", "chapter", finish_s=90, overrides={"seeds": [0]})]),
    "fixmatch": ("the FixMatch chapter at 40 labels, one seed, the profile's 2^14 steps, no ceiling run",
                 [Step("fixmatch", "chapter", finish_s=60,
                       overrides={"label_counts": [40], "seeds": [0], "ceiling_labels": 0})]),
}
REHEARSAL_STOPS = ("classification",)  # chapters whose deadline the rehearsal sets at their start


# ----------------------------------------------------------------------------------------------- slots
def chapter_shares(path: Path | None = None) -> dict[str, float]:
    """Estimated minutes per chapter on one H100 (``bench/results/standard_estimate.json``); empty if unreadable."""
    path = path or PROJECT_ROOT / "bench" / "results" / "standard_estimate.json"
    try:
        return {name: float(m["total"]) for name, m in read_json(path)["minutes_per_chapter"].items()}
    except (FmnistBookError, KeyError, TypeError, ValueError):
        return {}


def slot(step: Step, remaining: list[Step], seconds_left: float, shares: dict[str, float]) -> float:
    """Seconds ``step`` may take: tests and benchmark their cap; a chapter its share of the time left among the
    chapters still to run (``remaining``, itself included)."""
    if step.kind != "chapter":
        return max(0.0, min(step.cap_s, seconds_left))
    weight = lambda s: s.share or shares.get(s.name, 1.0)  # noqa: E731
    total = sum(weight(s) for s in remaining if s.kind == "chapter")
    return max(0.0, seconds_left * weight(step) / total)


# ----------------------------------------------------------------------------------------------- steps
class Session:
    """Runs a plan's steps into ``out`` (the output folder) and ``work`` (results, scratch), logging to ``out``."""

    def __init__(self, plan: str, out: Path, work: Path, budget_s: float, started: float, rehearsal: bool,
                 python: str = sys.executable):
        if plan not in PLANS:
            raise RunError(f"unknown plan {plan!r} (known: {', '.join(PLANS)})")
        self.plan, self.out, self.work, self.rehearsal, self.python = plan, Path(out), Path(work), rehearsal, python
        self.profile = "smoke" if rehearsal else "standard"
        self.started, self.end = started, started + budget_s
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results = self.work / "results"
        self.record = {"plan": plan, "plan_description": PLANS[plan][0], "rehearsal": rehearsal,
                       "profile": self.profile, "budget_s": budget_s,
                       "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                       **machine_record(), "git_commit": session_commit(), "steps": []}

    def log(self, line: str) -> None:
        with open(self.out / LOG_FILE, "a") as handle:
            handle.write(f"[{time.strftime('%H:%M:%S')} +{time.time() - self.started:.0f}s] {line}\n")
        print(line, flush=True)

    def run(self) -> int:
        """Every step, then the packing; 0 when every step succeeded."""
        steps, shares = PLANS[self.plan][1], chapter_shares()
        self.log(f"plan {self.plan} ({PLANS[self.plan][0]}), profile {self.profile}, "
                 f"{self.end - time.time():.0f} s left, on {self.record['device']}")
        for i, step in enumerate(steps):
            seconds = slot(step, steps[i:], self.end - time.time() - PACK_RESERVE_S, shares)
            if seconds < MIN_SLOT_S:
                entry = {"name": step.name, "kind": step.kind, "status": "skipped: no time left", "slot_s": seconds}
                self.log(f"{step.name}: skipped ({seconds:.0f} s left)")
            else:
                entry = getattr(self, f"_{step.kind}")(step, seconds)
            self.record["steps"].append(entry)
            write_json(self.out / SESSION_FILE, self.record)
        self.record["files"] = self.pack()
        self.record["seconds"] = round(time.time() - self.started, 1)
        self.record["ended_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC")
        failed = [s["name"] for s in self.record["steps"] if s["status"] != "ok"]
        outcome = f"not ok: {', '.join(failed)}" if failed else "every step ok"
        self.log(f"done in {self.record['seconds']:.0f} s; {outcome}")
        write_json(self.out / SESSION_FILE, self.record)
        return 1 if failed else 0

    def _call(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run ``command`` with its output appended to the log, killed (its whole process group) after
        ``timeout`` seconds; its exit status and seconds."""
        self.log(f"{name}: {' '.join(command)} (at most {timeout:.0f} s)")
        started = time.time()
        with open(self.out / LOG_FILE, "ab") as handle:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
        seconds = round(time.time() - started, 1)
        outcome = f"killed after {seconds:.0f} s" if timed_out else f"exit status {rc} in {seconds:.0f} s"
        self.log(f"{name}: {outcome}")
        return {"command": " ".join(command), "rc": rc, "timed_out": timed_out, "seconds": seconds,
                "slot_s": round(timeout, 1)}

    def _tests(self, step: Step, seconds: float) -> dict:
        report = self.work / "tests.xml"
        report.unlink(missing_ok=True)
        tests = CUDA_ONLY_TESTS if self.rehearsal else CUDA_TESTS
        result = self._call("tests", [self.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                      f"--junitxml={report}", *tests], seconds)
        counts = junit_counts(report)
        cuda = self.record["device_type"] == "cuda"
        ok = result["rc"] == 0 and counts.get("tests", 0) > 0 and (counts.get("skipped", 0) == 0 or not cuda)
        note = "" if cuda else "; no CUDA here: the CUDA-only tests were collected and skipped"
        return {"name": "tests", "kind": "tests", **result, "tests": counts,
                "status": "ok" if ok else f"failed: {counts or 'no test report'}", "note": note.lstrip("; ")}

    def _bench(self, step: Step, seconds: float) -> dict:
        out = self.work / BENCH_FILE
        out.unlink(missing_ok=True)
        args = REHEARSAL_BENCH_ARGS if self.rehearsal else BENCH_ARGS
        result = self._call("bench", [self.python, "bench/fixmatch_bench.py", *args, "--out", str(out)], seconds)
        entry = {"name": "bench", "kind": "bench", **result}
        try:
            bench = read_json(out)
            entry["steps_per_s"] = {k: bench[k]["steps_per_s"] for k in ("device_resident", "dataloader")}
            entry["ratio"], entry["gpu_memory"] = bench["ratio"], bench.get("gpu_memory")
            shutil.copyfile(out, self.out / BENCH_FILE)
        except (FmnistBookError, KeyError, TypeError) as err:
            entry["status"] = f"failed: no benchmark record ({err})"
            return entry
        entry["status"] = "ok" if result["rc"] == 0 else f"failed: exit status {result['rc']}"
        return entry

    def _chapter(self, step: Step, seconds: float) -> dict:
        now = time.time()
        stop_now = self.rehearsal and step.name in REHEARSAL_STOPS
        deadline = now if stop_now else now + max(0.0, seconds - step.finish_s)
        overrides = step.rehearsal_overrides if self.rehearsal else step.overrides
        workers = min(step.workers, 2) if self.rehearsal else step.workers
        command = [self.python, "-m", "fmnist_core.pipeline.cli", "--results-dir", str(self.results), "run",
                   step.name, "--profile", self.profile, "--executor", "local", "--workers", str(workers)]
        for name, value in overrides.items():
            command += ["-p", name, json.dumps(value)]
        result = self._call(step.name, command, seconds, {DEADLINE_ENV: f"{deadline:.0f}"})
        entry = {"name": step.name, "kind": "chapter", **result, "profile": self.profile, "overrides": overrides,
                 "workers": workers, "deadline_at": time.strftime("%H:%M:%S UTC", time.gmtime(deadline)),
                 "training_deadline_s": round(deadline - now, 1)}
        run_dir = self.results / self.profile / step.name
        try:
            env = read_json(run_dir / "env.json") if (run_dir / "env.json").exists() else None
        except FmnistBookError:
            env = None
        if env is None:
            failure = run_dir.with_name(step.name + ".failed.json")
            error = read_json(failure).get("error") if failure.exists() else ""
            error = error or ("killed" if result["timed_out"] else "see the log")
            entry["status"] = f"failed: no finished run ({error})"
            return entry
        entry["stopped_early"] = env.get("stopped_early") or {}
        entry["status"] = "ok" if result["rc"] == 0 else f"failed: exit status {result['rc']}"
        if entry["stopped_early"]:
            self.log(f"{step.name}: {stopped_note(entry['stopped_early'])}")
        return entry

    # ------------------------------------------------------------------------------------------ packing
    def pack(self) -> list[str]:
        """One archive per chapter step (its finished run, else what its interrupted run left); the file list."""
        for step in self.record["steps"]:
            if step.get("kind") != "chapter":
                continue
            base = self.results / self.profile / step["name"]
            folder = base if (base / "env.json").exists() else base.with_name(step["name"] + ".partial")
            if not folder.is_dir():
                continue
            archive = self.out / f"{step['name']}.tar.gz"
            step["archive"] = pack_run(folder, archive, step["name"])
            self.log(f"packed {archive.name}: {archive.stat().st_size / 2 ** 20:.1f} MiB ({step['archive']})")
        trim_log(self.out / LOG_FILE)
        files = sorted({p.name for p in self.out.iterdir()} | {SESSION_FILE})
        if len(files) > MAX_FILES:
            raise RunError(f"{len(files)} files in {self.out}, more than the {MAX_FILES} that come back")
        return files


def pack_run(folder: Path, archive: Path, name: str) -> str:
    """``folder`` as ``archive`` (members under ``name/``), without checkpoints; the first of :data:`PACK_TIERS`
    whose archive fits in :data:`MAX_FILE_BYTES`. Returns what was left out.

    Raises
    ------
    RunError
        When even the smallest archive is too large.
    """
    for tier in PACK_TIERS:
        def keep(info: tarfile.TarInfo, tier=tier):
            parts = Path(info.name).parts
            hidden = info.isfile() and Path(info.name).name.startswith(".")  # a killed run's half-written files
            if "tensorboard" in parts or info.name.endswith(tier) or hidden:
                return None
            return info
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=name, filter=keep)
        if archive.stat().st_size <= MAX_FILE_BYTES:
            return "left out: " + ", ".join(f"*{suffix}" for suffix in tier) + ", tensorboard/"
    archive.unlink()
    raise RunError(f"{folder}: its results do not fit in {MAX_FILE_BYTES // 2 ** 20} MiB even without checkpoints, "
                   f"probabilities and notebook")


def trim_log(path: Path, limit: int = MAX_FILE_BYTES) -> None:
    """Keep the last ``limit`` bytes of the log (a first line says how much was cut)."""
    if not path.exists() or path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    cut = len(data) - limit + 200
    path.write_bytes(f"[the first {cut:,} bytes of this log were cut to fit]\n".encode() + data[cut:])


# ----------------------------------------------------------------------------------------------- records
def junit_counts(path: Path) -> dict:
    """``tests``, ``failures``, ``errors``, ``skipped`` of a pytest JUnit XML report (empty when there is none)."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def machine_record() -> dict:
    """The device (a CUDA GPU's name, or the CPU), its memory, and the versions that matter."""
    import platform

    import torch
    from fmnist_core.pipeline.scale import this_device
    record = {"device": this_device(), "device_type": "cuda" if torch.cuda.is_available() else "cpu",
              "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        record["gpu_memory_mib"] = torch.cuda.get_device_properties(0).total_memory // 2 ** 20
        try:
            record["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                   "--format=csv,noheader"], capture_output=True, text=True,
                                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            record["nvidia_smi"] = None
    return record


def session_commit() -> str | None:
    """The checkout's commit: ``git`` where the copy has its history, else what the preparation wrote."""
    from fmnist_core.pipeline.runner import git_commit
    return git_commit() or os.environ.get(COMMIT_ENV) or None


# ----------------------------------------------------------------------------------------------- record
def record(folder, root=None, min_steps: int = 50) -> list[str]:
    """Record a session's output ``folder`` into the project at ``root`` (the checkout by default).

    Parameters
    ----------
    folder : path
        What a device run brought back (``session.json``, the archives, the benchmark).
    root : path, optional
        The project root to write into. A rehearsal's output is recorded only into another root than the checkout.
    min_steps : int
        Jobs of fewer steps (where start-up dominates) give no step time.

    Returns
    -------
    list of str
        One line per file or folder written.

    Raises
    ------
    RunError
        When ``folder`` holds no session record, or a rehearsal would be recorded into the checkout.
    """
    folder, root = Path(folder), Path(root) if root is not None else PROJECT_ROOT
    if not (folder / SESSION_FILE).is_file():
        raise RunError(f"{folder}: not a GPU session's output (no {SESSION_FILE}); give the folder the device run's "
                       f"files came back to")
    session = read_json(folder / SESSION_FILE)
    if session.get("rehearsal") and root.resolve() == PROJECT_ROOT.resolve():
        raise RunError(f"{folder}: a rehearsal's results (profile {session.get('profile')}) are never recorded into "
                       f"the project; give another --root to try the recording")
    reference = root / "reference" / session["profile"]
    written = _record_chapters(folder, session, reference, root, min_steps)
    bench = folder / BENCH_FILE
    if bench.is_file():
        target = root / "bench" / "results" / f"fixmatch_{read_json(bench).get('device_type', 'cuda')}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bench, target)
        written.append(f"{target.relative_to(root)}: the FixMatch step benchmark")
    reference.mkdir(parents=True, exist_ok=True)
    target = reference / f"session-{session['plan']}.json"
    write_json(target, {**session, "recorded_at": time.strftime("%Y-%m-%d")})
    written.append(f"{target.relative_to(root)}: the session's record")
    return written


def _record_chapters(folder: Path, session: dict, reference: Path, root: Path, min_steps: int) -> list[str]:
    """Each chapter archive of ``folder`` that holds a finished run, into ``reference/<experiment>/``."""
    written = []
    for step in session.get("steps", []):
        archive = folder / f"{step['name']}.tar.gz"
        if step.get("kind") != "chapter" or not archive.is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = unpack(archive, Path(tmp), step["name"])
            if not (run_dir / "env.json").is_file() or not (run_dir / "metrics.json").is_file():
                written.append(f"{step['name']}: not recorded ({step.get('status')}: no finished run in "
                               f"{archive.name})")
                continue
            written.append(record_chapter(run_dir, reference / step["name"], session, root))
            written += record_step_times(run_dir, root, step.get("workers", 1), min_steps)
    return written


def unpack(archive: Path, into: Path, name: str) -> Path:
    """Extract ``archive`` (regular files and folders under ``name/`` only) into ``into``; ``into/name``."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if (m.isfile() or m.isdir()) and not Path(m.name).is_absolute()
                   and ".." not in Path(m.name).parts and Path(m.name).parts[:1] == (name,)]
        tar.extractall(into, members=members)
    return into / name


def record_chapter(run_dir: Path, dest: Path, session: dict, root: Path) -> str:
    """The recorded files of a run (:data:`RECORDED_TOP`, ``figures/``, each job's :data:`RECORDED_JOB`) into
    ``dest``, replacing what was there; ``env.json`` gets the session's commit when the run could not read it."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in RECORDED_TOP:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
    env = read_json(dest / "env.json")
    if not env.get("git_commit") and session.get("git_commit"):
        env["git_commit"] = session["git_commit"]
    env["recorded_from"] = {"plan": session.get("plan"), "device_seconds": session.get("seconds"),
                            "overrides": next((s.get("overrides") for s in session.get("steps", [])
                                               if s.get("name") == run_dir.name), None)}
    write_json(dest / "env.json", env)
    if (run_dir / "figures").is_dir():
        shutil.copytree(run_dir / "figures", dest / "figures")
    for done in sorted(run_dir.rglob("done.json")):
        job_dest = dest / done.parent.relative_to(run_dir)
        job_dest.mkdir(parents=True, exist_ok=True)
        for name in RECORDED_JOB:
            if (done.parent / name).is_file():
                shutil.copyfile(done.parent / name, job_dest / name)
    stopped = env.get("stopped_early")
    note = f" ({stopped_note(stopped)})" if stopped else ""
    return f"{dest.relative_to(root)}: {run_dir.name} on {env.get('device')}{note}"


def record_step_times(run_dir: Path, root: Path, workers: int, min_steps: int = 50) -> list[str]:
    """Seconds per optimiser step of the run's finished jobs (wall time over the steps done), merged into
    ``root/bench/results/step_times.json`` under the run's device: what ``fmnist-book plan`` reads."""
    from fmnist_core.core.jobs import load_job
    from fmnist_core.pipeline.scale import job_backbone, job_steps
    device = read_json(run_dir / "env.json")["device"]
    found: dict[str, list] = {}
    for done_path in sorted(run_dir.rglob("done.json")):
        done = read_json(done_path)
        try:
            job = load_job(done_path.parent)
        except FmnistBookError:
            continue
        steps = (done.get("stopped_early") or {}).get("steps_done") or job_steps(job)
        if steps >= min_steps:
            found.setdefault(job_backbone(job), []).append((done["seconds"], steps))
    if not found:
        return []
    path = root / "bench" / "results" / "step_times.json"
    times = read_json(path) if path.exists() else {}
    times.setdefault("what", "seconds per optimiser step of a whole job (wall time over steps), by device and "
                             "<kind>/<network>/b<batch>; read by `fmnist-book plan`")
    entries = times.setdefault("devices", {}).setdefault(device, {})
    for key, runs in found.items():
        entries[key] = {"s_per_step": round(sum(s for s, _ in runs) / sum(n for _, n in runs), 5),
                        "steps": sum(n for _, n in runs), "jobs": len(runs), "recorded": time.strftime("%Y-%m-%d"),
                        "workers_sharing_the_device": workers}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
    return [f"{path.relative_to(root)}: {len(found)} step time(s) of {run_dir.name} on {device}"]


# ----------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fmnist_core.pipeline.gpu_session",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("session", help="run a plan's steps within a time budget and pack the results")
    run.add_argument("--plan", default="book", help=f"one of {', '.join(PLANS)}")
    run.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                     help="the folder that comes back (default: $OUT)")
    run.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fmnist-gpu-session",
                     help="results and scratch files (checkpoints stay here)")
    run.add_argument("--budget-s", type=float, default=540.0, help="seconds for everything, counted from --started")
    run.add_argument("--started", type=float, default=None, help="when the session started (seconds since the epoch)")
    run.add_argument("--rehearsal", action="store_true", help="on a CPU, the smoke profile's budgets")
    rec = sub.add_parser("record", help="record a session's output into reference/ and bench/results/")
    rec.add_argument("folder", type=Path)
    rec.add_argument("--root", type=Path, default=None, help="the project root to write into (default: this checkout)")
    rec.add_argument("--min-steps", type=int, default=50, help="jobs of fewer steps give no step time")
    return parser


def main(argv=None) -> int:
    """``session`` or ``record``; exit status 0 (every step ok), 1 (a step failed) or 2 (bad input)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "record":
            for line in record(args.folder, args.root, args.min_steps):
                print(line)
            return 0
        if args.out is None:
            raise RunError("no output folder: give --out DIR (on the device, $OUT is used)")
        if args.budget_s <= PACK_RESERVE_S + MIN_SLOT_S:
            raise RunError(f"--budget-s must be more than {PACK_RESERVE_S + MIN_SLOT_S:.0f} s, got {args.budget_s:g}")
        return Session(args.plan, args.out, args.work, args.budget_s, args.started or time.time(),
                       args.rehearsal).run()
    except FmnistBookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
