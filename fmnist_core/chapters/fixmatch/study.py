"""The FixMatch chapter's study: FixMatch and its supervised-only baseline at each label count and seed, on the
same labeled subsets, and the fully supervised ceiling — one ``fixmatch`` job each."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist_core.core import metrics, wording
from fmnist_core.core.config import TUNING_SEEDS, load_yaml, param, require
from fmnist_core.core.data import TRAIN_IMAGES, ImageDataset, job_dataset
from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import PROJECT_ROOT, read_json
from fmnist_core.core.jobs import Job, run_jobs
from fmnist_core.core.loop import load_trained
from fmnist_core.core.models import rebuild
from fmnist_core.core.train import resolve_device
from fmnist_core.chapters.fixmatch.algorithm import FixMatchConfig, FixMatchTraining, eval_split, weak_translation


PROFILES = PROJECT_ROOT / "profiles.yml"
RESULT_KEYS = ("test_accuracy", "median_test_accuracy", "median_evaluations", "val_accuracy", "augmentation")
REPORTED = {"test_accuracy": "final EMA model", "median_test_accuracy": "median of the last evaluations (the authors')"}


@dataclass
class FixMatchStudyConfig(FixMatchTraining):
    """The study: ``label_counts`` × ``seeds`` × {FixMatch, supervised-only}, plus the ceiling. Each job's
    ``num_labels``, ``label_seed``, ``seed`` and ``supervised_only`` are set from these."""

    label_counts: list[int] = param([40, 250, 4000], "labeled images per run (the FixMatch report: 40, 250, 4000)")
    seeds: list[int] = param([0], "seeds; each draws its own labeled subset (label_seed = seed)")
    single_seed_counts: list[int] = param([], "label counts run on the first seed only, where label_counts has them "
                                              "(a FixMatch job costs as much at 4,000 labels as at 40, where the "
                                              "seeds spread most)")
    ceiling_labels: int = param(-1, "labels of the fully supervised ceiling: -1 = every training image outside the "
                                    "validation split, 0 = no ceiling run, else a multiple of 10 up to that many; it "
                                    "takes (1 + mu) B labeled images a step, as many as a FixMatch step sees")
    ceiling_steps: int = param(0, "optimiser steps of the ceiling (0 = steps, the paper's equal budget); a "
                                  "supervised step costs an eighth of a FixMatch step, so a CPU budget can afford more")

    def check(self) -> None:
        super().check()
        # every run draws its labels, class-balanced, from the training images less the validation split
        available = TRAIN_IMAGES[self.dataset] - self.val_size
        where = f"{self.dataset}'s training images less the {self.val_size:,} of the validation split"
        require(len(self.label_counts) > 0 and all(10 <= n <= available and n % 10 == 0 for n in self.label_counts),
                "label_counts", f"must list positive multiples of 10 (the classes) up to {available:,} "
                                f"({where}), got {self.label_counts}")
        require(len(self.seeds) > 0 and min(self.seeds) >= 0, "seeds",
                f"must list at least one seed, none negative, got {self.seeds}")
        # a count not in label_counts runs nowhere, so a profile's entry survives `-p label_counts [40]`
        require(all(isinstance(n, int) and n > 0 for n in self.single_seed_counts), "single_seed_counts",
                f"must list positive label counts, got {self.single_seed_counts}")
        require(self.ceiling_steps >= 0, "ceiling_steps", f"must be 0 (= steps) or positive, got {self.ceiling_steps}")
        require(self.ceiling_labels == -1 or (0 <= self.ceiling_labels <= available and self.ceiling_labels % 10 == 0),
                "ceiling_labels", f"must be -1 (all), 0 (none) or a multiple of 10 up to {available:,} ({where}), "
                                  f"got {self.ceiling_labels}")

    def seeds_at(self, num_labels: int) -> list[int]:
        """The seeds run at ``num_labels``: the first only where ``single_seed_counts`` names it, else all."""
        return self.seeds[:1] if num_labels in self.single_seed_counts else list(self.seeds)

    def ceiling_count(self) -> int:
        """The ceiling's labels: ``ceiling_labels``, with -1 read as every training image outside the validation
        split (0: no ceiling)."""
        return TRAIN_IMAGES[self.dataset] - self.val_size if self.ceiling_labels == -1 else self.ceiling_labels

    def job_config(self, num_labels: int, seed: int, supervised_only: bool, *layers: dict) -> FixMatchConfig:
        """The configuration of one job of the study, updated by ``layers``."""
        return self.narrow(FixMatchConfig, {"num_labels": num_labels, "label_seed": seed, "seed": seed,
                                            "supervised_only": supervised_only}, *layers)

    def ceiling_layer(self) -> dict:
        """The ceiling sees as many images per step as a FixMatch step, (1 + mu) B, all of them labeled, for
        ``ceiling_steps`` steps (``steps`` when 0)."""
        return {"batch_size": (1 + self.mu) * self.batch_size, "steps": self.ceiling_steps or self.steps}


def planned_runs(cfg: FixMatchStudyConfig) -> list[tuple[str, int, int, bool]]:
    """(method, label count, seed, supervised_only) of every run, the ceiling last."""
    runs = [(method, n, seed, method == "supervised-only") for n in cfg.label_counts for seed in cfg.seeds_at(n)
            for method in ("fixmatch", "supervised-only")]
    ceiling = cfg.ceiling_count()
    if ceiling:
        runs.append(("fully supervised", ceiling, cfg.seeds[0], True))
    return runs


def run_dir_name(method: str, num_labels: int, seed: int) -> str:
    """The folder of one run under ``runs/``: ``fixmatch_n40_s0``, ``fully_supervised_n60000_s0``..."""
    return f"{method.replace(' ', '_')}_n{num_labels}_s{seed}"


def job_cost(jcfg: FixMatchConfig) -> float:
    """The estimated running time of one job (:attr:`Job.cost`): images through the network per run — B labeled
    images a step, plus 2 mu B unlabeled ones (weak and strong views) unless it is supervised-only."""
    per_step = jcfg.batch_size * (1 if jcfg.supervised_only else 1 + 2 * jcfg.mu)
    return float(jcfg.steps * per_step)


def plan_jobs(cfg: FixMatchStudyConfig, run_dir) -> list[Job]:
    """One ``fixmatch`` job per planned run, in ``runs/<method>_n<labels>_s<seed>/``."""
    jobs = []
    for method, n, seed, supervised_only in planned_runs(cfg):
        name = run_dir_name(method, n, seed)
        layers = [cfg.ceiling_layer()] if method == "fully supervised" else []
        jcfg = cfg.job_config(n, seed, supervised_only, *layers)
        jobs.append(Job("fixmatch", jcfg, Path(run_dir) / "runs" / name, name,
                        {"method": method, "num_labels": n, "seed": seed}, job_cost(jcfg)))
    return jobs


def run_study(cfg: FixMatchStudyConfig, run_dir, log=print) -> tuple[ImageDataset, list[dict]]:
    """Plan the jobs, run them (finished ones are skipped), gather their results.

    Returns
    -------
    ds : ImageDataset
        The data every job trained on.
    rows : list of dict
        One per job: method, num_labels, seed, run (its folder under ``runs/``), the final EMA model's
        test_accuracy, the authors' median_test_accuracy (median EMA test accuracy of the last ``median_last``
        evaluations) with median_evaluations (how many there were), the augmentation variants in words, and
        its history.
    """
    ds = job_dataset(cfg.dataset, resolve_device(cfg.device))
    jobs = plan_jobs(cfg, run_dir)
    return ds, [{**job.info, "run": job.out_dir.name, **{k: result[k] for k in RESULT_KEYS},
                 "history": read_json(job.out_dir / "history.json")} for job, result in zip(jobs, run_jobs(jobs, log))]


def test_confusion(run_path, cfg: FixMatchStudyConfig, ds: ImageDataset) -> list[list[int]]:
    """Test confusion matrix (counts) of a run's final EMA model (``best.pt``), on the images its accuracy was
    measured on."""
    model, _ = load_trained(Path(run_path) / "best.pt", rebuild, ds.test_images.device)
    test = eval_split(ds, cfg.eval_images)
    probs = metrics.predict_proba(model, test.inputs(), cfg.eval_batch_size)
    return metrics.confusion_matrix(test.labels.cpu().numpy(), probs.argmax(1).numpy(), ds.num_classes).tolist()


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (method, label count, augmentation) of both reported numbers (the final EMA
    model's ``test_accuracy`` and the authors' ``median_test_accuracy``: :data:`REPORTED`), with the fewest
    evaluations any seed's median was taken over; named ``model`` for the shared accuracy chart."""
    summary = metrics.summarise_seeds(rows, ("method", "num_labels", "augmentation"), tuple(REPORTED))
    for entry in summary:
        entry["median_evaluations"] = min(r["median_evaluations"] for r in rows
                                          if (r["method"], r["num_labels"], r["augmentation"])
                                          == (entry["method"], entry["num_labels"], entry["augmentation"]))
    return [{"model": s.pop("method"), **s} for s in summary]


