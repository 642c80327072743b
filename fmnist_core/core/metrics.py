"""Evaluation metrics, prediction helpers and speed measurements.

The metric math is plain numpy so every number in a results file can be
traced to a few lines here; scikit-learn is only used for ROC/AUROC, where
its tie handling is the accepted reference.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from fmnist_core.core.data import CLASS_NAMES

LOG_LOSS_EPS = 1e-12


# --------------------------------------------------------------------------
# Validation and small numpy helpers
# --------------------------------------------------------------------------

def _as_labels(y, name="y_true") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def _check_inputs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(y_true)
    # float64 so that sums of many small terms stay exact enough to compare
    # against reference implementations at 1e-12.
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"y_true has {y.shape[0]} labels but probs has {p.shape[0]} rows")
    if y.shape[0] == 0:
        raise ValueError("cannot evaluate an empty set (N == 0)")
    if p.shape[1] == 0:
        raise ValueError("probs must have at least one class column")
    if np.isnan(p).any():
        raise ValueError("probs contain NaN (did training diverge?)")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {p.shape[1]}), got range [{y.min()}, {y.max()}]")
    return y, p


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with 0.0 where den == 0 (sklearn's zero_division=0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    # `where=` avoids evaluating 0/0, so no RuntimeWarning is ever raised.
    np.divide(num, den, out=out, where=den != 0)
    return out


def _floats(a) -> list:
    return [float(v) for v in np.asarray(a).ravel()]


# --------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred, num_classes: int = 10) -> np.ndarray:
    """Count (true, predicted) label pairs.

    Parameters
    ----------
    y_true, y_pred : array_like of int, shape (N,)
        True and predicted labels in ``[0, num_classes)``.
    num_classes : int
        Size of the (square) matrix.

    Returns
    -------
    np.ndarray of int64, shape (num_classes, num_classes)
        ``cm[i, j]`` is the number of samples of true class ``i`` predicted as ``j``.
    """
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    # One flat bincount is far faster than np.add.at for 10k+ samples.
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _prf(tp, n_pred, support) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = _safe_div(tp, n_pred)
    recall = _safe_div(tp, support)
    # 2tp/(2tp+fp+fn) is algebraically 2PR/(P+R) but needs no P+R==0 special case,
    # and it is the form sklearn uses, so results agree to the last bits.
    f1 = _safe_div(2 * tp, n_pred + support)
    return precision, recall, f1


def _auroc(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score  # scikit-learn takes seconds to import: only when needed
    per_class = []
    for k in range(p.shape[1]):
        pos = y == k
        if pos.all() or not pos.any():
            # AUROC is undefined without both positives and negatives; None keeps
            # the dict valid JSON (NaN would not be).
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(pos, p[:, k])))
    defined = [v for v in per_class if v is not None]
    macro = float(np.mean(defined)) if defined else None
    return {"macro": macro, "per_class": per_class}


def classification_summary(y_true, probs, class_names: Optional[Sequence[str]] = None) -> dict:
    """Summarise a classifier's predictions as a JSON-serialisable dict.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True labels.
    probs : array_like of float, shape (N, K)
        Class probabilities (rows sum to 1); predictions are the row argmax.
    class_names : sequence of str, optional
        K names; defaults to the Fashion-MNIST names when K == 10, else "0".."K-1".

    Returns
    -------
    dict
        Keys ``n``, ``accuracy``, ``macro``, ``weighted``, ``micro``, ``per_class``,
        ``auroc``, ``confusion_matrix``, ``confusion_matrix_normalized``, ``log_loss``.
        Undefined per-class AUROCs (class absent from ``y_true``) are ``None``.

    Raises
    ------
    ValueError
        On mismatched shapes, empty input, NaN probabilities or out-of-range labels.
    """
    y, p = _check_inputs(y_true, probs)
    n, k = p.shape
    cm = confusion_matrix(y, p.argmax(axis=1), num_classes=k)
    true_prob = np.clip(p[np.arange(n), y], LOG_LOSS_EPS, 1.0)
    return {
        "n": int(n),
        "accuracy": float(np.diag(cm).sum() / n),
        **_averages(cm, _class_names(class_names, k)),
        "auroc": _auroc(y, p),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": [
            _floats(row) for row in _safe_div(cm, cm.sum(axis=1, keepdims=True))],
        "log_loss": float(-np.log(true_prob).mean()),
    }


def _averages(cm: np.ndarray, names: list) -> dict:
    """Macro, support-weighted and micro precision/recall/F1, and the per-class figures, of a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    n_pred = cm.sum(axis=0).astype(np.float64)
    precision, recall, f1 = _prf(tp, n_pred, support)
    # Micro averaging pools all classes; for single-label data it collapses to
    # accuracy, which is kept in the output to make that visible.
    micro = _prf(tp.sum(), n_pred.sum(), support.sum())
    weights = support / support.sum()
    per_class = [
        {"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
         "f1": float(f1[i]), "support": int(cm[i].sum()), "accuracy": float(recall[i])}
        for i in range(len(names))
    ]
    return {
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                  "f1": float(f1.mean())},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights),
                     "f1": float(f1 @ weights)},
        "micro": {"precision": float(micro[0]), "recall": float(micro[1]),
                  "f1": float(micro[2])},
        "per_class": per_class,
    }


def _class_names(class_names, k: int) -> list[str]:
    if class_names is None:
        return list(CLASS_NAMES) if k == len(CLASS_NAMES) else [str(i) for i in range(k)]
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} class names for {k} classes")
    return names


