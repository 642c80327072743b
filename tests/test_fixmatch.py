"""FixMatch: loss and mask, strong augmentation, batches, labeled subsets, EMA, schedule, exact resume, NaN stop,
the study's jobs, and a job re-run alone in a fresh process."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fmnist_core.core import loop
from fmnist_core.core import randaugment as ra
from fmnist_core.core.data import ImageDataset, Split, random_crop
from fmnist_core.core.errors import ConfigError, RunError
from fmnist_core.core.io import load_checkpoint, read_json
from fmnist_core.core.jobs import Job, run_job
from fmnist_core.core.loop import load_trained
from fmnist_core.core.models import rebuild
from fmnist_core.core.train import lr_factor, make_schedule
from fmnist_core.chapters.fixmatch import study
from fmnist_core.pipeline.runner import resolve_params
from fmnist_core.chapters.fixmatch.algorithm import (EMA, EpochStream, FixMatch, FixMatchBatches, FixMatchConfig,
                                                     fixmatch_loss, labeled_indices, median_of_last, train_fixmatch)

CLASSES = tuple(f"class {i}" for i in range(10))


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_dataset(n=100, channels=1, size=28, name="fashion_mnist", seed=0) -> ImageDataset:
    """Class c: a bright vertical band at columns 2c..2c+7 on dark noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, channels, size, size), generator=g, dtype=torch.uint8)
    for c in range(10):
        images[labels == c, :, :, 2 * c:2 * c + 8] += 150
    mean, std = (0.3,) * channels, (0.3,) * channels
    return ImageDataset(name, images, labels, images[:50].clone(), labels[:50].clone(), mean, std, CLASSES)


def config(**overrides) -> FixMatchConfig:
    base = {"backbone": "smallcnn", "steps": 6, "batch_size": 8, "mu": 2, "num_labels": 20, "log_every": 3,
            "eval_every": 3, "checkpoint_every": 2, "device": "cpu", "threshold": 0.22, "eval_images": 30,
            "val_size": 20}
    return FixMatchConfig.from_overrides(base, overrides)


