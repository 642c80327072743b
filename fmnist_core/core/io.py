"""Atomic file writes and safe reads: a killed process never leaves a half-written file that looks finished."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from fmnist_core.core.errors import FmnistBookError

# The folder holding the fmnist_core package: the checkout's root, or site-packages when installed. The project's
# own files (notebooks, profiles.yml, the book's pages) are found through fmnist_core.core.resources.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    return _atomic_write(path, lambda handle: handle.write(data))


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically; NaN and infinity are refused rather than written."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return write_bytes_atomic(path, (text + "\n").encode())


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path):
    """Read a JSON file; a missing, truncated or corrupt file raises one error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FmnistBookError(f"{path}: file not found") from None
    except (OSError, ValueError) as err:
        raise FmnistBookError(f"{path}: not a readable JSON file ({err})") from None


def save_checkpoint(path, state: dict) -> Path:
    """``torch.save`` to a temporary file, then rename: the previous checkpoint survives a kill mid-write."""
    return _atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FmnistBookError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        first_sentence = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
        raise FmnistBookError(f"{path}: not a readable checkpoint ({type(err).__name__}: {first_sentence})") from None
