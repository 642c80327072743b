"""``jupyter-book build .`` at the repository root: the book of the profile that ``fmnist-book build`` built last.

The book's pages are not at the root: ``fmnist-book build`` assembles them from the runs' results into
``<output>/source`` (``_build/<profile>/source`` by default) and records that folder in ``last-book.json`` beside
its output folder (``_build/last-book.json`` by default). ``_config.yml`` loads this module as a Sphinx extension;
when the folder being built does not hold the book's first page (the repository root), it builds the recorded
pages instead — into the root's ``_build/html`` as usual — or, when no book has been built, stops at once with one
line saying what to run first. The root's other folders (``.venv/``, ``results/``, ...) are never read.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import read_json, write_json

LAST_BOOK = "last-book.json"
PAGE_SUFFIXES = (".md", ".ipynb")


def record_last_book(output_dir: Path, profile: str, source: Path) -> Path:
    """Record ``source`` (an assembled book of ``profile``) in ``last-book.json`` beside ``output_dir``."""
    record = Path(output_dir).parent / LAST_BOOK
    return write_json(record, {"profile": profile, "source": os.path.relpath(source, record.parent)})


def last_book_source(root: Path) -> Path:
    """The assembled pages of the last book built under ``root`` (``root/_build/last-book.json``).

    Raises
    ------
    FmnistBookError
        When no book has been built there, or its pages have been removed since.
    """
    record = Path(root) / "_build" / LAST_BOOK
    first = "run `fmnist-book build --profile quick` (or another profile) first"
    if not record.is_file():
        raise FmnistBookError(f"no book has been built here yet; its pages are assembled from run results: {first}")
    info = read_json(record)
    source = (record.parent / info["source"]).resolve()
    if not source.is_dir():
        raise FmnistBookError(f"the pages of the last {info['profile']!r} book ({source}) are gone: {first}")
    return source


def _toc_path(app) -> Path:
    path = Path(str(app.config["external_toc_path"]))
    return path if path.is_absolute() else Path(app.srcdir) / path


def _holds_first_page(folder: Path, toc: Path) -> bool:
    first = yaml.safe_load(toc.read_text(encoding="utf-8"))["root"]
    return any((folder / f"{first}{suffix}").is_file() for suffix in PAGE_SUFFIXES)


def use_last_book(app, config) -> None:
    """``config-inited`` handler: at the repository root, build the last assembled book's pages instead."""
    srcdir, toc = Path(app.srcdir), _toc_path(app)
    if _holds_first_page(srcdir, toc):
        return  # an assembled book (``fmnist-book build``) or a folder that holds its own pages
    try:
        source = last_book_source(srcdir)
    except FmnistBookError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    app.srcdir = type(app.srcdir)(source)  # Sphinx lists the documents of app.srcdir after this event
    config.external_toc_path = str(toc)
    if "bibtex_bibfiles" in config:  # the bibliography written beside the assembled pages (references.bib)
        config.bibtex_bibfiles = [str(source / name) for name in config.bibtex_bibfiles]


def setup(app) -> dict:
    """Sphinx extension entry point (``sphinx: extra_extensions`` in ``_config.yml``)."""
    app.connect("config-inited", use_last_book, priority=100)  # before sphinx-external-toc reads the toc (900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
