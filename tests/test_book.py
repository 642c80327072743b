"""End to end: the whole smoke book is built offline from real runs, every chapter with figures and tables."""
import re
import subprocess
from pathlib import Path

import pytest

from fmnist_core.pipeline.book import chapter_pages
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.pipeline.offline import MATHJAX_ENTRY, external_sources

from conftest import CLI, visible_text

# Figures each chapter must show (file names under figures/ of its run).
EXPECTED_FIGURES = {
    "dataset": ["examples", "class_counts", "mean_images", "raw_pixel_embeddings"],
    "classification": ["curves", "confusion", "roc", "error_destinations", "confident_mistakes", "sgd_vs_adam"],
    "layerwise": ["lenet_avg_pca", "lenet_avg_tsne", "lenet_max_tsne", "resnet18_tsne", "separability"],
    "semisupervised": ["accuracy_vs_labels", "alpha_study", "confusion", "voting", "reconstructions", "latent_space"],
    "fixmatch": ["accuracy_vs_labels", "learning_curves", "pseudo_labels", "confusion"],
    "vae": ["loss_curves", "reconstructions", "interpolation_7_9", "samples", "latent_space", "latent_size_study"],
}


def page_text(html_dir: Path, page: str) -> str:
    return (html_dir / f"{page}.html").read_text()


@pytest.mark.slow
def test_every_chapter_page_exists_with_its_figures(smoke_book):
    results, html, stdout = smoke_book
    assert "index.html" in stdout
    for page in chapter_pages():
        text = page_text(html, page)
        assert "<Figure size" not in text, page
        assert "missing from" not in text, page
    for experiment, figures in EXPECTED_FIGURES.items():
        text = page_text(html, experiment)
        images = re.findall(r"<img[^>]+src=\"([^\"]+\.png)\"", text)
        assert len(images) >= len(figures), (experiment, images)
        for figure in figures:
            assert (results / experiment / "figures" / f"{figure}.png").stat().st_size > 1000


@pytest.mark.slow
def test_classification_page_has_its_table_and_glued_numbers(smoke_book):
    _, html, _ = smoke_book
    text = page_text(html, "classification")
    assert "<table" in text and "lenet_avg" in text and "macro F1" in text
    assert re.search(r"LeNet-5 with average pooling reaches\s*(<[^>]+>\s*)*\d+\.\d\d%", text)
    # The smoke profile's budget-limited models are reported apart, with their budget, never ranked.
    shown = visible_text(text)
    apart = shown[shown.index("Models this profile cannot train to convergence", shown.index("Results")):]
    assert "alexnet, resnet18 only the budgets below" in apart and "not recorded yet" in apart


@pytest.mark.slow
def test_results_and_appendix_come_from_the_runs(smoke_book):
    results, html, _ = smoke_book
    table = subprocess.run(CLI + ["--results-dir", str(results.parent), "results", "--profile", "smoke"],
                           capture_output=True, text=True, check=True).stdout
    for model in ("mlp", "lenet_avg", "resnet18", "mycnn-sgd"):
        assert model in table
    appendix = visible_text(page_text(html, "reproducibility"))
    for name in EXPERIMENTS:
        assert f"fmnist-book run {name} --profile smoke" in appendix
    assert appendix.count("numerics: CPU (bit-identical") == len(EXPERIMENTS)


@pytest.mark.slow
def test_a_second_build_uses_the_cache(smoke_book):
    results, _, _ = smoke_book
    rerun = subprocess.run(CLI + ["--results-dir", str(results.parent), "run", "dataset", "--profile", "smoke"],
                           capture_output=True, text=True, check=True).stdout
    assert "up to date" in rerun


@pytest.mark.slow
def test_no_page_of_the_book_loads_anything_from_the_internet(smoke_book):
    _, html, _ = smoke_book
    pages = sorted(html.rglob("*.html"))
    assert len(pages) >= len(chapter_pages())
    outside = {str(p.relative_to(html)): external_sources(p.read_text()) for p in pages}
    assert not {page: urls for page, urls in outside.items() if urls}
    assert (html / "_static" / MATHJAX_ENTRY).stat().st_size > 100_000  # MathJax is served by the book itself
    for page in pages:
        text = page.read_text()
        for src in re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', text, re.IGNORECASE):
            assert src.endswith("_static/" + MATHJAX_ENTRY), (page, src)
    assert "_static/" + MATHJAX_ENTRY in page_text(html, "dataset")  # BokehJS's TeX support, pointed at it


