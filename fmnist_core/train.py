"""The shared training machinery: device and precision options, optimisers, schedules, checkpoints, resume.

``fit`` trains a classifier with mini-batches cut from device-resident tensors; the pieces it is made of
(``resolve_device``, ``make_optimizer``, ``make_schedule``, ``Checkpointer``, ``History``) are what the
other chapters' loops (VAE, semi-supervised, FixMatch) reuse.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, param, require, require_choice
from .data import batch_indices, make_generator, normalize, weak_augment
from .errors import FmnistBookError, RunError
from .io import load_checkpoint, save_checkpoint, write_bytes_atomic, write_json


@dataclass
class TrainConfig(Config):
    """Hyper-parameters of supervised training, in one place."""

    epochs: int = param(10, "passes over the training images")
    batch_size: int = param(128, "images per step")
    optimizer: str = param("adam", "adam | sgd (SGD uses momentum and optionally Nesterov)")
    lr: float = param(1e-3, "peak learning rate")
    momentum: float = param(0.9, "SGD momentum")
    nesterov: bool = param(True, "Nesterov momentum for SGD")
    weight_decay: float = param(5e-4, "L2 weight decay on weights (not on biases and norm parameters)")
    schedule: str = param("cosine", "cosine | step (x0.1 after half the epochs, seed 003) | constant")
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy")
    augment: bool = param(True, "random 2-pixel translation and horizontal flip, batched on the device")
    train_images: int = param(0, "use only this many training images (class-balanced); 0 = all")
    seed: int = param(0, "seed of initialisation, batch order, augmentation and dropout")
    device: str = param("auto", "auto | cpu | cuda")
    dtype: str = param("float32", "float32 | bfloat16 (autocast; CUDA only)")
    compile: bool = param(False, "torch.compile the model (CUDA only)")
    channels_last: bool = param(True, "channels-last memory format on CUDA")
    eval_batch_size: int = param(256, "images per evaluation batch")
    deterministic: bool = param(False, "CUDA: deterministic algorithms, fixed cuBLAS workspace, no cuDNN "
                                       "benchmark (slower, bit-reproducible); off = speed (CPU runs are exact)")

    def check(self) -> None:
        require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", "must be non-negative")
        require(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        require(self.train_images >= 0, "train_images", "must be 0 (all) or positive")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")
        require_choice(self.optimizer, "optimizer", ("adam", "sgd"))
        require_choice(self.schedule, "schedule", ("cosine", "step", "constant"))
        require_choice(self.device, "device", ("auto", "cpu", "cuda"))
        require_choice(self.dtype, "dtype", ("float32", "bfloat16"))
        if self.device == "cuda":
            require(torch.cuda.is_available(), "device", "is 'cuda' but no CUDA device is available")


# ------------------------------------------------------------------------------------ device & precision
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def numerics_mode(device, deterministic: bool) -> str:
    """How exactly a run on ``device`` repeats: "cpu", or on CUDA "deterministic" or "speed"."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return "deterministic" if deterministic else "speed"


