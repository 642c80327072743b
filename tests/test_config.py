"""Parameter validation: names, types and ranges are checked before any work; the profile file is valid."""
import pytest

from fmnist_core.chapters.classification import ClassificationConfig
from fmnist_core.core.config import parse_cli_value
from fmnist_core.core.errors import ConfigError
from fmnist_core.pipeline.runner import load_profiles, resolve_params


def test_defaults_are_valid():
    cfg = ClassificationConfig.from_overrides({})
    assert cfg.epochs == 10 and "lenet_avg" in cfg.models


def test_later_layers_win():
    cfg = ClassificationConfig.from_overrides({"epochs": 3, "lr": 0.1}, {"epochs": 5})
    assert cfg.epochs == 5 and cfg.lr == 0.1


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 3}, "did you mean 'epochs'"),
    ({"epochs": "3"}, "'epochs' must be int"),
    ({"epochs": True}, "'epochs' must be int"),
    ({"epochs": 0}, "'epochs' must be at least 1"),
    ({"lr": -1}, "'lr' must be positive"),
    ({"optimizer": "adamw"}, "did you mean 'adam'"),
    ({"models": ["lenet"]}, "unknown model 'lenet'"),
    ({"models": "lenet_avg"}, "'models' must be list"),
    ({"model_overrides": {"vgg61": {"epochs": 1}}, "models": ["mlp"], "sgd_model": ""}, "unknown model 'vgg61'"),
    ({"model_overrides": {"mlp": {"epochs": -2}}, "models": ["mlp"], "sgd_model": ""}, "'epochs' must be at least 1"),
    ({"val_size": 15}, "'val_size'"),
    ({"test_images": 20000}, "'test_images'"),
    ({"sgd_model": "vgg16", "models": ["mlp"]}, "'sgd_model'"),
])
def test_bad_parameters_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ClassificationConfig.from_overrides(overrides)


def test_int_is_accepted_for_float():
    assert ClassificationConfig.from_overrides({"lr": 1}).lr == 1.0


def test_model_config_applies_per_model_overrides():
    cfg = ClassificationConfig.from_overrides({"epochs": 4, "model_overrides": {"vgg16": {"epochs": 1}}})
    assert cfg.model_config("vgg16").epochs == 1 and cfg.model_config("mlp").epochs == 4
    sgd = cfg.sgd_config()
    assert sgd.optimizer == "sgd" and sgd.schedule == "step" and sgd.lr == cfg.sgd_lr


@pytest.mark.parametrize("text, value", [("3", 3), ("0.5", 0.5), ("true", True), ("[a, b]", ["a", "b"]),
                                         ("adam", "adam"), ("{x: 1}", {"x": 1}), ("1e-3", 0.001),
                                         ("-2E+4", -20000.0), ("[1e-4, 3]", [0.0001, 3])])
def test_cli_values_are_parsed_as_yaml(text, value):
    assert parse_cli_value(text) == value


def test_every_profile_in_the_profile_file_is_valid():
    profiles = load_profiles()
    assert {"smoke", "quick", "standard", "paper"} <= set(profiles)
    for name in profiles:
        for experiment in profiles[name]["experiments"]:
            resolve_params(experiment, name)


def test_profile_file_errors_name_the_place(tmp_path):
    path = tmp_path / "profiles.yml"
    path.write_text("quick:\n  experiments:\n    classification: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"quick\.classification.*epochz"):
        load_profiles(path)
    path.write_text("quick:\n  experiments:\n    clasification: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'classification'"):
        load_profiles(path)
