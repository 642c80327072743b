"""Variants: runs with overrides kept beside the profile's run, in ``results/<profile>/<experiment>@<variant>/``.

A variant is a run of an experiment with some parameters changed (``fmnist-book run E -p lr 0.01 --variant
NAME``), its own folder and its own key; the profile's run (``results/<profile>/<experiment>/``) is never
replaced by one. A chapter that reads another's results reads the profile's run of that chapter. Without a name,
one is derived from the overrides (:func:`derive_variant`): ``lr=0.01``, ``threshold=0.8,seed=1``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from fmnist_core.core.errors import ConfigError, FmnistBookError
from fmnist_core.core.io import read_json
from fmnist_core.pipeline.runner import MAX_VARIANT_LENGTH, check_variant


def format_value(value) -> str:
    """A parameter value as a variant name writes it: ``0.8``, ``true``, ``mlp+lenet_avg`` for a list."""
    if isinstance(value, list):
        return "+".join(format_value(v) for v in value)
    if isinstance(value, str):
        return re.sub(r"[^A-Za-z0-9._-]", "_", value)
    return json.dumps(value, sort_keys=True, separators=(",", ":")).replace('"', "")


def derive_variant(overrides: dict) -> str:
    """The variant name of ``overrides``: ``name=value`` pairs in their order, joined by commas.

    Parameters
    ----------
    overrides : dict
        Parameter name -> value (at least one).

    Returns
    -------
    str
        A name accepted by :func:`check_variant`.
    """
    if not overrides:
        raise ConfigError("a variant needs at least one parameter override (-p NAME VALUE)")
    name = ",".join(f"{key}={format_value(value)}" for key, value in overrides.items())
    if len(name) > MAX_VARIANT_LENGTH:
        raise ConfigError(f"the overrides' variant name {name[:40]}... is longer than {MAX_VARIANT_LENGTH} "
                          "characters: give one with --variant NAME")
    return check_variant(name)


def split_run_name(folder_name: str) -> tuple[str, str | None]:
    """``(experiment, variant)`` of a run folder's name (``variant`` is ``None`` for the profile's run)."""
    experiment, _, variant = folder_name.partition("@")
    return experiment, variant or None


def variant_runs(profile_dir: Path, experiment: str | None = None) -> list[Path]:
    """The finished and failed variant folders under ``results/<profile>/`` (of ``experiment`` when given), sorted.

    Parameters
    ----------
    profile_dir : Path
        ``results/<profile>``.
    experiment : str, optional
        Only this experiment's variants.

    Returns
    -------
    list of Path
        ``<experiment>@<variant>`` folders (a failed variant with no finished run: the folder it would have).
    """
    from fmnist_core.pipeline.runner import failure_path
    profile_dir = Path(profile_dir)
    if not profile_dir.is_dir():
        return []
    prefix = f"{experiment}@" if experiment else ""
    names = set()
    for path in profile_dir.iterdir():
        name = path.name.removesuffix(".failed.json")
        if "@" in name and name.startswith(prefix) and not name.endswith((".partial", ".old", ".lock")) and \
                (path.is_dir() or path.name.endswith(".failed.json")):
            names.add(name)
    return [profile_dir / name for name in sorted(names)
            if (profile_dir / name / "env.json").exists() or failure_path(profile_dir / name).exists()]


def variant_state(run_dir: Path, results_dir: Path) -> str:
    """Whether the variant in ``run_dir`` is up to date with its recorded overrides (as ``status`` says it)."""
    from fmnist_core.pipeline.runner import failure_path, finished_key, resolve_params, run_key
    run_dir = Path(run_dir)
    if failure_path(run_dir).exists():
        return f"failed: {read_json(failure_path(run_dir)).get('error', '')}"
    env = read_json(run_dir / "env.json")
    try:
        params = resolve_params(env["experiment"], env["profile"], env.get("overrides", {}))
    except (FmnistBookError, KeyError) as err:
        return f"out of date: its overrides no longer apply ({err})"
    key = run_key(env["experiment"], env["profile"], params, Path(results_dir).resolve())
    return "up to date" if finished_key(run_dir) == key else "out of date: re-run its sweep or its run command"
