"""``fmnist-book predict``: label images — a ``.npy`` array or image files — with any trained classifier of the book.

The checkpoint's config says how to rebuild the model (``model``, ``in_channels``, ``image_size``,
``class_names``, and for the semi-supervised models their architecture) and how to feed it (``input``:
"unit" = images / 255, or "standardised" = ``(images / 255 - mean) / std``, the default).

Accepted input: a ``.npy`` file (``np.save``) holding one array of shape (N, H, W) (one channel only),
(N, C, H, W) or (N, C*H*W), with

* ``uint8`` or any other integer dtype: grey levels 0..255 (an ``int64`` array from a list of Python ints
  is accepted as long as every value is in [0, 255]);
* a float dtype: intensities in [0, 1] (no NaN or infinity).

Anything else (booleans, strings, object arrays, pickles, ``.npz`` archives, text) is refused with one
message saying what was expected; nothing is ever unpickled (``allow_pickle=False``).

Or image files (PNG, JPEG, WebP): files, folders and glob patterns, converted the way Fashion-MNIST's images
were made (grey levels, padded to a square, resized, inverted when their background is light); see
:mod:`fmnist_core.pipeline.image_input` for the rules and what is refused.
"""
from __future__ import annotations

import csv
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from fmnist_core.chapters.semisupervised import model as semisup
from fmnist_core.chapters.semisupervised.model import class_probabilities
from fmnist_core.core.errors import FmnistBookError, one_line
from fmnist_core.core.io import write_bytes_atomic
from fmnist_core.core.models import rebuild
from fmnist_core.core.loop import load_trained
from fmnist_core.core.train import resolve_device
from fmnist_core.pipeline.image_input import INVERT_CHOICES, is_image_input, read_images

OUTPUT_SUFFIXES = (".npy", ".csv")
_REQUIRED_KEYS = ("model", "in_channels", "image_size", "class_names")


# ------------------------------------------------------------------------------------------ the model
def find_checkpoint(run_dir, model: str | None = None) -> Path:
    """The ``best.pt`` to predict with.

    ``run_dir/best.pt`` when ``run_dir`` is one model's directory (and ``model`` is not given or is that
    directory's name); else ``run_dir/models/<model>/best.pt`` (the classification chapter's layout), where
    ``model`` may be left out only when a single model has finished.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmnistBookError(f"{run_dir}: no such run directory")
    if (run_dir / "best.pt").is_file() and model in (None, run_dir.name):
        return run_dir / "best.pt"
    available = sorted(p.parent.name for p in (run_dir / "models").glob("*/best.pt"))
    if model is not None:
        if model not in available:
            raise FmnistBookError(f"{run_dir}: no finished model {model!r} (no models/{model}/best.pt); "
                                  f"available: {', '.join(available) or 'none'}")
        return run_dir / "models" / model / "best.pt"
    if len(available) == 1:
        return run_dir / "models" / available[0] / "best.pt"
    if not available:
        raise FmnistBookError(f"{run_dir}: no best.pt in it nor in models/*/: not a finished run")
    raise FmnistBookError(f"{run_dir} holds several models; choose one with --model: {', '.join(available)}")


def rebuild_classifier(config: dict) -> torch.nn.Module:
    """Build any classifier of the book from its checkpoint config (registry models and semi-supervised)."""
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise FmnistBookError(f"the checkpoint is not a classifier of the book: its config lacks "
                              f"{', '.join(missing)}")
    try:
        if config["model"] in semisup.REBUILDABLE:
            return semisup.rebuild_semisup(config)
        return rebuild(config)
    except (KeyError, ValueError) as err:
        raise FmnistBookError(f"cannot rebuild model {config['model']!r} from the checkpoint: {err}") from None


# ------------------------------------------------------------------------------------------ the input
def _expected(image_shape) -> str:
    c, h, w = image_shape
    forms = ([f"(N, {h}, {w})"] if c == 1 else []) + [f"(N, {c}, {h}, {w})", f"(N, {c * h * w})"]
    return (f"an array of shape {' or '.join(forms)}, uint8 (or integer) grey levels in [0, 255] or floats "
            f"in [0, 1]")


def _starts_like_npy(path: Path) -> bool:
    """Whether the file begins with NumPy's magic number, or with part of it when cut short."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return bool(head) and b"\x93NUMPY".startswith(head)


