"""Benchmark: openTSNE (``fmnist_core.core.embed.embed_tsne``) against scikit-learn's ``TSNE`` on layer activations.

Run from the project root::

    .venv/bin/python bench/tsne_bench.py            # n = 1,000 and 5,000, writes bench/results/tsne.json
    .venv/bin/python bench/tsne_bench.py --sizes 1000 --threads 2 --out /tmp/tsne.json

The data are the 120-d ``fc1`` activations of an untrained, seeded ``lenet_max`` on class-balanced
Fashion-MNIST test images (normalised with the training statistics). Both libraries get the same
points, the same thread count, perplexity 30, a PCA initialisation and 750 iterations: openTSNE runs
250 early-exaggeration iterations plus ``n_iter=500``; scikit-learn runs ``max_iter=750``, of which
its first 250 are the exaggerated ones, with its early stopping disabled so that it too runs them all.
Each library keeps its own "auto" learning rate: scikit-learn ``max(N / 48, 50)`` throughout, openTSNE
``N / 12`` during exaggeration and ``N`` after it; openTSNE defines the rate 4 times smaller than
scikit-learn, so the exaggeration phases match and openTSNE then takes 12 times larger steps. Both use Barnes-Hut gradients with angle 0.5 here (openTSNE switches to FFT interpolation only from
10,000 points on), but openTSNE finds neighbours approximately (Annoy, from 1,000 points on) and
scikit-learn exactly.
The trustworthiness of both maps is reported beside the times, so a faster but worse map would show.
This is a benchmark, not a test: timings depend on the machine and its load
(the load average is recorded too).
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

from fmnist_core.core.activations import capture_activations, embedding_trustworthiness  # noqa: E402
from fmnist_core.core.data import balanced_subset, load_fashion_mnist, normalize  # noqa: E402
from fmnist_core.core.embed import embed_tsne  # noqa: E402
from fmnist_core.core.io import write_json  # noqa: E402
from fmnist_core.core.metrics import cpu_description  # noqa: E402
from fmnist_core.core.models import build_model  # noqa: E402

PERPLEXITY = 30.0
EXAGGERATION_ITER = 250  # both libraries' early-exaggeration phase (fixed in scikit-learn)
N_ITER = 500             # iterations after it


def fc1_activations(n: int, seed: int = 0) -> np.ndarray:
    """The ``fc1`` activations (N×120) of an untrained ``lenet_max`` on ``n`` balanced test images."""
    ds = load_fashion_mnist()
    index = torch.as_tensor(balanced_subset(ds.test_labels, n, seed, ds.num_classes))
    inputs = normalize(ds.test_images[index], ds.mean, ds.std)
    torch.manual_seed(seed)  # the model's initialisation
    model = build_model("lenet_max")
    return capture_activations(model, inputs, layers=["fc1"])["fc1"]


def run_opentsne(x: np.ndarray, threads: int, seed: int) -> np.ndarray:
    return embed_tsne(x, perplexity=PERPLEXITY, seed=seed, n_jobs=threads, n_iter=N_ITER)


def run_sklearn(x: np.ndarray, threads: int, seed: int) -> tuple[np.ndarray, int]:
    from sklearn.manifold import TSNE
    total = EXAGGERATION_ITER + N_ITER
    # min_grad_norm=0 and a patience of the whole run switch early stopping off: equal iteration counts.
    tsne = TSNE(n_components=2, perplexity=PERPLEXITY, init="pca", learning_rate="auto", max_iter=total,
                n_iter_without_progress=total, min_grad_norm=0.0, method="barnes_hut", n_jobs=threads,
                random_state=seed)
    embedding = tsne.fit_transform(x)
    return embedding.astype(np.float32), int(tsne.n_iter_) + 1  # n_iter_ is the last iteration's index


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started



def versions() -> dict:
    import openTSNE
    import sklearn
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "scikit-learn": sklearn.__version__, "openTSNE": openTSNE.__version__}


def benchmark(sizes, threads: int, seed: int) -> list[dict]:
    from threadpoolctl import threadpool_limits
    rows = []
    # Caps BLAS and OpenMP pools (scikit-learn's Barnes-Hut gradient takes its thread count from OpenMP).
    with threadpool_limits(limits=threads):
        warm = fc1_activations(100, seed)  # imports and first-call set-up stay out of the timings
        run_opentsne(warm, threads, seed)
        run_sklearn(warm, threads, seed)
        for n in sizes:
            x = fc1_activations(n, seed)
            ot, ot_seconds = timed(run_opentsne, x, threads, seed)
            (sk, sk_iter), sk_seconds = timed(run_sklearn, x, threads, seed)
            rows.append({"n": n, "dim": int(x.shape[1]), "opentsne_seconds": round(ot_seconds, 2),
                         "sklearn_seconds": round(sk_seconds, 2), "ratio": round(sk_seconds / ot_seconds, 2),
                         "opentsne_iterations": EXAGGERATION_ITER + N_ITER, "sklearn_iterations": sk_iter,
                         "opentsne_trustworthiness": round(embedding_trustworthiness(x, ot), 4),
                         "sklearn_trustworthiness": round(embedding_trustworthiness(x, sk), 4)})
            print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    print(f"{row['n']:>6} {row['opentsne_seconds']:>12.2f} {row['sklearn_seconds']:>12.2f} {row['ratio']:>8.2f}"
          f" {row['opentsne_trustworthiness']:>10.4f} {row['sklearn_trustworthiness']:>10.4f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000],
                        help="numbers of points (multiples of 10, at most 10,000)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both libraries")
    parser.add_argument("--seed", type=int, default=0, help="seed of images, model and both t-SNEs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tsne.json")
    args = parser.parse_args(argv)
    print(f"t-SNE of lenet_max fc1 activations, {args.threads} threads, perplexity {PERPLEXITY:g}, "
          f"{EXAGGERATION_ITER}+{N_ITER} iterations")
    print(f"{'n':>6} {'openTSNE s':>12} {'sklearn s':>12} {'sk/oT':>8} {'trust oT':>10} {'trust sk':>10}")
    load_before = os.getloadavg()
    rows = benchmark(args.sizes, args.threads, args.seed)
    write_json(args.out, {
        "benchmark": "t-SNE of lenet_max fc1 activations (untrained, seeded) on Fashion-MNIST test images",
        "threads": args.threads, "perplexity": PERPLEXITY, "initialization": "pca",
        "iterations": {"opentsne": f"early_exaggeration_iter={EXAGGERATION_ITER} + n_iter={N_ITER}",
                       "sklearn": f"max_iter={EXAGGERATION_ITER + N_ITER} (early stopping disabled)"},
        "methods": {"opentsne": "Annoy neighbours (exact below 1,000 points), Barnes-Hut gradients (theta 0.5; "
                                "FFT only from 10,000 points), learning rate N/12 then N",
                    "sklearn": "exact neighbours, Barnes-Hut gradients (angle 0.5), learning rate max(N/48, 50)"},
        "seed": args.seed, "results": rows, "versions": versions(), "cpu": cpu_description(),
        "cpu_count": os.cpu_count(), "load_average_1min": {"before": round(load_before[0], 2),
                                                           "after": round(os.getloadavg()[0], 2)},
    })
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
