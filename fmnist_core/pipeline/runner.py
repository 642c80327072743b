"""Runs experiments through papermill into ``results/<profile>/<experiment>/``, cached and crash-safe.

A run executes in ``<experiment>.partial/`` (where a killed run's checkpoints wait to be resumed); only a
finished run is renamed to ``<experiment>/``, so a results folder that exists is a finished run.
A run whose key (parameters, notebook, the source of the modules it uses, the keys of the runs it reads)
matches the finished one is not executed again.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import platform
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from fmnist_core.core import deadline as deadlines
from fmnist_core.core.config import load_yaml, unknown_name_message
from fmnist_core.core.errors import ConfigError, FmnistBookError, RunError
from fmnist_core.pipeline.experiments import EXPERIMENTS, get_experiment
from fmnist_core.pipeline.progress import RunInterrupted, quiet_after_interrupt, show_progress
from fmnist_core.core.io import read_json, write_json
from fmnist_core.core.jobs import DONE_FILE, imported_modules, source_hashes
from fmnist_core.core.resources import in_checkout, project_file, work_root

NOTEBOOK_DIR = project_file("notebooks")
PROFILES_PATH = project_file("profiles.yml")
DEFAULT_RESULTS = work_root() / "results"  # the checkout's results/, or ./results for an installed package


# ------------------------------------------------------------------------------------------- profiles
def load_profiles(path: Path = PROFILES_PATH) -> dict:
    """Read and validate the profile file: every experiment and parameter named in it must exist."""
    path = Path(path)
    try:
        profiles = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the profile file ({err})") from None
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: must map profile names to their settings")
    for name, profile in profiles.items():
        experiments = profile.get("experiments") if isinstance(profile, dict) else None
        if not isinstance(experiments, dict):
            raise ConfigError(f"{path}: profile {name!r} needs an 'experiments' mapping")
        for exp, params in experiments.items():
            try:
                config = get_experiment(exp).config
            except ConfigError as err:
                raise ConfigError(f"{path}: profile {name!r}: {err}") from None
            config.from_overrides(params or {}, where=f"{path.name}: {name}.{exp}")
        # Declared sweeps: their shape here; point by point by fmnist_core.pipeline.sweep.declared_sweeps, which
        # `build` and the scale plan call before anything runs.
        if profile.get("sweeps") is not None and not isinstance(profile["sweeps"], list):
            raise ConfigError(f"{path}: profile {name!r}: 'sweeps' must be a list of sweeps")
        if profile.get("executor") is not None:
            check_profile_executor(profile["executor"], f"{path}: profile {name!r}")
    return profiles


PROFILE_EXECUTOR_KEYS = {"executor": ("inline", "local"), "workers": int, "threads_per_worker": int}


def check_profile_executor(settings, where: str) -> dict:
    """A profile's ``executor`` setting, validated: ``{executor: inline | local[, workers: N]
    [, threads_per_worker: N]}`` (Slurm needs a site's options, so it is chosen on the command line only)."""
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: 'executor' must be a mapping such as {{executor: local, workers: 2}}")
    for key, value in settings.items():
        kind = PROFILE_EXECUTOR_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{where}: 'executor' has no setting {key!r} "
                              f"(known: {', '.join(PROFILE_EXECUTOR_KEYS)})")
        if isinstance(kind, tuple) and value not in kind:
            raise ConfigError(f"{where}: 'executor.{key}' must be one of {', '.join(kind)}, got {value!r}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: 'executor.{key}' must be a whole number of at least 1, got {value!r}")
    return settings


def get_profile(name: str, profiles: dict | None = None) -> dict:
    """The profile called ``name``; other names (paths included) are refused with the valid ones."""
    profiles = profiles if profiles is not None else load_profiles()
    if name not in profiles:
        raise ConfigError(unknown_name_message("profile", name, profiles))
    return profiles[name]


