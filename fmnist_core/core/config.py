"""Configuration: dataclass defaults, overridden by a profile, then by the user, validated before any work.

Every experiment's parameters are one dataclass. ``from_overrides`` refuses unknown names (suggesting the
closest), wrong types and out-of-range values with a message that names the parameter, so a mistake is
caught before any training starts; the resolved values are stored in every checkpoint and results file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field

import yaml

from fmnist_core.core.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: ``1e-3`` is a float (plain YAML 1.1 wants ``1.0e-3``); mapping keys are
    names (profiles, experiments, parameters, models) and stay strings as written."""

    def construct_mapping(self, node, deep=False):
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str):
    """Parse YAML safely (no tags that build objects), with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def parse_cli_value(text: str):
    """Parse a command-line parameter value as YAML (``3`` → int, ``[a, b]`` → list, ``true`` → bool)."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def unknown_name_message(kind: str, name: str, choices) -> str:
    """``unknown parameter 'lr_rate'; did you mean 'lr'?`` — with the list of valid names."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (valid: {', '.join(choices)})"


# The seeds on which a profile's settings are chosen, on validation accuracy only (bench/tune.py); the profiles
# report test accuracy on other seeds, never used to choose a setting (tests/test_config.py checks both).
TUNING_SEEDS = (0, 1, 2, 3)


@dataclass
class Config:
    """Base class for parameter sets: typed fields with defaults, plus a ``check`` for value ranges."""

    @classmethod
    def from_overrides(cls, *layers: dict, where: str = "parameters"):
        """Build the config from defaults updated by each mapping in ``layers`` (later wins), validated."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for layer in layers:
            if not isinstance(layer or {}, dict):  # a profile entry written as a list or a scalar, say
                raise ConfigError(f"{where}: must map parameter names to values, got {layer!r}")
            for name, value in (layer or {}).items():
                if name not in names:
                    raise ConfigError(f"{where}: " + unknown_name_message("parameter", name, names))
                if not _matches(value, hints[name]):
                    float_ok = hints[name] is float and isinstance(value, int) and not isinstance(value, bool)
                    if not float_ok:
                        raise ConfigError(f"{where}: parameter {name!r} must be {_type_name(hints[name])}, "
                                          f"got {value!r} ({type(value).__name__})")
                values[name] = float(value) if hints[name] is float else value
        with untraced():
            config = cls(**values)
            config.check()
        return config

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first parameter whose value is impossible.

        Groups of parameters are mixed into an experiment's config by inheritance; each group's ``check``
        calls ``super().check()`` so that every group of the composition is checked."""

    def to_dict(self) -> dict:
        with untraced():
            return dataclasses.asdict(self)

    def narrow(self, target: type, *layers: dict, where: str = "parameters"):
        """This config's values of the fields ``target`` has, updated by ``layers``, validated as a
        ``target``: how a study derives the configuration of one of its jobs.

        When parameter reads are traced (:func:`trace_reads`), reading a field of the derived config that
        came from this one counts as reading it here too."""
        names = {f.name for f in dataclasses.fields(target)}
        shared = {k: v for k, v in self.to_dict().items() if k in names}
        derived = target.from_overrides(shared, *layers, where=where)
        overridden = {k for layer in layers for k in (layer or {})}
        object.__setattr__(derived, "_parents", [(self, set(shared) - overridden)])
        return derived

    def fields_read(self) -> set[str]:
        """The parameters read so far (only recorded while :func:`trace_reads` is on)."""
        return set(self.__dict__.get("_reads", ()))

    @classmethod
    def describe(cls) -> list[tuple[str, str, object, str]]:
        """(name, type, default, help) for every parameter, for ``fmnist-book list``."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows


def param(default, help: str = ""):
    """A dataclass field with a help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def require(condition: bool, name: str, message: str) -> None:
    """Raise ``ConfigError`` for parameter ``name`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"parameter {name!r} {message}")


def require_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"parameter {name!r}: " + unknown_name_message("value", value, choices))


# ------------------------------------------------------------------------------- which parameters are read
# A parameter that a run never reads is one the user could set to no effect. With the environment variable
# FMNIST_TRACE_PARAMS=1, every read of a config field by the code that runs is recorded (validation,
# ``to_dict`` and ``narrow`` do not count), so a test can prove each experiment reads all of its parameters.
_PAUSED = [0]


@contextlib.contextmanager
def untraced():
    """Reads of config fields inside this block are not recorded (validation, serialisation)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def _mark_read(config, name: str) -> None:
    config.__dict__.setdefault("_reads", set()).add(name)
    for parent, names in config.__dict__.get("_parents", ()):
        if name in names:
            _mark_read(parent, name)


def _traced_getattribute(self, name):
    value = object.__getattribute__(self, name)
    if not _PAUSED[0] and not name.startswith("_") and name in type(self).__dataclass_fields__:
        _mark_read(self, name)
    return value


def trace_reads(enabled: bool = True) -> None:
    """Record which config fields are read (see :meth:`Config.fields_read`)."""
    if enabled:
        Config.__getattribute__ = _traced_getattribute
    elif "__getattribute__" in Config.__dict__:
        del Config.__getattribute__


if os.environ.get("FMNIST_TRACE_PARAMS") == "1":
    trace_reads()
