"""The one training loop (core/loop.py) and supervised training on it: it learns, checkpoints, resumes exactly,
stops on a non-finite loss naming the interval, and keeps only what readers need when it has finished."""
import math
import os

import pytest
import torch

from fmnist_core.core.errors import ConfigError, FmnistBookError, RunError
from fmnist_core.core.io import load_checkpoint, save_checkpoint
from fmnist_core.core.models import build_model
from fmnist_core.core.data import Split
from fmnist_core.core import loop
from fmnist_core.core.loop import Algorithm, Plan
from fmnist_core.core.supervised import fit
from fmnist_core.core.config import Config, trace_reads
from fmnist_core.core.train import (OptimizerConfig, TrainConfig, configure_numerics, evaluate, lr_factor,
                                    make_optimizer, prepare_model)


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
    for name in ("best.pt", "final.pt", "history.json", "history.csv"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "last.pt").exists()  # resume state (optimiser moments, RNG) is dropped when done
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
        original = loop.Checkpointer.save_last

        def save_then_die(self, **state):
            original(self, **state)
            if state["step"] == stop_after * 7:  # 7 steps per epoch: 200 images at 32
                raise KeyboardInterrupt
        loop.Checkpointer.save_last = save_then_die
        try:
            with pytest.raises(KeyboardInterrupt):
                fit(model, toy_split(), toy_split(seed=1), cfg, out, log=logs.append)
        finally:
            loop.Checkpointer.save_last = original

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

    with pytest.raises(RunError, match=r"exploding: loss is nan in steps 1-7, epoch 1;"):
        fit(Exploding(), toy_split(), toy_split(), config(), tmp_path, log=lambda *_: None, name="exploding")
    assert not (tmp_path / "best.pt").exists()


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 100, 0.0),
    ("step", 49, 1.0), ("step", 50, 0.1), ("constant", 99, 1.0),
    ("fixmatch", 0, 1.0), ("fixmatch", 100, math.cos(7 * math.pi / 16))])
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

    with pytest.raises(RunError, match=r"turns: loss is nan in steps 8-14, epoch 2;"):
        fit(TurnsNaN(), toy_split(), toy_split(seed=1), config(), tmp_path, log=lambda *_: None, name="turns")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["step"] == 7 and all(torch.isfinite(v).all() for v in last["model"].values())


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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_speed_options_are_read_on_every_device_and_act_on_cuda_only(optimizer):
    traced_before = "__getattribute__" in Config.__dict__
    trace_reads(True)
    try:
        cfg = config(optimizer=optimizer, fused=True, compile=True, compile_mode="reduce-overhead", device="cpu")
        model = torch.nn.Linear(3, 2)
        raw, runnable = prepare_model(model, cfg, torch.device("cpu"))
        opt = make_optimizer(raw, cfg)
        assert {"fused", "compile", "compile_mode", "channels_last"} <= cfg.fields_read()
    finally:
        trace_reads(traced_before)
    assert runnable is raw  # no compilation on the CPU
    assert not opt.defaults.get("fused")  # the CPU keeps the standard implementation
    if torch.cuda.is_available():
        on_gpu = make_optimizer(torch.nn.Linear(3, 2).cuda(), cfg)
        assert on_gpu.defaults["fused"]
        assert not make_optimizer(torch.nn.Linear(3, 2).cuda(), config(optimizer=optimizer, fused=False)).defaults.get(
            "fused")
    with pytest.raises(ConfigError, match="compile_mode"):
        config(compile_mode="fastest")


