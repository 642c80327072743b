"""Where the project's own files are, in a source checkout and in an installed package alike.

The files the commands read but never write — the notebooks, ``profiles.yml``, ``references.yml``, the book's
``_config.yml``, ``_toc.yml`` and ``book/`` pages, the recorded benchmark results ``bench/results/`` and the
recorded results of other profiles ``reference/`` — have one copy in the repository. In a source checkout they are
read there; a wheel (or ``pip install .``) carries them as package data in ``fmnist_core/_data/`` (``setup.py``
copies them there when the wheel is built), and they are read from there.

What the commands write (``results/``, ``_build/``, ``data/``) goes under the checkout in a source checkout, and
under the current directory otherwise (``--results-dir`` and ``--output-dir`` choose other places).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGE = "fmnist_core"
DATA_FOLDER = "_data"  # inside the installed package
# The project files a wheel carries (paths relative to the repository root; folders are taken whole).
PROJECT_FILES = ("profiles.yml", "references.yml", "_config.yml", "_toc.yml", "notebooks", "book", "bench/results",
                 "reference")
OPTIONAL_PROJECT_FILES = ("reference",)  # recorded results of other profiles, where some were recorded
_CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root when this file is in a checkout


def in_checkout() -> bool:
    """Whether the package runs from its source checkout (an editable install or ``PYTHONPATH``)."""
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "profiles.yml").is_file()


def project_root() -> Path:
    """The folder holding the project files: the checkout, or the installed package's ``_data`` folder."""
    if in_checkout():
        return _CHECKOUT
    return Path(str(importlib.resources.files(PACKAGE) / DATA_FOLDER))  # a missing file is named where it is read


def project_file(*parts: str) -> Path:
    """A project file or folder, e.g. ``project_file("notebooks", "vae.ipynb")`` (it may not exist)."""
    return project_root().joinpath(*parts)


def work_root() -> Path:
    """Where outputs go by default: the checkout in a source checkout, else the current directory."""
    return _CHECKOUT if in_checkout() else Path.cwd()
