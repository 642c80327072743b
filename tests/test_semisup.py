"""The semi-supervised chapter: the losses (labels only where given, no host synchronisation), M2's bounds
against a hand computation, the weights of the classification terms (Kingma et al.'s alpha), learning on tiny
data, every model trained through the one loop, exact resume, the labeled subset, the study's jobs, and a job
re-run in a fresh process giving the same bytes."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmnist_core.chapters.semisupervised import model as semisup
from fmnist_core.chapters.semisupervised import study
from fmnist_core.core.data import make_generator
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.generative import kl_divergence, reconstruction_loss
from fmnist_core.core.io import load_checkpoint, read_json
from fmnist_core.core.jobs import Job, load_job, run_job, source_hashes

from conftest import patterns, toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"latent_dim": 8, "branch_channels": (4, 8), "dropout": 0.1, "hidden": 16}
TINY = {"epochs": 1, "batch_size": 16, "lr": 3e-3, "val_size": 50, "num_labels": 20, "latent_dim": 8,
        "branch_channels": [4, 8], "unlabeled_ratio": 2, "device": "cpu", "eval_batch_size": 100, "tta": 0}
HISTORY_TERMS = {"semisup_vae": {"train_recon", "train_kl", "train_classification"},
                 "m2": {"train_labeled", "train_unlabeled", "train_classification"},
                 "encoder_only": {"train_classification"}, "cnn": {"train_accuracy"}}


def config(**overrides):
    """A tiny job's config, in float32 unless asked: the tests of the losses compare gradients to 1e-5."""
    return semisup.SemiSupConfig.from_overrides(TINY, {"dtype": "float32", **overrides})


def unit_batch(n=12, seed=0):
    images, labels = patterns(n, seed)
    return images.float() / 255, labels


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------ parameters
def test_config_refuses_bad_values():
    for overrides, name in [({"branch_channels": [8]}, "branch_channels"), ({"model": "m3"}, "model"),
                            ({"unlabeled_ratio": 0}, "unlabeled_ratio"), ({"alpha": -0.1}, "alpha"),
                            ({"class_weight": -1.0}, "class_weight"), ({"dropout": 1.0}, "dropout"),
                            ({"num_labels": 25}, "num_labels"), ({"label_smoothing": 0.1}, "label_smoothing")]:
        with pytest.raises(ConfigError, match=name):
            config(**overrides)
    for overrides, name in [({"models": ["m2", "m2"]}, "models"), ({"label_counts": [100], "focus_labels": 10},
                                                                  "focus_labels"), ({"alpha_study": [-1.0]}, "alpha_study")]:
        with pytest.raises(ConfigError, match=name):
            study.SemiSupStudyConfig.from_overrides(overrides)
    with pytest.raises(ConfigError, match="num_labels"):  # 200 labels need 20 of every class; the toy pool has 15
        semisup.semisup_splits(config(num_labels=200), toy_dataset())


def test_the_experiment_lists_only_what_the_study_reads():
    names = {row[0] for row in study.SemiSupStudyConfig.describe()}
    assert not names & {"num_labels", "label_seed", "seed", "label_smoothing", "model"}
    assert {"alpha", "class_weight", "alpha_study", "label_counts", "seeds"} <= names
    assert ("alpha", "float", 0.1) in [row[:3] for row in study.SemiSupStudyConfig.describe()]


# -------------------------------------------------------------------------------------------- models
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


# -------------------------------------------------------------------------------------------- losses
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
    assert float(losses["classification"].detach()) == 0.0
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


def _step_gradients(cfg, model, xl, yl, xu):
    """Gradients of one training step's loss (the step of ``cfg.model``), noise and dropout seeded alike."""
    model.zero_grad()
    torch.manual_seed(0)
    losses = semisup.make_step(cfg)(model, xl, yl, xu, make_generator(0))
    losses["loss"].backward()
    return losses, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("num_labels", [100, 5000])
