"""The ``fmnist-book`` command: run experiments, build the book, list experiments, show results."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist_core.core.config import parse_cli_value
from fmnist_core.core.errors import FmnistBookError

DEFAULT_PROFILE = "quick"


def _parser() -> argparse.ArgumentParser:
    from fmnist_core.pipeline.runner import DEFAULT_RESULTS
    parser = argparse.ArgumentParser(prog="fmnist-book", description="Reproducible Fashion-MNIST report book.")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="where runs are stored")
    parser.add_argument("--data-dir", type=Path, default=None, help="directory holding the Fashion-MNIST IDX files")
    sub = parser.add_subparsers(dest="command", required=True)

    catalogue = {"epilog": experiments_and_profiles(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    run = sub.add_parser("run", help="execute one experiment's notebook with papermill", **catalogue)
    run.add_argument("experiment")
    run.add_argument("--profile", default=DEFAULT_PROFILE)
    run.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override a parameter (VALUE is read as YAML: 3, 0.1, true, [a, b])")
    run.add_argument("--force", action="store_true", help="run even if an identical finished run exists")
    run.add_argument("--variant", nargs="?", const="", default=None, metavar="NAME",
                     help="keep the run beside the profile's, in <experiment>@NAME/ (no NAME: one derived from the "
                     "overrides, e.g. lr=0.01)")
    from fmnist_core.pipeline.executors import add_executor_options
    add_executor_options(run)

    from fmnist_core.pipeline.sweep_cli import add_sweep_parsers
    add_sweep_parsers(sub, add_executor_options)

    build = sub.add_parser("build", help="run every experiment of a profile, then build the HTML book", **catalogue)
    build.add_argument("--profile", default=DEFAULT_PROFILE)
    build.add_argument("--force", action="store_true")
    build.add_argument("--output-dir", type=Path, default=None, help="default: _build/<profile>")
    add_executor_options(build)

    results = sub.add_parser("results", help="print the key metrics of every finished run")
    results.add_argument("--profile", default=DEFAULT_PROFILE)
    results.add_argument("--summary", action="store_true", help="per chapter: headline figures beside the source "
                         "report's and the literature's, and the budget (the book's 'Results at a glance')")

    status = sub.add_parser("status", help="say which experiments of a profile are up to date, and why not")
    status.add_argument("--profile", default=DEFAULT_PROFILE)

    verify = sub.add_parser("verify", help="re-run finished runs from their records and compare their metrics")
    verify.add_argument("run_dir", type=Path, help="results/<profile>/<experiment>, or results/<profile> for all")
    verify.add_argument("--keep", action="store_true", help="keep the re-run's folder (beside the run)")

    sub.add_parser("list", help="list experiments, their parameters and the profiles")
    sub.add_parser("data", help="find (or download) Fashion-MNIST, verify it, and say where it is")
    from fmnist_core.pipeline.predict import add_predict_parser
    add_predict_parser(sub)
    from fmnist_core.pipeline.scale import add_plan_parser
    add_plan_parser(sub)
    return parser


def experiments_and_profiles() -> str:
    """The experiments and profiles, for ``run --help`` and ``build --help`` (``list`` gives their parameters)."""
    from fmnist_core.pipeline.experiments import EXPERIMENTS
    from fmnist_core.pipeline.runner import load_profiles
    lines = ["experiments:"] + [f"  {name:<16}{exp.title}" for name, exp in EXPERIMENTS.items()] + ["profiles:"]
    try:
        lines += [f"  {name:<16}{profile.get('description', '')}" for name, profile in load_profiles().items()]
    except FmnistBookError as err:
        lines.append(f"  (none readable: {err})")
    return "\n".join(lines + ["`fmnist-book list` shows every parameter with its default."])


def cmd_run(args) -> int:
    from fmnist_core.pipeline.runner import run_experiment
    overrides = {}
    for name, value in args.param:
        if name in overrides:
            raise FmnistBookError(f"parameter {name!r} given twice")
        overrides[name] = parse_cli_value(value)
    from fmnist_core.pipeline.executors import make_executor, run_with_executor
    variant = args.variant
    if variant is not None:
        from fmnist_core.pipeline.runner import check_variant, resolve_params
        from fmnist_core.pipeline.variants import derive_variant
        resolve_params(args.experiment, args.profile, overrides)  # bad input first, before a name is derived
        if not overrides:
            raise FmnistBookError("--variant needs at least one override (-p NAME VALUE); without one the run is "
                                  "the profile's own")
        variant = check_variant(variant) if variant else derive_variant(overrides)
    executor = make_executor(args, args.profile, args.results_dir)
    if executor is None:
        result = run_experiment(args.experiment, args.profile, overrides, args.force, args.results_dir, args.data_dir,
                                variant=variant)
    else:
        [result] = run_with_executor(executor, [args.experiment], args.profile, overrides, args.force,
                                     args.results_dir, args.data_dir, variant=variant)
    if result.status == "failed":
        print(f"error: {args.experiment} failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_build(args) -> int:
    from fmnist_core.pipeline import book
    from fmnist_core.core.resources import work_root
    from fmnist_core.pipeline.runner import get_profile, run_profile
    from fmnist_core.pipeline.executors import make_executor, run_with_executor
    from fmnist_core.pipeline.runner import profile_experiments
    from fmnist_core.pipeline.sweep import declared_sweeps
    get_profile(args.profile)
    sweeps = declared_sweeps(args.profile)  # a bad declared sweep is refused before anything runs
    executor = make_executor(args, args.profile, args.results_dir)
    if executor is None:
        results = run_profile(args.profile, args.force, args.results_dir, args.data_dir)
    else:
        results = run_with_executor(executor, profile_experiments(args.profile), args.profile, None, args.force,
                                    args.results_dir, args.data_dir)
    from fmnist_core.pipeline.sweep_cli import run_declared_sweeps
    results += run_declared_sweeps(sweeps, executor, args.force, args.results_dir, args.data_dir)
    output = (args.output_dir or work_root() / "_build" / args.profile).resolve()
    index = book.build(args.profile, Path(args.results_dir).resolve(), output)
    failed = [r.run_dir.name for r in results if r.status == "failed"]
    print(f"book ({args.profile}): {index}")
    if failed:
        print(f"error: failed experiments: {', '.join(failed)} (their chapters say why)", file=sys.stderr)
        return 1
    return 0


def cmd_results(args) -> int:
    from fmnist_core.pipeline.runner import get_profile, results_table
    if args.summary:
        from fmnist_core.pipeline.summary import format_glance
        get_profile(args.profile)
        print(format_glance(args.profile, Path(args.results_dir)), end="")
        return 0
    print(results_table(args.profile, Path(args.results_dir)))
    from fmnist_core.pipeline.sweep_cli import variant_results
    print(variant_results(args.profile, Path(args.results_dir)), end="")
    return 0


def cmd_status(args) -> int:
    from fmnist_core.pipeline.runner import run_states
    for experiment, state in run_states(args.profile, args.results_dir):
        print(f"{experiment:<16} {state}")
    from fmnist_core.pipeline.scale import job_status_lines
    for line in job_status_lines(args.profile, args.results_dir):
        print(line)
    from fmnist_core.pipeline.variants import variant_runs, variant_state
    for run_dir in variant_runs(Path(args.results_dir) / args.profile):
        print(f"{run_dir.name:<16} {variant_state(run_dir, args.results_dir)}")
    return 0


def cmd_verify(args) -> int:
    """Exit status 0 when every run reproduced, 1 when one did not."""
    from fmnist_core.pipeline.verify import finished_runs, format_comparison, verify_run
    results = []
    for run_dir in finished_runs(args.run_dir):
        results.append(verify_run(run_dir, args.data_dir, args.keep))
        print(format_comparison(results[-1]), flush=True)
    failed = [r.experiment for r in results if not r.reproduced]
    if failed:
        print(f"error: not reproduced: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_list(args) -> int:
    from fmnist_core.pipeline.experiments import EXPERIMENTS
    from fmnist_core.pipeline.runner import load_profiles
    for name, exp in EXPERIMENTS.items():
        print(f"{name}: {exp.title} (notebooks/{name}.ipynb)")
        for param, kind, default, help_text in exp.config.describe():
            print(f"    {param:<18} {kind:<10} {default!r:<24} {help_text}")
    print("profiles:")
    for name, profile in load_profiles().items():
        print(f"    {name:<10} {profile.get('description', '')}")
    return 0


def cmd_data(args) -> int:
    from fmnist_core.core.data import locate_fashion_mnist, read_verified_idx, FASHION_MNIST_SHA256
    paths = locate_fashion_mnist(args.data_dir)
    for stem, path in paths.items():
        shape = read_verified_idx(path, stem, FASHION_MNIST_SHA256[stem]).shape
        print(f"{stem}: {path} (verified, shape {shape})")
    return 0


def cmd_predict(args) -> int:
    from fmnist_core.pipeline.predict import cmd_predict as predict_command
    return predict_command(args)


def cmd_plan(args) -> int:
    from fmnist_core.pipeline.scale import cmd_plan as plan_command
    return plan_command(args)


COMMANDS = {"run": cmd_run, "build": cmd_build, "results": cmd_results, "status": cmd_status,
            "verify": cmd_verify, "list": cmd_list, "data": cmd_data, "predict": cmd_predict, "plan": cmd_plan,
            "sweep": lambda args: _sweep_cli().cmd_sweep(args), "compare": lambda args: _sweep_cli().cmd_compare(args)}


def _sweep_cli():
    from fmnist_core.pipeline import sweep_cli
    return sweep_cli


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FmnistBookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # what was kept and how to resume, without a traceback
        from fmnist_core.pipeline.progress import interrupted_message
        print(interrupted_message(err, argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
