"""What a profile's jobs are and where they stand: ``fmnist-book plan`` (the jobs and an estimate of their cost)
and the job lines of ``fmnist-book status`` (done / running / queued / failed per study, from the job folders'
marker files and, for jobs submitted to Slurm, from Slurm itself)."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from fmnist_core.core.errors import FmnistBookError
from fmnist_core.core.io import read_json
from fmnist_core.core.resources import project_file
from fmnist_core.core.jobs import FAILED_FILE, STARTED_FILE, Job
from fmnist_core.core.train import optimizer_steps
from fmnist_core.pipeline.executors import live_worker
from fmnist_core.pipeline.workers import job_log
from fmnist_core.pipeline.experiments import get_experiment

STEP_TIMES = project_file("bench", "results", "step_times.json")
PROGRESS_FILE = "progress.json"


def planned_jobs(experiment: str, profile: str, results_dir, overrides: dict | None = None,
                 variant: str | None = None) -> list[Job]:
    """The jobs of ``experiment`` in ``profile``, planned where its run keeps them (nothing is written): the
    run in progress (``<experiment>.partial``, with the parameters it was started with) if there is one, else
    the finished one, else the profile's parameters (with ``overrides``: a ``variant``'s run)."""
    from fmnist_core.pipeline.runner import resolve_params, run_name
    exp = get_experiment(experiment)
    if exp.plan is None:
        return []
    final = Path(results_dir).resolve() / profile / run_name(experiment, variant)
    partial = final.with_name(final.name + ".partial")
    run_dir = partial if partial.exists() else final
    params = resolve_params(experiment, profile, overrides)
    for record in (run_dir / "run.json", run_dir / "env.json"):
        try:
            if record.exists():
                params = read_json(record)["params"]
                break
        except (FmnistBookError, KeyError):
            continue
    return exp.plan(exp.config.from_overrides(params, where=experiment), run_dir)


# ------------------------------------------------------------------------------------------- cost
def job_steps(job: Job) -> int:
    """The optimiser steps of a job (:func:`fmnist_core.core.train.optimizer_steps`)."""
    return optimizer_steps(job.config)


def job_backbone(job: Job) -> str:
    """``<kind>/<network>/b<batch>``: what a recorded seconds-per-step figure is looked up by."""
    cfg = job.config
    network = getattr(cfg, "backbone", None) or getattr(cfg, "model", None) or f"z{getattr(cfg, 'latent_dim', '')}"
    return f"{job.kind}/{network}/b{cfg.batch_size}" + (f"/mu{cfg.mu}" if hasattr(cfg, "mu") else "")


def this_device() -> str:
    """This machine's device as a run's ``env.json`` names it (a CUDA GPU's name, or the CPU and its cores):
    the name step times are recorded under."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def step_times(device: str, path: Path = STEP_TIMES) -> dict[str, float]:
    """Recorded seconds per step on ``device``, by :func:`job_backbone`: from ``bench/step_times.py``'s record
    and from the FixMatch step benchmarks (``bench/results/fixmatch*.json``)."""
    times = {}
    for bench in sorted(Path(path).parent.glob("fixmatch*.json")):
        try:
            record = read_json(bench)
            args, rate = record["args"], record["device_resident"]["steps_per_s"]
            name = (f"CPU ({platform.machine()}, {record['cpu_count']} cores)" if record["device_type"] == "cpu"
                    else record["device"])
        except (FmnistBookError, KeyError, TypeError):
            continue
        if name == device:
            times[f"fixmatch/{args['backbone']}/b{args['batch_size']}/mu{args['mu']}"] = 1.0 / rate
    try:
        recorded = read_json(path).get("devices", {}).get(device, {}) if Path(path).exists() else {}
    except FmnistBookError:
        recorded = {}
    return {**times, **{key: figure["s_per_step"] for key, figure in recorded.items()}}


def plan_lines(profile: str, results_dir, device: str | None = None) -> list[str]:
    """The lines of ``fmnist-book plan``: every job of the profile, its steps and estimated time, and totals."""
    from fmnist_core.pipeline.runner import profile_experiments
    device = device or this_device()
    from fmnist_core.pipeline.sweep import declared_sweeps
    times, lines, total_s, unknown, count = step_times(device), [], 0.0, 0, 0
    runs = [(experiment, None, None) for experiment in profile_experiments(profile)]
    runs += [(sweep.experiment, p.overrides, p.variant) for sweep in declared_sweeps(profile) for p in sweep.points]
    for experiment, overrides, variant in runs:  # the profile's runs, then the points of its declared sweeps
        jobs = planned_jobs(experiment, profile, results_dir, overrides, variant)
        lines += [f"{experiment}{'@' + variant if variant else ''}: {len(jobs)} job(s)"] if jobs else []
        for job in jobs:
            steps, per_step = job_steps(job), times.get(job_backbone(job))
            seconds = steps * per_step if per_step is not None else None
            total_s, unknown, count = total_s + (seconds or 0), unknown + (seconds is None), count + 1
            done = " (finished)" if job.finished() else ""
            lines.append(f"  {job.label:<34} {job_backbone(job):<34} {steps:>9,} steps  "
                         f"{format_hours(seconds) if seconds is not None else 'unknown'}{done}")
    known = f"≈ {format_hours(total_s)} for {count - unknown} job(s) on {device}" if count > unknown else ""
    lines.append(f"{count} jobs: " + "; ".join(filter(None, [known, f"{unknown} of unknown cost" if unknown else ""]))
                 + " (seconds per step as recorded in bench/results/; "
                   "`python bench/step_times.py RUN_DIR` records those of finished jobs)")
    return lines


def format_hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} device-hours" if seconds >= 3600 else f"{seconds:,.0f} s"


