"""Bad user input, generated: every mistake is refused before any work with one ``error:`` line that names it,
exit status 2 and no traceback, and nothing is written: an existing results folder stays the same byte for byte.

Each generated case is wrong by construction (a name that is no parameter, a value of a type the parameter
does not take, a value outside its range, bytes that are no image array), so the expected refusal never comes
from the code under test.
"""
import dataclasses
import functools
import gzip
import io
import json
import pickle
import re
import string
import tempfile
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

from fmnist_core.chapters import classification as classify
from fmnist_core.pipeline import cli
from fmnist_core.core import data
from fmnist_core.pipeline import runner
from fmnist_core.core.config import load_yaml, parse_cli_value
from fmnist_core.core.errors import ConfigError
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.chapters.fixmatch.algorithm import FixMatchConfig
from fmnist_core.chapters.semisupervised.model import SemiSupConfig

# capsys is drained by readouterr() in every example, so one capsys serves all examples of a test; no example
# database, so that running the tests leaves nothing in the working tree. A command costs about 0.07 s (the
# profile file is read and validated, or a checkpoint loaded), which bounds the example counts.
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
PER_EXPERIMENT = settings(SETTINGS, max_examples=10)  # for tests run once for each of the six experiments

PROFILES = sorted(runner.load_profiles())
FASHION_MNIST_TRAIN, CIFAR10_TRAIN = 60_000, 50_000

# Text a user could type: any character but NUL (no command line holds one) and lone surrogates.
words = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code, err, *names):
    """Exit status 2 and one ``error:`` line, no traceback, containing each of ``names``."""
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, (name, err)


def snapshot(root: Path) -> dict:
    """Every file (its bytes) and folder (``None``) under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@contextmanager
def nothing_written(folder: Path):
    """Assert that the block leaves ``folder`` byte for byte as it was, and adds nothing beside it."""
    before, around = snapshot(folder), sorted(folder.parent.iterdir())
    yield
    assert snapshot(folder) == before
    assert sorted(folder.parent.iterdir()) == around


@pytest.fixture(scope="module", autouse=True)
def no_notebook_runs():
    """Should a bad input ever be accepted, the run fails (and the test with it) instead of executing a notebook."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input was accepted and a notebook was about to run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "execute_notebook", refuse)
        yield


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder with finished-looking runs of every experiment in two profiles, an interrupted run
    and a recorded failure: what a refused command must leave exactly as it was."""
    results = tmp_path_factory.mktemp("bad_input") / "results"
    for profile in ("quick", "smoke"):
        for experiment in EXPERIMENTS:
            run = results / profile / experiment
            (run / "models" / "m").mkdir(parents=True)
            (run / "env.json").write_text(json.dumps({"key": f"{profile}/{experiment}"}))
            (run / "metrics.json").write_text(json.dumps({"summary": []}))
            (run / "models" / "m" / "best.pt").write_bytes(bytes(range(256)))
    (results / "quick" / "vae.partial").mkdir()
    (results / "quick" / "vae.partial" / "run.json").write_text(json.dumps({"key": "interrupted"}))
    (results / "quick" / "fixmatch.failed.json").write_text(json.dumps({"error": "an earlier failure"}))
    return results


# ----------------------------------------------------------------------- fmnist-book run -p NAME VALUE
def parameters(experiment: str) -> dict:
    """Name -> type of every parameter of ``experiment``."""
    config = EXPERIMENTS[experiment].config
    hints = typing.get_type_hints(config)
    return {f.name: hints[f.name] for f in dataclasses.fields(config)}


ARGPARSE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse takes other words starting with '-' for options


def typed(value) -> str | None:
    """``value`` as the YAML a user types after ``-p NAME``; ``None`` where no such text reads back as ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()
    text = text.removesuffix("...").strip()  # the end-of-document marker after a bare scalar
    if text.startswith("-") and not ARGPARSE_NUMBER.match(text):
        return None
    return text if repr(parse_cli_value(text)) == repr(value) else None


whole = st.integers(-10**9, 10**9)
halves = st.integers(-10**6, 10**6).map(lambda i: i + 0.5)  # floats that no int parameter takes
KINDS = {int: whole, float: halves, bool: st.booleans(), str: words, type(None): st.none(),
         list: st.lists(whole | words, max_size=3), dict: st.dictionaries(words, whole, max_size=2)}
ACCEPTS = {int: {int}, float: {int, float}, bool: {bool}, str: {str}, dict: {dict}, list: {list}}


