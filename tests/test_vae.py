"""The VAE chapter: shapes, the report's exact network, the closed-form KL, learning, interpolation endpoints,
seeded sampling, training through the loop (resumed exactly), the ``vae`` job (the same bytes in a fresh
process), the study's plan, and loading LFW (with scikit-learn's fetcher faked)."""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.utils import Bunch
from torch import nn

from fmnist_core.core import lfw
from fmnist_core.chapters import vae
from fmnist_core.core.data import make_generator
from fmnist_core.core.errors import ConfigError, DataError
from fmnist_core.core.io import load_checkpoint
from fmnist_core.core.jobs import Job, load_job, run_job

from conftest import patterns, toy_dataset


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Every test here on one thread: tiny convolutions on a shared 2-core CPU run many times faster so."""


@pytest.mark.parametrize("architecture", ["report", "deep"])
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


class ReportVAE(nn.Module):
    """The network of the LeNet / layer-wise / VAE report, as its listing (section 2.1.1) writes it."""

    def __init__(self, input_channel, height, width, latent_dim):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(input_channel, 16, kernel_size=3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.fc_mean = nn.Linear(32 * (height // 4) * (width // 4), latent_dim)
        self.fc_log_var = nn.Linear(32 * (height // 4) * (width // 4), latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 32 * (height // 4) * (width // 4)),
                                     nn.Unflatten(1, (32, height // 4, width // 4)), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 16, kernel_size=4, stride=2, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(16, input_channel, kernel_size=4, stride=2, padding=1),
                                     nn.Sigmoid())


# Our parameter names -> the listing's (the same tensors in the same order of use).
REPORT_NAMES = {"encoder.0": "encoder.0", "encoder.2": "encoder.2", "fc_mu": "fc_mean", "fc_logvar": "fc_log_var",
                "fc_decode": "decoder.0", "decoder.0": "decoder.3", "decoder.2": "decoder.5"}


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_report_architecture_is_the_reports_network(channels, size):
    torch.manual_seed(0)
    ours = vae.VAE(channels, size, latent_dim=20, channels=16, architecture="report").eval()
    theirs = ReportVAE(channels, size, size, 20).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    state = {REPORT_NAMES[k.rpartition(".")[0]] + "." + k.rpartition(".")[2]: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)  # strict: every tensor has its counterpart, of the same shape
    x = torch.rand(4, channels, size, size)
    with torch.no_grad():
        h = theirs.encoder(x)
        assert h.shape == (4, 32 * (size // 4) ** 2)  # 2048 for 3x32x32, as the listing's comment says
        mu, logvar = ours.encode(x)
        torch.testing.assert_close(mu, theirs.fc_mean(h), rtol=0, atol=0)
        torch.testing.assert_close(logvar, theirs.fc_log_var(h), rtol=0, atol=0)
        torch.testing.assert_close(ours.decode(mu), theirs.decoder(mu), rtol=0, atol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ours.modules())


def test_describe_states_the_layers_of_the_built_network():
    report = vae.describe(vae.VAE(1, 28, latent_dim=20, channels=16, architecture="report"))
    assert report == ("encoder: 3×3 convolution 1→16 (stride 2, padding 1), ReLU, 3×3 convolution 16→32 "
                      "(stride 2, padding 1), ReLU; linear 1568→20 to μ and another to log σ²; decoder: linear "
                      "20→1568, ReLU, 4×4 transposed convolution 32→16 (stride 2, padding 1), ReLU, 4×4 "
                      "transposed convolution 16→1 (stride 2, padding 1), sigmoid")
    deep = vae.describe(vae.VAE(1, 28, latent_dim=2, channels=8, architecture="deep"))
    assert deep.startswith("encoder: 3×3 convolution 1→8 (stride 1, padding 1), batch norm, ReLU, 4×4 convolution "
                           "8→16 (stride 2, padding 1), batch norm") and "linear 1568→2" in deep


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
    assert (cfg.weight_decay, cfg.optimizer, cfg.lr, cfg.schedule) == (0.0, "adam", 1e-3, "constant")
    assert (cfg.architecture, cfg.channels, cfg.latent_dim) == ("report", 16, 20)
    assert cfg.interpolation_pairs == [[7, 9], [0, 3], [7, 7], [1, 1]]
    names = {f.name for f in dataclasses.fields(vae.VAEConfig)}
    assert not names & {"augment", "label_smoothing"}  # a VAE reads neither
    for bad in ({"recon_loss": "l1"}, {"architecture": "seed"}, {"interpolation_steps": 5}, {"beta": -1.0},
                {"interpolation_pairs": [[7, 10]]}, {"dataset": "lfw"}, {"latent_sizes": [2, 0]},
                {"augment": False}, {"seed": -1}):
        with pytest.raises(ConfigError):
            vae.VAEConfig.from_overrides(bad)
    assert vae.VAEConfig.from_overrides({"dataset": "lfw", "interpolation_pairs": [[0, 0]]}).dataset == "lfw"


def test_job_configs_are_narrowed_from_the_chapter_config():
    cfg = vae.VAEConfig.from_overrides({"epochs": 7, "study_epochs": 2, "latent_dim": 5, "beta": 2.0})
    main = cfg.job_config()
    assert type(main) is vae.VAEJobConfig and (main.epochs, main.latent_dim, main.beta) == (7, 5, 2.0)
    study = cfg.study_config(3)
    assert (study.epochs, study.latent_dim, study.beta) == (2, 3, 2.0)
    job_fields = {f.name for f in dataclasses.fields(vae.VAEJobConfig)}
    assert set(study.to_dict()) == job_fields and "latent_sizes" not in job_fields
    jobs = vae.plan_jobs(vae.VAEConfig.from_overrides({"latent_sizes": [2, 8]}), "run")
    assert [(j.kind, j.label, j.out_dir.as_posix(), j.config.latent_dim) for j in jobs] == [
        ("vae", "main", "run/models/main", 20), ("vae", "latent_2", "run/models/latent_2", 2),
        ("vae", "latent_8", "run/models/latent_8", 8)]


def test_train_vae_writes_checkpoints_history_and_reloads(tmp_path):
    ds = toy_dataset()
    cfg = vae.VAEJobConfig.from_overrides({"epochs": 2, "batch_size": 50, "val_size": 50, "device": "cpu",
                                           "channels": 8, "kl_warmup_epochs": 1, "eval_batch_size": 50,
                                           "latent_dim": 3})
    model, history, splits = vae.train_vae(cfg, ds, tmp_path, log=lambda *_: None)
    assert (len(splits.train.images), len(splits.val.images)) == (150, 50)
    for name in ("best.pt", "final.pt", "history.json", "history.csv"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "last.pt").exists()  # the resume state goes when training finishes
    assert json.loads((tmp_path / "history.json").read_text()) == history
    for split in ("train", "val"):
        assert all(math.isfinite(history[-1][f"{split}_{k}"]) for k in ("loss", "recon", "kl"))
    # Warm-up over the first epoch's 3 steps: weight 2/3 at its last step, beta from then on.
    assert [r["train_kl_weight"] for r in history] == pytest.approx([2 / 3, 1.0])
    assert [r["step"] for r in history] == [3, 6] and [r["epoch"] for r in history] == [1, 2]
    assert history[-1]["val_loss"] == pytest.approx(history[-1]["val_recon"] + history[-1]["val_kl"])
    loaded, state = vae.load_trained_vae(tmp_path / "best.pt")
    assert loaded.latent_dim == 3 and state["record"]["val_loss"] == min(r["val_loss"] for r in history)
    again = vae.validation_stats(loaded, splits.val.images, cfg)
    assert again["loss"] == pytest.approx(state["record"]["val_loss"], rel=1e-5)
    assert vae.latent_means(loaded, splits.val.images, batch_size=20).shape == (50, 3)
    final, _ = vae.load_trained_vae(tmp_path / "final.pt")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), model.state_dict().values()))


def test_train_step_statistics_are_per_image_means():
    torch.manual_seed(0)
    cfg = vae.VAEJobConfig.from_overrides({"batch_size": 4, "beta": 0.5, "channels": 4, "latent_dim": 2})
    model = vae.VAE(latent_dim=2, channels=4)
    images = patterns(10)[0]
    algo = vae.VAETraining(model, model, images, images, cfg, warmup_steps=0)
    stats = [algo.train_step(step, torch.Generator().manual_seed(0))[1] for step in range(3)]
    sums = {k: float(sum(s[k] for s in stats)) for k in stats[0]}  # as the loop reads them back
    assert sums["count"] == 10  # batches of 4, 4 and 2 images
    record = algo.summarize(sums, 3)
    assert record["train_loss"] == pytest.approx(sums["loss_sum"] / 10)
    assert record["train_loss"] == pytest.approx(record["train_recon"] + 0.5 * record["train_kl"], rel=1e-5)
    assert record["train_kl_weight"] == 0.5


def strip_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def tiny_job(out_dir, **overrides) -> Job:
    cfg = vae.VAEJobConfig.from_overrides({"epochs": 2, "train_images": 100, "val_size": 100, "batch_size": 50,
                                           "device": "cpu", "channels": 4, "latent_dim": 3, "kl_warmup_epochs": 1,
                                           "eval_batch_size": 2000, **overrides})
    return Job("vae", cfg, out_dir)


class Interrupt(Exception):
    pass


def interrupt_at_record(n):
    records = []

    def log(line):
        records.append(line)
        if len(records) == n:
            raise Interrupt(line)
    return log


def test_vae_job_resumed_after_epoch_one_equals_an_uninterrupted_one(tmp_path):
    whole = run_job(tiny_job(tmp_path / "whole"), log=lambda *_: None)
    job = tiny_job(tmp_path / "resumed")
    with pytest.raises(Interrupt):  # stopped at epoch 2's record, before its checkpoint: last.pt is epoch 1's
        run_job(job, log=interrupt_at_record(2))
    assert load_checkpoint(job.out_dir / "last.pt")["step"] == 2 and not (job.out_dir / "metrics.json").exists()
    lines = []
    assert run_job(job, log=lines.append) == whole
    assert lines[0].startswith("resuming from") and len(lines) == 2
    assert (job.out_dir / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
    assert strip_seconds(json.loads((job.out_dir / "history.json").read_text())) == strip_seconds(
        json.loads((tmp_path / "whole" / "history.json").read_text()))
    for name in ("best.pt", "final.pt"):
        a, b = load_checkpoint(job.out_dir / name), load_checkpoint(tmp_path / "whole" / name)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_vae_job_gives_the_same_metrics_bytes_in_a_fresh_process(tmp_path):
    job = tiny_job(tmp_path / "first", epochs=1)
    metrics = run_job(job, log=lambda *_: None)
    assert metrics["latent_dim"] == 3 and metrics["train_images"] == 100 and metrics["best_epoch"] == 1
    assert metrics["test"]["neg_elbo"] == pytest.approx(metrics["test"]["recon"] + metrics["test"]["kl"])
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(job.out_dir / "job.json", again / "job.json")
    assert load_job(again).config == job.config
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the one_thread fixture: the same reductions
    done = subprocess.run([sys.executable, "-m", "fmnist_core.core.jobs", str(again)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (again / "metrics.json").read_bytes() == (job.out_dir / "metrics.json").read_bytes()
    assert json.loads((again / "done.json").read_text())["key"] == job.key()


def test_train_vae_rejects_a_split_that_does_not_fit(tmp_path):
    cfg = vae.VAEJobConfig.from_overrides({"epochs": 1, "val_size": 55, "device": "cpu"})
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
