"""Labeled Faces in the Wild as 32×32 RGB faces, for the VAE chapter (through scikit-learn's fetcher).

The faces are one class, ``face``: the VAE ignores labels, and the person labels are too unbalanced for
class-balanced splits (5,749 people, most with a single photograph). ``min_faces_per_person`` still
filters which photographs are used. The train/test split is a seeded random one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import fetch_lfw_people

from fmnist_core.core.data import ImageDataset
from fmnist_core.core.errors import ConfigError, DataError

IMAGE_SIZE = 32
# scikit-learn's default box (rows 70-195, columns 78-172 of the 250×250 photographs) widened to a
# 125×125 square around the same centre, so resizing to 32×32 does not squash the faces.
FACE_SLICE = (slice(70, 195), slice(62, 187))
FETCH_RESIZE = 0.5  # 62×62 from the fetcher; the antialiased resize to 32×32 is done here


def load_lfw(data_dir=None, device="cpu", min_faces_per_person: int = 0, test_fraction: float = 0.2,
             seed: int = 0, download: bool = True):
    """Load LFW faces as an :class:`~fmnist_core.core.data.ImageDataset` of ``uint8`` (N, 3, 32, 32) images.

    Parameters
    ----------
    data_dir : path, optional
        scikit-learn's ``data_home`` (its cache); default ``~/scikit_learn_data``.
    device : str or torch.device
        Where the tensors live.
    min_faces_per_person : int
        Keep only people with at least this many photographs (0 = everyone).
    test_fraction : float
        Share of the faces held out as the test set, chosen at random with ``seed``.
    seed : int
        Seed of the train/test split.
    download : bool
        Whether scikit-learn may download the data (about 200 MB) when it is not cached.

    Raises
    ------
    DataError
        If the faces can be neither read from the cache nor downloaded.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"parameter 'test_fraction' must be in (0, 1), got {test_fraction}")
    images = to_square_uint8(_fetch_faces(data_dir, min_faces_per_person, download), IMAGE_SIZE)
    if len(images) < 2:
        raise DataError(f"LFW: only {len(images)} face(s) with min_faces_per_person={min_faces_per_person}")
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = min(max(1, round(test_fraction * len(images))), len(images) - 1)
    test, train = (torch.as_tensor(np.sort(i)) for i in (order[:n_test], order[n_test:]))
    train_images, test_images = images[train].to(device), images[test].to(device)
    mean = tuple(float(m) for m in train_images.float().mean(dim=(0, 2, 3)) / 255)
    std = tuple(float(s) for s in (train_images.float() / 255).std(dim=(0, 2, 3)))

    def labels(n):
        return torch.zeros(n, dtype=torch.int64, device=device)

    return ImageDataset("lfw", train_images, labels(len(train)), test_images, labels(len(test)), mean, std,
                        ("face",))


def _fetch_faces(data_dir, min_faces_per_person: int, download: bool) -> np.ndarray:
    try:
        bunch = fetch_lfw_people(data_home=data_dir, color=True, resize=FETCH_RESIZE, slice_=FACE_SLICE,
                                 min_faces_per_person=min_faces_per_person, download_if_missing=download)
    except Exception as err:  # offline: OSError or URLError; missing Pillow: ImportError
        where = data_dir or "~/scikit_learn_data"
        raise DataError(f"LFW could not be loaded from the scikit-learn cache in {where} "
                        f"{'or downloaded' if download else '(downloads disabled)'}: "
                        f"{type(err).__name__}: {err}. Be online once, or point --data-dir to a "
                        "directory holding scikit-learn's lfw_home.") from None
    return np.asarray(bunch.images)


def to_square_uint8(faces: np.ndarray, size: int, chunk: int = 1024) -> torch.Tensor:
    """Float faces (N, H, W, 3) or grey (N, H, W) to ``uint8`` (N, 3, size, size).

    Centre-cropped to a square, then resized with antialiasing. Values in [0, 1] (what scikit-learn
    returns, although its documentation says 0-255) and in [0, 255] are both accepted. Chunked: the whole
    of LFW as float at fetch resolution is 600 MB.
    """
    scale = 255.0 if float(faces.max(initial=0.0)) <= 1.0 else 1.0
    out = []
    for start in range(0, len(faces), chunk):
        x = torch.as_tensor(np.asarray(faces[start:start + chunk], dtype=np.float32))
        x = x.unsqueeze(-1).expand(*x.shape, 3) if x.ndim == 3 else x
        x = x.permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        side = min(h, w)
        x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        x = F.interpolate(x * scale, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, 3, size, size, dtype=torch.uint8)
