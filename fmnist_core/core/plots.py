"""The book's one plotting style: every chapter draws with these functions and saves PNGs through ``save``."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist_core.core.io import write_bytes_atomic  # noqa: E402

PALETTE = plt.get_cmap("tab10").colors
plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 110, "axes.spines.top": False,
                     "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})


def save(fig, path, show: bool = True):
    """Write ``fig`` as a PNG (atomically) and, in a notebook, display it; returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    path = write_bytes_atomic(Path(path), buffer.getvalue())
    if show:
        from IPython.display import Image, display
        display(Image(data=buffer.getvalue()))
    plt.close(fig)
    return path


def _image(ax, image, title=None):
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.set_xticks([]), ax.set_yticks([]), ax.grid(False)
    if title:
        ax.set_title(title, fontsize=7)


def image_grid(images, titles=None, ncols: int = 10, size: float = 1.0, row_labels=None, title=None):
    """A grid of images (N×C×H×W or N×H×W arrays), optional titles per image, labels per row, a heading."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    height = nrows * size * (1.3 if titles is not None else 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size + (1.0 if row_labels else 0), height), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _image(ax, images[i], titles[i] if titles is not None else None)
        else:
            ax.axis("off")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 + 0.25 / height)
    return fig


def bar(values, labels, xlabel="", title=""):
    """A horizontal bar chart with the value printed at the end of each bar."""
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(values) + 1))
    ax.barh(range(len(values)), values, color=PALETTE[0])
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:g}", va="center", fontsize=7)
    ax.set_xlabel(xlabel), ax.set_title(title)
    return fig


def scatter_panel(ax, embedding, labels, title=None, num_classes: int = 10):
    """Points coloured by class, no ticks (coordinates of an embedding carry no meaning)."""
    labels = np.asarray(labels)
    for c in range(num_classes):
        pts = embedding[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=4, color=PALETTE[c % 10], alpha=0.7, linewidths=0)
    ax.set_xticks([]), ax.set_yticks([]), ax.grid(False)
    if title:
        ax.set_title(title, fontsize=8)


def embedding_grid(panels, labels, class_names, ncols: int = 3, size: float = 2.6):
    """One panel per (title, N×2 embedding), a shared class legend below."""
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size), squeeze=False)
    for ax, (title, embedding) in zip(axes.flat, panels):
        scatter_panel(ax, embedding, labels, title, len(class_names))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=PALETTE[c % 10]) for c in range(len(class_names))]
    legend_rows = int(np.ceil(len(class_names) / 5))
    fig.tight_layout(rect=(0, 0.35 * legend_rows / (nrows * size), 1, 1))
    fig.legend(handles, class_names, loc="lower center", ncol=min(5, len(class_names)), fontsize=8,
               bbox_to_anchor=(0.5, 0), frameon=False)
    return fig


def curves(histories: dict, keys=("train_loss", "val_loss", "train_accuracy", "val_accuracy"), x="epoch"):
    """One panel per history key, one line per run: ``histories`` maps a run name to its records."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (name, records) in enumerate(histories.items()):
            kept = [r for r in records if r.get(key) is not None]  # None = not measured at that point
            xs, ys = [r[x] for r in kept], [r[key] for r in kept]
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, color=PALETTE[i % 10], label=name)
        ax.set_title(key.replace("_", " ")), ax.set_xlabel(x)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def confusion_matrices(matrices: dict, class_names, ncols: int = 3, normalized: bool = True):
    """Row-normalised (or count) confusion matrices, one panel per model."""
    nrows = int(np.ceil(len(matrices) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 3.6, nrows * 3.5), squeeze=False)
    for ax, (name, cm) in zip(axes.flat, matrices.items()):
        cm = np.asarray(cm, dtype=float)
        shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalized else cm
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalized else None)
        for (i, j), v in np.ndenumerate(shown):
            if v >= (0.01 if normalized else 1):
                text = f"{v:.2f}"[1:] if normalized and v < 1 else (f"{v:.0f}" if not normalized else "1")
                ax.text(j, i, text, ha="center", va="center", fontsize=5, color="white" if v > 0.5 * shown.max() else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=6)
        ax.set_title(name, fontsize=9), ax.grid(False)
        ax.set_xlabel("predicted", fontsize=7), ax.set_ylabel("true", fontsize=7)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def roc_panel(curves_per_class, aucs, class_names, title=""):
    """One-vs-rest ROC curves of every class of one model, AUROC in the legend."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for c, (fpr, tpr) in enumerate(curves_per_class):
        auc = aucs[c]
        ax.plot(fpr, tpr, color=PALETTE[c % 10], lw=1,
                label=f"{class_names[c]} ({auc:.3f})" if auc is not None else class_names[c])
    ax.plot([0, 1], [0, 1], "k--", lw=0.7)
    ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.set_title(title)
    ax.legend(fontsize=6, loc="lower right")
    return fig


def error_destinations(cm, class_names, title=""):
    """For each true class, where its mistakes go: stacked shares of the off-diagonal row."""
    cm = np.asarray(cm, dtype=float)
    errors = cm - np.diag(np.diag(cm))
    shares = errors / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    left = np.zeros(len(class_names))
    for j, name in enumerate(class_names):
        ax.barh(range(len(class_names)), shares[:, j], left=left, color=PALETTE[j % 10], label=name)
        left += shares[:, j]
    ax.set_yticks(range(len(class_names)), class_names)
    ax.invert_yaxis()
    ax.set_xlabel("share of the true class's test images misclassified as ...")
    ax.set_title(title)
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left", title="predicted", title_fontsize=7)
    return fig


def grouped_bars(table: dict, metric_names, title=""):
    """Bars of several metrics per model: ``table`` maps a model to {metric: value}."""
    names = list(table)
    width = 0.8 / len(metric_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3))
    for k, metric in enumerate(metric_names):
        values = [table[n][metric] for n in names]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=metric, color=PALETTE[k % 10])
    ax.set_xticks(np.arange(len(names)) + width * (len(metric_names) - 1) / 2, names, rotation=30)
    ax.set_title(title), ax.legend(fontsize=7)
    return fig


def accuracy_vs_labels(summary: list[dict], key: str = "test_accuracy", title: str = ""):
    """Mean accuracy (± std over seeds as error bars) against the number of labels, log-scale x, per model."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    models = list(dict.fromkeys(row["model"] for row in summary))
    for i, model in enumerate(models):
        rows = sorted((r for r in summary if r["model"] == model), key=lambda r: r["num_labels"])
        ax.errorbar([r["num_labels"] for r in rows], [r[key] for r in rows],
                    yerr=[r.get(f"{key}_std", 0.0) for r in rows], marker="o", ms=4, capsize=3,
                    color=PALETTE[i % 10], label=model)
    ax.set_xscale("log")
    ax.set_xlabel("labeled images"), ax.set_ylabel(key.replace("_", " ")), ax.set_title(title)
    ax.legend(fontsize=7)
    return fig
