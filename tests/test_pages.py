"""Pages for readers: results at a glance, the explorable t-SNE maps, and no parameters or import cells on the pages."""
import json
import re
import subprocess

import numpy as np
import pytest

from fmnist_core.core import interactive
from fmnist_core.core.io import read_json
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.pipeline.runner import notebook_path
from fmnist_core.pipeline.summary import RECORDED_LABEL, format_glance, glance_rows, render_glance

from conftest import CLI, visible_text

CLASSES = [f"class {c}" for c in range(10)]
PREDICTED = "predicted: (?:<|&lt;)b(?:>|&gt;)@pred"  # the hover template, as Bokeh stores it in the page


def thumbs_in(page: str) -> int:
    """Thumbnails in an interactive figure's data (BokehJS itself carries a few PNG icons)."""
    from bokeh.resources import Resources
    library = Resources(mode="inline", components=interactive.BOKEH_COMPONENTS).render_js()
    return page.count("data:image/png;base64,") - library.count("data:image/png;base64,")


def tiny_map(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 255, (n, 1, 28, 28), dtype=np.uint8)
    return rng.normal(size=(n, 2)), labels, images


# ----------------------------------------------------------------------------------------------- interactive maps

def test_the_interactive_figure_is_self_contained_with_thumbnails_and_a_hiding_legend():
    xy, labels, images = tiny_map()
    page = interactive.embedding_html({"t-SNE": xy}, labels, CLASSES, images)
    assert "<script" in page and not re.search(r"<script[^>]+src=", page)
    assert "http://" not in page.split("<script", 1)[0] and "cdn.bokeh.org" not in page
    assert thumbs_in(page) == 60
    assert re.search(r'"click_policy"\s*:\s*"hide"', page)
    assert all(name in page for name in CLASSES)
    assert not re.search(PREDICTED, page) and "all 60 points" in page


def test_predictions_show_per_tab_and_large_maps_are_subsampled_by_class():
    xy, labels, images = tiny_map(200)
    page = interactive.embedding_html({"a": xy, "b": xy[::-1]}, labels, CLASSES, images, {"b": labels[::-1]},
                                      max_points=50)
    assert re.search(PREDICTED + "1", page) and not re.search(PREDICTED + "0", page)
    assert thumbs_in(page) == 50 and "50 of the 200 points" in page
    idx = interactive.subsample(labels, 50, seed=0)
    assert len(idx) == 50 and np.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    with pytest.raises(ValueError, match="expected \\(200, 2\\)"):
        interactive.embedding_html({"a": xy[:10]}, labels, CLASSES, images)


def test_thumbnails_are_pngs_of_grey_and_rgb_images():
    grey = interactive.thumbnails(np.zeros((2, 28, 28), np.uint8))
    rgb = interactive.thumbnails(np.zeros((1, 3, 32, 32), np.uint8))
    assert len(grey) == 2 and all(u.startswith("data:image/png;base64,iVBOR") for u in grey + rgb)
    with pytest.raises(ValueError, match="uint8"):
        interactive.thumbnails(np.zeros((1, 28, 28), np.float32))


# ----------------------------------------------------------------------------------------------- results at a glance

def test_the_glance_table_without_runs_says_how_to_run_and_labels_what_it_quotes(tmp_path):
    page = render_glance("smoke", tmp_path / "results", root=tmp_path)
    assert "fmnist-book run fixmatch --profile smoke" in page
    assert "Published reference (literature)" in page and "its own figures, as printed: source report" in page
    assert "13.81 ± 3.37 % error" in page and "Sohn et al. 2020 (literature): Kihyuk Sohn" in page
    assert "94.9 %" in page and "the MLP / ResNet report" in page
    assert RECORDED_LABEL.capitalize() not in page and "No results of the `standard` profile are recorded" in page
    assert not re.search(r"seed\s*_?0{0,2}[0-4]\b", page, re.IGNORECASE)