def roc_curves(y_true, probs) -> list[tuple[np.ndarray, np.ndarray]]:
    """One-vs-rest ROC curve for each class.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    probs : array_like of float, shape (N, K)

    Returns
    -------
    list of (fpr, tpr)
        K pairs of 1-D arrays, as returned by ``sklearn.metrics.roc_curve``.
    """
    from sklearn.metrics import roc_curve
    y, p = _check_inputs(y_true, probs)
    curves = []
    for k in range(p.shape[1]):
        fpr, tpr, _ = roc_curve((y == k).astype(np.int64), p[:, k])
        curves.append((fpr, tpr))
    return curves


def confusion_pairs(cm, top: Optional[int] = None) -> list[dict]:
    """List the non-zero off-diagonal cells of a confusion matrix, most frequent first.

    Parameters
    ----------
    cm : array_like, shape (K, K)
        Counts, rows = true class.
    top : int, optional
        Keep only the first ``top`` pairs.

    Returns
    -------
    list of dict
        ``{"true": i, "pred": j, "count": c, "rate": c / row_total}``; ties keep
        row-major order so the output is deterministic.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be square, got shape {cm.shape}")
    row_total = cm.sum(axis=1)
    i, j = np.nonzero(cm)  # row-major order
    keep = i != j
    i, j = i[keep], j[keep]
    counts = cm[i, j]
    order = np.argsort(-counts, kind="stable")
    if top is not None:
        order = order[:top]
    return [
        {"true": int(i[o]), "pred": int(j[o]), "count": int(counts[o]),
         "rate": float(counts[o] / row_total[i[o]])}
        for o in order
    ]


def most_confident_mistakes(y_true, probs, k: int = 16) -> np.ndarray:
    """Indices of the ``k`` misclassified samples the model was most sure about.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    probs : array_like of float, shape (N, K)
    k : int
        Maximum number of indices to return.

    Returns
    -------
    np.ndarray of int64
        At most ``k`` indices, sorted by max-probability descending (ties by index).
    """
    y, p = _check_inputs(y_true, probs)
    wrong = np.flatnonzero(p.argmax(axis=1) != y)
    conf = p[wrong].max(axis=1)
    order = np.argsort(-conf, kind="stable")[:k]
    return wrong[order].astype(np.int64)


# --------------------------------------------------------------------------
# Inference helpers
# --------------------------------------------------------------------------

@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Record every submodule's flag, not just the root's: model.train(flag) would
    # overwrite deliberately frozen parts (e.g. BatchNorm kept in eval).
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024,
                  tta: int = 0, augment: Optional[Callable] = None) -> torch.Tensor:
    """Softmax class probabilities, optionally averaged over test-time augmentations.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits (N, K); its training flags are restored afterwards.
    images : torch.Tensor, shape (N, C, H, W)
        Normalised float images on the model's device.
    batch_size : int
        Images per forward pass.
    tta : int
        Number of augmented copies to average with the original.
    augment : callable, optional
        ``augment(batch, generator) -> batch``; required when ``tta > 0``.

    Returns
    -------
    torch.Tensor
        float32 probabilities of shape (N, K) on the CPU.
    """
    if tta > 0 and augment is None:
        raise ValueError("tta > 0 needs an augment callable")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    # One generator for the whole pass, consumed batch by batch, so the same
    # call always sees the same augmentations.
    gen = torch.Generator(device=images.device).manual_seed(0) if tta > 0 else None
    out = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            xb = images[start:start + batch_size]
            # float() first: under autocast the logits may be half precision.
            probs = model(xb).float().softmax(dim=1)
            for _ in range(tta):
                probs += model(augment(xb, gen)).float().softmax(dim=1)
            out.append((probs / (tta + 1)).cpu())
    return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(model, x: torch.Tensor, repeats: int, warmup: int) -> float:
    device = x.device
    times = []
    with _eval_mode(model), torch.inference_mode():
        # Warm-up absorbs one-off costs (cuDNN autotuning, allocator growth, lazy init).
        for _ in range(warmup):
            model(x)
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            _sync(device)  # CUDA kernels are async; wait before reading the clock
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_latency(model: torch.nn.Module, image_shape=(1, 28, 28), device="cpu",
                    repeats: int = 50, warmup: int = 5) -> float:
    """Median single-image inference latency.

    Parameters
    ----------
    model : torch.nn.Module
        Already on ``device``; its training flags are restored afterwards.
    image_shape : tuple of int
        (C, H, W) of one input.
    device : str or torch.device
        Where the random input is created.
    repeats, warmup : int
        Timed and untimed forward passes.

    Returns
    -------
    float
        Milliseconds per image at batch size 1.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    x = torch.randn(1, *image_shape, device=torch.device(device))
    return _median_seconds(model, x, repeats, warmup) * 1e3


def measure_throughput(model: torch.nn.Module, image_shape=(1, 28, 28), device="cpu",
                       batch_size: int = 512, repeats: int = 5, warmup: int = 1) -> float:
    """Median inference throughput in images per second, ``batch_size`` random images per forward pass; the
    other parameters are :func:`measure_latency`'s."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    x = torch.randn(batch_size, *image_shape, device=torch.device(device))
    seconds = _median_seconds(model, x, repeats, warmup)
    # A clock with coarse resolution could report 0 for a tiny model.
    return batch_size / max(seconds, 1e-9)


def summarise_seeds(rows: list[dict], group_keys: tuple, value_keys: tuple) -> list[dict]:
    """Mean and sample standard deviation (``<key>_std``; 0 for one seed) of ``value_keys`` over the rows
    that share ``group_keys`` (e.g. model and label count), in first-seen order, with the seed count."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    summary = []
    for key, group in groups.items():
        entry = {**dict(zip(group_keys, key)), "seeds": len(group)}
        for name in value_keys:
            values = np.array([g[name] for g in group], dtype=float)
            entry[name] = float(values.mean())
            entry[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def cpu_description() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``), for benchmark records."""
    import platform
    from pathlib import Path
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
