"""Benchmark: what the executors cost. Records in ``bench/results/executors.json``:

* the wall time of ``fmnist-book run <study> --profile P`` (jobs and notebook, in a fresh results folder) for the
  FixMatch and semi-supervised studies, ``--executor inline`` against ``--executor local --workers 2``;
* the Slurm overhead (needs a Slurm, e.g. ``scripts/local-slurm.sh up`` and ``SLURM_CONF``): the time from
  submitting one job to its worker starting (``started.json``) and to its first logged training step, against
  the same job started as a local worker process.

    .venv/bin/python bench/scale_bench.py --profile smoke [--slurm]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmnist_core.core.jobs import STARTED_FILE, prepare_job  # noqa: E402
from fmnist_core.pipeline.executors import LocalExecutor, job_log  # noqa: E402
from fmnist_core.pipeline.scale import planned_jobs  # noqa: E402

CLI = [sys.executable, "-m", "fmnist_core.pipeline.cli"]
RESULT = ROOT / "bench" / "results" / "executors.json"


def timed_run(study: str, profile: str, executor: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run(CLI + ["--results-dir", tmp, "run", study, "--profile", profile, *executor],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{study} {executor} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return round(seconds, 1)


def first_step(job, executor, folder: Path) -> dict:
    """Seconds from handing ``job`` to ``executor`` to its worker starting and to its first logged step."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    prepare_job(job)
    started, marks = time.perf_counter(), {}
    import threading
    thread = threading.Thread(target=executor.run, args=({"bench": [job]},), kwargs={"log": lambda *_: None})
    thread.start()
    while thread.is_alive() and len(marks) < 2:
        if "worker_started_s" not in marks and (job.out_dir / STARTED_FILE).exists():
            marks["worker_started_s"] = round(time.perf_counter() - started, 2)
        log = job_log(job.out_dir)
        if "first_step_s" not in marks and log.exists() and " step " in log.read_text():
            marks["first_step_s"] = round(time.perf_counter() - started, 2)
        time.sleep(0.05)
    thread.join()
    return marks


def slurm_overhead(profile: str) -> dict:
    from fmnist_core.pipeline.slurm import SlurmExecutor, SlurmOptions
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, executor in (("local", LocalExecutor(1)),
                               ("slurm", SlurmExecutor(SlurmOptions(time=30), Path(tmp) / ".slurm", poll_s=0.2))):
            [job] = [j for j in planned_jobs("fixmatch", profile, Path(tmp) / name) if j.label.startswith("fixmatch")]
            result[name] = first_step(job, executor, Path(tmp))
    result["slurm_overhead_to_first_step_s"] = round(result["slurm"]["first_step_s"] - result["local"]["first_step_s"], 2)
    return result


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--slurm", action="store_true", help="also measure the Slurm overhead")
    parser.add_argument("--no-studies", action="store_true", help="only the Slurm overhead")
    args = parser.parse_args()
    record = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    entry = record.get(args.profile, {})
    entry.update(machine={"cpu_count": os.cpu_count(), "platform": platform.platform()},
                 note="wall time of `fmnist-book run <study> --profile P` (jobs and notebook) in a fresh results "
                      "folder; local workers get cpu_count // workers torch threads each (inline: torch's default); "
                      "the load averages show whether other work shared the CPU while measuring")
    entry.pop("reading", None)
    if not args.no_studies:
        studies, load = {}, [os.getloadavg()[0]]
        for study in ("fixmatch", "semisupervised"):
            inline = timed_run(study, args.profile, [])
            local = timed_run(study, args.profile, ["--executor", "local", "--workers", "2"])
            studies[study] = {"inline_s": inline, "local_workers_2_s": local,
                              "local_over_inline": round(local / inline, 3)}
            load.append(os.getloadavg()[0])
            print(study, studies[study], flush=True)
        entry.update(studies=studies, studies_measured=now(), studies_load_average_1min=[round(x, 1) for x in load])
    if args.slurm:
        load = os.getloadavg()[0]
        entry.update(slurm=slurm_overhead(args.profile), slurm_measured=now(),
                     slurm_load_average_1min=[round(load, 1), round(os.getloadavg()[0], 1)])
        print(entry["slurm"])
    record[args.profile] = entry
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
