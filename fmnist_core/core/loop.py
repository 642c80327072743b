"""The one training loop of the book: step-based, resumable, with per-algorithm ``train_step``.

Every chapter's training is an :class:`Algorithm` (as in USB, microsoft/Semi-supervised-learning): a small
object that owns its model(s) and data streams and whose :meth:`Algorithm.train_step` returns the loss to
minimise and a dict of statistics. :func:`train` runs any of them: seeding, optimiser and schedule, the
update (zero_grad, backward, step, schedule), the after-step hook (FixMatch's EMA), history records,
evaluation, checkpoints and resume. Epochs are a derived unit (``steps_per_epoch``); intervals are in steps.

Statistics are summed on the device and read back once per interval (no host synchronisation in a step);
the NaN/Inf stop checks the summed loss at each interval boundary and names the interval, before any
evaluation or checkpoint, so the last good checkpoint survives.

Files of a job folder:

* ``last.pt``: everything needed to resume (weights, optimiser, schedule, RNG states, history, the open
  statistics window, the algorithm's own state); removed when the run finishes;
* ``best.pt``: the selected weights (best on validation, or the final evaluated weights when no
  selection is given) with the step, epoch and history record that chose them;
* ``final.pt``: the final weights of the trained model;
* ``history.json`` / ``history.csv`` (and TensorBoard events when it is installed).
* ``progress.json``: the step, the statistics and the time left, for the command's progress display
  (:mod:`fmnist_core.core.progress`);
* ``stopped.json``: only when a deadline (:mod:`fmnist_core.core.deadline`) stopped the run early, at a history
  record (then also an evaluation and a checkpoint): its steps done and planned; ``last.pt`` is kept then.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fmnist_core.core import deadline as deadlines
from fmnist_core.core.data import make_generator
from fmnist_core.core.errors import FmnistBookError, RunError
from fmnist_core.core.io import load_checkpoint, save_checkpoint, write_bytes_atomic, write_json
from fmnist_core.core.progress import ProgressFile
from fmnist_core.core.train import OptimizerConfig, lr_factor, make_optimizer


class Algorithm:
    """A training method run by :func:`train`.

    Subclasses set ``model`` (the uncompiled module whose parameters are optimised and checkpointed) and
    implement :meth:`train_step`; the other methods have defaults.
    """

    model: torch.nn.Module

    def train_step(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Forward pass of optimiser step ``step`` (0-based): ``(loss, stats)``.

        ``loss`` is minimised; ``stats`` maps names to 0-dim tensors (on the device, detached) that are
        summed over the steps of an interval and turned into a history record by :meth:`summarize`.
        Every random draw goes through ``generator`` (or the global generator, for dropout).
        """
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (e.g. an EMA update)."""

    def summarize(self, sums: dict, steps: int) -> dict:
        """History fields from the statistics summed over ``steps`` steps: their means, by default."""
        return {f"train_{k}": v / steps for k, v in sums.items()}

    def evaluate(self) -> dict:
        """Evaluation fields of a history record (validation statistics, say); none by default."""
        return {}

    def evaluated_model(self) -> torch.nn.Module:
        """The model that :meth:`evaluate` judges and ``best.pt`` stores (the EMA model in FixMatch)."""
        return self.model

    def state_dict(self) -> dict:
        """Resumable state besides the model, optimiser, schedule and RNGs (e.g. EMA weights)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass
class Plan:
    """How long a run is and when it records, evaluates and checkpoints (all in optimiser steps).

    ``log_every`` steps make a history record (with the statistics of those steps); ``eval_every`` steps
    (0 = only at the end) add :meth:`Algorithm.evaluate`'s fields to that step's record; ``checkpoint_every``
    steps write ``last.pt``. The last step does all three. ``steps_per_epoch`` only labels records with
    an ``epoch``; ``selection`` chooses ``best.pt`` among evaluations.
    """

    steps: int
    log_every: int
    eval_every: int = 0
    checkpoint_every: int = 0
    steps_per_epoch: int = 0
    selection: "Selection | None" = None

    @classmethod
    def epochs(cls, epochs: int, steps_per_epoch: int, selection: "Selection | None" = None) -> "Plan":
        """One record, evaluation and checkpoint per epoch."""
        return cls(epochs * steps_per_epoch, steps_per_epoch, steps_per_epoch, steps_per_epoch, steps_per_epoch,
                   selection)

    def boundary(self, done: int) -> tuple[bool, bool, bool]:
        """(record, evaluate, checkpoint) after ``done`` steps."""
        last = done == self.steps
        evaluate = last or (self.eval_every > 0 and done % self.eval_every == 0)
        record = last or evaluate or done % self.log_every == 0
        checkpoint = last or (self.checkpoint_every > 0 and done % self.checkpoint_every == 0)
        return record, evaluate, checkpoint

    def epoch(self, done: int):
        if not self.steps_per_epoch:
            return None
        return done // self.steps_per_epoch if done % self.steps_per_epoch == 0 else done / self.steps_per_epoch


