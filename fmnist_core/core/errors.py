"""Errors that reach the user as one clear message (the CLI prints them without a traceback)."""


def one_line(err: BaseException) -> str:
    """A library's exception text on one line (NumPy's, for one, can hold newlines from the bad input)."""
    return " ".join(str(err).split())


class FmnistBookError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class DataError(FmnistBookError):
    """A dataset file is missing, unreadable, truncated or not what it claims to be."""


class ConfigError(FmnistBookError, ValueError):
    """A parameter is unknown, of the wrong type, or out of range."""


class RunError(FmnistBookError):
    """An experiment run failed or cannot be started."""