def resolve_params(experiment: str, profile: str, overrides: dict | None = None) -> dict:
    """Defaults, updated by the profile, updated by the user's overrides — validated, as plain values."""
    exp = get_experiment(experiment)
    profile_params = get_profile(profile)["experiments"].get(experiment) or {}
    return exp.config.from_overrides(profile_params, overrides or {}, where=experiment).to_dict()


# ---------------------------------------------------------------------------------------------- keys
def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def key_parts(experiment: str, profile: str, params: dict, results_dir: Path) -> dict:
    """What determines a run's results, each part hashed: parameters, notebook, used sources, upstream keys."""
    exp = get_experiment(experiment)
    return {"experiment": experiment, "profile": profile,
            "parameters": _sha256(json.dumps(params, sort_keys=True).encode()),
            "notebook": _sha256(notebook_path(experiment).read_bytes()),
            "sources": source_hashes(notebook_modules(experiment)),
            "upstream": {dep: finished_key(Path(results_dir) / profile / dep) or "missing"
                         for dep in exp.requires + exp.reads},
            "described": {other: _sha256(json.dumps(resolve_params(experiment, other), sort_keys=True).encode())
                          for other in exp.describes}}


def notebook_modules(experiment: str) -> list[str]:
    """The ``fmnist_core`` modules the experiment's notebook imports (their closure is in its key)."""
    cells = read_json(notebook_path(experiment))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return sorted(imported_modules(code))


def run_key(experiment: str, profile: str, params: dict, results_dir: Path) -> str:
    """The cache key of a run: the hash of its :func:`key_parts`."""
    return key_of(key_parts(experiment, profile, params, results_dir))


def key_of(parts: dict) -> str:
    return _sha256(json.dumps(parts, sort_keys=True).encode())


def changed_parts(old: dict, new: dict) -> list[str]:
    """Names of the parts that differ between two :func:`key_parts` (e.g. ``fmnist_core/vae.py``)."""
    changed = [part for part in ("experiment", "profile", "parameters", "notebook") if old.get(part) != new.get(part)]
    old_described, new_described = old.get("described", {}), new.get("described", {})
    changed += [f"{name} profile's settings" for name in sorted(old_described.keys() | new_described.keys())
                if old_described.get(name) != new_described.get(name)]
    for group, label in (("sources", "{}"), ("upstream", "upstream run {}")):
        names = old.get(group, {}).keys() | new.get(group, {}).keys()
        changed += [label.format(n) for n in sorted(names) if old.get(group, {}).get(n) != new.get(group, {}).get(n)]
    return changed


def finished_key(run_dir: Path) -> str | None:
    """The key of the finished run in ``run_dir``, or ``None`` if there is none."""
    env = Path(run_dir) / "env.json"
    try:
        return read_json(env).get("key") if env.exists() else None
    except FmnistBookError:
        return None


def notebook_path(experiment: str) -> Path:
    return NOTEBOOK_DIR / f"{get_experiment(experiment).name}.ipynb"


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    experiment: str
    status: str          # "done", "cached" or "failed"
    run_dir: Path
    seconds: float = 0.0
    error: str = ""


@contextmanager
def run_lock(results_dir: Path, profile: str, experiment: str):
    """Refuse a second concurrent run of the same experiment and profile (other pairs run freely)."""
    lock_path = results_dir / profile / f".{experiment}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another run of '{experiment}' with profile '{profile}' is in progress "
                           f"(lock {lock_path}); wait for it to finish") from None
        yield


