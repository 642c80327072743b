"""``fmnist-book predict``: the same labels for the same images in every accepted form, from a classifier of
the classification chapter and a semi-supervised model; every bad input refused with a clear message and
nothing written; no overwriting without force; no pickle ever loaded."""
import argparse
import csv
import pickle
import shutil

import numpy as np
import pytest
import torch

from fmnist_core.core.data import CLASS_NAMES
from fmnist_core.chapters.semisupervised import model as semisup
from fmnist_core.core.errors import FmnistBookError
from fmnist_core.pipeline.predict import add_predict_parser, predict
from fmnist_core.core.loop import load_trained
from fmnist_core.core.models import rebuild
from fmnist_core.core.data import Split


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(toy_fashion_dataset):
    return toy_fashion_dataset.test_images.numpy()  # (30, 1, 28, 28) uint8


def forms(images):
    """Every accepted form of the same images: three shapes, uint8 / float32 / float64 / int64."""
    n = len(images)
    unit = images.astype(np.float32) / 255
    return {"u8_nhw": images[:, 0], "u8_nchw": images, "u8_flat": images.reshape(n, 784),
            "f32_nhw": unit[:, 0], "f32_nchw": unit, "f32_flat": unit.reshape(n, 784),
            "f64_nchw": images.astype(np.float64) / 255, "i64_nhw": images[:, 0].astype(np.int64)}


def saved(tmp_path, name, array):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return path


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_round_trip_same_labels_in_every_form(tmp_path, lenet_run_dir, images):
    model, state = load_trained(lenet_run_dir / "models" / "lenet_avg" / "best.pt", rebuild)
    split = Split(torch.from_numpy(images), torch.zeros(len(images)), (0.3,), (0.3,))
    expected = model(split.inputs()).argmax(1).numpy()  # the chapter's own standardisation
    for name, array in forms(images).items():
        out = predict(lenet_run_dir, saved(tmp_path, name, array), tmp_path / f"{name}_labels.npy")
        labels = np.load(out, allow_pickle=False)
        assert labels.dtype == np.int64 and np.array_equal(labels, expected), name
        rows = read_csv(predict(lenet_run_dir, tmp_path / f"{name}.npy", tmp_path / f"{name}.csv"))
        assert [int(r["label"]) for r in rows] == expected.tolist()
    assert list(rows[0]) == ["index", "label", "class_name"] + [f"prob_{c}" for c in CLASS_NAMES]
    assert [r["class_name"] for r in rows] == [CLASS_NAMES[k] for k in expected]
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASS_NAMES] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)


def test_tta_votes_reproducibly(tmp_path, lenet_run_dir, images):
    path = saved(tmp_path, "x", images)
    a = read_csv(predict(lenet_run_dir, path, tmp_path / "a.csv", tta=4))
    b = read_csv(predict(lenet_run_dir, path, tmp_path / "b.csv", tta=4))
    plain = read_csv(predict(lenet_run_dir, path, tmp_path / "c.csv"))
    assert a == b and a != plain
    with pytest.raises(FmnistBookError, match="tta"):
        predict(lenet_run_dir, path, tmp_path / "d.csv", tta=-1)


def test_semisupervised_model_round_trip(tmp_path, toy_fashion_dataset, images):
    """A unit-input model (images / 255) behind the same command, with and without TTA."""
    cfg = semisup.SemiSupConfig.from_overrides({
        "model": "semisup_vae", "epochs": 1, "batch_size": 16, "val_size": 50, "num_labels": 20, "latent_dim": 8,
        "branch_channels": [4, 8], "device": "cpu", "eval_batch_size": 100, "tta": 0})
    run = tmp_path / "semisup"
    semisup.train_semisup(cfg, toy_fashion_dataset, run / "models" / "semisup_vae", log=lambda *_: None)
    rebuilt, _ = semisup.load_trained_semisup(run / "models" / "semisup_vae" / "best.pt")
    for tta in (0, 3):
        expected = semisup.predict_semisup_proba(rebuilt, torch.from_numpy(images), tta=tta).argmax(1).numpy()
        for name, array in forms(images).items():
            labels = np.load(predict(run, saved(tmp_path, name, array), tmp_path / f"{name}{tta}.npy", tta=tta))
            assert np.array_equal(labels, expected), (name, tta)


