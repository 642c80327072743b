"""Jobs, the unit of work: skipped when finished with the same key, restarted cleanly when the key changed,
runnable alone in a fresh process with byte-identical results."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fmnist_core.chapters.classification import ClassificationConfig, plan_jobs
from fmnist_core.core.config import Config, param
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.jobs import Job, get_kind, job_kind, load_job, run_job, source_hashes

CALLS = []


@dataclass
class ToyConfig(Config):
    seed: int = param(0, "seed")
    size: int = param(3, "numbers drawn")


@job_kind("toy", ToyConfig)
def run_toy(cfg, out_dir, log=print):
    CALLS.append(cfg.seed)
    (Path(out_dir) / "last.pt").write_text("resume state")
    return {"draws": torch.rand(cfg.size, generator=torch.Generator().manual_seed(cfg.seed)).tolist()}


def test_a_finished_job_is_skipped_and_a_changed_one_starts_afresh(tmp_path):
    CALLS.clear()
    first = run_job(Job("toy", ToyConfig(), tmp_path / "job"), log=lambda *_: None)
    assert run_job(Job("toy", ToyConfig(), tmp_path / "job")) == first and CALLS == [0]
    for name in ("job.json", "metrics.json", "done.json"):
        assert (tmp_path / "job" / name).exists()
    (tmp_path / "job" / "stale.pt").write_text("checkpoint of the old config")
    changed = run_job(Job("toy", ToyConfig(seed=1), tmp_path / "job"))
    assert changed != first and CALLS == [0, 1] and not (tmp_path / "job" / "stale.pt").exists()


def test_an_interrupted_job_is_run_again(tmp_path):
    CALLS.clear()
    job = Job("toy", ToyConfig(), tmp_path / "job")
    run_job(job)
    (tmp_path / "job" / "done.json").unlink()  # killed before it was marked done
    assert not job.finished()
    run_job(job)
    assert CALLS == [0, 0] and job.finished()


def test_unknown_kinds_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown job kind 'nope'"):
        get_kind("nope")


def test_a_job_key_covers_the_source_its_kind_uses():
    sources = source_hashes(["fmnist_core.chapters.classification"])
    assert {"fmnist_core/core/loop.py", "fmnist_core/core/supervised.py", "fmnist_core/core/data.py"} <= set(sources)
    assert not any("vae" in path or "fixmatch" in path for path in sources)


def fresh_process(job_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-m", "fmnist_core.core.jobs", str(job_dir)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_classification_job_gives_the_same_bytes_in_a_fresh_process(tmp_path):
    cfg = ClassificationConfig.from_overrides({
        "models": ["mlp"], "sgd_model": "", "epochs": 1, "train_images": 200, "val_size": 100,
        "test_images": 100, "latency_repeats": 1, "throughput_batch": 8, "device": "cpu"})
    [job] = plan_jobs(cfg, tmp_path / "inline")
    run_job(job, log=lambda *_: None)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(job.out_dir / "job.json", alone / "job.json")
    done = fresh_process(alone)
    assert done.returncode == 0, done.stderr
    assert (alone / "metrics.json").read_bytes() == (job.out_dir / "metrics.json").read_bytes()
    assert load_job(alone).key() == job.key()
    assert sorted(p.name for p in job.out_dir.iterdir() if p.suffix == ".pt") == ["best.pt", "final.pt"]


def test_a_job_folder_with_a_broken_description_is_named(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"kind": "classifier", "module": "fmnist_core.chapters.classification",
                                                   "config": {"epochs": "many"}}))
    done = fresh_process(tmp_path)
    assert done.returncode == 1 and "job.json" in done.stderr and "epochs" in done.stderr
