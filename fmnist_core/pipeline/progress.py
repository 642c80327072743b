"""The command's live view of a running notebook: its jobs, their steps, statistics and the time left.

The notebook's kernel runs the jobs (:mod:`fmnist_core.core.jobs`); each job writes ``progress.json`` in its
folder at every history record, and every study writes its plan ``jobs.json`` before its first job
(:mod:`fmnist_core.core.progress`). While papermill executes, :func:`show_progress` polls the run folder
from a thread and shows what it finds:

* on a terminal, two bars redrawn in place (the experiment's jobs, the current job's steps), and one line
  per finished job;
* elsewhere (a pipe, a log file, CI), one line per finished job and a status line at most every
  ``every`` seconds (10 by default).

Work outside jobs (loading data, the dataset chapter, t-SNE maps, figures) has no job folder: it shows as
``no training job running``, ``preparing`` (between a study's jobs) or ``gathering/plotting`` (after them),
with the experiment's elapsed time.
"""
from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import read_json
from fmnist_core.core.jobs import DONE_FILE, JOB_FILE
from fmnist_core.core.progress import PLAN_FILE, PROGRESS_FILE, read_progress

SHOWN_STATS = ("train_loss", "val_loss", "val_accuracy", "train_accuracy", "test_accuracy")


@dataclass
class JobState:
    """What the run folder says of one job: ``state`` is planned, waiting (an earlier run's checkpoints),
    running, finishing (trained, being evaluated), done (in this run) or kept (finished before it)."""

    label: str
    folder: Path
    state: str = "planned"
    progress: dict = field(default_factory=dict)
    seconds: float | None = None  # a finished job's duration (done.json)

    @property
    def active(self) -> bool:
        return self.state in ("running", "finishing")


def _read(path: Path) -> dict:
    try:
        return read_json(path) if path.exists() else {}
    except FmnistBookError:  # being replaced, or a killed run's leftover
        return {}


def scan_jobs(run_dir, since: float = 0.0) -> list[JobState]:
    """Every job of ``run_dir``: those of its plans (``jobs.json``) and those with a ``job.json``.

    Parameters
    ----------
    run_dir : path
        A run folder (``results/<profile>/<experiment>.partial``).
    since : float
        Start of the current run (``time.time()``): a job started before it is not running now.
    """
    found: dict[Path, JobState] = {}
    run_dir = Path(run_dir)
    for plan in sorted(run_dir.rglob(PLAN_FILE)):
        for entry in _read(plan).get("jobs", []):
            folder = plan.parent / entry["dir"]
            found.setdefault(folder, JobState(entry["label"], folder))
    for spec in sorted(run_dir.rglob(JOB_FILE)):
        found.setdefault(spec.parent, JobState(_read(spec).get("label", spec.parent.name), spec.parent))
    for job in found.values():
        _update_state(job, since)
    return list(found.values())


def _update_state(job: JobState, since: float) -> None:
    """A job runs once its training has written ``progress.json`` in this run (a ``job.json`` alone may be
    an earlier run's, or written when the job was planned)."""
    done, spec, progress = job.folder / DONE_FILE, job.folder / JOB_FILE, job.folder / PROGRESS_FILE
    job.progress = read_progress(job.folder) or {}
    if done.exists():
        job.seconds = _read(done).get("seconds")
        job.state = "done" if done.stat().st_mtime >= since else "kept"
    elif job.progress and progress.stat().st_mtime >= since:
        steps, step = job.progress.get("steps"), job.progress.get("step")
        job.state = "finishing" if steps and step == steps else "running"
    elif spec.exists():
        job.state = "waiting"


def experiment_eta(jobs: list[JobState]) -> float | None:
    """Seconds left for the experiment's jobs: the running job's estimate, plus, for each job not started,
    the mean duration of the jobs finished (or else the running job's projected duration). A job that has
    not yet timed a record counts as one of mean duration too."""
    running = [j for j in jobs if j.active]
    todo = [j for j in jobs if j.state in ("planned", "waiting")]
    durations = [j.seconds for j in jobs if j.state in ("done", "kept") and j.seconds is not None]
    left = 0.0
    for job in running:
        eta = job.progress.get("eta_s")
        if eta is None and not durations:
            return None
        left += eta if eta is not None else sum(durations) / len(durations)
        if not durations:
            durations.append(job.progress.get("elapsed_s", 0.0) + eta)
    if todo and not durations:
        return None
    return left + (len(todo) * sum(durations) / len(durations) if todo else 0.0)


