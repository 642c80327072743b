"""The Slurm executor: each study's unfinished jobs as one job array, submitted through submitit.

Each array task runs one planned job in a fresh process (:func:`fmnist_core.pipeline.executors.run_worker`).
On preemption or when its time limit nears, Slurm signals the task; submitit then calls
:meth:`SlurmTask.checkpoint`, which requeues the same task: the job resumes from its last checkpoint
(``last.pt``, written every ``checkpoint_every`` steps). Submissions are recorded per study in
``results/<profile>/.slurm/<study>/submitted.json`` (job folder -> Slurm job id), beside submitit's own files
and the tasks' Slurm logs; running the same command again waits for the recorded jobs still in the queue and
submits only the unfinished jobs that are not. ``sacct`` (Slurm's accounting) tells how a job ended.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmnist_core.core.errors import ConfigError, RunError
from fmnist_core.core.io import read_json, write_json
from fmnist_core.core.jobs import Job
from fmnist_core.pipeline.workers import JobFailure, failure_reason, job_log, run_worker, slurm_threads, worker_env

RECORD = "submitted.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "PREEMPTED"}


@dataclass
class SlurmOptions:
    """What each array task asks Slurm for (``--slurm-*`` options)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    mem: str | None = None
    time: int = 24 * 60
    max_parallel: int = 256
    account: str | None = None
    qos: str | None = None
    setup: list[str] = field(default_factory=list)

    def parameters(self, study: str) -> dict:
        """submitit's ``SlurmExecutor.update_parameters`` for the array of ``study``."""
        params = {"job_name": f"fmnist-{study}", "time": self.time, "cpus_per_task": self.cpus_per_job,
                  "array_parallelism": self.max_parallel, "setup": list(self.setup), "ntasks_per_node": 1}
        optional = {"partition": self.partition, "mem": self.mem, "account": self.account, "qos": self.qos,
                    "gpus_per_node": self.gpus_per_job or None}
        return {**params, **{k: v for k, v in optional.items() if v is not None}}


def add_slurm_options(group) -> None:
    """The ``--slurm-*`` options of ``run`` and ``build``."""
    group.add_argument("--slurm-partition", default=None, help="slurm: partition")
    group.add_argument("--slurm-gpus-per-job", type=int, default=0, help="slurm: GPUs of each job (default 0)")
    group.add_argument("--slurm-cpus-per-job", type=int, default=1, help="slurm: CPUs of each job (default 1)")
    group.add_argument("--slurm-mem", default=None, help="slurm: memory of each job, e.g. 16G")
    group.add_argument("--slurm-time", type=int, default=24 * 60,
                       help="slurm: time limit of each job in minutes; at the limit it is requeued and resumes")
    group.add_argument("--slurm-max-parallel", type=int, default=256, help="slurm: array tasks running at once")
    group.add_argument("--slurm-account", default=None, help="slurm: account")
    group.add_argument("--slurm-qos", default=None, help="slurm: quality of service")
    group.add_argument("--slurm-setup", action="append", default=[],
                       help="slurm: a shell line run before each job, e.g. 'module load cuda' (repeatable)")


def options_from_args(args) -> SlurmOptions:
    """:class:`SlurmOptions` from parsed ``--slurm-*`` options, checked."""
    for name in ("gpus_per_job", "cpus_per_job", "time", "max_parallel"):
        value = getattr(args, f"slurm_{name}")
        if value < (0 if name == "gpus_per_job" else 1):
            raise ConfigError(f"--slurm-{name.replace('_', '-')} must be positive, got {value}")
    return SlurmOptions(args.slurm_partition, args.slurm_gpus_per_job, args.slurm_cpus_per_job, args.slurm_mem,
                        args.slurm_time, args.slurm_max_parallel, args.slurm_account, args.slurm_qos,
                        list(args.slurm_setup))


class SlurmTask:
    """What an array task runs: one planned job, in a fresh process; requeued on preemption or time-out."""

    def __call__(self, job_dir: str) -> str:
        run_worker(job_dir, threads=slurm_threads())  # as many CPU threads as CPUs given (--slurm-cpus-per-job)
        return job_dir

    def checkpoint(self, job_dir: str):
        """Called by submitit when Slurm preempts the task or its time runs out: requeue the same task (the
        job's own ``last.pt`` holds where it was)."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, job_dir)


# --------------------------------------------------------------------------------------- job states
def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RunError(f"cannot run {command[0]}: {err}") from None
    if done.returncode != 0:
        raise RunError(f"{' '.join(command[:2])} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm job id (``<array>_<task>``) -> state, from ``squeue`` (queued and running) and ``sacct`` (ended)."""
    if not job_ids:
        return {}
    states = {}
    for line in _run(["squeue", "-h", "-r", "-o", "%i|%T"]).splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = state.strip()
    ended = [j for j in job_ids if j not in states]
    if ended:
        for line in _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ended)]).splitlines():
            job_id, _, state = line.partition("|")
            states.setdefault(job_id.strip(), state.split()[0] if state else "UNKNOWN")
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def read_record(folder: Path) -> dict[str, str]:
    """job folder -> Slurm job id of the study whose submitit files are in ``folder``."""
    try:
        return read_json(folder / RECORD) if (folder / RECORD).exists() else {}
    except RunError:
        return {}