def run_experiment(experiment: str, profile: str = "quick", overrides: dict | None = None, force: bool = False,
                   results_dir: Path = DEFAULT_RESULTS, data_dir=None, log=print, prepared: bool = False,
                   variant: str | None = None) -> RunResult:
    """Execute ``notebooks/<experiment>.ipynb`` for ``profile`` unless an identical run has finished.

    Parameters are validated before anything is written; a failure leaves the previous finished run (if
    any) in place and records the error in ``<experiment>.failed.json`` for the book to show. ``prepared``:
    :func:`prepare_run` made the run folder (and an executor ran its jobs there): it is used as it is.
    ``variant``: the run goes to ``<experiment>@<variant>/`` beside the profile's run, which it never replaces
    (:func:`check_variant`).
    """
    results_dir = Path(results_dir).resolve()
    params = resolve_params(experiment, profile, overrides)
    final = results_dir / profile / run_name(experiment, variant)
    with run_lock(results_dir, profile, final.name):
        recover_interrupted_swap(final)
        parts = key_parts(experiment, profile, params, results_dir)
        key = key_of(parts)
        if not force and _up_to_date(final, key):
            log(f"{experiment} [{profile}]: up to date ({final})")
            return RunResult(experiment, "cached", final)
        missing = _missing_requirements(experiment, profile, results_dir)
        if missing:
            return _record_failure(final, experiment, profile, f"needs the finished run(s) {', '.join(missing)} first",
                                   variant=variant, overrides=overrides)
        return _execute(experiment, profile, params, parts, final, overrides, data_dir, force, log, prepared, variant)


VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,=+-]*$")
MAX_VARIANT_LENGTH = 100


def check_variant(name: str) -> str:
    """``name`` when it can name a variant's folder; else a ``ConfigError`` saying which characters it may use.

    Parameters
    ----------
    name : str
        The variant name (the part after ``@`` in ``<experiment>@<variant>``).

    Returns
    -------
    str
        The same name.
    """
    if not isinstance(name, str) or not VARIANT_PATTERN.match(name) or len(name) > MAX_VARIANT_LENGTH:
        raise ConfigError(f"variant name {name!r}: must start with a letter or digit and use only letters, digits "
                          f"and . _ , = + - (at most {MAX_VARIANT_LENGTH} characters)")
    return name


def run_name(experiment: str, variant: str | None = None) -> str:
    """The folder of a run under ``results/<profile>/``: ``<experiment>``, or ``<experiment>@<variant>``."""
    if variant is None:
        return experiment
    return f"{experiment}@{check_variant(variant)}"


def _up_to_date(final: Path, key: str) -> bool:
    """Whether the finished run at ``final`` is of ``key`` and has no failure recorded since (a run with jobs
    stopped at a deadline no longer in force is not: it re-runs, resuming them)."""
    return (finished_key(final) == key and not failure_path(final).exists()
            and not (stopped_early(final) and not deadlines.stopped_job_is_final()))


def stopped_early(run_dir: Path) -> dict:
    """The jobs of a finished run that a deadline stopped short of their budget (``env.json``'s
    ``stopped_early``: job folder -> steps done and planned); empty when none did."""
    try:
        return read_json(Path(run_dir) / "env.json").get("stopped_early") or {}
    except FmnistBookError:
        return {}


def _missing_requirements(experiment: str, profile: str, results_dir: Path) -> list[str]:
    """The experiments ``experiment`` requires that have no finished run yet."""
    return [d for d in get_experiment(experiment).requires if finished_key(results_dir / profile / d) is None]


def prepare_partial(final: Path, key: str, params: dict, force: bool, keep: bool = False) -> Path:
    """The run folder ``<final>.partial`` made ready for a run of ``key`` (cleared unless ``keep``, when it
    holds another key's run or ``force``; the finished jobs of ``final`` carried in unless ``force``)."""
    partial = final.with_name(final.name + ".partial")
    if not keep and (force or _partial_key(partial) not in (None, key)):
        shutil.rmtree(partial, ignore_errors=True)  # checkpoints of other parameters must not be resumed
    partial.mkdir(parents=True, exist_ok=True)
    for leftover in partial.rglob(".*.tmp"):  # half-written files of a killed run (never renamed into place)
        leftover.unlink()
    if not force:  # --force re-runs every job too
        carry_finished_jobs(final, partial)
    write_json(partial / "run.json", {"key": key, "params": params})
    return partial


