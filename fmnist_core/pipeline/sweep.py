"""Sweeps: every value (× every seed) of one or two parameters as variants of an experiment, run together.

``fmnist-book sweep EXPERIMENT --profile P -p NAME '[v1, v2]' [-p OTHER '[...]'] [--set NAME VALUE] [--seeds N]``
plans each point (one value of every swept parameter, × seed) as a variant (:mod:`fmnist_core.pipeline.variants`)
named ``<experiment>@name=value,...,seed=s``. Their jobs are planned together and run by one executor; each point
is cached by its key, so a re-run with one more value trains only that value's points. A point that fails is
named; the others finish. A record of the sweep, ``results/<profile>/sweeps/<experiment>@<names>.json``, is
what the book's sweep page reads (:mod:`fmnist_core.pipeline.sweep_page`); a profile may declare sweeps
(``sweeps:`` in ``profiles.yml``), which ``build`` runs after its experiments.

``--seeds N`` sets each point's seed to 0, ..., N-1: ``seeds: [s]`` for an experiment with a ``seeds`` list (one
seed per point), else ``seed: s``. Without it the profile's seed(s) apply and a point is one run.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.errors import ConfigError, FmnistBookError, RunError
from fmnist_core.core.io import read_json, write_json
from fmnist_core.pipeline.experiments import get_experiment
from fmnist_core.pipeline.variants import derive_variant, format_value

MAX_POINTS = 24      # runs (points × seeds) a sweep may plan without --yes
MAX_PARAMETERS = 2   # a line or a heat map
SWEEP_KEYS = {"experiment", "parameters", "set", "seeds"}


@dataclass(frozen=True)
class Point:
    """One run of a sweep: the swept values, its seed (``None``: the profile's) and its variant.

    Attributes
    ----------
    values : dict
        Swept parameter -> this point's value.
    seed : int or None
        The seed set by ``--seeds`` (``None`` when not given).
    overrides : dict
        Every override of the run: the fixed ones (``--set``), the swept values and the seed.
    variant : str
        The variant's name (its folder is ``<experiment>@<variant>``).
    """

    values: dict
    seed: int | None
    overrides: dict
    variant: str


@dataclass
class Sweep:
    """A planned sweep of ``experiment`` in ``profile``: swept parameter -> values, fixed overrides, seeds."""

    experiment: str
    profile: str
    parameters: dict
    fixed: dict = field(default_factory=dict)
    seeds: int | None = None
    points: list = field(default_factory=list)

    @property
    def name(self) -> str:
        """``<experiment>@<swept names>``: the sweep's record and page name."""
        return f"{self.experiment}@{'+'.join(self.parameters)}"

    def record(self) -> dict:
        """What ``results/<profile>/sweeps/<name>.json`` holds."""
        return {"experiment": self.experiment, "profile": self.profile, "parameters": self.parameters,
                "set": self.fixed, "seeds": self.seeds,
                "points": [dataclasses.asdict(p) for p in self.points]}


def seed_parameter(experiment: str) -> str:
    """``seeds`` or ``seed``: the parameter ``--seeds`` sets for ``experiment``."""
    fields = {f.name for f in dataclasses.fields(get_experiment(experiment).config)}
    if "seeds" in fields:
        return "seeds"
    if "seed" in fields:
        return "seed"
    raise ConfigError(f"experiment {experiment!r} has no seed parameter: --seeds does not apply to it")


def plan_sweep(experiment: str, profile: str, parameters: dict, fixed: dict | None = None, seeds: int | None = None,
               yes: bool = False, profile_params: dict | None = None) -> Sweep:
    """Check a sweep and plan its points; every problem is refused before anything runs, in one message.

    Parameters
    ----------
    experiment, profile : str
        The experiment and the profile whose settings the points start from.
    parameters : dict
        Swept parameter -> non-empty list of values (one or two parameters).
    fixed : dict, optional
        Overrides shared by every point (``--set``).
    seeds : int, optional
        Seeds per point (0, ..., N-1); ``None``: the profile's seed(s).
    yes : bool
        Allow more than :data:`MAX_POINTS` runs.
    profile_params : dict, optional
        The profile's settings of ``experiment`` (read from ``profiles.yml`` when not given).

    Returns
    -------
    Sweep
        With its :class:`Point` list, swept values outermost, seeds innermost.
    """
    exp = get_experiment(experiment)
    where = f"sweep of {experiment}"
    if profile_params is None:
        from fmnist_core.pipeline.runner import get_profile
        profile_params = get_profile(profile)["experiments"].get(experiment)
        if profile_params is None and experiment not in get_profile(profile)["experiments"]:
            raise ConfigError(f"{where}: experiment {experiment!r} is not in profile {profile!r}")
    fixed = dict(fixed or {})
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{where}: name at least one parameter to sweep (-p NAME '[v1, v2]')")
    if len(parameters) > MAX_PARAMETERS:
        raise ConfigError(f"{where}: at most {MAX_PARAMETERS} swept parameters, got {len(parameters)}: "
                          f"{', '.join(parameters)}")
    _check_swept(exp, parameters, fixed, where)
    seed_name = _check_seeds(experiment, seeds, parameters, fixed, where)
    combos = list(itertools.product(*parameters.values()))
    runs = len(combos) * (seeds or 1)
    if runs > MAX_POINTS and not yes:
        raise ConfigError(f"{where}: {runs} runs ({len(combos)} point(s) x {seeds or 1} seed(s)) is more than "
                          f"{MAX_POINTS}; add --yes to run them all")
    points = [point for combo in combos
              for point in _points(exp, dict(zip(parameters, combo)), fixed, seeds, seed_name, profile_params, where)]
    return Sweep(experiment, profile, dict(parameters), fixed, seeds, points)


def _points(exp, values: dict, fixed: dict, seeds, seed_name, profile_params, where: str) -> list:
    """The runs of one swept combination (one per seed), each checked against the experiment's config."""
    points = []
    for seed in (range(seeds) if seeds else [None]):
        seed_override = {} if seed is None else {seed_name: [seed] if seed_name == "seeds" else seed}
        overrides = {**fixed, **values, **seed_override}
        try:  # a wrong type or an impossible value, for this point
            exp.config.from_overrides(profile_params or {}, overrides, where=where)
        except ConfigError as err:
            raise ConfigError(f"{err} (point {_describe(values)})") from None
        label = {**values, **({"seed": seed} if seed is not None else {})}
        variant = derive_variant(label) if not fixed else _with_fixed(label, fixed)
        points.append(Point(values, seed, overrides, variant))
    return points


def _check_swept(exp, parameters: dict, fixed: dict, where: str) -> None:
    """Each swept parameter exists, has a non-empty list of distinct values, and is not also set."""
    names = {f.name for f in dataclasses.fields(exp.config)}
    for name, values in parameters.items():
        if name not in names:  # the config's own message, with the closest name
            exp.config.from_overrides({name: None}, where=where)
        if not isinstance(values, list):
            raise ConfigError(f"{where}: parameter {name!r}: give its values as a list, e.g. '[0.1, 0.2]', "
                              f"got {values!r}")
        if not values:
            raise ConfigError(f"{where}: parameter {name!r}: the list of values is empty")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{where}: parameter {name!r}: a value is listed twice in {values!r}")
        if name in fixed:
            raise ConfigError(f"{where}: parameter {name!r} is both swept and set")


def _check_seeds(experiment: str, seeds, parameters: dict, fixed: dict, where: str) -> str | None:
    """The seed parameter that ``--seeds`` sets (``None`` without it); refused unless a positive integer."""
    seed_name = None
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"{where}: --seeds must be a positive integer, got {seeds!r}")
        seed_name = seed_parameter(experiment)
        if seed_name in parameters or seed_name in fixed:
            raise ConfigError(f"{where}: --seeds sets {seed_name!r}; do not also sweep or set it")
    return seed_name


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in values.items())