def wrong_type(hint):
    """Values of every YAML kind that ``hint`` does not take; for ``list[X]`` also lists holding no X."""
    origin = typing.get_origin(hint) or hint
    choices = [strategy for kind, strategy in KINDS.items() if kind not in ACCEPTS[origin]]
    if origin is list:
        (element,) = typing.get_args(hint)
        choices.append(st.lists(wrong_type(element), min_size=1, max_size=3))
    return st.one_of(choices)


@st.composite
def misspelt(draw, names):
    """A parameter name with one typo: a character dropped, doubled, swapped with the next or replaced, or
    the name in capitals."""
    name = draw(st.sampled_from(sorted(names)))
    i = draw(st.integers(0, len(name) - 1))
    other = draw(st.sampled_from(string.ascii_lowercase + "_"))
    return draw(st.sampled_from([name[:i] + name[i + 1:], name[:i + 1] + name[i:],
                                 name[:i] + name[i + 1:i + 2] + name[i] + name[i + 2:],
                                 name[:i] + other + name[i + 1:], name.upper()]))


def below(limit):
    return st.integers(-10**9, limit - 1)


def above(limit):
    return st.integers(limit + 1, 10**9)


def thousandths(low, high):
    """Floats from ``low`` to ``high`` in steps of 0.001: exact as decimal text, so the CLI reads this value."""
    return st.integers(round(low * 1000), round(high * 1000)).map(lambda i: i / 1000)


BIG = 10**6
negative = thousandths(-BIG, -0.001)
not_positive = thousandths(-BIG, 0)
outside_unit = negative | thousandths(1, BIG)  # outside [0, 1)
KNOWN_VALUES = {"adam", "sgd", "cosine", "step", "constant", "auto", "cpu", "cuda", "float32", "bfloat16",
                "fashion_mnist", "cifar10", "lfw", "smallcnn", "wrn28_2", "bce", "mse", "report", "deep", "",
                *classify.ALL_MODELS}
unknown_word = words.filter(lambda w: w not in KNOWN_VALUES)

# Values of the right type that every experiment having the parameter must refuse, by its help text.
OUT_OF_RANGE = {
    "epochs": below(1), "batch_size": below(1), "eval_batch_size": below(1), "lr": not_positive,
    "momentum": outside_unit, "weight_decay": negative, "label_smoothing": outside_unit, "train_images": below(0),
    "seed": below(0), "split_seed": below(0),
    "optimizer": unknown_word, "schedule": unknown_word, "device": unknown_word, "dtype": unknown_word,
    "dataset": unknown_word, "backbone": unknown_word, "recon_loss": unknown_word, "architecture": unknown_word,
    "sgd_model": unknown_word, "models": st.just([]),
    "val_size": below(1), "test_images": below(0), "embed_images": below(1), "perplexity": not_positive,
    "n_jobs": below(1), "tsne_iter": below(1), "per_class": below(1) | above(1000),
    "examples_per_class": below(1) | above(50), "tta": below(0), "throughput_batch": below(1),
    "latency_repeats": below(1), "sgd_lr": not_positive,
    "latent_dim": below(1), "beta": negative, "kl_warmup_epochs": below(0), "channels": below(1),
    "study_epochs": below(1), "interpolation_steps": below(9), "samples": below(1),
    "latent_sizes": st.lists(below(1), min_size=1, max_size=3),
    "alpha": negative, "alpha_study": st.lists(negative, min_size=1, max_size=3), "dropout": outside_unit, "kl_weight": negative, "class_weight": negative,
    "unlabeled_ratio": below(1), "branch_channels": st.lists(st.integers(1, 64), max_size=5).filter(
        lambda b: len(b) != 2) | st.tuples(below(1), st.integers(1, 64)).map(list),
    "label_counts": st.just([]) | st.lists(below(0), min_size=1, max_size=3),
    "seeds": st.just([]) | st.lists(below(0), min_size=1, max_size=3),
    "tta_copies": st.lists(below(0), min_size=1, max_size=3), "ceiling_labels": below(0),
    "steps": below(1), "mu": below(1), "threshold": not_positive | thousandths(1.001, BIG), "lambda_u": negative,
    "ema_decay": outside_unit, "log_every": below(1), "eval_every": below(0), "checkpoint_every": below(1),
    "eval_images": below(0),
}

