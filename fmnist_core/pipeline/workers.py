"""Worker processes: one planned job run in a fresh process (``python -m fmnist_core.core.jobs JOB_DIR``), its
output in ``<job folder>.log`` beside its folder, and how a job that did not finish is described."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError, RunError
from fmnist_core.core.io import PROJECT_ROOT, read_json
from fmnist_core.core.jobs import FAILED_FILE, THREADS_ENV


@dataclass
class JobFailure:
    """A job that ended without finishing: its study, label, folder, log and what went wrong."""

    study: str
    label: str
    job_dir: Path
    log: Path
    error: str

    def describe(self) -> str:
        return f"job {self.study}/{self.label} failed: {self.error} (log: {self.log})"


def job_log(job_dir) -> Path:
    """Where a worker's output goes: ``<job folder>.log``, beside the folder (which the job may clear)."""
    job_dir = Path(job_dir)
    return job_dir.with_name(job_dir.name + ".log")


def worker_command(job_dir) -> list[str]:
    """The command that runs one planned job in a fresh process."""
    return [sys.executable, "-m", "fmnist_core.core.jobs", str(job_dir)]


def worker_env(gpu: str | None = None, threads: int | None = None) -> dict:
    """This process's environment, with this project first on ``PYTHONPATH`` (a worker imports the code that
    planned its job); for ``gpu``, ``CUDA_VISIBLE_DEVICES`` pinned to it; for ``threads``, the CPU threads of
    torch and its BLAS (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, and ``FMNIST_TORCH_THREADS``, which the job
    process passes to ``torch.set_num_threads``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env[THREADS_ENV] = str(threads)
    return env


class JobServer:
    """A job server process (:mod:`fmnist_core.pipeline.job_server`) started with ``env``: it runs the jobs
    given to :meth:`start` one at a time, each in a child forked from it."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "fmnist_core.pipeline.job_server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=PROJECT_ROOT, text=True, bufsize=1)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line.split())
        self.replies.put(None)  # the server has ended

    def start(self, job_dir, log_path) -> "ForkedJob":
        """Run the planned job in ``job_dir``, its output appended to ``log_path``; its handle."""
        self.proc.stdin.write(f"{job_dir}\t{log_path}\n")
        self.proc.stdin.flush()
        return ForkedJob(self)

    def close(self) -> None:
        """End the server once its job (if any) has ended."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()


class ForkedJob:
    """A job forked by a :class:`JobServer`, with the part of ``subprocess.Popen`` an executor uses: ``poll``,
    ``terminate``, ``wait`` and ``returncode`` (the job's exit status; the server's if the server died)."""

    def __init__(self, server: JobServer):
        self.server, self.pid, self.returncode = server, None, None

    def _take(self, block: bool, until_started: bool = False) -> None:
        while self.returncode is None and not (until_started and self.pid is not None):
            try:
                reply = self.server.replies.get(block=block)
            except queue.Empty:
                return
            if reply is None:
                self.returncode = self.server.proc.wait() or 1
            elif reply[0] == "started":
                self.pid = int(reply[1])
            elif reply[0] == "exit":
                self.returncode = int(reply[1])

    def poll(self) -> int | None:
        self._take(block=False)
        return self.returncode

    def terminate(self) -> None:
        self._take(block=True, until_started=True)
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:  # it has just ended
                pass

    def wait(self) -> int:
        self._take(block=True)
        return self.returncode


def default_threads(workers: int) -> int:
    """CPU threads per worker when ``workers`` run at once: this machine's cores shared out, at least one (more
    threads than cores make every worker wait for the others: two 2-thread workers on 2 cores ran at half speed)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def slurm_threads() -> int | None:
    """The CPUs Slurm gave this task (``SLURM_CPUS_PER_TASK``), or ``None`` outside a Slurm task."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def failure_reason(job_dir, fallback: str) -> str:
    """What the worker recorded in ``failed.json``, else the last line of its log, else ``fallback``."""
    marker = Path(job_dir) / FAILED_FILE
    try:
        if marker.exists():
            return read_json(marker)["error"]
    except (FmnistBookError, KeyError, ValueError):
        pass
    lines = job_log(job_dir).read_text(errors="replace").strip().splitlines() if job_log(job_dir).exists() else []
    return f"{fallback}: {lines[-1]}" if lines else fallback


def run_worker(job_dir, gpu: str | None = None, threads: int | None = None) -> None:
    """Run one planned job in a fresh process with ``threads`` CPU threads (default: torch's own choice), its
    output appended to its log; raise if it did not finish."""
    log_path = job_log(job_dir)
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(worker_command(job_dir))}\n".encode())
        log.flush()
        # Slurm signals every process of a task before preempting it or at its time limit (SIGUSR2, submitit's
        # cue to requeue it); the job itself ignores it and is stopped only when the task exits.
        code = subprocess.run(worker_command(job_dir), stdout=log, stderr=subprocess.STDOUT, env=worker_env(gpu, threads),
                              cwd=PROJECT_ROOT, preexec_fn=_ignore_checkpoint_signal).returncode
    if code != 0:
        raise RunError(failure_reason(job_dir, f"exit status {code}") + f" (log: {log_path})")


def _ignore_checkpoint_signal() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
