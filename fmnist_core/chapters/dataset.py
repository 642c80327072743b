"""The dataset chapter: examples, class balance, mean images and 2-D embeddings of raw pixels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import balanced_subset


@dataclass
class DatasetConfig(Config):
    """Parameters of the dataset chapter."""

    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10")
    examples_per_class: int = param(10, "example images shown per class")
    embed_images: int = param(2000, "test images (class-balanced) embedded with PCA and t-SNE")
    perplexity: float = param(30.0, "t-SNE perplexity")
    seed: int = param(0, "seed of the image choice and the embeddings")
    n_jobs: int = param(2, "threads for t-SNE")

    def check(self) -> None:
        require_choice(self.dataset, "dataset", ("fashion_mnist", "cifar10"))
        require(1 <= self.examples_per_class <= 50, "examples_per_class", "must be between 1 and 50")
        require(self.embed_images >= 50 and self.embed_images % 10 == 0, "embed_images",
                "must be a multiple of 10 and at least 50")
        require(self.embed_images <= 10000, "embed_images", "cannot exceed the 10,000 test images")
        require(self.perplexity > 0, "perplexity", "must be positive")
        require(self.n_jobs >= 1, "n_jobs", "must be at least 1")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")


def class_counts(labels, num_classes: int = 10) -> list[int]:
    """Number of images of each class."""
    return torch.bincount(torch.as_tensor(labels).cpu(), minlength=num_classes).tolist()


def mean_images(images, labels, num_classes: int = 10) -> np.ndarray:
    """The pixel-wise mean image of each class, in [0, 1]."""
    images, labels = torch.as_tensor(images).cpu().float() / 255.0, torch.as_tensor(labels).cpu()
    return np.stack([images[labels == c].mean(0).numpy() for c in range(num_classes)])


def examples(images, labels, per_class: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random images of each class, ordered class by class."""
    labels_np = torch.as_tensor(labels).cpu().numpy()
    idx = balanced_subset(labels_np, per_class * num_classes, seed, num_classes)
    idx = idx[np.argsort(labels_np[idx], kind="stable")]
    return torch.as_tensor(images).cpu().numpy()[idx], labels_np[idx]
