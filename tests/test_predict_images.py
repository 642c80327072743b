"""``fmnist-book predict`` on image files: PNG, JPEG and WebP files written by Pillow from test images give the
labels of the ``.npy`` path — PNG and lossless WebP exactly (the same pixels), JPEG (quality 95) within the
stated tolerance — light-background images are inverted by ``--invert auto``, other sizes and aspect ratios are
converted, and every bad file is refused with one message naming it and nothing written."""
import argparse
import csv
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fmnist_core.core.data import FASHION_MNIST_SHA256, locate_fashion_mnist, read_verified_idx
from fmnist_core.core.errors import FmnistBookError
from fmnist_core.pipeline import image_input
from fmnist_core.pipeline.image_input import read_images
from fmnist_core.pipeline.predict import add_predict_parser, predict

pytestmark = pytest.mark.usefixtures("one_thread")

# The conversion's stated tolerance for JPEG at quality 95 (measured on 200 Fashion-MNIST test images: largest
# pixel difference 9 grey levels, mean 0.9, every label the same).
JPEG_MAX_LEVELS, JPEG_MEAN_LEVELS, JPEG_LABELS_AGREE = 16, 2.0, 0.95


@pytest.fixture(scope="module")
def grey(toy_fashion_dataset):
    """40 Fashion-MNIST test images (uint8, N x 28 x 28) where the dataset is installed, else the toy images."""
    stem = "t10k-images-idx3-ubyte"
    try:
        return read_verified_idx(locate_fashion_mnist(download=False)[stem], stem, FASHION_MNIST_SHA256[stem])[:40]
    except FmnistBookError:
        return toy_fashion_dataset.test_images.numpy()[:, 0]


def write_images(folder, images, suffix, **options):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i:03d}{suffix}", **options)
    return folder


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_image_files_give_the_labels_of_the_npy_path(tmp_path, lenet_run_dir, grey):
    np.save(tmp_path / "x.npy", grey)
    expected = np.load(predict(lenet_run_dir, tmp_path / "x.npy", tmp_path / "expected.npy"))
    rgb = np.repeat(grey[..., None], 3, axis=3)
    exact = {"png": write_images(tmp_path / "png", grey, ".png"),
             "rgb_png": write_images(tmp_path / "rgb", rgb, ".png"),
             "webp": write_images(tmp_path / "webp", grey, ".webp", lossless=True),
             "negative_png": write_images(tmp_path / "negative", 255 - grey, ".png")}  # dark on light: inverted
    for name, folder in exact.items():
        converted = read_images(folder)
        assert np.array_equal(converted.images[:, 0], grey), name
        assert converted.inverted == [name == "negative_png"] * len(grey), name
        labels = np.load(predict(lenet_run_dir, folder, tmp_path / f"{name}.npy", log=lambda _: None))
        assert np.array_equal(labels, expected), name
    jpeg = write_images(tmp_path / "jpeg", grey, ".jpg", quality=95)
    difference = np.abs(read_images(jpeg).images[:, 0].astype(int) - grey)
    assert difference.max() <= JPEG_MAX_LEVELS and difference.mean() <= JPEG_MEAN_LEVELS
    labels = np.load(predict(lenet_run_dir, str(jpeg / "*.jpg"), tmp_path / "jpeg.npy", log=lambda _: None))
    assert (labels == expected).mean() >= JPEG_LABELS_AGREE


def test_csv_names_each_file_and_says_what_auto_did(tmp_path, lenet_run_dir, grey):
    first = write_images(tmp_path / "dark", grey[:3], ".png")
    light = tmp_path / "light.png"
    Image.fromarray(255 - grey[3]).save(light)
    lines = []
    out = predict(lenet_run_dir, [first / "img001.png", first, light], tmp_path / "out.csv", log=lines.append)
    rows = read_csv(out)
    assert [r["file"] for r in rows] == [str(first / f"img00{i}.png") for i in (1, 0, 2)] + [str(light)]
    assert [r["inverted"] for r in rows] == ["no", "no", "no", "yes"]
    assert list(rows[0])[:5] == ["index", "file", "inverted", "label", "class_name"]
    assert "4 image file(s)" in lines[0] and "inverted 1 with a light background" in lines[0]
    for invert, flags in (("yes", ["yes"] * 4), ("no", ["no"] * 4)):
        rows = read_csv(predict(lenet_run_dir, [first, light], tmp_path / f"{invert}.csv", invert=invert,
                                log=lines.append))
        assert [r["inverted"] for r in rows] == flags and f"--invert {invert}" in lines[-1]


