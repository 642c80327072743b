"""The built book loads nothing from the internet: MathJax comes from a copy shipped with the build.

Sphinx's MathJax extension points every page with formulas at a CDN by default, so a reader without a
connection would see raw TeX. ``_config.yml`` loads this module as a Sphinx extension: it serves MathJax 3 from
the copy that the ``sphinx-mathjax-offline`` package (a dependency of this project) installs, copied into the
book's ``_static/mathjax/``. :func:`external_sources` lists what a built page would still fetch from elsewhere
(the tests fail on any).
"""
from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError

MATHJAX_DIST = "sphinx-mathjax-offline"
MATHJAX_ENTRY = "mathjax/tex-svg.js"  # under _static/: TeX input, SVG output (fonts inside the script)


def mathjax_static_dir() -> Path:
    """The folder holding ``mathjax/`` in the installed ``sphinx-mathjax-offline`` package.

    Raises
    ------
    FmnistBookError
        When the package is not installed (``make setup`` installs it).
    """
    try:
        folder = Path(metadata.distribution(MATHJAX_DIST).locate_file(f"{MATHJAX_DIST}/static"))
    except metadata.PackageNotFoundError:
        folder = None
    if folder is None or not (folder / MATHJAX_ENTRY).is_file():
        raise FmnistBookError(f"the local MathJax copy is missing: the package {MATHJAX_DIST!r} is not installed "
                              "(run `make setup`)")
    return folder


def use_local_mathjax(app, config) -> None:
    """``config-inited`` handler: MathJax from ``_static/mathjax/``, copied there from the installed package."""
    config.mathjax_path = MATHJAX_ENTRY
    config.html_static_path = [*config.html_static_path, str(mathjax_static_dir())]


class _Sources(HTMLParser):
    """Collects the URLs a page loads by itself: scripts, stylesheets, fonts and icons, images, frames, media."""

    LOADED = {"script": ("src",), "img": ("src", "srcset"), "source": ("src", "srcset"), "iframe": ("src",),
              "video": ("src", "poster"), "audio": ("src",), "embed": ("src",), "object": ("data",),
              "input": ("src",)}
    NOT_LOADED = {"canonical", "prev", "next", "index", "search", "alternate", "author", "license", "help"}

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        names = list(self.LOADED.get(tag, ()))
        if tag == "link" and not set((attrs.get("rel") or "").lower().split()) <= self.NOT_LOADED:
            names.append("href")  # stylesheets, fonts, icons, preloads (a page's own navigation links are not)
        for name in names:
            value = attrs.get(name) or ""
            self.found += [part.split()[0] for part in value.split(",") if part.strip()] if "srcset" in name \
                else [value]
        if "style" in attrs:
            self.found += re.findall(r"url\(\s*['\"]?([^'\")]+)", attrs["style"])

    def handle_data(self, data):
        if self.lasttag == "script":  # what an inline script would fetch: scripts, stylesheets, fonts, images
            self.found += re.findall(r"[\"'](\s*(?:https?:)?//[^\"'\s]+\.(?:m?js|css|woff2?|ttf|otf|png|jpe?g|gif|svg))"
                                     r"[\"'?#]", data, re.IGNORECASE)
        if self.lasttag == "style":
            self.found += re.findall(r"url\(\s*['\"]?([^'\")]+)", data)
            self.found += re.findall(r"@import\s+['\"]([^'\"]+)", data)


def external_sources(page: str) -> list[str]:
    """The ``http(s)://`` (or protocol-relative ``//``) URLs that an HTML page loads as it opens.

    Parameters
    ----------
    page : str
        The HTML text of a page.

    Returns
    -------
    list of str
        Script, stylesheet, font, icon, image, frame and media sources outside the book, in page order.
    """
    parser = _Sources()
    parser.feed(page)
    return [url for url in parser.found if re.match(r"\s*(https?:)?//", url, re.IGNORECASE)]


def drop_thebe(app, pagename, templatename, context, doctree) -> None:
    """``html-page-context`` handler: no Thebe scripts (live code from a remote kernel and a CDN; the book has
    no launch buttons), so no page names Thebe's CDN."""
    if "script_files" in context:
        context["script_files"] = [js for js in context["script_files"]
                                   if "thebe" not in (str(js) + str(getattr(js, "attributes", {}).get("body", "")))]


def setup(app) -> dict:
    """Sphinx extension entry point (``sphinx: extra_extensions`` in ``_config.yml``)."""
    app.connect("config-inited", use_local_mathjax)
    app.connect("html-page-context", drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
