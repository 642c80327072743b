"""Datasets as device-resident tensors, verified on load, with seeded splits and batched augmentation.

The whole of Fashion-MNIST is 47 MB, so it lives as one ``uint8`` tensor on the training device and every
batch is cut, augmented and normalised there: no per-sample Python in the training hot path, and the same
code on CPU and CUDA.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist_core.core.errors import DataError
from fmnist_core.core.resources import work_root

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# SHA-256 of the *decompressed* IDX files. The gzip wrappers differ between distributors (Debian's do not
# store the file name), so hashing the .gz files would reject correct copies.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = work_root() / "data"  # the checkout's data/, or ./data for an installed package
DATA_DIR_ENV = "FMNIST_DATA_DIR"

# Per-channel statistics of the Fashion-MNIST training images, used to standardise network inputs.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Training and test images of each dataset a config may name, every class equally often, so that a config can
# refuse a count the data cannot supply before any data is loaded.
TRAIN_IMAGES = {"fashion_mnist": 60_000, "cifar10": 50_000}
TEST_IMAGES = {"fashion_mnist": 10_000, "cifar10": 10_000}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageDataset:
    """Train and test images (``uint8``, N×C×H×W) and labels (``int64``) on one device."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple
    std: tuple
    class_names: tuple

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.train_images.shape[1:])

    def to(self, device) -> "ImageDataset":
        fields = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return ImageDataset(**fields)


# --------------------------------------------------------------------------------------------- IDX files
def read_idx_bytes(raw: bytes, name: str) -> np.ndarray:
    """Parse the bytes of an IDX file (LeCun's MNIST format) into an array.

    Raises
    ------
    DataError
        If the header is invalid or the payload does not match the declared shape.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{name}: payload is {len(raw) - header} bytes, header declares {expected} "
                        f"for shape {shape}: the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:  # zlib.error: a corrupt compressed body
        raise DataError(f"{path}: cannot be read or decompressed ({err})") from None


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz",
                      directory / "FashionMNIST" / "raw" / stem, directory / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_verified_idx(path: Path, stem: str, expected_sha256: str | None) -> np.ndarray:
    """Read one IDX file, checking the SHA-256 of its decompressed contents when one is given."""
    raw = _read_maybe_gzip(path)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise DataError(f"{path}: contents do not match the published {stem} (SHA-256 differs); "
                        f"the file is corrupt, truncated or not Fashion-MNIST")
    return read_idx_bytes(raw, str(path))


# ------------------------------------------------------------------------------------ finding the data
def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for the four IDX files, in order: the user's, Debian's, the project cache."""
    user = data_dir or os.environ.get(DATA_DIR_ENV)
    dirs = [Path(user).expanduser()] if user else []
    return dirs + [DEBIAN_DIR, DEFAULT_CACHE_DIR]


def _missing_data_message(searched: list[Path], reason: str) -> str:
    places = "\n".join(f"  - {p}" for p in searched)
    return (f"Fashion-MNIST not found ({reason}). Searched:\n{places}\n"
            "Provide it in one of three ways:\n"
            f"  1. point to a directory holding the four IDX files (.gz or not): --data-dir DIR or {DATA_DIR_ENV}=DIR\n"
            "  2. on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
            f"  3. be online once: the files are then downloaded by torchvision into {DEFAULT_CACHE_DIR}")


def locate_fashion_mnist(data_dir=None, download: bool = True) -> dict[str, Path]:
    """Return the paths of the four Fashion-MNIST IDX files, downloading them only as a last resort.

    A directory given explicitly (argument or environment variable) must hold the data: it is never
    silently passed over for another copy.
    """
    searched = candidate_dirs(data_dir)
    for i, directory in enumerate(searched):
        found = {stem: _find_file(directory, stem) for stem in FASHION_MNIST_SHA256}
        if all(found.values()):
            return found
        explicit = i == 0 and (data_dir or os.environ.get(DATA_DIR_ENV))
        if explicit:
            missing = ", ".join(s for s, p in found.items() if p is None)
            raise DataError(f"data directory {directory} lacks the Fashion-MNIST files: {missing}")
    if not download:
        raise DataError(_missing_data_message(searched, "downloads disabled"))
    return _download_with_torchvision(searched)


def _download_with_torchvision(searched: list[Path]) -> dict[str, Path]:
    from torchvision.datasets import FashionMNIST
    try:
        FashionMNIST(str(DEFAULT_CACHE_DIR), train=True, download=True)
    except Exception as err:  # torchvision raises bare RuntimeError/URLError when offline
        raise DataError(_missing_data_message(searched, f"download failed: {err}")) from None
    return {stem: _find_file(DEFAULT_CACHE_DIR, stem) for stem in FASHION_MNIST_SHA256}