# Values that parameter validation once let through and that made a run fail deep inside its notebook
# (NumPy refuses negative seeds, the VAE would sample 2,000 test images of each class, an unknown dataset or
# device was refused only when the data or model was loaded): now refused up front, kept as regressions.
ONCE_FAILING_INSIDE_A_RUN = [("dataset", "seed", -1), ("classification", "seed", -1), ("layerwise", "seed", -1),
                             ("vae", "seed", -1), ("classification", "split_seed", -1), ("vae", "split_seed", -1),
                             ("classification", "sgd_lr", 0.0), ("vae", "embed_images", 20000),
                             ("classification", "dataset", "mnist"), ("layerwise", "device", "gpu")]
RANGED = [(experiment, name) for experiment in EXPERIMENTS for name in parameters(experiment) if name in OUT_OF_RANGE]


def run_with_parameter(capsys, results, data, experiment: str, name: str, value) -> tuple[int, str]:
    """``run EXPERIMENT --profile <drawn> -p NAME <value as typed>``, checked to write nothing; (code, stderr)."""
    text = typed(value)
    assume(text is not None)
    profile = data.draw(st.sampled_from(PROFILES))
    with nothing_written(results):
        code, _, err = run_cli(capsys, "--results-dir", results, "run", experiment, "--profile", profile,
                               "-p", name, text)
    return code, err


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@PER_EXPERIMENT
@given(data=st.data())
def test_run_refuses_an_unknown_parameter(capsys, results, experiment, data):
    names = parameters(experiment)
    name = data.draw((misspelt(names) | words).filter(lambda n: n and n not in names and not n.startswith("-")))
    with nothing_written(results):
        code, _, err = run_cli(capsys, "--results-dir", results, "run", experiment, "-p", name, "1")
    assert_refused(code, err, f"unknown parameter {name!r}")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@PER_EXPERIMENT
@given(data=st.data())
def test_run_refuses_a_value_of_the_wrong_type(capsys, results, experiment, data):
    name, hint = data.draw(st.sampled_from(sorted(parameters(experiment).items())))
    code, err = run_with_parameter(capsys, results, data, experiment, name, data.draw(wrong_type(hint)))
    assert_refused(code, err, f"parameter {name!r} must be")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@PER_EXPERIMENT
@given(data=st.data())
def test_run_refuses_a_value_out_of_range(capsys, results, experiment, data):
    name = data.draw(st.sampled_from([n for e, n in RANGED if e == experiment]))
    code, err = run_with_parameter(capsys, results, data, experiment, name, data.draw(OUT_OF_RANGE[name]))
    assert_refused(code, err, f"parameter {name!r}")


def test_every_range_rule_applies_to_some_experiment():
    """A parameter renamed in a config must not silently drop out of the range test."""
    assert {name for _, name in RANGED} >= set(OUT_OF_RANGE)


@pytest.mark.parametrize("experiment, name, value", ONCE_FAILING_INSIDE_A_RUN)
def test_values_that_once_failed_only_inside_a_run_are_refused_up_front(experiment, name, value):
    try:
        runner.resolve_params(experiment, "quick", {name: value})
    except ConfigError as err:
        assert repr(name) in str(err)
    else:
        raise AssertionError(f"{experiment}: {name} = {value!r} was accepted")


# ---------------------------------------------------------------------------------------- the profile file
def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def load_refused(path: Path) -> str:
    """The message of the ``ConfigError`` that ``load_profiles`` must raise (any other exception fails)."""
    with pytest.raises(ConfigError) as info:
        runner.load_profiles(path)
    return str(info.value)


profile_names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
experiment_names = st.sampled_from(sorted(EXPERIMENTS))
not_a_mapping = st.one_of(whole, halves, st.booleans(), words, st.lists(whole | words, max_size=3))


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("profiles")


@SETTINGS
@given(content=st.one_of(not_a_mapping.map(yaml.safe_dump),
                         st.sampled_from(["", "\n", "   \n", "---\n", "# no profiles yet\n"])))
def test_a_profile_file_that_is_no_mapping_is_refused_naming_the_file(profile_dir, content):
    path = write(profile_dir / "profiles.yml", content)
    assert f"{path}: must map profile names" in load_refused(path)


@SETTINGS
@given(name=profile_names, settings_=st.one_of(
    st.none(), st.dictionaries(st.sampled_from(["description", "experiment", "Experiments"]), words, max_size=2),
    st.fixed_dictionaries({"experiments": not_a_mapping | st.none()})))
def test_a_profile_without_an_experiments_mapping_is_refused(profile_dir, name, settings_):
    path = write(profile_dir / "profiles.yml", yaml.safe_dump({name: settings_}))
    message = load_refused(path)
    assert str(path) in message and f"profile {name!r}" in message and "'experiments' mapping" in message


