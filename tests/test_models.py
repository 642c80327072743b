"""Tests for fmnist_core.core.models: shapes, logits, parameter counts, registry errors (learning is tested in
test_train.py)."""

import pytest
import torch
from torch import nn

from fmnist_core.core.models import MODELS, build_model, count_parameters, list_models, register

ALL = list_models()
INPUTS = [(1, 28), (3, 32), (1, 32)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_contents():
    assert ALL == sorted(["mlp", "lenet_avg", "lenet_max", "mycnn", "alexnet", "vgg16",
                          "resnet18", "resnet34", "wrn28_2", "smallcnn"])
    assert set(MODELS) == set(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels,size", INPUTS)
def test_output_is_logits_of_right_shape(name, channels, size):
    model = build_model(name, in_channels=channels, image_size=size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    # Neither probabilities (softmax over the classes or, wrongly, over the batch)
    # nor log-probabilities.
    ones = torch.ones(2)
    assert not torch.allclose(out.sum(dim=1), ones, atol=1e-3)
    assert not torch.allclose(out.sum(dim=0), torch.ones(10), atol=1e-3)
    assert not torch.allclose(out.logsumexp(dim=1), torch.zeros(2), atol=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_feature_layers_are_named_modules(name):
    model = build_model(name)
    names = dict(model.named_modules())
    assert len(model.feature_layers) >= 2
    missing = [n for n in model.feature_layers if n not in names]
    assert not missing, f"{name}: {missing} not in named_modules()"


@pytest.mark.parametrize("name", ALL)
def test_feature_layer_hooks_fire_in_order(name):
    model = build_model(name).eval()
    seen = []
    modules = dict(model.named_modules())
    for layer in model.feature_layers:
        modules[layer].register_forward_hook(lambda m, i, o, layer=layer: seen.append(layer))
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert seen == model.feature_layers


def test_lenet_hooked_conv_output_is_post_relu():
    model = build_model("lenet_avg").eval()
    captured = {}
    model.get_submodule("conv1").register_forward_hook(lambda m, i, o: captured.update(a=o))
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    assert captured["a"].shape == (4, 6, 28, 28)
    assert captured["a"].min() >= 0


def test_parameter_counts():
    counts = {n: count_parameters(build_model(n)) for n in ["mlp", "lenet_avg", "lenet_max",
                                                           "resnet18", "wrn28_2"]}
    assert counts["mlp"] == 101_770
    assert counts["lenet_avg"] == 61_706
    assert counts["lenet_max"] == counts["lenet_avg"]
    assert 11_000_000 <= counts["resnet18"] <= 11_300_000
    assert 1_400_000 <= counts["wrn28_2"] <= 1_550_000


def test_count_parameters_ignores_frozen():
    model = build_model("mlp")
    model.get_submodule("fc1").requires_grad_(False)
    assert count_parameters(model) == 128 * 10 + 10


def test_lenet_flatten_size_follows_image_size():
    model = build_model("lenet_avg", image_size=32)
    assert model.get_submodule("fc1")[0].in_features == 16 * 6 * 6


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="lenet_avg") as err:
        build_model("lenet_av")
    assert "did you mean" in str(err.value)
    with pytest.raises(ValueError, match="choose one of: alexnet, lenet_avg"):
        build_model("xyz")


@pytest.mark.parametrize("kwargs,param", [({"in_channels": 2}, "in_channels"),
                                          ({"image_size": 64}, "image_size")])
def test_bad_input_geometry_is_rejected(kwargs, param):
    with pytest.raises(ValueError, match=param):
        build_model("mlp", **kwargs)


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="mlp"):
        register("mlp")(lambda *a, **k: nn.Identity())
    assert MODELS["mlp"] is not None
