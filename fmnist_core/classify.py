"""The supervised classification study: every registry model trained on the same split, then evaluated.

Model selection uses the validation split only (``best.pt`` = best validation accuracy); the test set is
touched once, for the final report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .config import param, require, require_choice
from .data import (ImageDataset, balanced_subset, load_dataset, normalize, save_indices, stratified_split,
                   weak_augment)
from .errors import ConfigError
from .io import write_json
from .models import build_model, count_parameters, list_models
from .train import Split, TrainConfig, fit, load_trained, resolve_device

ALL_MODELS = ["mlp", "lenet_avg", "lenet_max", "mycnn", "alexnet", "vgg16", "resnet18", "resnet34"]


@dataclass
class ClassificationConfig(TrainConfig):
    """Parameters of the classification chapter (training fields are shared by every model)."""

    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10")
    models: list[str] = param(ALL_MODELS, "registry names of the models to compare")
    model_overrides: dict = param({}, "per-model training parameters, e.g. {resnet18: {epochs: 2}}")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split (the same for every model)")
    sgd_model: str = param("mycnn", "model trained a second time with SGD to compare optimisers ('' = none)")
    sgd_lr: float = param(0.01, "SGD learning rate (seed 003: 0.01, x0.1 after half the epochs)")
    test_images: int = param(0, "evaluate on a class-balanced test subset of this size, the same for every model; 0 = all")
    throughput_batch: int = param(512, "batch size when timing inference throughput")
    tta: int = param(0, "test-time augmentation: average softmax over this many extra augmented copies")
    latency_repeats: int = param(20, "repeats when timing batch-1 latency")
    gallery_size: int = param(16, "most confident mistakes shown")

    def check(self) -> None:
        super().check()
        require(len(self.models) > 0, "models", "must name at least one model")
        for name in self.models:
            require(name in list_models(), "models", f"names unknown model {name!r} (known: {', '.join(list_models())})")
        require(self.sgd_model in self.models or self.sgd_model == "", "sgd_model",
                f"must be one of the trained models or '', got {self.sgd_model!r}")
        require(self.val_size >= 10 and self.val_size % 10 == 0, "val_size", "must be a positive multiple of 10")
        require_choice(self.dataset, "dataset", ("fashion_mnist", "cifar10"))
        require(self.split_seed >= 0, "split_seed", f"must be non-negative, got {self.split_seed}")
        require(self.sgd_lr > 0, "sgd_lr", f"must be positive, got {self.sgd_lr}")
        require(self.tta >= 0, "tta", "must be non-negative")
        require(self.test_images == 0 or (self.test_images % 10 == 0 and 10 <= self.test_images <= 10000),
                "test_images", "must be 0 (all) or a multiple of 10 up to 10,000")
        require(self.throughput_batch >= 1, "throughput_batch", "must be at least 1")
        require(self.latency_repeats >= 1, "latency_repeats", "must be at least 1")
        for name in self.model_overrides:  # a profile may tune models a user's `models` then leaves out
            require(name in list_models(), "model_overrides", f"names unknown model {name!r}")
            self.model_config(name)  # validates the per-model values

    def model_config(self, name: str) -> TrainConfig:
        """The training parameters of one model: the shared ones updated by its overrides."""
        if not isinstance(self.model_overrides.get(name, {}), dict):
            raise ConfigError(f"parameter 'model_overrides': entry {name!r} must be a mapping")
        return self.narrow(TrainConfig, self.model_overrides.get(name, {}), where=f"model_overrides.{name}")

    def sgd_config(self) -> TrainConfig:
        """Seed 003's optimiser: SGD with momentum 0.9, step schedule, on the ``sgd_model``'s budget."""
        base = self.model_config(self.sgd_model).to_dict()
        return TrainConfig.from_overrides(base, {"optimizer": "sgd", "lr": self.sgd_lr, "schedule": "step",
                                                 "nesterov": False})


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


def make_splits(ds: ImageDataset, val_size: int, split_seed: int, test_images: int = 0) -> tuple[Splits, dict]:
    """The stratified train/validation split of the training images, and the test set (or a class-balanced
    subset of it), on the device; also returns the indices used."""
    train_idx, val_idx = stratified_split(ds.train_labels, val_size, split_seed, ds.num_classes)
    test_idx = (balanced_subset(ds.test_labels, test_images, split_seed, ds.num_classes) if test_images
                else np.arange(len(ds.test_labels)))

    def part(images, labels, idx=None):
        if idx is not None:
            idx = torch.as_tensor(idx, device=images.device)
            images, labels = images[idx], labels[idx]
        return Split(images, labels, ds.mean, ds.std)

    splits = Splits(part(ds.train_images, ds.train_labels, train_idx), part(ds.train_images, ds.train_labels, val_idx),
                    part(ds.test_images, ds.test_labels, test_idx))
    return splits, {"train": train_idx, "val": val_idx, "test": test_idx}


def subset(split: Split, count: int, seed: int, num_classes: int = 10) -> Split:
    """A class-balanced subset of ``count`` images (all of them when ``count`` is 0)."""
    if count == 0 or count >= len(split.labels):
        return split
    idx = torch.as_tensor(balanced_subset(split.labels, count, seed, num_classes), device=split.images.device)
    return Split(split.images[idx], split.labels[idx], split.mean, split.std)


def model_meta(name: str, ds: ImageDataset) -> dict:
    """What ``predict`` needs to rebuild and feed the model, stored in its checkpoints."""
    c, h, _ = ds.image_shape
    return {"model": name, "in_channels": c, "image_size": h, "mean": list(ds.mean), "std": list(ds.std),
            "class_names": list(ds.class_names)}


def rebuild(config: dict) -> torch.nn.Module:
    """Build the architecture named in a checkpoint's config."""
    return build_model(config["model"], in_channels=config["in_channels"], image_size=config["image_size"],
                       num_classes=len(config["class_names"]))


