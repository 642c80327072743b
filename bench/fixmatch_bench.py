"""Benchmark: steps per second of one FixMatch training step, device-resident pipeline against a DataLoader.

Run from the project root::

    .venv/bin/python bench/fixmatch_bench.py                      # smallcnn on the CPU, B=64, mu=7
    .venv/bin/python bench/fixmatch_bench.py --device cuda --backbone wrn28_2 --dtype bfloat16 \\
        --out bench/results/fixmatch_cuda.json

The CUDA speed options can be measured one at a time: ``--compile [--compile-mode reduce-overhead]``,
``--no-channels-last``, ``--no-fused`` (bf16 autocast is ``--dtype bfloat16``); ``--randaugment`` and ``--cutout``
select the augmentation variants.

Both pipelines train the same seeded model with the same step (the training loop's update around
``fmnist_core.chapters.fixmatch.algorithm.FixMatch.batch_loss``: one forward pass over B labeled, mu*B weak and
mu*B strong images, the FixMatch loss, SGD with Nesterov and the FixMatch schedule, then the EMA update in
``FixMatch.after_step``); only the way the batch is made differs:

(a) ``device``: this project's pipeline, :class:`fmnist_core.chapters.fixmatch.algorithm.FixMatchBatches` — the whole training
    set as one ``uint8`` tensor on the device, batches cut from it and augmented there, batched (pad-and-crop,
    flip, :func:`fmnist_core.core.randaugment.rand_augment` with Cutout);
(b) ``dataloader``: the pipeline of the public PyTorch implementations (e.g. kekmodel/FixMatch-pytorch) — a
    ``Dataset`` returning PIL images, per-image torchvision transforms (RandomHorizontalFlip,
    RandomCrop(padding 12.5 %, reflect), for the strong view ``RandAugment(num_ops=2, magnitude=10)`` and a
    Cutout square, ToTensor, Normalize), two ``DataLoader``\\ s (labeled: B, unlabeled: mu*B) with
    ``--workers`` worker processes each, random sampling with replacement, pinned memory on CUDA.

The ``--steps`` timed steps of each pipeline are split into ``--rounds`` rounds, run alternately (a b, b a,
a b, ...) so that a change in the machine's load during the run weighs on both alike; every round starts
with ``--warmup`` untimed steps (worker start-up, allocator, cuDNN autotuning; for (b) they also drain most of
the batches its workers prefetched, two per worker, while (a) ran), and CUDA is synchronised on both sides of
the timed steps. The data are Fashion-MNIST (or CIFAR-10 with ``--dataset cifar10``), 40 labels. This is a
benchmark, not a test: the numbers depend on the machine and its load (the load average is recorded per
round, and on a shared machine it is the main source of spread).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package

from fmnist_core.core.data import load_dataset  # noqa: E402
from fmnist_core.chapters.fixmatch.algorithm import (SCHEDULE, Batch, FixMatch, FixMatchBatches,  # noqa: E402
                                                     FixMatchConfig, labeled_indices, weak_pad)
from fmnist_core.core.io import write_json  # noqa: E402
from fmnist_core.core.metrics import cpu_description  # noqa: E402
from fmnist_core.core.models import build_model  # noqa: E402
from fmnist_core.core.data import Split  # noqa: E402
from fmnist_core.core.train import make_optimizer, make_schedule, prepare_model, resolve_device  # noqa: E402

SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smallcnn", choices=("smallcnn", "wrn28_2"))
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "cifar10"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=64, help="B, labeled images per step")
    parser.add_argument("--mu", type=int, default=7, help="unlabeled images per labeled image")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pipeline, over all rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed rounds per pipeline, alternated a b b a ... so that load drift hits both")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each DataLoader")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--num-labels", type=int, default=40)
    # The CUDA speed options, one by one (each is the training parameter of the same name; CPU runs ignore them).
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    parser.add_argument("--no-fused", action="store_true", help="the foreach optimiser instead of the fused one")
    parser.add_argument("--randaugment", default="authors", help="RandAugment variant: authors | always")
    parser.add_argument("--cutout", default="fixed", help="Cutout variant: fixed | random")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fixmatch_cpu.json"))
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """A fresh seeded :class:`FixMatch` (model and EMA) with its optimiser and schedule; ``step(batch)`` is one
    FixMatch step as ``fmnist_core.core.loop.train`` runs it, on a batch made by the pipeline under test."""

    def __init__(self, cfg: FixMatchConfig, shape: tuple, device: torch.device):
        torch.manual_seed(SEED)
        raw, runnable = prepare_model(build_model(cfg.backbone, shape[0], 10, shape[1]), cfg, device)
        self.algo = FixMatch(raw, runnable, None, None, cfg)  # batches come from the pipeline
        self.optimizer = make_optimizer(raw, cfg)
        self.scheduler = make_schedule(self.optimizer, SCHEDULE, cfg.steps)
        self.steps = 0

    def step(self, batch: Batch) -> None:
        loss, _ = self.algo.batch_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.algo.after_step(self.steps)
        self.steps += 1


class Pipeline:
    """One way of making batches, feeding its own :class:`Trainer`; timed in rounds."""

    def __init__(self, make_batch, trainer: Trainer, device: torch.device):
        self.make_batch, self.trainer, self.device = make_batch, trainer, device
        self.step, self.rounds = 0, []

    def run(self, steps: int) -> float:
        """``steps`` steps; returns the seconds spent inside ``make_batch``: the augmentation for (a) on the
        CPU (on CUDA only its launch: the kernels run asynchronously), the wait for the workers for (b)."""
        batch_seconds = 0.0
        for _ in range(steps):
            tic = time.perf_counter()
            batch = self.make_batch(self.step)
            batch_seconds += time.perf_counter() - tic
            self.trainer.step(batch)
            self.step += 1
        return batch_seconds

    def timed_round(self, warmup: int, steps: int) -> None:
        """``warmup`` untimed steps (start-up; for (b) they also drain batches prefetched meanwhile), then
        ``steps`` timed ones, CUDA synchronised on both sides."""
        self.run(warmup)
        synchronize(self.device)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        batch_seconds = self.run(steps)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.rounds.append({"steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 4),
                            "batch_seconds": round(batch_seconds, 3),
                            "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]})

    def summary(self) -> dict:
        steps, seconds = sum(r["steps"] for r in self.rounds), sum(r["seconds"] for r in self.rounds)
        return {"steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 4),
                "batch_seconds": round(sum(r["batch_seconds"] for r in self.rounds), 3), "rounds": self.rounds}


# ----------------------------------------------------------------------------------- (a) on the device
def device_pipeline(cfg, ds, labeled_idx, device) -> Pipeline:
    index = torch.as_tensor(labeled_idx, device=device)
    labeled = Split(ds.train_images[index], ds.train_labels[index], ds.mean, ds.std)
    unlabeled = Split(ds.train_images, ds.train_labels, ds.mean, ds.std)
    batches = FixMatchBatches(labeled, unlabeled, cfg.batch_size, cfg.mu, SEED, False, cfg.randaugment, cfg.cutout,
                              cfg.weak_padding)
    generator = torch.Generator(device=device).manual_seed(SEED)
    trainer = Trainer(cfg, ds.image_shape, device)
    return Pipeline(lambda i: batches.draw(i, generator), trainer, device)


# -------------------------------------------------------------------------------- (b) the DataLoader way
class PILImages(torch.utils.data.Dataset):
    """Images kept as a numpy array, returned as PIL images through ``transform``, with their labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Cutout:
    """FixMatch's Cutout on a PIL image: a grey square of side 1..half the image, at a random centre."""

    def __call__(self, image):
        from PIL import ImageDraw
        w, h = image.size
        side = int(torch.randint(1, min(w, h) // 2 + 1, ()))
        cx, cy = int(torch.randint(0, w, ())), int(torch.randint(0, h, ()))
        x0, y0 = max(0, cx - side // 2), max(0, cy - side // 2)
        image = image.copy()
        fill = 127 if image.mode == "L" else (127,) * len(image.getbands())
        ImageDraw.Draw(image).rectangle([x0, y0, min(w, x0 + side) - 1, min(h, y0 + side) - 1], fill=fill)
        return image


class TwoViews:
    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, image):
        return self.weak(image), self.strong(image)


def conventional_transforms(size: int, mean, std):
    import torchvision.transforms as T
    geometric = [T.RandomHorizontalFlip(), T.RandomCrop(size, padding=weak_pad(size), padding_mode="reflect")]
    finish = [T.ToTensor(), T.Normalize(mean, std)]
    weak = T.Compose(geometric + finish)
    strong = T.Compose(geometric + [T.RandAugment(num_ops=2, magnitude=10), Cutout()] + finish)
    return weak, TwoViews(weak, strong)


def loader(dataset, batch_size: int, total: int, args, device) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(SEED)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=total * batch_size,
                                             generator=generator)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=args.workers, pin_memory=device.type == "cuda",
                                       persistent_workers=args.workers > 0)


