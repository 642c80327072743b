"""Two-dimensional embeddings of feature matrices: PCA (scikit-learn) and t-SNE (openTSNE), both seeded."""
from __future__ import annotations

import numpy as np


def embed_pca(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project ``features`` (N×D) on their first two principal components.

    Returns
    -------
    embedding : ndarray, shape (N, 2)
    explained_variance_ratio : ndarray, shape (2,)
    """
    from sklearn.decomposition import PCA
    features = _as_matrix(features)
    pca = PCA(n_components=2, random_state=seed).fit(features)  # seeded: randomized SVD on wide inputs is reproducible
    return pca.transform(features).astype(np.float32), pca.explained_variance_ratio_


def embed_tsne(features: np.ndarray, perplexity: float = 30.0, seed: int = 0, n_jobs: int = 1,
               n_iter: int = 500, initialization: str = "pca", pca_dims: int | None = 50) -> np.ndarray:
    """t-SNE of ``features`` (N×D) with openTSNE, PCA initialisation by default.

    openTSNE uses Barnes-Hut gradients below 10,000 points and FFT interpolation above.

    Parameters
    ----------
    perplexity : float
        Effective number of neighbours; lowered automatically to ``(N - 1) / 3`` for tiny inputs.
    seed : int
        Seeds the affinity search and the optimisation: the same seed gives the same picture.
    n_jobs : int
        Threads for the neighbour search and gradients.
    n_iter : int
        Iterations after the early-exaggeration phase (which is 250 iterations).
    initialization : {"pca", "random"}
        Starting layout: the first two principal components (stable global layout), or seeded Gaussian
        noise (tests use it to show that the optimisation, not the start, separates the clusters).
    pca_dims : int or None
        Reduce features with more dimensions to this many principal components first (the usual t-SNE
        practice: neighbours in the top components are nearly those in the full space, at a fraction of
        the cost for wide layers); ``None`` keeps every dimension.
    """
    from openTSNE import TSNE
    if initialization not in ("pca", "random"):
        raise ValueError(f"initialization must be 'pca' or 'random', got {initialization!r}")
    features = _as_matrix(features)
    if pca_dims is not None and features.shape[1] > pca_dims and len(features) > pca_dims:
        from sklearn.decomposition import PCA
        features = PCA(n_components=pca_dims, random_state=seed).fit_transform(features)
    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    tsne = TSNE(perplexity=perplexity, initialization=initialization, random_state=seed, n_jobs=n_jobs,
                n_iter=n_iter, neighbors="exact" if len(features) < 1000 else "auto", verbose=False)
    return np.asarray(tsne.fit(features), dtype=np.float32)


def _as_matrix(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features
