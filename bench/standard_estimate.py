"""Estimate: wall-clock time of the ``standard`` profile's whole book on one H100, without a GPU.

Run from the project root::

    .venv/bin/python bench/standard_estimate.py            # writes bench/results/standard_estimate.json

Nothing here runs on a GPU. The estimate combines what can be counted exactly on a CPU with stated assumptions
about the H100:

* **Counted.** Every training job the ``standard`` profile plans (each chapter's own ``plan_jobs`` on the
  resolved profile parameters) with its optimiser steps and evaluation images; for every kind of step (each
  classifier, the VAE, each semi-supervised model, a FixMatch step with its augmentation, its supervised-only
  baseline and its ceiling) the floating-point operations of one training step (forward and backward, counted
  by ``torch.utils.flop_counter.FlopCounterMode`` on a small batch and scaled to the job's batch: they are
  linear in it) and the number of ATen operators it dispatches (a proxy for the CUDA kernels it launches, which
  does not depend on the batch size); the forward FLOPs per image of every backbone (for evaluation).
* **Assumed** (:data:`ASSUMPTIONS`): the H100's dense peak throughput for the job's precision, the fraction of
  it small convolutional networks on 28×28 images reach, the host time per dispatched operator (eager
  PyTorch launches every kernel from Python), the operators the fused optimiser adds per step, and the time of
  the CPU-side t-SNE embeddings and per-chapter start-up.

A step takes ``max(compute, host)``: with no host synchronisation inside a step (tests/test_host_sync.py) the
CPU queues kernels while the GPU runs earlier ones, so the slower of the two sets the pace. Evaluations are
forward passes at the same efficiency. The result is an estimate to size budgets with, not a measurement:
``bench/fixmatch_bench.py`` measures the FixMatch step rate on a GPU when one is available.
"""
from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package

from fmnist_core.chapters import classification, vae  # noqa: E402
from fmnist_core.chapters.fixmatch import study as fixmatch_study  # noqa: E402
from fmnist_core.chapters.fixmatch.algorithm import FixMatch, FixMatchBatches  # noqa: E402
from fmnist_core.chapters.semisupervised import model as semisup  # noqa: E402
from fmnist_core.chapters.semisupervised import study as semisup_study  # noqa: E402
from fmnist_core.core.data import TEST_IMAGES, TRAIN_IMAGES, ImageDataset, Split, normalize, weak_augment  # noqa: E402
from fmnist_core.core.io import write_json  # noqa: E402
from fmnist_core.core.models import build_model, model_meta  # noqa: E402
from fmnist_core.pipeline.runner import resolve_params  # noqa: E402
from fmnist_core.pipeline.experiments import get_experiment  # noqa: E402

PROFILE = "standard"
BUDGET_MINUTES = 60.0
SMALL_BATCH = 4  # labeled images per counted step; FLOPs are scaled from it, operator counts are not
ASSUMPTIONS = {
    "device": "one NVIDIA H100 SXM5 80 GB",
    "peak_tflops": {
        "bfloat16": 989.4,  # dense BF16 tensor-core peak, NVIDIA H100 datasheet (SXM5)
        "float32": 66.9,    # FP32 CUDA-core peak (PyTorch's default float32 matmuls do not use TF32)
    },
    "efficiency": 0.15,  # fraction of peak reached by small CNNs on 28x28 images (ResNet-18 on CIFAR-10 trains at
                         # ~13 % of an A100's BF16 peak in published fast-training code; no GPU measured here)
    "host_us_per_operator": 8.0,  # eager PyTorch: Python + dispatcher + launch per ATen operator on a server CPU
    "optimizer_operators_per_step": 6,  # fused AdamW/SGD: a few multi-tensor kernels, plus the schedule's update
    "tsne_seconds_per_5000_points": 13.0,  # bench/results/tsne.json: 5,000 points, 750 iterations, 2 threads
    "startup_seconds_per_chapter": 20.0,  # kernel start, data loading and verification, plots, notebook output
}


