"""What the layers of a classifier see: captured activations, how well they separate the classes, 2-D maps.

Activations are read with forward hooks, so the models need no extra outputs; the hooks only record and
are always removed again. Every score is seeded, and all results are plain Python / NumPy values that can
be written as JSON.
"""
from __future__ import annotations

import difflib

import numpy as np
import torch
from torch import nn

from fmnist_core.core.embed import embed_pca, embed_tsne

__all__ = ["INPUT", "capture_activations", "separability", "reduce_features", "embedding_trustworthiness",
           "layer_report"]

INPUT = "input"  # pseudo-layer: the network's input itself, the baseline every layer is compared with

# Silhouette works on pairwise distances, which lose contrast in thousands of dimensions (and cost
# N^2 * D); above this width the features are first reduced by PCA.
SILHOUETTE_MAX_DIM = 50


# ------------------------------------------------------------------------------------------ capture
def capture_activations(model: nn.Module, inputs: torch.Tensor, layers: list[str] | None = None,
                        batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run ``model`` on ``inputs`` and return the outputs of named submodules, one row per sample.

    Parameters
    ----------
    model : torch.nn.Module
        A registry model (or any module); it is run in eval mode under ``torch.inference_mode()``, and
        the training flag of every submodule is restored afterwards.
    inputs : torch.Tensor
        ``(N, C, H, W)`` float tensor, already normalised, on the model's device.
    layers : list of str, optional
        Names as in ``model.named_modules()``, or ``"input"`` for the input itself. Default:
        ``["input"] + model.feature_layers`` (the last feature layer is normally the logits).
    batch_size : int, default 256

    Returns
    -------
    dict of str to ndarray
        ``layer -> (N, D)`` ``float32`` array on the CPU (each output flattened per sample), in the order
        of ``layers``. A submodule called several times in one forward pass gives its last call's output.

    Raises
    ------
    ValueError or RuntimeError
        For an unknown or repeated layer name, empty ``inputs``, a non-positive ``batch_size``, or (runtime) a
        requested submodule that the forward pass does not call.
    """
    layers = [INPUT, *getattr(model, "feature_layers", [])] if layers is None else list(layers)
    modules = _resolve_layers(model, layers)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if len(inputs) == 0:
        raise ValueError("inputs hold no samples")
    # Per-module flags, since model.train(flag) would overwrite deliberately mixed modes.
    modes = [(m, m.training) for m in model.modules()]
    current: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_recorder(name, current)))
        model.eval()
        with torch.inference_mode():
            chunks = _run_batches(model, inputs, layers, batch_size, current)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _run_batches(model, inputs, layers, batch_size, current) -> dict[str, list[np.ndarray]]:
    """Forward ``inputs`` batch by batch; the hooks fill ``current``; returns each layer's rows per batch."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        current.clear()
        current[INPUT] = batch.detach().clone()  # copied in case the model edits its input in place
        model(batch)
        for name in layers:
            if name not in current:
                raise RuntimeError(f"layer {name!r} was not called by {type(model).__name__}.forward")
            chunks[name].append(_to_rows(current[name]))
    return chunks


def _resolve_layers(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    """Map each requested name except ``"input"`` to its submodule; reject unknown and repeated names."""
    named = dict(model.named_modules())
    named.pop("", None)  # the model itself is not a layer
    for name in layers:
        if name != INPUT and name not in named:
            valid = [INPUT, *(n for n, _ in model.named_children())]
            msg = (f"unknown layer {name!r}; valid names: {', '.join(valid)} "
                   f"(or any nested name from model.named_modules(), e.g. 'block.0')")
            close = difflib.get_close_matches(name, [INPUT, *named], n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            raise ValueError(msg)
    repeated = sorted({n for n in layers if layers.count(n) > 1})
    if repeated:
        raise ValueError(f"layer names must be unique, repeated: {', '.join(repeated)}")
    return {name: named[name] for name in layers if name != INPUT}


def _recorder(name: str, store: dict):
    def hook(module, args, output):
        if not torch.is_tensor(output):
            raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
        # A copy: later in-place ops (ReLU(inplace=True)) would otherwise rewrite what was recorded.
        # Returning None leaves the forward pass untouched.
        store[name] = output.detach().clone()
    return hook


def _to_rows(t: torch.Tensor) -> np.ndarray:
    return t.reshape(len(t), -1).to("cpu", torch.float32).numpy()


# ------------------------------------------------------------------------------------------- scores
def separability(features: np.ndarray, labels, k: int = 5, folds: int = 5, seed: int = 0,
                 reduced: np.ndarray | None = None) -> dict:
    """How well the classes separate in a feature space: k-NN accuracy and silhouette.

    Parameters
    ----------
    features : array, shape (N, D)
        One row per sample (e.g. a layer's activations).
    labels : array, shape (N,)
        Class of each sample; every class needs at least ``folds`` samples.
    k : int, default 5
        Neighbours of the k-NN classifier.
    folds : int, default 5
        Stratified cross-validation folds (shuffled with ``seed``).
    seed : int, default 0
        Seeds the fold assignment and the PCA reduction.
    reduced : array, shape (N, 50), optional
        The features' projection on their first 50 principal components, when the caller has it already
        (:func:`reduce_features`); computed here otherwise.

    Returns
    -------
    dict
        ``knn_accuracy``: mean cross-validated accuracy of k-NN on standardised features (the scaler
        is fitted inside each training fold, so no statistics leak from the held-out fold);
        ``silhouette``: scikit-learn's silhouette score of the class labels on the raw (unscaled)
        features, in [-1, 1]. When ``D > 50`` the features are first projected on their first 50
        principal components (seeded randomised PCA), because distances in thousands of dimensions
        lose contrast and cost ``N^2 D``. Both values are Python floats.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _features_and_labels(features, labels)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    accuracy = cross_val_score(knn, features, labels, cv=cv).mean()
    if reduced is None:
        reduced = reduce_features(features, seed)[0]
    return {"knn_accuracy": float(accuracy), "silhouette": float(silhouette_score(reduced, labels))}


def reduce_features(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """The features on their first 50 principal components (seeded randomised PCA) where they are wider.

    Returns
    -------
    reduced : ndarray, shape (N, min(D, 50))
        The projection, or ``features`` themselves when ``D <= 50`` (or ``N <= 50``).
    explained_variance_ratio : ndarray of shape (50,), or None
        The share of the variance of each component (``None`` when nothing was reduced).
    """
    from sklearn.decomposition import PCA
    features = np.asarray(features).reshape(len(features), -1)
    if features.shape[1] <= SILHOUETTE_MAX_DIM or len(features) <= SILHOUETTE_MAX_DIM:
        return features, None
    pca = PCA(n_components=SILHOUETTE_MAX_DIM, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(features), pca.explained_variance_ratio_


def embedding_trustworthiness(features: np.ndarray, embedding: np.ndarray, n_neighbors: int = 10) -> float:
    """Trustworthiness of a low-dimensional embedding (scikit-learn), in [0, 1].

    Parameters
    ----------
    features : array, shape (N, D)
        The original points.
    embedding : array, shape (N, d)
        Their embedding (e.g. t-SNE).
    n_neighbors : int, default 10
        Neighbourhood size; must be below ``N / 2``.

    Returns
    -------
    float
        1 when every point's embedded neighbours are also among its original neighbours; it drops
        when the embedding invents neighbourhoods that the data do not have.
    """
    from sklearn.manifold import trustworthiness
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return float(trustworthiness(features, np.asarray(embedding, dtype=np.float64), n_neighbors=n_neighbors))


# ------------------------------------------------------------------------------------------- report
def layer_report(activations: dict, labels, perplexity: float = 30, seed: int = 0, n_jobs: int = 1,
                 tsne_iter: int = 500) -> tuple[dict, list[dict]]:
    """PCA and t-SNE maps and separability scores of every captured layer.

    Parameters
    ----------
    activations : dict of str to array
        ``layer -> (N, D)``, as returned by :func:`capture_activations`; its order is the depth order.
    labels : array, shape (N,)
        Class of each sample.
    perplexity : float, default 30
        t-SNE perplexity.
    seed : int, default 0
        Seeds PCA, t-SNE and the cross-validation folds: the same seed gives the same report.
    n_jobs : int, default 1
        t-SNE threads.
    tsne_iter : int, default 500
        t-SNE iterations after early exaggeration.

    Returns
    -------
    embeddings : dict
        ``layer -> {"pca": (N, 2) array, "tsne": (N, 2) array}``.
    scores : list of dict
        One JSON-serialisable record per layer, in depth order: ``layer``, ``depth`` (0 for the first),
        ``dim``, ``knn_accuracy``, ``silhouette`` (both on the raw activations, see
        :func:`separability`), ``tsne_trustworthiness`` and ``pca_explained_variance`` (two ratios).
    """
    embeddings, scores = {}, []
    for depth, (layer, features) in enumerate(activations.items()):
        features, labels = _features_and_labels(features, labels)
        # One seeded PCA of a wide layer serves its 2-D map (the first two components), t-SNE's input and the
        # silhouette: on a ResNet's 50,176-wide stages it is the costliest step, once instead of three times.
        reduced, ratios = reduce_features(features, seed)
        if ratios is None:
            pca, ratio = embed_pca(features, seed=seed)
        else:
            pca, ratio = reduced[:, :2].astype(np.float32), ratios[:2]
        tsne = embed_tsne(reduced, perplexity=perplexity, seed=seed, n_jobs=n_jobs, n_iter=tsne_iter,
                          pca_dims=None)
        embeddings[layer] = {"pca": pca, "tsne": tsne}
        scores.append({"layer": layer, "depth": depth, "dim": int(features.shape[1]),
                       **separability(features, labels, seed=seed, reduced=reduced),
                       "tsne_trustworthiness": embedding_trustworthiness(features, tsne),
                       "pca_explained_variance": [float(r) for r in ratio]})
    return embeddings, scores


def _features_and_labels(features, labels) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features)
    features = features.reshape(len(features), -1)
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).reshape(-1)
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    return features, labels