@dataclass
class Selection:
    """Which evaluation chooses ``best.pt``: e.g. the highest ``val_accuracy`` or the lowest ``val_loss``."""

    key: str = "val_accuracy"
    higher_is_better: bool = True

    def improves(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


# ------------------------------------------------------------------------------------------ history
class History:
    """History records, written as ``history.json`` and ``history.csv`` (and TensorBoard if installed)."""

    def __init__(self, out_dir: Path, records: list[dict] | None = None):
        self.out_dir, self.records = Path(out_dir), list(records or [])
        self._writer = _tensorboard_writer(self.out_dir / "tensorboard")

    def append(self, record: dict) -> None:
        self.records.append(record)
        write_json(self.out_dir / "history.json", self.records)
        write_bytes_atomic(self.out_dir / "history.csv", _to_csv(self.records))
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()


def _to_csv(records: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


# ------------------------------------------------------------------------------------------ checkpoints
class Checkpointer:
    """``last.pt`` (resume state), ``best.pt`` (selected weights) and ``final.pt`` (final weights) of a job."""

    def __init__(self, out_dir: Path, config: dict):
        self.out_dir, self.config = Path(out_dir), config
        self.saved: dict[str, int] = {}  # file name -> step of the weights this process saved there

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    def resume_state(self) -> dict | None:
        """The last checkpoint if it was made with the same configuration, else ``None`` (start afresh)."""
        if not self.last_path.exists():
            return None
        try:
            state = load_checkpoint(self.last_path)
        except FmnistBookError as err:
            raise RunError(f"{err}; delete it to train this model afresh (or re-run with --force)") from None
        return state if state.get("config") == self.config else None

    def save_last(self, **state) -> None:
        save_checkpoint(self.last_path, {"config": self.config, **state})

    def save_weights(self, name: str, model_state: dict, step: int, epoch, record: dict) -> None:
        """``best.pt`` or ``final.pt``: weights, configuration, and the record of the step they are from."""
        save_checkpoint(self.out_dir / name, {"config": self.config, "model": model_state, "step": step,
                                              "epoch": epoch, "record": record})
        self.saved[name] = step

    def link(self, source: str, name: str) -> None:
        """``name`` as a second name of ``source`` (the same weights: no second copy on disk)."""
        tmp = self.out_dir / f".{name}.link.tmp"
        tmp.unlink(missing_ok=True)
        os.link(self.out_dir / source, tmp)
        os.replace(tmp, self.out_dir / name)

    def finish(self) -> None:
        """Drop the resume state (optimiser moments, RNG states): a finished job keeps only what readers use."""
        self.last_path.unlink(missing_ok=True)


def load_trained(path, build, device="cpu"):
    """Rebuild a model from ``best.pt`` or ``final.pt`` with ``build(config)``; returns (model, state)."""
    state = load_checkpoint(path, map_location=device)
    model = build(state["config"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state


# -------------------------------------------------------------------------------------------- the loop
class _Window:
    """Statistics summed on the device since the last record (saved in checkpoints, so a resumed run's
    records equal an uninterrupted run's), and the wall-clock rate of the steps timed in this process."""

    def __init__(self, first_step: int, names: tuple = (), sums: torch.Tensor | None = None):
        self.first_step, self.names, self.sums = first_step, tuple(names), sums
        self.timed, self.clock = 0, time.perf_counter()

    def add(self, stats: dict) -> None:
        if not self.names:
            self.names = tuple(stats)
        values = torch.stack([stats[k].detach().float() for k in self.names])
        self.sums = values if self.sums is None else self.sums + values
        self.timed += 1

    def read(self) -> dict:
        """The sums as floats: the one host synchronisation of an interval."""
        return dict(zip(self.names, self.sums.tolist())) if self.sums is not None else {}

    def state(self) -> dict:
        return {"first_step": self.first_step, "names": list(self.names),
                "sums": None if self.sums is None else self.sums.cpu()}


def _check_finite(sums: dict, name: str, first: int, last: int, plan: Plan) -> None:
    loss = sums.get("loss")
    if loss is not None and not math.isfinite(loss):
        epoch = plan.epoch(last)
        where = f", epoch {math.ceil(epoch)}" if epoch is not None else ""
        raise RunError(f"{name}: loss is {loss} in steps {first + 1}-{last}{where}; training stopped "
                       f"(last good checkpoint kept)")


def train(algo: Algorithm, plan: Plan, optim: OptimizerConfig, schedule: str, seed: int, out_dir,
          config: dict, *, name: str = "model", log=print) -> list[dict]:
    """Train ``algo`` for ``plan.steps`` optimiser steps, resuming from ``out_dir/last.pt`` if it matches.

    Parameters
    ----------
    algo : Algorithm
        The method; its ``model`` is optimised and checkpointed (already on the device).
    plan : Plan
        Length, intervals and the selection of ``best.pt``.
    optim : OptimizerConfig
        Optimiser settings (:func:`fmnist_core.core.train.make_optimizer`).
    schedule : str
        Name of the learning-rate schedule (:func:`fmnist_core.core.train.lr_factor`).
    seed : int
        Seeds the global generator (dropout) and the data generator passed to ``train_step``.
    out_dir : path
        The job folder (checkpoints, history).
    config : dict
        Stored in every checkpoint; a ``last.pt`` made with another one is not resumed. It also holds
        what readers need to rebuild the model from ``best.pt``.
    name : str
        Names the run in log lines and errors.
    log : callable
        Receives one line per history record.

    Returns
    -------
    list of dict
        The history records: ``step``, ``epoch`` (with ``steps_per_epoch``), ``lr`` (of the record's last
        step), :meth:`Algorithm.summarize`'s fields, evaluation fields where evaluated, ``seconds``.
    """
    limit = deadlines.deadline()  # FMNIST_DEADLINE: stop at the first record after it
    run = _start(algo, plan, optim, schedule, seed, Checkpointer(Path(out_dir), config), log)
    run.progress = ProgressFile(out_dir, plan.steps, run.step, plan.steps_per_epoch)  # progress.json
    done = run.step
    for step in range(run.step, plan.steps):
        lr = run.optimizer.param_groups[0]["lr"]
        loss, stats = algo.train_step(step, run.generator)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        algo.after_step(step)
        run.window.add({"loss": loss.detach(), **stats})
        done = step + 1
        if _at_boundary(run, algo, plan, done, lr, name, log, limit):
            break
    _finish(run.ckpt, algo, plan, run.history.records, done)
    return run.history.records


@dataclass
class _Run:
    """The state :func:`train` carries from step to step (all of it is in ``last.pt``)."""

    ckpt: Checkpointer
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    step: int
    best: float | None
    history: History
    window: _Window
    progress: ProgressFile | None = None


def _start(algo, plan, optim, schedule, seed, ckpt, log) -> _Run:
    """Seed, build the optimiser and schedule, and resume from a matching ``last.pt`` if there is one."""
    torch.manual_seed(seed)
    generator = make_generator(seed, next(algo.model.parameters()).device)
    optimizer = make_optimizer(algo.model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(schedule, k, plan.steps))
    run = _Run(ckpt, optimizer, scheduler, generator, 0, None, History(ckpt.out_dir), _Window(0))
    return _resume(run, algo, log)


def _at_boundary(run: _Run, algo, plan: Plan, done: int, lr: float, name: str, log, limit=None) -> bool:
    """After ``done`` steps: the NaN check, history record, evaluation and checkpoint that are due. Returns
    whether the run stops here: a record after the deadline ``limit`` (then also an evaluation and a checkpoint)."""
    record_now, evaluate_now, checkpoint_now = plan.boundary(done)
    stop = record_now and done < plan.steps and limit is not None and time.time() >= limit
    evaluate_now, checkpoint_now = evaluate_now or stop, checkpoint_now or stop
    if not (record_now or checkpoint_now):
        return False
    sums = run.window.read()
    _check_finite(sums, name, run.window.first_step, done, plan)
    if record_now:
        record = {"step": done, "epoch": plan.epoch(done), "lr": lr,
                  **algo.summarize(sums, done - run.window.first_step)}
        if evaluate_now:
            record.update(algo.evaluate())
            run.best = _select(plan.selection, record, run.best, run.ckpt, algo, done, plan)
        record["seconds"] = time.perf_counter() - run.window.clock
        if record["epoch"] is None:
            del record["epoch"]
        run.history.append(record)
        if run.progress is not None:
            run.progress.update(record)
        log(_log_line(name, record, plan))
        run.window = _Window(done)
    if checkpoint_now:
        run.ckpt.save_last(model=algo.model.state_dict(), optimizer=run.optimizer.state_dict(),
                           scheduler=run.scheduler.state_dict(), step=done, best=run.best,
                           history=run.history.records,
                           rng={"data": run.generator.get_state(), "torch": torch.get_rng_state()},
                           window=run.window.state(), algorithm=algo.state_dict())
    if stop:
        log(f"{name}: stopped at the deadline after step {done} of {plan.steps} (resumable from last.pt)")
    return stop


def _select(selection, record, best, ckpt, algo, done, plan):
    if selection is None or not selection.improves(record[selection.key], best):
        return best
    ckpt.save_weights("best.pt", algo.evaluated_model().state_dict(), done, plan.epoch(done), record)
    return record[selection.key]


def _finish(ckpt: Checkpointer, algo: Algorithm, plan: Plan, records: list[dict], done: int | None = None) -> None:
    """``final.pt`` (and ``best.pt`` without a selection) of step ``done``, then drop the resume state; a run
    stopped at a deadline (``done`` < ``plan.steps``) keeps it and writes ``stopped.json`` instead."""
    done = plan.steps if done is None else done
    final = records[-1] if records else {}
    if plan.selection is None:
        ckpt.save_weights("best.pt", algo.evaluated_model().state_dict(), done, plan.epoch(done), final)
    if ckpt.saved.get("best.pt") == done and algo.evaluated_model() is algo.model:
        ckpt.link("best.pt", "final.pt")  # the last step was selected: the final weights are the same
    else:
        ckpt.save_weights("final.pt", algo.model.state_dict(), done, plan.epoch(done), final)
    if done < plan.steps:
        write_json(ckpt.out_dir / deadlines.STOPPED_FILE, {"steps_done": done, "steps_planned": plan.steps,
                                                           "stopped_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        return
    (ckpt.out_dir / deadlines.STOPPED_FILE).unlink(missing_ok=True)
    ckpt.finish()


def _resume(run: _Run, algo, log) -> _Run:
    """Restore a ``last.pt`` made with the same configuration: weights, optimiser, schedule, RNGs, history,
    the open statistics window and the algorithm's own state."""
    state = run.ckpt.resume_state()
    if state is None:
        return run
    algo.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.generator.set_state(state["rng"]["data"])
    torch.set_rng_state(state["rng"]["torch"])
    algo.load_state_dict(state["algorithm"])
    w = state["window"]
    sums = None if w["sums"] is None else w["sums"].to(next(algo.model.parameters()).device)
    log(f"resuming from {run.ckpt.last_path} after step {state['step']}")
    run.step, run.best = state["step"], state["best"]
    run.history, run.window = History(run.ckpt.out_dir, state["history"]), _Window(w["first_step"], w["names"], sums)
    return run


def _log_line(name: str, record: dict, plan: Plan) -> str:
    shown = " | ".join(f"{k} {v:.4f}" for k, v in record.items()
                       if k not in ("step", "epoch", "lr", "seconds") and isinstance(v, float))
    where = (f"epoch {record['epoch']}/{plan.steps // plan.steps_per_epoch}" if plan.steps_per_epoch
             else f"step {record['step']}/{plan.steps}")
    return f"{name} {where}: {shown} | {record['seconds']:.1f}s"
