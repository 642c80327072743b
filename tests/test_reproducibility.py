"""Bit-identical re-runs: ``fmnist-book verify`` re-runs every smoke experiment from its record and finds
every value of ``metrics.json`` identical; a changed value is reported by name; results are left untouched."""
import dataclasses
import hashlib
import subprocess

import pytest

from fmnist_core.core.train import cpu_bf16_support
from fmnist_core.pipeline import cli
from fmnist_core.pipeline.experiments import EXPERIMENTS
from fmnist_core.core.io import read_json, write_json
from fmnist_core.pipeline.verify import compare, format_comparison

from conftest import CLI


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.slow
def test_every_smoke_experiment_reproduces_bit_for_bit(smoke_book):
    results = smoke_book[0]
    before = snapshot(results)
    verify = subprocess.run(CLI + ["verify", str(results)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout[-4000:] + verify.stderr[-2000:]
    for name in EXPERIMENTS:
        assert f"{name}: compared exactly (bit for bit)" in verify.stdout
    assert verify.stdout.count("  REPRODUCED: ") == len(EXPERIMENTS)
    # The precision is named; where the CPU has bf16 units, the bf16 autocast runs repeat bit for bit too.
    assert verify.stdout.count("  precision: dtype ") == len(EXPERIMENTS)
    with_dtype = [n for n, e in EXPERIMENTS.items() if "dtype" in {f.name for f in dataclasses.fields(e.config)}]
    assert len(with_dtype) >= 4 and verify.stdout.count("  precision: dtype auto") == len(with_dtype)
    if cpu_bf16_support():
        assert "bf16 autocast for" in verify.stdout
    assert "DIFF" not in verify.stdout
    assert snapshot(results) == before  # verifying changes nothing under results/


@pytest.mark.slow
def test_a_changed_number_is_reported_by_name(smoke_copy, capsys):
    metrics_path = smoke_copy / "smoke" / "dataset" / "metrics.json"
    metrics = read_json(metrics_path)
    metrics["summary"][0]["pca_2d_variance"] += 1e-12
    write_json(metrics_path, metrics)
    code = cli.main(["--results-dir", str(smoke_copy), "verify", str(smoke_copy / "smoke" / "dataset")])
    out, err = capsys.readouterr()
    assert code == 1 and "not reproduced: dataset" in err
    assert "DIFF metrics.json summary[0].pca_2d_variance" in out and "NOT REPRODUCED" in out


def test_compare_is_exact_on_the_cpu_and_tolerant_on_cuda():
    recorded = {"accuracy": 0.9, "confusion": [[5, 1]], "summary": [{"run": "lenet", "accuracy": 0.9}]}
    rerun = {"accuracy": 0.9 + 1e-9, "confusion": [[5, 1]], "summary": [{"run": "lenet", "accuracy": 0.9}]}
    exact = compare("classification", recorded, rerun, exact=True)
    assert not exact.reproduced and exact.mismatches == [("accuracy", 0.9, 0.9 + 1e-9)]
    assert compare("classification", recorded, rerun, exact=False).reproduced
    far = {**rerun, "accuracy": 0.5}
    assert not compare("classification", recorded, far, exact=False).reproduced
    missing = compare("classification", recorded, {"summary": recorded["summary"]}, exact=True)
    assert ("confusion[0][0]", 5, "<missing>") in missing.mismatches
    report = format_comparison(exact)
    assert "ok   lenet accuracy: recorded 0.9, re-run 0.9" in report and "NOT REPRODUCED: 4 of 5" in report


def test_verify_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 2
    assert "not a finished run (no env.json)" in capsys.readouterr().err
