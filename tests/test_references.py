"""The cited references file (references.yml), its loader and the appendix "The source reports"."""
import json
import re

import pytest

from fmnist_core.core.io import PROJECT_ROOT
from fmnist_core.pipeline import references as refs
from fmnist_core.pipeline.references import ReferencesError, load_references, render_sources

REPORT_NAMES = {
    "semisupvae": "the Semi-SupVAE report",
    "lenet_layerwise_vae": "the LeNet / layer-wise / VAE report",
    "mlp_resnet": "the MLP / ResNet report",
    "cnn_comparison": "the CNN-comparison report",
    "fixmatch": "the FixMatch report",
}
FILE_NUMBER = re.compile(r"seed 00[0-4]", re.IGNORECASE)


def test_the_references_file_loads_with_every_report_and_the_literature():
    loaded = load_references()
    assert loaded.path == PROJECT_ROOT / "references.yml"
    assert {r["key"]: r["name"] for r in loaded.reports} == REPORT_NAMES
    assert {e["key"] for e in loaded.literature} >= {"xiao2017_benchmark", "sohn2020_fixmatch", "kingma2014_m2"}


def test_every_entry_and_figure_has_its_source():
    loaded = load_references()
    for report in loaded.reports:
        assert report["document"].strip() and report["built"].strip()
        for fig in report["figures"]:
            cited = refs.figure(report["key"], fig["key"])
            assert cited.kind == "source report" and cited.where.strip()
            assert report["name"][1:] in cited.citation and cited.where in cited.citation
    for entry in loaded.literature:
        assert entry["citation"].strip()
        for fig in entry["figures"]:
            cited = refs.literature(entry["key"], fig["key"])
            assert cited.kind == "literature" and cited.where.strip()
            assert cited.citation.startswith(" ".join(entry["citation"].split()))


def test_accessors_return_value_and_citation():
    cited = refs.literature("sohn2020_fixmatch/cifar10_40_error_ra")
    assert (cited.value, cited.std) == (13.81, 3.37) and "FixMatch" in cited.citation
    assert cited.text == "13.81 ± 3.37 % error"
    assert refs.literature("kingma2014_m2", "mnist_100_m2_error").value == 11.97
    assert refs.literature("xiao2017_benchmark/resnet18").value == 94.9
    with pytest.raises(ReferencesError, match="several figures"):
        refs.literature("sohn2020_fixmatch")
    with pytest.raises(ReferencesError, match="no source report 'seed'"):
        refs.figure("seed", "test_acc_cnn")


def test_the_semisupvae_evaluation_file_peaks_are_not_test_accuracies():
    peak = refs.figure("semisupvae", "eval_peak_semisupvae")
    cnn_peak = refs.figure("semisupvae", "eval_peak_cnn")
    assert (peak.value, cnn_peak.value) == (90.48, 88.36)
    assert "evaluation file" in peak.description and "not the test set" in peak.description
    test, cnn_test = refs.figure("semisupvae", "test_acc_semisupvae"), refs.figure("semisupvae", "test_acc_cnn")
    assert (test.value, cnn_test.value) == (89.07, 88.83)
    assert "test accuracy" in test.description


def _broken(tmp_path, old, new):
    text = (PROJECT_ROOT / "references.yml").read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "references.yml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


