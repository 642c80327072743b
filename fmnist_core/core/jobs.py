"""Jobs: the unit of work. A job is (kind, validated config, output folder); it trains or resumes to completion.

A chapter registers each kind of job it runs with :func:`job_kind` (a function ``run(cfg, out_dir, log) ->
metrics`` and the config class it takes). A study plans its jobs, runs them with :func:`run_jobs` and
gathers their ``metrics.json``. A job

* writes everything into its own folder: ``job.json`` (kind, module, config, key) when it starts,
  checkpoints and history while it trains, ``metrics.json`` and finally ``done.json`` (its key) when it
  has finished — ``done.json`` is written last, so a folder with it holds a finished job;
* is skipped when its folder holds a finished job with the same key (the config and the source of the
  modules its kind imports, :func:`source_hashes`); a folder of another key is cleared first; a job that a
  deadline stopped early (``done.json`` holds ``stopped_early``, :mod:`fmnist_core.core.deadline`) counts as
  finished only while that deadline is still set and passed, and is resumed otherwise;
* seeds itself from its config only, so it gives the same bytes in any process: ``python -m
  fmnist_core.core.jobs JOB_DIR`` runs the job described by ``JOB_DIR/job.json`` in a fresh process.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fmnist_core.core import deadline as deadlines
from fmnist_core.core.config import Config
from fmnist_core.core.errors import ConfigError, FmnistBookError
from fmnist_core.core.io import PROJECT_ROOT, read_json, write_json
from fmnist_core.core.progress import PLAN_FILE

PACKAGE = "fmnist_core"
PACKAGE_DIR = PROJECT_ROOT / PACKAGE
JOB_FILE, METRICS_FILE, DONE_FILE = "job.json", "metrics.json", "done.json"
STARTED_FILE, FAILED_FILE = "started.json", "failed.json"  # written by a worker (``main``) in its job's folder


@dataclass(frozen=True)
class JobKind:
    """A registered kind of job: its name, the function that runs it, its config class and its module."""

    name: str
    run: Callable
    config: type
    module: str


KINDS: dict[str, JobKind] = {}


def job_kind(name: str, config: type[Config]):
    """Register ``run(cfg, out_dir, log) -> dict`` (the job's metrics) as the kind ``name``."""
    def register(run):
        if name in KINDS and KINDS[name].module != run.__module__:
            raise ValueError(f"job kind {name!r} is registered twice")
        KINDS[name] = JobKind(name, run, config, run.__module__)
        return run
    return register


def get_kind(name: str, module: str | None = None) -> JobKind:
    """The kind called ``name`` (importing ``module`` first, which registers it)."""
    if module and name not in KINDS:
        importlib.import_module(module)
    if name not in KINDS:
        raise ConfigError(f"unknown job kind {name!r} (known: {', '.join(sorted(KINDS)) or 'none'})")
    return KINDS[name]


@dataclass
class Job:
    """One unit of work: ``kind`` run with ``config`` into ``out_dir``; ``label`` names it in logs."""

    kind: str
    config: Config
    out_dir: Path
    label: str = ""
    info: dict = field(default_factory=dict)  # what the study wants back beside the metrics (model, seed...)
    cost: float = 1.0  # estimated running time, relative to the study's other jobs: executors that run jobs side
                       # by side start the costliest first, so that a long job does not run alone at the end

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.label = self.label or self.out_dir.name

    def key(self) -> str:
        """Hash of the kind, the config and the source of every module the kind's module imports."""
        spec = get_kind(self.kind)
        return _sha256(json.dumps({"kind": self.kind, "config": self.config.to_dict(),
                                   "sources": source_hashes([spec.module])}, sort_keys=True).encode())

    def finished(self) -> bool:
        """Whether ``out_dir`` holds this job, finished (``done.json`` with the same key)."""
        return finished_key(self.out_dir) == self.key()


def finished_key(out_dir) -> str | None:
    """The key in ``out_dir/done.json``, or ``None`` when the folder holds no finished job."""
    path = Path(out_dir) / DONE_FILE
    try:
        record = read_json(path) if path.exists() else {}
    except FmnistBookError:
        return None
    if record.get("stopped_early") and not deadlines.stopped_job_is_final():
        return None  # stopped at a deadline that is no longer in force: resumed to its full budget
    return record.get("key")


def run_job(job: Job, log=print) -> dict:
    """Run ``job`` to completion (resuming its checkpoints), or skip it if it has finished; its metrics."""
    key, spec = job.key(), get_kind(job.kind)
    if finished_key(job.out_dir) == key:
        return read_json(job.out_dir / METRICS_FILE)
    prepare_job(job, key)
    started = time.perf_counter()
    metrics = spec.run(job.config, job.out_dir, log)
    stopped = job.out_dir / deadlines.STOPPED_FILE
    write_json(job.out_dir / METRICS_FILE, metrics)
    write_json(job.out_dir / DONE_FILE, {"key": key, "seconds": round(time.perf_counter() - started, 1),
                                         "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                         **({"stopped_early": read_json(stopped)} if stopped.exists() else {})})
    return metrics


def prepare_job(job: Job, key: str | None = None) -> str:
    """Make ``job.out_dir`` ready to run ``job`` (a worker in another process reads its ``job.json``):
    a folder of another key is cleared, the markers of an earlier attempt are removed; returns the key."""
    key, spec = key or job.key(), get_kind(job.kind)
    job_file = job.out_dir / JOB_FILE
    if job_file.exists() and _read_key(job_file) != key:
        shutil.rmtree(job.out_dir)  # another config's checkpoints must never be resumed
    for marker in (DONE_FILE, FAILED_FILE, deadlines.STOPPED_FILE):
        (job.out_dir / marker).unlink(missing_ok=True)
    write_json(job_file, {"kind": job.kind, "module": spec.module, "label": job.label, "key": key,
                          "config": job.config.to_dict()})
    return key


def run_jobs(jobs: list[Job], log=print) -> list[dict]:
    """Run (or skip) every job in order; returns their metrics, in the same order.

    The plan (the jobs' labels and folders) is written first as ``jobs.json`` in the folder that holds
    the job folders, so that a progress display knows the jobs still to come.
    """
    write_plan(jobs)
    return [run_job(job, log) for job in jobs]


def write_plan(jobs: list[Job]) -> Path | None:
    """``jobs.json`` (:data:`fmnist_core.core.progress.PLAN_FILE`) beside the jobs' folders: label and folder of each."""
    if not jobs:
        return None
    folders = [job.out_dir.resolve() for job in jobs]
    base = Path(os.path.commonpath([folder.parent for folder in folders]))
    base.mkdir(parents=True, exist_ok=True)
    return write_json(base / PLAN_FILE, {"jobs": [{"label": job.label, "dir": str(folder.relative_to(base))}
                                                  for job, folder in zip(jobs, folders)]})


def _read_key(path: Path) -> str | None:
    try:
        return read_json(path).get("key")
    except FmnistBookError:
        return None


def load_job(job_dir) -> Job:
    """The job described by ``job_dir/job.json`` (its config validated again)."""
    job_dir = Path(job_dir)
    spec = read_json(job_dir / JOB_FILE)
    kind = get_kind(spec["kind"], spec["module"])
    config = kind.config.from_overrides(spec["config"], where=str(job_dir / JOB_FILE))
    return Job(spec["kind"], config, job_dir, spec.get("label", ""))


# ----------------------------------------------------------------------------------- source closure
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def module_path(module: str) -> Path:
    """The file of a module (``fmnist_core.core.loop`` -> ``fmnist_core/core/loop.py``); modules outside this
    package (a job kind a user registers in a script, say) are found through the import system."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise ConfigError(f"cannot find the source of module {module!r}")
        return Path(spec.origin)
    path = PROJECT_ROOT.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(source: str, package: str = "") -> set[str]:
    """The ``fmnist_core`` modules that ``source`` imports (``from x import y`` counts ``x.y`` when
    that is a module), resolving relative imports against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == PACKAGE and module_path(m).exists()}


@functools.lru_cache(maxsize=None)
def _module_imports(module: str, mtime: float) -> frozenset:
    package = module if module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    return frozenset(imported_modules(module_path(module).read_text(), package))


def module_closure(modules) -> list[str]:
    """``modules`` and every ``fmnist_core`` module they import, directly or not, sorted."""
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += _module_imports(module, module_path(module).stat().st_mtime)
    return sorted(seen)


def source_hashes(modules) -> dict[str, str]:
    """``{relative path: sha256}`` of the source of ``modules``' closure (:func:`module_closure`)."""
    paths = [module_path(m) for m in module_closure(modules)]
    return {str(p.relative_to(PROJECT_ROOT) if p.is_relative_to(PROJECT_ROOT) else p): _sha256(p.read_bytes())
            for p in paths}


THREADS_ENV = "FMNIST_TORCH_THREADS"


def main(argv=None) -> int:
    """``python -m fmnist_core.core.jobs JOB_DIR``: run one planned job in this process."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fmnist_core.core.jobs JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    if os.environ.get(THREADS_ENV, "").isdigit():  # the executor's --threads-per-worker (torch caps OMP_NUM_THREADS)
        import torch
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    try:
        job = load_job(job_dir)
        write_json(job_dir / STARTED_FILE, worker_record())
        run_job(job)
    except BaseException as err:  # recorded for ``fmnist-book status`` and the executor, then reported
        if (job_dir / JOB_FILE).exists():
            write_json(job_dir / FAILED_FILE, {**worker_record(), "error": f"{type(err).__name__}: {err}"})
        if not isinstance(err, FmnistBookError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{job.label}: done ({job.out_dir})")
    return 0


def worker_record() -> dict:
    """Where and when a worker runs: host, process id, Slurm job id (when under Slurm) and time."""
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    slurm_id = f"{slurm}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if slurm else os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_id,
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


if __name__ == "__main__":
    # Run as a script this file is a second copy of the module: use the registry of the imported one.
    from fmnist_core.core.jobs import main as _main
    sys.exit(_main())