def dataloader_pipeline(cfg, ds, labeled_idx, device, args) -> Pipeline:
    def as_numpy(images):  # N×C×H×W uint8 -> N×H×W (grey) or N×H×W×C, as PIL wants
        array = images.cpu().numpy().transpose(0, 2, 3, 1)
        return array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array)

    images, labels = as_numpy(ds.train_images), ds.train_labels.cpu().numpy()
    weak, two_views = conventional_transforms(ds.image_shape[1], ds.mean, ds.std)
    total = args.rounds * args.warmup + args.steps + 1  # batches drawn, plus one to spare
    labeled = loader(PILImages(images[labeled_idx], labels[labeled_idx], weak), cfg.batch_size, total, args, device)
    unlabeled = loader(PILImages(images, labels, two_views), cfg.mu * cfg.batch_size, total, args, device)
    labeled_it, unlabeled_it = iter(labeled), iter(unlabeled)

    def make_batch(_):
        x, y = next(labeled_it)
        (u_weak, u_strong), u_labels = next(unlabeled_it)
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(x), move(y), move(u_weak), move(u_strong), move(u_labels))

    return Pipeline(make_batch, Trainer(cfg, ds.image_shape, device), device)


# ------------------------------------------------------------------------------------------------ main
def versions() -> dict:
    import PIL
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}