@SETTINGS
@given(name=profile_names, experiment=experiment_names, data=st.data())
def test_unknown_parameters_and_wrong_types_in_a_profile_are_refused_naming_file_profile_and_parameter(
        profile_dir, name, experiment, data):
    known = parameters(experiment)
    if data.draw(st.booleans(), label="unknown name"):
        parameter = data.draw((misspelt(known) | words).filter(lambda n: n not in known))
        value, expected = 1, f"unknown parameter {parameter!r}"
    else:
        parameter = data.draw(st.sampled_from(sorted(known)))
        value, expected = data.draw(wrong_type(known[parameter])), f"parameter {parameter!r} must be"
    content = yaml.safe_dump({name: {"experiments": {experiment: {parameter: value}}}})
    assume(load_yaml(content)[name]["experiments"][experiment] == {parameter: value})  # read back as written
    path = write(profile_dir / "profiles.yml", content)
    message = load_refused(path)
    assert f"{path.name}: {name}.{experiment}" in message and expected in message


@SETTINGS
@given(name=profile_names, experiment=experiment_names, entry=not_a_mapping)
def test_an_experiment_entry_that_is_no_mapping_is_refused(profile_dir, name, experiment, entry):
    assume(entry not in ("", 0, False, []))  # empty entries mean "the defaults"
    path = write(profile_dir / "profiles.yml", yaml.safe_dump({name: {"experiments": {experiment: entry}}}))
    message = load_refused(path)
    assert f"{path.name}: {name}.{experiment}" in message and "must map parameter names to values" in message


@SETTINGS
@given(name=profile_names, experiment=st.one_of(words, whole).filter(lambda e: e not in EXPERIMENTS))
def test_an_unknown_experiment_in_a_profile_is_refused(profile_dir, name, experiment):
    path = write(profile_dir / "profiles.yml", yaml.safe_dump({name: {"experiments": {experiment: {}}}}))
    assert f"unknown experiment {str(experiment)!r}" in load_refused(path)  # keys are names, read as written


BROKEN_YAML = ["  experiments: [dataset\n", "x: 'unterminated\n", "\tdataset: {}\n", "a: b: c\n", "- [\n",
               "{dataset: \n", "quick: &a\n  *b\n", "  ? [\n", "key: \"\\q\"\n", "@reserved\n"]


@SETTINGS
@given(name=profile_names, experiment=experiment_names, broken=st.sampled_from(BROKEN_YAML), where=st.integers(0, 4))
def test_yaml_syntax_errors_are_refused_naming_the_file(profile_dir, name, experiment, broken, where):
    lines = yaml.safe_dump({name: {"description": "x", "experiments": {experiment: {"seed": 1}}}}).splitlines(True)
    content = "".join(lines[:where] + [broken] + lines[where:])
    try:
        yaml.safe_load(content)
    except yaml.YAMLError:
        pass
    else:
        assume(False)  # this insertion happens to be valid YAML
    path = write(profile_dir / "profiles.yml", content)
    assert f"{path}: cannot read the profile file" in load_refused(path)


@pytest.mark.parametrize("content", ["quick: 3\n", "quick: [dataset]\n", "quick: just text\n",
                                     b"\xff\xfe quick: {}\n", "quick:\n  experiments:\n    clasification: {}\n"])
def test_every_profile_file_mistake_is_a_config_error_naming_the_file(tmp_path, content):
    path = write(tmp_path / "profiles.yml", content)
    assert str(path.name) in load_refused(path)


# ------------------------------------------------------------------------- names that leave the results
escaping = st.one_of(
    st.lists(st.sampled_from(["..", ".", "", "quick", "dataset", "results", "tmp", "etc"]), min_size=2,
             max_size=5).map("/".join),
    words.map(lambda w: "../" + w), words.map(lambda w: "/" + w), words,
).filter(lambda n: n and not n.startswith("-"))


@SETTINGS
@given(name=escaping, command=st.sampled_from(["run NAME", "run dataset --profile NAME", "results --profile NAME",
                                                "status --profile NAME", "build --profile NAME"]))
def test_experiment_and_profile_names_cannot_leave_the_results_folder(capsys, results, name, command):
    kind = "experiment" if command == "run NAME" else "profile"
    assume(name not in (EXPERIMENTS if kind == "experiment" else PROFILES))
    argv = [name if word == "NAME" else word for word in command.split()]
    if argv[0] == "build":
        argv += ["--output-dir", results.parent / "book"]
    with nothing_written(results.parent):
        code, _, err = run_cli(capsys, "--results-dir", results, *argv)
    assert_refused(code, err, f"unknown {kind} {name!r}")


