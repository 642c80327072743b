"""Shared fixtures and tiny synthetic data for the test suite."""
import pytest
import torch

from fmnist_core.data import ImageDataset


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core CPU: a second intra-op thread costs more in contention than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patterns(n, seed=0, size=28, channels=1):
    """Class c (= index mod 10): a bright horizontal band at a class-specific height, plus noise (uint8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 50, (n, channels, size, size), generator=g, dtype=torch.uint8)
    for c in range(10):
        images[labels == c, :, 2 * c + 2:2 * c + 6] += 200
    return images, labels


def toy_dataset(n_train=200, n_test=20, name="toy"):
    """A 10-class :class:`ImageDataset` of :func:`patterns`, train and test drawn with different seeds."""
    train, train_labels = patterns(n_train)
    test, test_labels = patterns(n_test, seed=1)
    return ImageDataset(name, train, train_labels, test, test_labels, (0.3,), (0.3,),
                        tuple(str(c) for c in range(10)))