def _with_fixed(label: dict, fixed: dict) -> str:
    """The variant name of a point of a sweep with fixed overrides: those come first, or as a short hash."""
    try:
        return derive_variant({**fixed, **label})
    except ConfigError:
        import hashlib
        digest = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:8]
        return derive_variant({**label, "set": digest})


def parse_values(pairs) -> dict:
    """``-p NAME VALUES`` pairs (YAML text) as ``{name: parsed value}``; a name given twice is refused."""
    from fmnist_core.core.config import parse_cli_value
    parsed = {}
    for name, text in pairs:
        if name in parsed:
            raise ConfigError(f"parameter {name!r} given twice")
        parsed[name] = parse_cli_value(text)
    return parsed


# ------------------------------------------------------------------------------------------- running
def sweep_dir(results_dir: Path, profile: str) -> Path:
    """``results/<profile>/sweeps``: the records of the profile's sweeps."""
    return Path(results_dir) / profile / "sweeps"


def run_sweep(sweep: Sweep, executor=None, force: bool = False, results_dir=None, data_dir=None, log=print) -> list:
    """Run every point of ``sweep`` (cached per point), write its record and return the runs' results.

    Parameters
    ----------
    sweep : Sweep
        From :func:`plan_sweep`.
    executor : LocalExecutor or SlurmExecutor, optional
        Runs every point's jobs first, together; ``None``: each notebook trains its own (inline).
    force : bool
        Re-run points that are up to date.
    results_dir, data_dir : Path, optional
        Where runs are stored, and the data.
    log : callable
        Progress lines.

    Returns
    -------
    list of RunResult
        One per point, in the sweep's order; a failed point has ``status == "failed"`` and its error.
    """
    from fmnist_core.pipeline.runner import (DEFAULT_RESULTS, RunResult, _record_failure, finished_key, run_experiment,
                                             run_name)
    results_dir = Path(results_dir or DEFAULT_RESULTS).resolve()
    profile, experiment = sweep.profile, sweep.experiment
    missing = [d for d in get_experiment(experiment).requires if finished_key(results_dir / profile / d) is None]
    if missing:
        raise RunError(f"the sweep of {experiment} needs the profile's finished run(s) of {', '.join(missing)} "
                       f"first: fmnist-book run {missing[0]} --profile {profile}")
    write_json(sweep_dir(results_dir, profile) / f"{sweep.name}.json", sweep.record())
    log(f"sweep {sweep.name} [{profile}]: {len(sweep.points)} run(s)")
    planned, failures = _run_jobs(sweep, executor, force, results_dir, data_dir, log)
    results = []
    for point in sweep.points:
        final = results_dir / profile / run_name(experiment, point.variant)
        failed = [f for f in failures if f.study == final.name]
        if failed:
            error = "; ".join(f.describe() for f in failed)
            results.append(_record_failure(final, experiment, profile, error, variant=point.variant,
                                           overrides=point.overrides))
        else:
            try:
                results.append(run_experiment(experiment, profile, point.overrides, force, results_dir, data_dir, log,
                                              prepared=planned.get(point.variant) is not None,
                                              variant=point.variant))
            except RunError as err:
                results.append(RunResult(experiment, "failed", final, error=str(err)))
        if results[-1].status == "failed":
            log(f"{final.name} [{profile}]: FAILED: {results[-1].error}")
    return results