# ------------------------------------------------------------------------------------ fmnist-book predict
@pytest.fixture(scope="module")
def inbox(tmp_path_factory):
    return tmp_path_factory.mktemp("inbox")


def save(path: Path, array: np.ndarray) -> Path:
    with open(path, "wb") as handle:  # np.save(path) would append .npy to other names
        np.save(handle, array, allow_pickle=array.dtype.hasobject)
    return path


def assert_predict_refuses(capsys, lenet_run_dir, source: Path, out_suffix: str, *names):
    out = source.parent / f"labels{out_suffix}"
    code, _, err = run_cli(capsys, "predict", "--run", lenet_run_dir, "--input", source, "--output", out)
    assert_refused(code, err, str(source), *names)
    assert not out.exists()


def accepted_shape(shape) -> bool:
    return ((len(shape) == 4 and shape[1:] == (1, 28, 28)) or (len(shape) == 3 and shape[1:] == (28, 28))
            or (len(shape) == 2 and shape[1] == 784))


n_images = st.integers(1, 3)
image_shapes = st.sampled_from([(2, 28, 28), (2, 1, 28, 28), (2, 784)])
side, channels = st.integers(20, 36), st.integers(0, 4)
wrong_shapes = st.one_of(
    st.tuples(n_images, side, side), st.tuples(n_images, channels, side, side), st.tuples(n_images, st.integers(0, 900)),
    st.tuples(n_images, side, side, channels),  # channels last
    npst.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
).filter(lambda shape: not accepted_shape(shape))
out_suffixes = st.sampled_from([".npy", ".csv"])


@SETTINGS
@given(shape=wrong_shapes, dtype=st.sampled_from([np.uint8, np.float32]), suffix=out_suffixes)
def test_predict_refuses_a_wrong_shape(capsys, lenet_run_dir, inbox, shape, dtype, suffix):
    source = save(inbox / "x.npy", np.zeros(shape, dtype))
    problem = "empty" if 0 in shape else f"shape {shape}"
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, problem, "expected an array of shape (N, 28, 28)")


unsupported_dtypes = st.one_of(npst.boolean_dtypes(), npst.complex_number_dtypes(), npst.unicode_string_dtypes(),
                               npst.byte_string_dtypes(), npst.datetime64_dtypes(), npst.timedelta64_dtypes(),
                               npst.array_dtypes())


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")  # field names outside Latin-1 need it
@SETTINGS
@given(dtype=unsupported_dtypes, shape=image_shapes, suffix=out_suffixes)
def test_predict_refuses_an_unsupported_dtype(capsys, lenet_run_dir, inbox, dtype, shape, suffix):
    source = save(inbox / "x.npy", np.zeros(shape, dtype))
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, "dtype", "is not supported")


@st.composite
def integers_outside_0_255(draw):
    dtype = np.dtype(draw(npst.integer_dtypes() | npst.unsigned_integer_dtypes()))
    info = np.iinfo(dtype)
    ranges = ([st.integers(info.min, -1)] if info.min < 0 else []) + ([st.integers(256, info.max)] if info.max > 255 else [])
    assume(ranges)  # uint8 holds nothing outside 0..255
    return dtype, draw(st.one_of(ranges))


@SETTINGS
@given(case=integers_outside_0_255(), shape=image_shapes, where=st.integers(0, 2 * 784 - 1), suffix=out_suffixes)
def test_predict_refuses_integers_outside_0_255(capsys, lenet_run_dir, inbox, case, shape, where, suffix):
    dtype, bad = case
    array = np.zeros(shape, dtype)
    array.reshape(-1)[where] = bad
    source = save(inbox / "x.npy", array)
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, "outside [0, 255]")


@SETTINGS
@given(dtype=npst.floating_dtypes(), bad=st.floats(), shape=image_shapes, where=st.integers(0, 2 * 784 - 1),
       suffix=out_suffixes)
def test_predict_refuses_floats_outside_0_1_nan_and_infinity(capsys, lenet_run_dir, inbox, dtype, bad, shape, where,
                                                              suffix):
    array = np.full(shape, 0.5, dtype)
    with np.errstate(over="ignore"):
        array.reshape(-1)[where] = bad  # what the dtype makes of it: 1e300 is inf as float16
    stored = array.reshape(-1)[where]
    assume(not 0 <= stored <= 1)
    source = save(inbox / "x.npy", array)
    problem = "outside [0, 1]" if np.isfinite(stored) else "NaN or infinite"
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, problem)


