"""Supervised training of a classifier with cross-entropy: the :class:`Supervised` algorithm and :func:`fit`.

Mini-batches are cut from device-resident ``uint8`` tensors (a fresh permutation per epoch) and augmented
on the device; nothing is read back to the host inside a step.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist_core.core.data import Split, normalize, permutation, weak_augment
from fmnist_core.core import loop
from fmnist_core.core.loop import Algorithm, Plan, Selection
from fmnist_core.core.train import TrainConfig, autocast_context, evaluate, prepare_model, resolve_dtype


class Supervised(Algorithm):
    """Cross-entropy on shuffled, optionally augmented batches of ``train``; evaluated on ``val``.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier, on the training device (prepared with :func:`fmnist_core.core.train.prepare_model`).
    runnable : torch.nn.Module
        What the forward pass calls (``model`` itself, or its compiled version).
    train, val : Split
        Training and validation images (``uint8``, on the device) with their normalisation.
    cfg : TrainConfig
        ``batch_size``, ``augment``, ``label_smoothing`` and ``eval_batch_size`` are read here.
    dtype : str
        The resolved precision (:func:`fmnist_core.core.train.resolve_dtype`): ``float32`` or ``bfloat16``.
    """

    def __init__(self, model, runnable, train: Split, val: Split, cfg: TrainConfig, dtype: str = "float32"):
        self.model, self.runnable, self.train, self.val = model, runnable, train, val
        self.batch_size, self.augment = cfg.batch_size, cfg.augment
        self.label_smoothing, self.dtype, self.eval_batch_size = cfg.label_smoothing, dtype, cfg.eval_batch_size
        self.steps_per_epoch = math.ceil(len(train.labels) / self.batch_size)
        self.order = None

    def train_step(self, step, generator):
        position = step % self.steps_per_epoch
        if position == 0:  # a fresh permutation at the start of every epoch
            self.order = permutation(len(self.train.labels), generator).to(self.train.images.device)
        index = self.order[position * self.batch_size:(position + 1) * self.batch_size]
        images, labels = self.train.images[index], self.train.labels[index]
        if self.augment:
            images = weak_augment(images, generator)
        self.runnable.train()
        with autocast_context(images.device, self.dtype):
            logits = self.runnable(normalize(images, self.train.mean, self.train.std))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        n = labels.new_full((), len(labels), dtype=torch.float32)  # a fill on the device, not a host copy
        return loss, {"loss_sum": loss.detach() * n, "correct": (logits.argmax(1) == labels).sum().float(),
                      "count": n}

    def summarize(self, sums, steps):
        return {"train_loss": sums["loss_sum"] / sums["count"], "train_accuracy": sums["correct"] / sums["count"]}

    def evaluate(self):
        stats = evaluate(self.runnable, self.val, self.eval_batch_size, self.dtype)
        return {f"val_{k}": v for k, v in stats.items()}

    def state_dict(self):
        return {"order": self.order}

    def load_state_dict(self, state):
        self.order = state["order"]


def fit(model, train: Split, val: Split, cfg: TrainConfig, out_dir, *, meta: dict | None = None,
        name: str = "model", log=print) -> list[dict]:
    """Train a classifier for ``cfg.epochs`` epochs; ``best.pt`` has the best validation accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        Freshly initialised (the caller seeds before building it).
    train, val : Split
        ``val`` chooses the checkpoint; the test set is never used here.
    cfg : TrainConfig
    out_dir : path
        The job folder: ``best.pt``, ``final.pt``, ``history.json``/``.csv`` (``last.pt`` while training).
    meta : dict, optional
        Stored in the checkpoints beside the configuration (what is needed to rebuild the model); its ``model``
        names the network for ``dtype: auto`` (:func:`fmnist_core.core.train.resolve_dtype`).
    name : str
        Names the run in log lines and errors.
    log : callable

    Returns
    -------
    list of dict
        One record per epoch: step, epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy, seconds.
    """
    device = train.images.device
    dtype = resolve_dtype(cfg.dtype, device, (meta or {}).get("model"))
    raw, runnable = prepare_model(model, cfg, device, dtype)
    algo = Supervised(raw, runnable, train, val, cfg, dtype)
    plan = Plan.epochs(cfg.epochs, algo.steps_per_epoch, Selection("val_accuracy"))
    return loop.train(algo, plan, cfg, cfg.schedule, cfg.seed, Path(out_dir), {**cfg.to_dict(), **(meta or {})},
                 name=name, log=log)