# ---------------------------------------------------------------------------------------- executor
class SlurmExecutor:
    """One job array per study through submitit; waits for the jobs, naming those that fail."""

    name = "slurm"

    def __init__(self, options: SlurmOptions, state_dir: Path, reattach: str = "the same command", poll_s=1.0):
        self.options, self.state_dir, self.reattach, self.poll_s = options, Path(state_dir), reattach, poll_s

    def run(self, studies: dict[str, list[Job]], log=print) -> list[JobFailure]:
        """Submit (or re-attach to) the jobs of ``studies``, wait for them; the failures."""
        handles = {}  # job folder -> (study, job, slurm id)
        for study, jobs in studies.items():
            handles.update(self._submit_study(study, jobs, log))
        try:
            return self._wait(handles, log)
        except KeyboardInterrupt:
            ids = sorted({h[2].split("_")[0] for h in handles.values()})
            log(f"interrupted: the submitted Slurm jobs keep running ({', '.join(ids)}). Re-attach with: "
                f"{self.reattach}  (it waits for them and submits only unfinished jobs); see them with "
                f"`fmnist-book status`; stop them with `scancel {' '.join(ids)}`")
            raise

    def _submit_study(self, study: str, jobs: list[Job], log) -> dict:
        folder = self.state_dir / study
        folder.mkdir(parents=True, exist_ok=True)
        record = read_record(folder)
        known = [record[str(j.out_dir)] for j in jobs if str(j.out_dir) in record]
        states = slurm_states(known)
        attach = [j for j in jobs if states.get(record.get(str(j.out_dir)), "") in ACTIVE]
        submit = [j for j in jobs if j not in attach]
        if attach:
            log(f"  {study}: waiting for {len(attach)} job(s) already in the queue")
        if submit:
            ids = self._submit(folder, study, submit)
            record.update({str(j.out_dir): i for j, i in zip(submit, ids)})
            write_json(folder / RECORD, record)
            log(f"  {study}: submitted {len(submit)} job(s) as array {ids[0].split('_')[0]} (logs beside each job "
                f"folder, Slurm's in {folder})")
        return {str(j.out_dir): (study, j, record[str(j.out_dir)]) for j in jobs}

    def _submit(self, folder: Path, study: str, jobs: list[Job]) -> list[str]:
        try:
            import submitit
        except ImportError:
            raise RunError("--executor slurm needs submitit: pip install 'fmnist-book[slurm]'") from None
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
        executor.update_parameters(**self.options.parameters(study))
        saved = dict(os.environ)
        os.environ.update(worker_env())  # sbatch passes this environment on: the tasks import this project
        try:
            submitted = executor.map_array(SlurmTask(), [str(j.out_dir) for j in jobs])
        except Exception as err:  # submitit's own errors (sbatch refused the array...)
            raise RunError(f"submitting the {study} jobs failed: {err}") from None
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return [s.job_id for s in submitted]

    def _states(self, job_ids: list[str], log) -> dict[str, str]:
        """:func:`slurm_states`, asked again for a few minutes while Slurm does not answer."""
        for attempt in range(int(300 / self.poll_s)):
            try:
                return slurm_states(job_ids)
            except RunError as err:
                if attempt == 0:
                    log(f"  Slurm does not answer ({err}); asking again")
                time.sleep(self.poll_s)
        raise RunError("Slurm did not answer for 5 minutes; the submitted jobs may still run: "
                       f"re-attach with {self.reattach}")

    def _wait(self, handles: dict, log) -> list[JobFailure]:
        pending, failures, gone, total = dict(handles), [], set(), len(handles)
        while pending:
            states = self._states([h[2] for h in pending.values()], log)
            for key, (study, job, slurm_id) in list(pending.items()):
                state = states[slurm_id]
                if job.finished():
                    log(f"  [{total - len(pending) + 1}/{total}] {study}/{job.label}: done (Slurm job {slurm_id})")
                elif state in ACTIVE:
                    continue
                elif state == "UNKNOWN" and key not in gone:  # not yet in the accounting: look once more
                    gone.add(key)
                    continue
                else:
                    failures.append(self._failure(study, job, slurm_id, state))
                    log(f"  [{total - len(pending) + 1}/{total}] {failures[-1].describe()}")
                del pending[key]
            if pending:
                time.sleep(self.poll_s)
        return failures

    def _failure(self, study: str, job: Job, slurm_id: str, state: str) -> JobFailure:
        slurm_log = self.state_dir / study / f"{slurm_id}_0_log.err"
        reason = failure_reason(job.out_dir, f"Slurm job {slurm_id} ended {state}")
        return JobFailure(study, job.label, job.out_dir, job_log(job.out_dir),
                          f"{reason} [Slurm job {slurm_id}, {state}; Slurm's log {slurm_log}]")

