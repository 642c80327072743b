"""No setting is chosen on the test set: checkpoints are selected on validation, the tuning script reads only
validation figures, and the profiles report seeds that no setting was chosen on."""
import ast
import re
from pathlib import Path

import pytest

from fmnist_core.core.config import TUNING_SEEDS
from fmnist_core.pipeline.runner import load_profiles

ROOT = Path(__file__).resolve().parents[1]
TUNED_STUDIES = ("fixmatch", "semisupervised")  # the studies whose profile settings bench/tune.py chooses


def test_every_checkpoint_selection_reads_a_validation_figure():
    keys = []
    for path in (ROOT / "fmnist_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Selection":
                assert node.args and isinstance(node.args[0], ast.Constant), f"{path}: Selection without a key"
                keys.append((path.name, node.args[0].value))
    assert len(keys) >= 3  # the classifiers, the VAE and the semi-supervised models
    assert all(key.startswith("val_") for _, key in keys), keys


def test_the_tuning_script_reads_only_validation_figures():
    source = (ROOT / "bench" / "tune.py").read_text()
    tree = ast.parse(source)
    read = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "READ" for t in node.targets))
    fields = ast.literal_eval(read)
    assert fields and all(f.startswith("val_") for f in fields)
    code = "\n".join(line.split("#")[0] for line in source.split('"""', 2)[2].splitlines())  # no docstring
    assert not re.search(r"test", code), "bench/tune.py's code names a test figure"


@pytest.mark.parametrize("profile", ["quick", "standard", "paper"])
@pytest.mark.parametrize("study", TUNED_STUDIES)
def test_profiles_report_seeds_never_used_for_tuning(profile, study):
    params = load_profiles()[profile]["experiments"].get(study) or {}
    seeds = params.get("seeds", [0])
    assert not set(seeds) & set(TUNING_SEEDS), f"{profile}.{study} reports seeds {seeds}, tuned on {TUNING_SEEDS}"


def test_the_fixmatch_page_statement_names_the_split_and_seeds():
    from fmnist_core.chapters.fixmatch.study import profile_params, protocol, selection_statement
    params = profile_params("quick")
    assert f"validation split of {params['val_size']:,}" in protocol(params)
    text = selection_statement(params)
    assert "never used to choose a setting" in text and str(params["seeds"][0]) in text
    assert "biased" in selection_statement({**params, "seeds": [0, 10]})
