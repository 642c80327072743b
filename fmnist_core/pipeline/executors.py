"""Executors: where the jobs of a profile run — in the notebook's kernel, in local worker processes, or on Slurm.

``inline`` (the default) is what a notebook does by itself: it runs its study's jobs one after the other. The
other executors run every planned job first, each in a fresh process (``python -m fmnist_core.core.jobs
JOB_DIR``, which gives the same bytes as inline: a job seeds itself from its config), then execute the
notebooks, which find their jobs finished and only gather. Experiments wait for the runs they ``require``:
their jobs are planned only once those runs have finished (:func:`run_with_executor`).

A job folder has one writer, the worker running it; what the others know of it comes from its marker files
(``job.json`` planned, ``started.json``, ``failed.json``, ``done.json``, written atomically by renames) — no
file lock, so the results folder may be on a filesystem shared by many nodes. A worker's output goes to
``<job folder>.log``, beside its folder.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from fmnist_core.core.errors import ConfigError, FmnistBookError, RunError
from fmnist_core.core.io import PROJECT_ROOT, read_json
from fmnist_core.core.jobs import FAILED_FILE, JOB_FILE, STARTED_FILE, Job, prepare_job, write_plan
from fmnist_core.pipeline.experiments import get_experiment
from fmnist_core.pipeline.job_server import fork_available
from fmnist_core.pipeline.workers import (JobFailure, JobServer, default_threads, failure_reason, job_log,
                                          worker_command, worker_env)

EXECUTORS = ("inline", "local", "slurm")


# ---------------------------------------------------------------------------------------- local pool
class LocalExecutor:
    """A pool of worker processes on this machine: ``workers`` at a time, or one per GPU of ``gpus``
    (each worker sees only its GPU, through ``CUDA_VISIBLE_DEVICES``), each with ``threads`` CPU threads
    (default: the cores shared out among the workers, :func:`default_threads`)."""

    name = "local"

    def __init__(self, workers: int = 1, gpus: list[str] | None = None, threads: int | None = None):
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads-per-worker must be at least 1, got {threads}")
        self.slots = list(gpus) if gpus else [None] * workers
        self.threads = threads or default_threads(len(self.slots))

    def describe(self) -> str:
        """How many workers run at once, and their threads."""
        where = f"one per GPU of {','.join(self.slots)}" if self.slots[0] is not None else f"{len(self.slots)} at a time"
        return f"workers {where}, {self.threads} CPU thread(s) each"

    def run(self, studies: dict[str, list[Job]], log=print) -> list[JobFailure]:
        """Run every job of ``studies`` (study -> unfinished jobs); the failures, the others having finished."""
        queue = longest_first([(study, job) for study, jobs in studies.items() for job in jobs])
        busy = [(study, job) for study, job in queue if live_worker(job.out_dir)]
        queue = [item for item in queue if item not in busy]  # one writer per job folder
        total, running, free = len(queue), {}, list(range(len(self.slots)))
        failures = [JobFailure(study, job.label, job.out_dir, job_log(job.out_dir),
                               f"already running in process {live_worker(job.out_dir)} (an earlier command's "
                               "worker): wait for it, or stop it, then run this command again") for study, job in busy]
        servers: dict[int, JobServer] = {}
        try:
            while queue or running:
                while queue and free:
                    study, job = queue.pop(0)
                    slot = free.pop(0)
                    running[self._start(job, slot, servers)] = (study, job, slot)
                for proc in [p for p in running if p.poll() is not None]:
                    study, job, slot = running.pop(proc)
                    free.append(slot)
                    failures += self._finished(study, job, proc.returncode, total - len(queue) - len(running), total,
                                               log)
                time.sleep(0.1)
        except KeyboardInterrupt:
            for proc in running:
                proc.terminate()
            for proc in running:
                proc.wait()
            log(f"interrupted: {len(running)} running job(s) stopped; their checkpoints stay, and running the "
                "same command again resumes them")
            raise
        finally:
            for server in servers.values():
                server.close()
        return failures

    def _start(self, job: Job, slot: int, servers: dict):
        """Start ``job`` on worker ``slot``: forked by the slot's job server (started on first use) where
        :func:`~fmnist_core.pipeline.job_server.fork_available`, else in a fresh process."""
        gpu, path = self.slots[slot], job_log(job.out_dir)
        with open(path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(worker_command(job.out_dir))}\n".encode())
            log.flush()  # before the job appends to it (a forked child opens it anew, a fresh one keeps this one)
            if fork_available():
                if slot not in servers:
                    servers[slot] = JobServer(worker_env(gpu, self.threads))
                return servers[slot].start(job.out_dir, path)
            return subprocess.Popen(worker_command(job.out_dir), stdout=log, stderr=subprocess.STDOUT,
                                    env=worker_env(gpu, self.threads), cwd=PROJECT_ROOT)

    @staticmethod
    def _finished(study: str, job: Job, code: int, done: int, total: int, log) -> list[JobFailure]:
        if code == 0 and job.finished():
            log(f"  [{done}/{total}] {study}/{job.label}: done")
            return []
        failure = JobFailure(study, job.label, job.out_dir, job_log(job.out_dir),
                             failure_reason(job.out_dir, f"exit status {code}"))
        log(f"  [{done}/{total}] {failure.describe()}")
        return [failure]


def longest_first(queue: list[tuple[str, Job]]) -> list[tuple[str, Job]]:
    """``queue`` (study, job) with the costliest jobs first (:attr:`Job.cost`; ties keep their planned order):
    the longest-processing-time-first rule, which keeps a long job from running alone once the others are done."""
    return sorted(queue, key=lambda item: -item[1].cost)


def live_worker(job_dir: Path) -> int | None:
    """The process id of a worker still running the job in ``job_dir`` on this host (from its
    ``started.json``), or ``None``."""
    try:
        record = read_json(Path(job_dir) / STARTED_FILE) if (Path(job_dir) / STARTED_FILE).exists() else {}
        if record.get("host") != socket.gethostname() or (Path(job_dir) / FAILED_FILE).exists():
            return None
        os.kill(int(record["pid"]), 0)
        return int(record["pid"])
    except (FmnistBookError, OSError, KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- pipeline
def make_executor(args, profile: str, results_dir: Path):
    """The executor that ``args`` (``--executor`` and its options) ask for, else the profile's ``executor``
    setting (:func:`profile_executor`); ``None`` for ``inline``."""
    settings = {} if getattr(args, "executor", None) else profile_executor(profile)
    name = getattr(args, "executor", None) or settings.get("executor", "inline")
    if name == "inline":
        return None
    if name == "local":
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if getattr(args, "gpus", None) else None
        workers = getattr(args, "workers", None) or settings.get("workers", DEFAULT_WORKERS)
        threads = getattr(args, "threads_per_worker", None) or settings.get("threads_per_worker")
        return LocalExecutor(workers, gpus, threads)
    from fmnist_core.pipeline.slurm import SlurmExecutor, options_from_args
    return SlurmExecutor(options_from_args(args), Path(results_dir).resolve() / profile / ".slurm",
                         reattach=reattach_command(args))


DEFAULT_WORKERS = 2
def profile_executor(profile: str) -> dict:
    """Where ``profile`` runs its jobs when the command line names no ``--executor`` (its ``executor`` setting;
    ``{}``: inline)."""
    from fmnist_core.pipeline.runner import get_profile
    return get_profile(profile).get("executor") or {}


def reattach_command(args) -> str:
    """The command line that was given (running it again re-attaches to the jobs it submitted)."""
    return "fmnist-book " + shlex.join(sys.argv[1:]) if sys.argv[1:] else f"fmnist-book {args.command} ..."


def plan_study(experiment: str, profile: str, overrides=None, force=False, results_dir=None,
               variant: str | None = None) -> list[Job] | None:
    """The unfinished jobs of ``experiment``'s run (its ``variant``'s when given), planned in its run folder (made
    ready for the notebook) with their ``job.json`` written; ``None`` when it has no jobs, is up to date, or waits
    for a required run."""
    from fmnist_core.pipeline.runner import DEFAULT_RESULTS, prepare_run
    exp = get_experiment(experiment)
    if exp.plan is None:
        return None
    prepared = prepare_run(experiment, profile, overrides, force, results_dir or DEFAULT_RESULTS, variant)
    if prepared is None:
        return None
    run_dir, params = prepared
    planned = exp.plan(exp.config.from_overrides(params, where=experiment), run_dir)
    write_plan(planned)  # what a progress display reads, as when the notebook runs them
    jobs = [job for job in planned if not job.finished()]
    for job in jobs:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        if planned_key(job.out_dir) != job.key():  # a folder already planned may have a worker: left alone
            prepare_job(job)
    return jobs


def planned_key(job_dir: Path) -> str | None:
    """The key in ``job_dir/job.json``, or ``None``."""
    try:
        return read_json(job_dir / JOB_FILE).get("key") if (job_dir / JOB_FILE).exists() else None
    except FmnistBookError:
        return None


def waves(experiments: list[str]) -> list[list[str]]:
    """``experiments`` in groups: each group only requires runs of earlier groups (or none of these)."""
    pending, groups = list(experiments), []
    while pending:
        group = [e for e in pending if not set(get_experiment(e).requires) & set(pending)]
        if not group:
            raise ConfigError(f"experiments {', '.join(pending)} require each other")
        groups.append(group)
        pending = [e for e in pending if e not in group]
    return groups


def notebook_lanes(executor) -> int:
    """How many notebooks ``executor``'s pipeline runs side by side: a local executor's CPU workers (a notebook
    that only gathers leaves a core idle much of the time, beside the jobs still running), else one."""
    return len(executor.slots) if isinstance(executor, LocalExecutor) and executor.slots[0] is None else 1


def run_with_executor(executor, experiments: list[str], profile: str, overrides=None, force=False,
                      results_dir=None, data_dir=None, log=print, variant: str | None = None) -> list:
    """Run the jobs of ``experiments`` through ``executor``, then their notebooks (which only gather).

    An experiment's jobs are planned once the runs it ``requires`` have finished (:func:`waves` refuses a cycle
    first); its notebook
    runs once its jobs are done and so are the runs it requires or reads among ``experiments``. Up to
    :func:`notebook_lanes` notebooks run at a time, started in the order of ``experiments`` (with one lane, one
    after the other in this thread). A study with a failed job is recorded as failed, naming the job and its log.
    ``variant``: the runs are that variant of each experiment (``<experiment>@<variant>/``). The results come
    in the order of ``experiments``."""
    from fmnist_core.pipeline.runner import DEFAULT_RESULTS
    results_dir = Path(results_dir or DEFAULT_RESULTS).resolve()
    if data_dir:  # the workers read the data where the notebooks would
        os.environ["FMNIST_DATA_DIR"] = str(Path(data_dir).resolve())
    waves(experiments)  # a ConfigError if their requirements form a cycle
    run = _NotebookRun(executor, profile, overrides, force, results_dir, data_dir, log, variant)
    order = {e: i for i, e in enumerate(experiments)}
    pending, waiting, running, done = list(experiments), [], {}, {}
    lanes = notebook_lanes(executor)
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="fmnist-notebook") if lanes > 1 else None
    try:
        while pending or waiting or running:
            unfinished = set(pending) | set(waiting) | set(running.values())
            group = [e for e in pending if not set(get_experiment(e).requires) & unfinished]
            if group:  # their jobs first, all of them together
                run.jobs(group)
                pending, waiting = [e for e in pending if e not in group], sorted(waiting + group, key=order.get)
                continue
            ready = [e for e in waiting if not set(_notebook_needs(e)) & (unfinished - {e})]
            if not (ready or running):  # experiments that read each other: the first in order goes first
                ready = waiting[:1]
            for experiment in ready[:lanes - len(running)]:
                waiting.remove(experiment)
                if pool is None:
                    done[experiment] = run.notebook(experiment)
                else:
                    running[pool.submit(run.notebook, experiment)] = experiment
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[running.pop(future)] = future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return [done[e] for e in experiments]


def _notebook_needs(experiment: str) -> tuple[str, ...]:
    exp = get_experiment(experiment)
    return exp.requires + exp.reads


class _NotebookRun:
    """The two halves of :func:`run_with_executor` for one experiment: its jobs, then its notebook."""

    def __init__(self, executor, profile, overrides, force, results_dir, data_dir, log, variant):
        self.executor, self.profile, self.overrides, self.force = executor, profile, overrides, force
        self.results_dir, self.data_dir, self.log, self.variant = results_dir, data_dir, log, variant
        self.planned: dict = {}
        self.failures: list = []

    def jobs(self, group: list[str]) -> None:
        """Plan the jobs of ``group`` and run them all through the executor."""
        planned = {e: plan_study(e, self.profile, self.overrides, self.force, self.results_dir, self.variant)
                   for e in group}
        self.planned.update(planned)
        studies = {e: jobs for e, jobs in planned.items() if jobs}
        if studies:
            self.log(f"{self.executor.name}: {sum(map(len, studies.values()))} job(s) of {', '.join(studies)} "
                     f"[{self.profile}]" + (f"; {self.executor.describe()}" if hasattr(self.executor, "describe")
                                            else ""))
            self.failures += self.executor.run(studies, self.log)

    def notebook(self, experiment: str):
        """The notebook of ``experiment`` (its run recorded as failed if one of its jobs failed)."""
        from fmnist_core.pipeline.runner import RunResult, _record_failure, run_experiment, run_name
        final = self.results_dir / self.profile / run_name(experiment, self.variant)
        failed = [f for f in self.failures if f.study == experiment]
        if failed:
            error = "; ".join(f.describe() for f in failed)
            self.log(f"{experiment} [{self.profile}]: FAILED: {error}")
            return _record_failure(final, experiment, self.profile, error, variant=self.variant,
                                   overrides=self.overrides)
        try:
            return run_experiment(experiment, self.profile, self.overrides, self.force, self.results_dir,
                                  self.data_dir, self.log, prepared=self.planned.get(experiment) is not None,
                                  variant=self.variant)
        except RunError as err:
            return RunResult(experiment, "failed", final, error=str(err))


def add_executor_options(parser) -> None:
    """``--executor`` and its options, for ``run`` and ``build``."""
    group = parser.add_argument_group("where jobs run")
    group.add_argument("--executor", choices=EXECUTORS, default=None,
                       help="inline: in the notebook; local: worker processes here; slurm: job arrays "
                            "(default: the profile's 'executor' setting, else inline)")
    group.add_argument("--workers", type=int, default=None,
                       help=f"local: jobs at a time (default: the profile's, else {DEFAULT_WORKERS})")
    group.add_argument("--gpus", default=None, help="local: one job per GPU of this list, e.g. 0,1,2,3")
    group.add_argument("--threads-per-worker", type=int, default=None,
                       help="local: CPU threads of each worker (default: the cores divided by the workers)")
    from fmnist_core.pipeline.slurm import add_slurm_options
    add_slurm_options(group)