def prepare_run(experiment: str, profile: str, overrides: dict | None = None, force: bool = False,
                results_dir: Path = DEFAULT_RESULTS, variant: str | None = None) -> tuple[Path, dict] | None:
    """Make the run folder of ``experiment`` ready, so that an executor can run its jobs before the notebook;
    ``(run folder, parameters)``, or ``None`` when the finished run is up to date or a required run is missing
    (:func:`run_experiment` then says so). Its jobs' folders stay valid when an upstream run finishes later."""
    results_dir = Path(results_dir).resolve()
    params = resolve_params(experiment, profile, overrides)
    final = results_dir / profile / run_name(experiment, variant)
    with run_lock(results_dir, profile, final.name):
        recover_interrupted_swap(final)
        key = run_key(experiment, profile, params, results_dir)
        if (not force and _up_to_date(final, key)) or _missing_requirements(experiment, profile, results_dir):
            return None
        return prepare_partial(final, key, params, force), params


def _execute(experiment, profile, params, parts, final, overrides, data_dir, force, log, prepared=False,
             variant=None) -> RunResult:
    partial = prepare_partial(final, key_of(parts), params, force and not prepared, keep=prepared)
    label = final.name
    log(f"{label} [{profile}]: running in {partial}")
    started = time.perf_counter()
    try:
        with show_progress(partial, f"{label} [{profile}]"), quiet_after_interrupt():
            execute_notebook(experiment, profile, params, partial, final.parent, data_dir)
        if not (partial / "metrics.json").exists():
            raise RunError(f"notebook {notebook_path(experiment).name} finished without writing metrics.json")
    except KeyboardInterrupt:  # the partial folder is kept to be resumed; the command says so
        raise RunInterrupted(experiment, partial) from None
    except Exception as err:  # a failed chapter is reported, the others still run
        return _record_failure(final, experiment, profile, describe_error(err), time.perf_counter() - started,
                               variant, overrides)
    seconds = time.perf_counter() - started
    env = environment_record(experiment, profile, params, parts, seconds, overrides)
    stopped = deadlines.stopped_jobs(partial)  # jobs a deadline stopped short of their budget
    if variant:  # what `status` and the sweep page read back (a profile's run records neither)
        env.update(variant=variant, overrides=overrides or {},
                   command=env["command"].replace(f"--profile {profile}", f"--profile {profile} --variant {variant}", 1))
    write_json(partial / "env.json", {**env, **({"stopped_early": stopped} if stopped else {})})
    _swap_into_place(partial, final)
    log(f"{label} [{profile}]: done in {seconds:.0f} s -> {final}")
    return RunResult(experiment, "done", final, seconds)


def carry_finished_jobs(final: Path, partial: Path) -> int:
    """Hard-link the finished job folders of the previous run into the new one (where it has none yet), so
    that the jobs whose key is unchanged are skipped; returns how many were carried.

    Finished job files are never written again in place (every write renames a new file over the old), so
    the previous run stays intact whatever the new one does.
    """
    carried = 0
    for done in sorted(final.rglob(DONE_FILE)) if final.is_dir() else []:
        target = partial / done.parent.relative_to(final)
        if not target.exists():
            shutil.copytree(done.parent, target, copy_function=_link_or_copy)
            carried += 1
    return carried


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _partial_key(partial: Path) -> str | None:
    try:
        return read_json(partial / "run.json").get("key") if (partial / "run.json").exists() else None
    except FmnistBookError:
        return None


