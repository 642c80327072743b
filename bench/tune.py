"""Choose the semi-supervised chapters' settings on the validation split, never on the test set.

Runs a study's jobs on the *tuning seeds* (:data:`TUNING_SEEDS`) for a profile's settings updated by
``-p NAME VALUE`` overrides, and prints and records each run's **validation** accuracy and, per label count, the
gain of each method over the baseline (FixMatch: over supervised-only, final EMA model; semi-supervised: over the
encoder trained on labels only, the checkpoint chosen on validation). Only ``val_*`` figures are read from the
jobs; the book reports the test accuracy of other seeds (the profile's ``seeds``), which no setting was chosen on.
Records go to ``bench/results/tuning.json`` (one entry per setting tried).

    .venv/bin/python bench/tune.py fixmatch --profile quick -p steps 3000 --workers 2
    .venv/bin/python bench/tune.py semisupervised --profile quick -p m2_warmup 32 -p models '[m2, encoder_only]'
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmnist_core.chapters.fixmatch import study as fixmatch  # noqa: E402
from fmnist_core.chapters.semisupervised import study as semisupervised  # noqa: E402
from fmnist_core.core.config import TUNING_SEEDS, parse_cli_value  # noqa: E402
from fmnist_core.core.io import read_json  # noqa: E402
from fmnist_core.core.jobs import finished_key, prepare_job  # noqa: E402
from fmnist_core.pipeline.executors import LocalExecutor  # noqa: E402
from fmnist_core.pipeline.runner import get_profile  # noqa: E402

RECORD = ROOT / "bench" / "results" / "tuning.json"
READ = ("val_accuracy",)  # the only figure this script reads from a job's metrics
# Per study: its config and planner, the overrides that leave only the compared runs, how a run is named, and
# the baseline each method is compared with.
STUDIES = {
    "fixmatch": (fixmatch.FixMatchStudyConfig, fixmatch.plan_jobs, {"ceiling_labels": 0},
                 lambda job: (job.info["method"], job.info["num_labels"], job.info["seed"]), "supervised-only"),
    "semisupervised": (semisupervised.SemiSupStudyConfig, semisupervised.plan_jobs,
                       {"alpha_study": [], "ceiling_epochs": 0},
                       lambda job: (job.config.model, job.config.num_labels, job.config.seed), "encoder_only"),
}


def tune(study: str, profile: str, overrides: dict, folder: Path, workers: int) -> dict:
    """Run the tuning jobs of ``study`` under ``profile`` + ``overrides``; the validation figures and gains."""
    config, plan, only_compared, name, baseline = STUDIES[study]
    params = dict(get_profile(profile)["experiments"].get(study) or {})
    cfg = config.from_overrides(params, {"seeds": list(TUNING_SEEDS), **only_compared, **overrides}, where="tune")
    jobs = plan(cfg, folder)
    started = time.perf_counter()
    # A job folder that holds a finished job is reused even if the library's source changed since (its key then
    # differs): a tuning series compares settings, and edits elsewhere in the code must not re-run it.
    todo = [job for job in jobs if finished_key(job.out_dir) is None]
    for job in todo:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        prepare_job(job)
    failures = LocalExecutor(workers=workers).run({study: todo}, log=lambda *_: None)
    failed = [f.label for f in failures if finished_key(f.job_dir) is None]
    if failed:
        raise SystemExit("failed: " + ", ".join(failed))
    runs = []
    for job in jobs:
        method, n, seed = name(job)
        metrics = read_json(job.out_dir / "metrics.json")
        runs.append({"method": method, "num_labels": n, "seed": seed, **{k: metrics[k] for k in READ}})
    gains = {}
    for n in sorted({r["num_labels"] for r in runs}):
        acc = {(r["method"], r["seed"]): r["val_accuracy"] for r in runs if r["num_labels"] == n}
        for method in sorted({m for m, _ in acc} - {baseline}):
            per_seed = [100 * (acc[method, s] - acc[baseline, s]) for s in cfg.seeds if (baseline, s) in acc]
            gains[f"{method} @ {n}"] = {
                "mean": round(statistics.mean(per_seed), 2),
                "std": round(statistics.stdev(per_seed), 2) if len(per_seed) > 1 else 0.0,
                "per_seed": [round(g, 2) for g in per_seed],
                "mean_accuracy": round(statistics.mean(acc[method, s] for s in cfg.seeds), 4),
                "baseline_accuracy": round(statistics.mean(acc[baseline, s] for s in cfg.seeds), 4)}
    return {"study": study, "profile": profile, "overrides": overrides, "seeds": cfg.seeds,
            "metric": "validation accuracy", "baseline": baseline, "gain_points": gains, "runs": runs,
            "seconds": round(time.perf_counter() - started, 1), "recorded": time.strftime("%Y-%m-%d")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--profile", default="quick")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fmnist-tune"))
    args = parser.parse_args()
    overrides = {name: parse_cli_value(value) for name, value in args.p}
    tag = "_".join(f"{k}-{v}" for k, v in overrides.items()).replace(" ", "").replace("/", "") or "profile"
    entry = tune(args.study, args.profile, overrides, args.folder / args.study / tag, args.workers)
    for what, gain in entry["gain_points"].items():
        print(f"{what}: {gain['mean_accuracy']:.2%} vs {gain['baseline_accuracy']:.2%}, {gain['mean']:+.1f} ± "
              f"{gain['std']:.1f} points over {entry['baseline']} (validation; seeds {entry['seeds']}: "
              f"{gain['per_seed']}); {entry['seconds']} s")
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"what": __doc__.split("\n\n")[0],
                                                                      "tuning_seeds": list(TUNING_SEEDS), "tried": []}
    record["tried"].append(entry)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