def test_recorded_standard_results_form_their_own_labelled_column(tmp_path):
    recorded = tmp_path / "reference" / "standard" / "dataset"
    recorded.mkdir(parents=True)
    (recorded / "metrics.json").write_text(json.dumps(
        {"train_images": 60000, "test_images": 10000, "pca_explained_variance_ratio": [0.25, 0.125]}))
    (recorded / "env.json").write_text(json.dumps(
        {"device": "cuda (NVIDIA H200)", "finished_at": "2026-12-01T10:00:00", "git_commit": "0123456789abcdef",
         "params": {"dataset": "fashion_mnist", "embed_images": 2000}}))
    rows = {row.experiment: row for row in glance_rows("smoke", tmp_path / "results", root=tmp_path)}
    assert rows["dataset"].recorded[1] == "raw pixels, 2 PCA components: 37.5 % of the variance"
    assert rows["dataset"].recorded[-1] == "(cuda (NVIDIA H200), 2026-12-01, commit 0123456789)"
    assert rows["classification"].recorded is None and rows["dataset"].this_build is None
    page = render_glance("smoke", tmp_path / "results", root=tmp_path)
    assert RECORDED_LABEL.capitalize() in page and "not recorded" in page and "No results of" not in page
    assert "recorded, standard profile:" in format_glance("smoke", tmp_path / "results", root=tmp_path)


# ----------------------------------------------------------------------------------------------- parameters cells

def test_parameters_and_setup_cells_are_tagged_off_the_page_and_papermill_still_finds_its_tag():
    for experiment in EXPERIMENTS:
        cells = [c for c in read_json(notebook_path(experiment))["cells"] if c["cell_type"] == "code"]
        tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1 and "remove-cell" in tagged[0]["metadata"]["tags"], experiment
        for cell in cells:
            imports = re.findall(r"^(?:import|from) \S+", "".join(cell["source"]), re.MULTILINE)
            if imports:  # every import sits in the setup cell, which the page leaves out
                assert "remove-cell" in cell["metadata"]["tags"], (experiment, cell["id"], imports)


# ----------------------------------------------------------------------------------------------- the built book

def metric_numbers(results):
    """Headline numbers of the smoke runs, formatted as the table prints them."""
    cls = read_json(results / "classification" / "metrics.json")
    fix = read_json(results / "fixmatch" / "metrics.json")
    data = read_json(results / "dataset" / "metrics.json")
    best = cls["best_model"]
    return [f"{best} (best on validation): {100 * cls['models'][best]['accuracy']:.1f} % test accuracy",
            f"fixmatch @ {fix['study'][0]['num_labels']} labels: {100 * fix['study'][0]['test_accuracy']:.1f} %",
            f"{data['train_images']:,} training / {data['test_images']:,} test images"]


@pytest.mark.slow
def test_the_glance_page_shows_this_builds_numbers_beside_the_labelled_literature(smoke_book):
    results, html, _ = smoke_book
    page = (html / "glance.html").read_text()
    text = " ".join(visible_text(page).split())
    assert "<table" in page and "fmnist-glance" in page
    for number in metric_numbers(results):
        assert number in text, number
    assert "Published reference (literature)" in text and "13.81 ± 3.37 % error" in text
    assert "Sohn et al. 2020 (literature): Kihyuk Sohn" in text and "the FixMatch report" in text
    assert "no finished run" not in text
    assert (html / "_static" / "fmnist-book.css").exists() and "fmnist-book.css" in page


@pytest.mark.slow
def test_results_summary_prints_the_same_numbers(smoke_book):
    results, _, _ = smoke_book
    out = subprocess.run(CLI + ["--results-dir", str(results.parent), "results", "--summary", "--profile", "smoke"],
                         capture_output=True, text=True, check=True).stdout
    for number in metric_numbers(results):
        assert number in out, number
    assert "literature:" in out and "source report:" in out and "budget:" in out and "Sources:" in out


@pytest.mark.slow
def test_the_embedding_chapters_carry_an_offline_interactive_map(smoke_book):
    _, html, _ = smoke_book
    for page_name, predicted in (("dataset", False), ("layerwise", True)):
        page = (html / f"{page_name}.html").read_text()
        assert "fmnist-interactive" in page and "Bokeh" in page, page_name
        assert not re.search(r"<script[^>]*src=\"https?:", page), page_name
        assert thumbs_in(page) > 0 and bool(re.search(PREDICTED, page)) == predicted, page_name


@pytest.mark.slow
def test_pages_show_no_parameters_or_import_cells(smoke_book):
    _, html, _ = smoke_book
    for experiment in EXPERIMENTS:
        page = (html / f"{experiment}.html").read_text()
        text = visible_text(page)
        assert "Parameters (the runner injects" not in text and "run_dir = " not in text, experiment
        assert "from fmnist_core" not in text and not re.search(r"^\s*import \w", text, re.MULTILINE), experiment
        assert "Show code cell content" not in text, experiment
        assert "PosixPath(" not in text, experiment  # a figure call's return value is not printed
