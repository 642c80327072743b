"""``fmnist-book verify``: re-run a finished run from its recorded parameters and compare its numbers.

On the CPU a re-run must reproduce ``metrics.json`` exactly (wall-clock figures live in ``timings.json``
and are not compared). On CUDA the comparison allows ``ATOL + RTOL * |recorded|`` per value, because
floating-point reductions there may run in another order (always in speed mode; across GPU models even in
deterministic mode); the tolerance is printed with the result. The re-run happens in a temporary folder
beside the run and is removed afterwards: verifying never changes ``results/``.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError
from fmnist_core.pipeline.experiments import EXPERIMENTS, get_experiment
from fmnist_core.core.io import read_json
from fmnist_core.pipeline.runner import describe_error, execute_notebook, run_device, run_key

ATOL, RTOL = 0.01, 0.02


@dataclass
class Comparison:
    """The outcome of comparing a re-run's ``metrics.json`` with the recorded one."""

    experiment: str
    exact: bool                     # compared bit for bit (CPU) or within the tolerance (CUDA)
    headline: list[tuple[str, object, object, bool]] = field(default_factory=list)
    mismatches: list[tuple[str, object, object]] = field(default_factory=list)
    compared: int = 0
    notes: list[str] = field(default_factory=list)
    precision: str = ""             # the recorded run's precision, in words

    @property
    def reproduced(self) -> bool:
        return not self.mismatches


def flatten(value, path: str = "") -> dict[str, object]:
    """``{"a.b[0]": leaf}`` for every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{path}[{i}]").items()}
    return {path: value}


def same(recorded, rerun, exact: bool) -> bool:
    """Equal values; numbers within ``ATOL + RTOL * |recorded|`` when not ``exact``."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (recorded, rerun))
    if exact or not numbers:
        return recorded == rerun and type(recorded) is type(rerun)
    return math.isclose(rerun, recorded, rel_tol=RTOL, abs_tol=ATOL)


def compare(experiment: str, recorded: dict, rerun: dict, exact: bool) -> Comparison:
    """Compare two ``metrics.json`` contents value by value; the ``summary`` rows are the headline."""
    result = Comparison(experiment, exact)
    old, new = flatten(recorded), flatten(rerun)
    paths = sorted(old.keys() | new.keys())
    result.compared = len(paths)
    for path in paths:
        a, b = old.get(path, "<missing>"), new.get(path, "<missing>")
        if not same(a, b, exact):
            result.mismatches.append((path, a, b))
    for index, row in enumerate(recorded.get("summary", [])):
        for column, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rerun_value = new.get(f"summary[{index}].{column}", "<missing>")
                result.headline.append((f"{row.get('run', index)} {column}", value, rerun_value,
                                        same(value, rerun_value, exact)))
    return result


def finished_runs(path) -> list[Path]:
    """The finished run ``path`` is, or the finished runs in it (a ``results/<profile>`` folder), in book order."""
    path = Path(path).resolve()
    if (path / "env.json").is_file():
        return [path]
    runs = [path / name for name in EXPERIMENTS if (path / name / "env.json").is_file()]
    if not runs:
        raise FmnistBookError(f"{path}: not a finished run (no env.json) nor a folder of finished runs")
    return runs


def verify_run(run_dir, data_dir=None, keep: bool = False, log=print) -> Comparison:
    """Re-run the finished run in ``run_dir`` with its recorded parameters and compare ``metrics.json``."""
    run_dir = Path(run_dir).resolve()
    env = read_json(run_dir / "env.json")
    experiment, profile, params = env.get("experiment"), env.get("profile"), env.get("params")
    if experiment not in EXPERIMENTS or run_dir.name.partition("@")[0] != experiment or run_dir.parent.name != profile:
        raise FmnistBookError(f"{run_dir / 'env.json'}: does not describe the run in this folder "
                              "(expected results/<profile>/<experiment>/)")
    get_experiment(experiment).config.from_overrides(params or {}, where=f"{run_dir / 'env.json'}")
    recorded = read_json(run_dir / "metrics.json")
    device = run_device(params)
    notes = _drift_notes(env, run_dir, device)
    scratch = Path(tempfile.mkdtemp(prefix=f".verify-{experiment}-", dir=run_dir.parent))
    try:
        log(f"{experiment} [{profile}]: re-running in {scratch}")
        try:
            execute_notebook(experiment, profile, params, scratch, run_dir.parent, data_dir)
        except Exception as err:  # the notebook's own error, as the runner reports it
            raise FmnistBookError(f"{experiment}: the re-run failed: {describe_error(err)}") from None
        rerun = read_json(scratch / "metrics.json")
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    exact = env.get("numerics") == "cpu" and device.type == "cpu"
    result = compare(experiment, recorded, rerun, exact)
    result.notes = notes
    from fmnist_core.core.train import describe_precision
    result.precision = describe_precision(env.get("precision"))
    return result


def _drift_notes(env: dict, run_dir: Path, device) -> list[str]:
    """What differs between the recorded run and this re-run besides chance: code, threads, device."""
    import torch

    from fmnist_core.core.train import describe_precision, numerics_mode, precision_record
    notes = []
    if run_key(env["experiment"], env["profile"], env["params"], run_dir.parent.parent) != env.get("key"):
        notes.append("the notebook, the code or an upstream run changed since this run (its key differs): "
                     "a difference may come from that")
    if env.get("torch_threads") not in (None, torch.get_num_threads()):
        notes.append(f"recorded with {env['torch_threads']} CPU threads, re-run with {torch.get_num_threads()}: "
                     "floating-point sums may be split differently")
    if env.get("numerics") != numerics_mode(device, bool(env["params"].get("deterministic"))):
        notes.append(f"recorded in numerics mode {env.get('numerics')!r}, re-run on "
                     f"{'CUDA' if device.type == 'cuda' else 'the CPU'}")
    here = precision_record(env["experiment"], env["params"], device)
    if env.get("precision") and env["precision"] != here:
        notes.append(f"recorded in {describe_precision(env['precision'])}; re-run in {describe_precision(here)}")
    return notes


def format_comparison(result: Comparison, max_mismatches: int = 20) -> str:
    """The report printed by ``fmnist-book verify``: headline metrics, mismatches, verdict."""
    rule = "exactly (bit for bit)" if result.exact else f"within {ATOL} + {RTOL} x |recorded| per value"
    lines = [f"{result.experiment}: compared {rule}"] + ([f"  precision: {result.precision}"] if result.precision
                                                         else []) + [f"  note: {note}" for note in result.notes]
    for name, recorded, rerun, ok in result.headline:
        lines.append(f"  {'ok  ' if ok else 'DIFF'} {name}: recorded {recorded!r}, re-run {rerun!r}")
    for path, recorded, rerun in result.mismatches[:max_mismatches]:
        lines.append(f"  DIFF metrics.json {path}: recorded {recorded!r}, re-run {rerun!r}")
    if len(result.mismatches) > max_mismatches:
        lines.append(f"  ... and {len(result.mismatches) - max_mismatches} more differences")
    verdict = "REPRODUCED" if result.reproduced else "NOT REPRODUCED"
    lines.append(f"  {verdict}: {result.compared - len(result.mismatches)} of {result.compared} values "
                 f"in metrics.json agree")
    return "\n".join(lines)