def test_m2_weighs_the_mean_cross_entropy_by_alpha_whatever_the_label_count(num_labels):
    """Kingma et al.: J^alpha = sum L + sum U + 0.1 N * mean CE, i.e. per image 0.1 on the mean cross-entropy
    next to the per-image bounds; their code: beta = alpha n_tot / n_labeled per labeled image, / n_tot."""
    cfg = config(model="m2", num_labels=num_labels)
    assert cfg.alpha == 0.1 and semisup.classification_weight(cfg) == 0.1
    ce = torch.rand(num_labels, dtype=torch.float64)  # per labeled image; their code's weighting of it:
    n_tot = 55_000
    beta = cfg.alpha * n_tot / num_labels
    torch.testing.assert_close((beta * ce).sum() / n_tot, cfg.alpha * ce.mean())
    torch.manual_seed(1)
    model = semisup.M2(image_size=8, **SMALL).eval()  # 8x8 images: small bounds; eval: no dropout
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 10
    with_alpha, grads = _step_gradients(cfg, model, x[:4], y[:4], x[4:])
    _, grads_0 = _step_gradients(config(model="m2", num_labels=num_labels, alpha=0.0), model, x[:4], y[:4], x[4:])
    torch.testing.assert_close(with_alpha["loss"] - with_alpha["labeled"] - with_alpha["unlabeled"],
                               0.1 * with_alpha["classification"], rtol=0, atol=1e-4)
    model.zero_grad()
    F.cross_entropy(model.classify(x[:4]), y[:4]).backward()
    for p, g, g0 in zip(model.parameters(), grads, grads_0):
        gce = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g - g0, 0.1 * gce, rtol=1e-3, atol=1e-5 * float(g0.abs().max()) + 1e-7)


def test_the_semisup_vae_weight_is_its_own_parameter():
    for n in (100, 5000):
        assert semisup.classification_weight(config(model="semisup_vae", num_labels=n)) == semisup.SEMISUP_VAE_CLASS_WEIGHT
        assert semisup.classification_weight(config(model="semisup_vae", num_labels=n, class_weight=3.0,
                                                    alpha=7.0)) == 3.0
    assert semisup.classification_weight(config(model="encoder_only")) == 1.0


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


# ----------------------------------------------------------------------------------------------- data
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


# ------------------------------------------------------------------------------------------- training
class HostSync(AssertionError):
    pass


def refuse(name):
    def read_back(*_, **__):
        raise HostSync(f"{name} in a training step")
    return read_back


def test_a_training_step_reads_nothing_back_to_the_host(monkeypatch):
    ds = toy_dataset()
    for name in ("semisup_vae", "m2", "encoder_only"):
        cfg = config(model=name, augment=True)
        data = semisup.semisup_splits(cfg, ds)
        model = semisup.rebuild_semisup(semisup.semisup_meta(cfg, ds))
        algo = semisup.SemiSupervised(model, model, data, cfg)
        generator = make_generator(0)
        with monkeypatch.context() as patch:  # every Python-level way of reading a tensor back to the host
            for method in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
                patch.setattr(torch.Tensor, method, refuse(method))
            patch.setattr(torch, "nonzero", refuse("torch.nonzero"))
            for step in range(algo.steps_per_epoch + 1):  # into a second epoch and a second labeled pass
                loss, stats = algo.train_step(step, generator)
        assert loss.dim() == 0 and all(v.dim() == 0 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("name", semisup.SEMISUP_MODELS)
def test_every_model_trains_through_the_loop_and_is_evaluated(tmp_path, name):
    ds = toy_dataset()
    metrics = semisup.train_and_evaluate(config(model=name, tta=1), ds, tmp_path, log=quiet)
    for file in ("best.pt", "final.pt", "history.json", "history.csv", "labeled_indices.npz", "test_probs.npy",
                 "timings.json"):
        assert (tmp_path / file).exists()
    assert not (tmp_path / "last.pt").exists()  # the resume state goes when the run has finished
    history = read_json(tmp_path / "history.json")
    assert [r["epoch"] for r in history] == [1] and HISTORY_TERMS[name] | {"train_loss", "val_accuracy"} <= set(history[0])
    assert history[0]["step"] == 5  # ceil(150 unlabeled / (16 * 2)); the cnn's 20 labels tiled to 5 batches of 16
    assert np.array_equal(np.load(tmp_path / "labeled_indices.npz")["labeled"],
                          semisup.semisup_splits(config(), ds).labeled_idx)
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["config"]["input"] == ("standardised" if name == "cnn" else "unit")
    assert state["config"]["model"] == ("mycnn" if name == "cnn" else name)
    assert metrics["model"] == name and metrics["num_labels"] == 20 and metrics["best_epoch"] == 1
    assert metrics["val_accuracy"] == history[0]["val_accuracy"]
    rebuilt, _ = semisup.load_trained_semisup(tmp_path / "best.pt")
    probs = semisup.class_probabilities(rebuilt, state["config"], ds.test_images[:8].float() / 255, tta=2)
    assert probs.shape == (8, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(8))


def test_an_interrupted_run_resumes_exactly(tmp_path):
    ds, cfg = toy_dataset(), config(model="semisup_vae", epochs=3)

    def crash_at_epoch_2(line):
        if "epoch 2/3" in line:
            raise KeyboardInterrupt

    semisup.train_and_evaluate(cfg, ds, tmp_path / "whole", log=quiet)
    with pytest.raises(KeyboardInterrupt):
        semisup.train_and_evaluate(cfg, ds, tmp_path / "resumed", log=crash_at_epoch_2)
    logs = []
    semisup.train_and_evaluate(cfg, ds, tmp_path / "resumed", log=logs.append)
    assert any("resuming" in line for line in logs)
    whole, resumed = (load_checkpoint(tmp_path / part / "final.pt") for part in ("whole", "resumed"))
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_json(tmp_path / "whole" / "history.json")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"}
                     for r in read_json(tmp_path / "resumed" / "history.json")]