def load_fashion_mnist(data_dir=None, device="cpu", download: bool = True) -> ImageDataset:
    """Load Fashion-MNIST, verified against the published SHA-256 sums, as tensors on ``device``.

    Parameters
    ----------
    data_dir : path, optional
        Directory with the four IDX files; defaults to ``$FMNIST_DATA_DIR``, then Debian's package
        directory, then ``data/`` in the project (where torchvision downloads to when online).
    device : str or torch.device
        Where the tensors live.
    download : bool
        Whether torchvision may download the data when no local copy exists.
    """
    paths = locate_fashion_mnist(data_dir, download)
    arrays = {stem: read_verified_idx(p, stem, FASHION_MNIST_SHA256[stem]) for stem, p in paths.items()}

    def images(stem):
        return torch.from_numpy(arrays[stem].copy()).unsqueeze(1).to(device)

    def labels(stem):
        return torch.from_numpy(arrays[stem].astype(np.int64)).to(device)

    return ImageDataset("fashion_mnist", images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
                        images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"),
                        FASHION_MNIST_MEAN, FASHION_MNIST_STD, CLASS_NAMES)


def load_cifar10(root=None, device="cpu", download: bool = False) -> ImageDataset:
    """Load CIFAR-10 through torchvision (``cifar-10-batches-py`` under ``root``) as tensors on ``device``."""
    from torchvision.datasets import CIFAR10
    root = Path(root or DEFAULT_CACHE_DIR)
    try:
        train, test = (CIFAR10(str(root), train=t, download=download) for t in (True, False))
    except RuntimeError as err:
        raise DataError(f"CIFAR-10 not usable under {root}: {err}") from None

    def images(ds):
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).to(device)

    def labels(ds):
        return torch.as_tensor(ds.targets, dtype=torch.int64, device=device)

    return ImageDataset("cifar10", images(train), labels(train), images(test), labels(test),
                        CIFAR10_MEAN, CIFAR10_STD, tuple(train.classes))


def load_dataset(name: str, data_dir=None, device="cpu") -> ImageDataset:
    """Load a dataset by name: ``fashion_mnist`` or ``cifar10`` (LFW faces: :func:`fmnist_core.core.lfw.load_lfw`)."""
    loaders = {"fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(loaders)}")
    return loaders[name](data_dir, device=device)


def job_dataset(name: str, device, loader=None) -> ImageDataset:
    """The dataset a job trains on: from ``$FMNIST_DATA_DIR`` (or the usual places), on ``device``.

    Loaded once per process and shared by the jobs that run in it (their tensors are only ever read), so a
    study of many jobs in one notebook kernel pays for loading and verifying the files once. ``loader``
    (``loader(name, data_dir, device)``, a module-level function) loads datasets :func:`load_dataset` does not
    know, e.g. LFW for the VAE chapter.
    """
    return _cached_dataset(name, os.environ.get(DATA_DIR_ENV) or None, str(device), loader or load_dataset)


@functools.lru_cache(maxsize=2)
def _cached_dataset(name: str, data_dir, device: str, loader) -> ImageDataset:
    return loader(name, data_dir, device)