@pytest.mark.parametrize("old, new, entry", [
    ("        where: \"section 1 (introduction)\"\n", "", "source_reports[semisupvae].figures[labels]"),
    ("        value: 89.07\n", "        value: eighty-nine\n", "figures[test_acc_semisupvae]"),
    ("    citation: >-\n      Kihyuk Sohn", "    cite: >-\n      Kihyuk Sohn", "literature[sohn2020_fixmatch]"),
    ("[fig:semisupvae/test_acc_cnn]", "[fig:semisupvae/test_acc_cnnn]", "source_reports[semisupvae]"),
    ("name: the FixMatch report", "name: seed 004", "source_reports[fixmatch]"),
    ("  - key: fixmatch\n", "  - key: semisupvae\n", "key 'semisupvae' appears twice"),
])
def test_a_broken_references_file_gives_one_message_naming_file_and_entry(tmp_path, old, new, entry):
    path = _broken(tmp_path, old, new)
    with pytest.raises(ReferencesError) as err:
        load_references(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and entry in message


def test_unreadable_or_invalid_references_files_are_named(tmp_path):
    missing = tmp_path / "absent.yml"
    with pytest.raises(ReferencesError, match=re.escape(str(missing))):
        load_references(missing)
    bad = tmp_path / "bad.yml"
    bad.write_text("source_reports: [\n  - key: x\n", encoding="utf-8")
    with pytest.raises(ReferencesError, match=re.escape(str(bad)) + ".*not valid YAML"):
        load_references(bad)


def test_the_appendix_names_every_report_and_labels_its_figures():
    text = render_sources()
    for name in REPORT_NAMES.values():
        assert f"## {name[0].upper()}{name[1:]}" in text
    assert not FILE_NUMBER.search(text)
    assert not re.search(r"\[(fig|lit):", text), "an inline citation was left unrendered"
    assert text.count("(source report: as printed in") == len(REPORT_NAMES)
    assert "*Literature:*" in text and "Sohn" in text and "Kingma" in text
    # the correction of the Semi-SupVAE report's headline figures is stated with the figures themselves
    assert "90.48 %" in text and "89.07 %" in text and "evaluation file" in text


def test_the_sources_page_is_in_the_book_and_filled_at_build_time(tmp_path):
    from fmnist_core.pipeline.book import _fill, chapter_pages  # imports every chapter: only this test needs it
    pages = chapter_pages()
    assert pages.index("sources") == pages.index("reproducibility") - 1
    page = (PROJECT_ROOT / "book" / "sources.md").read_text(encoding="utf-8")
    assert "{{sources}}" in page
    filled = _fill(page, "smoke", tmp_path)
    assert "{{sources}}" not in filled and "## The FixMatch report" in filled


def _searched_files():
    yield PROJECT_ROOT / "README.md"
    yield PROJECT_ROOT / "references.yml"
    for folder, patterns in (("book", ("*.md",)), ("notebooks", ("*.ipynb",)), ("fmnist_core", ("*.py", "*.yml"))):
        for pattern in patterns:
            yield from sorted((PROJECT_ROOT / folder).rglob(pattern))


def test_no_report_is_named_by_its_file_number():
    offenders = []
    for path in _searched_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FILE_NUMBER.search(line):
                offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{number}: {line.strip()[:80]}")
    assert not offenders, "reports named by file number:\n" + "\n".join(offenders)


def test_chapters_type_no_source_report_figures_in_their_prose():
    """Quoted figures come from references.yml through the appendix, not typed into markdown cells."""
    quoted = [str(f["value"]) for r in load_references().reports for f in r["figures"]
              if isinstance(f["value"], float) and len(str(f["value"])) >= 5]
    for path in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                assert not [v for v in quoted if v in text], (path.name, text[:80])


def test_the_bibliography_is_generated_from_the_literature_entries_and_checked(tmp_path):
    from pybtex.database import parse_string
    entries = parse_string(refs.bibtex(), "bibtex").entries
    assert set(entries) == {e["key"] for e in load_references().literature}
    assert str(entries["sohn2020_fixmatch"].persons["author"][0]) == "Sohn, Kihyuk"
    text = ((PROJECT_ROOT / "references.yml").read_text(encoding="utf-8")
            .replace("@inproceedings{kingma2014_m2,", "@inproceedings{kingma2014,"))
    bad = tmp_path / "references.yml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ReferencesError, match=r"literature\[kingma2014_m2\]\.bibtex: must hold one BibTeX entry "
                                              r"keyed 'kingma2014_m2', found kingma2014"):
        load_references(bad)
