"""The experiments of the book: one parameterized notebook each, its parameter class and its chapter title."""
from __future__ import annotations

from dataclasses import dataclass, field

from .classify import ClassificationConfig
from .config import Config, unknown_name_message
from .errors import ConfigError
from .explore import DatasetConfig
from .fixmatch_study import FixMatchStudyConfig
from .layerwise import LayerwiseConfig
from .semisup_study import SemiSupStudyConfig
from .vae import VAEConfig


@dataclass(frozen=True)
class Experiment:
    """A chapter of the book: ``notebooks/<name>.ipynb`` run with a validated ``config`` class.

    ``modules`` are the ``fmnist_core`` modules whose source is part of the run's cache key, so a code
    change re-runs the experiments that use it and only those; ``requires`` are experiments whose results
    this one reads (their keys are part of its key too).
    """

    name: str
    title: str
    config: type[Config]
    modules: tuple[str, ...]
    requires: tuple[str, ...] = field(default=())


_COMMON = ("config", "data", "errors", "io", "plots", "experiments", "report")
EXPERIMENTS = {e.name: e for e in (
    Experiment("dataset", "The Fashion-MNIST dataset", DatasetConfig, _COMMON + ("explore", "embed")),
    Experiment("classification", "Supervised classification", ClassificationConfig,
               _COMMON + ("classify", "models", "train", "metrics")),
    Experiment("layerwise", "What each layer sees", LayerwiseConfig,
               _COMMON + ("layerwise", "activations", "embed", "classify", "models", "train", "metrics"),
               requires=("classification",)),
    Experiment("vae", "A convolutional VAE", VAEConfig,
               _COMMON + ("vae", "lfw", "classify", "models", "train", "metrics", "embed", "explore")),
    Experiment("semisupervised", "Semi-supervised learning with a VAE", SemiSupStudyConfig,
               _COMMON + ("semisup", "semisup_study", "predict", "vae", "lfw", "classify", "models", "train",
                          "metrics", "embed", "explore")),
    Experiment("fixmatch", "FixMatch with few labels", FixMatchStudyConfig,
               _COMMON + ("fixmatch", "fixmatch_study", "randaugment", "classify", "models", "train", "metrics")),
)}


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; anything else (a path, a typo) is refused with the valid names."""
    if name not in EXPERIMENTS:
        raise ConfigError(unknown_name_message("experiment", name, EXPERIMENTS))
    return EXPERIMENTS[name]