def random_images(n=8, channels=1, size=28, seed=0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the loss
def test_confident_prediction_gives_pseudo_label_and_loss_unconfident_gives_none():
    logits_x, labels = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
    logits_weak = torch.tensor([[10.0, 0.0, 0.0],    # confident: p(0) > 0.99
                                [1.0, 0.9, 0.8],     # unconfident
                                [0.0, 0.0, 0.0],     # uniform
                                [0.0, 5.0, 0.0]],    # p(1) = 0.987
                               requires_grad=True)
    logits_strong = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                                 requires_grad=True)
    out = fixmatch_loss(logits_x, labels, logits_weak, logits_strong, threshold=0.95, lambda_u=2.0)
    assert out["mask"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out["pseudo_labels"][[0, 3]].tolist() == [0, 1]
    ce = F.cross_entropy(logits_strong.detach(), torch.tensor([0, 0, 0, 1]), reduction="none")
    # Averaged over all mu*B = 4 images, the two unconfident ones counting as zero.
    assert out["loss_u"].item() == pytest.approx((ce[0] + ce[3]).item() / 4, rel=1e-6)
    assert out["loss_u"].item() > 0
    assert out["loss"].item() == pytest.approx(F.cross_entropy(logits_x, labels).item() + 2 * out["loss_u"].item())
    out["loss"].backward()
    assert logits_weak.grad is None  # the pseudo-label is a target, not a path for gradients
    assert torch.all(logits_strong.grad[[1, 2]] == 0) and torch.any(logits_strong.grad[0] != 0)


def test_no_confident_prediction_means_zero_unlabeled_loss():
    logits_strong = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    out = fixmatch_loss(torch.zeros(2, 10), torch.tensor([1, 2]), torch.zeros(6, 10), logits_strong)
    assert out["mask"].sum() == 0 and out["loss_u"].item() == 0.0


# ------------------------------------------------------------------------------- strong augmentation
@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_changes_images_per_image_and_keeps_shape_dtype_range(channels):
    image = random_images(1, channels, 28)
    batch = image.repeat(32, 1, 1, 1)
    out = ra.rand_augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(batch, image.repeat(32, 1, 1, 1))  # the input is not modified in place
    distinct = {tuple(x.flatten().tolist()) for x in out}
    assert len(distinct) >= 28  # each copy draws its own ops, magnitudes and Cutout
    assert all(not torch.equal(x, image[0]) for x in out)  # Cutout alone changes every image


@pytest.mark.parametrize("channels", [1, 3])
def test_grouped_operations_on_the_cpu_give_the_images_of_the_batched_path(channels, monkeypatch):
    x = random_images(64, channels, 28)
    for seed in range(3):
        ops, u = ra.draw_ops(64, torch.Generator().manual_seed(seed), "cpu", torch.float32)
        grouped = ra.apply_ops_grouped(x, ops, u)
        monkeypatch.setattr(ra, "GROUPED_ON_CPU", False)
        batched = ra.apply_ops(x, ops, u)
        monkeypatch.setattr(ra, "GROUPED_ON_CPU", True)
        assert torch.equal(ra.apply_ops(x, ops, u), grouped)  # the CPU takes the grouped path
        torch.testing.assert_close(grouped, batched, rtol=0, atol=1e-5)


def test_rand_augment_is_reproducible_from_the_generator():
    x = random_images(16, 3, 32)
    a = ra.rand_augment(x, torch.Generator().manual_seed(5))
    b = ra.rand_augment(x, torch.Generator().manual_seed(5))
    c = ra.rand_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("index", range(len(ra.OPS)))
def test_every_op_keeps_shape_and_range_at_both_ends_of_its_magnitudes(index, channels):
    x = random_images(6, channels, 28, seed=index)
    x[0] = 0.0  # constant images: degenerate cases of AutoContrast, Equalize, Contrast
    x[1] = 1.0
    for u in (0.0, 0.999999):
        out = ra.apply_ops(x, torch.full((6,), index), torch.full((6,), u))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1, ra.OP_NAMES[index]


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_ops_equal_the_ops_applied_image_by_image(channels):
    g = torch.Generator().manual_seed(1)
    x = random_images(40, channels, 28, seed=2)
    ops, u = torch.randint(0, len(ra.OPS), (40,), generator=g), torch.rand(40, generator=g)
    batched = ra.apply_ops(x, ops, u)
    for i in range(40):
        k = int(ops[i])
        alone = ra.OPS[k][1](x[i:i + 1], ra.op_magnitude(k, u[i:i + 1]))
        assert torch.allclose(batched[i], alone[0], atol=1e-6), ra.OP_NAMES[k]


def test_identity_is_identity_and_color_is_identity_on_grey_images():
    x = random_images(4, 1)
    assert torch.equal(ra.apply_ops(x, torch.full((4,), ra.OP_NAMES.index("Identity")), torch.rand(4)), x)
    assert torch.equal(ra.color(x, torch.tensor([0.05, 0.3, 0.6, 0.95])), x)
    rgb = random_images(2, 3)
    desaturated = ra.color(rgb, 0.0)  # factor 0: the grey image, equal channels, ITU-R 601 luma
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert torch.allclose(desaturated, luma.unsqueeze(1).expand_as(rgb), atol=1e-6)


def test_magnitudes_follow_the_fixmatch_ranges():
    u = torch.tensor([0.0, 0.5, 0.999999])
    assert ra.op_magnitude(ra.OP_NAMES.index("Brightness"), u).tolist() == pytest.approx([0.05, 0.5, 0.95])
    assert ra.op_magnitude(ra.OP_NAMES.index("Posterize"), u).tolist() == [4, 6, 8]
    assert ra.op_magnitude(ra.OP_NAMES.index("Rotate"), u).tolist() == pytest.approx([-30, 0, 30], abs=1e-4)
    assert ra.op_magnitude(ra.OP_NAMES.index("TranslateX"), u).tolist() == pytest.approx([-0.3, 0, 0.3], abs=1e-6)


def test_equalize_posterize_solarize_and_rotate_match_pil():
    pixels = (np.random.default_rng(0).beta(2, 5, (2, 28, 28)) * 255).astype(np.uint8)
    x = torch.from_numpy(pixels).float().div(255).unsqueeze(1)

    def as_uint8(t):
        return (t * 255).round().byte().squeeze(1).numpy()

    pil = [Image.fromarray(p) for p in pixels]
    np.testing.assert_array_equal(as_uint8(ra.equalize(x)), [np.asarray(ImageOps.equalize(p)) for p in pil])
    np.testing.assert_array_equal(as_uint8(ra.posterize(x, torch.tensor([4, 6]))),
                                  [np.asarray(ImageOps.posterize(p, b)) for p, b in zip(pil, (4, 6))])
    np.testing.assert_array_equal(as_uint8(ra.solarize(x, 100 / 255)),
                                  [np.asarray(ImageOps.solarize(p, 100)) for p in pil])
    np.testing.assert_array_equal(as_uint8(ra.rotate(x, torch.tensor([25.0, -90.0]))),
                                  [np.asarray(p.rotate(a)) for p, a in zip(pil, (25.0, -90.0))])


def test_cutout_fills_a_grey_square_of_at_most_half_the_side():
    x = torch.zeros(64, 1, 28, 28)
    out = ra.cutout(x, torch.Generator().manual_seed(0), size=0.5)
    filled = (out == 0.5).flatten(1).sum(1)
    assert filled.min() >= 1 and filled.max() <= 14 * 14
    assert filled.float().median() < 14 * 14 / 2  # sides spread over 1..14
    assert torch.all((out == 0) | (out == 0.5))


def test_fixed_cutout_is_a_square_of_half_the_side_clipped_only_at_the_border():
    x = torch.zeros(400, 1, 28, 28)
    out = ra.cutout(x, torch.Generator().manual_seed(0), size=0.5, fixed=True)
    mask = out[:, 0] == 0.5
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
    assert torch.equal(mask.flatten(1).sum(1), rows * cols)  # one rectangle per image
    for covered, extent in ((mask.any(2), rows), (mask.any(1), cols)):
        first, last = covered.float().argmax(1), 27 - covered.flip(1).float().argmax(1)
        assert torch.all((extent == 14) | (first == 0) | (last == 27))  # 14 px unless cut by the border
    assert rows.max() == cols.max() == 14
    # Centres uniform over the 28 x 28 pixels: the whole square fits for 15 of 28 rows and of 28 columns.
    assert ((rows == 14) & (cols == 14)).float().mean() == pytest.approx((15 / 28) ** 2, abs=0.06)
    assert torch.all((out == 0) | (out == 0.5))


def test_the_authors_randaugment_skips_each_operation_half_the_time_and_draws_levels():
    g = torch.Generator().manual_seed(0)
    ops, _ = ra.draw_ops(20000, g, "cpu", torch.float32)
    skipped, u = ra.draw_ops(20000, g, "cpu", torch.float32, prob=0.5, levels=10)
    identity = ra.OP_NAMES.index("Identity")
    assert (ops == identity).float().mean() == pytest.approx(1 / 14, abs=0.01)
    assert (skipped == identity).float().mean() == pytest.approx(0.5 + 0.5 / 14, abs=0.015)
    brightness, rotate = ra.OP_NAMES.index("Brightness"), ra.OP_NAMES.index("Rotate")
    levels = torch.arange(1, 10) / 10
    factors = ra.op_magnitude(brightness, u[skipped == brightness])
    assert torch.allclose(factors.unique(), 0.05 + 0.9 * levels, atol=1e-5)  # 1..9 of 10 over the range
    angles = ra.op_magnitude(rotate, u[skipped == rotate])
    # The authors' Rotate: 3 * level degrees, either way.
    assert torch.allclose(angles.unique(), torch.cat([-30 * levels.flip(0), 30 * levels]), atol=1e-4)


def test_reflect_padding_mirrors_the_image_about_its_edge_pixels():
    x = torch.randint(0, 255, (30, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 3, torch.Generator().manual_seed(0), padding="reflect")
    g = torch.Generator().manual_seed(0)  # the same offsets: drawn first, in the same order
    dy, dx = (torch.randint(0, 7, (30, 1, 1), generator=g) for _ in range(2))
    padded = F.pad(x.float(), (3, 3, 3, 3), mode="reflect")
    expected = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(30)])
    assert torch.equal(out.float(), expected)
    zeros = random_crop(x, 3, torch.Generator().manual_seed(0))
    assert torch.equal(zeros.float(), torch.stack([F.pad(x.float(), (3, 3, 3, 3))[i, :, dy[i]:dy[i] + 8,
                                                                                dx[i]:dx[i] + 8] for i in range(30)]))


