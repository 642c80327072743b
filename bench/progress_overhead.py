"""Benchmark: what writing ``progress.json`` (:mod:`fmnist_core.core.progress`) costs a training run.

Run from the project root::

    .venv/bin/python bench/progress_overhead.py          # writes bench/results/progress_overhead.json
    .venv/bin/python bench/progress_overhead.py --repeats 1 --out /tmp/progress.json

A LeNet-5 (``lenet_avg``) trains on 4,000 Fashion-MNIST training images (batch 128, Adam, CPU, one
thread) twice per repeat, after a warm-up run: once as the book runs it and once with the progress file
switched off (the loop's ``ProgressFile`` replaced by one that writes nothing), alternating which goes
first. Two plans: the
book's supervised plan (a record, hence a progress write, per epoch) and a harsher one with a record every
10 steps. The cost of one write is also timed on its own. Timings depend on the machine and its load
(the load average is recorded too). On a loaded machine the runs' spread hides the difference, so the
writes' share of the run (writes x the time of one write / the run's time) is recorded beside it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package

from fmnist_core.core import loop  # noqa: E402
from fmnist_core.core.data import load_fashion_mnist, make_splits  # noqa: E402
from fmnist_core.core.io import write_json  # noqa: E402
from fmnist_core.core.models import build_model  # noqa: E402
from fmnist_core.core.progress import ProgressFile  # noqa: E402
from fmnist_core.core.supervised import Supervised  # noqa: E402
from fmnist_core.core.train import TrainConfig, prepare_model  # noqa: E402


class NoProgress:
    """The loop's progress file, switched off."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, record):
        pass


def fit_seconds(splits, cfg: TrainConfig, log_every: int | None, progress: bool) -> float:
    """Wall-clock seconds of one training run (``log_every`` None: the book's plan, a record per epoch)."""
    loop.ProgressFile = ProgressFile if progress else NoProgress
    torch.manual_seed(0)
    raw, runnable = prepare_model(build_model("lenet_avg", in_channels=1, image_size=28, num_classes=10), cfg,
                                  torch.device("cpu"))
    algo = Supervised(raw, runnable, splits.train, splits.val, cfg)
    steps = cfg.epochs * algo.steps_per_epoch
    plan = (loop.Plan.epochs(cfg.epochs, algo.steps_per_epoch, loop.Selection()) if log_every is None
            else loop.Plan(steps, log_every, eval_every=0, steps_per_epoch=algo.steps_per_epoch))
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        loop.train(algo, plan, cfg, cfg.schedule, cfg.seed, Path(out), cfg.to_dict(), log=lambda line: None)
        return time.perf_counter() - started


def write_seconds(writes: int = 1000) -> float:
    """Mean seconds of one ``progress.json`` write (a record of eight statistics)."""
    record = {"step": 0, "epoch": 1.0, "lr": 0.001, **{f"stat_{i}": 0.5 for i in range(8)}}
    with tempfile.TemporaryDirectory() as out:
        progress = ProgressFile(out, writes, 0, 100)
        started = time.perf_counter()
        for step in range(1, writes + 1):
            progress.update({**record, "step": step})
        return (time.perf_counter() - started) / writes


def compare(splits, cfg, log_every, repeats: int) -> dict:
    fit_seconds(splits, cfg, log_every, True)  # warm-up (first calls, allocator), not counted
    times = {True: [], False: []}
    for repeat in range(repeats):
        for progress in ((True, False) if repeat % 2 == 0 else (False, True)):
            times[progress].append(fit_seconds(splits, cfg, log_every, progress))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    steps = cfg.epochs * -(-len(splits.train.labels) // cfg.batch_size)
    writes = 1 + (cfg.epochs if log_every is None else -(-steps // log_every))  # at the start, then per record
    return {"records": "every epoch" if log_every is None else f"every {log_every} steps",
            "progress_writes": writes,
            "writes_percent_of_run": round(100 * writes * write_seconds(100) / off, 3),
            "with_progress_seconds": [round(t, 2) for t in times[True]],
            "without_progress_seconds": [round(t, 2) for t in times[False]],
            "median_with": round(on, 2), "median_without": round(off, 2),
            "difference_percent": round(100 * (on - off) / off, 2),
            "spread_percent": round(100 * (max(times[False]) - min(times[False])) / off, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: less noise on a shared CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "progress_overhead.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_fashion_mnist()
    splits, _ = make_splits(ds, 1000, 0)
    splits = replace(splits, train=replace(splits.train, images=splits.train.images[:args.images],
                                           labels=splits.train.labels[:args.images]))
    cfg = TrainConfig.from_overrides({"epochs": args.epochs, "batch_size": 128, "device": "cpu"})
    steps = args.epochs * -(-args.images // 128)
    result = {"benchmark": f"lenet_avg, {args.images} Fashion-MNIST images, {args.epochs} epochs ({steps} steps), "
                           "batch 128, CPU", "torch_threads": torch.get_num_threads(),
              "command": " ".join(["python bench/progress_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": list(os.getloadavg()),
              "one_write_ms": round(1000 * write_seconds(), 3),
              "runs": [compare(splits, cfg, None, args.repeats), compare(splits, cfg, 10, args.repeats)]}
    write_json(args.out, result)
    print(open(args.out).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
