"""What a chapter notebook uses to turn a run into a page: config, figures, glued numbers, ``metrics.json``."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from fmnist_core.core import plots
from fmnist_core.core.io import write_json

METRICS_FILE, TIMINGS_FILE = "metrics.json", "timings.json"


class Report:
    """The results folder of one run, seen from its notebook.

    Parameters
    ----------
    config_class : type
        The experiment's parameter class; it validates ``params``.
    params : dict
        Parameter values injected by the runner (or left empty for the defaults).
    run_dir : path
        Where figures and ``metrics.json`` go.

    Notes
    -----
    With ``FMNIST_TRACE_PARAMS=1`` in the environment, :meth:`finish` also writes ``trace.json``: the
    parameters the run never read and the other experiments' results folders it opened (the tests use it to
    prove that every parameter is read and every data dependency is declared).
    """

    def __init__(self, config_class, params: dict, run_dir):
        self.run_dir = Path(run_dir).resolve()
        self.config = config_class.from_overrides(params, where=self.run_dir.name.removesuffix(".partial"))
        self.figures = self.run_dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.data_dir = os.environ.get("FMNIST_DATA_DIR") or None
        self._opened: set[str] = set()
        if os.environ.get("FMNIST_TRACE_PARAMS") == "1":
            sys.addaudithook(self._audit)

    def _audit(self, event: str, args) -> None:
        if event == "open" and isinstance(args[0], (str, Path)):
            self._opened.add(os.path.abspath(args[0]))

    def figure(self, name: str, fig) -> None:
        """Save ``fig`` as ``figures/<name>.png`` and show it in the notebook.

        Returns nothing, so a cell that ends with this call prints no path on the page.
        """
        plots.save(fig, self.figures / f"{name}.png")

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
        if os.environ.get("FMNIST_TRACE_PARAMS") == "1":
            self._write_trace()
        return write_json(self.run_dir / METRICS_FILE, {**metrics, "summary": summary})

    def _write_trace(self) -> None:
        """``trace.json``: parameters never read, and the sibling results folders this run opened."""
        names = [f.name for f in dataclasses.fields(self.config)]
        unread = sorted(set(names) - self.config.fields_read())
        results = self.run_dir.parent
        siblings = sorted({Path(p).relative_to(results).parts[0].removesuffix(".partial") for p in self._opened
                           if Path(p).is_relative_to(results) and not Path(p).is_relative_to(self.run_dir)})
        write_json(self.run_dir / "trace.json", {"unread_parameters": unread, "results_read": siblings})
