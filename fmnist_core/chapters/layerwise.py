"""The layer-wise chapter: what every layer of a trained classifier (and of the same network untrained) sees.

Models come from the classification chapter's checkpoints; nothing is trained here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_core.core.activations import capture_activations, layer_report
from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import balanced_subset, load_dataset, normalize
from fmnist_core.core.errors import RunError
from fmnist_core.core.models import rebuild
from fmnist_core.core.loop import load_trained
from fmnist_core.core.metrics import predict_proba
from fmnist_core.core.train import configure_numerics, resolve_device


@dataclass
class LayerwiseConfig(Config):
    """Parameters of the layer-wise chapter."""

    models: list[str] = param(["lenet_avg", "lenet_max", "resnet18"],
                              "classification-chapter models to analyse (their best.pt)")
    per_class: int = param(50, "test images per class (the LeNet / layer-wise / VAE report: 50)")
    layers: dict = param({}, "model -> list of layer names; a model not listed uses input + its feature_layers")
    perplexity: float = param(30.0, "t-SNE perplexity")
    tsne_iter: int = param(500, "t-SNE iterations after the 250 of early exaggeration")
    untrained: bool = param(True, "also analyse each network with its random initial weights, as a reference")
    seed: int = param(0, "seed of the image choice, the untrained weights, PCA, t-SNE and the k-NN folds")
    n_jobs: int = param(2, "threads for t-SNE")
    device: str = param("auto", "auto | cpu | cuda (for the forward passes)")
    deterministic: bool = param(False, "CUDA: deterministic kernels (see fmnist_core.core.train.configure_numerics)")

    def check(self) -> None:
        require(len(self.models) > 0, "models", "must name at least one model")
        require(1 <= self.per_class <= 1000, "per_class", f"must be between 1 and 1000, got {self.per_class}")
        require(self.per_class * 10 >= 30, "per_class", "must give at least 30 images (t-SNE and 5-fold k-NN)")
        require(self.perplexity > 0, "perplexity", "must be positive")
        require(self.tsne_iter >= 1, "tsne_iter", "must be at least 1")
        require(self.n_jobs >= 1, "n_jobs", "must be at least 1")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")
        require_choice(self.device, "device", ("auto", "cpu", "cuda"))
        for name, layers in self.layers.items():
            require(name in self.models, "layers", f"names {name!r}, which is not among the models")
            require(isinstance(layers, list) and layers and all(isinstance(x, str) for x in layers),
                    "layers", f"entry {name!r} must be a non-empty list of layer names")


def checkpoint_path(results_dir, model: str) -> Path:
    """Where the classification chapter keeps the best-on-validation weights of ``model``."""
    return Path(results_dir) / "classification" / "models" / model / "best.pt"


def load_classifier(results_dir, model: str, device):
    """The trained classifier and its checkpoint state; a clear error if the chapter did not train it."""
    path = checkpoint_path(results_dir, model)
    if not path.exists():
        raise RunError(f"no trained '{model}' at {path}: the classification run of this profile must include it "
                       f"(parameter 'models' of the classification experiment)")
    return load_trained(path, rebuild, device)


def untrained_twin(state: dict, seed: int, device):
    """The same architecture with freshly (seeded) initialised weights."""
    torch.manual_seed(seed)
    return rebuild(state["config"]).to(device).eval()


def probe_images(cfg: LayerwiseConfig, data_dir=None, device="cpu"):
    """``per_class`` test images of every class (uint8, on ``device``) and their labels, chosen by seed."""
    ds = load_dataset("fashion_mnist", data_dir, device)
    idx = balanced_subset(ds.test_labels, cfg.per_class * ds.num_classes, cfg.seed, ds.num_classes)
    idx = torch.as_tensor(idx, device=ds.test_labels.device)
    return ds.test_images[idx], ds.test_labels[idx].cpu().numpy(), ds.class_names


def analyse(cfg: LayerwiseConfig, results_dir, data_dir=None, log=print) -> dict:
    """Activations, 2-D maps and scores of every layer of every model (and its untrained twin).

    Returns
    -------
    dict
        ``{"labels", "class_names", "images", "runs": {run_name: {"model", "trained", "embeddings", "scores",
        "predicted"}}}``, with run names ``<model>`` and ``<model> (untrained)``; ``images`` are the probe images
        (uint8, on the CPU) and ``predicted`` the trained network's class for each (``None`` when untrained).
    """
    device = resolve_device(cfg.device)
    configure_numerics(device, cfg.deterministic)
    images, labels, class_names = probe_images(cfg, data_dir, device)
    runs = {}
    for name in cfg.models:
        model, state = load_classifier(results_dir, name, device)
        inputs = normalize(images, state["config"]["mean"], state["config"]["std"])
        variants = [(name, model, True)]
        if cfg.untrained:
            variants.append((f"{name} (untrained)", untrained_twin(state, cfg.seed, device), False))
        for run_name, network, trained in variants:
            log(f"layer-wise analysis of {run_name}")
            activations = capture_activations(network, inputs, cfg.layers.get(name))
            embeddings, scores = layer_report(activations, labels, cfg.perplexity, cfg.seed, cfg.n_jobs,
                                              cfg.tsne_iter)
            predicted = predicted_classes(network, inputs) if trained else None
            runs[run_name] = {"model": name, "trained": trained, "embeddings": embeddings, "scores": scores,
                              "predicted": predicted}
    return {"labels": labels, "class_names": class_names, "images": images.cpu().numpy(), "runs": runs}


def predicted_classes(model, inputs) -> np.ndarray:
    """The class ``model`` predicts for each of ``inputs`` (normalised images on its device)."""
    return predict_proba(model, inputs).argmax(1).numpy()


def interactive_maps(analysis: dict, method: str = "tsne") -> tuple[dict, dict]:
    """The trained networks' 2-D maps, layer by layer, and their predictions, for the interactive figure.

    Returns
    -------
    maps : dict
        ``"<model> · <layer>"`` -> coordinates (N×2) of ``method`` (``"tsne"`` or ``"pca"``).
    predicted : dict
        The same keys -> the model's predicted class of each image.
    """
    maps, predicted = {}, {}
    for run_name, run in analysis["runs"].items():
        if not run["trained"]:
            continue
        for layer, embedding in run["embeddings"].items():
            key = f"{run_name} · {layer}"
            maps[key], predicted[key] = embedding[method], run["predicted"]
    return maps, predicted


def score_table(runs: dict) -> list[dict]:
    """One JSON row per (run, layer): the entries of ``metrics.json``."""
    return [{"run": run_name, "model": run["model"], "trained": run["trained"], **score}
            for run_name, run in runs.items() for score in run["scores"]]