# ---------------------------------------------------------------------------------------------- jobs
def test_the_study_plans_model_label_count_seed_jobs_and_the_alpha_study(tmp_path):
    cfg = study.SemiSupStudyConfig.from_overrides({"models": ["m2", "cnn"], "label_counts": [0, 100],
                                                   "focus_labels": 100, "seeds": [3, 4], "alpha_study": [0.1, 10]})
    jobs = study.plan_jobs(cfg, tmp_path)
    labels = [job.label for job in jobs]
    assert len(labels) == len(set(labels)) == 2 * 2 * 2 + 1  # alpha = 0.1 is the main study's own M2 job
    assert labels[-1] == "m2_n100_s3_alpha10" and jobs[-1].info["parts"] == ["alpha"]
    shared = jobs[labels.index("m2_n100_s3")]
    assert shared.info["parts"] == ["main", "alpha"] and shared.config.alpha == 0.1
    alpha_job = jobs[-1].config
    assert (alpha_job.model, alpha_job.num_labels, alpha_job.seed, alpha_job.alpha) == ("m2", 100, 3, 10.0)
    for job in jobs:
        assert job.kind == "semisup" and job.out_dir == tmp_path / "models" / job.label
        assert job.config.label_seed == job.config.seed and job.config.class_weight == cfg.class_weight
    assert study.plan_jobs(study.SemiSupStudyConfig.from_overrides({"alpha_study": []}), tmp_path)[-1].info["parts"] == ["main"]