def _run_jobs(sweep: Sweep, executor, force: bool, results_dir: Path, data_dir, log) -> tuple[dict, list]:
    """With an executor, every point's jobs at once: the planned jobs by variant, and the jobs' failures."""
    from fmnist_core.pipeline.executors import plan_study
    from fmnist_core.pipeline.runner import run_name
    profile, experiment = sweep.profile, sweep.experiment
    planned, failures = {}, []
    if executor is not None:
        import os
        if data_dir:
            os.environ["FMNIST_DATA_DIR"] = str(Path(data_dir).resolve())
        planned = {p.variant: plan_study(experiment, profile, p.overrides, force, results_dir, p.variant)
                   for p in sweep.points}
        studies = {run_name(experiment, v): jobs for v, jobs in planned.items() if jobs}
        if studies:
            log(f"{executor.name}: {sum(map(len, studies.values()))} job(s) of {len(studies)} point(s) [{profile}]"
                + (f"; {executor.describe()}" if hasattr(executor, "describe") else ""))
            failures = executor.run(studies, log)
    return planned, failures


def declared_sweeps(profile: str, profiles: dict | None = None, yes: bool = True) -> list[Sweep]:
    """The sweeps the profile declares (``sweeps:`` in ``profiles.yml``), planned."""
    from fmnist_core.pipeline.runner import get_profile
    spec = get_profile(profile, profiles)
    return [plan_declared(entry, profile, spec, yes) for entry in spec.get("sweeps") or []]


