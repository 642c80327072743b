"""Record seconds per optimiser step of finished jobs, by device and ``<kind>/<network>/b<batch>``, into
``bench/results/step_times.json`` — what ``fmnist-book plan`` multiplies each job's steps by.

    .venv/bin/python bench/step_times.py results/quick              # every finished run of a profile
    .venv/bin/python bench/step_times.py results/quick/fixmatch     # one run

A job's figure is its whole wall time (``done.json``: data, training, evaluation) over its steps, so jobs of fewer
than ``--min-steps`` steps (where start-up dominates) are left out. A later measurement of the same device and
network replaces the earlier one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmnist_core.core.jobs import DONE_FILE, JOB_FILE, load_job  # noqa: E402
from fmnist_core.pipeline.scale import STEP_TIMES, job_backbone, job_steps  # noqa: E402


def measure(folder: Path, min_steps: int) -> dict[str, dict[str, dict]]:
    """device -> network key -> {"s_per_step", "steps", "jobs"} over the finished jobs under ``folder``."""
    found: dict[str, dict[str, list]] = {}
    for done in sorted(folder.rglob(DONE_FILE)):
        job_dir = done.parent
        env = next((p / "env.json" for p in job_dir.parents if (p / "env.json").exists()), None)
        if not (job_dir / JOB_FILE).exists() or env is None:
            continue
        job = load_job(job_dir)
        steps = job_steps(job)
        if steps < min_steps:
            continue
        device = json.loads(env.read_text())["device"]
        seconds = json.loads(done.read_text())["seconds"]
        found.setdefault(device, {}).setdefault(job_backbone(job), []).append((seconds, steps))
    return {device: {key: {"s_per_step": round(sum(s for s, _ in runs) / sum(n for _, n in runs), 5),
                           "steps": sum(n for _, n in runs), "jobs": len(runs)} for key, runs in keys.items()}
            for device, keys in found.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--min-steps", type=int, default=50)
    args = parser.parse_args()
    record = json.loads(STEP_TIMES.read_text()) if STEP_TIMES.exists() else {}
    record.setdefault("what", "seconds per optimiser step of a whole job (wall time over steps), by device and "
                              "<kind>/<network>/b<batch>; read by `fmnist-book plan`")
    devices = record.setdefault("devices", {})
    for folder in args.folders:
        for device, keys in measure(folder.resolve(), args.min_steps).items():
            for key, figure in keys.items():
                devices.setdefault(device, {})[key] = {**figure, "recorded": time.strftime("%Y-%m-%d")}
                print(f"{device}  {key}: {figure['s_per_step']} s/step ({figure['jobs']} job(s))")
    STEP_TIMES.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
