"""An executed notebook as a book page shows it: its parameters cells kept but tagged off the page."""
from __future__ import annotations

import json
from pathlib import Path

from fmnist_core.core.io import read_json

READER_HIDDEN = ("parameters", "injected-parameters")


def reader_notebook(notebook: Path, appendix: str = "") -> str:
    """The executed notebook without its parameters cells on the page (papermill's defaults and injected values),
    with the Markdown ``appendix`` (the chapter's downloads) as its last cell.

    A reader never needs them: the appendix "Reproducibility" lists every run's parameters. The cells stay in
    the notebook (tagged ``remove-cell``), so papermill still finds its ``parameters`` tag.
    """
    nb = read_json(notebook)
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(tag in tags for tag in READER_HIDDEN):
            tags[:] = [t for t in tags if t not in ("hide-cell", "hide-input")]
            if "remove-cell" not in tags:
                tags.append("remove-cell")
    if appendix:
        nb["cells"].append({"cell_type": "markdown", "id": "book-downloads", "metadata": {},
                            "source": appendix.splitlines(keepends=True)})
    return json.dumps(nb)