def bad_inputs(tmp_path, images, sentinel):
    """(file, part of the expected message) for every input that must be refused."""
    unit = images.astype(np.float32) / 255
    nan, inf = unit.copy(), unit.copy()
    nan[0, 0, 0, 0], inf[1, 0, 3, 3] = np.nan, np.inf
    text = tmp_path / "text.npy"
    text.write_text("0,1,2\n3,4,5\n")
    pickled = tmp_path / "pickled.npy"
    pickled.write_bytes(pickle.dumps({"images": images}))
    archive = tmp_path / "archive.npy"
    with open(archive, "wb") as handle:
        np.savez(handle, images=images)
    # Unpickling this object would create the sentinel file: it must never be unpickled.
    hostile = np.empty(1, dtype=object)
    hostile[0] = Hostile(str(sentinel))
    hostile_path = tmp_path / "hostile.npy"
    np.save(hostile_path, hostile, allow_pickle=True)
    return [
        (saved(tmp_path, "shape_27", images[:, :, :27, :27]), "shape"),
        (saved(tmp_path, "shape_rgb", np.repeat(images, 3, axis=1)), "shape"),
        (saved(tmp_path, "shape_1d", images.reshape(-1)), "shape"),
        (saved(tmp_path, "shape_783", images.reshape(len(images), -1)[:, :783]), "shape"),
        (saved(tmp_path, "nan", nan), "NaN"), (saved(tmp_path, "inf", inf), "infinite"),
        (saved(tmp_path, "float_255", images.astype(np.float32)), "divide by 255"),
        (saved(tmp_path, "negative", unit - 0.5), "outside"),
        (saved(tmp_path, "int_big", images.astype(np.int64) * 2), "outside"),
        (saved(tmp_path, "empty", images[:0]), "empty"),
        (saved(tmp_path, "bool", images > 100), "dtype bool"),
        (saved(tmp_path, "strings", np.array(["a", "b"])), "dtype"),
        (saved(tmp_path, "complex", unit.astype(np.complex64)), "dtype"),
        (text, "not a NumPy array"), (pickled, "not a NumPy array"), (archive, ".npz"),
        (hostile_path, "object array"), (tmp_path / "missing.npy", "not found"),
    ]


class Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_inputs_are_refused_and_nothing_is_written(tmp_path, lenet_run_dir, images):
    sentinel = tmp_path / "unpickled"
    for path, message in bad_inputs(tmp_path, images, sentinel):
        for out in (tmp_path / "out.npy", tmp_path / "out.csv"):
            with pytest.raises(FmnistBookError, match=message) as err:
                predict(lenet_run_dir, path, out)
            assert "expected" in str(err.value) or "numpy.save" in str(err.value) or message == "not found"
            assert not out.exists(), path.name
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []


def test_input_must_be_npy(tmp_path, lenet_run_dir, images):
    path = tmp_path / "x.txt"
    np.save(tmp_path / "x.npy", images)
    shutil.copy(tmp_path / "x.npy", path)
    with pytest.raises(FmnistBookError, match=r"\.npy file"):
        predict(lenet_run_dir, path, tmp_path / "out.npy")


def test_outputs_are_never_overwritten_without_force(tmp_path, lenet_run_dir, images):
    path = saved(tmp_path, "x", images)
    out = tmp_path / "labels.npy"
    out.write_bytes(b"precious")
    with pytest.raises(FmnistBookError, match="--force"):
        predict(lenet_run_dir, path, out)
    assert out.read_bytes() == b"precious"
    predict(lenet_run_dir, path, out, force=True)
    assert np.load(out).shape == (len(images),)
    for bad in ("labels.txt", "labels"):
        with pytest.raises(FmnistBookError, match="unknown output type"):
            predict(lenet_run_dir, path, tmp_path / bad)
        assert not (tmp_path / bad).exists()


def test_choosing_the_model(tmp_path, lenet_run_dir, images):
    path = saved(tmp_path, "x", images)
    two = tmp_path / "two"
    shutil.copytree(lenet_run_dir, two)
    shutil.copytree(two / "models" / "lenet_avg", two / "models" / "copy")
    with pytest.raises(FmnistBookError, match="several models.*copy, lenet_avg"):
        predict(two, path, tmp_path / "a.npy")
    with pytest.raises(FmnistBookError, match="no finished model 'vgg'"):
        predict(two, path, tmp_path / "a.npy", model="vgg")
    a = np.load(predict(two, path, tmp_path / "a.npy", model="copy"))
    b = np.load(predict(lenet_run_dir / "models" / "lenet_avg", path, tmp_path / "b.npy"))  # a model's own directory
    assert np.array_equal(a, b)
    with pytest.raises(FmnistBookError, match="not a finished run"):
        predict(tmp_path, path, tmp_path / "c.npy")


def test_command_line(tmp_path, lenet_run_dir, images, capsys):
    parser = argparse.ArgumentParser(prog="fmnist-book")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    path = saved(tmp_path, "x", images)
    args = parser.parse_args(["predict", "--run", str(lenet_run_dir), "--input", str(path), "--output",
                              str(tmp_path / "out.csv"), "--tta", "2"])
    assert args.handler(args) == 0
    assert "out.csv" in capsys.readouterr().out
    assert len(read_csv(tmp_path / "out.csv")) == len(images)
    with pytest.raises(FmnistBookError, match="--force"):
        args.handler(args)