def execute_notebook(experiment, profile, params, run_dir: Path, results_dir: Path, data_dir) -> None:
    """Execute the notebook (the command shows the jobs' progress, :mod:`fmnist_core.pipeline.progress`).

    The kernel is stopped at once when the execution ends: a kernel still training when Ctrl-C stopped the
    command is not asked to shut down politely, which would print its message handler's traceback.
    """
    import papermill
    if data_dir:
        os.environ["FMNIST_DATA_DIR"] = str(Path(data_dir).resolve())
    papermill.execute_notebook(
        str(notebook_path(experiment)), str(run_dir / f"{experiment}.ipynb"),
        parameters={"profile": profile, "params": params, "run_dir": str(run_dir), "results_dir": str(results_dir)},
        kernel_name="python3", progress_bar=False, log_output=False, shutdown_kernel="immediate",
        # The kernel starts in the run folder (nbclient's resources path), and this process stays where it is:
        # papermill's own `cwd` changes the whole process's directory for the run, which notebooks running side by
        # side in threads (fmnist_core.pipeline.executors) would change under one another.
        resources={"metadata": {"path": str(run_dir)}},
        # The kernel's own start-up chatter (a local TCP kernel) is not the notebook's; errors still show.
        extra_arguments=["--IPKernelApp.log_level=ERROR"])