def end_of_run(rows: list[dict], method: str, num_labels: int, key: str, share: float = 0.1) -> float | None:
    """A training diagnostic at the end of ``method``'s runs at ``num_labels`` labels: the mean of ``key`` over the
    last ``share`` of each run's logged steps (one logged batch is noisy), averaged over seeds; ``None`` when no
    run logged it."""
    ends = []
    for row in rows:
        if row["method"] == method and row["num_labels"] == num_labels:
            values = [h[key] for h in row["history"] if h.get(key) is not None]
            tail = values[-max(1, round(share * len(values))):]
            ends += [sum(tail) / len(tail)] if tail else []
    return sum(ends) / len(ends) if ends else None


def profile_params(profile: str, path: Path = PROFILES) -> dict:
    """The study's resolved parameters under ``profile`` of ``profiles.yml``: its ``fixmatch`` entry over the
    defaults, validated (what the runner passes a build of that profile), as plain values."""
    entry = (load_yaml(Path(path).read_text())[profile]["experiments"].get("fixmatch") or {})
    return FixMatchStudyConfig.from_overrides(entry, where=f"profile {profile!r}, fixmatch").to_dict()


def protocol(params: dict) -> str:
    """A profile's FixMatch protocol in words, from its resolved parameters (a :class:`FixMatchStudyConfig`'s
    ``to_dict()``): budget, backbone, seeds, evaluations, what the median is taken over, augmentation."""
    evaluations = params["steps"] // params["eval_every"] if params["eval_every"] else 1
    unlabeled = params["mu"] * params["batch_size"]
    return (f"{params['steps']:,} steps of B = {params['batch_size']} labeled + μB = {unlabeled} unlabeled images "
            f"on {params['backbone']} at {', '.join(f'{n:,}' for n in params['label_counts'])} labels, "
            f"{len(params['seeds'])} seed(s) ({', '.join(map(str, params['seeds']))}"
            f"{single_seed_words(params)}), an EMA evaluation every "
            f"{params['eval_every'] or params['steps']:,} steps ({evaluations:,} per run; the median of the last "
            f"{min(params['median_last'], evaluations)}), SGD learning rate η = {params['lr']:g}, "
            f"RandAugment {params['randaugment']}, Cutout "
            f"{params['cutout']}, {params['weak_padding']} padding; a validation split of {params['val_size']:,} "
            f"training images held out (never labeled, never unlabeled)")