def cmd_plan(args) -> int:
    """``fmnist-book plan --profile P``."""
    for line in plan_lines(args.profile, args.results_dir, args.device):
        print(line)
    return 0


def add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="list the jobs of a profile and estimate their cost")
    plan.add_argument("--profile", default="quick")
    plan.add_argument("--device", default=None, help="the device to estimate for (default: this machine's)")


# ----------------------------------------------------------------------------------------- status
def job_state(job: Job, slurm_state: str | None = None) -> str:
    """done | running | queued | failed | stopped (started, no longer running) | not started."""
    from fmnist_core.pipeline.slurm import ACTIVE
    if job.finished():
        return "done"
    if slurm_state in ACTIVE:  # a failed job submitted again is queued
        return "running" if slurm_state == "RUNNING" else "queued"
    if (job.out_dir / FAILED_FILE).exists():
        return "failed"
    if slurm_state is not None:
        return "failed" if slurm_state != "UNKNOWN" else "stopped"
    return _local_state(job.out_dir / STARTED_FILE)


def _local_state(started: Path) -> str:
    if not started.exists():
        return "not started"
    try:
        host = read_json(started).get("host")
    except FmnistBookError:
        return "stopped"
    if host != socket.gethostname():
        return "running"  # another node: only its marker files tell
    return "running" if live_worker(started.parent) else "stopped"


def job_status_lines(profile: str, results_dir) -> list[str]:
    """Per study: how many jobs are done, running, queued, failed, stopped or not started; the failed ones
    with their log, the running ones with their progress when they report it."""
    from fmnist_core.pipeline.runner import profile_experiments
    lines = []
    for experiment in profile_experiments(profile):
        jobs = planned_jobs(experiment, profile, results_dir)
        if not jobs:
            continue
        slurm = _slurm_states(Path(results_dir).resolve() / profile / ".slurm" / experiment, jobs)
        states = {job.label: job_state(job, slurm.get(str(job.out_dir))) for job in jobs}
        counts = {s: list(states.values()).count(s) for s in
                  ("done", "running", "queued", "failed", "stopped", "not started")}
        lines.append(f"  {experiment} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
        lines += [_job_line(job, states[job.label]) for job in jobs if states[job.label] in ("running", "failed")]
    return lines


def _job_line(job: Job, state: str) -> str:
    if state == "failed":
        error = read_json(job.out_dir / FAILED_FILE).get("error", "") if (job.out_dir / FAILED_FILE).exists() else ""
        return f"    {job.label}: failed {error} (log: {job_log(job.out_dir)})"
    progress = job.out_dir / PROGRESS_FILE
    try:
        p = read_json(progress) if progress.exists() else None
    except FmnistBookError:
        p = None
    detail = f" step {p.get('step')}/{p.get('steps')}, eta {p.get('eta_s')} s" if isinstance(p, dict) else ""
    return f"    {job.label}: running{detail}"


def _slurm_states(folder: Path, jobs: list[Job]) -> dict[str, str]:
    """job folder -> Slurm state, for the jobs submitted to Slurm (none when Slurm cannot be asked)."""
    from fmnist_core.pipeline.slurm import read_record, slurm_states
    record = read_record(folder)
    ids = {str(j.out_dir): record[str(j.out_dir)] for j in jobs if str(j.out_dir) in record}
    try:
        states = slurm_states(sorted(set(ids.values())))
    except FmnistBookError:
        return {}
    return {folder_: states.get(slurm_id, "UNKNOWN") for folder_, slurm_id in ids.items()}
