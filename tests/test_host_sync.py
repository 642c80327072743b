"""No host synchronisation inside a training step, for every algorithm the loop runs.

A step that reads a value back (``.item()``, ``float(t)``, ``.tolist()``, ``if t:``), copies data from the host
(``torch.tensor(list)``) or asks for a size only the device knows (boolean-mask indexing, ``nonzero``,
``unique``, ``bincount``) makes the host wait for the GPU's queue: with small models that wait, not the
arithmetic, sets the step rate. On the CPU nothing waits, so the calls themselves are counted: every function
that would synchronise on CUDA is wrapped, and the count runs only while an algorithm's ``train_step`` or
``after_step`` or the loop's per-step statistics window is executing (the loop reads statistics back once per
logging interval, outside those). With CUDA present the same runs also go through
``torch.cuda.set_sync_debug_mode("error")`` inside every step after the first (which initialises the libraries),
which raises on any synchronising CUDA call.
"""
import contextlib
import functools

import pytest
import torch

from fmnist_core.core import loop
from fmnist_core.core.data import ImageDataset, make_splits
from fmnist_core.core.models import build_model
from fmnist_core.core.supervised import Supervised, fit
from fmnist_core.core.train import TrainConfig
from fmnist_core.chapters import vae
from fmnist_core.chapters.fixmatch.algorithm import FixMatch, FixMatchConfig, train_fixmatch
from fmnist_core.chapters.semisupervised import model as semisup

from conftest import patterns

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tensor methods that read values back or need a size only the device knows.
READ_BACK = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero",
             "bincount", "unique", "masked_select")
# torch functions of the same kind, and the host-to-device copies of Python data.
TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique", "bincount", "tensor")
ALGORITHMS = (FixMatch, Supervised, vae.VAETraining, semisup.SemiSupervised)


def quiet(*_):
    pass


class SyncCounter:
    """Counts the calls that synchronise with the device while :attr:`active`, by name."""

    def __init__(self):
        self.active, self.calls, self.steps = 0, [], 0

    def wrap(self, name, function):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return function(*args, **kwargs)
        return counted

    def wrap_indexing(self, name, function):
        """``t[mask]`` / ``t[mask] = v`` with a boolean tensor: the result's size needs a read-back."""
        @functools.wraps(function)
        def counted(tensor, index, *rest):
            keys = index if isinstance(index, tuple) else (index,)
            if self.active and any(torch.is_tensor(k) and k.dtype == torch.bool for k in keys):
                self.calls.append(f"{name} with a boolean mask")
            return function(tensor, index, *rest)
        return counted

    def wrap_as_tensor(self, function):
        @functools.wraps(function)
        def counted(data, *args, **kwargs):
            if self.active and not torch.is_tensor(data):
                self.calls.append("as_tensor of host data")
            return function(data, *args, **kwargs)
        return counted

    @contextlib.contextmanager
    def hot(self):
        """The body of a step: counted, and on CUDA checked by the sync debug mode."""
        self.active += 1
        # CUDA's check starts at the second step: the first one initialises cuBLAS/cuDNN and autotunes.
        debug = torch.cuda.is_available() and self.active == 1 and self.steps >= 2
        if debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
            self.active -= 1

    def step_function(self, function, counts_steps=False):
        @functools.wraps(function)
        def in_step(*args, **kwargs):
            self.steps += counts_steps
            with self.hot():
                return function(*args, **kwargs)
        return in_step


@pytest.fixture
def counter(monkeypatch):
    counter = SyncCounter()
    for name in READ_BACK:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, counter.wrap_indexing(name, getattr(torch.Tensor, name)))
    for name in TORCH_FUNCTIONS:
        monkeypatch.setattr(torch, name, counter.wrap(f"torch.{name}", getattr(torch, name)))
    monkeypatch.setattr(torch, "as_tensor", counter.wrap_as_tensor(torch.as_tensor))
    # The path that runs on CUDA: on a CPU, RandAugment groups images by operation (a read-back that costs
    # nothing there); here it is checked as a GPU runs it.
    from fmnist_core.core import randaugment
    monkeypatch.setattr(randaugment, "GROUPED_ON_CPU", False)
    for cls in ALGORITHMS:
        monkeypatch.setattr(cls, "train_step", counter.step_function(cls.train_step, counts_steps=True))
        monkeypatch.setattr(cls, "after_step", counter.step_function(cls.after_step))
    monkeypatch.setattr(loop._Window, "add", counter.step_function(loop._Window.add))
    return counter