def single_seed_words(params: dict) -> str:
    """``"; at 4,000 labels the first only"`` where the profile runs some label counts on one seed, else ``""``."""
    counts = [n for n in params["label_counts"] if n in params.get("single_seed_counts", [])]
    if not counts or len(params["seeds"]) < 2:
        return ""
    return f"; at {', '.join(f'{n:,}' for n in counts)} labels the first only"


def selection_statement(params: dict) -> str:
    """Where a profile's settings come from and which seeds its reported numbers are on, in words."""
    reported = ", ".join(map(str, params["seeds"]))
    tuning = ", ".join(map(str, TUNING_SEEDS))
    overlap = sorted(set(params["seeds"]) & set(TUNING_SEEDS))
    if overlap:
        return (f"Test accuracy is reported on seeds {reported}; seeds {', '.join(map(str, overlap))} were also "
                f"among those settings were chosen on (validation accuracy, seeds {tuning}): those numbers may be "
                f"biased upwards.")
    return (f"No setting was chosen on the test set: the settings of this profile that differ from the paper were "
            f"chosen on the validation split's accuracy over seeds {tuning} (`bench/tune.py`, recorded in "
            f"`bench/results/tuning.json`), and the test accuracy is reported on seeds {reported}, never used to "
            f"choose a setting.")


def semisup_results(results_dir, label_counts) -> list[dict]:
    """The semi-supervised chapter's summary rows at matching label counts, if that chapter has finished."""
    path = Path(results_dir) / "semisupervised" / "metrics.json"
    try:
        summary = read_json(path)["study"] if (path.parent / "env.json").exists() else []
    except FmnistBookError:
        return []
    return [{"model": f"{r['model']} (semi-supervised chapter)", "num_labels": r["num_labels"],
             "test_accuracy": r["test_accuracy"], "test_accuracy_std": r["test_accuracy_std"], "seeds": r["seeds"]}
            for r in summary if r["num_labels"] in label_counts]


def paired_gain(rows: list[dict], num_labels: int, method: str = "fixmatch",
                baseline: str = "supervised-only") -> tuple[float, float | None, int]:
    """``method`` minus ``baseline`` in test accuracy at ``num_labels``, over the seeds both ran (the same
    labeled subsets): (mean difference, its sample standard deviation or ``None`` for one seed, seeds)."""
    by = {(r["method"], r["seed"]): r["test_accuracy"] for r in rows if r["num_labels"] == num_labels}
    diffs = [by[(method, s)] - by[(baseline, s)] for (m, s) in by if m == method and (baseline, s) in by]
    if not diffs:
        raise FmnistBookError(f"no seed has both {method} and {baseline} at {num_labels} labels")
    std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    return float(np.mean(diffs)), std, len(diffs)


def gain_words(rows: list[dict], num_labels: int) -> str:
    """FixMatch's difference to the labeled-only baseline at ``num_labels`` in words, conditional on the
    seeds' noise (:func:`fmnist_core.core.wording.gain_phrase`)."""
    return wording.gain_phrase(*paired_gain(rows, num_labels))


def chance_note(summary: list[dict], num_classes: int, profile: str) -> str:
    """The page's paragraph on the runs (:func:`summarise` rows) that have not learned at this budget."""
    runs = [wording.RunScore(f"{r['model']} @ {r['num_labels']:,} labels", r["test_accuracy"]) for r in summary]
    return wording.chance_note(runs, num_classes, wording.remedy("fixmatch", profile))
