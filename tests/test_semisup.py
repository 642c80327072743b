"""The semi-supervised chapter: the losses (labels only where given), M2's bounds against a hand
computation, learning on tiny data, training every model through ``fit_epochs``, the labeled subset."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmnist_core.chapters.semisupervised import model as semisup
from fmnist_core.core.data import make_generator
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.io import load_checkpoint
from fmnist_core.core.generative import kl_divergence, reconstruction_loss

from conftest import patterns, toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"latent_dim": 8, "branch_channels": (4, 8), "dropout": 0.1, "hidden": 16}


def config(**overrides):
    base = {"epochs": 1, "batch_size": 16, "lr": 3e-3, "val_size": 50, "num_labels": 20, "latent_dim": 8,
            "branch_channels": [4, 8], "unlabeled_ratio": 2, "device": "cpu", "eval_batch_size": 100, "tta": 0}
    return semisup.SemiSupConfig.from_overrides(base, overrides)


def unit_batch(n=12, seed=0):
    images, labels = patterns(n, seed)
    return images.float() / 255, labels


def test_config_refuses_bad_values():
    for overrides, name in [({"branch_channels": [8]}, "branch_channels"), ({"models": ["m3"]}, "models"),
                            ({"unlabeled_ratio": 0}, "unlabeled_ratio"), ({"label_smoothing": 0.1}, "label_smoothing"),
                            ({"dropout": 1.0}, "dropout"), ({"models": ["m2", "m2"]}, "models")]:
        with pytest.raises(ConfigError, match=name):
            config(**overrides)
    with pytest.raises(ConfigError, match="num_labels"):  # 25 labels cannot be balanced over 10 classes
        semisup.semisup_splits(config(num_labels=25), toy_dataset())


def test_shapes_and_identical_classification_path():
    torch.manual_seed(0)
    model = semisup.SemiSupVAE(**SMALL).eval()
    x, _ = unit_batch(5)
    out = model(x, generator=make_generator(0))
    assert out["x_hat"].shape == x.shape and out["logits"].shape == (5, 10)
    assert out["mu"].shape == out["logvar"].shape == (5, 8)
    assert 0 <= float(out["x_hat"].detach().min()) and float(out["x_hat"].detach().max()) <= 1
    torch.testing.assert_close(model.classify(x), out["logits"])  # the classifier reads the mean
    baseline = semisup.EncoderOnlyClassifier(**SMALL).state_dict()
    full = model.state_dict()
    assert all(full[k].shape == v.shape for k, v in baseline.items())
    assert set(full) - set(baseline) and all(k.startswith(("fc_logvar", "decoder")) for k in set(full) - set(baseline))


def test_semisup_loss_terms_and_labels_only_where_given():
    torch.manual_seed(0)
    model = semisup.SemiSupVAE(**SMALL)
    x, labels = unit_batch(12)
    mask = torch.arange(12) < 5
    noisy = labels.clone()
    noisy[~mask] = -1  # unlabeled entries may hold anything
    out = model(x, generator=make_generator(0))
    losses = semisup.semisup_loss(out, x, noisy, mask, kl_weight=0.5, class_weight=2.0)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    recon = reconstruction_loss(out["x_hat"], x).mean()
    kl = kl_divergence(out["mu"], out["logvar"]).mean()
    ce = F.cross_entropy(out["logits"][:5], labels[:5])
    torch.testing.assert_close(losses["recon"], recon)
    torch.testing.assert_close(losses["kl"], kl)
    torch.testing.assert_close(losses["classification"], ce)
    torch.testing.assert_close(losses["loss"], recon + 0.5 * kl + 2.0 * ce)


def test_batch_without_labels_trains_no_classifier():
    torch.manual_seed(0)
    model = semisup.SemiSupVAE(**SMALL)
    x, labels = unit_batch(8)
    out = model(x, generator=make_generator(0))
    losses = semisup.semisup_loss(out, x, labels, torch.zeros(8, dtype=torch.bool), 1.0, 10.0)
    assert float(losses["classification"]) == 0.0
    losses["loss"].backward()
    for p in model.classifier.parameters():
        assert p.grad is None or float(p.grad.abs().max()) == 0.0
    for part in (model.encoder, model.fc_mu, model.fc_logvar, model.decoder):
        assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in part.parameters())


def test_m2_labeled_bound_by_hand():
    torch.manual_seed(0)
    model = semisup.M2(**SMALL).eval()
    x, y = unit_batch(6)
    with torch.no_grad():
        onehot = F.one_hot(y, 10).float()
        mu, logvar = model.encode(model.features(x), onehot)
        x_hat = model.decode(mu, onehot)  # no generator: z is the mean
        expected = reconstruction_loss(x_hat, x) + kl_divergence(mu, logvar) + math.log(10)
        bound = semisup.m2_labeled_bound(model, x, y)
    torch.testing.assert_close(bound, expected)
    with torch.no_grad():  # with noise from a generator the same seed gives the same bound
        a = semisup.m2_labeled_bound(model, x, y, make_generator(3))
        b = semisup.m2_labeled_bound(model, x, y, make_generator(3))
    assert torch.equal(a, b) and not torch.allclose(a, bound)


def test_m2_unlabeled_bound_is_expected_labeled_bound_minus_entropy():
    torch.manual_seed(0)
    model = semisup.M2(**SMALL).eval()
    x, _ = unit_batch(4)
    with torch.no_grad():
        u = semisup.m2_unlabeled_bound(model, x)
        q = model.classify(x).softmax(1)
        per_class = torch.stack([semisup.m2_labeled_bound(model, x, torch.full((4,), c)) for c in range(10)], 1)
        entropy = -(q * q.log()).sum(1)
    # -U = sum_y q(y|x) (-L(x, y)) + H(q(y|x))
    torch.testing.assert_close(-u, (q * -per_class).sum(1) + entropy, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["semisup_vae", "m2"])
def test_a_few_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = semisup.SemiSupVAE(**SMALL) if name == "semisup_vae" else semisup.M2(**SMALL)
    x, labels = unit_batch(32)
    mask = torch.arange(32) < 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss(generator):
        if name == "m2":
            return semisup.m2_loss(model, x[mask], labels[mask], x[~mask], 1.0, generator)["loss"]
        return semisup.semisup_loss(model(x, generator), x, labels, mask, 1.0, 1.0)["loss"]

    def measured():
        torch.manual_seed(1)
        with torch.no_grad():
            return float(loss(make_generator(1)))

    before = measured()
    for step in range(30):
        optimizer.zero_grad()
        loss(make_generator(step + 10)).backward()
        optimizer.step()
    assert measured() < 0.85 * before


def test_labeled_subset_is_balanced_reproducible_and_inside_the_training_split():
    ds = toy_dataset()
    a, b = semisup.semisup_splits(config(), ds), semisup.semisup_splits(config(), ds)
    assert np.array_equal(a.labeled_idx, b.labeled_idx) and len(a.labeled_idx) == 20
    assert np.bincount(ds.train_labels.numpy()[a.labeled_idx], minlength=10).tolist() == [2] * 10
    assert set(a.labeled_idx) <= set(a.train_idx) and not set(a.train_idx) & set(a.val_idx)
    assert len(a.splits.train.labels) == 150 and len(a.splits.val.labels) == 50
    assert torch.equal(a.labeled.images, ds.train_images[torch.as_tensor(a.labeled_idx)])
    other = semisup.semisup_splits(config(label_seed=1), ds)
    assert not np.array_equal(a.labeled_idx, other.labeled_idx)
    assert len(semisup.semisup_splits(config(num_labels=0), ds).labeled_idx) == 150  # 0 = every label


def test_class_weight_rule_of_kingma_et_al():
    assert semisup.resolve_class_weight(config(), 55000, 100) == pytest.approx(10.0)
    assert semisup.resolve_class_weight(config(), 55000, 5000) == pytest.approx(500.0)
    assert semisup.resolve_class_weight(config(class_weight=2.0), 55000, 100) == 2.0


@pytest.mark.parametrize("name", semisup.SEMISUP_MODELS)
def test_train_semisup_one_epoch_writes_checkpoints(tmp_path, name):
    ds = toy_dataset()
    model, history, splits, labeled_idx = semisup.train_semisup(config(), name, ds, tmp_path, log=lambda *_: None)
    assert [r["epoch"] for r in history] == [1] and 0 <= history[0]["val_accuracy"] <= 1
    for file in ("best.pt", "last.pt", "history.json", "history.csv", "labeled_indices.npz"):
        assert (tmp_path / file).exists()
    assert np.array_equal(np.load(tmp_path / "labeled_indices.npz")["labeled"], labeled_idx)
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["config"]["input"] == ("standardised" if name == "cnn" else "unit")
    assert state["config"]["model"] == ("mycnn" if name == "cnn" else name)
    rebuilt, _ = semisup.load_trained_semisup(tmp_path / "last.pt")
    x = splits.val.images[:8]
    if name == "cnn":
        torch.testing.assert_close(rebuilt(splits.val.inputs()[:8]), model.eval()(splits.val.inputs()[:8]))
    else:
        probs = semisup.predict_semisup_proba(rebuilt, x, tta=2)
        assert probs.shape == (8, 10)
        torch.testing.assert_close(probs.sum(1), torch.ones(8))
        torch.testing.assert_close(semisup.predict_semisup_proba(model, x), semisup.predict_semisup_proba(rebuilt, x))
    if name != "cnn":  # the same number of steps per epoch: ceil(150 unlabeled / (16 * 2))
        assert semisup.steps_per_epoch(config(), len(splits.train.labels)) == 5


def test_train_semisup_resumes_and_restarts_on_another_labeled_subset(tmp_path):
    ds, logs = toy_dataset(), []
    semisup.train_semisup(config(), "encoder_only", ds, tmp_path, log=logs.append)
    _, history, _, _ = semisup.train_semisup(config(epochs=2), "encoder_only", ds, tmp_path, log=logs.append)
    assert not any("resuming" in line for line in logs)  # another config (epochs) starts afresh
    logs.clear()
    semisup.train_semisup(config(epochs=2), "encoder_only", ds, tmp_path, log=logs.append)
    assert any("resuming" in line for line in logs) and len(history) == 2
    logs.clear()
    semisup.train_semisup(config(epochs=2, label_seed=5), "cnn", ds, tmp_path / "cnn", log=logs.append)
    semisup.train_semisup(config(epochs=2, label_seed=6), "cnn", ds, tmp_path / "cnn", log=logs.append)
    assert not any("resuming" in line for line in logs)
