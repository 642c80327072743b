"""A job server: one long-lived process per local worker that imports torch once and forks a child per job.

A fresh ``python -m fmnist_core.core.jobs JOB_DIR`` process spends about 3 s importing torch before its job
starts; a quick book has 35 jobs. The server (``python -m fmnist_core.pipeline.job_server``, started with the
worker's environment: threads, GPU) imports torch and the job runner, then reads one request a line from its
standard input, ``JOB_DIR<TAB>LOG``, and forks: the child runs the job exactly as the fresh process would
(:func:`fmnist_core.core.jobs.main`, its output appended to ``LOG``) and exits with its status. The server
answers ``started PID`` when the child exists and ``exit STATUS`` when it has ended, one job at a time.

Nothing computes in the server before it forks (no thread pool exists yet, CUDA is not initialised), so each
child starts as a fresh process would, and gives the same bytes. Ctrl-C reaches the children (they stop as a
fresh process would); the server ignores it and reports their status. Where ``os.fork`` is missing or unsafe
(:func:`fork_available`), workers start a fresh process per job instead.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback


def fork_available() -> bool:
    """Whether job servers can fork their jobs here: Linux (macOS forbids fork after its frameworks load)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def run_child(job_dir: str, log_path: str) -> int:
    """In the forked child: standard streams to ``log_path``, default Ctrl-C, then the job; its exit status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    from fmnist_core.core import jobs
    try:
        return jobs.main([job_dir])
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # what a fresh process would print before exiting with status 1
        traceback.print_exc()
        return 1


def serve(requests=None, replies=None) -> int:
    """Read ``JOB_DIR<TAB>LOG`` lines until the end of ``requests``; fork and report each job in turn."""
    requests, replies = requests or sys.stdin, replies or sys.stdout
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the children get Ctrl-C; the server reports how they ended
    import torch  # noqa: F401  the cost a fresh process pays per job, paid once
    from fmnist_core.core import jobs  # noqa: F401
    for line in requests:
        job_dir, log_path = line.rstrip("\n").split("\t")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_child(job_dir, log_path)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        replies.write(f"started {pid}\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(f"exit {os.waitstatus_to_exitcode(status)}\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
