"""The experiments of the book: one parameterized notebook each, its parameter class and its chapter title."""
from __future__ import annotations

from dataclasses import dataclass, field

from fmnist_core.chapters.classification import ClassificationConfig
from fmnist_core.chapters.dataset import DatasetConfig
from fmnist_core.chapters.fixmatch.study import FixMatchStudyConfig
from fmnist_core.chapters.layerwise import LayerwiseConfig
from fmnist_core.chapters.semisupervised.study import SemiSupStudyConfig
from fmnist_core.chapters.vae import VAEConfig
from fmnist_core.core.config import Config, unknown_name_message
from fmnist_core.core.errors import ConfigError


@dataclass(frozen=True)
class Experiment:
    """A chapter of the book: ``notebooks/<name>.ipynb`` run with a validated ``config`` class.

    The source a run depends on is derived from the notebook's imports (see
    :func:`fmnist_core.pipeline.runner.key_parts`). ``requires`` are experiments whose results this one
    needs (it fails without them); ``reads`` are experiments whose results it shows when they exist. The
    keys of both are part of its key, so a new upstream result re-runs it. ``describes`` are other profiles
    whose settings of this experiment its page quotes: those settings are part of its key too.
    """

    name: str
    title: str
    config: type[Config]
    requires: tuple[str, ...] = field(default=())
    reads: tuple[str, ...] = field(default=())
    describes: tuple[str, ...] = field(default=())


EXPERIMENTS = {e.name: e for e in (
    Experiment("dataset", "The Fashion-MNIST dataset", DatasetConfig),
    Experiment("classification", "Supervised classification", ClassificationConfig),
    Experiment("layerwise", "What each layer sees", LayerwiseConfig, requires=("classification",)),
    Experiment("vae", "A convolutional VAE", VAEConfig),
    Experiment("semisupervised", "Semi-supervised learning with a VAE", SemiSupStudyConfig),
    Experiment("fixmatch", "FixMatch with few labels", FixMatchStudyConfig, reads=("semisupervised",),
               describes=("standard", "paper")),
)}


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; anything else (a path, a typo) is refused with the valid names."""
    if name not in EXPERIMENTS:
        raise ConfigError(unknown_name_message("experiment", name, EXPERIMENTS))
    return EXPERIMENTS[name]
