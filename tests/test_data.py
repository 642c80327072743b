"""Data: IDX parsing and verification, locating files, splits, batched augmentation, CIFAR-10 loading."""
import gzip
import hashlib
import pickle

import numpy as np
import pytest
import torch

from fmnist_core.core import data
from fmnist_core.core.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A tiny dataset in the real on-disk format, with its hashes pinned in place of the published ones."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(40) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(20) % 10}
    hashes = {}
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        hashes[stem] = hashlib.sha256(raw).hexdigest()
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(raw))
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", hashes)
    return tmp_path, arrays


def test_read_idx_roundtrip():
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(data.read_idx_bytes(idx_bytes(array), "x"), array)


@pytest.mark.parametrize("raw, message", [
    (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") * 3 + b"\x00" * 7, "truncated or corrupt"),
    (b"\x01\x02\x03\x04rest", "bad magic"),
    (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
])
def test_read_idx_rejects_bad_files(raw, message):
    with pytest.raises(DataError, match=message) as info:
        data.read_idx_bytes(raw, "the-file")
    assert "the-file" in str(info.value)


def test_load_from_directory_verifies_and_keeps_uint8(fake_fmnist):
    directory, arrays = fake_fmnist
    ds = data.load_fashion_mnist(directory, download=False)
    assert ds.train_images.shape == (40, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10


def test_corrupt_file_is_named(fake_fmnist):
    directory, arrays = fake_fmnist
    raw = bytearray(idx_bytes(arrays["train-images-idx3-ubyte"]))
    raw[100] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*SHA-256"):
        data.load_fashion_mnist(directory, download=False)


def test_truncated_gzip_is_named(fake_fmnist):
    directory, _ = fake_fmnist
    path = directory / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist(directory, download=False)


def test_explicit_directory_without_files_is_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="lacks the Fashion-MNIST files: train-labels"):
        data.locate_fashion_mnist(tmp_path)


def test_missing_data_lists_three_ways(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataError) as info:
        data.locate_fashion_mnist(download=False)
    text = str(info.value)
    assert "--data-dir" in text and "apt-get install dataset-fashion-mnist" in text and "torchvision" in text


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    train, val = data.stratified_split(labels, 50, seed=1)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 300
    assert np.bincount(labels[val], minlength=10).tolist() == [5] * 10
    np.testing.assert_array_equal(val, data.stratified_split(labels, 50, seed=1)[1])
    assert not np.array_equal(val, data.stratified_split(labels, 50, seed=2)[1])


@pytest.mark.parametrize("size, message", [(15, "multiple of 10"), (0, "multiple of 10"), (400, "only 30")])
def test_balanced_subset_refuses_impossible_sizes(size, message):
    with pytest.raises(ValueError, match=message):
        data.balanced_subset(np.repeat(np.arange(10), 30), size, seed=0)


def test_random_crop_is_a_per_image_translation():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = data.random_crop(images, pad=2, generator=data.make_generator(0))
    assert out.shape == images.shape
    for original, shifted in zip(images, out):
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        windows = [padded[:, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(shifted, w) for w in windows)


def test_weak_augment_varies_per_image_and_keeps_dtype():
    images = torch.arange(28 * 28, dtype=torch.uint8).view(1, 1, 28, 28).repeat(64, 1, 1, 1)
    out = data.weak_augment(images, data.make_generator(0))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert len({bytes(o.numpy()) for o in out}) > 10  # random per image, not per batch
    again = data.weak_augment(images, data.make_generator(0))
    assert torch.equal(out, again)


def test_flip_mirrors_about_half_of_the_images():
    images = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(1000, 1, 1, 1)
    flipped = (data.random_flip(images, data.make_generator(0))[:, 0, 0, 0] == 3).float().mean()
    assert 0.4 < float(flipped) < 0.6


def test_normalize_standardises_per_channel():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize(images, (0.5, 0.5, 0.0), (0.5, 0.25, 1.0))
    assert torch.allclose(out[:, 0], torch.tensor(1.0)) and torch.allclose(out[:, 1], torch.tensor(2.0))


def test_cifar10_loads_through_torchvision_format(tmp_path, monkeypatch):
    """The real torchvision loader on a tiny synthetic copy in the on-disk format of CIFAR-10."""
    from torchvision.datasets import CIFAR10
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    # torchvision checks every file's MD5: pin those of the synthetic files, so its check still runs.
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in names + ["batches.meta"]}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    ds = data.load_cifar10(tmp_path)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.class_names[0] == "airplane"
    first = np.frombuffer(pickle.loads((folder / "data_batch_1").read_bytes())["data"][0], np.uint8)
    np.testing.assert_array_equal(ds.train_images[0].numpy().reshape(-1), first)  # CHW order preserved
