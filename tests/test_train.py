"""The shared training loop: it learns, checkpoints, resumes exactly, and stops on a non-finite loss."""
import math
import os

import pytest
import torch

from fmnist_core.core.errors import FmnistBookError, RunError
from fmnist_core.core.io import load_checkpoint, save_checkpoint
from fmnist_core.core.models import build_model
from fmnist_core.core.data import Split
from fmnist_core.core.train import TrainConfig, configure_numerics, evaluate, fit, lr_factor


def toy_split(n=200, seed=0):
    """Class 0: bright top half; class 1: bright bottom half; noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[labels == 0, :, :14] += 150
    images[labels == 1, :, 14:] += 150
    return Split(images, labels, (0.3,), (0.3,))


def config(**overrides):
    return TrainConfig.from_overrides({"epochs": 2, "batch_size": 32, "lr": 3e-3, "augment": True}, overrides)


def test_fit_learns_and_writes_history_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet_avg")
    before = evaluate(model, toy_split(seed=1))
    history = fit(model, toy_split(), toy_split(seed=1), config(epochs=3), tmp_path, log=lambda *_: None)
    after = evaluate(model, toy_split(seed=1))
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.9
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert {"lr", "train_loss", "val_accuracy", "seconds"} <= set(history[0])
    for name in ("best.pt", "last.pt", "history.json", "history.csv"):
        assert (tmp_path / name).exists()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["record"]["val_accuracy"] == max(r["val_accuracy"] for r in history)


def test_resume_from_mid_run_checkpoint_is_bit_identical(tmp_path):
    logs = []

    def run(out, epochs, stop_after=None):
        torch.manual_seed(0)
        model = build_model("mycnn")
        cfg = config(epochs=epochs)
        if stop_after is None:
            return model, fit(model, toy_split(), toy_split(seed=1), cfg, out, log=logs.append)
        # Interrupt: the loop raises when epoch `stop_after` has been checkpointed.
        import fmnist_core.core.train as train_module
        original = train_module.Checkpointer.save_last

        def save_then_die(self, **state):
            original(self, **state)
            if state["epoch"] == stop_after:
                raise KeyboardInterrupt
        train_module.Checkpointer.save_last = save_then_die
        try:
            with pytest.raises(KeyboardInterrupt):
                fit(model, toy_split(), toy_split(seed=1), cfg, out, log=logs.append)
        finally:
            train_module.Checkpointer.save_last = original

    full_model, full_history = run(tmp_path / "full", 3)
    run(tmp_path / "killed", 3, stop_after=1)
    resumed_model, resumed_history = run(tmp_path / "killed", 3)
    assert any("resuming" in line for line in logs)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full_history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed_history] == strip
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_changed_config_does_not_resume(tmp_path):
    torch.manual_seed(0)
    fit(build_model("mlp"), toy_split(), toy_split(seed=1), config(epochs=1), tmp_path, log=lambda *_: None)
    logs = []
    fit(build_model("mlp"), toy_split(), toy_split(seed=1), config(epochs=1, lr=1e-3), tmp_path, log=logs.append)
    assert not any("resuming" in line for line in logs)


def test_non_finite_loss_stops_with_the_step_named(tmp_path):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(784, 2)

        def forward(self, x):
            return self.fc(x.flatten(1)) * float("nan")

    with pytest.raises(RunError, match=r"exploding, epoch 1, step 0: loss is nan"):
        fit(Exploding(), toy_split(), toy_split(), config(), tmp_path, log=lambda *_: None, name="exploding")
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
    ("step", 49, 1.0), ("step", 50, 0.1), ("constant", 99, 1.0)])
def test_lr_factor(schedule, step, expected):
    assert math.isclose(lr_factor(schedule, step, 100), expected, abs_tol=1e-12)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(FmnistBookError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_checkpoints_refuse_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Split}, path)  # a class reference would need unpickling code: weights_only refuses
    with pytest.raises(FmnistBookError, match="evil.pt"):
        load_checkpoint(path)


def test_a_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path):
    class TurnsNaN(torch.nn.Module):
        """Finite for the first 7 batches (one epoch of 200 images at 32), NaN after."""

        def __init__(self):
            super().__init__()
            self.fc, self.calls = torch.nn.Linear(784, 2), 0

        def forward(self, x):
            self.calls += self.training
            return self.fc(x.flatten(1)) * (float("nan") if self.calls > 7 else 1.0)

    with pytest.raises(RunError, match=r"turns, epoch 2, step 0: loss is nan"):
        fit(TurnsNaN(), toy_split(), toy_split(seed=1), config(), tmp_path, log=lambda *_: None, name="turns")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_deterministic_mode_sets_the_cuda_switches_and_speed_mode_clears_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    try:
        assert configure_numerics(torch.device("cpu"), True) == "cpu"
        assert not torch.are_deterministic_algorithms_enabled()  # the CPU path needs no switch
        assert configure_numerics(torch.device("cuda"), True) == "deterministic"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert configure_numerics(torch.device("cuda"), False) == "speed"
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]