python_values = st.recursive(st.none() | st.booleans() | whole | words | st.floats(allow_nan=False),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
                             max_leaves=8)


@SETTINGS
@given(value=python_values, shape=st.sampled_from([(1,), (3,), (2, 28, 28), (2, 784)]), suffix=out_suffixes)
def test_predict_never_loads_an_object_array(capsys, lenet_run_dir, inbox, value, shape, suffix):
    array = np.empty(shape, dtype=object)
    array.fill(value)
    source = save(inbox / "x.npy", array)
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, "object array")


@SETTINGS
@given(value=python_values | st.just(np.zeros((2, 28, 28), np.uint8)), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
       suffix=out_suffixes)
def test_predict_refuses_a_pickle_named_npy(capsys, lenet_run_dir, inbox, value, protocol, suffix):
    source = write(inbox / "x.npy", pickle.dumps(value, protocol=protocol))
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, "not a NumPy array file")


@SETTINGS
@given(arrays=st.lists(image_shapes.map(lambda s: np.zeros(s, np.uint8)), min_size=1, max_size=3),
       compressed=st.booleans(), suffix=out_suffixes)
def test_predict_refuses_an_npz_archive(capsys, lenet_run_dir, inbox, arrays, compressed, suffix):
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, *arrays)
    source = write(inbox / "x.npy", buffer.getvalue())
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, ".npz archive")


@SETTINGS
@given(shape=image_shapes, dtype=st.sampled_from([np.uint8, np.float32]), data=st.data(), suffix=out_suffixes)
def test_predict_refuses_a_truncated_npy(capsys, lenet_run_dir, inbox, shape, dtype, data, suffix):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, dtype))
    whole_file = buffer.getvalue()
    cut = data.draw(st.integers(0, len(whole_file) - 1), label="bytes kept")
    source = write(inbox / "x.npy", whole_file[:cut])
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix, "truncated or corrupt" if cut else "not a readable")


# A .npy header that may lie: any dtype text, any shape (huge ones included), any order flag.
lying_headers = st.builds(
    lambda descr, fortran, shape: "{" + f"'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}" + "}",
    st.sampled_from(["|u1", "<f4", "|b1", "|O", "<c8", "<U3", "|V4", "<M8[s]", "u1", ">i8", "garbage"]) | words,
    st.sampled_from(["False", "True", "1", "'no'"]),
    st.lists(st.integers(-3, 40) | st.integers(10**15, 10**19), max_size=4).map(tuple))


