"""FixMatch (Sohn et al. 2020): semi-supervised training from a few labels, on device-resident tensors.

Each step takes ``B`` labeled images (weak augmentation) and ``mu * B`` unlabeled images, each seen twice:
weakly augmented (flip and a translation of up to 12.5 %) and strongly augmented (the weak augmentation,
then RandAugment and Cutout, :mod:`fmnist_core.core.randaugment`). The three groups go through the network in one
concatenated forward pass, so batch-norm statistics see them together (on one device, the reference code's
interleaving for multi-GPU batch norm is not needed). The loss is

    L = CE(labeled) + lambda_u * mean_over_mu*B( 1[max p_weak >= tau] * CE(strong logits, argmax p_weak) ),

with the weak-view prediction taken without gradient. SGD with Nesterov momentum, weight decay on weights
only (:func:`fmnist_core.core.train.parameter_groups`), learning rate ``lr * cos(7 pi k / 16 K)`` over ``K`` steps,
and an exponential moving average (EMA) of the weights, which is the evaluated and reported model: the final
EMA model, never one chosen on the test set.

Sampling: the labeled and the unlabeled images are each read in shuffled epochs (every image once per
epoch, a fresh permutation each epoch, epochs concatenated so batches may straddle two), like the reference
implementations' shuffled, repeated data sets. Each epoch's permutation comes from its own generator seeded
by ``(seed, stream, epoch)``, so a batch depends only on the step number and a resumed run needs no sampler
state. The unlabeled set is all training images, the labeled ones included (as in the paper).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmnist_core.core.config import param, require, require_choice
from fmnist_core.core.data import (TRAIN_IMAGES, ImageDataset, Split, balanced_subset, make_generator, save_indices,
                                   subset, weak_augment)
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.io import save_checkpoint, write_json
from fmnist_core.core.models import build_model, model_meta
from fmnist_core.core.randaugment import rand_augment
from fmnist_core.core.train import (Checkpointer, History, TrainConfig, autocast_context, check_finite, evaluate,
                    make_optimizer, prepare_model, resolve_device, restore_rng_state, rng_state)

DATASETS = ("fashion_mnist", "cifar10")
BACKBONES = ("smallcnn", "wrn28_2")
EVAL_SUBSET_SEED = 0  # the same class-balanced test subset for every run when eval_images > 0
# Inherited training fields FixMatch does not use, with the values they must keep (a changed value would
# otherwise be silently ignored) and what to set instead.
_UNUSED = {"epochs": (10, "FixMatch counts optimiser steps: set 'steps'"),
           "schedule": ("cosine", "the learning rate always follows lr * cos(7 pi k / 16 K)"),
           "augment": (True, "weak and strong augmentation are part of FixMatch"),
           "label_smoothing": (0.0, "FixMatch uses plain cross-entropy"),
           "train_images": (0, "set 'num_labels' for the labeled subset")}


@dataclass
class FixMatchConfig(TrainConfig):
    """Parameters of the FixMatch chapter; the defaults are the paper's (CIFAR-10, 40 labels)."""

    epochs: int = param(10, "unused: FixMatch counts optimiser steps (see steps)")
    schedule: str = param("cosine", "unused: the learning rate is always lr * cos(7 pi k / 16 K)")
    augment: bool = param(True, "unused: weak (and strong) augmentation is always applied")
    train_images: int = param(0, "unused: see num_labels")
    optimizer: str = param("sgd", "sgd (the paper's) | adam")
    batch_size: int = param(64, "B: labeled images per step")
    lr: float = param(0.03, "peak learning rate eta")
    weight_decay: float = param(5e-4, "L2 weight decay on weights (not on biases and batch-norm parameters)")
    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10")
    backbone: str = param("wrn28_2", "wrn28_2 (the paper's) | smallcnn (quick runs)")
    num_labels: int = param(40, "labeled training images, class-balanced (a multiple of 10)")
    label_seed: int = param(0, "seed of the labeled subset (the 'fold')")
    steps: int = param(2 ** 20, "K: optimiser steps (the paper: 2^20)")
    mu: int = param(7, "unlabeled images per labeled image in a step")
    threshold: float = param(0.95, "tau: confidence a pseudo-label needs to count")
    lambda_u: float = param(1.0, "weight of the unlabeled loss")
    ema_decay: float = param(0.999, "decay of the exponential moving average of the weights")
    supervised_only: bool = param(False, "the baseline: same backbone, schedule and weak augmentation, "
                                         "labeled loss only")
    log_every: int = param(256, "steps between history records")
    eval_every: int = param(1024, "steps between EMA test-accuracy points (a diagnostic curve); "
                                  "0 = only at the end")
    checkpoint_every: int = param(1024, "steps between resumable checkpoints")
    eval_images: int = param(0, "test images (class-balanced) for the EMA accuracy; 0 = all")

    def check(self) -> None:
        super().check()
        for name, (default, hint) in _UNUSED.items():
            require(getattr(self, name) == default, name, f"is not used by FixMatch ({hint})")
        require_choice(self.dataset, "dataset", DATASETS)
        require_choice(self.backbone, "backbone", BACKBONES)
        available = TRAIN_IMAGES[self.dataset]
        require(10 <= self.num_labels <= available and self.num_labels % 10 == 0, "num_labels",
                f"must be a positive multiple of 10 (the classes) up to {available:,} ({self.dataset}'s training "
                f"images), got {self.num_labels}")
        require(self.label_seed >= 0 and self.seed >= 0, "label_seed" if self.label_seed < 0 else "seed",
                "must be non-negative")
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


