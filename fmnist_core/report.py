"""What a chapter notebook uses to turn a run into a page: config, figures, glued numbers, ``metrics.json``."""
from __future__ import annotations

import os
from pathlib import Path

from . import plots
from .io import write_json

METRICS_FILE, TIMINGS_FILE = "metrics.json", "timings.json"


class Report:
    """The results folder of one run, seen from its notebook.

    Parameters
    ----------
    experiment : str
        Name of the experiment (its parameter class validates ``params``).
    params : dict
        Parameter values injected by the runner (or left empty for the defaults).
    run_dir : path
        Where figures and ``metrics.json`` go.
    """

    def __init__(self, experiment: str, params: dict, run_dir):
        from .experiments import get_experiment
        self.config = get_experiment(experiment).config.from_overrides(params, where=experiment)
        self.run_dir = Path(run_dir)
        self.figures = self.run_dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.data_dir = os.environ.get("FMNIST_DATA_DIR") or None

    def figure(self, name: str, fig) -> Path:
        """Save ``fig`` as ``figures/<name>.png`` and show it in the notebook."""
        return plots.save(fig, self.figures / f"{name}.png")

    @staticmethod
    def glue(name: str, value, display: bool = False):
        """Make ``value`` citable in the page's prose as ``{glue:text}`name```; returns the value."""
        from myst_nb import glue
        glue(name, value, display=display)
        return value

    def finish(self, metrics: dict, summary: list[dict], timings: dict | None = None) -> Path:
        """Write ``metrics.json``: the run's numbers plus ``summary`` rows for ``fmnist-book results``.

        Wall-clock figures (seconds, latency, throughput) go in ``timings``, written to ``timings.json`` and
        keyed by the ``run`` of a summary row: they differ between identical runs, so ``metrics.json`` holds
        only what a re-run with the same seed reproduces bit for bit (``fmnist-book verify`` checks it).
        """
        if "summary" in metrics:
            raise ValueError("'summary' is reserved for the rows of fmnist-book results; name the key otherwise")
        if timings is not None:
            write_json(self.run_dir / TIMINGS_FILE, timings)
        return write_json(self.run_dir / METRICS_FILE, {**metrics, "summary": summary})