def test_sizes_and_aspect_ratios_are_converted(tmp_path, grey):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(grey[0]).resize((84, 84), Image.Resampling.NEAREST).save(folder / "a_large.png")
    wide = np.full((14, 28), 255, np.uint8)  # a light 28 x 14 image: padded above and below with its level
    wide[4:10, 6:22] = 0
    Image.fromarray(wide).save(folder / "b_wide.png")
    tall = np.zeros((40, 20), np.uint8)  # dark, 20 x 40: padded left and right, then resized
    tall[5:35, 5:15] = 200
    Image.fromarray(tall).save(folder / "c_tall.jpg", quality=100)
    converted = read_images(folder)
    large, wide_out, tall_out = converted.images[:, 0].astype(int)
    assert np.abs(large - grey[0]).mean() < 3  # Lanczos from 3x nearest-neighbour is close to the original
    assert converted.inverted == [False, True, False]
    assert (wide_out[:7] == 0).all() and (wide_out[21:] == 0).all() and wide_out[11, 14] == 255  # inverted
    assert (tall_out[:, :4] < 8).all() and (tall_out[:, -4:] < 8).all() and tall_out[14, 14] > 150


def png_header_only(width, height):
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's opening)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_inputs(tmp_path, grey):
    """(inputs, part of the expected message, the file it must name) for every input that must be refused."""
    good = write_images(tmp_path / "good", grey[:2], ".png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    names = ("text.png", "gif.png", "cut.png", "cut.jpg", "crc.png", "bomb.png", "large.png")
    files = {name: tmp_path / name for name in names}
    files["text.png"].write_text("not an image")
    Image.fromarray(grey[0]).save(files["gif.png"], format="GIF")
    png, jpg = (good / "img000.png").read_bytes(), tmp_path / "whole.jpg"
    Image.fromarray(grey[0]).save(jpg)
    files["cut.png"].write_bytes(png[:len(png) // 2])
    files["cut.jpg"].write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
    idat = png.index(b"IDAT") + 8
    files["crc.png"].write_bytes(png[:idat] + bytes(b ^ 0xFF for b in png[idat:idat + 8]) + png[idat + 8:])
    files["bomb.png"].write_bytes(png_header_only(100_000, 100_000))  # over Pillow's limit, refused as it opens
    files["large.png"].write_bytes(png_header_only(20_000, 3_000))  # 60 megapixels: over ours, read from the header
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    return [([empty], "holds no PNG, JPEG or WebP", empty), ([str(tmp_path / "none" / "*.png")], "matches no", "none"),
            ([good, notes], "must be a .npy file", notes), ([tmp_path / "gone.png"], "not found", "gone.png"),
            ([good, files["text.png"]], "not a PNG, JPEG or WebP image", "text.png"),
            ([files["gif.png"]], "not a PNG, JPEG or WebP image", "gif.png"),
            ([good, files["cut.png"]], "truncated or corrupt", "cut.png"),
            ([files["cut.jpg"]], "truncated or corrupt", "cut.jpg"), ([files["crc.png"]], "truncated or corrupt", "crc.png"),
            ([files["bomb.png"]], "decompression bomb", "bomb.png"),
            ([good, files["large.png"]], "20000 x 3000 pixels is over the limit of 50,000,000", "large.png")]


def test_bad_image_files_are_refused_and_nothing_is_written(tmp_path, lenet_run_dir, grey):
    for inputs, message, named in bad_inputs(tmp_path, grey):
        for out in (tmp_path / "out.npy", tmp_path / "out.csv"):
            with pytest.raises(FmnistBookError, match=message) as err:
                predict(lenet_run_dir, inputs, out)
            assert str(named) in str(err.value) and "\n" not in str(err.value)
            assert not out.exists(), inputs
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_pillows_own_bomb_limit_becomes_a_clear_message(tmp_path, lenet_run_dir, grey, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3,600 pixels: over Pillow's warning and error limits
    with pytest.raises(FmnistBookError, match=r"big\.png: refused as a possible decompression bomb"):
        predict(lenet_run_dir, [path], tmp_path / "out.csv")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the warning limit only
    with pytest.raises(FmnistBookError, match="decompression bomb"):
        predict(lenet_run_dir, [path], tmp_path / "out.csv")
    monkeypatch.setattr(image_input, "MAX_PIXELS", 3000)  # our own limit, read from the header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(FmnistBookError, match="60 x 60 pixels is over the limit of 3,000"):
        predict(lenet_run_dir, [path], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_command_line_takes_files_folders_and_patterns(tmp_path, lenet_run_dir, grey, capsys):
    parser = argparse.ArgumentParser(prog="fmnist-book")
    add_predict_parser(parser.add_subparsers(dest="command", required=True))
    folder = write_images(tmp_path / "shots", grey[:4], ".png")
    args = parser.parse_args(["predict", "--run", str(lenet_run_dir), "--input", str(folder / "img000.png"),
                              str(folder / "img00[12].png"), str(folder), "--invert", "no",
                              "--output", str(tmp_path / "out.csv")])
    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "4 image file(s) converted to 28x28 grey levels: inverted none (--invert no)" in output
    assert [r["file"] for r in read_csv(tmp_path / "out.csv")] == [str(folder / f"img00{i}.png") for i in (0, 1, 2, 3)]
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--run", "r", "--input", "x.png", "--output", "o.csv", "--invert", "maybe"])