def test_external_sources_finds_every_kind_of_loaded_url_and_ignores_plain_links():
    page = """<html><head>
    <script src="https://cdn.example.org/lib.js"></script><script src="_static/local.js"></script>
    <link rel="stylesheet" href="http://fonts.example.org/css"><link rel="preload" as="font" href="//f.example/x.woff2">
    <link rel="canonical" href="https://example.org/page.html"><link rel="stylesheet" href="_static/book.css">
    <style>@import "https://cdn.example.org/a.css"; body { background: url('https://img.example/b.png') }</style>
    </head><body><img src="HTTPS://img.example/c.png"><img src="figures/d.png" srcset="x.png 1x, https://i.example/e.png 2x">
    <a href="https://example.org/">a link the reader may follow</a><div style="background:url(https://i.example/f.png)"></div>
    <script>const LIB = "https://cdn.example.org/x/lib.min.js"; const NS = "http://www.w3.org/2000/svg";</script>
    </body></html>"""
    assert external_sources(page) == [
        "https://cdn.example.org/lib.js", "http://fonts.example.org/css", "//f.example/x.woff2",
        "https://img.example/b.png", "https://cdn.example.org/a.css", "HTTPS://img.example/c.png",
        "https://i.example/e.png", "https://i.example/f.png", "https://cdn.example.org/x/lib.min.js"]


@pytest.mark.slow
def test_models_at_chance_are_called_so_on_their_pages(smoke_book):
    """The smoke budgets leave models at chance: the pages say so in words, with what would change that."""
    _, html, _ = smoke_book
    for page, remedy in (("classification", "-p epochs N -p train_images N"), ("fixmatch", "-p steps N"),
                         ("semisupervised", "-p label_counts [...]")):
        text = visible_text(page_text(html, page))
        assert "Not learned at this budget." in text, page
        assert "not learned to classify at this budget" in text and remedy in text, page
    fixmatch = visible_text(page_text(html, "fixmatch"))
    assert "from one seed, whose noise this build does not measure" in fixmatch  # the smoke profile's one seed
    assert "up to 3 pixels (10.7 % of the 28-pixel side)" in fixmatch and "up to 12.5" not in fixmatch
    assert "which is why" not in fixmatch
    semisup = visible_text(page_text(html, "semisupervised"))
    assert re.search(r"The Semi-SupVAE.s loss\. Its objective in the last epoch of semisup_vae_n100_s0 .*"
                     r"(dominates it|no single term makes up half of it)\.", semisup)
    assert "0.100000" not in semisup and "10.000000" not in semisup


@pytest.mark.slow
def test_every_chapter_page_links_its_metrics_notebook_and_histories(smoke_book):
    results, html, _ = smoke_book
    for experiment in EXPERIMENTS:
        text = page_text(html, experiment)
        links = dict((Path(href).name, href) for href in re.findall(r'href="(_downloads/[^"]+)"', text))
        assert "metrics.json" in links and f"{experiment}.ipynb" in links, experiment
        assert (html / links["metrics.json"]).read_bytes() == (results / experiment / "metrics.json").read_bytes()
        for csv in results.glob(f"{experiment}/*/*/history.csv"):
            assert (html / links[f"{csv.parent.name}.csv"]).read_bytes() == csv.read_bytes(), csv


@pytest.mark.slow
def test_the_chapters_citations_resolve_to_the_bibliography_page(smoke_book):
    _, html, _ = smoke_book
    bibliography = visible_text(page_text(html, "bibliography"))
    assert "fixmatch: simplifying semi-supervised learning" in bibliography.lower() and "Kingma" in bibliography
    for page, author in (("dataset", "Xiao et al., 2017"), ("fixmatch", "Sohn et al., 2020"),
                         ("semisupervised", "Kingma et al. [2014]")):
        text = page_text(html, page)
        assert re.search(r'href="bibliography\.html#id\d+"', text), page  # a resolved citation links there
        assert author in visible_text(text) and "{cite" not in visible_text(text), page