def configure_numerics(device: torch.device, deterministic: bool) -> str:
    """Set PyTorch's determinism switches for ``device``; returns the mode a results record states.

    On CUDA, ``deterministic`` turns on deterministic algorithms (an op without a deterministic kernel then
    raises instead of varying silently), cuBLAS's fixed ``:4096:8`` workspace and cuDNN's deterministic,
    non-benchmarked convolutions; otherwise cuDNN benchmarks and picks the fastest kernels ("speed").
    The cuBLAS setting only takes effect if made before the process's first CUDA matrix product, which is
    why the training loops call this before building their optimiser. On the CPU, a run is bit-reproducible
    for a fixed thread count either way ("cpu").
    """
    mode = numerics_mode(device, deterministic)
    if mode == "cpu":
        return mode
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return mode


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on CUDA when asked for; full precision otherwise (CPU autocast is slower here)."""
    if device.type == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """Move to the device; channels-last and ``torch.compile`` on CUDA; the determinism switches of
    ``cfg.deterministic`` (:func:`configure_numerics`). Returns (raw, runnable) models."""
    configure_numerics(device, cfg.deterministic)
    model = model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runnable = torch.compile(model) if (cfg.compile and device.type == "cuda") else model
    return model, runnable


# ----------------------------------------------------------------------------- optimiser and schedule
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: decaying biases and norm scales only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum (Nesterov optional), with decoupled parameter groups."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.Adam(groups, lr=cfg.lr)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate after ``step`` of ``total_steps`` optimiser steps."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        return 1.0 if step < total_steps // 2 else 0.1
    return 1.0


def make_schedule(optimizer, schedule: str, total_steps: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total_steps))


# ------------------------------------------------------------------------------- history & checkpoints
class History:
    """Per-epoch records, written as ``history.json`` and ``history.csv`` (and TensorBoard if installed)."""

    def __init__(self, out_dir: Path, records: list[dict] | None = None):
        self.out_dir, self.records = Path(out_dir), list(records or [])
        self._writer = _tensorboard_writer(self.out_dir / "tensorboard")

    def append(self, record: dict) -> None:
        self.records.append(record)
        write_json(self.out_dir / "history.json", self.records)
        write_bytes_atomic(self.out_dir / "history.csv", _to_csv(self.records))
        if self._writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()


def _to_csv(records: list[dict]) -> bytes:
    import io
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


class Checkpointer:
    """``last.pt`` (everything needed to resume) and ``best.pt`` (weights and history record of the best epoch)."""

    def __init__(self, out_dir: Path, config: dict):
        self.out_dir, self.config = Path(out_dir), config

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def resume_state(self) -> dict | None:
        """The last checkpoint if it was made with the same configuration, else ``None`` (start afresh)."""
        if not self.last_path.exists():
            return None
        try:
            state = load_checkpoint(self.last_path)
        except FmnistBookError as err:
            raise RunError(f"{err}; delete it to train this model afresh (or re-run with --force)") from None
        return state if state.get("config") == self.config else None

    def save_last(self, **state) -> None:
        save_checkpoint(self.last_path, {"config": self.config, **state})

    def save_best(self, model_state: dict, epoch: int, record: dict) -> None:
        save_checkpoint(self.best_path, {"config": self.config, "model": model_state, "epoch": epoch,
                                         "record": record})


def rng_state(generator: torch.Generator) -> dict:
    """The states of the data generator and the global CPU generator (dropout draws from it)."""
    return {"data": generator.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class Split:
    """Images (``uint8``, on the device) and labels of one part of a dataset, with its normalisation."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple

    def inputs(self, index=None) -> torch.Tensor:
        images = self.images if index is None else self.images[index]
        return normalize(images, self.mean, self.std)