# ------------------------------------------------------------------------------ schedule, loss, EMA
def fixmatch_lr_factor(step: int, total: int) -> float:
    """FixMatch's learning-rate multiplier ``cos(7 pi k / 16 K)`` after ``k = step`` of ``K = total`` steps.

    It falls from 1 at k = 0 to cos(7 pi / 16) ≈ 0.195 at k = K (not to 0, unlike the usual cosine).
    """
    return math.cos(7.0 * math.pi * min(step, total) / (16.0 * total))


def make_fixmatch_schedule(optimizer: torch.optim.Optimizer, total: int):
    """A per-step ``LambdaLR`` following :func:`fixmatch_lr_factor` over ``total`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fixmatch_lr_factor(step, total))


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
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.mul_(self.decay).add_(current.detach(), alpha=1.0 - self.decay)
        for averaged, current in zip(self.model.buffers(), model.buffers()):
            averaged.copy_(current)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


# ---------------------------------------------------------------------------------------- batches
class EpochStream:
    """Batches of indices into ``range(n)`` from shuffled epochs, each a permutation seeded by
    ``(seed, stream, epoch)``: batch ``k`` is positions ``k*B .. (k+1)*B - 1`` of the epochs laid end to end."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, device):
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.device = torch.device(device)
        self._epochs: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            seed = int(np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            self._epochs[epoch] = torch.randperm(self.n, generator=generator).to(self.device)
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
    """Translation of up to 12.5 % of the side as pad-and-crop: 3 pixels at 28, 4 at 32."""
    return int(0.125 * image_size)


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
    """

    def __init__(self, labeled: Split, unlabeled: Split, batch_size: int, mu: int, seed: int,
                 supervised_only: bool = False):
        device = labeled.images.device
        self.labeled, self.unlabeled, self.supervised_only = labeled, unlabeled, supervised_only
        self.pad = weak_pad(labeled.images.shape[-1])
        # Made once: a tensor built from a list on every step would cost a blocking copy to a GPU each time.
        self.mean = torch.tensor(labeled.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(labeled.std, device=device).view(1, -1, 1, 1)
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
        strong = weak_augment(images, generator, self.pad).float() / 255.0
        batch.strong = standardize(rand_augment(strong, generator), self.mean, self.std)
        batch.true_labels = self.unlabeled.labels[index]
        return batch

    def _weak(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flip and pad-and-crop (``uint8``), then standardise: ``data.normalize`` with cached statistics."""
        return standardize(weak_augment(images, generator, self.pad).float() / 255.0, self.mean, self.std)


# ------------------------------------------------------------------------------------------- a step
STAT_NAMES = ("loss", "loss_x", "loss_u", "masked", "masked_correct")


def train_step(runnable, optimizer, scheduler, batch: Batch, cfg: FixMatchConfig, where: str) -> torch.Tensor:
    """One optimiser step on ``batch`` (one forward pass over all its images); returns the statistics
    :data:`STAT_NAMES` as one tensor on the device (summed over steps, read at log time)."""
    device = batch.labeled.device
    parts = [batch.labeled] if batch.weak is None else [batch.labeled, batch.weak, batch.strong]
    with autocast_context(device, cfg.dtype):
        logits = runnable(torch.cat(parts)).float()
    if batch.weak is None:
        loss_x = F.cross_entropy(logits, batch.labels)
        zero = torch.zeros((), device=device)
        stats = torch.stack([loss_x.detach(), loss_x.detach(), zero, zero, zero])
        loss = loss_x
    else:
        logits_x, logits_weak, logits_strong = logits.split([len(p) for p in parts])
        out = fixmatch_loss(logits_x, batch.labels, logits_weak, logits_strong, cfg.threshold, cfg.lambda_u)
        loss = out["loss"]
        correct = (out["pseudo_labels"] == batch.true_labels).float() * out["mask"]
        stats = torch.stack([loss.detach(), out["loss_x"].detach(), out["loss_u"].detach(),
                             out["mask"].sum(), correct.sum()])
    check_finite(loss, where)  # before the update, so a NaN never reaches the weights or the EMA
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return stats


@torch.inference_mode()
def evaluate_fixmatch(model, split: Split, batch_size: int = 256, dtype: str = "float32") -> dict:
    """Cross-entropy (``loss``) and ``accuracy`` of ``model`` on ``split`` (eval mode, no augmentation)."""
    return evaluate(model, split, batch_size, dtype)


# ----------------------------------------------------------------------------------------- the loop
def labeled_indices(labels: torch.Tensor, num_labels: int, label_seed: int, num_classes: int = 10) -> np.ndarray:
    """The class-balanced labeled subset (sorted indices), or a ``ConfigError`` the data cannot satisfy."""
    try:
        return balanced_subset(labels, num_labels, label_seed, num_classes)
    except ValueError as err:
        raise ConfigError(f"parameter 'num_labels' {err}") from None


class StepHistory(History):
    """:class:`~fmnist_core.core.train.History` keyed by ``step``: History's TensorBoard writer plots against an
    ``epoch`` key, and steps without an evaluation hold ``None``, which TensorBoard cannot plot."""

    def append(self, record: dict) -> None:
        writer, self._writer = self._writer, None
        try:
            super().append(record)  # history.json and history.csv
        finally:
            self._writer = writer
        if writer is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    writer.add_scalar(key, value, record["step"])
            writer.flush()


class _Window:
    """Statistics summed since the last history record (saved in checkpoints, so a resumed run's records
    match an uninterrupted run's), and the wall-clock rate of the steps timed in this process."""

    def __init__(self, first_step: int, sums: torch.Tensor):
        self.first_step, self.sums = first_step, sums
        self.timed, self.clock = 0, time.perf_counter()

    def add(self, stats: torch.Tensor) -> None:
        self.sums = self.sums + stats
        self.timed += 1

    def record(self, step: int, lr: float, unlabeled: int) -> dict:
        loss, loss_x, loss_u, masked, correct = self.sums.tolist()
        steps, seconds = step - self.first_step, time.perf_counter() - self.clock
        return {"step": step, "lr": lr, "loss": loss / steps, "loss_x": loss_x / steps,
                "loss_u": loss_u / steps, "mask_ratio": masked / (steps * unlabeled) if unlabeled else None,
                # Among the confident (masked-in) images only; None when no image passed the threshold.
                "pseudo_label_accuracy": correct / masked if masked else None,
                "steps_per_s": self.timed / seconds if seconds > 0 else None,
                "ema_test_loss": None, "ema_test_accuracy": None}

    def restart(self, step: int) -> None:
        self.__init__(step, torch.zeros_like(self.sums))


@dataclass
class _Run:
    """Everything a FixMatch run trains with."""

    batches: FixMatchBatches
    test: Split
    raw: torch.nn.Module
    runnable: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    meta: dict


def _setup(cfg: FixMatchConfig, ds: ImageDataset, out_dir: Path) -> _Run:
    """Device, labeled subset (saved), batches, test split, model, EMA, optimiser, schedule, generator."""
    device = resolve_device(cfg.device)
    if ds.name != cfg.dataset:
        raise ConfigError(f"parameter 'dataset' is {cfg.dataset!r} but the data given is {ds.name!r}")
    ds = ds if ds.train_images.device == device else ds.to(device)
    idx = labeled_indices(ds.train_labels, cfg.num_labels, cfg.label_seed, ds.num_classes)
    save_indices(out_dir / "labeled_indices.npz", labeled=idx)
    index = torch.as_tensor(idx, device=device)
    labeled = Split(ds.train_images[index], ds.train_labels[index], ds.mean, ds.std)
    unlabeled = Split(ds.train_images, ds.train_labels, ds.mean, ds.std)
    batches = FixMatchBatches(labeled, unlabeled, cfg.batch_size, cfg.mu, cfg.seed, cfg.supervised_only)
    test = subset(Split(ds.test_images, ds.test_labels, ds.mean, ds.std), cfg.eval_images, EVAL_SUBSET_SEED,
                  ds.num_classes)
    torch.manual_seed(cfg.seed)  # initialisation
    c, h, _ = ds.image_shape
    raw, runnable = prepare_model(build_model(cfg.backbone, c, ds.num_classes, h), cfg, device)
    optimizer = make_optimizer(raw, cfg)
    return _Run(batches, test, raw, runnable, EMA(raw, cfg.ema_decay), optimizer,
                make_fixmatch_schedule(optimizer, cfg.steps), make_generator(cfg.seed, device),
                model_meta(cfg.backbone, ds))


def train_fixmatch(cfg: FixMatchConfig, ds: ImageDataset, out_dir, log=print):
    """Train FixMatch (or, with ``supervised_only``, its labeled-only baseline) for ``cfg.steps`` steps.

    Parameters
    ----------
    cfg : FixMatchConfig
        Hyper-parameters; stored in every checkpoint; a checkpoint made with another config is not resumed.
    ds : ImageDataset
        The data (moved to ``cfg.device`` if elsewhere); labeled subset drawn from its training images.
    out_dir : path
        Receives ``labeled_indices.npz``, ``history.json``/``.csv``, ``last.pt`` (resumable, every
        ``checkpoint_every`` steps and at the end), ``ema.pt`` (the final EMA model, loadable with
        ``train.load_trained(path, models.rebuild)``) and ``metrics.json`` (its test metrics).
    log : callable
        Receives one line per history record.

    Returns
    -------
    ema_model : torch.nn.Module
        The final EMA model (eval mode): the reported model.
    history : list of dict
        Every ``log_every`` steps (and at evaluation steps and the end): step, lr (of the record's last
        step), loss, loss_x, loss_u, mask_ratio, pseudo_label_accuracy (among masked images), steps_per_s,
        ema_test_loss and ema_test_accuracy (``None`` except every ``eval_every`` steps and at the end).
    """
    out_dir = Path(out_dir)
    run = _setup(cfg, ds, out_dir)
    checkpointer = Checkpointer(out_dir, {**cfg.to_dict(), **run.meta})
    start, window, history = _resume(checkpointer, run, log)
    unlabeled = 0 if cfg.supervised_only else cfg.mu * cfg.batch_size
    for step in range(start, cfg.steps):
        batch = run.batches.draw(step, run.generator)
        lr = run.optimizer.param_groups[0]["lr"]
        window.add(train_step(run.runnable, run.optimizer, run.scheduler, batch, cfg, f"fixmatch, step {step + 1}"))
        run.ema.update(run.raw)
        done = step + 1
        evaluate_now = done == cfg.steps or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
        if evaluate_now or done % cfg.log_every == 0:
            record = window.record(done, lr, unlabeled)
            if evaluate_now:
                metrics = evaluate_fixmatch(run.ema.model, run.test, cfg.eval_batch_size, cfg.dtype)
                record.update(ema_test_loss=metrics["loss"], ema_test_accuracy=metrics["accuracy"])
            history.append(record)
            log(_log_line(record, cfg.steps))
            window.restart(done)
        if done == cfg.steps or done % cfg.checkpoint_every == 0:
            checkpointer.save_last(model=run.raw.state_dict(), ema=run.ema.state_dict(), step=done,
                                   optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                                   window=window.sums.cpu(), window_start=window.first_step,
                                   history=history.records, rng=rng_state(run.generator))
    _save_final(checkpointer, run.ema, history.records, cfg)
    return run.ema.model, history.records


def _resume(checkpointer: Checkpointer, run: _Run, log):
    """Restore the last checkpoint made with the same config: (next step, stats window, history)."""
    device = run.test.images.device
    state = checkpointer.resume_state()
    if state is None:
        return 0, _Window(0, torch.zeros(len(STAT_NAMES), device=device)), StepHistory(checkpointer.out_dir)
    run.raw.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(run.generator, state["rng"])
    log(f"resuming from {checkpointer.last_path} after step {state['step']}")
    window = _Window(state["window_start"], state["window"].to(device))
    return state["step"], window, StepHistory(checkpointer.out_dir, state["history"])


def _log_line(record: dict, total: int) -> str:
    shown = [f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "lr") and v is not None]
    return f"fixmatch step {record['step']}/{total}: lr {record['lr']:.5f} | " + " | ".join(shown)


def _save_final(checkpointer: Checkpointer, ema: EMA, records: list[dict], cfg: FixMatchConfig) -> None:
    """``ema.pt`` and ``metrics.json``: the final EMA model and its test metrics (the reported result)."""
    final = records[-1]
    save_checkpoint(checkpointer.out_dir / "ema.pt", {"config": checkpointer.config, "model": ema.state_dict(),
                                                      "step": final["step"], "record": final})
    write_json(checkpointer.out_dir / "metrics.json", {
        "test_accuracy": final["ema_test_accuracy"], "test_loss": final["ema_test_loss"], "steps": cfg.steps,
        "num_labels": cfg.num_labels, "label_seed": cfg.label_seed, "supervised_only": cfg.supervised_only,
        "model": "final EMA weights"})
