"""A wall-clock deadline for training: jobs stop cleanly at their next history record once it has passed.

The deadline is the environment variable ``FMNIST_DEADLINE``: a time in seconds since the epoch (``$(( $(date +%s)
+ 600 ))`` is ten minutes from now). Every process of a run inherits it (the notebook's kernel, executor workers),
so it bounds a whole chapter however its jobs are run. :func:`fmnist_core.core.loop.train` checks it at each history
record: once it has passed, that record is also an evaluation and a checkpoint, the job keeps ``last.pt`` (its
resume state), writes the weights of that step as ``final.pt`` (and ``best.pt`` where nothing selects one) and
``stopped.json`` (:data:`STOPPED_FILE`: steps done and planned), and returns its history as if it had finished.

What a stopped job reports is marked as such everywhere it goes: its ``done.json`` holds ``stopped_early``, a
run's ``env.json`` lists its stopped jobs (:func:`stopped_jobs`), and the glance page says so beside its figures.
A stopped job counts as finished only while a deadline that has passed is still set
(:func:`stopped_job_is_final`); any later run without one resumes it from ``last.pt`` to its full budget.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from fmnist_core.core.errors import ConfigError, FmnistBookError
from fmnist_core.core.io import read_json

DEADLINE_ENV = "FMNIST_DEADLINE"
STOPPED_FILE = "stopped.json"


def deadline(environ=None) -> float | None:
    """The deadline in seconds since the epoch, or ``None`` when ``FMNIST_DEADLINE`` is unset or empty.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (``os.environ`` by default).

    Returns
    -------
    float or None

    Raises
    ------
    ConfigError
        When the variable is set to anything but a number.
    """
    value = (os.environ if environ is None else environ).get(DEADLINE_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV} must be a time in seconds since the epoch (for instance "
                          f"$(( $(date +%s) + 600 )) for ten minutes from now), got {value!r}") from None


def passed(environ=None, now: float | None = None) -> bool:
    """Whether a deadline is set and has passed."""
    limit = deadline(environ)
    return limit is not None and (time.time() if now is None else now) >= limit


def stopped_job_is_final(environ=None) -> bool:
    """Whether a job that stopped at a deadline counts as finished: only while a passed deadline is set."""
    return passed(environ)


def stopped_jobs(run_dir) -> dict[str, dict]:
    """The jobs under ``run_dir`` that stopped at a deadline: job folder (relative) -> their ``stopped.json``.

    Parameters
    ----------
    run_dir : path
        A run folder (``results/<profile>/<experiment>`` or its ``.partial``).

    Returns
    -------
    dict
        ``{"models/resnet18": {"steps_done": 1290, "steps_planned": 12900, "stopped_at": ...}, ...}``, sorted.
    """
    run_dir, found = Path(run_dir), {}
    for path in sorted(run_dir.rglob(STOPPED_FILE)) if run_dir.is_dir() else []:
        try:
            found[str(path.parent.relative_to(run_dir))] = read_json(path)
        except FmnistBookError:
            found[str(path.parent.relative_to(run_dir))] = {}
    return found


def stopped_note(stopped: dict, jobs: int | None = None) -> str:
    """One line saying which jobs stopped at the deadline, with their steps done of those planned."""
    parts = [f"{Path(folder).name} {s.get('steps_done', '?'):,} of {s.get('steps_planned', '?'):,} steps"
             if isinstance(s.get("steps_done"), int) and isinstance(s.get("steps_planned"), int)
             else Path(folder).name for folder, s in stopped.items()]
    count = f"{len(stopped)} of {jobs} jobs" if jobs else f"{len(stopped)} job(s)"
    return f"stopped at a deadline, short of the profile's budget: {count} ({'; '.join(parts)})"