def check_finite(loss: torch.Tensor, where: str) -> float:
    """Stop at the first NaN or infinite loss, naming where it happened, instead of training on garbage."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RunError(f"{where}: loss is {value}; training stopped (last good checkpoint kept)")
    return value


def train_epoch(model, split: Split, cfg: TrainConfig, optimizer, scheduler, generator,
                where: str = "training") -> dict:
    """One pass over ``split`` in shuffled mini-batches; returns mean loss and accuracy."""
    model.train()
    device = split.images.device
    total_loss, correct, seen = 0.0, 0, 0
    for step, index in enumerate(batch_indices(len(split.labels), cfg.batch_size, generator, device)):
        images = split.images[index]
        if cfg.augment:
            images = weak_augment(images, generator)
        labels = split.labels[index]
        with autocast_context(device, cfg.dtype):
            logits = model(normalize(images, split.mean, split.std))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        total_loss += check_finite(loss, f"{where}, step {step}") * len(labels)  # before a NaN update
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.inference_mode()
def evaluate(model, split: Split, batch_size: int = 1000, dtype: str = "float32") -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for index in batch_indices(len(split.labels), batch_size, device=split.images.device):
        with autocast_context(split.images.device, dtype):
            logits = model(split.inputs(index)).float()
        total_loss += float(F.cross_entropy(logits, split.labels[index], reduction="sum"))
        correct += int((logits.argmax(1) == split.labels[index]).sum())
    model.train(was_training)
    n = len(split.labels)
    return {"loss": total_loss / n, "accuracy": correct / n}


@dataclass
class Selection:
    """Which history entry chooses ``best.pt``: e.g. the highest ``val_accuracy`` or the lowest ``val_loss``."""

    key: str = "val_accuracy"
    higher_is_better: bool = True

    def improves(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


def fit_epochs(model, cfg: TrainConfig, out_dir, steps_per_epoch: int, epoch_fn, validate_fn, *, device,
               selection: Selection = Selection(), log=print, name: str = "model", meta: dict | None = None):
    """The epoch loop every chapter trains with: seeding, optimiser and schedule, history, checkpoints, resume.

    Parameters
    ----------
    model : torch.nn.Module
        The network; moved to ``device`` (channels-last / compiled there as ``cfg`` says).
    cfg : TrainConfig
        Hyper-parameters; stored in every checkpoint, and a checkpoint with another config is not resumed.
    out_dir : path
        Receives ``last.pt``, ``best.pt``, ``history.json`` and ``history.csv``.
    steps_per_epoch : int
        Optimiser steps per epoch (sets the length of the learning-rate schedule).
    epoch_fn : callable
        ``epoch_fn(model, optimizer, scheduler, generator, where) -> dict`` trains one epoch and returns its
        statistics (stored with a ``train_`` prefix).
    validate_fn : callable
        ``validate_fn(model) -> dict`` of validation statistics (stored with a ``val_`` prefix).
    selection : Selection
        The history entry that chooses ``best.pt``; only validation data should decide it.
    log : callable
        Receives one line per epoch.
    name : str
        Names the run in log lines and errors.
    meta : dict, optional
        Stored in the checkpoints beside the configuration (e.g. what is needed to rebuild the model).

    Returns
    -------
    list of dict
        One record per epoch: epoch, lr, train_*, val_*, seconds.
    """
    torch.manual_seed(cfg.seed)
    generator = make_generator(cfg.seed, device)
    raw_model, runnable = prepare_model(model, cfg, device)
    optimizer = make_optimizer(raw_model, cfg)
    scheduler = make_schedule(optimizer, cfg.schedule, cfg.epochs * steps_per_epoch)
    checkpointer = Checkpointer(Path(out_dir), {**cfg.to_dict(), **(meta or {})})
    history, start, best = _resume(checkpointer, raw_model, optimizer, scheduler, generator, log)
    for epoch in range(start, cfg.epochs + 1):
        started = time.perf_counter()
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        train_stats = epoch_fn(runnable, optimizer, scheduler, generator, f"{name}, epoch {epoch}")
        record.update({f"train_{k}": v for k, v in train_stats.items()})
        record.update({f"val_{k}": v for k, v in validate_fn(runnable).items()})
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if selection.improves(record[selection.key], best):
            best = record[selection.key]
            checkpointer.save_best(raw_model.state_dict(), epoch, record)
        checkpointer.save_last(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), epoch=epoch, best=best,
                               history=history.records, rng=rng_state(generator))
        log(f"{name} epoch {epoch}/{cfg.epochs}: " + " | ".join(
            f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("train_", "val_"))) +
            f" | {record['seconds']:.1f}s")
    return history.records


def fit(model, train: Split, val: Split, cfg: TrainConfig, out_dir, log=print, name: str = "model",
        meta: dict | None = None) -> list[dict]:
    """Train a classifier on ``train`` with cross-entropy; ``best.pt`` is the best ``val`` accuracy.

    ``val`` chooses the checkpoint (the test set is never used here); see :func:`fit_epochs` for the
    other parameters and the returned history (train/val loss and accuracy per epoch).
    """
    def epoch_fn(runnable, optimizer, scheduler, generator, where):
        return train_epoch(runnable, train, cfg, optimizer, scheduler, generator, where)

    def validate_fn(runnable):
        return evaluate(runnable, val, cfg.eval_batch_size, cfg.dtype)

    return fit_epochs(model, cfg, out_dir, math.ceil(len(train.labels) / cfg.batch_size), epoch_fn, validate_fn,
                      device=train.images.device, log=log, name=name, meta=meta)


def _resume(checkpointer: Checkpointer, model, optimizer, scheduler, generator, log):
    state = checkpointer.resume_state()
    if state is None:
        return History(checkpointer.out_dir), 1, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(generator, state["rng"])
    log(f"resuming from {checkpointer.last_path} after epoch {state['epoch']}")
    return History(checkpointer.out_dir, state["history"]), state["epoch"] + 1, state["best"]


def load_trained(path, build, device="cpu"):
    """Rebuild a model from a checkpoint written by :class:`Checkpointer` with ``build(config)``."""
    state = load_checkpoint(path, map_location=device)
    model = build(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state