# ---------------------------------------------------------------------------------- batches, subsets
def test_weak_augmentation_leaves_labels_with_their_images():
    labels = torch.arange(40) % 10
    # Constant images whose grey level encodes the label: a translation of <= 3 px keeps the centre.
    images = (labels * 20 + 30).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    split = Split(images, labels.clone(), (0.0,), (1.0,))
    batches = FixMatchBatches(split, split, batch_size=16, mu=2, seed=0)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        batch = batches.draw(step, generator)
        index = batches.labeled_stream.indices(step)
        assert torch.equal(batch.labels, labels[index])
        centre = (batch.labeled[:, 0, 14, 14] * 255).round().long()
        assert torch.equal((centre - 30) // 20, batch.labels)
        assert torch.equal(((batch.weak[:, 0, 14, 14] * 255).round().long() - 30) // 20, batch.true_labels)
    assert torch.equal(split.labels, labels)  # the stored labels are untouched


def test_epoch_stream_covers_every_index_once_per_epoch_and_is_reproducible():
    stream = EpochStream(10, 4, seed=3, stream=0, device="cpu")
    drawn = torch.cat([stream.indices(k) for k in range(5)])  # 20 indices = two epochs, straddled
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    # A fresh stream (a resumed run) gives step 3's batch without having drawn steps 0-2.
    assert torch.equal(EpochStream(10, 4, 3, 0, "cpu").indices(3), drawn[12:16])
    assert not torch.equal(drawn, torch.cat([EpochStream(10, 4, 4, 0, "cpu").indices(k) for k in range(5)]))


def test_labeled_subsets_are_class_balanced_and_reproducible():
    labels = torch.arange(300) % 10
    a = labeled_indices(labels, 40, label_seed=1)
    assert np.bincount(labels[a].numpy(), minlength=10).tolist() == [4] * 10
    assert np.array_equal(a, labeled_indices(labels, 40, label_seed=1))
    assert not np.array_equal(a, labeled_indices(labels, 40, label_seed=2))
    with pytest.raises(ConfigError, match="num_labels"):
        labeled_indices(labels, 400, label_seed=0)  # 40 per class, only 30 exist
    with pytest.raises(ConfigError, match="num_labels"):
        config(num_labels=45)


@pytest.mark.parametrize("overrides, name", [({"epochs": 3}, "epochs"), ({"schedule": "step"}, "schedule"),
                                             ({"mu": 0}, "mu"), ({"threshold": 1.5}, "threshold"),
                                             ({"backbone": "vgg16"}, "backbone"), ({"dataset": "lfw"}, "dataset"),
                                             ({"randaugment": "paper"}, "randaugment"),
                                             ({"cutout": "square"}, "cutout"),
                                             ({"weak_padding": "edge"}, "weak_padding"),
                                             ({"median_last": 0}, "median_last")])
def test_config_refuses_impossible_values_and_parameters_fixmatch_does_not_have(overrides, name):
    with pytest.raises(ConfigError, match=name):
        config(**overrides)


# ------------------------------------------------------------------------------- EMA and schedule
def test_ema_update_follows_its_formula_and_copies_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # moves the running statistics
    ema.update(model)
    for name, p in model.named_parameters():
        assert torch.allclose(ema.state_dict()[name], 0.9 * before[name] + 0.1 * p, atol=1e-7)
    for name, b in model.named_buffers():
        assert torch.equal(ema.state_dict()[name], b)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


def test_learning_rate_follows_cos_7_pi_k_over_16_k():
    assert lr_factor("fixmatch", 0, 1000) == 1.0
    assert lr_factor("fixmatch", 500, 1000) == pytest.approx(math.cos(7 * math.pi / 32))
    assert lr_factor("fixmatch", 1000, 1000) == pytest.approx(math.cos(7 * math.pi / 16))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    schedule = make_schedule(optimizer, "fixmatch", 8)
    lrs = []
    for _ in range(9):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0.03 and lrs[4] == pytest.approx(0.03 * math.cos(7 * math.pi / 32))
    assert lrs[8] == pytest.approx(0.03 * math.cos(7 * math.pi / 16))


# --------------------------------------------------------------------------------- the algorithm
def quiet(*_):
    pass


def linear_fixmatch(cfg: FixMatchConfig | None = None, device="cpu", batch_norm: bool = False):
    """A :class:`FixMatch` on the toy data around a linear model (its own runnable), with batch norm or not."""
    ds = toy_dataset().to(device)
    split = Split(ds.train_images, ds.train_labels, ds.mean, ds.std)
    cfg = cfg or config()
    torch.manual_seed(0)
    norm = [torch.nn.BatchNorm1d(28 * 28)] if batch_norm else []
    model = torch.nn.Sequential(torch.nn.Flatten(), *norm, torch.nn.Linear(28 * 28, 10)).to(device)
    batches = FixMatchBatches(split, split, cfg.batch_size, cfg.mu, 0, cfg.supervised_only)
    return FixMatch(model, model, batches, split, cfg)


def record_passes(algo) -> list[tuple[int, bool]]:
    """(images, autograd on) of every forward pass of ``algo``'s model, as a list filled while it runs."""
    passes = []
    algo.model.register_forward_pre_hook(lambda module, args: passes.append((len(args[0]),
                                                                             torch.is_grad_enabled())))
    return passes


def test_with_batch_norm_one_step_is_one_forward_pass_over_labeled_weak_and_strong_images():
    algo = linear_fixmatch(batch_norm=True)
    passes = record_passes(algo)
    loss, stats = algo.train_step(0, torch.Generator().manual_seed(0))
    assert passes == [(8 + 2 * 16, True)] and loss.requires_grad and loss.dim() == 0
    assert set(stats) == {"loss_x", "loss_u", "correct", "masked", "masked_correct"}
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())  # summed by the loop, read once


def test_without_batch_norm_the_weak_view_runs_apart_without_autograd_and_the_loss_is_the_joint_passs():
    algo = linear_fixmatch(config(threshold=0.1))  # every pseudo-label counts: the strong view has gradients
    passes = record_passes(algo)
    loss, stats = algo.train_step(0, torch.Generator().manual_seed(0))
    assert passes == [(16, False), (8 + 16, True)]
    grads = torch.autograd.grad(loss, list(algo.model.parameters()))
    algo.joint_forward = True  # the same batch (same generator seed) through one pass of all three views
    joint, joint_stats = algo.train_step(0, torch.Generator().manual_seed(0))
    assert passes[2:] == [(8 + 2 * 16, True)]
    torch.testing.assert_close(loss, joint)
    for ours, theirs in zip(grads, torch.autograd.grad(joint, list(algo.model.parameters()))):
        torch.testing.assert_close(ours, theirs)
    assert {k: v.item() for k, v in stats.items()} == pytest.approx({k: v.item() for k, v in joint_stats.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is only observable on CUDA")
@pytest.mark.parametrize("supervised_only", [False, True])
def test_a_step_and_the_ema_update_never_wait_for_the_gpu(supervised_only):
    algo = linear_fixmatch(config(supervised_only=supervised_only), "cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):  # the first draws of the index streams and RandAugment included
            loss, _ = algo.train_step(step, generator)
            loss.backward()
            algo.after_step(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_baseline_forward_pass_sees_labeled_images_only():
    algo = linear_fixmatch(config(supervised_only=True))
    loss, stats = algo.train_step(0, torch.Generator().manual_seed(0))
    assert stats["loss_x"] == loss.detach() and stats["loss_u"] == 0 and stats["masked"] == 0


def test_the_evaluated_and_resumable_model_is_the_ema():
    algo = linear_fixmatch()
    algo.after_step(0)
    assert algo.evaluated_model() is algo.ema.model
    assert set(algo.evaluate()) == {"ema_test_loss", "ema_test_accuracy"}
    state = algo.state_dict()
    with torch.no_grad():
        algo.ema.model[1].weight.zero_()
    algo.load_state_dict(state)
    assert torch.equal(algo.ema.model[1].weight, state["ema"]["1.weight"])


# ----------------------------------------------------------------------------------- training runs
def kill_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the loop die (as on Ctrl-C) right after it wrote ``last.pt`` at ``step``."""
    original = loop.Checkpointer.save_last

    def save_then_die(self, **state):
        original(self, **state)
        if state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save_last", save_then_die)


def test_training_writes_history_checkpoints_and_leaves_labels_alone(tmp_path):
    ds = toy_dataset()
    labels = ds.train_labels.clone()
    # float32: the rebuilt model below is compared bit for bit (bf16 runs keep channels-last weights).
    ema_model, history = train_fixmatch(config(dtype="float32"), ds, tmp_path, log=quiet)
    assert torch.equal(ds.train_labels, labels)
    assert [r["step"] for r in history] == [3, 6]
    assert list(history[0]) == ["step", "lr", "loss", "loss_x", "loss_u", "mask_ratio", "pseudo_label_accuracy",
                                "confident_accuracy", "ema_val_loss", "ema_val_accuracy", "ema_test_loss",
                                "ema_test_accuracy", "seconds"]
    # The record's lr is that of its last step (k = 2 of K = 6) on FixMatch's schedule.
    assert history[0]["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * 2 / (16 * 6)))
    assert history[-1]["ema_test_accuracy"] is not None
    assert any(r["mask_ratio"] > 0 and r["loss_u"] > 0 for r in history)  # the unlabeled loss took part
    saved = np.load(tmp_path / "labeled_indices.npz")
    # The validation split is held out: the labels are drawn from the other training images, never from it.
    assert len(saved["validation"]) == 20 and not set(saved["labeled"]) & set(saved["validation"])
    assert np.array_equal(saved["labeled"], labeled_indices(ds.train_labels, 20, 0, pool=np.setdiff1d(
        np.arange(len(ds.train_labels)), saved["validation"])))
    assert history[-1]["ema_val_accuracy"] is not None
    best = load_checkpoint(tmp_path / "best.pt")  # the final EMA weights: the reported model
    assert best["step"] == 6 and best["record"] == history[-1]
    for name, value in ema_model.state_dict().items():
        assert torch.equal(best["model"][name], value)
    rebuilt, _ = load_trained(tmp_path / "best.pt", rebuild)
    assert torch.equal(rebuilt(ds.test_images[:4].float()), ema_model(ds.test_images[:4].float()))
    for name in ("history.json", "history.csv", "final.pt"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "last.pt").exists()  # the resume state goes when the run has finished


def test_supervised_baseline_uses_labeled_images_only(tmp_path):
    _, history = train_fixmatch(config(supervised_only=True, steps=3, eval_every=0, log_every=2), toy_dataset(),
                                tmp_path, log=quiet)
    assert [r["step"] for r in history] == [2, 3]
    assert history[-1]["loss_u"] == 0 and history[-1]["mask_ratio"] is None
    assert history[0]["ema_test_accuracy"] is None and history[-1]["ema_test_accuracy"] is not None


def test_resumed_run_matches_an_uninterrupted_one_exactly(tmp_path, monkeypatch):
    logs = []
    cfg = config(steps=4)
    full_model, full_history = train_fixmatch(cfg, toy_dataset(), tmp_path / "full", log=logs.append)
    kill_after_checkpoint(monkeypatch, 2)  # mid-way through a history window (log_every 3)
    with pytest.raises(KeyboardInterrupt):
        train_fixmatch(cfg, toy_dataset(), tmp_path / "killed", log=logs.append)
    monkeypatch.undo()
    resumed_model, resumed_history = train_fixmatch(cfg, toy_dataset(), tmp_path / "killed", log=logs.append)

    assert any("resuming" in line and "step 2" in line for line in logs)
    assert [r["step"] for r in resumed_history] == [3, 4]
    for name, value in full_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name
    full_final, resumed_final = (load_checkpoint(tmp_path / run / "final.pt")["model"] for run in ("full", "killed"))
    assert all(torch.equal(resumed_final[name], value) for name, value in full_final.items())

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(resumed_history) == strip(full_history)


def test_a_changed_config_starts_afresh(tmp_path, monkeypatch):
    kill_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_fixmatch(config(steps=2), toy_dataset(), tmp_path, log=quiet)
    monkeypatch.undo()
    logs = []
    train_fixmatch(config(steps=2, lr=0.01), toy_dataset(), tmp_path, log=logs.append)
    assert logs and not any("resuming" in line for line in logs)


def test_a_non_finite_loss_stops_at_the_interval_boundary_naming_the_steps(tmp_path, monkeypatch):
    honest = FixMatch.train_step

    def poisoned(self, step, generator):
        loss, stats = honest(self, step, generator)
        return (loss * float("nan") if step == 2 else loss), stats

    monkeypatch.setattr(FixMatch, "train_step", poisoned)
    with pytest.raises(RunError, match=r"loss is nan in steps 1-3; training stopped \(last good checkpoint kept\)"):
        train_fixmatch(config(), toy_dataset(), tmp_path, log=quiet)
    kept = load_checkpoint(tmp_path / "last.pt")  # written after step 2, never overwritten by the NaN
    assert kept["step"] == 2
    assert all(torch.isfinite(v).all() for v in [*kept["model"].values(), *kept["algorithm"]["ema"].values()]
               if v.is_floating_point())
    assert not (tmp_path / "best.pt").exists()


def test_dataset_name_must_match_the_config(tmp_path):
    with pytest.raises(ConfigError, match="dataset"):
        train_fixmatch(config(), toy_dataset(name="cifar10"), tmp_path, log=quiet)


def test_cifar10_shaped_data_runs_with_wrn28_2(tmp_path):
    ds = toy_dataset(n=40, channels=3, size=32, name="cifar10")
    cfg = config(dataset="cifar10", backbone="wrn28_2", batch_size=2, mu=1, steps=2, num_labels=10,
                 log_every=1, eval_images=10, eval_batch_size=10)
    model, history = train_fixmatch(cfg, ds, tmp_path, log=quiet)
    assert [r["step"] for r in history] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in history)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_the_reported_median_is_over_the_last_evaluations_only():
    history = [{"ema_test_accuracy": None}, {"ema_test_accuracy": 0.1}, {"ema_test_accuracy": 0.5},
               {"ema_test_accuracy": None}, {"ema_test_accuracy": 0.9}, {"ema_test_accuracy": 0.6}]
    assert median_of_last(history, 3) == (0.6, 3)  # 0.5, 0.9, 0.6; records without an evaluation skipped
    assert median_of_last(history, 2) == (0.75, 2)
    assert median_of_last(history, 20) == (0.55, 4)  # fewer evaluations than asked for: all of them
    with pytest.raises(ValueError, match="ema_test_accuracy"):
        median_of_last([{"ema_test_accuracy": None}], 20)


@pytest.mark.parametrize("profile", ["smoke", "quick", "standard", "paper"])
def test_the_page_reads_each_profile_as_the_runner_does(profile):
    assert study.profile_params(profile) == resolve_params("fixmatch", profile)


def test_the_paper_profile_is_the_authors_protocol():
    paper = study.profile_params("paper")
    assert (paper["steps"], paper["batch_size"], paper["mu"], paper["backbone"]) == (2 ** 20, 64, 7, "wrn28_2")
    assert len(paper["seeds"]) == 5 and paper["label_counts"] == [40, 250, 4000]
    # google-research/fixmatch: an evaluation every 64 kimg (1,024 steps of 64), the median of the last 20.
    assert paper["eval_every"] == 1024 and paper["median_last"] == 20
    assert (paper["randaugment"], paper["cutout"], paper["weak_padding"]) == ("authors", "fixed", "reflect")
    assert "1,024 per run; the median of the last 20" in study.protocol(paper)


# ------------------------------------------------------------------------------------------------ jobs
def test_a_job_rerun_alone_in_a_fresh_process_gives_byte_identical_metrics(tmp_path):
    cfg = config(num_labels=20, steps=2, log_every=2, eval_every=0, eval_images=50)  # on Fashion-MNIST itself
    job = Job("fixmatch", cfg, tmp_path / "run" / "fixmatch_n20_s0")
    metrics = run_job(job, log=quiet)
    assert metrics == read_json(job.out_dir / "metrics.json")
    assert (metrics["num_labels"], metrics["steps"], metrics["supervised_only"]) == (20, 2, False)
    # One evaluation (at the end): the authors' median of the last 20 is the final EMA model's accuracy.
    assert metrics["median_evaluations"] == 1 and metrics["median_test_accuracy"] == metrics["test_accuracy"]
    assert metrics["augmentation"] == "RandAugment authors, Cutout fixed, reflect padding"
    assert {"best.pt", "final.pt", "history.json", "timings.json", "labeled_indices.npz", "done.json"} <= {
        p.name for p in job.out_dir.iterdir()} and not (job.out_dir / "last.pt").exists()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(job.out_dir / "job.json", alone / "job.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the thread count of this test
    rerun = subprocess.run([sys.executable, "-m", "fmnist_core.core.jobs", str(alone)], capture_output=True,
                           text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert (alone / "metrics.json").read_bytes() == (job.out_dir / "metrics.json").read_bytes()


def test_the_ceiling_takes_a_fixmatch_steps_images_for_its_own_steps(tmp_path):
    from fmnist_core.chapters.fixmatch.study import FixMatchStudyConfig, plan_jobs
    base = {"device": "cpu", "steps": 40, "batch_size": 4, "mu": 3, "label_counts": [40], "seeds": [0]}
    jobs = {j.info["method"]: j.config for j in plan_jobs(FixMatchStudyConfig.from_overrides(base), tmp_path)}
    assert (jobs["fully supervised"].steps, jobs["fully supervised"].batch_size) == (40, 16)  # 0: the same steps
    assert (jobs["fixmatch"].steps, jobs["fixmatch"].batch_size) == (40, 4)
    own = plan_jobs(FixMatchStudyConfig.from_overrides(base, {"ceiling_steps": 120}), tmp_path)
    assert [j.config.steps for j in own] == [40, 40, 120]
    with pytest.raises(ConfigError, match="ceiling_steps"):
        FixMatchStudyConfig.from_overrides(base, {"ceiling_steps": -1})


def test_a_label_count_named_single_seed_runs_on_the_first_seed_only_and_the_protocol_says_so(tmp_path):
    from fmnist_core.chapters.fixmatch.study import FixMatchStudyConfig, plan_jobs, protocol
    base = {"device": "cpu", "steps": 40, "label_counts": [40, 4000], "seeds": [10, 11, 12], "ceiling_labels": 0}
    cfg = FixMatchStudyConfig.from_overrides(base, {"single_seed_counts": [4000]})
    runs = [(j.info["method"], j.info["num_labels"], j.info["seed"]) for j in plan_jobs(cfg, tmp_path)]
    assert [r for r in runs if r[1] == 40] == [(m, 40, s) for s in (10, 11, 12) for m in ("fixmatch",
                                                                                          "supervised-only")]
    assert [r for r in runs if r[1] == 4000] == [("fixmatch", 4000, 10), ("supervised-only", 4000, 10)]
    assert "3 seed(s) (10, 11, 12; at 4,000 labels the first only)" in protocol(cfg.to_dict())
    assert "the first only" not in protocol(FixMatchStudyConfig.from_overrides(base).to_dict())
    elsewhere = FixMatchStudyConfig.from_overrides(base, {"single_seed_counts": [250]})  # not run: no effect
    assert len(plan_jobs(elsewhere, tmp_path)) == 12
    with pytest.raises(ConfigError, match="single_seed_counts"):
        FixMatchStudyConfig.from_overrides(base, {"single_seed_counts": [-40]})


def test_end_of_run_diagnostics_average_the_last_logged_steps_over_seeds():
    def run(seed, values):
        return {"method": "fixmatch", "num_labels": 40, "seed": seed,
                "history": [{"step": i, "mask_ratio": v, "confident_accuracy": None} for i, v in enumerate(values)]}
    rows = [run(0, [0.0] * 18 + [0.4, 0.6]), run(1, [0.0] * 18 + [0.8, 0.8]),
            {**run(2, [1.0] * 20), "num_labels": 250}]
    assert study.end_of_run(rows, "fixmatch", 40, "mask_ratio") == pytest.approx((0.5 + 0.8) / 2)
    assert study.end_of_run(rows, "fixmatch", 40, "confident_accuracy") is None
    assert study.end_of_run(rows, "supervised-only", 40, "mask_ratio") is None