def plan_declared(entry, profile: str, spec: dict, yes: bool = True, where: str = "profiles.yml") -> Sweep:
    """One ``sweeps:`` entry of a profile, checked (unknown keys refused) and planned."""
    where = f"{where}: {profile}.sweeps"
    if not isinstance(entry, dict) or set(entry) - SWEEP_KEYS or "experiment" not in entry:
        raise ConfigError(f"{where}: each sweep maps 'experiment' and 'parameters' (optional: 'set', 'seeds'), "
                          f"got {entry!r}")
    experiment = entry["experiment"]
    if experiment not in spec["experiments"]:
        raise ConfigError(f"{where}: experiment {experiment!r} is not in the profile")
    try:
        return plan_sweep(experiment, profile, entry.get("parameters"), entry.get("set"), entry.get("seeds"), yes,
                          profile_params=spec["experiments"].get(experiment) or {})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def recorded_sweeps(results_dir: Path, profile: str) -> list[dict]:
    """The records of the sweeps run for ``profile``, sorted by name (each with its ``name``)."""
    folder = sweep_dir(results_dir, profile)
    return [{"name": path.stem, **read_json(path)} for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ headlines
def headline_metrics(experiment: str, metrics: dict) -> dict:
    """The experiment's headline figures as numbers (those of the book's "Results at a glance"), by name.

    Parameters
    ----------
    experiment : str
        Which chapter wrote ``metrics``.
    metrics : dict
        The run's ``metrics.json``.

    Returns
    -------
    dict
        Metric name -> value, e.g. ``{"mlp test accuracy": 0.83}``; accuracies are fractions.
    """
    if experiment == "classification":
        return {f"{name} test accuracy": m["accuracy"] for name, m in metrics["models"].items()}
    if experiment in ("fixmatch", "semisupervised"):
        return {f"{r['model']} @ {r['num_labels'] or 'all'} labels test accuracy": r["test_accuracy"]
                for r in metrics["study"]}
    if experiment == "vae":
        return {"test negative ELBO (nats)": metrics["test"]["neg_elbo"]}
    if experiment == "layerwise":
        last = {}
        for row in metrics["layers"]:
            last[row["run"]] = row
        return {f"{run} 5-NN accuracy at {row['layer']}": row["knn_accuracy"] for run, row in last.items()}
    if experiment == "dataset":
        return {"PCA variance explained (2 components)": sum(metrics["pca_explained_variance_ratio"])}
    raise ConfigError(f"no headline metrics for experiment {experiment!r}")


def run_headlines(run_dir: Path) -> dict:
    """The headline metrics of the finished run in ``run_dir`` (``results/<profile>/<experiment>[@variant]``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "env.json").is_file():
        raise FmnistBookError(f"{run_dir}: not a finished run (no env.json)")
    env = read_json(run_dir / "env.json")
    return headline_metrics(env["experiment"], read_json(run_dir / "metrics.json"))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare_lines(run_a: Path, run_b: Path) -> list[str]:
    """``fmnist-book compare``: the headline metrics of two runs side by side, with B - A.

    Parameters
    ----------
    run_a, run_b : Path
        Finished run folders of the same experiment.

    Returns
    -------
    list of str
        A header and one aligned line per metric (a metric only one run has shows ``-`` for the other).
    """
    envs = [read_json(Path(r) / "env.json") if (Path(r) / "env.json").is_file() else None for r in (run_a, run_b)]
    for run, env in zip((run_a, run_b), envs):
        if env is None:
            raise FmnistBookError(f"{run}: not a finished run (no env.json)")
    if envs[0]["experiment"] != envs[1]["experiment"]:
        raise FmnistBookError(f"{run_a} is a {envs[0]['experiment']} run and {run_b} a {envs[1]['experiment']} "
                              "run: compare two runs of one experiment")
    a, b = run_headlines(run_a), run_headlines(run_b)
    names = list(dict.fromkeys([*a, *b]))
    labels = [Path(run_a).name, Path(run_b).name]
    if labels[0] == labels[1]:
        labels = [str(run_a), str(run_b)]
    width = max(len(n) for n in names + ["metric"])
    cols = [max(len(labels[0]), 8), max(len(labels[1]), 8), 8]

    def fmt(value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    lines = [f"{'metric':<{width}}  {labels[0]:>{cols[0]}}  {labels[1]:>{cols[1]}}  {'B - A':>{cols[2]}}"]
    for name in names:
        va, vb = a.get(name), b.get(name)
        diff = f"{vb - va:+.4f}" if va is not None and vb is not None else "-"
        lines.append(f"{name:<{width}}  {fmt(va):>{cols[0]}}  {fmt(vb):>{cols[1]}}  {diff:>{cols[2]}}")
    return lines
