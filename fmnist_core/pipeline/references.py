"""The book's one cited references file, ``references.yml``: the source reports' figures and the literature's.

The book types no number into its prose: what a run computed is glued from its results files, and what it quotes
(the five source reports' own figures and published reference figures) comes from ``references.yml`` at the
repository root, each figure with where it comes from. This module loads and checks that file (a mistake is one
:class:`ReferencesError` naming the file and the entry), gives access to single figures with their citation,
and renders the appendix "The source reports" (the ``{{sources}}`` placeholder of ``book/sources.md``).

Text fields of a report (``built``, ``architecture``, ``selection``, ``this_book``) and figure notes may cite
figures inline:
``[fig:<report>/<figure>]`` for a source report's figure and ``[lit:<entry>/<figure>]`` for a published one;
they are checked when the file is loaded and replaced by the formatted value when the appendix is rendered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from fmnist_core.core.config import load_yaml
from fmnist_core.core.errors import FmnistBookError, one_line
from fmnist_core.core.resources import project_file

REFERENCES_PATH = project_file("references.yml")

SECTIONS = ("source_reports", "literature")
REPORT_FIELDS = {"key": True, "name": True, "document": True, "built": True, "architecture": True,
                 "selection": True, "this_book": False, "figures": True}
LITERATURE_FIELDS = {"key": True, "short": True, "citation": True, "note": False, "bibtex": False, "figures": True}
FIGURE_FIELDS = {"key": True, "description": True, "value": True, "unit": True, "where": True, "std": False,
                 "note": False}
TEXT_FIELDS = ("built", "architecture", "selection")
INLINE = re.compile(r"\[(fig|lit):([A-Za-z0-9_]+)/([A-Za-z0-9_]+)\]")
KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# A report is named by what it is, never by the number of the file it came in.
FILE_NUMBER = re.compile(r"seed\s*_?0{0,2}[0-4]\b", re.IGNORECASE)

SOURCE_LABEL = "source report"
LITERATURE_LABEL = "literature"


class ReferencesError(FmnistBookError):
    """``references.yml`` is missing, not YAML, or an entry in it is incomplete or malformed."""


@dataclass(frozen=True)
class Cited:
    """One quoted figure with its origin.

    Attributes
    ----------
    value : float or int
        The figure as printed in its source.
    unit : str
        ``%``, ``% error``, ``fraction``, ``images``, ...
    description : str
        What was measured.
    where : str
        Where in the source it is printed (section, table).
    citation : str
        The source: the report's name and document, or the paper's full citation.
    kind : str
        ``"source report"`` or ``"literature"``.
    source_key : str
        Key of the report or literature entry.
    key : str
        Key of the figure within its entry.
    std : float or None
        The ± printed with it, if any.
    note : str or None
        A caveat recorded with the figure (a mislabel in the source, another value printed elsewhere).
    """

    value: float | int
    unit: str
    description: str
    where: str
    citation: str
    kind: str
    source_key: str
    key: str
    std: float | int | None = None
    note: str | None = None

    @property
    def text(self) -> str:
        """The value as it reads in prose: ``89.07 %``, ``13.81 ± 3.37 % error``, ``0.817``, ``5,000 images``."""
        return format_value(self.value, self.unit, self.std)


@dataclass(frozen=True)
class References:
    """The checked contents of ``references.yml``.

    Attributes
    ----------
    path : Path
        The file they were read from.
    reports : list of dict
        The ``source_reports`` entries, in file order.
    literature : list of dict
        The ``literature`` entries, in file order.
    """

    path: Path
    reports: list
    literature: list

    def report(self, key: str) -> dict:
        """The source report ``key``; :class:`ReferencesError` listing the known keys otherwise."""
        return _find(self.reports, key, "source report", self.path)

    def entry(self, key: str) -> dict:
        """The literature entry ``key``; :class:`ReferencesError` listing the known keys otherwise."""
        return _find(self.literature, key, "literature entry", self.path)

    def figure(self, report_key: str, figure_key: str) -> Cited:
        """A source report's own figure, with the report's name and document as its citation."""
        report = self.report(report_key)
        fig = _find(report["figures"], figure_key, f"figure of {report_key}", self.path)
        return _cited(fig, f"{_capital(report['name'])} ({report['document']}), {fig['where']}", SOURCE_LABEL,
                      report_key)

    def literature_figure(self, key: str, figure_key: str) -> Cited:
        """A published figure, with the full citation of its entry."""
        entry = self.entry(key)
        fig = _find(entry["figures"], figure_key, f"figure of {key}", self.path)
        return _cited(fig, f"{entry['citation']} ({fig['where']})", LITERATURE_LABEL, key)


def _cited(fig: dict, citation: str, kind: str, source_key: str) -> Cited:
    return Cited(value=fig["value"], unit=fig["unit"], description=fig["description"], where=fig["where"],
                 citation=citation, kind=kind, source_key=source_key, key=fig["key"], std=fig.get("std"),
                 note=fig.get("note"))


def _find(entries: list, key: str, what: str, path: Path) -> dict:
    for entry in entries:
        if entry["key"] == key:
            return entry
    known = ", ".join(e["key"] for e in entries)
    raise ReferencesError(f"{path}: no {what} '{key}' (known: {known})")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def format_value(value, unit: str, std=None) -> str:
    """Format a quoted figure as printed in its source, with its ± and unit.

    Parameters
    ----------
    value : int or float
        The figure.
    unit : str
        Its unit; ``fraction`` is written bare, ``%`` and ``% error`` after the number.
    std : int or float, optional
        The ± printed with it.

    Returns
    -------
    str
        For example ``89.07 %``, ``13.81 ± 3.37 % error``, ``0.817`` or ``20,480 steps``.
    """
    def number(v):
        return f"{v:,}" if isinstance(v, int) else repr(float(v))
    text = number(value) + (f" ± {number(std)}" if std is not None else "")
    return text if unit == "fraction" else f"{text} {unit}"


# ----------------------------------------------------------------------------------------------- loading

_CACHE: dict = {}


def load_references(path=None) -> References:
    """Load and check ``references.yml`` (or ``path``).

    Parameters
    ----------
    path : str or Path, optional
        The file to read; the repository's ``references.yml`` by default.

    Returns
    -------
    References
        The checked entries (cached until the file changes).

    Raises
    ------
    ReferencesError
        One message naming the file and the first entry at fault: a missing file, invalid YAML, a missing or
        empty field, a value that is not a number, a duplicate key, an inline citation to an unknown figure, or a
        report named by its file number.
    """
    path = Path(path) if path is not None else REFERENCES_PATH
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ReferencesError(f"{path}: cannot read the references file ({one_line(err)})") from err
    stamp = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if stamp in _CACHE:
        return _CACHE[stamp]
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ReferencesError(f"{path}: not valid YAML ({one_line(err)})") from err
    refs = _check(data, path)
    _CACHE.clear()
    _CACHE[stamp] = refs
    return refs


def _check(data, path: Path) -> References:
    def fail(where: str, problem: str):
        raise ReferencesError(f"{path}: {where}: {problem}")

    if not isinstance(data, dict):
        fail("top level", f"must be a mapping with the sections {', '.join(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        fail("top level", f"unknown section(s) {', '.join(map(str, unknown))}; expected {', '.join(SECTIONS)}")
    for section in SECTIONS:
        if not isinstance(data.get(section), list) or not data[section]:
            fail(section, "missing or empty: a list of entries is expected")
    reports = [_check_entry(e, f"source_reports[{i}]", REPORT_FIELDS, fail)
               for i, e in enumerate(data["source_reports"])]
    literature = [_check_entry(e, f"literature[{i}]", LITERATURE_FIELDS, fail)
                  for i, e in enumerate(data["literature"])]
    for section, entries in (("source_reports", reports), ("literature", literature)):
        _no_duplicates(entries, section, fail)
    for entry in literature:
        if "bibtex" in entry:
            _check_bibtex(entry["bibtex"], entry["key"], f"literature[{entry['key']}].bibtex", fail)
    figures = {("fig", r["key"]): {f["key"] for f in r["figures"]} for r in reports}
    figures.update({("lit", e["key"]): {f["key"] for f in e["figures"]} for e in literature})
    for report in reports:
        where = f"source_reports[{report['key']}]"
        if FILE_NUMBER.search(report["name"]):
            fail(where, f"name '{report['name']}' names the report by a file number; name it by what it is")
        for field in TEXT_FIELDS:
            _check_inline(report[field], f"{where}.{field}", figures, fail)
        for i, item in enumerate(report.get("this_book", [])):
            _check_inline(item, f"{where}.this_book[{i}]", figures, fail)
    for section, entries in (("source_reports", reports), ("literature", literature)):
        for entry in entries:
            for fig in entry["figures"]:
                if fig.get("note"):
                    _check_inline(fig["note"], f"{section}[{entry['key']}].figures[{fig['key']}].note", figures, fail)
    return References(path=path, reports=reports, literature=literature)


def _check_bibtex(text: str, key: str, where: str, fail) -> None:
    """One BibTeX entry, keyed like its ``references.yml`` entry, with an author, a title and a year."""
    from pybtex.database import parse_string
    from pybtex.scanner import PybtexError
    try:
        entries = parse_string(text, "bibtex").entries
    except PybtexError as err:
        fail(where, f"not valid BibTeX ({one_line(err)})")
    if list(entries) != [key]:
        fail(where, f"must hold one BibTeX entry keyed '{key}', found {', '.join(entries) or 'none'}")
    missing = [f for f in ("title", "year") if f not in entries[key].fields]
    if missing or "author" not in entries[key].persons:
        fail(where, f"the BibTeX entry lacks {', '.join(missing + (['author'] if 'author' not in entries[key].persons else []))}")


def bibtex(path=None) -> str:
    """The book's bibliography as a ``.bib`` text: the ``bibtex`` of every literature entry of ``references.yml``
    (the one source; ``fmnist-book build`` writes it as ``references.bib`` beside the pages).

    Parameters
    ----------
    path : str or Path, optional
        Another references file (tests).

    Returns
    -------
    str
    """
    refs = load_references(path)
    header = "% Generated from references.yml by fmnist-book; edit that file, not this one.\n\n"
    return header + "\n\n".join(e["bibtex"].strip() for e in refs.literature if "bibtex" in e) + "\n"


def _check_entry(entry, where: str, fields: dict, fail) -> dict:
    if not isinstance(entry, dict):
        fail(where, "must be a mapping")
    if isinstance(entry.get("key"), str) and entry["key"]:
        where = f"{where.split('[')[0]}[{entry['key']}]"
    _check_fields(entry, where, fields, fail)
    if "this_book" in entry:
        items = entry["this_book"]
        if not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
            fail(f"{where}.this_book", "must be a list of non-empty texts")
    if not isinstance(entry["figures"], list) or not entry["figures"]:
        fail(f"{where}.figures", "missing or empty: every entry quotes at least one figure")
    for i, fig in enumerate(entry["figures"]):
        fig_where = f"{where}.figures[{i}]"
        if not isinstance(fig, dict):
            fail(fig_where, "must be a mapping")
        if isinstance(fig.get("key"), str) and fig["key"]:
            fig_where = f"{where}.figures[{fig['key']}]"
        _check_fields(fig, fig_where, FIGURE_FIELDS, fail)
        for name in ("value", "std"):
            if name in fig and (isinstance(fig[name], bool) or not isinstance(fig[name], (int, float))):
                fail(fig_where, f"'{name}' must be a number, not {fig[name]!r}")
        if "std" in fig and fig["std"] < 0:
            fail(fig_where, "'std' must not be negative")
    _no_duplicates(entry["figures"], f"{where}.figures", fail)
    return entry


def _check_fields(entry: dict, where: str, fields: dict, fail) -> None:
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        fail(where, f"unknown field(s) {', '.join(map(str, unknown))}; expected {', '.join(fields)}")
    for name, required in fields.items():
        if name not in entry:
            if required:
                what = "(where in the source it comes from)" if name == "where" else ""
                fail(where, f"'{name}' is missing {what}".rstrip())
            continue
        if name in ("figures", "this_book", "value", "std"):
            continue
        if not isinstance(entry[name], str) or not entry[name].strip():
            fail(where, f"'{name}' must be a non-empty text")
        if name == "key" and not KEY.match(entry[name]):
            fail(where, f"key '{entry[name]}' must be lower-case letters, digits and underscores")


def _no_duplicates(entries: list, where: str, fail) -> None:
    seen = set()
    for entry in entries:
        if entry["key"] in seen:
            fail(where, f"key '{entry['key']}' appears twice")
        seen.add(entry["key"])


def _check_inline(text: str, where: str, figures: dict, fail) -> None:
    for kind, source, key in INLINE.findall(text):
        if key not in figures.get((kind, source), ()):
            fail(where, f"cites [{kind}:{source}/{key}], which is not a figure of this file")


# ----------------------------------------------------------------------------------------------- access

def figure(report_key: str, figure_key: str, path=None) -> Cited:
    """A source report's own figure.

    Parameters
    ----------
    report_key : str
        Key of the report in ``source_reports`` (``semisupvae``, ``lenet_layerwise_vae``, ``mlp_resnet``,
        ``cnn_comparison``, ``fixmatch``).
    figure_key : str
        Key of the figure within the report.
    path : str or Path, optional
        Another references file (tests).

    Returns
    -------
    Cited
        The value, its unit and ±, and its citation (the report's name, document and the place in it).
    """
    return load_references(path).figure(report_key, figure_key)


def literature(key: str, figure_key: str | None = None, path=None) -> Cited:
    """A published figure.

    Parameters
    ----------
    key : str
        ``"<entry>/<figure>"`` (``"sohn2020_fixmatch/cifar10_40_error_ra"``), or the entry's key alone with
        ``figure_key``, or the entry's key alone when it quotes a single figure.
    figure_key : str, optional
        Key of the figure within the entry.
    path : str or Path, optional
        Another references file (tests).

    Returns
    -------
    Cited
        The value, its unit and ±, and the entry's full citation.
    """
    refs = load_references(path)
    if figure_key is None and "/" in key:
        key, figure_key = key.split("/", 1)
    if figure_key is None:
        figures = refs.entry(key)["figures"]
        if len(figures) != 1:
            raise ReferencesError(f"{refs.path}: literature entry '{key}' quotes several figures; name one of "
                                  f"{', '.join(f['key'] for f in figures)}")
        figure_key = figures[0]["key"]
    return refs.literature_figure(key, figure_key)


# ----------------------------------------------------------------------------------------------- the appendix

def _inline(text: str, refs: References) -> str:
    def replace(match):
        kind, source, key = match.groups()
        cited = refs.figure(source, key) if kind == "fig" else refs.literature_figure(source, key)
        return cited.text
    return INLINE.sub(replace, " ".join(text.split()))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _figure_table(figures: list, header: str, refs: References) -> list[str]:
    lines = [f"| figure | value | {header} |", "|---|---|---|"]
    notes = []
    for fig in figures:
        mark = ""
        if fig.get("note"):
            notes.append(fig)
            mark = f" (note {len(notes)})"
        value = format_value(fig["value"], fig["unit"], fig.get("std"))
        lines.append(f"| {_cell(fig['description'])}{mark} | {_cell(value)} | {_cell(fig['where'])} |")
    lines.append("")
    for i, fig in enumerate(notes, 1):
        lines.append(f"Note {i}: {_inline(fig['note'], refs)}")
        lines.append("")
    return lines


def render_sources(path=None) -> str:
    """The appendix "The source reports" as Markdown (the ``{{sources}}`` placeholder of ``book/sources.md``).

    For each source report: the document, what it built, its architecture and model selection, a table of its
    own figures labelled as the report's (not computed by this book), and what this book does differently; then
    the published figures with their full citations, labelled as literature.

    Parameters
    ----------
    path : str or Path, optional
        Another references file (tests).

    Returns
    -------
    str
        MyST Markdown, starting with a level-2 heading.
    """
    refs = load_references(path)
    out: list[str] = []
    for report in refs.reports:
        out += [f"## {_capital(report['name'])}", "",
                f"*Document:* {' '.join(report['document'].split())}", "",
                f"**What it built.** {_inline(report['built'], refs)}", "",
                f"**Architecture.** {_inline(report['architecture'], refs)}", "",
                f"**Model selection.** {_inline(report['selection'], refs)}", "",
                f"**Its figures** ({SOURCE_LABEL}: as printed in {report['name']}, not computed by this book):", ""]
        out += _figure_table(report["figures"], "where in the report", refs)
        if report.get("this_book"):
            out += ["**What this book corrects or does differently.**", ""]
            out += [f"- {_inline(item, refs)}" for item in report["this_book"]]
            out.append("")
    out += ["## Published reference figures", "",
            f"Figures from the {LITERATURE_LABEL}, quoted for comparison; none was computed by this book.", ""]
    for entry in refs.literature:
        citation = " ".join(entry["citation"].split())
        out += [f"### {entry['short']}", "", f"*{LITERATURE_LABEL.capitalize()}:* {citation}", ""]
        if entry.get("note"):
            out += [" ".join(entry["note"].split()), ""]
        out += _figure_table(entry["figures"], "where in the source", refs)
    return "\n".join(out).rstrip() + "\n"
