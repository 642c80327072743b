"""Image files as input to ``fmnist-book predict``: PNG, JPEG and WebP, converted as Fashion-MNIST's images were made.

Which files: each input is a file, a folder (its PNG, JPEG and WebP files, by extension, not its sub-folders) or
a glob pattern (``"photos/*.jpg"``, quoted so that the shell leaves it alone); the images are taken in that order,
sorted by name within a folder or a pattern, each file once.

The conversion of each image, whatever its size (images of different sizes are accepted, each converted on its
own), for a model of ``C`` channels and ``S`` × ``S`` pixels (Fashion-MNIST: 1 and 28):

1. decoded with Pillow (only the PNG, JPEG and WebP decoders; the first frame of an animation), turned upright
   as its EXIF orientation says, transparent parts laid on white (Fashion-MNIST was made from product photos on
   a light background, whose levels were then inverted);
2. grey levels 0..255 (Pillow's ITU-R 601-2 luma; 16-bit images scaled down), or RGB for a 3-channel model;
3. padded to a square with its background level (the median of its outermost pixels), the image centred —
   the aspect ratio is kept;
4. resized to ``S`` × ``S`` (Lanczos; an image already that size is left as it is, so a PNG written from a
   Fashion-MNIST image gives back exactly that image);
5. inverted (255 - level) when ``invert`` is "yes", or when it is "auto" and the background is light (median
   border level above 127): Fashion-MNIST's garments are light on a black background, photos of clothes
   mostly dark on a light one. A 3-channel model's images are inverted only with "yes".

Refused, each with one message naming the file, before anything is written: a missing file, a file without an
image extension, a folder or a pattern with no image, a file that is not a PNG, JPEG or WebP image whatever its
extension, a truncated or corrupt image, and an image of more than :data:`MAX_PIXELS` pixels (a decompression
bomb: its size is read from its header before it is decoded).
"""
from __future__ import annotations

import glob
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist_core.core.errors import FmnistBookError, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP")  # a camera's multi-picture JPEG (MPO) opens as JPEG
MAX_PIXELS = 50_000_000  # a 50-megapixel photo; more is refused before decoding
INVERT_CHOICES = ("auto", "yes", "no")
LIGHT_BACKGROUND = 127  # a median border level above this is a light background
_GLOB_CHARS = set("*?[")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


@dataclass
class ConvertedImages:
    """The converted images (uint8, N x C x S x S), the files they came from and which were inverted."""

    files: list[Path]
    images: np.ndarray
    inverted: list[bool]

    def summary(self, invert: str) -> str:
        """One line: how many images were converted and inverted, and why."""
        n, flipped = len(self.files), sum(self.inverted)
        size = "x".join(str(s) for s in self.images.shape[2:])
        if invert == "auto":
            which = (f"inverted {flipped} with a light background (light-on-dark like Fashion-MNIST), kept {n - flipped}"
                     f" with a dark one; the CSV's 'inverted' column names them; --invert yes|no overrides")
        else:
            which = f"inverted {'all' if invert == 'yes' else 'none'} (--invert {invert})"
        return f"{n} image file(s) converted to {size} grey levels: {which}"


def is_image_input(inputs) -> bool:
    """Whether ``inputs`` name image files (a folder, a pattern, an image file) rather than one ``.npy`` file."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return not (len(items) == 1 and Path(items[0]).suffix.lower() == ".npy")


def expand_inputs(inputs) -> list[Path]:
    """The image files that ``inputs`` (files, folders, glob patterns) name, in order, each once.

    Raises
    ------
    FmnistBookError
        For a missing file, a file without an image extension, or a folder or pattern with no image.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise FmnistBookError("no input given: name image files, a folder of images, a pattern, or a .npy file")
    files: dict[Path, None] = {}
    for item in items:
        files.update(dict.fromkeys(_expand_one(str(item))))
    return list(files)


def _expand_one(item: str) -> list[Path]:
    path = Path(item)
    wanted = "PNG, JPEG or WebP images (" + ", ".join(IMAGE_SUFFIXES) + ")"
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FmnistBookError(f"{path}: the folder holds no {wanted}")
        return found
    if not path.exists() and _GLOB_CHARS & set(item):
        found = sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_SUFFIXES
                       and Path(p).is_file())
        if not found:
            raise FmnistBookError(f"{item}: the pattern matches no {wanted}")
        return found
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise FmnistBookError(f"{path}: the input must be a .npy file (saved with numpy.save) or {wanted}")
    if not path.is_file():
        raise FmnistBookError(f"{path}: input file not found")
    return [path]