def gpu_memory(device: torch.device) -> dict | None:
    """Peak GPU memory of the run (both pipelines: their models and the device-resident training set), in MiB."""
    if device.type != "cuda":
        return None
    mib = lambda n: round(n / 2 ** 20, 1)  # noqa: E731
    return {"max_allocated_mib": mib(torch.cuda.max_memory_allocated(device)),
            "max_reserved_mib": mib(torch.cuda.max_memory_reserved(device)),
            "total_mib": mib(torch.cuda.get_device_properties(device).total_memory)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if not 1 <= args.rounds <= args.steps:
        raise SystemExit("--rounds must be between 1 and --steps")
    cfg = FixMatchConfig.from_overrides({"backbone": args.backbone, "dataset": args.dataset, "device": args.device,
                                         "dtype": args.dtype, "batch_size": args.batch_size, "mu": args.mu,
                                         "num_labels": args.num_labels, "compile": args.compile,
                                         "compile_mode": args.compile_mode, "channels_last": not args.no_channels_last,
                                         "fused": not args.no_fused, "randaugment": args.randaugment,
                                         "cutout": args.cutout, "steps": args.rounds * args.warmup + args.steps})
    ds = load_dataset(args.dataset, device=device)
    labeled_idx = labeled_indices(ds.train_labels, cfg.num_labels, SEED, ds.num_classes)
    pipelines = {"device_resident": device_pipeline(cfg, ds, labeled_idx, device),
                 "dataloader": dataloader_pipeline(cfg, ds, labeled_idx, device, args)}
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    for r, steps in enumerate(per_round):
        for name in (pipelines if r % 2 == 0 else reversed(list(pipelines))):
            pipelines[name].timed_round(args.warmup, steps)
            print(f"round {r + 1}, {name}: {pipelines[name].rounds[-1]['steps_per_s']:.3f} steps/s", flush=True)
    results = {name: p.summary() for name, p in pipelines.items()}
    ratio = results["device_resident"]["steps_per_s"] / results["dataloader"]["steps_per_s"]
    print(f"device-resident pipeline: {results['device_resident']['steps_per_s']:.3f} steps/s")
    print(f"DataLoader pipeline:      {results['dataloader']['steps_per_s']:.3f} steps/s")
    print(f"ratio (device-resident / DataLoader): {ratio:.2f}")
    report = {
        "benchmark": "steps/s of one FixMatch training step (forward, loss, SGD step, EMA update) including "
                     "making the batch: device-resident batched augmentation vs DataLoader with PIL transforms",
        "images_per_step": {"labeled": args.batch_size, "unlabeled": args.mu * args.batch_size,
                            "forward": args.batch_size * (1 + 2 * args.mu)},
        **results, "ratio": round(ratio, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        "device_type": device.type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "dataloader_workers": {"per_loader": args.workers, "loaders": 2},
        "args": vars(args) | {"out": str(Path(args.out).relative_to(ROOT)) if Path(args.out).is_relative_to(ROOT)
                              else args.out},
        "gpu_memory": gpu_memory(device),
        "versions": versions(),
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
