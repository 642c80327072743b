"""Shared fixtures and tiny synthetic data for the test suite."""
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmnist_core.core.data import CLASS_NAMES
from fmnist_core.core.data import ImageDataset, make_splits
from fmnist_core.core.models import build_model, model_meta
from fmnist_core.core.supervised import fit
from fmnist_core.core.train import TrainConfig

CLI = [sys.executable, "-m", "fmnist_core.pipeline.cli"]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core CPU: a second intra-op thread costs more in contention than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patterns(n, seed=0, size=28, channels=1):
    """Class c (= index mod 10): a bright horizontal band at a class-specific height, plus noise (uint8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 50, (n, channels, size, size), generator=g, dtype=torch.uint8)
    for c in range(10):
        images[labels == c, :, 2 * c + 2:2 * c + 6] += 200
    return images, labels


def toy_dataset(n_train=200, n_test=20, name="toy"):
    """A 10-class :class:`ImageDataset` of :func:`patterns`, train and test drawn with different seeds."""
    train, train_labels = patterns(n_train)
    test, test_labels = patterns(n_test, seed=1)
    return ImageDataset(name, train, train_labels, test, test_labels, (0.3,), (0.3,),
                        tuple(str(c) for c in range(10)))


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The whole smoke book, built once from real runs: (results/smoke, html folder, build output).

    Tests that damage runs work on a copy of these results, never on them.
    """
    base = tmp_path_factory.mktemp("smoke")
    results, output = base / "results", base / "build"
    # FMNIST_TRACE_PARAMS: each run also records the parameters it never read and the other runs it read.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FMNIST_TRACE_PARAMS": "1"}
    build = subprocess.run(CLI + ["--results-dir", str(results), "build", "--profile", "smoke",
                                  "--output-dir", str(output)], capture_output=True, text=True, env=env)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return results / "smoke", output / "_build" / "html", build.stdout


@pytest.fixture
def smoke_copy(smoke_book, tmp_path) -> Path:
    """A private copy of the smoke runs (a results folder holding ``smoke/``), safe to damage."""
    results = tmp_path / "results"
    shutil.copytree(smoke_book[0], results / "smoke", ignore=shutil.ignore_patterns(".*.lock"))
    return results


def visible_text(page: str) -> str:
    """The page's text as a reader sees it (code is split into tagged words in the HTML)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.fixture(scope="session")
def toy_fashion_dataset():
    """200 training and 30 test images of :func:`patterns`, named with Fashion-MNIST's classes."""
    train, train_labels = patterns(200)
    test, test_labels = patterns(30, seed=1)
    return ImageDataset("toy", train, train_labels, test, test_labels, (0.3,), (0.3,), CLASS_NAMES)


@pytest.fixture(scope="session")
def lenet_run_dir(tmp_path_factory, toy_fashion_dataset):
    """A finished classification run, ``run/models/lenet_avg/best.pt``: one epoch on the toy data."""
    run = tmp_path_factory.mktemp("run")
    splits, _ = make_splits(toy_fashion_dataset, 50, 0)
    cfg = TrainConfig.from_overrides({"epochs": 1, "batch_size": 32, "lr": 3e-3, "device": "cpu"})
    torch.manual_seed(0)
    model = build_model("lenet_avg", in_channels=1, image_size=28, num_classes=10)
    fit(model, splits.train, splits.val, cfg, run / "models" / "lenet_avg",
        meta=model_meta("lenet_avg", toy_fashion_dataset), log=lambda *_: None)
    return run
