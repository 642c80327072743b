"""Training images per second of every network of the book on this CPU, in float32 and in bf16 autocast with
channels-last weights, written to ``bench/results/precision_cpu.json`` — what ``dtype: auto`` (the default)
chooses from (:data:`fmnist_core.core.train.CPU_BF16_FASTER`).

    .venv/bin/python bench/precision.py                 # every network, 2 threads
    .venv/bin/python bench/precision.py --only lenet_max mycnn --seconds 3

One step is what a chapter's training step does for that network: forward, loss (in float32), backward and an AdamW
update, on a batch of random images of the right shape. The two precisions are timed alternately, in rounds, so a
busy machine slows both alike; the figure is the median round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmnist_core.core.metrics import cpu_description  # noqa: E402
from fmnist_core.core.models import build_model  # noqa: E402
from fmnist_core.core.train import autocast_context, cpu_bf16_support  # noqa: E402

CPU = torch.device("cpu")
OUT = ROOT / "bench" / "results" / "precision_cpu.json"
CLASSIFIERS = ("mlp", "lenet_avg", "lenet_max", "mycnn", "smallcnn", "alexnet", "vgg16", "resnet18", "resnet34",
               "wrn28_2")
GENERATIVE = ("vae", "semisup_vae", "m2", "encoder_only")


def classifier_step(name: str, batch: int, dtype: str):
    model = build_model(name)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def loss(m):
        return F.cross_entropy(m(x).float(), y)
    return model, loss


def generative_step(name: str, batch: int, dtype: str):
    from fmnist_core.chapters.semisupervised import model as ss
    from fmnist_core.chapters.vae import VAE, vae_loss
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    g = torch.Generator().manual_seed(0)
    if name == "vae":
        model = VAE()

        def loss(m):
            x_hat, mu, logvar = m(x, generator=g)
            return vae_loss(x_hat.float(), x, mu.float(), logvar.float(), 1.0, "bce")["loss"]
        return model, loss
    cfg = ss.SemiSupConfig.from_overrides({"model": name, "dtype": dtype, "device": "cpu"})
    model = ss.rebuild_semisup({"model": name, "in_channels": 1, "image_size": 28, "class_names": list("0123456789"),
                                "latent_dim": cfg.latent_dim, "branch_channels": cfg.branch_channels,
                                "dropout": cfg.dropout, "hidden": ss.CLASSIFIER_HIDDEN})
    step = ss.make_step(cfg)
    half = batch // 2

    def loss(m):  # the step functions enter autocast themselves
        return step(m, x[:half], y[:half], x[half:], g)["loss"]
    return model, loss


def images_per_second(name: str, batch: int, seconds: float, rounds: int) -> dict:
    build = generative_step if name in GENERATIVE else classifier_step
    setups = {}
    for mode in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model, loss = build(name, batch, mode)
        if mode == "bfloat16":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[mode] = (model, loss, opt)
    times = {mode: [] for mode in setups}
    generative = name in GENERATIVE

    def one(mode):
        model, loss, opt = setups[mode]
        # The semi-supervised steps enter autocast themselves (from their config's dtype); the VAE's loss and
        # every classifier's are computed from float32 outputs, as in the chapters.
        with contextlib.nullcontext() if generative and name != "vae" else autocast_context(CPU, mode):
            value = loss(model)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    for mode in setups:  # warm-up: oneDNN primitive creation
        for _ in range(2):
            one(mode)
    for _ in range(rounds):
        for mode in setups:
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds / rounds or n == 0:
                one(mode)
                n += 1
            times[mode].append(n * batch / (time.perf_counter() - start))
    fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    return {"batch": batch, "float32": round(fp32, 1), "bfloat16_channels_last": round(bf16, 1),
            "gain": round(bf16 / fp32, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="networks to time (default: all)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per network and precision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or [*CLASSIFIERS, *GENERATIVE]
    record = json.loads(OUT.read_text()) if OUT.exists() else {}
    record.update({"what": "training images/s of one step (forward, float32 loss, backward, AdamW), float32 against "
                           "bf16 autocast + channels-last weights; written by bench/precision.py",
                   "cpu": cpu_description(), "bf16_support": cpu_bf16_support(), "threads": args.threads,
                   "torch": torch.__version__, "recorded": time.strftime("%Y-%m-%d")})
    models = record.setdefault("models", {})
    for name in names:
        models[name] = images_per_second(name, args.batch, args.seconds, args.rounds)
        print(f"{name:14s} float32 {models[name]['float32']:9.1f}  bf16+cl {models[name]['bfloat16_channels_last']:9.1f}"
              f"  x{models[name]['gain']}", flush=True)
    OUT.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
