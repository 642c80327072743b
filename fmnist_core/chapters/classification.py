"""The supervised classification study: every registry model trained on the same split, then evaluated.

Model selection uses the validation split only (``best.pt`` = best validation accuracy); the test set is
touched once, for the final report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_core.core import metrics, wording
from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import ImageDataset, Splits, job_dataset, make_splits, save_indices, subset, tta_augment
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.io import read_json, write_json
from fmnist_core.core.resources import project_root
from fmnist_core.core.jobs import Job, job_kind, run_jobs
from fmnist_core.core.loop import load_trained
from fmnist_core.core.models import build_model, count_parameters, list_models, model_meta, rebuild
from fmnist_core.core.supervised import fit
from fmnist_core.core.train import TrainConfig, resolve_device

ALL_MODELS = ["mlp", "lenet_avg", "lenet_max", "mycnn", "alexnet", "vgg16", "resnet18", "resnet34"]
DATASETS = ("fashion_mnist", "cifar10")


@dataclass
class EvaluationConfig(Config):
    """The data a classifier is trained, selected and tested on, and how its test report is made."""

    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split (the same for every model)")
    test_images: int = param(0, "evaluate on a class-balanced test subset of this size, the same for every model; 0 = all")
    tta: int = param(0, "test-time augmentation: average softmax over this many extra augmented copies")
    latency_repeats: int = param(20, "repeats when timing batch-1 latency")
    throughput_batch: int = param(512, "batch size when timing inference throughput")

    def check(self) -> None:
        super().check()
        require_choice(self.dataset, "dataset", DATASETS)
        require(self.val_size >= 10 and self.val_size % 10 == 0, "val_size", "must be a positive multiple of 10")
        require(self.split_seed >= 0, "split_seed", f"must be non-negative, got {self.split_seed}")
        require(self.test_images == 0 or (self.test_images % 10 == 0 and 10 <= self.test_images <= 10000),
                "test_images", "must be 0 (all) or a multiple of 10 up to 10,000")
        require(self.tta >= 0, "tta", "must be non-negative")
        require(self.throughput_batch >= 1, "throughput_batch", "must be at least 1")
        require(self.latency_repeats >= 1, "latency_repeats", "must be at least 1")


@dataclass
class ClassifierJobConfig(TrainConfig, EvaluationConfig):
    """One job of the chapter: train one registry model, then report it on the test set."""

    model: str = param("lenet_avg", "registry name of the model")

    def check(self) -> None:
        super().check()
        require(self.model in list_models(), "model", f"names unknown model {self.model!r} "
                                                      f"(known: {', '.join(list_models())})")


@dataclass
class ClassificationConfig(TrainConfig, EvaluationConfig):
    """Parameters of the classification chapter (training fields are shared by every model)."""

    models: list[str] = param(ALL_MODELS, "registry names of the models to compare")
    model_overrides: dict = param({}, "per-model training parameters, e.g. {resnet18: {epochs: 2}}")
    sgd_model: str = param("mycnn", "model trained a second time with SGD to compare optimisers ('' = none)")
    sgd_lr: float = param(0.01, "SGD learning rate (the CNN-comparison report: 0.01, x0.1 after half the epochs)")
    gallery_size: int = param(16, "most confident mistakes shown")
    budget_limited: list[str] = param([], "models whose budget in this profile is far too small to converge: "
                                          "trained and reported apart, with their budget, never ranked")

    def check(self) -> None:
        super().check()
        require(len(self.models) > 0, "models", "must name at least one model")
        for name in self.models:
            require(name in list_models(), "models", f"names unknown model {name!r} (known: {', '.join(list_models())})")
        require(self.sgd_model in self.models or self.sgd_model == "", "sgd_model",
                f"must be one of the trained models or '', got {self.sgd_model!r}")
        require(self.sgd_lr > 0, "sgd_lr", f"must be positive, got {self.sgd_lr}")
        ranked = [m for m in self.models if m not in self.budget_limited]
        require(len(ranked) > 0, "budget_limited", "must leave at least one model to rank")
        require(self.sgd_model in ranked or self.sgd_model == "", "sgd_model",
                f"must be a ranked model (not one of budget_limited), got {self.sgd_model!r}")
        for name in self.model_overrides:  # a profile may tune models a user's `models` then leaves out
            require(name in list_models(), "model_overrides", f"names unknown model {name!r}")
            self.model_config(name)  # validates the per-model values

    def model_config(self, name: str, *layers: dict) -> ClassifierJobConfig:
        """The job configuration of one model: the shared parameters updated by its overrides."""
        if not isinstance(self.model_overrides.get(name, {}), dict):
            raise ConfigError(f"parameter 'model_overrides': entry {name!r} must be a mapping")
        return self.narrow(ClassifierJobConfig, {"model": name}, self.model_overrides.get(name, {}), *layers,
                           where=f"model_overrides.{name}")

    def sgd_config(self) -> ClassifierJobConfig:
        """The CNN-comparison report's optimiser: plain SGD (momentum as ``momentum``, which the report does
        not state; no Nesterov) at ``sgd_lr``, x0.1 after half the steps, on the ``sgd_model``'s budget."""
        return self.model_config(self.sgd_model, {"optimizer": "sgd", "lr": self.sgd_lr, "schedule": "step",
                                                  "nesterov": False})


