"""The experiments of the book: one parameterized notebook each, its parameter class and its chapter title."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fmnist_core.chapters import classification, vae
from fmnist_core.chapters.classification import ClassificationConfig
from fmnist_core.chapters.dataset import DatasetConfig
from fmnist_core.chapters.fixmatch import study as fixmatch
from fmnist_core.chapters.fixmatch.study import FixMatchStudyConfig
from fmnist_core.chapters.layerwise import LayerwiseConfig
from fmnist_core.chapters.semisupervised import study as semisupervised
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
    whose settings of this experiment its page quotes: those settings are part of its key too. ``plan`` is the
    chapter's ``plan_jobs(config, run_dir) -> list[Job]`` when its notebook trains through jobs: the jobs the
    notebook will run, which an executor (:mod:`fmnist_core.pipeline.executors`) can run first, elsewhere.
    """

    name: str
    title: str
    config: type[Config]
    requires: tuple[str, ...] = field(default=())
    reads: tuple[str, ...] = field(default=())
    describes: tuple[str, ...] = field(default=())
    plan: Callable | None = None


EXPERIMENTS = {e.name: e for e in (
    Experiment("dataset", "The Fashion-MNIST dataset", DatasetConfig),
    Experiment("classification", "Supervised classification", ClassificationConfig, plan=classification.plan_jobs),
    Experiment("layerwise", "What each layer sees", LayerwiseConfig, requires=("classification",)),
    Experiment("vae", "A convolutional VAE", VAEConfig, plan=vae.plan_jobs),
    Experiment("semisupervised", "Semi-supervised learning with a VAE", SemiSupStudyConfig,
               plan=semisupervised.plan_jobs),
    Experiment("fixmatch", "FixMatch with few labels", FixMatchStudyConfig, reads=("semisupervised",),
               describes=("standard", "paper"), plan=fixmatch.plan_jobs),
)}


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; anything else (a path, a typo) is refused with the valid names."""
    if name not in EXPERIMENTS:
        raise ConfigError(unknown_name_message("experiment", name, EXPERIMENTS))
    return EXPERIMENTS[name]