def fashion_toy(n=200) -> ImageDataset:
    """:func:`conftest.patterns` under FixMatch's dataset name (FixMatch checks that the data is what it names)."""
    images, labels = patterns(n)
    test, test_labels = patterns(20, seed=1)
    return ImageDataset("fashion_mnist", images, labels, test, test_labels, (0.3,), (0.3,),
                        tuple(str(c) for c in range(10))).to(DEVICE)


def run_fixmatch(tmp_path, **overrides):
    base = {"backbone": "lenet_max", "steps": 3, "batch_size": 8, "mu": 2, "num_labels": 20, "log_every": 2,
            "eval_every": 0, "checkpoint_every": 2, "eval_images": 20, "device": DEVICE, "threshold": 0.2,
            "val_size": 20}
    train_fixmatch(FixMatchConfig.from_overrides(base, overrides), fashion_toy(), tmp_path, log=quiet)


def run_supervised(tmp_path):
    ds = fashion_toy()
    splits, _ = make_splits(ds, 50, 0)
    cfg = TrainConfig.from_overrides({"epochs": 1, "batch_size": 64, "device": DEVICE, "optimizer": "sgd"})
    torch.manual_seed(0)
    fit(build_model("lenet_avg", 1, 10, 28).to(DEVICE), splits.train, splits.val, cfg, tmp_path, log=quiet)


def run_vae(tmp_path):
    cfg = vae.VAEJobConfig.from_overrides({"epochs": 1, "batch_size": 50, "val_size": 50, "device": DEVICE,
                                           "channels": 4, "latent_dim": 2, "eval_batch_size": 50})
    vae.train_vae(cfg, fashion_toy(), tmp_path, log=quiet)


def run_semisup(tmp_path, model):
    cfg = semisup.SemiSupConfig.from_overrides({
        "model": model, "epochs": 1, "batch_size": 16, "val_size": 50, "num_labels": 20, "latent_dim": 4,
        "branch_channels": [4, 8], "unlabeled_ratio": 2, "device": DEVICE, "eval_batch_size": 50, "tta": 0})
    semisup.train_semisup(cfg, fashion_toy(), tmp_path, log=quiet)


RUNS = {
    "fixmatch (authors' augmentation)": run_fixmatch,
    "fixmatch (USB augmentation, zero padding)": functools.partial(
        run_fixmatch, randaugment="always", cutout="random", weak_padding="zeros"),
    "fixmatch supervised-only": functools.partial(run_fixmatch, supervised_only=True),
    "supervised": run_supervised,
    "vae": run_vae,
    "semisup_vae": functools.partial(run_semisup, model="semisup_vae"),
    "m2": functools.partial(run_semisup, model="m2"),
    "encoder_only": functools.partial(run_semisup, model="encoder_only"),
}


@pytest.mark.parametrize("name", RUNS)
def test_a_training_step_never_reads_back_from_the_device(name, counter, tmp_path):
    RUNS[name](tmp_path)
    assert counter.steps >= 3  # the steps ran under the counter
    assert counter.calls == [], f"{name}: host synchronisation inside a step: {sorted(set(counter.calls))}"


def test_the_counter_sees_read_backs_and_mask_indexing_inside_a_step_only(counter, tmp_path, monkeypatch):
    honest = FixMatch.batch_loss  # the counted train_step calls it

    def reading(self, batch):
        loss, stats = honest(self, batch)
        if stats["masked"] > 0:  # a Python branch on a device value
            pass
        batch.labels[batch.labels > 4].sum()
        return loss, {**stats, "loss_x": torch.as_tensor(stats["loss_x"].item())}

    monkeypatch.setattr(FixMatch, "batch_loss", reading)
    torch.zeros(3).tolist()  # outside a step: not counted
    run_fixmatch(tmp_path)
    assert set(counter.calls) == {"__bool__", "__getitem__ with a boolean mask", "item", "as_tensor of host data"}
    assert counter.calls.count("item") == counter.steps == 3