def test_a_job_rerun_in_a_fresh_process_gives_the_same_metrics_bytes(tmp_path):
    cfg = study.SemiSupStudyConfig.from_overrides({"epochs": 1, "batch_size": 20, "train_images": 100,
                                                   "val_size": 50, "test_images": 50, "label_counts": [20],
                                                   "focus_labels": 20, "latent_dim": 8, "branch_channels": [4, 8],
                                                   "device": "cpu", "tta": 1})
    job = Job("semisup", cfg.job_config("m2", 20, 0), tmp_path / "first", "m2")
    first = run_job(job, log=quiet)
    assert run_job(job, log=lambda line: pytest.fail(f"a finished job ran again: {line}")) == first
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(tmp_path / "first" / "job.json", again / "job.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as this process (one_thread)
    done = subprocess.run([sys.executable, "-m", "fmnist_core.core.jobs", str(again)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (again / "metrics.json").read_bytes() == (tmp_path / "first" / "metrics.json").read_bytes()
    assert load_job(again).key() == job.key()
    assert sorted(p.name for p in again.iterdir() if p.suffix == ".pt") == ["best.pt", "final.pt"]
    assert json.loads((again / "metrics.json").read_text())["classification_weight"] == 0.1


def test_the_job_key_covers_the_chapter_and_core_only():
    sources = set(source_hashes(["fmnist_core.chapters.semisupervised.model"]))
    assert {"fmnist_core/chapters/semisupervised/model.py", "fmnist_core/core/loop.py", "fmnist_core/core/supervised.py",
            "fmnist_core/core/generative.py"} <= sources
    assert not any(part in path for path in sources for part in ("vae.py", "classification.py", "fixmatch"))


def test_m2s_gate_keeps_the_unlabeled_bound_out_until_the_decoder_agrees_with_the_labels(monkeypatch):
    ds, cfg = toy_dataset(), config(model="m2", m2_warmup=2, m2_gate_every=3)
    checks = iter([(0.1, 0.5), (0.4, 0.5), (0.5, 0.5)])  # (decoder agreement, q(y|x) accuracy) per check
    seen = []

    def fake_agreement(model, x, y, generator, kl_weight):
        seen.append(len(x))
        return tuple(torch.tensor(v) for v in next(checks))

    monkeypatch.setattr(semisup, "m2_agreement", fake_agreement)
    data = semisup.semisup_splits(cfg, ds)
    model = semisup.rebuild_semisup(semisup.semisup_meta(cfg, ds))
    algo, generator = semisup.SemiSupervised(model, model, data, cfg), make_generator(0)
    full = []
    for step in range(12):
        _, stats = algo.train_step(step, generator)
        full.append(int(stats["full_objective"]))
        assert (stats["unlabeled"] != 0) == bool(full[-1])
    assert full == [0] * 8 + [1] * 4  # checks at steps 2, 5 and 8; open from the first that agrees
    assert seen == [min(semisup.M2_DIAGNOSTIC_IMAGES, cfg.val_size)] * 3 and algo.full_from == 8
    fresh = semisup.SemiSupervised(model, model, data, cfg)
    fresh.load_state_dict(algo.state_dict())
    assert fresh.full_from == 8


def test_without_a_gate_m2_takes_the_full_objective_from_the_end_of_its_warm_up():
    ds, cfg = toy_dataset(), config(model="m2", m2_warmup=3)
    data = semisup.semisup_splits(cfg, ds)
    model = semisup.rebuild_semisup(semisup.semisup_meta(cfg, ds))
    algo, generator = semisup.SemiSupervised(model, model, data, cfg), make_generator(0)
    assert [int(algo.train_step(step, generator)[1]["full_objective"]) for step in range(5)] == [0, 0, 0, 1, 1]


def test_the_page_reads_when_m2s_full_objective_began_from_the_history():
    records = [{"step": 32, "train_full_objective": 0.0}, {"step": 64, "train_full_objective": 0.25}]
    assert study.full_objective_from(records, 16) == 56
    assert study.full_objective_from([{"step": 32, "train_full_objective": 0.0}], 16) is None
    assert study.full_objective_from([{"step": 32}, {"step": 64}], 48) == 48  # a history from before the gate
    shut = [{"run": "m2_a", "phase": "labeled only"}, {"run": "m2_b", "phase": "labeled only"}]
    assert "stayed shut in all 2 M2 runs" in study.m2_schedule_words(16, 8, shut)
    opened = shut + [{"run": "m2_b", "phase": "full objective from step 56"}]
    assert "opened in 1 of 2 M2 runs: m2_b, full objective from step 56." in study.m2_schedule_words(16, 8, opened)
    assert "gate" not in study.m2_schedule_words(48, 0, shut)
    assert "from the first step, as Kingma" in study.m2_schedule_words(0, 0, [])


def test_m2_agreement_is_the_share_of_images_whose_lowest_bound_is_their_label():
    torch.manual_seed(0)
    model = semisup.M2(**SMALL).eval()
    x, y = unit_batch(12)
    agreement, accuracy = semisup.m2_agreement(model, x, y, make_generator(0))
    assert 0 <= float(agreement) <= 1 and float(accuracy) == float((model.classify(x).argmax(1) == y).float().mean())
    # without a generator z is the mean: the same bounds whichever way they are batched
    agreement, _ = semisup.m2_agreement(model, x, y)
    bounds = torch.stack([semisup.m2_labeled_bound(model, x, torch.full_like(y, k)) for k in range(10)])
    assert float(agreement) == pytest.approx(float((bounds.argmin(0) == y).float().mean()))
