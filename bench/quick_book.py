"""Benchmark: the default book (`quick` profile) — the experiments' wall time, per chapter its notebook's wall time and
its jobs' summed time, and the headline numbers each chapter must
show on a CPU, checked against the targets the project set for it, recorded in ``bench/results/quick_book.json``.

    .venv/bin/python bench/quick_book.py --run            # build the quick book afresh in a temporary folder, then read it
    .venv/bin/python bench/quick_book.py --results-dir results   # read an existing quick build

Every figure is read from the results files the runs wrote; nothing here is typed in except the targets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "quick"
# What each chapter of the quick book must show (test set; means over the seeds the profile runs).
TARGETS = {
    "fixmatch_label_counts": [40, 250, 4000],  # the FixMatch report's label counts
    "fixmatch_seeds": 3,             # at least this many seeds at the lowest label count (mean +- std on the page)
    "fixmatch_gain_40": 0.15,        # FixMatch - supervised-only at 40 labels
    "fixmatch_gain_250": 0.05,       # ... at 250 labels
    "fixmatch_gain_4000": 0.0,       # not behind at 4,000 labels
    "fixmatch_ceiling": 0.88,        # fully supervised ceiling
    "m2_vs_encoder": 0.0,            # M2 - the encoder trained on labels only, at the lowest label count
    "semisup_vae_vs_encoder": 0.03,  # Semi-SupVAE - encoder-only, at the lowest label count
    "lenet_accuracy": 0.905,         # both LeNet-5 poolings on the full 10,000-image test set
    "best_accuracy": 0.92,           # the best ranked classifier
    "no_model_below": 0.80,          # every classifier, the budget-limited ones included
    "semisup_cnn_all": 0.85,         # the CNN with all labels of the pool
    "experiments_seconds": 12 * 60,  # the whole quick book, experiments only (moonshot: 10 minutes)
}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def classification(run: Path) -> dict:
    m = read(run / "metrics.json")
    ranked = {k: v for k, v in m["models"].items() if k not in m.get("budget_limited", []) and not k.endswith("-sgd")}
    best = max(ranked, key=lambda k: ranked[k]["val_accuracy"])
    lenets = {k: ranked[k]["accuracy"] for k in ("lenet_avg", "lenet_max") if k in ranked}
    return {"test_images": m["test_images"], "accuracy": {k: v["accuracy"] for k, v in m["models"].items()},
            "budget_limited": m.get("budget_limited", []), "best_model": best,
            "best_accuracy": ranked[best]["accuracy"], "lenet": lenets,
            "lowest_model": min(m["models"], key=lambda k: m["models"][k]["accuracy"]),
            "targets": {"lenet_accuracy": m["test_images"] == 10000 and len(lenets) == 2
                        and min(lenets.values()) >= TARGETS["lenet_accuracy"],
                        "best_accuracy": ranked[best]["accuracy"] >= TARGETS["best_accuracy"],
                        "no_model_below": min(v["accuracy"] for v in m["models"].values())
                        >= TARGETS["no_model_below"]}}


def _curve_rises(histories: list[list[dict]], key: str) -> bool:
    """The key's mean over the last quarter of records beats its mean over the first quarter, in every run."""
    def rises(h):
        values = [r[key] for r in h if r.get(key) is not None]
        q = max(1, len(values) // 4)
        return len(values) >= 2 and statistics.mean(values[-q:]) > statistics.mean(values[:q])
    return bool(histories) and all(rises(h) for h in histories)


def fixmatch(run: Path) -> dict:
    m = read(run / "metrics.json")
    acc = {(r["model"], r["num_labels"]): r["test_accuracy"] for r in m["study"]}
    std = {f"{r['model']} @ {r['num_labels']}": r.get("test_accuracy_std") for r in m["study"]}
    counts = sorted({n for method, n in acc if method == "fixmatch"})
    gains = {n: acc[("fixmatch", n)] - acc[("supervised-only", n)] for n in counts}
    low = min(counts)
    seeds = sorted({r["seed"] for r in m["runs"] if r["method"] == "fixmatch" and r["num_labels"] == low})
    ceiling = next((v for (method, _), v in acc.items() if method == "fully supervised"), None)
    histories = [read(run / "runs" / r["run"] / "history.json") for r in m["runs"] if r["method"] == "fixmatch"]
    return {"accuracy": {f"{k[0]} @ {k[1]}": v for k, v in acc.items()}, "std": std, "gain": gains,
            "ceiling": ceiling, "seeds": seeds,
            "targets": {"label_counts": counts == TARGETS["fixmatch_label_counts"],
                        "seeds": len(seeds) >= TARGETS["fixmatch_seeds"],
                        "fixmatch_gain_40": gains.get(40, -1) >= TARGETS["fixmatch_gain_40"],
                        "fixmatch_gain_250": gains.get(250, -1) >= TARGETS["fixmatch_gain_250"],
                        "fixmatch_gain_4000": gains.get(4000, -1) >= TARGETS["fixmatch_gain_4000"],
                        "mask_ratio_rises": _curve_rises(histories, "mask_ratio"),
                        "pseudo_label_accuracy_rises": _curve_rises(histories, "pseudo_label_accuracy"),
                        "fixmatch_ceiling": ceiling is not None and ceiling >= TARGETS["fixmatch_ceiling"],
                        "lowest_label_count": low}}


def semisupervised(run: Path) -> dict:
    m = read(run / "metrics.json")
    acc = {(r["model"], r["num_labels"]): r["test_accuracy"] for r in m["study"]}
    counts = sorted({n for _, n in acc})
    low = counts[0]
    encoder = acc.get(("encoder_only", low), 1)
    # The CNN with all labels: the fully supervised ceiling's row when the profile runs one, else the largest count.
    cnn_all = max((v for (model, _), v in acc.items() if model.startswith("cnn, fully supervised")),
                  default=acc.get(("cnn", counts[-1]), 0))
    return {"accuracy": {f"{k[0]} @ {k[1]}": v for k, v in acc.items()}, "lowest": low, "cnn_all_labels": cnn_all,
            "targets": {"m2_vs_encoder": acc.get(("m2", low), 0) - encoder >= TARGETS["m2_vs_encoder"],
                        "semisup_vae_vs_encoder": acc.get(("semisup_vae", low), 0) - encoder
                        >= TARGETS["semisup_vae_vs_encoder"],
                        "semisup_cnn_all": cnn_all >= TARGETS["semisup_cnn_all"]}}


def others(run: Path, name: str) -> dict:
    m = read(run / "metrics.json")
    return {"summary": m["summary"][:4]}


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


CHAPTERS = ("dataset", "classification", "layerwise", "vae", "semisupervised", "fixmatch")


def job_seconds(run: Path) -> float:
    """The summed running time of a run's jobs (``done.json``): worker seconds, which overlap with workers."""
    return round(sum(read(done)["seconds"] for done in run.rglob("done.json")), 1)


def experiments_span(results: Path, profile: str) -> float:
    """Wall seconds from the first job planned (its ``job.json``) or notebook started (``run.json``) to the last
    run recorded (``env.json``): the experiments' time whether jobs ran inline or on workers."""
    runs = [results / profile / name for name in CHAPTERS if (results / profile / name / "env.json").exists()]
    starts = [p.stat().st_mtime for run in runs for p in [run / "run.json", *run.rglob("job.json")] if p.exists()]
    return round(max((run / "env.json").stat().st_mtime for run in runs) - min(starts), 1)


def collect(results: Path, profile: str = PROFILE) -> dict:
    readers = {"classification": classification, "fixmatch": fixmatch, "semisupervised": semisupervised}
    chapters = {}
    for name in CHAPTERS:
        run = results / profile / name
        if not (run / "env.json").exists():
            chapters[name] = {"missing": True}
            continue
        # notebook_seconds: the notebook's own wall time (with workers, the jobs ran before it, in job_seconds)
        chapters[name] = {"notebook_seconds": read(run / "env.json")["wall_seconds"], "job_seconds": job_seconds(run),
                          **(readers[name](run) if name in readers else others(run, name))}
    total = experiments_span(results, profile)
    return {"profile": profile, "machine": machine(), "experiments_seconds": total,
            "within_target": total <= TARGETS["experiments_seconds"], "targets": TARGETS, "chapters": chapters,
            "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, help="read this quick build instead of running one")
    parser.add_argument("--run", action="store_true", help="build the quick book afresh in a temporary folder")
    parser.add_argument("--profile", default=PROFILE, help="another profile's build, to try the script")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quick_book.json")
    args = parser.parse_args()
    if args.run == bool(args.results_dir):
        parser.error("give exactly one of --run or --results-dir")
    results = args.results_dir
    if args.run:
        results = Path(tempfile.mkdtemp(prefix="quick-book-"))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fmnist_core.pipeline.cli", "--results-dir", str(results), "build",
                        "--profile", args.profile, "--output-dir", str(results / "_build")], check=True)
        print(f"quick book built in {time.perf_counter() - started:.0f} s")
    record = collect(results, args.profile)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "chapters"}, indent=2))
    for name, chapter in record["chapters"].items():
        print(name, chapter.get("notebook_seconds"), chapter.get("job_seconds"), chapter.get("targets", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