class Counting(Algorithm):
    """A one-parameter model pulled towards 1; counts after-step calls; evaluates to its step count."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1, bias=False)
        self.after, self.evaluations = 0, 0

    def train_step(self, step, generator):
        loss = (self.model.weight - 1).pow(2).sum()
        return loss, {"noise": torch.rand((), generator=generator)}

    def after_step(self, step):
        self.after += 1

    def evaluate(self):
        self.evaluations += 1
        return {"val_score": float(self.after)}


def test_step_plans_record_evaluate_and_checkpoint_at_their_intervals(tmp_path):
    algo, saved = Counting(), []
    original = loop.Checkpointer.save_last

    def spy(self, **state):
        saved.append(state["step"])
        original(self, **state)
    loop.Checkpointer.save_last = spy
    try:
        history = loop.train(algo, Plan(steps=10, log_every=3, eval_every=4, checkpoint_every=5),
                             OptimizerConfig.from_overrides({"optimizer": "sgd", "lr": 0.1}), "constant", 0,
                             tmp_path, {"name": "counting"}, log=lambda *_: None)
    finally:
        loop.Checkpointer.save_last = original
    assert [r["step"] for r in history] == [3, 4, 6, 8, 9, 10]
    assert [r["step"] for r in history if "val_score" in r] == [4, 8, 10] and algo.evaluations == 3
    assert saved == [5, 10] and algo.after == 10
    assert "epoch" not in history[0] and 0 <= history[0]["train_noise"] <= 1
    # Without a selection, best.pt holds the final evaluated weights; the resume state is gone.
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 10 and torch.equal(best["model"]["weight"], algo.model.weight.detach())
    assert not (tmp_path / "last.pt").exists()


def test_statistics_are_means_over_their_interval(tmp_path):
    class Constant(Counting):
        def train_step(self, step, generator):
            loss = (self.model.weight - 1).pow(2).sum()
            return loss, {"step_number": torch.tensor(float(step))}

    history = loop.train(Constant(), Plan(steps=6, log_every=3), OptimizerConfig.from_overrides({"lr": 0.1}),
                         "cosine", 0, tmp_path, {}, log=lambda *_: None)
    assert [r["train_step_number"] for r in history] == [1.0, 4.0]  # (0+1+2)/3, (3+4+5)/3


# ------------------------------------------------------------------------------------ precision
def test_auto_precision_follows_the_cpu_and_the_network(monkeypatch):
    from fmnist_core.core import train as t
    monkeypatch.setattr(t, "cpu_bf16_support", lambda: "avx512_bf16")
    assert t.resolve_dtype("auto", "cpu", "mycnn") == "bfloat16"
    assert t.resolve_dtype("auto", "cpu", "mlp") == "float32"  # measured slower in bf16
    assert t.resolve_dtype("float32", "cpu", "mycnn") == "float32"  # an explicit choice is kept
    assert t.resolve_dtype("bfloat16", "cpu", "mlp") == "bfloat16"
    monkeypatch.setattr(t, "cpu_bf16_support", lambda: None)  # a laptop without bf16 units
    assert t.resolve_dtype("auto", "cpu", "mycnn") == "float32"
    record = t.precision_record("classification", {"dtype": "auto", "models": ["mlp", "mycnn"],
                                                   "budget_limited": ["mycnn"]}, "cpu")
    assert record == {"dtype": "auto", "cpu_bf16": None, "networks": {"mlp": "float32", "mycnn": "float32"}}
    assert t.describe_precision(record) == "dtype auto: float32 for mlp, mycnn (CPU bf16 units: none)"


def test_bf16_autocast_on_the_cpu_keeps_losses_and_weights_in_float32():
    from fmnist_core.core.train import autocast_context, prepare_model, RuntimeConfig
    model = build_model("lenet_avg")
    cfg = RuntimeConfig.from_overrides({"device": "cpu"})
    raw, runnable = prepare_model(model, cfg, torch.device("cpu"), "bfloat16")
    assert raw.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    with autocast_context(torch.device("cpu"), "bfloat16"):
        logits = runnable(torch.rand(4, 1, 28, 28))
    assert logits.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in raw.parameters())
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.arange(4))
    loss.backward()
    assert loss.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in raw.parameters())