def train_model(name: str, tcfg: TrainConfig, splits: Splits, ds: ImageDataset, out_dir: Path, log=print,
                label: str | None = None) -> list[dict]:
    """Train one registry model with :func:`fmnist_core.train.fit`; checkpoints land in ``out_dir``."""
    torch.manual_seed(tcfg.seed)
    c, h, _ = ds.image_shape
    model = build_model(name, in_channels=c, image_size=h, num_classes=ds.num_classes)
    train = subset(splits.train, tcfg.train_images, tcfg.seed, ds.num_classes)
    return fit(model.to(splits.train.images.device), train, splits.val, tcfg, out_dir, log=log,
               name=label or name, meta=model_meta(name, ds))


def evaluate_model(out_dir: Path, splits: Splits, ds: ImageDataset, tta: int = 0, latency_repeats: int = 20,
                   throughput_batch: int = 512, batch_size: int = 256) -> dict:
    """Test-set report of the best-on-validation checkpoint; saves the test probabilities beside it."""
    device = splits.test.images.device
    model, state = load_trained(Path(out_dir) / "best.pt", rebuild, device)
    probs = metrics.predict_proba(model, splits.test.inputs(), batch_size=batch_size, tta=tta,
                                  augment=tta_augment(ds.mean, ds.std) if tta else None)
    labels = splits.test.labels.cpu().numpy()
    summary = metrics.classification_summary(labels, probs.numpy(), ds.class_names)
    summary.update(parameters=count_parameters(model), best_epoch=int(state["epoch"]),
                   val_accuracy=float(state["record"]["val_accuracy"]),
                   latency_ms=metrics.measure_latency(model, ds.image_shape, device, repeats=latency_repeats),
                   throughput=metrics.measure_throughput(model, ds.image_shape, device, batch_size=throughput_batch,
                                                         repeats=3))
    np.save(Path(out_dir) / "test_probs.npy", probs.numpy())
    return summary


def tta_augment(mean, std):
    """Weak augmentation of images normalised with ``mean``/``std`` whose padding is black, as in training."""
    black = normalize(torch.zeros(1, len(mean), 1, 1, dtype=torch.uint8), mean, std)

    def augment(inputs, generator):
        shift = black.to(inputs.device)
        return weak_augment(inputs - shift, generator) + shift
    return augment


def planned_runs(cfg: ClassificationConfig) -> list[tuple[str, str, TrainConfig]]:
    """(label, model name, training parameters) of every training run of the study, in order."""
    runs = [(name, name, cfg.model_config(name)) for name in cfg.models]
    if cfg.sgd_model:
        runs.append((f"{cfg.sgd_model}-sgd", cfg.sgd_model, cfg.sgd_config()))
    return runs


def run_study(cfg: ClassificationConfig, run_dir, data_dir=None, log=print):
    """Train and evaluate every planned run; each writes ``models/<label>/`` (checkpoints, history, metrics).

    Returns
    -------
    ds : ImageDataset
    splits : Splits
    results : dict
        label -> {"model", "summary", "history", "timing"} (timing: wall-clock figures, kept apart).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, data_dir, device)
    splits, indices = make_splits(ds, cfg.val_size, cfg.split_seed, cfg.test_images)
    save_indices(run_dir / "split_indices.npz", **indices)
    results = {}
    for label, name, tcfg in planned_runs(cfg):
        out = run_dir / "models" / label
        history = train_model(name, tcfg, splits, ds, out, log=log, label=label)
        summary = evaluate_model(out, splits, ds, cfg.tta, cfg.latency_repeats, cfg.throughput_batch,
                                 tcfg.eval_batch_size)
        summary["train_images"] = len(subset(splits.train, tcfg.train_images, tcfg.seed, ds.num_classes).labels)
        summary["epochs"] = tcfg.epochs
        # Wall-clock figures live apart from the metrics, which a re-run reproduces bit for bit.
        timing = {"train_s": sum(r["seconds"] for r in history), "latency_ms": summary.pop("latency_ms"),
                  "throughput_img_s": summary.pop("throughput")}
        write_json(out / "metrics.json", summary)
        write_json(out / "timings.json", timing)
        results[label] = {"model": name, "summary": summary, "history": history, "timing": timing}
    return ds, splits, results