def describe_error(err: Exception) -> str:
    """One line for a failed execution: the notebook's own exception when papermill carries it."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:  # papermill's error carries the notebook's own exception
        return f"{ename}: {evalue}"
    return f"{type(err).__name__}: {err}"


def failure_path(final: Path) -> Path:
    return final.with_name(final.name + ".failed.json")


def _record_failure(final: Path, experiment: str, profile: str, error: str, seconds: float = 0.0,
                    variant: str | None = None, overrides: dict | None = None) -> RunResult:
    rerun = f"fmnist-book run {experiment} --profile {profile}"
    if variant:
        rerun += f" --variant {variant} " + " ".join(f"-p {k} {json.dumps(v)!r}" for k, v in (overrides or {}).items())
    write_json(failure_path(final), {"experiment": experiment, "profile": profile, "error": error,
                                     "partial_notebook": str(final.with_name(final.name + ".partial") / f"{experiment}.ipynb"),
                                     "rerun": rerun.strip()})
    return RunResult(experiment, "failed", final, seconds, error)


def _swap_into_place(partial: Path, final: Path) -> None:
    """Replace the old finished run by the new one; the old one is deleted only after the rename."""
    failure_path(final).unlink(missing_ok=True)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(final: Path) -> None:
    """Finish a :func:`_swap_into_place` that a kill interrupted between its two renames.

    Then ``final`` is missing and ``<final>.old`` holds the previous run: the new run goes into place if it
    had finished (its ``env.json`` is written last), else the previous one goes back.
    """
    old, partial = final.with_name(final.name + ".old"), final.with_name(final.name + ".partial")
    if old.exists() and not final.exists():
        os.replace(partial if (partial / "env.json").exists() else old, final)
    shutil.rmtree(old, ignore_errors=True)


def environment_record(experiment, profile, params, parts, seconds, overrides) -> dict:
    """Versions, commit, device, numerics and timing of a run: what the appendix and ``verify`` read."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from fmnist_core.core.train import numerics_mode, precision_record
    versions = {}
    for package in ("torch", "torchvision", "numpy", "scikit-learn", "openTSNE", "papermill", "jupyter-book"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    cli = " ".join(f"-p {k} {json.dumps(v)!r}" for k, v in (overrides or {}).items())
    device = run_device(params)
    return {"experiment": experiment, "profile": profile, "key": key_of(parts), "key_parts": parts, "params": params,
            "seed": params.get("seeds", params.get("seed")), "python": platform.python_version(),
            "versions": versions, "git_commit": git_commit(),
            "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "numerics": numerics_mode(device, bool(params.get("deterministic"))),
            "precision": precision_record(experiment, params, device),
            "torch_threads": torch.get_num_threads(), "wall_seconds": round(seconds, 1),
            "command": f"fmnist-book run {experiment} --profile {profile} {cli}".strip(),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run_device(params: dict):
    """The device a run with ``params`` trains on here (``device`` "auto" picks CUDA when present)."""
    from fmnist_core.core.train import resolve_device
    return resolve_device(params.get("device", "auto"))


def git_commit() -> str | None:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it (``None`` when installed)."""
    if not in_checkout():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work_root(), capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=work_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def run_states(profile: str, results_dir: Path = DEFAULT_RESULTS) -> list[tuple[str, str]]:
    """``(experiment, state)`` for every experiment of ``profile``: whether ``build`` would run it, and why."""
    results_dir, states = Path(results_dir).resolve(), {}
    for experiment in profile_experiments(profile):
        final = results_dir / profile / experiment
        parts = key_parts(experiment, profile, resolve_params(experiment, profile), results_dir)
        finished = finished_key(final)
        exp = get_experiment(experiment)
        stale_upstream = [d for d in exp.requires + exp.reads
                          if not states.get(d, "up to date").startswith("up to date")]
        if failure_path(final).exists():
            states[experiment] = f"failed: {read_json(failure_path(final)).get('error', '')}"
        elif finished is None:
            waiting = final.with_name(final.name + ".partial").exists()
            states[experiment] = "not run" + (" (an interrupted run waits to be resumed)" if waiting else "")
        elif finished != key_of(parts):
            old = read_json(final / "env.json").get("key_parts")
            changed = (f"changed {', '.join(changed_parts(old, parts)) or 'run key'}" if old
                       else "its record predates per-part keys")
            states[experiment] = f"out of date: {changed}"
        elif stale_upstream:
            states[experiment] = f"out of date: re-runs after {', '.join(stale_upstream)}"
        elif stopped_early(final):
            states[experiment] = (f"{deadlines.stopped_note(stopped_early(final))}; the next run resumes them"
                                  if not deadlines.stopped_job_is_final() else "up to date (stopped at its deadline)")
        else:
            states[experiment] = "up to date"
    return list(states.items())


def profile_experiments(profile: str) -> list[str]:
    """The experiments of a profile, in book order."""
    return [name for name in EXPERIMENTS if name in get_profile(profile)["experiments"]]


def run_profile(profile: str, force: bool = False, results_dir: Path = DEFAULT_RESULTS, data_dir=None,
                log=print) -> list[RunResult]:
    """Run every experiment of ``profile``; a failure is recorded and the others still run."""
    results = []
    for experiment in profile_experiments(profile):
        try:
            results.append(run_experiment(experiment, profile, force=force, results_dir=results_dir,
                                          data_dir=data_dir, log=log))
        except RunError as err:
            results.append(RunResult(experiment, "failed", Path(results_dir) / profile / experiment, error=str(err)))
        if results[-1].status == "failed":
            log(f"{experiment} [{profile}]: FAILED: {results[-1].error}")
    return results


def results_table(profile: str, results_dir: Path = DEFAULT_RESULTS) -> str:
    """A text table of the ``summary`` rows of every finished run of ``profile`` (read from results files),
    with the wall-clock figures of ``timings.json`` appended to the rows they belong to."""
    rows, notes = [], []
    for experiment in profile_experiments(profile):
        run_dir = Path(results_dir) / profile / experiment
        if failure_path(run_dir).exists():
            notes.append(f"{experiment}: FAILED ({read_json(failure_path(run_dir))['error']})")
        elif finished_key(run_dir) is None:
            notes.append(f"{experiment}: not run")
        else:
            timings = read_json(run_dir / "timings.json") if (run_dir / "timings.json").exists() else {}
            rows += [{"experiment": experiment, **row, **timings.get(row.get("run"), {})}
                     for row in read_json(run_dir / "metrics.json")["summary"]]
    return "\n".join(filter(None, [format_table(rows)] + notes)) or f"no runs for profile '{profile}'"


def format_table(rows: list[dict]) -> str:
    """Align ``rows`` (dicts) in columns: fractions with 4 decimals, seconds (``*_s``) and large values with 1."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value, column):
        if isinstance(value, float):
            return f"{value:,.1f}" if column.endswith("_s") or abs(value) >= 10 else f"{value:.4f}"
        return "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    table = [columns] + [[cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