@job_kind("classifier", ClassifierJobConfig)
def run_classifier(cfg: ClassifierJobConfig, out_dir, log=print) -> dict:
    """Train one registry model (:func:`fmnist_core.core.supervised.fit`), then report its best-on-validation
    checkpoint on the test set; wall-clock figures go to ``timings.json``. Returns the test metrics."""
    out_dir = Path(out_dir)
    ds = job_dataset(cfg.dataset, resolve_device(cfg.device))
    splits, _ = make_splits(ds, cfg.val_size, cfg.split_seed, cfg.test_images)
    train = subset(splits.train, cfg.train_images, cfg.seed, ds.num_classes)
    torch.manual_seed(cfg.seed)
    c, h, _ = ds.image_shape
    model = build_model(cfg.model, in_channels=c, image_size=h, num_classes=ds.num_classes)
    history = fit(model.to(splits.train.images.device), train, splits.val, cfg, out_dir,
                  meta=model_meta(cfg.model, ds), name=out_dir.name, log=log)
    summary = evaluate_model(out_dir, splits, ds, cfg.tta, cfg.latency_repeats, cfg.throughput_batch,
                             cfg.eval_batch_size)
    # Wall-clock figures live apart from the metrics, which a re-run reproduces bit for bit.
    write_json(out_dir / "timings.json", {"train_s": sum(r["seconds"] for r in history),
                                          "latency_ms": summary.pop("latency_ms"),
                                          "throughput_img_s": summary.pop("throughput")})
    return {**summary, "train_images": len(train.labels), "epochs": cfg.epochs}


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


def plan_jobs(cfg: ClassificationConfig, run_dir) -> list[Job]:
    """One job per model (and one for the SGD comparison), in ``models/<label>/``."""
    runs = [(name, cfg.model_config(name)) for name in cfg.models]
    if cfg.sgd_model:
        runs.append((f"{cfg.sgd_model}-sgd", cfg.sgd_config()))
    return [Job("classifier", jcfg, Path(run_dir) / "models" / label, label, {"model": jcfg.model})
            for label, jcfg in runs]


def run_study(cfg: ClassificationConfig, run_dir, log=print):
    """Plan the jobs, run them (finished ones are skipped), gather their results.

    Returns
    -------
    ds : ImageDataset
    splits : Splits
        The split every job used (its indices are saved in ``split_indices.npz``).
    results : dict
        label -> {"model", "summary", "history", "timing"} (timing: wall-clock figures, kept apart).
    """
    run_dir = Path(run_dir)
    ds = job_dataset(cfg.dataset, resolve_device(cfg.device))
    splits, indices = make_splits(ds, cfg.val_size, cfg.split_seed, cfg.test_images)
    save_indices(run_dir / "split_indices.npz", **indices)
    jobs = plan_jobs(cfg, run_dir)
    results = {}
    for job, summary in zip(jobs, run_jobs(jobs, log)):
        results[job.label] = {"model": job.info["model"], "summary": summary,
                              "history": read_json(job.out_dir / "history.json"),
                              "timing": read_json(job.out_dir / "timings.json")}
    return ds, splits, results


REFERENCE_DIR = "reference"  # recorded results of other profiles, committed with the project (see README)


def recorded_accuracy(profile: str, model: str, root=None) -> dict | None:
    """A model's test accuracy as recorded for ``profile`` under ``reference/<profile>/classification/``
    (with the device and date of that run), or ``None`` when no such record exists."""
    run = Path(root or project_root()) / REFERENCE_DIR / profile / "classification"
    if not (run / "metrics.json").exists() or not (run / "env.json").exists():
        return None
    models, env = read_json(run / "metrics.json").get("models", {}), read_json(run / "env.json")
    if model not in models:
        return None
    return {"accuracy": models[model]["accuracy"], "device": env.get("device"), "date": env.get("finished_at"),
            "commit": env.get("git_commit")}


def chance_note(summaries: dict, models: list[str], num_classes: int, profile: str) -> str:
    """The page's paragraph on the ``models`` that have not learned at this budget (``""`` when none).

    Parameters
    ----------
    summaries : dict
        Per model, its test summary (``accuracy``, ``log_loss``: test cross-entropy).
    models : list of str
        The models the page ranks.
    num_classes : int
        Number of classes.
    profile : str
        The profile, for the command that gives the models more budget.

    Returns
    -------
    str
        Markdown (:func:`fmnist_core.core.wording.chance_note`).
    """
    runs = [wording.RunScore(m, summaries[m]["accuracy"], summaries[m].get("log_loss")) for m in models]
    return wording.chance_note(runs, num_classes, wording.remedy("classification", profile))
