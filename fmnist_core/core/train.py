"""Training settings shared by every chapter: parameter groups, device and precision, optimiser, schedule.

An experiment's configuration is composed from the small groups defined here (:class:`OptimizerConfig`,
:class:`ScheduleConfig`, :class:`RuntimeConfig`, :class:`EpochBudget`) plus its own parameters, so it lists
exactly the parameters its run reads. The loop that trains with them is :mod:`fmnist_core.core.loop`.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import TRAIN_IMAGES, Split, batch_indices


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = ("auto", "float32", "bfloat16")


# ------------------------------------------------------------------------------------ parameter groups
@dataclass
class OptimizerConfig(Config):
    """The optimiser: Adam with decoupled weight decay (AdamW), or SGD with momentum."""

    optimizer: str = param("adam", "adam (AdamW: decoupled weight decay) | sgd (momentum, optionally Nesterov)")
    lr: float = param(1e-3, "peak learning rate")
    momentum: float = param(0.9, "SGD momentum (read only by SGD)")
    nesterov: bool = param(True, "Nesterov momentum for SGD")
    weight_decay: float = param(5e-4, "weight decay on weights, not on biases and norm parameters: decoupled "
                                      "for Adam (AdamW), L2 for SGD")
    fused: bool = param(True, "fused AdamW/SGD kernels when the model is on CUDA (the whole update in a few "
                              "kernels); the CPU always uses the standard implementation")

    def check(self) -> None:
        super().check()
        require_choice(self.optimizer, "optimizer", ("adam", "sgd"))
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", "must be non-negative")


@dataclass
class ScheduleConfig(Config):
    """The learning-rate schedule over the run's optimiser steps."""

    schedule: str = param("cosine", "cosine | step (x0.1 after half the steps, as in the CNN-comparison report) "
                                    "| constant")

    def check(self) -> None:
        super().check()
        require_choice(self.schedule, "schedule", ("cosine", "step", "constant"))


@dataclass
class RuntimeConfig(Config):
    """Where and how a run computes: device, precision, compilation, determinism, evaluation batches."""

    device: str = param("auto", "auto | cpu | cuda")
    dtype: str = param("auto", "auto (bf16 autocast where the device has bf16 matrix units and it is measured faster "
                               "for the network, else float32: resolve_dtype) | float32 | bfloat16 (autocast)")
    compile: bool = param(False, "torch.compile the model (CUDA only)")
    compile_mode: str = param("default", "torch.compile mode when compile is on: default | reduce-overhead (CUDA "
                                         "graphs) | max-autotune | max-autotune-no-cudagraphs")
    channels_last: bool = param(True, "channels-last memory format on CUDA, and on a CPU in bf16")
    deterministic: bool = param(False, "CUDA: deterministic algorithms, fixed cuBLAS workspace, no cuDNN "
                                       "benchmark (slower, bit-reproducible); off = speed (CPU runs are exact)")
    eval_batch_size: int = param(256, "images per evaluation batch")

    def check(self) -> None:
        super().check()
        require_choice(self.device, "device", ("auto", "cpu", "cuda"))
        require_choice(self.dtype, "dtype", DTYPES)
        require_choice(self.compile_mode, "compile_mode", COMPILE_MODES)
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        if self.device == "cuda":
            require(torch.cuda.is_available(), "device", "is 'cuda' but no CUDA device is available")