def read_array(path) -> np.ndarray:
    """Load one array from a ``.npy`` file without unpickling anything; any other file is refused."""
    path = Path(path)
    if path.suffix.lower() != ".npy":
        raise FmnistBookError(f"{path}: the input must be a .npy file (saved with numpy.save)")
    if not path.is_file():
        raise FmnistBookError(f"{path}: input file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:  # pickles, object arrays, text and cut-off .npy files land here
        if "Object arrays" in str(err):
            reason = "it holds Python objects (an object array), which are never unpickled"
        elif _starts_like_npy(path):
            reason = f"it is a truncated or corrupt .npy file ({one_line(err)})"
        else:
            reason = "it is not a NumPy array file (text or a pickle?)"
        raise FmnistBookError(f"{path}: cannot be read: {reason}; save a numeric array with numpy.save") from None
    except MemoryError as err:  # a corrupt header can declare any shape
        raise FmnistBookError(f"{path}: cannot be read: {one_line(err)} (a corrupt .npy header, or too large for "
                              "memory)") from None
    except (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:  # BadZipFile: a corrupt .npz
        raise FmnistBookError(f"{path}: not a readable .npy file ({one_line(err)})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise FmnistBookError(f"{path}: is an .npz archive, not one array; save the images with numpy.save")
    return array


def images_from_array(array: np.ndarray, image_shape, source: str = "input") -> torch.Tensor:
    """Check an array of images and return it as float32 (N, C, H, W) in [0, 1] on the CPU.

    Raises
    ------
    FmnistBookError
        For an empty array, a shape or dtype other than those accepted, NaN or infinite values, or values
        outside [0, 255] (integers) or [0, 1] (floats); the message says what was expected.
    """
    expected = _expected(image_shape)
    kind = array.dtype.kind
    if kind not in "uif":
        raise FmnistBookError(f"{source}: dtype {array.dtype} is not supported; expected {expected}")
    if array.size == 0:
        raise FmnistBookError(f"{source}: the array is empty (shape {array.shape}); expected {expected}")
    c, h, w = image_shape
    accepted = ((array.ndim == 4 and array.shape[1:] == (c, h, w)) or (array.ndim == 2 and array.shape[1] == c * h * w)
                or (array.ndim == 3 and c == 1 and array.shape[1:] == (h, w)))
    if not accepted:
        raise FmnistBookError(f"{source}: shape {array.shape} is not accepted; expected {expected}")
    if kind == "f" and not np.isfinite(array).all():
        raise FmnistBookError(f"{source}: contains NaN or infinite values; expected {expected}")
    low, high = array.min(), array.max()
    top = 1 if kind == "f" else 255
    if low < 0 or high > top:
        looks_0_255 = kind == "f" and low >= 0 and high <= 255
        hint = " (0-255 grey levels stored as floats? divide by 255 or use uint8)" if looks_0_255 else ""
        raise FmnistBookError(f"{source}: values range over [{low}, {high}], outside [0, {top}] for dtype "
                              f"{array.dtype}{hint}; expected {expected}")
    images = torch.from_numpy(array.reshape(len(array), c, h, w).astype(np.float32))
    return images if kind == "f" else images / 255.0


# ----------------------------------------------------------------------------------------- the output
def check_output(path, force: bool = False) -> Path:
    """Refuse an unknown extension, a directory, or an existing file unless ``force``."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise FmnistBookError(f"{path}: unknown output type {path.suffix or '(none)'!r}; use .npy (labels) or "
                              f".csv (labels, class names and probabilities)")
    if path.is_dir():
        raise FmnistBookError(f"{path}: is a directory")
    blocker = next((p for p in path.parents if p.exists()), None)  # the nearest existing path above it
    if blocker is not None and not blocker.is_dir():
        raise FmnistBookError(f"{path}: cannot be written, {blocker} is a file, not a directory")
    if path.exists() and not force:
        raise FmnistBookError(f"{path}: exists; pass --force to overwrite it")
    return path


def predictions_bytes(probs: np.ndarray, class_names, suffix: str, files=None, inverted=None) -> bytes:
    """``.npy``: the int64 labels; ``.csv``: index, label, class_name and prob_<class> for every class, after
    index the columns file and inverted when the images came from ``files``."""
    labels = probs.argmax(axis=1).astype(np.int64)
    if suffix == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, labels)
        return buffer.getvalue()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    named = ["file", "inverted"] if files is not None else []
    writer.writerow(["index", *named, "label", "class_name", *(f"prob_{name}" for name in class_names)])
    for i, (label, row) in enumerate(zip(labels, probs)):
        source = [str(files[i]), "yes" if inverted[i] else "no"] if files is not None else []
        writer.writerow([i, *source, int(label), class_names[label], *(f"{p:.6f}" for p in row)])
    return text.getvalue().encode()


# ------------------------------------------------------------------------------------------ the command
def predict(run_dir, input_path, output_path, model: str | None = None, tta: int = 0, force: bool = False,
            device: str = "auto", invert: str = "auto", log=print) -> Path:
    """Label the images of ``input_path`` with a finished run's best checkpoint; write ``output_path``.

    Parameters
    ----------
    run_dir : path
        A run directory with ``models/<model>/best.pt``, or a directory holding ``best.pt`` itself.
    input_path : path, str or list of them
        A ``.npy`` array of images, or image files, folders of them and glob patterns (see the module docstring
        for what is accepted).
    output_path : path
        ``.npy`` (int64 labels) or ``.csv`` (index, label, class_name, prob_<class>...), written atomically.
    model : str, optional
        Which model of the run; required when it has several.
    tta : int
        Extra shifted/flipped copies whose softmax is averaged with the original's (0 = none).
    force : bool
        Overwrite an existing ``output_path``.
    device : str
        ``auto`` | ``cpu`` | ``cuda``.
    invert : str
        For image files: ``auto`` (invert those with a light background), ``yes`` or ``no``.
    log : callable
        Receives one line on how image files were converted.

    Returns
    -------
    Path
        ``output_path``. Nothing is written when anything is refused.
    """
    output_path = check_output(output_path, force)
    device = _check_options(tta, device, invert)
    items = [input_path] if isinstance(input_path, (str, Path)) else list(input_path)
    # An unreadable .npy is refused before the model is loaded; image files are converted for the model's input.
    array = None if is_image_input(items) else read_array(items[0])
    net, state = load_trained(find_checkpoint(run_dir, model), rebuild_classifier, device)
    config = state["config"]
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    converted = read_images(items, shape[0], shape[1], invert) if array is None else None
    source = str(items[0]) if array is not None else "image files"
    images = images_from_array(array if array is not None else converted.images, shape, source).to(device)
    probs = class_probabilities(net, config, images, tta).numpy()
    named = (converted.files, converted.inverted) if converted else (None, None)
    write_bytes_atomic(output_path, predictions_bytes(probs, list(config["class_names"]), output_path.suffix.lower(),
                                                      *named))
    if converted is not None:
        log(converted.summary(invert))
    return output_path


def _check_options(tta, device: str, invert: str):
    """Refuse a bad ``tta``, ``device`` or ``invert``; returns the device to use."""
    if not isinstance(tta, int) or tta < 0:
        raise FmnistBookError(f"tta must be a non-negative integer, got {tta!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise FmnistBookError("device is 'cuda' but no CUDA device is available")
    if invert not in INVERT_CHOICES:
        raise FmnistBookError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    return resolve_device(device)


def add_predict_parser(subparsers):
    """Add ``predict`` to the ``fmnist-book`` sub-commands; returns its parser (handler: :func:`cmd_predict`)."""
    parser = subparsers.add_parser("predict", help="label images (.npy, PNG, JPEG, WebP) with a trained classifier "
                                   "of a finished run")
    parser.add_argument("--run", type=Path, required=True, metavar="RESULTS_DIR",
                        help="the run directory (holding models/<name>/best.pt) or one model's directory")
    parser.add_argument("--model", default=None, help="which model of the run (needed when it has several)")
    parser.add_argument("--input", nargs="+", required=True, metavar="INPUT",
                        help="one .npy file of images: (N, 28, 28), (N, 1, 28, 28) or (N, 784), uint8 0-255 or "
                        "float 0-1; or PNG/JPEG/WebP files, folders of them, or quoted glob patterns ('shots/*.jpg'), "
                        "each converted to 28x28 grey levels (padded to a square with its background, resized)")
    parser.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                        help="image files: make them light-on-dark like Fashion-MNIST; auto inverts those whose "
                        "border is light (default: auto)")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT",
                        help=".npy (labels) or .csv (labels, class names, probabilities)")
    parser.add_argument("--tta", type=int, default=0, help="test-time augmentation: extra shifted/flipped copies")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.set_defaults(handler=cmd_predict)
    return parser


def cmd_predict(args) -> int:
    """Run ``fmnist-book predict``; errors are ``FmnistBookError`` for the CLI to print."""
    path = predict(args.run, args.input, args.output, args.model, args.tta, args.force, args.device, args.invert)
    print(f"predictions written to {path}")
    return 0
