"""Tests for fmnist_core.core.activations: hook-based capture, separability scores, embeddings, the layer report."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from openTSNE import initialization

from fmnist_core.core.activations import (capture_activations, embedding_trustworthiness, layer_report,
                                     separability)
from fmnist_core.core.embed import embed_pca, embed_tsne
from fmnist_core.core.models import build_model, list_models


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per_class=60, dim=20, distance=10.0, seed=0):
    """Two unit-variance Gaussian blobs whose centres are ``distance`` apart.

    The offset is spread over every dimension, so standardising the features keeps the blobs apart.
    """
    rng = np.random.default_rng(seed)
    centre = np.full(dim, distance / np.sqrt(dim))
    x = np.concatenate([rng.normal(size=(n_per_class, dim)), rng.normal(size=(n_per_class, dim)) + centre])
    return x.astype(np.float32), np.repeat([0, 1], n_per_class)


def knn_accuracy(points, labels):
    return separability(points, labels)["knn_accuracy"]


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def training_flags(model):
    return [m.training for m in model.modules()]


def layer_outputs_without_hooks(model, x):
    """Reference activations: the registry models run their named children in order, so run them by hand."""
    out, outputs = x, {"input": x.reshape(len(x), -1)}
    with torch.no_grad():
        for name, child in model.named_children():
            out = child(out)
            outputs[name] = out.reshape(len(out), -1).clone()
    return outputs


# ----------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("name", list_models())
def test_capture_shapes_values_and_no_side_effects(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    expected = layer_outputs_without_hooks(model, x)
    # Train mode with one submodule deliberately in eval: capture must switch to eval (else BatchNorm
    # statistics and dropout would change the outputs below) and restore this exact mix afterwards.
    model.train()
    next(iter(model.children())).eval()
    flags = training_flags(model)

    acts = capture_activations(model, x, batch_size=3)  # 3 splits the 4 samples into two batches

    assert list(acts) == ["input", *model.feature_layers]
    for layer, values in acts.items():
        assert values.dtype == np.float32 and values.shape == tuple(expected[layer].shape), layer
        # Batches of 3 and 1 instead of 4 may pick other convolution kernels: float noise, not bugs.
        np.testing.assert_allclose(values, expected[layer].numpy(), rtol=1e-3, atol=1e-4, err_msg=layer)
    np.testing.assert_allclose(acts[model.feature_layers[-1]], before.numpy(), rtol=1e-3, atol=1e-4)
    assert training_flags(model) == flags
    assert no_hooks_left(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_capture_keeps_requested_order_and_copies_before_inplace_ops():
    torch.manual_seed(0)
    model = build_model("lenet_max")
    x = torch.randn(5, 1, 28, 28)
    acts = capture_activations(model, x, layers=["fc2", "input", "conv1.0"])
    assert list(acts) == ["fc2", "input", "conv1.0"]
    np.testing.assert_array_equal(acts["input"], x.reshape(5, -1).numpy())
    # conv1 is Conv2d followed by an in-place ReLU: the recorded conv output must keep its negative values.
    assert (acts["conv1.0"] < 0).any()
    assert (acts["fc2"] >= 0).all()  # fc2 is Linear + ReLU


def test_unknown_layer_is_named_in_the_error():
    model = build_model("mlp")
    with pytest.raises(ValueError, match=r"unknown layer 'fc9'.*input, flatten, fc1, fc2"):
        capture_activations(model, torch.randn(2, 1, 28, 28), layers=["input", "fc9"])
    assert no_hooks_left(model)


def test_hooks_removed_and_mode_restored_when_forward_fails():
    model = build_model("lenet_max").train()
    with pytest.raises(RuntimeError):  # 20px images do not fit LeNet's 28px dense layer
        capture_activations(model, torch.randn(2, 1, 20, 20))
    assert no_hooks_left(model)
    assert all(training_flags(model))


# ------------------------------------------------------------------------------------------- scores
def test_separability_tells_structure_from_noise():
    x, y = blobs(dim=80, distance=20)  # above 50 dims, so the silhouette goes through the PCA reduction
    separated = separability(x, y)
    shuffled = separability(x, np.random.default_rng(0).permutation(y))
    assert separated["knn_accuracy"] == 1.0 and separated["silhouette"] > 0.3
    assert shuffled["knn_accuracy"] < 0.7 and abs(shuffled["silhouette"]) < 0.05
    assert all(type(v) is float for v in (*separated.values(), *shuffled.values()))


def test_trustworthiness_of_a_faithful_and_a_random_embedding():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(100, 2))
    x = np.hstack([plane, 1e-3 * rng.normal(size=(100, 8))])  # nearly flat 10-D data
    assert embedding_trustworthiness(x, plane) > 0.99
    assert embedding_trustworthiness(x, rng.normal(size=(100, 2))) < 0.7


# --------------------------------------------------------------------------------------- embeddings
def test_tsne_optimisation_separates_blobs_that_its_start_does_not():
    x, y = blobs()
    start = initialization.random(len(x), 2, random_state=0)  # what openTSNE starts from with this seed
    embedded = embed_tsne(x, perplexity=20, seed=0, n_iter=250, initialization="random")
    assert knn_accuracy(start, y) <= 0.75
    assert knn_accuracy(embedded, y) >= 0.95
    assert not np.allclose(embedded, embed_tsne(x, perplexity=20, seed=0, n_iter=250))  # PCA start differs


def test_seeded_embeddings_are_identical():
    x, _ = blobs(n_per_class=40)
    np.testing.assert_array_equal(embed_pca(x, seed=3)[0], embed_pca(x, seed=3)[0])
    first = embed_tsne(x, seed=3, n_iter=100)
    np.testing.assert_array_equal(first, embed_tsne(x, seed=3, n_iter=100))
    assert not np.array_equal(first, embed_tsne(x, seed=4, n_iter=100))


# -------------------------------------------------------------------------------------- layer report
def bars(n, generator, amplitude=3.0, length=8):
    """Class 0: a horizontal bar, class 1: a vertical bar, anywhere in the image, under unit noise.

    The position varies, so no pixel (nor pixel-space neighbourhood) tells the classes apart; a
    convolution with max-pooling can learn the orientation wherever it is.
    """
    labels = torch.arange(n) % 2
    start = torch.randint(0, 28 - length, (n, 1), generator=generator)
    line = torch.randint(0, 28, (n, 1), generator=generator)
    pos = torch.arange(28).view(1, 28)
    along = ((pos >= start) & (pos < start + length)).view(n, 1, 28)
    across = (pos == line).view(n, 28, 1)
    horizontal = across & along
    pattern = torch.where((labels == 0).view(n, 1, 1), horizontal, horizontal.transpose(1, 2))
    images = torch.randn(n, 1, 28, 28, generator=generator) + amplitude * pattern.unsqueeze(1).float()
    return images, labels


def test_trained_network_separates_classes_better_than_its_input():
    generator = torch.Generator().manual_seed(0)
    test_x, test_y = bars(200, generator)
    torch.manual_seed(0)
    model = build_model("lenet_max", num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # fresh images every step: nothing to memorise
        x, y = bars(64, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    acts = capture_activations(model, test_x, layers=["input", "fc2"])
    labels = test_y.numpy()
    pixels, hidden = knn_accuracy(acts["input"], labels), knn_accuracy(acts["fc2"], labels)
    assert pixels < 0.65  # the task is not solvable by pixel neighbourhoods ...
    assert hidden > pixels + 0.15  # ... but the last hidden layer has learned it


def test_layer_report_is_complete_and_json_serialisable():
    x, y = blobs(n_per_class=30, dim=12, distance=20)
    activations = {"input": x, "hidden": x[:, :4] * 2.0, "logits": x[:, :2]}
    embeddings, scores = layer_report(activations, y, perplexity=10, tsne_iter=100)
    json.dumps(scores)  # raises on NumPy scalars or arrays
    assert [s["layer"] for s in scores] == ["input", "hidden", "logits"]
    assert [s["depth"] for s in scores] == [0, 1, 2] and [s["dim"] for s in scores] == [12, 4, 2]
    for s in scores:
        assert set(s) == {"layer", "depth", "dim", "knn_accuracy", "silhouette", "tsne_trustworthiness",
                          "pca_explained_variance"}
        assert s["knn_accuracy"] == 1.0 and 0 < s["tsne_trustworthiness"] <= 1
        assert len(s["pca_explained_variance"]) == 2 and s["pca_explained_variance"][0] > 0.5
    np.testing.assert_allclose(scores[2]["pca_explained_variance"][0] + scores[2]["pca_explained_variance"][1],
                               1.0, rtol=1e-6)
    for layer in activations:
        assert embeddings[layer]["pca"].shape == embeddings[layer]["tsne"].shape == (60, 2)