def clock(seconds: float | None) -> str:
    """``1:02:03``, ``2:03`` or ``?`` for an unknown time."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def where(progress: dict) -> str:
    """``epoch 2/10, step 938/4690`` or ``step 40/1000`` (nothing before the job's first record)."""
    if not progress.get("steps"):
        return ""
    steps = f"step {progress['step']}/{progress['steps']}"
    if progress.get("epochs"):
        return f"epoch {round(progress['epoch'], 2):g}/{progress['epochs']:g}, {steps}"
    return steps


def shown_stats(progress: dict, most: int = 3) -> str:
    """The record's loss and accuracy figures (at most ``most``), e.g. ``train_loss 0.412 val_accuracy 0.861``."""
    stats = progress.get("stats") or {}
    names = [k for k in SHOWN_STATS if isinstance(stats.get(k), float)]
    names += [k for k, v in stats.items() if k not in names and k != "lr" and isinstance(v, float)]
    return " ".join(f"{k} {stats[k]:.4g}" for k in names[:most])


class ProgressView:
    """Renders :func:`scan_jobs` of one experiment's run folder to ``stream`` (bars on a terminal, else lines)."""

    def __init__(self, run_dir, title: str, stream=None, every: float = 10.0, tty: bool | None = None):
        self.run_dir, self.title, self.every = Path(run_dir), title, every
        self.stream = stream or sys.stdout
        # Bars only from the main thread: notebooks run side by side (from other threads) print lines.
        self.tty = (self.stream.isatty() and threading.current_thread() is threading.main_thread()) \
            if tty is None else tty
        self.started, self.clock0 = time.time(), time.perf_counter()
        self.reported: set[Path] = set()
        self.last_line = -float("inf")
        self.bars = None

    def poll(self) -> None:
        """Read the run folder once and show what changed."""
        jobs = scan_jobs(self.run_dir, self.started - 1.0)
        for job in jobs:  # one line per job finished in this run
            if job.state == "done" and job.folder not in self.reported:
                self.reported.add(job.folder)
                done = f"done in {clock(job.seconds)}"
                self._line(self._job_line(jobs, job, f"{where(job.progress)}, {done}" if job.progress else done))
        if self.tty:
            self._draw(jobs)
        elif time.perf_counter() - self.last_line >= self.every:
            self.last_line = time.perf_counter()
            self._line(self.status(jobs))

    def status(self, jobs: list[JobState]) -> str:
        """One line: the running job (step, statistics, time left) or the non-job work, and the experiment's."""
        running = next((j for j in jobs if j.active), None)
        if running is not None:
            return self._job_line(jobs, running, self._job_detail(running))
        return f"{self.title}: {self._phase(jobs)} | {self._totals(jobs)}"

    def _phase(self, jobs: list[JobState]) -> str:
        finished = sum(j.state in ("done", "kept") for j in jobs)
        if jobs and finished == len(jobs):
            return f"gathering/plotting ({finished} job{'s' if finished > 1 else ''} done)"
        if jobs:
            return f"preparing ({finished}/{len(jobs)} jobs done)"
        return "no training job running: loading, embedding or plotting"

    def _job_detail(self, job: JobState) -> str:
        p = job.progress
        if job.state == "finishing":
            return f"{where(p)}, evaluating"
        parts = [where(p) or "starting", shown_stats(p), f"job left {clock(p.get('eta_s'))}"]
        return " | ".join(x for x in parts if x)

    def _job_line(self, jobs: list[JobState], job: JobState, detail: str) -> str:
        number = jobs.index(job) + 1
        return f"{self.title}: job {number}/{len(jobs)} {job.label}: {detail} | {self._totals(jobs)}"

    def _totals(self, jobs: list[JobState]) -> str:
        elapsed = clock(time.perf_counter() - self.clock0)
        pending = any(j.state in ("planned", "waiting") or j.active for j in jobs)
        return f"experiment left ~{clock(experiment_eta(jobs))}, elapsed {elapsed}" if pending \
            else f"elapsed {elapsed}"

    def _line(self, text: str) -> None:
        if self.bars is not None:
            self.bars[0].write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _draw(self, jobs: list[JobState]) -> None:
        from tqdm import tqdm
        if self.bars is None:
            formats = ("{desc} {n_fmt}/{total_fmt} |{bar:16}|{postfix}", "  {desc} |{bar:16}|{postfix}")
            self.bars = [tqdm(total=1, position=i, leave=False, file=self.stream, bar_format=fmt,
                              dynamic_ncols=True) for i, fmt in enumerate(formats)]
        finished = sum(j.state in ("done", "kept") for j in jobs)
        _set(self.bars[0], finished, max(len(jobs), 1), f"{self.title} jobs",
             f"{self._phase(jobs) if not any(j.active for j in jobs) else 'training'} | {self._totals(jobs)}")
        running = next((j for j in jobs if j.active), None)
        p = running.progress if running else {}
        _set(self.bars[1], p.get("step", 0), p.get("steps") or 1, running.label if running else "(no job running)",
             self._job_detail(running) if running else "")

    def close(self) -> None:
        """Remove the bars (a terminal keeps only the finished jobs' lines)."""
        for bar in reversed(self.bars or []):
            bar.close()
        self.bars = None


def _set(bar, n: int, total: int, desc: str, postfix: str) -> None:
    bar.total, bar.n = total, min(n, total)
    bar.set_description_str(desc, refresh=False)
    bar.set_postfix_str(postfix, refresh=False)
    bar.refresh()


@contextmanager
def show_progress(run_dir, title: str, stream=None, interval: float = 1.0, every: float = 10.0):
    """Show the progress of the notebook that runs into ``run_dir`` while the ``with`` block executes it,
    polling every ``interval`` seconds from a thread (the kernel is never waited for)."""
    view, stop = ProgressView(run_dir, title, stream, every), threading.Event()

    def watch():
        while not stop.is_set():
            try:
                view.poll()
            except Exception:  # noqa: BLE001 (a folder changing under the scan must never stop the run)
                pass
            stop.wait(interval)

    thread = threading.Thread(target=watch, name="fmnist-progress", daemon=True)
    thread.start()
    try:
        yield view
    finally:
        stop.set()
        thread.join(timeout=5)
        view.close()


# ------------------------------------------------------------------------------------------ Ctrl-C
@contextmanager
def quiet_after_interrupt():
    """Ctrl-C in the ``with`` block raises ``KeyboardInterrupt`` as usual, and from then on this process logs
    nothing: the execution it stops leaves tasks waiting on the kernel, whose errors (``Task exception was
    never retrieved ... DeadKernelError``) would print tracebacks that say nothing to the user.
    Before Ctrl-C everything is logged as usual."""
    def on_interrupt(signum, frame):
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")  # e.g. coroutines of the stopped execution never awaited
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread: Ctrl-C cannot reach this code anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during an experiment's notebook: names the run folder that was kept to be resumed."""

    def __init__(self, experiment: str, run_dir: Path):
        super().__init__(experiment)
        self.experiment, self.run_dir = experiment, Path(run_dir)


def interrupted_message(err: KeyboardInterrupt, argv: list[str]) -> str:
    """What Ctrl-C kept (the finished jobs, the folder with the unfinished job's checkpoints) and the
    command that resumes: the same command without ``--force`` (which would discard what was kept)."""
    resume = shlex.join(["fmnist-book", *[a for a in argv if a != "--force"]])
    if not isinstance(err, RunInterrupted):
        return f"interrupted; to run again: {resume}"
    jobs = scan_jobs(err.run_dir)
    finished = sum(j.state in ("done", "kept") for j in jobs)
    checkpoints = [j.label for j in jobs if j.state not in ("done", "kept") and (j.folder / "last.pt").exists()]
    kept = f"{finished} of {len(jobs)} jobs finished" if jobs else "no finished job"
    if checkpoints:
        kept += f"; the checkpoints of {', '.join(checkpoints)} (training resumes from them)"
    return (f"interrupted: {err.experiment} stopped\n"
            f"kept in {err.run_dir}: {kept}\n"
            f"to resume: {resume}")
