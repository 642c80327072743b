"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


class FmnistBookError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class DataError(FmnistBookError):
    """A dataset file is missing, unreadable, truncated or not what it claims to be."""


class ConfigError(FmnistBookError, ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


class RunError(FmnistBookError):
    """An experiment run failed or cannot be started."""
