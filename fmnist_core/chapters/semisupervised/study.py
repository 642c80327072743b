"""The semi-supervised chapter's study: every model at every label count and seed, on the same labeled subsets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_core.core import metrics
from fmnist_core.core.config import param, require
from fmnist_core.core.data import TEST_IMAGES, TRAIN_IMAGES, ImageDataset, Split, Splits, subset
from fmnist_core.chapters.semisupervised.model import SemiSupConfig, class_probabilities, load_trained_semisup, semisup_splits, train_semisup
from fmnist_core.core.generative import to_unit


@dataclass
class SemiSupStudyConfig(SemiSupConfig):
    """The study: ``label_counts`` × ``seeds`` × ``models``; each run is a :class:`SemiSupConfig`."""

    label_counts: list[int] = param([100, 1000, 5000, 0], "labeled images per run (0 = all: the ceiling)")
    seeds: list[int] = param([0], "seeds; each draws its own labeled subset (label_seed = seed)")
    focus_labels: int = param(5000, "label count of the confusion matrices, the voting study and the latent space")
    tta_copies: list[int] = param([0, 2, 4, 8, 16], "extra augmented copies compared in the voting study")
    test_images: int = param(0, "evaluate on a class-balanced test subset of this size, the same for every run; "
                                "0 = all")
    embed_images: int = param(2000, "test images (class-balanced) in the latent-space picture")
    perplexity: float = param(30.0, "t-SNE perplexity of the latent-space picture")
    n_jobs: int = param(2, "threads for t-SNE")

    def check(self) -> None:
        super().check()
        # Each run draws its labels, class-balanced, from the training split: Fashion-MNIST's training images
        # less the validation split, cut to train_images when that is smaller.
        pool = TRAIN_IMAGES["fashion_mnist"] - self.val_size
        pool = self.train_images if 0 < self.train_images < pool else pool
        require(len(self.label_counts) > 0 and all(n == 0 or (10 <= n <= pool and n % 10 == 0)
                                                   for n in self.label_counts), "label_counts",
                f"must list 0 (all) or multiples of 10 (the same number of every class) up to {pool:,}, the "
                f"training images left (Fashion-MNIST's 60,000 less val_size, cut to train_images), "
                f"got {self.label_counts}")
        require(len(self.seeds) > 0 and min(self.seeds) >= 0, "seeds",
                f"must list at least one seed, none negative, got {self.seeds}")
        require(self.focus_labels in self.label_counts, "focus_labels", "must be one of the label_counts")
        require(all(t >= 0 for t in self.tta_copies), "tta_copies", "must be non-negative")
        require(self.test_images == 0 or (10 <= self.test_images <= TEST_IMAGES["fashion_mnist"]
                                          and self.test_images % 10 == 0), "test_images",
                f"must be 0 (all) or a positive multiple of 10 up to 10,000, got {self.test_images}")
        require(10 <= self.embed_images <= TEST_IMAGES["fashion_mnist"] and self.embed_images % 10 == 0,
                "embed_images", f"must be a positive multiple of 10 up to the 10,000 test images, got {self.embed_images}")
        require(self.perplexity > 0, "perplexity", f"must be positive, got {self.perplexity}")
        require(self.n_jobs >= 1, "n_jobs", f"must be at least 1, got {self.n_jobs}")

    def run_config(self, num_labels: int, seed: int) -> SemiSupConfig:
        """The configuration of one run of the study."""
        return self.narrow(SemiSupConfig, {"num_labels": num_labels, "label_seed": seed, "seed": seed})


def run_name(model: str, num_labels: int, seed: int) -> str:
    return f"{model}_n{num_labels or 'all'}_s{seed}"


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels.cpu()).float().mean())


def test_split(cfg: SemiSupStudyConfig, ds: ImageDataset) -> Split:
    """The test images every run is evaluated on: all, or the same class-balanced subset."""
    return subset(Split(ds.test_images, ds.test_labels, ds.mean, ds.std), cfg.test_images, cfg.split_seed,
                  ds.num_classes)


def evaluate_run(out_dir: Path, splits, labeled, tta: int) -> dict:
    """Train (labeled subset), validation and test accuracy of a run's best checkpoint, with and without TTA."""
    model, state = load_trained_semisup(Path(out_dir) / "best.pt", splits.test.images.device)

    def probs(split, copies=0):
        return class_probabilities(model, state["config"], to_unit(split.images), copies)

    test_probs = probs(splits.test, tta)
    np.save(Path(out_dir) / "test_probs.npy", test_probs.numpy())
    return {"train_accuracy": accuracy(probs(labeled), labeled.labels),
            "val_accuracy": accuracy(probs(splits.val), splits.val.labels),
            "test_accuracy": accuracy(probs(splits.test), splits.test.labels),
            "test_accuracy_tta": accuracy(test_probs, splits.test.labels), "best_epoch": int(state["epoch"])}


def run_study(cfg: SemiSupStudyConfig, ds: ImageDataset, run_dir, log=print) -> list[dict]:
    """Train and evaluate every (label count, seed, model); one row per run."""
    rows = []
    for num_labels in cfg.label_counts:
        for seed in cfg.seeds:
            run_cfg = cfg.run_config(num_labels, seed)
            labeled = semisup_splits(run_cfg, ds).labeled
            test = test_split(cfg, ds)
            for model in cfg.models:
                out = Path(run_dir) / "models" / run_name(model, num_labels, seed)
                _, _, splits, _ = train_semisup(run_cfg, model, ds, out, log)
                splits = Splits(splits.train, splits.val, test)
                rows.append({"model": model, "num_labels": num_labels or len(splits.train.labels), "seed": seed,
                             "run": run_name(model, num_labels, seed), **evaluate_run(out, splits, labeled, cfg.tta)})
    return rows


def voting_study(out_dir: Path, test, copies: list[int]) -> list[dict]:
    """Test accuracy of one run's best checkpoint for each number of extra augmented copies."""
    model, state = load_trained_semisup(Path(out_dir) / "best.pt", test.images.device)
    return [{"copies": n, "test_accuracy": accuracy(class_probabilities(model, state["config"],
                                                                        to_unit(test.images), n), test.labels)}
            for n in copies]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (model, label count)."""
    return metrics.summarise_seeds(rows, ("model", "num_labels"),
                                   ("train_accuracy", "val_accuracy", "test_accuracy", "test_accuracy_tta"))


def confusion(out_dir: Path, labels) -> list[list[int]]:
    """The test confusion matrix (counts) of a run, from its saved test probabilities (with TTA)."""
    probs = np.load(Path(out_dir) / "test_probs.npy")
    return metrics.confusion_matrix(np.asarray(labels.cpu()), probs.argmax(1), probs.shape[1]).tolist()