def holds_images(path: Path) -> bool:
    """Whether NumPy reads ``path`` as a non-empty numeric array of an accepted shape."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 (unreadable in any way is what the caller wants to know)
        return False
    return (isinstance(array, np.ndarray) and array.dtype.kind in "uif" and accepted_shape(array.shape)
            and array.size > 0)


def npy_header(header: str) -> bytes:
    text = header.encode("latin1", "replace").ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@SETTINGS
@given(content=st.one_of(
    st.binary(max_size=600),
    st.tuples(st.sampled_from([b"\x93NUMPY", b"\x93NUMPY\x01\x00", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x04",
                               b"\x1f\x8b"]), st.binary(max_size=600)).map(b"".join),
    st.tuples(lying_headers.map(npy_header), st.binary(max_size=64)).map(b"".join),
    words.map(str.encode)), suffix=out_suffixes)
def test_predict_refuses_bytes_that_are_no_array_file(capsys, lenet_run_dir, inbox, content, suffix):
    source = write(inbox / "x.npy", content)
    assume(not holds_images(source))  # a lying header can still describe a valid array by chance
    assert_predict_refuses(capsys, lenet_run_dir, source, suffix)


def test_predict_refuses_an_output_inside_a_file(capsys, lenet_run_dir, inbox):
    source = save(inbox / "images.npy", np.zeros((2, 28, 28), np.uint8))
    blocker = write(inbox / "not_a_folder", b"precious")
    code, _, err = run_cli(capsys, "predict", "--run", lenet_run_dir, "--input", source,
                           "--output", blocker / "labels.npy")
    assert_refused(code, err, str(blocker))
    assert blocker.read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------- label counts
@st.composite
def labelled(draw):
    """Labels of ``k`` classes with 0 to 8 images each, in a random order, and ``k``."""
    k = draw(st.integers(2, 10))
    counts = draw(st.lists(st.integers(0, 8), min_size=k, max_size=k))
    return draw(st.permutations(np.repeat(np.arange(k), counts).tolist())), counts, k


@SETTINGS
@given(case=labelled(), size=st.integers(-20, 100), seed=st.integers(0, 2**32 - 1))
def test_balanced_subset_refuses_exactly_the_counts_the_data_cannot_supply(case, size, seed):
    labels, counts, k = case
    labels = np.asarray(labels, dtype=np.int64)
    if size <= 0 or size % k:
        with pytest.raises(ValueError, match=f"cannot be split evenly over {k} classes: use a positive multiple of {k}"):
            data.balanced_subset(labels, size, seed, k)
    elif min(counts) < size // k:
        short = next(c for c in range(k) if counts[c] < size // k)  # the first class found short is named
        with pytest.raises(ValueError, match=f"needs {size // k} images of class {short}, but only {counts[short]} "):
            data.balanced_subset(labels, size, seed, k)
    else:
        chosen = data.balanced_subset(labels, size, seed, k)
        assert len(np.unique(chosen)) == size and np.all(np.diff(chosen) > 0)
        assert np.bincount(labels[chosen], minlength=k).tolist() == [size // k] * k


@SETTINGS
@given(case=labelled(), val_size=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_stratified_split_refuses_a_validation_size_the_data_cannot_supply(case, val_size, seed):
    labels, counts, k = case
    labels = np.asarray(labels, dtype=np.int64)
    if val_size and (val_size % k or min(counts) < val_size // k):
        with pytest.raises(ValueError, match=f"label count {val_size} "):
            data.stratified_split(labels, val_size, seed, k)
    else:
        train, val = data.stratified_split(labels, val_size, seed, k)
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))


@functools.cache
def semisup_pool(profile: str) -> int:
    """Images the semi-supervised runs of ``profile`` draw labels from: Fashion-MNIST's training images less
    the validation split, cut to ``train_images`` when that is smaller."""
    params = runner.resolve_params("semisupervised", profile)
    pool = FASHION_MNIST_TRAIN - params["val_size"]
    return params["train_images"] if 0 < params["train_images"] < pool else pool


@SETTINGS
@given(profile=st.sampled_from(PROFILES), data=st.data())
def test_semisupervised_label_counts_the_data_cannot_supply_are_refused_up_front(capsys, results, profile, data):
    pool = semisup_pool(profile)
    good = st.just(0) | st.integers(1, pool // 10).map(lambda n: 10 * n)
    bad = st.one_of(st.integers(1, pool).filter(lambda n: n % 10), st.integers(pool // 10 + 1, 10**5).map(
        lambda n: 10 * n), below(0))
    counts = data.draw(st.lists(good, max_size=3))
    counts.insert(data.draw(st.integers(0, len(counts))), data.draw(bad))
    with nothing_written(results):
        code, _, err = run_cli(capsys, "--results-dir", results, "run", "semisupervised", "--profile", profile,
                               "-p", "label_counts", typed(counts), "-p", "focus_labels", str(counts[0]))
    assert_refused(code, err, "parameter 'label_counts'", "multiples of 10", f"up to {pool:,}")


@SETTINGS
@given(profile=st.sampled_from(PROFILES), data=st.data())
def test_semisupervised_label_counts_the_data_can_supply_are_accepted(profile, data):
    pool = semisup_pool(profile)
    counts = data.draw(st.lists(st.just(0) | st.integers(1, pool // 10).map(lambda n: 10 * n), min_size=1,
                                max_size=4))
    params = runner.resolve_params("semisupervised", profile, {"label_counts": counts, "focus_labels": counts[-1]})
    assert params["label_counts"] == counts


TRAINING_IMAGES = {"fashion_mnist": FASHION_MNIST_TRAIN, "cifar10": CIFAR10_TRAIN}


def fixmatch_pool(profile: str, dataset: str) -> int:
    """The training images a FixMatch run of ``profile`` may label: all of them less the validation split."""
    return TRAINING_IMAGES[dataset] - runner.resolve_params("fixmatch", profile, {"dataset": dataset})["val_size"]


@SETTINGS
@given(profile=st.sampled_from(PROFILES), dataset=st.sampled_from(sorted(TRAINING_IMAGES)), data=st.data())
def test_fixmatch_label_counts_the_data_cannot_supply_are_refused_up_front(capsys, results, profile, dataset, data):
    available = fixmatch_pool(profile, dataset)
    good = st.integers(1, available // 10).map(lambda n: 10 * n)
    bad = st.one_of(st.integers(-10**5, 9), st.integers(11, available).filter(lambda n: n % 10),
                    st.integers(available // 10 + 1, 10**5).map(lambda n: 10 * n))
    where = data.draw(st.sampled_from(["label_counts", "ceiling_labels"]))
    if where == "label_counts":
        value, ceiling = data.draw(st.lists(good, max_size=3)), 0
        value.insert(data.draw(st.integers(0, len(value))), data.draw(bad))
    else:
        # -1 is valid: every image outside the validation split
        value = ceiling = data.draw(st.integers(available // 10 + 1, 10**5).map(lambda n: 10 * n) | below(-1))
    with nothing_written(results):
        code, _, err = run_cli(capsys, "--results-dir", results, "run", "fixmatch", "--profile", profile,
                               "-p", "dataset", dataset, "-p", where, typed(value),
                               *(["-p", "ceiling_labels", str(ceiling)] if where == "label_counts" else []))
    assert_refused(code, err, f"parameter {where!r}", f"up to {available:,} ({dataset}'s training images less the")


@SETTINGS
@given(dataset=st.sampled_from(sorted(TRAINING_IMAGES)), data=st.data())
def test_fixmatch_label_counts_the_data_can_supply_are_accepted(dataset, data):
    available = fixmatch_pool("quick", dataset)
    tens = st.integers(1, available // 10).map(lambda n: 10 * n)
    counts, ceiling = data.draw(st.lists(tens, min_size=1, max_size=3)), data.draw(st.sampled_from([-1, 0]) | tens)
    params = runner.resolve_params("fixmatch", "quick", {"dataset": dataset, "label_counts": counts,
                                                         "ceiling_labels": ceiling})
    assert params["label_counts"] == counts and params["ceiling_labels"] == ceiling


@SETTINGS
@given(num_labels=st.integers(1, 10**5).filter(lambda n: n % 10))
def test_a_single_run_refuses_labels_that_cannot_be_spread_evenly_over_ten_classes(num_labels):
    for config in (SemiSupConfig, FixMatchConfig):
        with pytest.raises(ConfigError, match=f"parameter 'num_labels' must be .*multiple of 10.*got {num_labels}"):
            config.from_overrides({"num_labels": num_labels})


# -------------------------------------------------------------------------------- a wrong data directory
STEMS = list(data.FASHION_MNIST_SHA256)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_dirs")


@SETTINGS
@given(present=st.lists(st.sampled_from(STEMS), unique=True, max_size=3), gz=st.booleans(),
       kind=st.sampled_from(["folder", "missing", "file"]))
def test_data_refuses_a_directory_without_the_four_files(capsys, data_root, present, gz, kind):
    with tempfile.TemporaryDirectory(dir=data_root) as tmp:
        directory = Path(tmp) / "fmnist"
        if kind == "file":
            directory.write_bytes(b"not a folder")
        elif kind == "folder":
            directory.mkdir()
            for stem in present:
                write(directory / (stem + ".gz" * gz), gzip.compress(b"x"))
        with nothing_written(Path(tmp)):
            code, _, err = run_cli(capsys, "--data-dir", directory, "data")
    missing = [s for s in STEMS if kind != "folder" or s not in present]
    assert_refused(code, err, f"data directory {directory} lacks the Fashion-MNIST files: {', '.join(missing)}")


idx_arrays = npst.arrays(np.uint8, npst.array_shapes(min_dims=1, max_dims=3, max_side=8))
garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b),                   # a gzip magic number, then noise
    st.binary(min_size=1, max_size=300).map(lambda b: gzip.compress(b"")[:10] + b),  # a gzip header, then noise
    st.binary(max_size=300).map(gzip.compress),                               # good gzip of noise
    st.tuples(idx_arrays, st.integers(0, 40)).map(lambda t: gzip.compress(idx_bytes(t[0]))[:-t[1] - 1]),  # cut gzip
    idx_arrays.map(idx_bytes),                                                 # a valid IDX, not Fashion-MNIST
    idx_arrays.map(lambda a: gzip.compress(idx_bytes(a))))


@SETTINGS
@given(contents=st.lists(garbage, min_size=4, max_size=4), gz=st.lists(st.booleans(), min_size=4, max_size=4))
def test_data_refuses_files_with_the_right_names_and_the_wrong_contents(capsys, data_root, contents, gz):
    with tempfile.TemporaryDirectory(dir=data_root) as tmp:
        directory = Path(tmp)
        files = [write(directory / (stem + ".gz" * z), content) for stem, z, content in zip(STEMS, gz, contents)]
        with nothing_written(directory):
            code, _, err = run_cli(capsys, "--data-dir", directory, "data")
    assert_refused(code, err, str(files[0]))  # the first file is checked first, and it cannot be Fashion-MNIST
