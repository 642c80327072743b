"""The semi-supervised chapter's study: every model at every label count and seed, on the same labeled subsets,
and M2 at the lowest label count for several weights ``alpha`` of its classification term.

Each trained model is a ``semisup`` job (:func:`fmnist_core.chapters.semisupervised.model.run_semisup`) in
``models/<run name>/``; :func:`run_study` plans them, runs them (finished ones are skipped) and gathers their
``metrics.json``, ``history.json`` and ``timings.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fmnist_core.core import metrics, wording
from fmnist_core.core.config import param, require, require_choice
from fmnist_core.core.data import TEST_IMAGES, TRAIN_IMAGES, ImageDataset, Split, job_dataset, make_splits
from fmnist_core.core.io import read_json
from fmnist_core.core.jobs import Job, run_jobs
from fmnist_core.core.generative import to_unit
from fmnist_core.core.train import (OptimizerConfig, RuntimeConfig, ScheduleConfig, optimizer_steps,
                                    resolve_device)
from fmnist_core.chapters.semisupervised.model import (DATASET, SEMISUP_MODELS, SemiSupBudget, SemiSupConfig,
                                                       SemiSupParams, accuracy, class_probabilities,
                                                       load_trained_semisup)

ALPHA_STUDY = [0.1, 1.0, 10.0, 100.0]
CEILING = "cnn, fully supervised ceiling"  # the model name of the ceiling's rows


@dataclass
class SemiSupStudyConfig(SemiSupBudget, OptimizerConfig, ScheduleConfig, RuntimeConfig, SemiSupParams):
    """The study: ``models`` × ``label_counts`` × ``seeds`` (each a :class:`SemiSupConfig` job with
    ``num_labels``, ``label_seed = seed`` and ``seed`` set per job), plus the alpha study of M2."""

    models: list[str] = param(list(SEMISUP_MODELS), "semisup_vae | m2 | encoder_only | cnn")
    label_counts: list[int] = param([100, 1000, 5000, 0], "labeled images per run (0 = all: the ceiling)")
    seeds: list[int] = param([0], "seeds; each draws its own labeled subset (label_seed = seed)")
    alpha_study: list[float] = param(ALPHA_STUDY, "M2 at the lowest label count (first seed) once per alpha, to "
                                                  "show what the weight of its classification term does; [] = none")
    focus_labels: int = param(5000, "label count of the confusion matrices, the voting study and the latent space")
    ceiling_epochs: int = param(0, "epochs of a fully supervised ceiling: the CNN on every image of the training "
                                   "split, all labeled, on its own budget (no image is unlabeled, so the shared "
                                   "steps of the comparison do not apply); 0 = none")
    ceiling_images: int = param(0, "images of the ceiling's training split (class-balanced); 0 = all of it")
    tta_copies: list[int] = param([0, 2, 4, 8, 16], "extra augmented copies compared in the voting study")
    embed_images: int = param(2000, "test images (class-balanced) in the latent-space picture")
    perplexity: float = param(30.0, "t-SNE perplexity of the latent-space picture")
    n_jobs: int = param(2, "threads for t-SNE")

    def check(self) -> None:
        super().check()
        require(len(self.models) > 0, "models", "must name at least one model")
        require(len(set(self.models)) == len(self.models), "models", "must not name a model twice")
        for name in self.models:
            require_choice(name, "models", SEMISUP_MODELS)
        # Each run draws its labels, class-balanced, from the training split: Fashion-MNIST's training images
        # less the validation split, cut to train_images when that is smaller.
        pool = TRAIN_IMAGES[DATASET] - self.val_size
        pool = self.train_images if 0 < self.train_images < pool else pool
        require(len(self.label_counts) > 0 and all(n == 0 or (10 <= n <= pool and n % 10 == 0)
                                                   for n in self.label_counts), "label_counts",
                f"must list 0 (all) or multiples of 10 (the same number of every class) up to {pool:,}, the "
                f"training images left (Fashion-MNIST's 60,000 less val_size, cut to train_images), "
                f"got {self.label_counts}")
        require(len(self.seeds) > 0 and min(self.seeds) >= 0, "seeds",
                f"must list at least one seed, none negative, got {self.seeds}")
        require(all(a >= 0 for a in self.alpha_study) and len(set(self.alpha_study)) == len(self.alpha_study),
                "alpha_study", f"must list distinct non-negative weights, got {self.alpha_study}")
        require(self.focus_labels in self.label_counts, "focus_labels", "must be one of the label_counts")
        require(all(t >= 0 for t in self.tta_copies), "tta_copies", "must be non-negative")
        require(10 <= self.embed_images <= TEST_IMAGES[DATASET] and self.embed_images % 10 == 0, "embed_images",
                f"must be a positive multiple of 10 up to the 10,000 test images, got {self.embed_images}")
        require(self.perplexity > 0, "perplexity", f"must be positive, got {self.perplexity}")
        require(self.n_jobs >= 1, "n_jobs", f"must be at least 1, got {self.n_jobs}")
        require(self.ceiling_epochs >= 0, "ceiling_epochs", f"must be 0 (none) or positive, got {self.ceiling_epochs}")
        require(self.ceiling_images >= 0 and self.ceiling_images % 10 == 0, "ceiling_images",
                f"must be 0 (all) or a multiple of 10, got {self.ceiling_images}")

    def job_config(self, model: str, num_labels: int, seed: int, *layers: dict) -> SemiSupConfig:
        """The configuration of one job: this study's parameters, with the job's model, label count and seed
        (which also seeds the labeled subset), updated by ``layers``."""
        return self.narrow(SemiSupConfig, {"model": model, "num_labels": num_labels, "label_seed": seed,
                                           "seed": seed}, *layers, where=f"job {run_name(model, num_labels, seed)}")

    def alpha_labels(self) -> int:
        """The label count of the alpha study: the lowest one (0 = all only when it is the only one)."""
        return min((n for n in self.label_counts if n), default=0)


def run_name(model: str, num_labels: int, seed: int, alpha: float | None = None) -> str:
    """``<model>_n<labels or all>_s<seed>``, with ``_alpha<alpha>`` for an alpha-study job of another alpha."""
    return f"{model}_n{num_labels or 'all'}_s{seed}" + (f"_alpha{alpha:g}" if alpha is not None else "")


# The cost of one optimiser step of each model relative to the CNN's, measured on one CPU thread (quick profile,
# batch 64): M2 ~0.39 s (its unlabeled bound decodes every image once per class), the Semi-SupVAE ~0.13 s, the
# encoder-only classifier and the CNN ~0.03 s. Only the order of the jobs depends on it (Job.cost).
STEP_COST = {"m2": 12.0, "semisup_vae": 4.0, "encoder_only": 1.0, "cnn": 1.0}


def job_cost(jcfg: SemiSupConfig) -> float:
    """The estimated running time of one job (:attr:`Job.cost`): its optimiser steps times its model's
    :data:`STEP_COST`."""
    return optimizer_steps(jcfg) * STEP_COST[jcfg.model]


def _add_job(planned: dict, cfg: SemiSupStudyConfig, run_dir: Path, part: str, model: str, num_labels: int,
             seed: int, alpha: float | None = None) -> None:
    """Plan one job into ``planned`` (by label), or mark the already planned one as part of ``part`` too."""
    other = alpha is not None and alpha != cfg.alpha
    label = run_name(model, num_labels, seed, alpha if other else None)
    if label not in planned:
        jcfg = cfg.job_config(model, num_labels, seed, {"alpha": alpha} if other else {})
        planned[label] = Job("semisup", jcfg, run_dir / "models" / label, label, {"parts": []}, job_cost(jcfg))
    planned[label].info["parts"].append(part)


def plan_jobs(cfg: SemiSupStudyConfig, run_dir) -> list[Job]:
    """Every (label count, seed, model) of the study, then M2 at :meth:`SemiSupStudyConfig.alpha_labels` labels
    and the first seed for every alpha of ``alpha_study`` (the job of ``alpha`` itself is shared)."""
    run_dir, planned = Path(run_dir), {}
    for num_labels in cfg.label_counts:
        for seed in cfg.seeds:
            for model in cfg.models:
                _add_job(planned, cfg, run_dir, "main", model, num_labels, seed)
    for alpha in cfg.alpha_study:
        _add_job(planned, cfg, run_dir, "alpha", "m2", cfg.alpha_labels(), cfg.seeds[0], alpha)
    if cfg.ceiling_epochs:
        label = f"cnn_ceiling_s{cfg.seeds[0]}"
        jcfg = cfg.job_config("cnn", 0, cfg.seeds[0], {"train_images": cfg.ceiling_images,
                                                       "epochs": cfg.ceiling_epochs})
        planned[label] = Job("semisup", jcfg, run_dir / "models" / label, label, {"parts": ["ceiling"]},
                             job_cost(jcfg))
    return list(planned.values())


@dataclass
class StudyResults:
    """What :func:`run_study` gathers: one row per run of the main study, one per alpha of the alpha study
    (with the last epoch's training terms), and the wall-clock figures per run (kept apart from metrics)."""

    rows: list = field(default_factory=list)
    alpha_rows: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


def _alpha_row(job: Job, row: dict) -> dict:
    """An alpha-study row: the run's metrics, its alpha and the mean training terms of its last epoch."""
    last = read_json(job.out_dir / "history.json")[-1]
    terms = {k: last[k] for k in ("train_labeled", "train_unlabeled", "train_classification")}
    return {"alpha": row["classification_weight"], **row, **terms}


def run_study(cfg: SemiSupStudyConfig, run_dir, log=print) -> tuple[ImageDataset, Split, StudyResults]:
    """Plan the jobs, run them (finished ones are skipped) and gather their results.

    Returns
    -------
    ds : ImageDataset
        Fashion-MNIST on the configured device.
    test : Split
        The test images every run was evaluated on (:func:`test_split`).
    results : StudyResults
    """
    jobs, results = plan_jobs(cfg, run_dir), StudyResults()
    for job, job_metrics in zip(jobs, run_jobs(jobs, log)):
        row = {**job_metrics, "run": job.label}
        if "main" in job.info["parts"]:
            results.rows.append(row)
        if "alpha" in job.info["parts"]:
            results.alpha_rows.append(_alpha_row(job, row))
        if "ceiling" in job.info["parts"]:
            results.rows.append({**row, "model": CEILING})
        results.timings[job.label] = read_json(job.out_dir / "timings.json")
    ds = job_dataset(DATASET, resolve_device(cfg.device))
    return ds, test_split(cfg, ds), results


M2_DIAGNOSTICS = {"val_decoder_agreement": "decoder's best class = label", "val_classifier_accuracy": "q(y | x) right",
                  "val_gradient_ratio": "gradient ratio U / (α CE)"}


def m2_diagnostic_rows(run_dir, results: StudyResults) -> list[dict]:
    """Per M2 run (main study and alpha study) and evaluation: the step, whether it was still in the labeled-only
    warm-up, and :func:`fmnist_core.chapters.semisupervised.model.m2_diagnostics`'s figures on validation images."""
    out, seen = [], set()
    for row in results.rows + results.alpha_rows:
        if row.get("model") != "m2" or row["run"] in seen:
            continue
        seen.add(row["run"])
        job = read_json(Path(run_dir) / "models" / row["run"] / "job.json")["config"]
        records = read_json(Path(run_dir) / "models" / row["run"] / "history.json")
        start = full_objective_from(records, job["m2_warmup"])
        for record in records:
            if record.get("val_decoder_agreement") is None:
                continue
            phase = ("labeled only" if start is None or record["step"] <= start
                     else f"full objective from step {start:,}")
            out.append({"run": row["run"], "alpha": job["alpha"], "step": record["step"], "phase": phase,
                        **{k: record[k] for k in M2_DIAGNOSTICS}})
    return out


def m2_schedule_words(warmup: int, gate_every: int, rows: list[dict]) -> str:
    """The page's sentences on M2's schedule: its labeled-only warm-up, its gate and, from
    :func:`m2_diagnostic_rows` ``rows``, in which runs the unlabeled bound took part."""
    if not warmup and not gate_every:
        return "M2 trains on the full objective from the first step, as Kingma et al. did (`m2_warmup` = 0)."
    words = (f"Here M2 first trains {warmup:,} steps on the labeled images alone (labeled bound and α × "
             "cross-entropy: the `m2_warmup` parameter), so that its decoder learns what each class looks like "
             "before U(x) steers the classifier; Kingma et al. train on the full objective from the first step.")
    if not gate_every:
        return words
    phases = {row["run"]: row["phase"] for row in rows}  # each run's last evaluation: its phase at the end
    opened = {run: phase for run, phase in phases.items() if phase != "labeled only"}
    words += (f" Then a gate (`m2_gate_every` = {gate_every}) checks every {gate_every} steps whether the decoder's "
              "best class agrees with these validation images' labels at least as often as q(y|x) is right, and "
              "lets U(x) in only from then on. ")
    if not opened:
        return words + (f"It stayed shut in all {len(phases)} M2 runs: at this budget no unlabeled image entered "
                        "M2's objective, so its classifier is q(y|x) trained on α × cross-entropy alone (with "
                        "Adam, whose steps do not scale with the loss, close to the encoder trained on labels "
                        "only) and the comparison with that encoder measures no use of unlabeled images.")
    return words + f"It opened in {len(opened)} of {len(phases)} M2 runs: " + "; ".join(
        f"{run}, {phase}" for run, phase in opened.items()) + "."


def full_objective_from(records: list[dict], warmup: int) -> int | None:
    """The steps an M2 run took before its first step on the full objective (None: none in the run), from the
    share ``train_full_objective`` of each history interval's steps (histories without it: ``warmup``)."""
    previous = 0
    for record in records:
        share = record.get("train_full_objective")
        if share is None:
            return warmup if records and records[-1]["step"] > warmup else None
        if share > 0:
            return record["step"] - round(share * (record["step"] - previous))
        previous = record["step"]
    return None


def test_split(cfg: SemiSupStudyConfig, ds: ImageDataset) -> Split:
    """The test images every run is evaluated on: all, or the same class-balanced subset (``split_seed``)."""
    return make_splits(ds, cfg.val_size, cfg.split_seed, cfg.test_images)[0].test


def voting_study(out_dir, test: Split, copies: list[int]) -> list[dict]:
    """Test accuracy of one run's best checkpoint for each number of extra augmented copies."""
    model, state = load_trained_semisup(Path(out_dir) / "best.pt", test.images.device)
    return [{"copies": n, "test_accuracy": accuracy(class_probabilities(model, state["config"],
                                                                        to_unit(test.images), n), test.labels)}
            for n in copies]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (model, label count)."""
    return metrics.summarise_seeds(rows, ("model", "num_labels"),
                                   ("train_accuracy", "val_accuracy", "test_accuracy", "test_accuracy_tta"))


def confusion(out_dir, labels) -> list[list[int]]:
    """The test confusion matrix (counts) of a run, from its saved test probabilities (with TTA)."""
    probs = np.load(Path(out_dir) / "test_probs.npy")
    return metrics.confusion_matrix(np.asarray(labels.cpu()), probs.argmax(1), probs.shape[1]).tolist()


def chance_note(rows: list[dict], run_dir, num_classes: int, profile: str) -> str:
    """The page's paragraph on the (model, label count) runs that have not learned at this budget.

    Parameters
    ----------
    rows : list of dict
        The main study's rows (:attr:`StudyResults.rows`): ``model``, ``num_labels``, ``test_accuracy``, ``run``.
    run_dir : path
        The run folder; each run's last validation cross-entropy is read from ``models/<run>/history.json``.
    num_classes : int
        Number of classes.
    profile : str
        The profile, for the command that gives the runs more budget.

    Returns
    -------
    str
        Markdown, ``""`` when every run has learned (:func:`fmnist_core.core.wording.chance_note`).
    """
    groups: dict = {}
    for row in rows:
        loss = read_json(Path(run_dir) / "models" / row["run"] / "history.json")[-1].get("val_loss")
        groups.setdefault((row["model"], row["num_labels"]), []).append((row["test_accuracy"], loss))
    runs = [wording.RunScore(f"{model} @ {n:,} labels" if n else f"{model} @ all labels",
                             float(np.mean([a for a, _ in scores])),
                             None if any(l is None for _, l in scores) else float(np.mean([l for _, l in scores])))
            for (model, n), scores in groups.items()]
    return wording.chance_note(runs, num_classes, wording.remedy("semisupervised", profile))


def loss_terms_note(run_dir, run: str, kl_weight: float) -> str:
    """Which term makes up the Semi-SupVAE's objective, from the last epoch's logged means of one run.

    Parameters
    ----------
    run_dir : path
        The run folder (``models/<run>/history.json`` and ``metrics.json``).
    run : str
        A ``semisup_vae`` run's name (:func:`run_name`).
    kl_weight : float
        The weight of its KL term.

    Returns
    -------
    str
        A sentence giving the reconstruction, weighted KL and weighted cross-entropy in nats per image and
        naming the term that makes up more than half of their sum, or saying that none does.
    """
    folder = Path(run_dir) / "models" / run
    last, weight = read_json(folder / "history.json")[-1], read_json(folder / "metrics.json")["classification_weight"]
    terms = {"reconstruction": last["train_recon"], "KL": kl_weight * last["train_kl"],
             "weighted cross-entropy": weight * last["train_classification"]}
    total = sum(terms.values())
    largest = max(terms, key=terms.get)
    shares = ", ".join(f"{name} {value:,.1f} ({value / total:.0%})" for name, value in terms.items())
    verdict = (f"the {largest} term dominates it" if terms[largest] > total / 2
               else "no single term makes up half of it")
    return (f"Its objective in the last epoch of {run} (means over the epoch's steps, nats per image): {shares} "
            f"of {total:,.1f}, the cross-entropy {last['train_classification']:.3f} times its weight "
            f"{weight:g} and the KL {last['train_kl']:.1f} times {kl_weight:g}; {verdict}.").replace("%)", " %)")
