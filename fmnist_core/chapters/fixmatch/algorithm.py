"""FixMatch (Sohn et al. 2020): semi-supervised training from a few labels, on device-resident tensors.

Each step takes ``B`` labeled images (weak augmentation) and ``mu * B`` unlabeled images, each seen twice:
weakly augmented (flip and a translation of up to ``int(0.125 * side)`` pixels per axis, :func:`weak_pad`:
3 of 28 = 10.7 % on Fashion-MNIST, 4 of 32 = 12.5 % on CIFAR-10; reflect-padded as in the authors' code or
zero-padded: ``weak_padding``) and strongly augmented (the weak augmentation, then RandAugment and Cutout,
:mod:`fmnist_core.core.randaugment`, in the authors' variant or USB/TorchSSL's: ``randaugment``, ``cutout``).
The three groups go through the network in one concatenated forward pass, so batch-norm statistics see
them together (on one device, the reference code's interleaving for multi-GPU batch norm is not needed). The loss is

    L = CE(labeled) + lambda_u * mean_over_mu*B( 1[max p_weak >= tau] * CE(strong logits, argmax p_weak) ),

with the weak-view prediction taken without gradient. SGD with Nesterov momentum, weight decay on weights
only (:func:`fmnist_core.core.train.parameter_groups`), learning rate ``lr * cos(7 pi k / 16 K)`` over ``K`` steps
(the loop's ``"fixmatch"`` schedule), and an exponential moving average (EMA) of the weights, which is the
evaluated and reported model: the final EMA model, never one chosen on the test set, and beside it the
authors' reported number, the median EMA test accuracy of the last 20 evaluations (``median_last``).

Sampling: the labeled and the unlabeled images are each read in shuffled epochs (every image once per
epoch, a fresh permutation each epoch, epochs concatenated so batches may straddle two), like the reference
implementations' shuffled, repeated data sets. Each epoch's permutation comes from its own generator seeded
by ``(seed, stream, epoch)``, so a batch depends only on the step number and a resumed run needs no sampler
state. A validation split (``val_size`` class-balanced training images, the same for every run) is held out: it
is never labeled nor in the unlabeled set, the EMA model is evaluated on it beside the test set, and settings are
chosen on it. The unlabeled set is all the other training images, the labeled ones included (as in the paper).

Training is the :class:`FixMatch` algorithm run by :func:`fmnist_core.core.loop.train` (seeding, updates,
history, NaN stop, checkpoints and exact resume are the loop's); a run is the ``fixmatch`` job kind
(:func:`run_fixmatch`). A job folder holds ``labeled_indices.npz``, ``history.json``/``.csv``, ``best.pt``
(the final EMA weights: the reported model), ``final.pt`` (the final trained weights), ``timings.json`` and
``metrics.json`` (the final EMA model's test metrics).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmnist_core.core import loop
from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import (PADDINGS, TRAIN_IMAGES, ImageDataset, Split, balanced_subset, channel_tensor,
                                   job_dataset, permutation, save_indices, stratified_split, subset, weak_augment)
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.io import write_json
from fmnist_core.core.jobs import job_kind
from fmnist_core.core.loop import Algorithm, Plan
from fmnist_core.core.models import build_model, model_meta
from fmnist_core.core.randaugment import rand_augment
from fmnist_core.core.train import (OptimizerConfig, RuntimeConfig, autocast_context, evaluate, prepare_model,
                                    resolve_device, resolve_dtype)

DATASETS = ("fashion_mnist", "cifar10")
BACKBONES = ("smallcnn", "wrn28_2", "lenet_avg", "lenet_max")
SCHEDULE = "fixmatch"  # lr * cos(7 pi k / 16 K): FixMatch's schedule is part of the method, not a parameter
EVAL_SUBSET_SEED = 0  # the same class-balanced test subset for every run when eval_images > 0
# RandAugment variants: (probability that each operation is applied, magnitude levels; 0 = continuous)
RANDAUGMENT_VARIANTS = {"authors": (0.5, 10), "always": (1.0, 0)}
CUTOUT_VARIANTS = ("fixed", "random")
CUTOUT_SIZE = 0.5  # Cutout side (or its largest value) as a fraction of the image side, in every variant


# ------------------------------------------------------------------------------------------- parameters
@dataclass
class FixMatchMethod(Config):
    """FixMatch's own parameters: data, backbone, step budget, loss, EMA, the intervals of a run, the reported
    median, and the augmentation variants (the defaults are the authors' code: google-research/fixmatch)."""

    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10")
    backbone: str = param("wrn28_2", "wrn28_2 (the paper's) | smallcnn | lenet_avg | lenet_max (CPU budgets)")
    batch_size: int = param(64, "B: labeled images per step")
    steps: int = param(2 ** 20, "K: optimiser steps (the paper: 2^20)")
    mu: int = param(7, "unlabeled images per labeled image in a step")
    threshold: float = param(0.95, "tau: confidence a pseudo-label needs to count")
    lambda_u: float = param(1.0, "weight of the unlabeled loss")
    ema_decay: float = param(0.999, "decay of the exponential moving average of the weights")
    log_every: int = param(256, "steps between history records")
    eval_every: int = param(1024, "steps between EMA test-accuracy points (a diagnostic curve); "
                                  "0 = only at the end")
    checkpoint_every: int = param(1024, "steps between resumable checkpoints")
    eval_images: int = param(0, "test images (class-balanced) for the EMA accuracy; 0 = all")
    val_size: int = param(5000, "training images held out as the validation split (class-balanced, the same for "
                                "every run): never labeled, never in the unlabeled set; the EMA model is evaluated "
                                "on it beside the test set, and settings are chosen on it, never on the test set")
    median_last: int = param(20, "the reported number beside the final EMA model's: the median EMA test accuracy "
                                 "of the last this-many evaluations (the authors' protocol: 20)")
    randaugment: str = param("authors", "authors: each of the 2 operations applied with probability 0.5 at a random "
                                        "level 1-9 of 10 (google-research/fixmatch, kekmodel) | always: both applied, "
                                        "magnitude uniform over the range (USB/TorchSSL)")
    cutout: str = param("fixed", "fixed: a square of half the image side (the authors', kekmodel) | random: side "
                                 "uniform up to half the image side (USB/TorchSSL)")
    weak_padding: str = param("reflect", "padding of the weak translation: reflect (the authors', USB) | zeros")

    def check(self) -> None:
        super().check()
        require_choice(self.dataset, "dataset", DATASETS)
        require_choice(self.backbone, "backbone", BACKBONES)
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        require(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        require(self.mu >= 1, "mu", f"must be at least 1, got {self.mu}")
        require(0 < self.threshold <= 1, "threshold", f"must be in (0, 1], got {self.threshold}")
        require(self.lambda_u >= 0, "lambda_u", f"must be non-negative, got {self.lambda_u}")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", "must be 0 (only at the end) or positive")
        require(self.checkpoint_every >= 1, "checkpoint_every", f"must be at least 1, got {self.checkpoint_every}")
        require(self.eval_images >= 0 and self.eval_images % 10 == 0, "eval_images",
                "must be 0 (all) or a multiple of 10")
        require(10 <= self.val_size <= TRAIN_IMAGES[self.dataset] // 2 and self.val_size % 10 == 0, "val_size",
                f"must be a multiple of 10 (the classes) from 10 to half of {self.dataset}'s "
                f"{TRAIN_IMAGES[self.dataset]:,} training images, got {self.val_size}")
        require(self.median_last >= 1, "median_last", f"must be at least 1, got {self.median_last}")
        require_choice(self.randaugment, "randaugment", tuple(RANDAUGMENT_VARIANTS))
        require_choice(self.cutout, "cutout", CUTOUT_VARIANTS)
        require_choice(self.weak_padding, "weak_padding", PADDINGS)


@dataclass
class FixMatchTraining(FixMatchMethod, OptimizerConfig, RuntimeConfig):
    """FixMatch with its optimiser (the paper's defaults: SGD, lr 0.03, weight decay 5e-4) and runtime."""

    optimizer: str = param("sgd", "sgd (the paper's: momentum, Nesterov) | adam (AdamW)")
    lr: float = param(0.03, "peak learning rate eta")
    weight_decay: float = param(5e-4, "weight decay on weights (not on biases and batch-norm parameters): "
                                      "L2 for SGD, decoupled for Adam")


@dataclass
class FixMatchConfig(FixMatchTraining):
    """One FixMatch job: one labeled subset, one seed, FixMatch or its supervised-only baseline."""

    num_labels: int = param(40, "labeled training images, class-balanced (a multiple of 10)")
    label_seed: int = param(0, "seed of the labeled subset (the 'fold')")
    seed: int = param(0, "seed of initialisation, batch order and augmentation")
    supervised_only: bool = param(False, "the baseline: same backbone, schedule and weak augmentation, "
                                         "labeled loss only")

    def check(self) -> None:
        super().check()
        available = TRAIN_IMAGES[self.dataset]
        require(10 <= self.num_labels <= available - self.val_size and self.num_labels % 10 == 0, "num_labels",
                f"must be a positive multiple of 10 (the classes) up to {available - self.val_size:,} ({self.dataset}'s "
                f"training images less the {self.val_size:,} of the validation split), got {self.num_labels}")
        require(self.label_seed >= 0, "label_seed", f"must be non-negative, got {self.label_seed}")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")


# ---------------------------------------------------------------------------------------- loss, EMA
def fixmatch_loss(logits_x: torch.Tensor, labels: torch.Tensor, logits_weak: torch.Tensor,
                  logits_strong: torch.Tensor, threshold: float = 0.95, lambda_u: float = 1.0) -> dict:
    """The FixMatch loss of one batch.

    Parameters
    ----------
    logits_x : torch.Tensor
        (B, K) logits of the weakly augmented labeled images.
    labels : torch.Tensor
        (B,) their labels.
    logits_weak, logits_strong : torch.Tensor
        (mu B, K) logits of the weak and the strong view of the unlabeled images.
    threshold : float
        tau: a pseudo-label counts when its softmax probability on the weak view is at least this.
    lambda_u : float
        Weight of the unlabeled loss.

    Returns
    -------
    dict
        ``loss`` (L_s + lambda_u L_u, differentiable), ``loss_x`` (L_s), ``loss_u`` (the masked
        cross-entropy averaged over all mu B images, the unconfident ones counting as 0), ``mask`` (float
        0/1 per unlabeled image) and ``pseudo_labels`` (argmax of the weak view, no gradient).
    """
    loss_x = F.cross_entropy(logits_x, labels)
    with torch.no_grad():
        confidence, pseudo_labels = logits_weak.detach().softmax(1).max(1)
        mask = (confidence >= threshold).to(logits_strong.dtype)
    loss_u = (F.cross_entropy(logits_strong, pseudo_labels, reduction="none") * mask).mean()
    return {"loss": loss_x + lambda_u * loss_u, "loss_x": loss_x, "loss_u": loss_u, "mask": mask,
            "pseudo_labels": pseudo_labels}


class EMA:
    """Exponential moving average of a model's parameters: ``ema = decay * ema + (1 - decay) * param``.

    Buffers (batch-norm running statistics and counters) are copied from the model at every update, as in
    the common PyTorch FixMatch implementations (kekmodel's ``ModelEMA``), so the averaged weights are
    evaluated with the trained model's normalisation statistics.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model (uncompiled); the average starts as a copy of it, in eval mode, without grads.
    decay : float
        The decay per update.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step of the average towards ``model``'s current parameters; copy its buffers."""
        averaged, current = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        # One multi-tensor kernel per operation on CUDA; the CPU runs the same per-tensor arithmetic.
        torch._foreach_mul_(averaged, self.decay)
        torch._foreach_add_(averaged, current, alpha=1.0 - self.decay)
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


# ---------------------------------------------------------------------------------------- batches
class EpochStream:
    """Batches of indices into ``range(n)`` from shuffled epochs, each a permutation seeded by
    ``(seed, stream, epoch)``: batch ``k`` is positions ``k*B .. (k+1)*B - 1`` of the epochs laid end to end.

    Every permutation is drawn on ``device`` by a generator there (:func:`fmnist_core.core.data.permutation`),
    so a step never copies indices from the host, even when a few labels make every step start an epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, device):
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.device = torch.device(device)
        self._epochs: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            seed = int(np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1)[0])
            self._epochs[epoch] = permutation(self.n, torch.Generator(device=self.device).manual_seed(seed))
        return self._epochs[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        first, last = start // self.n, (start + self.batch_size - 1) // self.n
        for old in [e for e in self._epochs if e < first]:
            del self._epochs[old]  # never needed again: steps only go forward
        joined = torch.cat([self._permutation(e) for e in range(first, last + 1)])
        return joined[start - first * self.n: start - first * self.n + self.batch_size]


@dataclass
class Batch:
    """One step's network inputs (standardised floats) and labels."""

    labeled: torch.Tensor
    labels: torch.Tensor
    weak: torch.Tensor | None = None         # weak views of the unlabeled images
    strong: torch.Tensor | None = None       # strong views of the same images
    true_labels: torch.Tensor | None = None  # their real labels: for analysis only, never for training


def standardize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to network inputs ``(x - mean) / std``, with (1, C, 1, 1) ``mean``/``std``."""
    return (images - mean) / std


def weak_pad(image_size: int) -> int:
    """The weak translation's largest shift per axis, in pixels: 12.5 % of the side rounded down, as in the
    authors' code (pad-and-crop): 3 pixels at 28 (10.7 % of the side), 4 at 32 (12.5 %)."""
    return int(0.125 * image_size)


def weak_translation(image_size: int) -> str:
    """The weak translation in words, e.g. ``"3 pixels (10.7 % of the 28-pixel side)"`` (:func:`weak_pad`)."""
    pad = weak_pad(image_size)
    return f"{pad} pixels ({pad / image_size:.1%} of the {image_size}-pixel side)".replace("%", " %")


class FixMatchBatches:
    """Draws each step's batch from device-resident labeled and unlabeled images, augmented on the device.

    Parameters
    ----------
    labeled, unlabeled : Split
        ``uint8`` images and labels on the training device (their ``mean``/``std`` standardise inputs).
    batch_size, mu : int
        B labeled and mu B unlabeled images per step.
    seed : int
        Seed of the two index streams (augmentation draws from the generator passed to :meth:`draw`).
    supervised_only : bool
        Draw labeled images only (the baseline).
    randaugment, cutout, weak_padding : str
        The augmentation variants (:class:`FixMatchMethod`): a key of :data:`RANDAUGMENT_VARIANTS`, one of
        :data:`CUTOUT_VARIANTS`, and the padding of the weak translation.
    """

    def __init__(self, labeled: Split, unlabeled: Split, batch_size: int, mu: int, seed: int,
                 supervised_only: bool = False, randaugment: str = "authors", cutout: str = "fixed",
                 weak_padding: str = "reflect"):
        device = labeled.images.device
        self.labeled, self.unlabeled, self.supervised_only = labeled, unlabeled, supervised_only
        self.pad, self.padding = weak_pad(labeled.images.shape[-1]), weak_padding
        prob, levels = RANDAUGMENT_VARIANTS[randaugment]
        self.strong_options = {"cutout": CUTOUT_SIZE, "prob": prob, "levels": levels,
                               "cutout_fixed": cutout == "fixed"}
        # Made once per device: a tensor built from a list on every step would be a blocking copy to a GPU.
        self.mean, self.std = channel_tensor(labeled.mean, device), channel_tensor(labeled.std, device)
        self.labeled_stream = EpochStream(len(labeled.labels), batch_size, seed, 0, device)
        self.unlabeled_stream = EpochStream(len(unlabeled.labels), mu * batch_size, seed, 1, device)

    def draw(self, step: int, generator: torch.Generator) -> Batch:
        """The batch of ``step``: indices from the streams, augmentation from ``generator``."""
        index = self.labeled_stream.indices(step)
        # Augmentation transforms images only; the labels are read at the same indices, untouched.
        batch = Batch(self._weak(self.labeled.images[index], generator), self.labeled.labels[index])
        if self.supervised_only:
            return batch
        index = self.unlabeled_stream.indices(step)
        images = self.unlabeled.images[index]
        batch.weak = self._weak(images, generator)
        strong = weak_augment(images, generator, self.pad, padding=self.padding).float() / 255.0
        batch.strong = standardize(rand_augment(strong, generator, **self.strong_options), self.mean, self.std)
        batch.true_labels = self.unlabeled.labels[index]
        return batch

    def _weak(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flip and pad-and-crop (``uint8``), then standardise: ``data.normalize`` with cached statistics."""
        images = weak_augment(images, generator, self.pad, padding=self.padding)
        return standardize(images.float() / 255.0, self.mean, self.std)


# ----------------------------------------------------------------------------------------- the algorithm
def has_batch_norm(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` normalises with batch statistics (its output then depends on the batch)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


class FixMatch(Algorithm):
    """FixMatch as an :class:`~fmnist_core.core.loop.Algorithm`: a step draws its batch and computes the loss
    in one forward pass; the EMA of the weights is updated after every step and is the evaluated model.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network on the device (uncompiled; the optimiser and checkpoints use it).
    runnable : torch.nn.Module
        What the forward pass calls (``model`` itself, or its compiled version).
    batches : FixMatchBatches
        Draws each step's batch (``None`` when batches are fed to :meth:`batch_loss` directly).
    test : Split
        Test images the EMA model is evaluated on (``None`` when :meth:`evaluate` is not used).
    val : Split, optional
        Validation images (held out of training) the EMA model is also evaluated on.
    cfg : FixMatchConfig
        ``threshold``, ``lambda_u``, ``dtype``, ``eval_batch_size``, ``ema_decay``, ``supervised_only``, ``mu``
        and ``batch_size`` are read here.
    """

    def __init__(self, model, runnable, batches: FixMatchBatches | None, test: Split | None, cfg: FixMatchConfig,
                 val: Split | None = None):
        self.model, self.runnable, self.batches, self.test, self.val = model, runnable, batches, test, val
        self.threshold, self.lambda_u = cfg.threshold, cfg.lambda_u
        self.dtype = resolve_dtype(cfg.dtype, next(model.parameters()).device, cfg.backbone)
        self.eval_batch_size = cfg.eval_batch_size
        self.unlabeled = 0 if cfg.supervised_only else cfg.mu * cfg.batch_size
        self.ema = EMA(model, cfg.ema_decay)
        self.joint_forward = has_batch_norm(model)

    def train_step(self, step, generator):
        """Draw step ``step``'s batch (indices from the step, augmentation from ``generator``); its loss."""
        return self.batch_loss(self.batches.draw(step, generator))

    def batch_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The loss of ``batch`` (one forward pass over all its images) and its statistics: ``loss_x``,
        ``loss_u``, ``correct`` (unlabeled images whose pseudo-label is right), ``masked`` (confident unlabeled
        images) and ``masked_correct`` (confident and right), 0-dim tensors on the device."""
        device = batch.labeled.device
        self.runnable.train()
        if batch.weak is None:
            with autocast_context(device, self.dtype):
                loss = F.cross_entropy(self.runnable(batch.labeled).float(), batch.labels)
            zero = torch.zeros((), device=device)
            return loss, {"loss_x": loss.detach(), "loss_u": zero, "correct": zero, "masked": zero,
                          "masked_correct": zero}
        logits_x, logits_weak, logits_strong = self.forward_views(batch)
        out = fixmatch_loss(logits_x, batch.labels, logits_weak, logits_strong, self.threshold, self.lambda_u)
        correct = (out["pseudo_labels"] == batch.true_labels).float()
        return out["loss"], {"loss_x": out["loss_x"].detach(), "loss_u": out["loss_u"].detach(),
                             "correct": correct.sum(), "masked": out["mask"].sum(),
                             "masked_correct": (correct * out["mask"]).sum()}

    def forward_views(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 logits of the labeled, weak and strong images. With batch norm the three go through one
        forward pass, as in the authors' code, so that the batch statistics cover every view. Without it a
        network's outputs do not depend on the batch, and the weak view, whose pseudo-labels carry no
        gradient, runs apart without autograd: the same logits, and a backward pass over two thirds of the
        images instead of all of them."""
        device = batch.labeled.device
        with autocast_context(device, self.dtype):
            if self.joint_forward:
                parts = [batch.labeled, batch.weak, batch.strong]
                return self.runnable(torch.cat(parts)).float().split([len(p) for p in parts])
            with torch.no_grad():
                logits_weak = self.runnable(batch.weak).float()
            logits_x, logits_strong = self.runnable(torch.cat([batch.labeled, batch.strong])).float().split(
                [len(batch.labeled), len(batch.strong)])
        return logits_x, logits_weak, logits_strong

    def after_step(self, step):
        """One EMA update towards the weights just stepped."""
        self.ema.update(self.model)

    def summarize(self, sums, steps):
        """Means per step; ``mask_ratio`` over the unlabeled images, ``pseudo_label_accuracy`` of all their
        pseudo-labels (the weak view's argmax against the true label) and ``confident_accuracy`` among the
        confident ones only (``None`` for the baseline, and the last when none passed the threshold).
        The EMA fields are ``None`` except at evaluation steps, where :meth:`evaluate` fills them."""
        masked = sums["masked"]
        return {"loss": sums["loss"] / steps, "loss_x": sums["loss_x"] / steps, "loss_u": sums["loss_u"] / steps,
                "mask_ratio": masked / (steps * self.unlabeled) if self.unlabeled else None,
                "pseudo_label_accuracy": sums["correct"] / (steps * self.unlabeled) if self.unlabeled else None,
                "confident_accuracy": sums["masked_correct"] / masked if masked else None,
                "ema_val_loss": None, "ema_val_accuracy": None, "ema_test_loss": None, "ema_test_accuracy": None}

    def evaluate(self):
        """The EMA model's validation and test loss and accuracy (host floats, at evaluation steps only)."""
        out = {}
        if self.val is not None:
            stats = evaluate(self.ema.model, self.val, self.eval_batch_size, self.dtype)
            out.update({"ema_val_loss": stats["loss"], "ema_val_accuracy": stats["accuracy"]})
        stats = evaluate(self.ema.model, self.test, self.eval_batch_size, self.dtype)
        return {**out, "ema_test_loss": stats["loss"], "ema_test_accuracy": stats["accuracy"]}

    def evaluated_model(self):
        """The EMA model: what ``best.pt`` stores (the final one, as there is no selection)."""
        return self.ema.model

    def state_dict(self):
        """The EMA weights (resumed with the rest of ``last.pt``)."""
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.ema.load_state_dict(state["ema"])


# ------------------------------------------------------------------------------------------------ a run
VAL_SPLIT_SEED = 0  # the validation split is the same for every run, whatever its seed


def validation_split(labels: torch.Tensor, val_size: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of the training images: ``val_size`` class-balanced images held out, the same
    for every run (:data:`VAL_SPLIT_SEED`); labeled and unlabeled images are drawn from the train part only."""
    try:
        return stratified_split(labels, val_size, VAL_SPLIT_SEED, num_classes)
    except ValueError as err:
        raise ConfigError(f"parameter 'val_size' {err}") from None


def labeled_indices(labels: torch.Tensor, num_labels: int, label_seed: int, num_classes: int = 10,
                    pool: np.ndarray | None = None) -> np.ndarray:
    """The class-balanced labeled subset (sorted indices into ``labels``) drawn from ``pool`` (indices; all
    when ``None``), or a ``ConfigError`` the data cannot satisfy."""
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    try:
        return pool[balanced_subset(np.asarray(labels.cpu())[pool], num_labels, label_seed, num_classes)]
    except ValueError as err:
        raise ConfigError(f"parameter 'num_labels' {err}") from None


def eval_split(ds: ImageDataset, eval_images: int) -> Split:
    """The test images the EMA model is measured on: all, or the same class-balanced subset for every run."""
    return subset(Split(ds.test_images, ds.test_labels, ds.mean, ds.std), eval_images, EVAL_SUBSET_SEED,
                  ds.num_classes)


def build_fixmatch(cfg: FixMatchConfig, ds: ImageDataset, out_dir: Path) -> FixMatch:
    """The validation split, the labeled subset of the rest (both saved in ``labeled_indices.npz``), the batches,
    the seeded model and the EMA. The unlabeled images are the training images less the validation split."""
    device = ds.train_images.device
    train_idx, val_idx = validation_split(ds.train_labels, cfg.val_size, ds.num_classes)
    idx = labeled_indices(ds.train_labels, cfg.num_labels, cfg.label_seed, ds.num_classes, train_idx)
    save_indices(out_dir / "labeled_indices.npz", labeled=idx, validation=val_idx)

    def part(indices):
        index = torch.as_tensor(indices, device=device)
        return Split(ds.train_images[index], ds.train_labels[index], ds.mean, ds.std)
    labeled, unlabeled, val = part(idx), part(train_idx), part(val_idx)
    batches = FixMatchBatches(labeled, unlabeled, cfg.batch_size, cfg.mu, cfg.seed, cfg.supervised_only,
                              cfg.randaugment, cfg.cutout, cfg.weak_padding)
    torch.manual_seed(cfg.seed)  # initialisation
    c, h, _ = ds.image_shape
    raw, runnable = prepare_model(build_model(cfg.backbone, c, ds.num_classes, h), cfg, device,
                                  resolve_dtype(cfg.dtype, device, cfg.backbone))
    return FixMatch(raw, runnable, batches, eval_split(ds, cfg.eval_images), cfg, val)


def train_fixmatch(cfg: FixMatchConfig, ds: ImageDataset, out_dir, log=print):
    """Train FixMatch (or, with ``supervised_only``, its labeled-only baseline) for ``cfg.steps`` steps.

    Parameters
    ----------
    cfg : FixMatchConfig
        Hyper-parameters; stored in every checkpoint; a checkpoint made with another config is not resumed.
    ds : ImageDataset
        The data (moved to ``cfg.device`` if elsewhere); labeled subset drawn from its training images.
    out_dir : path
        The job folder: ``labeled_indices.npz``, ``history.json``/``.csv``, ``best.pt`` (the final EMA
        model, loadable with ``loop.load_trained(path, models.rebuild)``), ``final.pt`` (``last.pt`` while
        training, every ``checkpoint_every`` steps).
    log : callable
        Receives one line per history record.

    Returns
    -------
    ema_model : torch.nn.Module
        The final EMA model (eval mode): the reported model.
    history : list of dict
        Every ``log_every`` steps (and at evaluation steps and the end): step, lr (of the record's last
        step), loss, loss_x, loss_u, mask_ratio, pseudo_label_accuracy (all unlabeled images), confident_accuracy
        (among the confident ones), ema_test_loss
        and ema_test_accuracy (``None`` except every ``eval_every`` steps and at the end), seconds.
    """
    out_dir, device = Path(out_dir), resolve_device(cfg.device)
    if ds.name != cfg.dataset:
        raise ConfigError(f"parameter 'dataset' is {cfg.dataset!r} but the data given is {ds.name!r}")
    ds = ds if ds.train_images.device == device else ds.to(device)
    algo = build_fixmatch(cfg, ds, out_dir)
    plan = Plan(cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)  # selection None: final EMA
    history = loop.train(algo, plan, cfg, SCHEDULE, cfg.seed, out_dir,
                         {**cfg.to_dict(), **model_meta(cfg.backbone, ds)}, name=out_dir.name, log=log)
    return algo.ema.model, history


def median_of_last(history: list[dict], count: int, key: str = "ema_test_accuracy") -> tuple[float, int]:
    """The median of ``key`` over the last ``count`` records that have it (all of them if fewer), and how many
    that was: the authors' reported number (``scripts/extract_accuracy.py``: ``np.median(accuracies[-20:])``)."""
    values = [r[key] for r in history if r.get(key) is not None][-count:]
    if not values:
        raise ValueError(f"no record has {key!r}")
    return float(np.median(values)), len(values)


def augmentation_label(cfg: FixMatchConfig) -> str:
    """The augmentation variants of a run in words, e.g. ``RandAugment authors, Cutout fixed, reflect padding``
    (``weak only, reflect padding`` for the labeled-only runs, which see no strong views)."""
    weak = f"{cfg.weak_padding} padding"
    return f"weak only, {weak}" if cfg.supervised_only else f"RandAugment {cfg.randaugment}, Cutout {cfg.cutout}, {weak}"


@job_kind("fixmatch", FixMatchConfig)
def run_fixmatch(cfg: FixMatchConfig, out_dir, log=print) -> dict:
    """One FixMatch job on its dataset (:func:`train_fixmatch`); returns the EMA model's test metrics.

    ``test_accuracy``/``test_loss`` are the final EMA model's; ``median_test_accuracy`` is the median EMA test
    accuracy of the last ``median_last`` evaluations (``median_evaluations`` of them: fewer when the run has
    fewer), the number the FixMatch authors report. Wall-clock figures go to ``timings.json`` (``train_s``:
    training and evaluation; ``steps_per_s``)."""
    out_dir = Path(out_dir)
    _, history = train_fixmatch(cfg, job_dataset(cfg.dataset, resolve_device(cfg.device)), out_dir, log)
    seconds = sum(r["seconds"] for r in history)
    done = history[-1]["step"]  # cfg.steps, unless a deadline stopped the run (fmnist_core.core.deadline)
    write_json(out_dir / "timings.json", {"train_s": seconds, "steps_per_s": done / seconds if seconds else None})
    final = history[-1]
    median, evaluations = median_of_last(history, cfg.median_last)
    median_val, _ = median_of_last(history, cfg.median_last, "ema_val_accuracy")
    return {"test_accuracy": final["ema_test_accuracy"], "test_loss": final["ema_test_loss"],
            "median_test_accuracy": median, "median_evaluations": evaluations,
            "val_accuracy": final["ema_val_accuracy"], "val_loss": final["ema_val_loss"],
            "median_val_accuracy": median_val, "val_size": cfg.val_size, "steps": cfg.steps,
            "num_labels": cfg.num_labels, "label_seed": cfg.label_seed, "supervised_only": cfg.supervised_only,
            "model": "final EMA weights", "augmentation": augmentation_label(cfg)}