# ------------------------------------------------------------------------------------------- counting
class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (views included: a slight over-count of kernels)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count(step, dtype: str = "float32") -> tuple[int, int]:
    """(FLOPs, operators) of ``step()``: one training step's forward and backward, or one forward pass. A
    ``bfloat16`` job runs under the CPU's bf16 autocast, which inserts the casts CUDA's autocast would."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with FlopCounterMode(display=False) as flops, OperatorCount() as ops, autocast:
        step()
    return flops.get_total_flops(), ops.count


def toy_split(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return Split(images, torch.arange(n) % 10, (0.286,), (0.353,))


def classifier_step(model: torch.nn.Module, batch: int, augment: bool):
    split = toy_split(batch)
    generator = torch.Generator().manual_seed(0)

    def step():
        images = weak_augment(split.images, generator) if augment else split.images
        F.cross_entropy(model(normalize(images, split.mean, split.std)), split.labels).backward()
    return step


def forward_flops_per_image(model: torch.nn.Module, run=None) -> float:
    x = torch.rand(SMALL_BATCH, 1, 28, 28)
    with torch.no_grad():
        flops, _ = count(lambda: (run or model)(x))
    return flops / SMALL_BATCH


# ------------------------------------------------------------------------------- one step of each kind
def classifier_costs(name: str, batch: int, augment: bool, dtype: str = "float32") -> dict:
    model = build_model(name, 1, 10, 28)
    flops, ops = count(classifier_step(model, SMALL_BATCH, augment), dtype)
    return {"train_flops_per_step": flops * batch / SMALL_BATCH, "operators_per_step": ops,
            "forward_flops_per_image": forward_flops_per_image(model)}


def vae_costs(cfg) -> dict:
    meta = {"in_channels": 1, "image_size": 28, "latent_dim": cfg.latent_dim, "channels": cfg.channels,
            "architecture": cfg.architecture}
    model = vae.rebuild_vae(meta)
    x = torch.rand(SMALL_BATCH, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)

    def step():
        x_hat, mu, logvar = model(x, generator=generator)
        vae.vae_loss(x_hat, x, mu, logvar, 1.0, cfg.recon_loss)["loss"].backward()
    flops, ops = count(step, cfg.dtype)
    return {"train_flops_per_step": flops * cfg.batch_size / SMALL_BATCH, "operators_per_step": ops,
            "forward_flops_per_image": forward_flops_per_image(model, lambda x: model(x, generator=generator))}


def semisup_costs(cfg) -> dict:
    if cfg.model == "cnn":
        return classifier_costs(semisup.CNN_ARCHITECTURE, cfg.batch_size, cfg.augment, cfg.dtype)
    ds = ImageDataset("fashion_mnist", *(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), torch.zeros(1).long()) * 2,
                      (0.286,), (0.353,), tuple(str(c) for c in range(10)))
    model = semisup.rebuild_semisup(semisup.semisup_meta(cfg, ds))
    step_fn = semisup.make_step(cfg)
    xl, yl = torch.rand(SMALL_BATCH, 1, 28, 28), torch.arange(SMALL_BATCH) % 10
    xu = torch.rand(SMALL_BATCH * cfg.unlabeled_ratio, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    flops, ops = count(lambda: step_fn(model, xl, yl, xu, generator)["loss"].backward(), cfg.dtype)
    classify = semisup.ClassifierView(model)
    return {"train_flops_per_step": flops * cfg.batch_size / SMALL_BATCH, "operators_per_step": ops,
            "forward_flops_per_image": forward_flops_per_image(classify)}


def fixmatch_costs(cfg) -> dict:
    """One FixMatch step at B = SMALL_BATCH (FLOPs scaled to the job's B): batch drawing and augmentation
    (weak views, RandAugment and Cutout), one forward and backward pass, the EMA update."""
    split = toy_split(max(SMALL_BATCH * (1 + cfg.mu), 200))
    model = build_model(cfg.backbone, 1, 10, 28)
    batches = FixMatchBatches(split, split, SMALL_BATCH, cfg.mu, 0, cfg.supervised_only, cfg.randaugment, cfg.cutout,
                              cfg.weak_padding)
    algo = FixMatch(model, model, batches, None, cfg)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss, _ = algo.train_step(0, generator)
        loss.backward()
        algo.after_step(0)
    flops, ops = count(step, cfg.dtype)
    return {"train_flops_per_step": flops * cfg.batch_size / SMALL_BATCH, "operators_per_step": ops,
            "forward_flops_per_image": forward_flops_per_image(model)}


# ---------------------------------------------------------------------------------------- the book
def job_seconds(costs: dict, steps: int, eval_images: int, dtype: str, assumptions: dict | None = None) -> dict:
    """Wall-clock of one job: ``steps`` training steps at ``max(compute, host)`` plus its evaluations."""
    a = assumptions or ASSUMPTIONS
    rate = a["peak_tflops"][dtype] * 1e12 * a["efficiency"]
    compute = costs["train_flops_per_step"] / rate
    host = (costs["operators_per_step"] + a["optimizer_operators_per_step"]) * a["host_us_per_operator"] * 1e-6
    evaluation = eval_images * costs["forward_flops_per_image"] / rate
    return {"steps": steps, "eval_images": eval_images, "dtype": dtype, "step_ms": 1e3 * max(compute, host),
            "bound": "compute" if compute >= host else "host", "seconds": steps * max(compute, host) + evaluation}


def sensitivity(chapters: dict, fixed_minutes: float) -> list[dict]:
    """The total under other values of the two assumptions that matter most (same jobs, same counts)."""
    rows = []
    for efficiency in (0.08, 0.15, 0.25):
        for host_us in (5.0, 8.0, 12.0):
            a = {**ASSUMPTIONS, "efficiency": efficiency, "host_us_per_operator": host_us}
            seconds = sum(job_seconds(j, j["steps"], j["eval_images"], j["dtype"], a)["seconds"]
                          for jobs in chapters.values() for j in jobs)
            rows.append({"efficiency": efficiency, "host_us_per_operator": host_us,
                         "total_minutes": round(seconds / 60 + fixed_minutes, 1)})
    return rows


def epoch_steps(c) -> int:
    """Optimiser steps of an epoch-budget job: its epochs over its training images (all but validation by default)."""
    train = c.train_images or TRAIN_IMAGES[c.dataset] - c.val_size
    return c.epochs * math.ceil(train / c.batch_size)


def classification_jobs(params: dict) -> list[dict]:
    cfg = classification.ClassificationConfig.from_overrides(params)
    jobs = []
    for job in classification.plan_jobs(cfg, "run"):
        c = job.config
        steps = epoch_steps(c)
        test = c.test_images or TEST_IMAGES[c.dataset]
        costs = classifier_costs(c.model, c.batch_size, c.augment, c.dtype)
        jobs.append({"job": job.label, **costs, **job_seconds(costs, steps, c.epochs * c.val_size + test, c.dtype)})
    return jobs


def vae_jobs(params: dict) -> list[dict]:
    cfg = vae.VAEConfig.from_overrides(params)
    jobs = []
    for job in vae.plan_jobs(cfg, "run"):
        c = job.config
        steps = epoch_steps(c)
        costs = vae_costs(c)
        jobs.append({"job": job.label, **costs, **job_seconds(costs, steps, c.epochs * c.val_size, c.dtype)})
    return jobs


def semisup_jobs(params: dict) -> list[dict]:
    cfg = semisup_study.SemiSupStudyConfig.from_overrides(params)
    jobs, cache = [], {}
    for job in semisup_study.plan_jobs(cfg, "run"):
        c = job.config
        pool = c.train_images or TRAIN_IMAGES["fashion_mnist"] - c.val_size
        steps = c.epochs * semisup.steps_per_epoch(c, pool)
        key = (c.model, c.batch_size, c.unlabeled_ratio)
        costs = cache.setdefault(key, semisup_costs(c))
        test = c.test_images or TEST_IMAGES["fashion_mnist"]
        jobs.append({"job": job.label, **costs,
                     **job_seconds(costs, steps, c.epochs * c.val_size + test * (1 + c.tta), c.dtype)})
    return jobs


def fixmatch_jobs(params: dict) -> list[dict]:
    cfg = fixmatch_study.FixMatchStudyConfig.from_overrides(params)
    jobs, cache = [], {}
    for job in fixmatch_study.plan_jobs(cfg, "run"):
        c = job.config
        evaluations = c.steps // c.eval_every if c.eval_every else 1
        key = (c.supervised_only, c.batch_size)
        costs = cache.setdefault(key, fixmatch_costs(c))
        test = c.eval_images or TEST_IMAGES[c.dataset]
        jobs.append({"job": job.label, **costs, **job_seconds(costs, c.steps, evaluations * test, c.dtype)})
    return jobs


def tsne_embeddings(params: dict) -> dict:
    """Points of every t-SNE embedding a chapter computes (on the CPU)."""
    layer_count = 0
    for name in params["layerwise"]["models"]:
        layers = params["layerwise"]["layers"].get(name) or ["input", *build_model(name, 1, 10, 28).feature_layers]
        layer_count += len(layers) * (2 if params["layerwise"]["untrained"] else 1)
    return {"dataset": [params["dataset"]["embed_images"]],
            "layerwise": [10 * params["layerwise"]["per_class"]] * layer_count,
            "vae": [params["vae"]["embed_images"]],
            "semisupervised": [params["semisupervised"]["embed_images"]]}


def estimate() -> dict:
    params = {name: resolve_params(name, PROFILE) for name in
              ("dataset", "classification", "layerwise", "vae", "semisupervised", "fixmatch")}
    assert all(get_experiment(name) for name in params)
    chapters = {"classification": classification_jobs(params["classification"]), "vae": vae_jobs(params["vae"]),
                "semisupervised": semisup_jobs(params["semisupervised"]),
                "fixmatch": fixmatch_jobs(params["fixmatch"])}
    tsne = tsne_embeddings(params)
    per_point = ASSUMPTIONS["tsne_seconds_per_5000_points"] / 5000
    minutes = {}
    for name in params:
        training = sum(j["seconds"] for j in chapters.get(name, []))
        embedding = per_point * sum(tsne.get(name, []))
        minutes[name] = {"training_and_evaluation": round(training / 60, 2), "tsne": round(embedding / 60, 2),
                         "startup": round(ASSUMPTIONS["startup_seconds_per_chapter"] / 60, 2)}
        minutes[name]["total"] = round(sum(minutes[name].values()), 2)
    total = round(sum(m["total"] for m in minutes.values()), 1)
    fixed = sum(m["tsne"] + m["startup"] for m in minutes.values())
    backbones = {name: classifier_costs(name, 1, False)["forward_flops_per_image"]
                 for name in ("mlp", "lenet_avg", "lenet_max", "mycnn", "alexnet", "vgg16", "resnet18", "resnet34",
                              "smallcnn", "wrn28_2")}
    return {"estimate": f"wall-clock of the '{PROFILE}' profile's whole book on {ASSUMPTIONS['device']}",
            "method": "training steps at max(compute, host) from counted FLOPs and dispatched operators per step, "
                      "evaluations at the same efficiency, t-SNE and start-up as assumed (bench/standard_estimate.py)",
            "measured_on_gpu": False, "assumptions": ASSUMPTIONS, "budget_minutes": BUDGET_MINUTES,
            "total_minutes": total, "fits_budget": total <= BUDGET_MINUTES, "minutes_per_chapter": minutes,
            "sensitivity": sensitivity(chapters, fixed),
            "forward_gflops_per_image_28x28": {k: round(v / 1e9, 5) for k, v in backbones.items()},
            "jobs": {name: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in j.items()} for j in jobs]
                     for name, jobs in chapters.items()},
            "tsne_points": tsne, "parameters": params,
            "versions": {"python": platform.python_version(), "torch": torch.__version__}}


def main() -> None:
    torch.set_num_threads(1)
    result = estimate()
    out = ROOT / "bench" / "results" / "standard_estimate.json"
    write_json(out, result)
    for name, m in result["minutes_per_chapter"].items():
        print(f"{name:16s} {m['total']:7.2f} min  ({m})")
    print(f"total {result['total_minutes']} min (budget {BUDGET_MINUTES:.0f}); written to {out}")


if __name__ == "__main__":
    main()
