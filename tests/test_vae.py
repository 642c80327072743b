"""The VAE chapter: shapes, the closed-form KL, learning, interpolation endpoints, seeded sampling,
training through ``fit_epochs``, and loading LFW (with scikit-learn's fetcher faked)."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.utils import Bunch

from fmnist_core.core import lfw
from fmnist_core.chapters import vae
from fmnist_core.core.data import make_generator
from fmnist_core.core.errors import ConfigError, DataError
from fmnist_core.core.io import load_checkpoint

from conftest import patterns, toy_dataset


@pytest.mark.parametrize("architecture", ["seed", "deep"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 32)])
def test_output_shapes(architecture, channels, size):
    torch.manual_seed(0)
    model = vae.VAE(channels, size, latent_dim=6, channels=8, architecture=architecture)
    x = torch.rand(5, channels, size, size)
    x_hat, mu, logvar = model(x, generator=torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (5, 6)
    assert float(x_hat.detach().min()) >= 0 and float(x_hat.detach().max()) <= 1
    assert model.decode(torch.zeros(2, 6)).shape == (2, channels, size, size)


def test_model_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="architecture"):
        vae.VAE(architecture="resnet")
    with pytest.raises(ConfigError, match="image_size"):
        vae.VAE(image_size=30)


def test_kl_divergence_closed_form_by_hand():
    # mu = (1, -2), variances (1, 4): 0.5 * [(1 + 1 - 1 - 0) + (4 + 4 - 1 - ln 4)] = 4 - ln 2.
    mu = torch.tensor([[1.0, -2.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    assert vae.kl_divergence(mu, logvar).item() == pytest.approx(4 - math.log(2), abs=1e-6)
    assert torch.equal(vae.kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))


def test_kl_divergence_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected)


def test_reconstruction_losses_are_per_sample_sums():
    x = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.5]]]])
    x_hat = torch.full_like(x, 0.5)
    np.testing.assert_allclose(vae.reconstruction_loss(x_hat, x, "bce").numpy(), [2 * math.log(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose(vae.reconstruction_loss(x_hat, x, "mse").numpy(), [0.25, 0.0], atol=1e-7)
    assert vae.gaussian_constant((1, 28, 28)) == pytest.approx(392 * math.log(2 * math.pi))
    with pytest.raises(ConfigError):
        vae.reconstruction_loss(x_hat, x, "l1")


def test_kl_weight_warm_up():
    assert [vae.kl_weight(s, 4, 2.0) for s in (0, 2, 4, 10)] == [0.0, 1.0, 2.0, 2.0]
    assert vae.kl_weight(0, 0, 0.5) == 0.5


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_loss_is_finite_and_decreases(kind):
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=4, channels=8)
    x = vae.to_unit(patterns(32)[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        x_hat, mu, logvar = model(x, generator=g)
        out = vae.vae_loss(x_hat, x, mu, logvar, kind=kind)
        assert all(math.isfinite(float(v.detach())) for v in out.values())
        assert out["loss"].item() == pytest.approx((out["recon"] + out["kl"]).item(), rel=1e-5)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.9 * losses[0]


def test_reparameterize_uses_the_generator_only():
    model = vae.VAE(latent_dim=3, channels=4)
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    draw = [model.reparameterize(mu, logvar, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert torch.equal(model.reparameterize(mu, logvar), mu)  # no generator: the mean, no hidden noise


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolate_endpoints_are_the_mean_decodings(method):
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=5, channels=8, architecture="deep").eval()
    images = patterns(2)[0]
    path = vae.interpolate(model, images[0], images[1], steps=9, method=method)
    assert path.shape == (9, 1, 28, 28)
    with torch.no_grad():
        mu = model.encode(vae.to_unit(images))[0]
        ends = model.decode(mu)
        alphas = torch.linspace(0, 1, 9)
        z = ((1 - alphas)[:, None] * mu[0] + alphas[:, None] * mu[1] if method == "linear"
             else vae._slerp(mu[0], mu[1], alphas))
        expected = model.decode(z)
    torch.testing.assert_close(path[0], ends[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(path[-1], ends[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(path, expected, atol=1e-6, rtol=0)
    assert not torch.equal(path[4], path[0])


def test_slerp_stays_on_the_arc():
    z1, z2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    z = vae._slerp(z1, z2, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(z[0], z1)
    torch.testing.assert_close(z[2], z2)
    torch.testing.assert_close(z[1], torch.tensor([math.sqrt(0.5), math.sqrt(2.0)]))


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = vae.VAE(3, 32, latent_dim=4, channels=4)
    a, b, c = (vae.sample(model, 6, make_generator(s)) for s in (7, 7, 8))
    assert a.shape == (6, 3, 32, 32)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_config_checks():
    cfg = vae.VAEConfig.from_overrides({})
    assert (cfg.augment, cfg.weight_decay, cfg.optimizer, cfg.lr) == (False, 0.0, "adam", 1e-3)
    assert cfg.interpolation_pairs == [[7, 9], [0, 3], [7, 7], [1, 1]]
    assert cfg.study_config().epochs == cfg.study_epochs
    for bad in ({"recon_loss": "l1"}, {"architecture": "vgg"}, {"interpolation_steps": 5}, {"beta": -1.0},
                {"interpolation_pairs": [[7, 10]]}, {"dataset": "lfw"}, {"latent_sizes": [2, 0]}):
        with pytest.raises(ConfigError):
            vae.VAEConfig.from_overrides(bad)
    assert vae.VAEConfig.from_overrides({"dataset": "lfw", "interpolation_pairs": [[0, 0]]}).dataset == "lfw"


def test_train_vae_writes_checkpoints_history_and_reloads(tmp_path):
    ds = toy_dataset()
    cfg = vae.VAEConfig.from_overrides({"epochs": 2, "batch_size": 50, "val_size": 50, "device": "cpu",
                                        "channels": 8, "kl_warmup_epochs": 1, "eval_batch_size": 50})
    model, history, splits = vae.train_vae(cfg, ds, tmp_path, log=lambda *_: None, latent_dim=3)
    assert (len(splits.train.images), len(splits.val.images)) == (150, 50)
    for name in ("best.pt", "last.pt", "history.json", "history.csv"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for split in ("train", "val"):
        assert all(math.isfinite(history[-1][f"{split}_{k}"]) for k in ("loss", "recon", "kl"))
    # Warm-up over the first epoch's 3 steps: weight 2/3 at its last step, beta from then on.
    assert [r["train_kl_weight"] for r in history] == pytest.approx([2 / 3, 1.0])
    assert history[-1]["val_loss"] == pytest.approx(history[-1]["val_recon"] + history[-1]["val_kl"])
    loaded, state = vae.load_trained_vae(tmp_path / "best.pt")
    assert loaded.latent_dim == 3 and state["record"]["val_loss"] == min(r["val_loss"] for r in history)
    again = vae.validation_stats(loaded, splits.val.images, cfg)
    assert again["loss"] == pytest.approx(state["record"]["val_loss"], rel=1e-5)
    assert vae.latent_means(loaded, splits.val.images, batch_size=20).shape == (50, 3)
    assert load_checkpoint(tmp_path / "last.pt")["config"]["latent_dim"] == 3


def test_train_vae_rejects_a_split_that_does_not_fit(tmp_path):
    cfg = vae.VAEConfig.from_overrides({"epochs": 1, "val_size": 55, "device": "cpu"})
    with pytest.raises(ConfigError, match="val_size"):
        vae.train_vae(cfg, toy_dataset(), tmp_path, log=lambda *_: None)


def test_evaluate_elbo_reports_the_gaussian_constant_for_mse():
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=3, channels=4)
    images = patterns(10)[0]
    bce = vae.evaluate_elbo(model, images, batch_size=4)
    assert bce == vae.evaluate_elbo(model, images, batch_size=4)  # default generator is seeded
    assert bce["neg_elbo"] == pytest.approx(bce["recon"] + bce["kl"]) and "neg_elbo_nats" not in bce
    mse = vae.evaluate_elbo(model, images, kind="mse")
    assert mse["neg_elbo_nats"] == pytest.approx(mse["neg_elbo"] + 392 * math.log(2 * math.pi))


def fake_lfw(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return Bunch(images=rng.random((n, 62, 47, 3), dtype=np.float32), target=np.arange(n) % 3,
                 target_names=np.array(["Ada Lovelace", "Alan Turing", "Grace Hopper"]))


def test_load_lfw_resizes_to_32x32_rgb_uint8(monkeypatch):
    calls = []

    def fetch(**kwargs):
        calls.append(kwargs)
        return fake_lfw()
    monkeypatch.setattr(lfw, "fetch_lfw_people", fetch)
    ds = lfw.load_lfw("/nowhere", test_fraction=0.25, seed=3)
    assert calls[0]["color"] is True and calls[0]["data_home"] == "/nowhere"
    assert ds.train_images.shape == (9, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.class_names == ("face",)
    assert int(ds.train_images.max()) > 200  # [0, 1] floats were scaled to 0..255
    again = lfw.load_lfw("/nowhere", test_fraction=0.25, seed=3)
    assert torch.equal(ds.test_images, again.test_images)


def test_to_square_uint8_keeps_a_constant_image_constant():
    faces = np.full((2, 62, 47, 3), 0.5, dtype=np.float32)
    out = lfw.to_square_uint8(faces, 32)
    assert out.shape == (2, 3, 32, 32) and set(out.unique().tolist()) <= {127, 128}  # 127.5 +- rounding


def test_load_lfw_fetch_failure_is_a_data_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("Data not found and `download_if_missing` is False")
    monkeypatch.setattr(lfw, "fetch_lfw_people", offline)
    with pytest.raises(DataError, match="LFW"):
        lfw.load_lfw(download=False)


def test_pick_pair_returns_two_different_images_of_the_asked_classes():
    from fmnist_core.core.data import make_generator
    from fmnist_core.chapters.vae import pick_pair
    labels = torch.tensor([0, 1, 1, 2, 0])
    images = torch.arange(5).view(5, 1, 1, 1).float()
    a, b = pick_pair(images, labels, 1, 1, make_generator(0))
    assert int(a) in (1, 2) and int(b) in (1, 2) and int(a) != int(b)
    a, b = pick_pair(images, labels, 2, 0, make_generator(0))
    assert int(a) == 3 and int(b) in (0, 4)