def decode(path: Path, channels: int = 1) -> np.ndarray:
    """The image of ``path`` as uint8 grey levels (H, W), or (H, W, 3) RGB for ``channels`` = 3.

    Raises
    ------
    FmnistBookError
        For a file that is not a PNG, JPEG or WebP image, a truncated or corrupt one, or one over
        :data:`MAX_PIXELS` pixels; the message names the file.
    """
    Image.init()  # registers the WebP and MPO decoders (Image.open loads only a few by itself)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PILLOW_FORMATS) as image:
                _check_size(path, image.size)
                image.load()
                return _pixels(ImageOps.exif_transpose(image), channels)
    except UnidentifiedImageError:
        raise FmnistBookError(f"{path}: not a PNG, JPEG or WebP image (another format, or not an image at all, "
                              f"whatever its extension)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FmnistBookError(f"{path}: refused as a possible decompression bomb: more pixels than Pillow's limit "
                              f"({Image.MAX_IMAGE_PIXELS:,}); make the image smaller") from None
    except MemoryError:
        raise FmnistBookError(f"{path}: too large to decode in memory; make the image smaller") from None
    except _DECODE_ERRORS as err:
        raise FmnistBookError(f"{path}: cannot be decoded, the image is truncated or corrupt ({one_line(err)})") from None


def _check_size(path: Path, size) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise FmnistBookError(f"{path}: {width} x {height} pixels is over the limit of {MAX_PIXELS:,} (a possible "
                              f"decompression bomb, or a needlessly large photo); make the image smaller")
    if width * height == 0:
        raise FmnistBookError(f"{path}: the image is empty ({width} x {height} pixels)")


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    if image.mode == "I" or image.mode.startswith("I;16"):  # a 16-bit PNG
        levels = np.asarray(image, dtype=np.float64) / 257.0
        grey = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        return grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    if "A" in image.mode or "transparency" in image.info:  # transparent parts laid on white
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if channels == 1:
        image = image.convert("RGB").convert("L") if image.mode not in ("L", "RGB") else image.convert("L")
    else:
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def border_level(pixels: np.ndarray) -> np.ndarray:
    """The median level of the outermost rows and columns, per channel (the background's level)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(border.reshape(len(border), -1), axis=0)


def to_square(pixels: np.ndarray, size: int, background: np.ndarray) -> np.ndarray:
    """Pad ``pixels`` to a square with ``background`` (the image centred), then resize to ``size`` x ``size``."""
    height, width = pixels.shape[:2]
    side = max(height, width)
    if height != width:
        fill = np.rint(background).astype(np.uint8).reshape((1, 1) + pixels.shape[2:])
        square = np.empty((side, side) + pixels.shape[2:], dtype=np.uint8)
        square[...] = fill
        top, left = (side - height) // 2, (side - width) // 2
        square[top:top + height, left:left + width] = pixels
        pixels = square
    if side == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def convert(path: Path, channels: int, size: int, invert: str) -> tuple[np.ndarray, bool]:
    """One file converted for a model of ``channels`` x ``size`` x ``size``: (uint8 C x S x S, inverted?)."""
    pixels = decode(path, channels)
    background = border_level(pixels)
    flip = invert == "yes" or (invert == "auto" and channels == 1 and float(background.mean()) > LIGHT_BACKGROUND)
    square = to_square(pixels, size, background)
    square = 255 - square if flip else square
    return (square[None] if square.ndim == 2 else square.transpose(2, 0, 1)), flip


def read_images(inputs, channels: int = 1, size: int = 28, invert: str = "auto") -> ConvertedImages:
    """Every image that ``inputs`` name, converted (see the module docstring); any bad file is refused.

    Parameters
    ----------
    inputs : path, str or list of them
        Image files, folders of images and glob patterns.
    channels, size : int
        The model's input: 1 (grey) or 3 (RGB) channels of ``size`` x ``size`` pixels.
    invert : str
        "auto" (from the border), "yes" or "no".

    Returns
    -------
    ConvertedImages
    """
    if invert not in INVERT_CHOICES:
        raise FmnistBookError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    if channels not in (1, 3):
        raise FmnistBookError(f"image files can be fed to a model of 1 or 3 channels, not {channels}")
    files = expand_inputs(inputs)
    converted = [convert(path, channels, size, invert) for path in files]
    return ConvertedImages(files, np.stack([c[0] for c in converted]), [c[1] for c in converted])
