"""A job's progress, written where the command that runs the notebook can read it.

:func:`fmnist_core.core.loop.train` writes ``progress.json`` in the job's folder when training starts and at
each history record (the statistics are already on the host then: no extra synchronisation), atomically:

* ``step``, ``steps``: optimiser steps done and planned; ``epoch``, ``epochs``: the same in epochs (``None``
  for step-based plans);
* ``stats``: the record's logged statistics (``train_loss``, ``val_accuracy``...; non-finite values as ``null``);
* ``elapsed_s``: seconds this process has trained the job (a resumed job counts from its resumption);
* ``eta_s``: seconds left for the remaining steps at this process's measured rate (``None`` before a rate);
* ``time``: when the file was written (seconds since the epoch).

It is replaced by a rename (readers never see half a file) but not flushed to the disk: it reports the moment.

:func:`fmnist_core.core.jobs.run_jobs` writes the study's plan, ``jobs.json`` (its jobs' labels and folders),
beside the job folders before the first job starts, so a reader knows how many jobs are still to come.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import read_json

PROGRESS_FILE = "progress.json"
PLAN_FILE = "jobs.json"
_NOT_STATS = ("step", "epoch", "seconds")


class ProgressFile:
    """Writes ``out_dir/progress.json`` for a job of ``steps`` steps that starts (or resumes) at ``first_step``.

    Parameters
    ----------
    out_dir : path
        The job folder.
    steps : int
        Planned optimiser steps.
    first_step : int
        Steps already done (by a run this one resumes); the rate counts only the steps timed here.
    steps_per_epoch : int
        Labels the progress in epochs too (0: step-based).
    """

    def __init__(self, out_dir, steps: int, first_step: int = 0, steps_per_epoch: int = 0):
        self.path = Path(out_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.steps, self.first_step, self.steps_per_epoch = steps, first_step, steps_per_epoch
        self.started = time.perf_counter()
        self.update({"step": first_step})

    def update(self, record: dict) -> None:
        """Write the progress after ``record["step"]`` steps, with the record's statistics."""
        step = record["step"]
        elapsed = time.perf_counter() - self.started
        timed = step - self.first_step
        per_epoch = self.steps_per_epoch
        _replace_json(self.path, {
            "step": step, "steps": self.steps,
            "epoch": step / per_epoch if per_epoch else None,
            "epochs": self.steps / per_epoch if per_epoch else None,
            "stats": {k: _finite(v) for k, v in record.items() if k not in _NOT_STATS},
            "elapsed_s": round(elapsed, 2),
            "eta_s": round((self.steps - step) * elapsed / timed, 2) if timed > 0 else None,
            "time": round(time.time(), 2)})


def _replace_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to a temporary file and rename it over ``path``: a reader sees the old or the new file,
    never a half-written one. Unlike the results files it is not flushed to the disk (no ``fsync``): it only
    reports the moment, and a flush per record would cost the training loop milliseconds."""
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per job folder
    tmp.write_text(json.dumps(obj, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def read_progress(job_dir) -> dict | None:
    """The job's ``progress.json``, or ``None`` when it has none (or it cannot be read just now)."""
    path = Path(job_dir) / PROGRESS_FILE
    try:
        return read_json(path) if path.exists() else None
    except FmnistBookError:
        return None
