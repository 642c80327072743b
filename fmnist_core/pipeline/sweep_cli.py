"""The ``sweep`` and ``compare`` commands, and the variants' rows of ``fmnist-book results``."""
from __future__ import annotations

import sys
from pathlib import Path

from fmnist_core.core.io import read_json
from fmnist_core.pipeline.sweep import MAX_POINTS


def add_sweep_parsers(sub, add_executor_options) -> None:
    """``fmnist-book sweep`` and ``fmnist-book compare``."""
    sweep = sub.add_parser("sweep", help="run every value (x seed) of one or two parameters as variants, together")
    sweep.add_argument("experiment")
    sweep.add_argument("--profile", default="quick")
    sweep.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUES"),
                       help="a swept parameter and its values, as a YAML list: -p threshold '[0.8, 0.95]'")
    sweep.add_argument("--set", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="an override shared by every point (VALUE read as YAML)")
    sweep.add_argument("--seeds", type=int, default=None,
                       help="seeds 0..N-1 for every point (the experiment's seeds list or seed); default: the profile's")
    sweep.add_argument("--yes", action="store_true", help=f"run a sweep of more than {MAX_POINTS} runs")
    sweep.add_argument("--force", action="store_true", help="re-run points that are up to date")
    add_executor_options(sweep)

    compare = sub.add_parser("compare", help="the headline metrics of two runs side by side, with their difference")
    compare.add_argument("run_a", type=Path, help="a finished run: results/<profile>/<experiment>[@<variant>]")
    compare.add_argument("run_b", type=Path)


def cmd_sweep(args) -> int:
    """Exit status 0 when every point finished, 1 when one failed (named)."""
    from fmnist_core.pipeline.executors import make_executor
    from fmnist_core.pipeline.sweep import parse_values, plan_sweep, run_sweep
    sweep = plan_sweep(args.experiment, args.profile, parse_values(args.param), parse_values(args.set), args.seeds,
                       args.yes)
    executor = make_executor(args, args.profile, args.results_dir)
    results = run_sweep(sweep, executor, args.force, args.results_dir, args.data_dir)
    failed = [r for r in results if r.status == "failed"]
    ran = sum(r.status == "done" for r in results)
    print(f"sweep {sweep.name} [{args.profile}]: {ran} run(s) trained, "
          f"{sum(r.status == 'cached' for r in results)} up to date, {len(failed)} failed")
    for result in failed:
        print(f"error: point {result.run_dir.name} failed: {result.error}", file=sys.stderr)
    return 1 if failed else 0


def run_declared_sweeps(sweeps: list, executor, force: bool, results_dir, data_dir) -> list:
    """``build``: run the sweeps a profile declares (planned by :func:`fmnist_core.pipeline.sweep.declared_sweeps`);
    their runs' results."""
    from fmnist_core.pipeline.sweep import run_sweep
    results = []
    for sweep in sweeps:
        results += run_sweep(sweep, executor, force, results_dir, data_dir)
    return results


def cmd_compare(args) -> int:
    from fmnist_core.pipeline.sweep import compare_lines
    print("\n".join(compare_lines(args.run_a, args.run_b)))
    return 0


def variant_results(profile: str, results_dir: Path) -> str:
    """The headline metrics of every finished variant of ``profile``, one line each (empty without variants)."""
    from fmnist_core.pipeline.runner import failure_path
    from fmnist_core.pipeline.sweep import run_headlines
    from fmnist_core.pipeline.variants import variant_runs
    lines = []
    for run_dir in variant_runs(Path(results_dir) / profile):
        if failure_path(run_dir).exists():
            lines.append(f"{run_dir.name}: FAILED ({read_json(failure_path(run_dir)).get('error', '')})")
        else:
            figures = ", ".join(f"{k} {v:.4f}" for k, v in run_headlines(run_dir).items())
            lines.append(f"{run_dir.name}: {figures}")
    return "\nvariants:\n" + "\n".join(lines) + "\n" if lines else ""