@dataclass
class EpochBudget(Config):
    """A budget counted in passes over the training images."""

    epochs: int = param(10, "passes over the training images")
    batch_size: int = param(128, "images per step")

    def check(self) -> None:
        super().check()
        require(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass
class TrainConfig(EpochBudget, OptimizerConfig, ScheduleConfig, RuntimeConfig):
    """One classifier's training job: budget, optimiser, schedule, runtime, and what a classifier adds."""

    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy")
    augment: bool = param(True, "random 2-pixel translation and horizontal flip, batched on the device")
    train_images: int = param(0, "use only this many training images (class-balanced); 0 = all")
    seed: int = param(0, "seed of initialisation, batch order, augmentation and dropout")

    def check(self) -> None:
        super().check()
        require(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        require(self.train_images >= 0, "train_images", "must be 0 (all) or positive")
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")


# ------------------------------------------------------------------------------------ device & precision
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def numerics_mode(device, deterministic: bool) -> str:
    """How exactly a run on ``device`` repeats: "cpu", or on CUDA "deterministic" or "speed"."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return "deterministic" if deterministic else "speed"


def configure_numerics(device: torch.device, deterministic: bool) -> str:
    """Set PyTorch's determinism switches for ``device``; returns the mode a results record states.

    On CUDA, ``deterministic`` turns on deterministic algorithms (an op without a deterministic kernel then
    raises instead of varying silently), cuBLAS's fixed ``:4096:8`` workspace and cuDNN's deterministic,
    non-benchmarked convolutions; otherwise cuDNN benchmarks and picks the fastest kernels ("speed").
    The cuBLAS setting only takes effect if made before the process's first CUDA matrix product, which is
    why the training loops call this before building their optimiser. On the CPU, a run is bit-reproducible
    for a fixed thread count either way ("cpu").
    """
    mode = numerics_mode(device, deterministic)
    if mode == "cpu":
        return mode
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return mode


# The networks whose training step runs faster in bf16 autocast with channels-last weights than in float32 on a
# CPU with bf16 matrix support (AVX512-BF16 or AMX), measured by bench/precision.py (bench/results/precision_cpu.json:
# images/s of one training step at batch 128 on 2 threads). `dtype: auto` takes bf16 for these only; the MLP, whose
# step is three small matrix products and element-wise work, was slower in bf16 (the conversions to and from bf16
# cost more than the products save) and stays in float32.
CPU_BF16_FASTER = frozenset({"lenet_avg", "lenet_max", "mycnn", "smallcnn", "alexnet", "vgg16", "resnet18",
                             "resnet34", "wrn28_2", "vae", "semisup_vae", "m2", "encoder_only"})


def cpu_bf16_support() -> str | None:
    """The CPU's bf16 matrix units as PyTorch reports them: ``"amx"``, ``"avx512_bf16"`` or ``None``."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def resolve_dtype(dtype: str, device, network: str | None = None) -> str:
    """The precision a run computes in: ``"float32"`` or ``"bfloat16"`` (autocast).

    ``auto`` is bf16 on a CUDA device that supports it; on a CPU, bf16 where the CPU has bf16 matrix units
    (:func:`cpu_bf16_support`) and ``network`` is one measured faster in it (:data:`CPU_BF16_FASTER`); float32
    elsewhere. An explicit ``float32`` or ``bfloat16`` is taken as it is.
    """
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if (cpu_bf16_support() and network in CPU_BF16_FASTER) else "float32"


NETWORKS_WITHOUT_REGISTRY = ("vae", "semisup_vae", "m2", "encoder_only")  # networks named by a chapter, not models.py


def run_networks(experiment: str, params: dict) -> list[str]:
    """The networks a run with ``params`` trains (what ``dtype: auto`` decides for): the names of classifiers and
    of the generative models found among its parameter values, and ``vae`` for the VAE chapter."""
    from fmnist_core.core.models import list_models
    known = set(list_models()) | set(NETWORKS_WITHOUT_REGISTRY)
    found = ["vae"] if experiment == "vae" else []
    for name, value in params.items():
        if name in ("budget_limited", "sgd_model"):  # subsets of `models`, named again
            continue
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, str) and item in known and item not in found:
                found.append(item)
    if experiment == "semisupervised" and "cnn" in (params.get("models") or []):
        found.append("mycnn")  # the chapter's CNN baseline
    return found


def precision_record(experiment: str, params: dict, device) -> dict:
    """What ``env.json`` and the reproducibility appendix say of a run's precision: the ``dtype`` asked for, the
    CPU's bf16 support, and the precision each of its networks trained in (:func:`resolve_dtype`)."""
    dtype = params.get("dtype", "float32")
    return {"dtype": dtype, "cpu_bf16": cpu_bf16_support() if torch.device(device).type == "cpu" else None,
            "networks": {n: resolve_dtype(dtype, device, n) for n in run_networks(experiment, params)}}


def describe_precision(record: dict | None) -> str:
    """A :func:`precision_record` in words, e.g. ``dtype auto: bf16 autocast for mycnn; float32 for lenet_avg``."""
    if not record:
        return "not recorded"
    groups: dict[str, list[str]] = {}
    for network, dtype in record["networks"].items():
        groups.setdefault(dtype, []).append(network)
    parts = [f"{'bf16 autocast' if d == 'bfloat16' else 'float32'} for {', '.join(n)}" for d, n in groups.items()]
    unit = f" (CPU bf16 units: {record['cpu_bf16'] or 'none'})" if "cpu_bf16" in record else ""
    return f"dtype {record['dtype']}: {'; '.join(parts) or 'no network trained'}{unit}"


def precision_label(dtype: str) -> str:
    """How a page names a resolved precision: ``bf16 autocast`` or ``float32``."""
    return "bf16 autocast (weights, losses and metrics in float32)" if dtype == "bfloat16" else "float32"


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast (CUDA or CPU) for a resolved ``dtype`` of ``"bfloat16"``; full precision otherwise.

    As in USB's and the FixMatch authors' mixed-precision options, only the forward pass's matrix products and
    convolutions run in bf16; weights, optimiser state, losses and metrics stay in float32 (callers compute
    their losses from ``.float()`` outputs)."""
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, cfg: RuntimeConfig, device: torch.device, dtype: str = "float32"):
    """Move to the device; channels-last on CUDA and on a CPU in bf16 (``dtype``, resolved); ``torch.compile``
    on CUDA; the determinism switches of ``cfg.deterministic`` (:func:`configure_numerics`). Returns (raw,
    runnable) models."""
    # Read on every device: all three are options (they act on CUDA only).
    channels_last, compile_model, mode = cfg.channels_last, cfg.compile, cfg.compile_mode
    configure_numerics(device, cfg.deterministic)
    model = model.to(device)
    if channels_last and (device.type == "cuda" or dtype == "bfloat16"):
        model = model.to(memory_format=torch.channels_last)
    runnable = torch.compile(model, mode=mode) if (compile_model and device.type == "cuda") else model
    return model, runnable


# ----------------------------------------------------------------------------- optimiser and schedule
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only: decaying biases and norm scales only hurts."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum (Nesterov optional); weight decay on weights only.

    Adam with L2 added to the gradient would make the decay depend on the loss scale (a VAE's loss is
    ~250 nats per image, a classifier's ~0.5), so Adam is always AdamW (Loshchilov & Hutter, 2019): the
    decay ``lr * weight_decay * w`` is applied to the weights directly. SGD keeps the L2 of the papers it
    reproduces (for SGD the two differ only by the learning-rate factor). With ``cfg.fused`` and the model on
    CUDA, the fused implementation of either runs the update in a few kernels.
    """
    groups = parameter_groups(model, cfg.weight_decay)
    momentum, nesterov, fused = cfg.momentum, cfg.nesterov, cfg.fused  # read either way: options of this group
    on_cuda = next(model.parameters()).device.type == "cuda"
    extra = {"fused": True} if (fused and on_cuda) else {}  # the CPU keeps PyTorch's default implementation
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=nesterov, **extra)
    return torch.optim.AdamW(groups, lr=cfg.lr, **extra)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate after ``step`` of ``total_steps`` optimiser steps.

    ``fixmatch`` is FixMatch's ``cos(7 pi k / 16 K)``: from 1 down to cos(7 pi / 16) ≈ 0.195, not to 0.
    """
    if schedule == "fixmatch":
        return math.cos(7.0 * math.pi * min(step, total_steps) / (16.0 * total_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        return 1.0 if step < total_steps // 2 else 0.1
    return 1.0


def optimizer_steps(cfg) -> int:
    """The optimiser steps of a job's config: ``steps``, or ``epochs`` x the steps of one pass over its training
    images (``train_images``, or the dataset's training set less ``val_size``; ``batch_size x unlabeled_ratio``
    images a step)."""
    if hasattr(cfg, "steps"):
        return cfg.steps
    images = getattr(cfg, "train_images", 0) or TRAIN_IMAGES.get(getattr(cfg, "dataset", "fashion_mnist"), 60000)
    images -= getattr(cfg, "val_size", 0) if not getattr(cfg, "train_images", 0) else 0
    per_step = cfg.batch_size * getattr(cfg, "unlabeled_ratio", 1)
    return cfg.epochs * math.ceil(images / per_step)


def make_schedule(optimizer, schedule: str, total_steps: int):
    """A per-step ``LambdaLR`` following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, total_steps))


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(model, split: Split, batch_size: int = 1000, dtype: str = "float32") -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (eval mode, no gradients).

    Sums stay on the device (float64) and are read back once, at the end.
    """
    was_training = model.training
    model.eval()
    device = split.images.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for index in batch_indices(len(split.labels), batch_size, device=device):
        with autocast_context(device, dtype):
            logits = model(split.inputs(index)).float()
        total_loss += F.cross_entropy(logits, split.labels[index], reduction="sum").double()
        correct += (logits.argmax(1) == split.labels[index]).sum()
    model.train(was_training)
    n = len(split.labels)
    loss, right = torch.stack([total_loss, correct.double()]).tolist()
    return {"loss": loss / n, "accuracy": right / n}