# ---------------------------------------------------------------------------------------------- splits
def stratified_split(labels, val_size: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and validation parts with ``val_size / num_classes`` images of each class.

    Returns sorted index arrays ``(train_idx, val_idx)``; the same seed gives the same split.
    """
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    val_idx = balanced_subset(labels, val_size, seed, num_classes) if val_size else np.empty(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def balanced_subset(labels, size: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """Draw ``size / num_classes`` indices of every class at random (seeded); return them sorted.

    Raises
    ------
    ValueError
        If ``size`` is not a positive multiple of ``num_classes`` or exceeds what a class holds.
    """
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    if size <= 0 or size % num_classes:
        raise ValueError(f"label count {size} cannot be split evenly over {num_classes} classes: "
                         f"use a positive multiple of {num_classes}")
    per_class = size // num_classes
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"label count {size} needs {per_class} images of class {c}, "
                             f"but only {len(members)} are available")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------------- batches on device
def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``uint8`` images to standardised ``float32``: ``(x / 255 - mean) / std`` per channel."""
    mean_t, std_t = channel_tensor(mean, images.device), channel_tensor(std, images.device)
    return (images.float() / 255.0 - mean_t) / std_t


def channel_tensor(values, device) -> torch.Tensor:
    """Per-channel statistics as a (1, C, 1, 1) float32 tensor on ``device``, made once per (values,
    device): a tensor built from a list on every training step would be a blocking copy to a GPU each time."""
    return _channel_tensor(tuple(float(v) for v in values), str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _channel_tensor(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


PADDINGS = ("zeros", "reflect")


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator, padding: str = "zeros") -> torch.Tensor:
    """Pad by ``pad`` pixels and crop back to the original size at a random offset per image.

    ``padding`` is ``zeros`` (black borders) or ``reflect`` (the image mirrored about its edge pixels, as
    ``tf.pad(mode='REFLECT')`` in the FixMatch authors' weak augmentation); ``pad`` must then be smaller
    than the image side. Both draw the same offsets.
    """
    if pad == 0:
        return images
    n, c, h, w = images.shape
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device, generator=generator)
    rows = dy + torch.arange(h, device=images.device).view(1, h, 1)
    cols = dx + torch.arange(w, device=images.device).view(1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    if padding == "reflect":
        source, rows, cols = images, _reflect(rows - pad, h), _reflect(cols - pad, w)
    else:
        source = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    # Advanced indexing with (n,h,w) index tensors puts the channel axis last.
    return source.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in -size+1..2 size-2 mirrored into 0..size-1 about the edge pixels (-1 -> 1, size -> size-2)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image horizontally with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)


def weak_augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True,
                 padding: str = "zeros") -> torch.Tensor:
    """Random pad-and-crop translation (``padding``: see :func:`random_crop`) and horizontal flip, batched
    on the images' device."""
    images = random_crop(images, pad, generator, padding)
    return random_flip(images, generator) if flip else images


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None,
                  device="cpu", drop_last: bool = False):
    """Yield index tensors covering ``range(n)`` in batches, shuffled when a generator is given."""
    order = permutation(n, generator).to(device) if generator is not None else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(n)`` on the generator's device, drawn with it.

    On the CPU this is ``torch.randperm``. On an accelerator it is the stable argsort of ``n`` random
    62-bit keys drawn there: a sort that never round-trips through the host, whatever ``randperm``'s
    implementation for small ``n`` (older PyTorch drew those on the CPU and copied them over).
    """
    if generator.device.type == "cpu":
        return torch.randperm(n, generator=generator)
    keys = torch.randint(0, 2 ** 62, (n,), generator=generator, device=generator.device)
    return torch.argsort(keys, stable=True)


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device``: every random draw in training goes through one."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def save_indices(path, **indices) -> None:
    """Save named index arrays (``.npz``, atomically) so a split or labeled subset can be re-created exactly."""
    import io as _io
    from fmnist_core.core.io import write_bytes_atomic
    buffer = _io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v, dtype=np.int64) for k, v in indices.items()})
    write_bytes_atomic(path, buffer.getvalue())


# ------------------------------------------------------------------------------------ splits as tensors
@dataclass
class Split:
    """Images (``uint8``, on the device) and labels of one part of a dataset, with its normalisation."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple
    std: tuple

    def inputs(self, index=None) -> torch.Tensor:
        images = self.images if index is None else self.images[index]
        return normalize(images, self.mean, self.std)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


def make_splits(ds: ImageDataset, val_size: int, split_seed: int, test_images: int = 0) -> tuple[Splits, dict]:
    """The stratified train/validation split of the training images, and the test set (or a class-balanced
    subset of it), on the device; also returns the indices used."""
    train_idx, val_idx = stratified_split(ds.train_labels, val_size, split_seed, ds.num_classes)
    test_idx = (balanced_subset(ds.test_labels, test_images, split_seed, ds.num_classes) if test_images
                else np.arange(len(ds.test_labels)))

    def part(images, labels, idx=None):
        if idx is not None:
            idx = torch.as_tensor(idx, device=images.device)
            images, labels = images[idx], labels[idx]
        return Split(images, labels, ds.mean, ds.std)

    splits = Splits(part(ds.train_images, ds.train_labels, train_idx), part(ds.train_images, ds.train_labels, val_idx),
                    part(ds.test_images, ds.test_labels, test_idx))
    return splits, {"train": train_idx, "val": val_idx, "test": test_idx}


def subset(split: Split, count: int, seed: int, num_classes: int = 10) -> Split:
    """A class-balanced subset of ``count`` images (all of them when ``count`` is 0)."""
    if count == 0 or count >= len(split.labels):
        return split
    idx = torch.as_tensor(balanced_subset(split.labels, count, seed, num_classes), device=split.images.device)
    return Split(split.images[idx], split.labels[idx], split.mean, split.std)


def tta_augment(mean, std):
    """Weak augmentation of images normalised with ``mean``/``std`` whose padding is black, as in training."""
    black = normalize(torch.zeros(1, len(mean), 1, 1, dtype=torch.uint8), mean, std)

    def augment(inputs, generator):
        shift = black.to(inputs.device)
        return weak_augment(inputs - shift, generator) + shift
    return augment
