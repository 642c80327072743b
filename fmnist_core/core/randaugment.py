"""FixMatch's strong augmentation: RandAugment with a random magnitude per image, then Cutout, batched.

Every image of a batch draws ``num_ops`` operations from :data:`OPS` and, for each, a magnitude in the
operation's range, then gets a Cutout square. All of it runs as tensor operations on the images' device
(CPU or CUDA), and nothing is read back to the host: every operation is computed for the whole batch and
one gather keeps, per image, the result of the operation it drew (the only Python loops run over the
14 operations and the ``num_ops`` slots, never over images or tensor values). Images are floats in [0, 1],
shape (N, C, H, W), with C = 1 (grey) or 3 (RGB); every operation returns the same shape and dtype, clamped
to [0, 1].

Two variants of the sampling (:func:`rand_augment`'s ``prob``, ``levels`` and ``cutout_fixed``):

* the authors' code (google-research/fixmatch ``libml/augment.py``, ``AugmentPoolRAMC``: each of the 2 drawn
  operations applied with probability 0.5 at an integer level ``randint(1, 10)`` of 10; kekmodel's
  ``RandAugmentMC`` does the same) with their Cutout, a square of half the image side
  (``cutout_numpy``, 16 px on 32 px images);
* USB/TorchSSL's (every drawn operation applied, magnitude uniform over its range; Cutout side uniform up
  to half the image side).

Ranges follow Table 12 of the FixMatch paper (Sohn et al. 2020, "RandAugment" list):

============  ==========================  ==========================================================
operation     magnitude                   meaning
============  ==========================  ==========================================================
AutoContrast  none                        stretch each channel to [0, 1]
Brightness    factor in [0.05, 0.95]      blend with black (0 = black, 1 = unchanged)
Color         factor in [0.05, 0.95]      blend with the grey image (saturation; identity on grey)
Contrast      factor in [0.05, 0.95]      blend with the image's mean grey level
Equalize      none                        histogram equalisation per channel (PIL's algorithm)
Identity      none                        unchanged
Posterize     bits in {4, ..., 8}         keep the top ``bits`` bits of each 8-bit level
Rotate        angle in [-30, 30] degrees  counter-clockwise about the centre
Sharpness     factor in [0.05, 0.95]      blend with PIL's SMOOTH-filtered image (0 = blurred)
ShearX/Y      r in [-0.3, 0.3]            x' = x + r y (resp. y' = y + r x)
Solarize      threshold in [0, 1]         invert the levels >= threshold
TranslateX/Y  fraction in [-0.3, 0.3]     shift by the fraction times the width (resp. height)
============  ==========================  ==========================================================

Deviations from the PIL-based reference implementations, on purpose:

* levels map onto the ranges of the table above (the paper's Table 12), not onto the reference code's own ranges
  (e.g. its enhancement factors span 0.1..1.9);
* shears and rotations are about the image centre (PIL shears about the top-left corner, which adds a
  translation of up to ``0.3 * H``); geometric ops sample the nearest pixel as PIL does, and fill the
  uncovered area with black (0, PIL's default fill and Fashion-MNIST's background);
* colour ops work on floats and are not re-quantised to 8 bits between operations (Posterize and
  Equalize quantise their input to 256 levels, as they are defined on 8-bit images);
* Contrast blends with the float mean of the grey image (PIL rounds it to an integer level).

Cutout (after the operations, as in FixMatch): one square per image, side ``cutout * min(H, W)`` pixels
(fixed) or uniform in ``1 .. cutout * min(H, W)``, centred on a uniformly random pixel, clipped at the
border, filled with grey 0.5 (FixMatch's 127/255: zero in the authors' [-1, 1] scale). Grey conversion of
RGB uses the ITU-R 601 luma weights, as PIL does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")
GEOMETRIC_FILL = 0.0
CUTOUT_FILL = 0.5


# ----------------------------------------------------------------------------------------------- helpers
def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"expected float images of shape (N, 1 or 3, H, W), got {tuple(images.shape)} "
                         f"{images.dtype}")


def _per_image(value, images: torch.Tensor) -> torch.Tensor:
    """A scalar or a length-N tensor as an (N, 1, 1, 1) tensor on the images' device and dtype."""
    value = torch.as_tensor(value, dtype=images.dtype, device=images.device)
    return value.expand(images.shape[0]).reshape(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor) -> torch.Tensor:
    """PIL's ``ImageEnhance``: ``degenerate + factor * (images - degenerate)``, clamped to [0, 1]."""
    return (degenerate + _per_image(factor, images) * (images - degenerate)).clamp_(0.0, 1.0)


def _levels(images: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels (int64, 0..255) of images in [0, 1]."""
    return (images * 255.0).round().clamp(0, 255).long()


def grey(images: torch.Tensor) -> torch.Tensor:
    """The luma of each image, (N, 1, H, W): ITU-R 601 weights for RGB, the image itself for grey."""
    if images.shape[1] == 1:
        return images
    r, g, b = LUMA_WEIGHTS  # Python scalars: no weight tensor to copy to the device on every call
    return r * images[:, 0:1] + g * images[:, 1:2] + b * images[:, 2:3]


# ----------------------------------------------------------------------------------------- colour ops
def identity(images: torch.Tensor, magnitude=None) -> torch.Tensor:
    """The images unchanged."""
    return images


def auto_contrast(images: torch.Tensor, magnitude=None) -> torch.Tensor:
    """Stretch each channel of each image linearly so that its darkest level is 0 and its lightest 1.

    A constant channel is left unchanged (as PIL does).
    """
    low = images.amin((2, 3), keepdim=True)
    span = images.amax((2, 3), keepdim=True) - low
    flat = span <= 0
    stretched = (images - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, images, stretched).clamp_(0.0, 1.0)


def brightness(images: torch.Tensor, factor) -> torch.Tensor:
    """Blend with black: ``factor`` 0 gives black, 1 the image (a scalar or one factor per image)."""
    return _blend(torch.zeros_like(images), images, factor)


def color(images: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the grey image (PIL's ``Color``, i.e. saturation); the identity on one-channel images."""
    if images.shape[1] == 1:
        return images
    return _blend(grey(images).expand_as(images), images, factor)


def contrast(images: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's mean grey level: ``factor`` 0 gives a uniform grey image, 1 the image."""
    mean = grey(images).mean((1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(images), images, factor)


def sharpness(images: torch.Tensor, factor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3×3, centre 5, others 1, /13; border pixels kept): 0 = blurred."""
    n, c, h, w = images.shape
    if h < 3 or w < 3:
        return images
    # The 3x3 window sum (plus 4 x the centre) as shifted slices: far cheaper than a one-channel conv2d on a CPU.
    window = sum(images[:, :, i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    blurred = (window + 4.0 * images[:, :, 1:-1, 1:-1]) / 13.0
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = blurred
    return _blend(degenerate, images, factor)


def posterize(images: torch.Tensor, bits) -> torch.Tensor:
    """Keep the ``bits`` (1..8, a scalar or one per image) most significant bits of each 8-bit level."""
    shift = 8 - torch.as_tensor(bits, device=images.device).long().expand(images.shape[0]).view(-1, 1, 1, 1)
    levels = torch.bitwise_left_shift(torch.bitwise_right_shift(_levels(images), shift), shift)
    return levels.to(images.dtype) / 255.0


def solarize(images: torch.Tensor, threshold) -> torch.Tensor:
    """Invert (``1 - x``) every value at or above ``threshold`` (PIL's rule), per image."""
    return torch.where(images >= _per_image(threshold, images), 1.0 - images, images)


def equalize(images: torch.Tensor, magnitude=None) -> torch.Tensor:
    """Histogram equalisation of each channel of each image, batched (PIL's ``ImageOps.equalize``).

    PIL's look-up table: with ``step = (pixels - count of the brightest level present) // 255``, level
    ``i`` maps to ``(step // 2 + pixels below i) // step``; a channel with ``step == 0`` is unchanged.
    All histograms come from one ``scatter_add_`` over the (image, channel) rows.
    """
    n, c, h, w = images.shape
    levels = _levels(images).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    brightest = hist.gather(1, levels.amax(1, keepdim=True))
    step = (h * w - brightest) // 255
    below = hist.cumsum(1) - hist
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    mapped = torch.where(step > 0, lut.gather(1, levels), levels)
    return (mapped.to(images.dtype) / 255.0).view(n, c, h, w)


# -------------------------------------------------------------------------------------- geometric ops
GEOMETRIC_KINDS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def geometric_matrices(kinds: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image 2×3 maps from output to input pixel, in pixels about the image centre.

    ``kinds`` indexes :data:`GEOMETRIC_KINDS`; ``magnitudes`` are degrees (rotate), shear factors, or
    fractions of the width/height (translate). Each image gets exactly one of the five maps; the formula
    below is their sum because the unused terms vanish (angle 0, shear 0, shift 0).
    """
    def where(kind):
        return torch.where(kinds == GEOMETRIC_KINDS.index(kind), magnitudes, torch.zeros_like(magnitudes))

    angle = where("rotate") * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Rows: x_in = cos x - sin y + shear_x y + tx;  y_in = sin x + cos y + shear_y x + ty (y points down,
    # so this rotates the content counter-clockwise, as PIL's rotate does).
    row_x = torch.stack([cos, -sin + where("shear_x"), where("translate_x") * width], 1)
    row_y = torch.stack([sin + where("shear_y"), cos, where("translate_y") * height], 1)
    return torch.stack([row_x, row_y], 1)


def affine(images: torch.Tensor, matrices: torch.Tensor, fill: float = GEOMETRIC_FILL) -> torch.Tensor:
    """Warp every image with its own 2×3 output-to-input map (pixels about the centre), in one
    ``grid_sample`` call; nearest-pixel sampling, uncovered pixels set to ``fill``.

    The sampling grid is ``affine_grid``'s (align_corners=False), written as broadcast products: on a CPU
    that is several times faster than ``affine_grid``'s batched matrix product of 3-vectors.
    """
    n, c, h, w = images.shape
    # Pixels about the centre -> grid_sample's [-1, 1] coordinates (align_corners=False): x_n = 2 x / w.
    theta = matrices.to(images.dtype)
    xs = ((torch.arange(w, device=images.device, dtype=images.dtype) * 2 + 1) / w - 1).view(1, 1, w, 1)
    ys = ((torch.arange(h, device=images.device, dtype=images.dtype) * 2 + 1) / h - 1).view(1, h, 1, 1)
    # Per image, the (x, y) coefficients of the grid's two coordinates, already in [-1, 1] units.
    a = torch.stack([theta[:, 0, 0], theta[:, 1, 0] * (w / h)], 1).view(n, 1, 1, 2)
    b = torch.stack([theta[:, 0, 1] * (h / w), theta[:, 1, 1]], 1).view(n, 1, 1, 2)
    t = torch.stack([theta[:, 0, 2] * (2.0 / w), theta[:, 1, 2] * (2.0 / h)], 1).view(n, 1, 1, 2)
    grid = a * xs + b * ys + t  # (N, H, W, 2), contiguous: no interleaving copy
    # Sampling (images - fill) with zero padding leaves exactly ``fill`` outside the source image.
    warped = F.grid_sample(images - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return (warped + fill).clamp_(0.0, 1.0)


def _geometric(kind: str, images: torch.Tensor, magnitude) -> torch.Tensor:
    n, _, h, w = images.shape
    kinds = torch.full((n,), GEOMETRIC_KINDS.index(kind), device=images.device)
    magnitudes = torch.as_tensor(magnitude, dtype=images.dtype, device=images.device).expand(n)
    return affine(images, geometric_matrices(kinds, magnitudes, h, w))


def rotate(images: torch.Tensor, degrees) -> torch.Tensor:
    """Rotate counter-clockwise about the centre by ``degrees`` (a scalar or one angle per image)."""
    return _geometric("rotate", images, degrees)


def shear_x(images: torch.Tensor, factor) -> torch.Tensor:
    """Shear horizontally about the centre: output (x, y) samples input (x + factor·y, y)."""
    return _geometric("shear_x", images, factor)


def shear_y(images: torch.Tensor, factor) -> torch.Tensor:
    """Shear vertically about the centre: output (x, y) samples input (x, y + factor·x)."""
    return _geometric("shear_y", images, factor)


def translate_x(images: torch.Tensor, fraction) -> torch.Tensor:
    """Shift horizontally by ``fraction`` of the width (output x samples input x + fraction·W)."""
    return _geometric("translate_x", images, fraction)


def translate_y(images: torch.Tensor, fraction) -> torch.Tensor:
    """Shift vertically by ``fraction`` of the height (output y samples input y + fraction·H)."""
    return _geometric("translate_y", images, fraction)


# ------------------------------------------------------------------------------------ the op table
# (name, function, low, high): the magnitude is low + (high - low) * u, u ~ U[0, 1) per image; Posterize
# rounds down to whole bits, so its 5 values are equally likely. The geometric ops come last so that the
# images drawing them form one block, warped by a single grid_sample.
OPS = (
    ("Identity", identity, 0.0, 0.0),
    ("AutoContrast", auto_contrast, 0.0, 0.0),
    ("Equalize", equalize, 0.0, 0.0),
    ("Brightness", brightness, 0.05, 0.95),
    ("Color", color, 0.05, 0.95),
    ("Contrast", contrast, 0.05, 0.95),
    ("Sharpness", sharpness, 0.05, 0.95),
    ("Posterize", posterize, 4.0, 9.0),
    ("Solarize", solarize, 0.0, 1.0),
    ("Rotate", rotate, -30.0, 30.0),
    ("ShearX", shear_x, -0.3, 0.3),
    ("ShearY", shear_y, -0.3, 0.3),
    ("TranslateX", translate_x, -0.3, 0.3),
    ("TranslateY", translate_y, -0.3, 0.3),
)
OP_NAMES = tuple(name for name, *_ in OPS)
_FIRST_GEOMETRIC = OP_NAMES.index("Rotate")


def op_magnitude(index: int, u: torch.Tensor) -> torch.Tensor:
    """The magnitude of operation ``OPS[index]`` for uniform draws ``u`` in [0, 1)."""
    _, _, low, high = OPS[index]
    value = low + (high - low) * u
    return value.floor().clamp(max=8) if OP_NAMES[index] == "Posterize" else value


# On a CPU nothing waits for a device queue, so reading back which image drew which operation costs nothing and
# each operation can run on its own images only (2 operations an image instead of all 14: the strong augmentation
# then no longer dominates a FixMatch step of a small network). tests/test_host_sync.py turns it off to check
# the path that runs on CUDA, and tests/test_randaugment.py that both paths give the same images.
GROUPED_ON_CPU = True


def apply_ops(images: torch.Tensor, ops: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Apply operation ``OPS[ops[i]]`` with magnitude draw ``u[i]`` to image ``i``, for all i at once.

    On CUDA nothing is read back to the host: every colour operation runs on the whole batch, the geometric
    ones share one warp (the identity map for the images that drew none), and one gather from the stacked
    results keeps, per image, the result of the operation it drew. The cost is fixed (every operation on every
    image), the price of never waiting for the device to learn which image drew what. On a CPU
    (:data:`GROUPED_ON_CPU`) the images are grouped by the operation they drew and each group gets only its own
    (:func:`apply_ops_grouped`): the same images, at a fraction of the cost.
    """
    if GROUPED_ON_CPU and images.device.type == "cpu":
        return apply_ops_grouped(images, ops, u)
    results = [images]  # OPS[0] is Identity
    results += [OPS[index][1](images, op_magnitude(index, u)) for index in range(1, _FIRST_GEOMETRIC)]
    geometric = ops >= _FIRST_GEOMETRIC
    magnitudes = torch.zeros_like(u)
    for index in range(_FIRST_GEOMETRIC, len(OPS)):
        magnitudes = torch.where(ops == index, op_magnitude(index, u), magnitudes)
    # The OPS order of the geometric ops is GEOMETRIC_KINDS' order; kind -1 (no geometric op) and magnitude 0
    # give the identity map.
    kinds = torch.where(geometric, ops - _FIRST_GEOMETRIC, torch.full_like(ops, -1))
    results.append(affine(images, geometric_matrices(kinds, magnitudes, images.shape[2], images.shape[3])))
    choice = torch.where(geometric, torch.full_like(ops, len(results) - 1), ops)
    return torch.stack(results)[choice, torch.arange(len(ops), device=ops.device)]


def apply_ops_grouped(images: torch.Tensor, ops: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`apply_ops` with each operation computed on the images that drew it only (one warp for all the
    geometric ones), for a CPU: it reads the group sizes back, which on a GPU would wait for its queue."""
    out = images.clone()
    counts = torch.bincount(ops, minlength=len(OPS)).tolist()
    order = torch.argsort(ops, stable=True)
    starts = [sum(counts[:i]) for i in range(len(OPS) + 1)]
    for index in range(1, _FIRST_GEOMETRIC):
        if counts[index]:
            idx = order[starts[index]:starts[index + 1]]
            out[idx] = OPS[index][1](images[idx], op_magnitude(index, u[idx]))
    idx = order[starts[_FIRST_GEOMETRIC]:]  # the geometric ops come last in OPS: one block, one warp
    if len(idx):
        sub_ops, sub_u = ops[idx], u[idx]
        magnitudes = torch.zeros_like(sub_u)
        for index in range(_FIRST_GEOMETRIC, len(OPS)):
            magnitudes = torch.where(sub_ops == index, op_magnitude(index, sub_u), magnitudes)
        out[idx] = affine(images[idx], geometric_matrices(sub_ops - _FIRST_GEOMETRIC, magnitudes, images.shape[2],
                                                          images.shape[3]))
    return out


def level_draws(u: torch.Tensor, ops: torch.Tensor, sign: torch.Tensor, levels: int) -> torch.Tensor:
    """Magnitude draws at discrete levels: level ``1 + floor(u (levels - 1))`` of ``levels``, i.e. 1..levels-1
    (the authors' ``randint(1, 10)``), as a fraction of each operation's range; a symmetric range (Rotate,
    Shear, Translate: low = -high) takes the level as a strength with a random sign (``sign < 0.5``
    negates), as the authors' implementation does. Returns the equivalent uniform draws for
    :func:`op_magnitude`."""
    fraction = (1.0 + (u * (levels - 1)).floor()) / levels
    signed = ops >= _FIRST_GEOMETRIC  # exactly the symmetric ranges
    strength = torch.where(sign < 0.5, -fraction, fraction)
    return torch.where(signed, 0.5 + 0.5 * strength, fraction)


def cutout(images: torch.Tensor, generator: torch.Generator, size: float = 0.5,
           fill: float = CUTOUT_FILL, fixed: bool = False) -> torch.Tensor:
    """Fill one square per image with ``fill``, centred on a uniformly random pixel, clipped at the border.

    The side is ``size``·min(H, W) pixels for every image with ``fixed`` (the authors' code:
    ``cutout_numpy``, 16 px on 32 px images; kekmodel), or uniform in 1..``size``·min(H, W) per image
    otherwise (USB/TorchSSL).
    """
    n, _, h, w = images.shape
    device = images.device
    longest = max(1, int(size * min(h, w)))
    if fixed:
        side = torch.full((n,), longest, device=device, dtype=torch.long)
    else:
        side = 1 + (torch.rand(n, device=device, generator=generator) * longest).long().clamp(max=longest - 1)
    cy = torch.randint(0, h, (n,), device=device, generator=generator)
    cx = torch.randint(0, w, (n,), device=device, generator=generator)
    top, left = (cy - side // 2).view(n, 1, 1), (cx - side // 2).view(n, 1, 1)
    side = side.view(n, 1, 1)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return torch.where(inside.unsqueeze(1), torch.full_like(images, fill), images)


_cutout = cutout  # ``rand_augment``'s ``cutout`` argument shadows the function inside it


def draw_ops(n: int, generator: torch.Generator, device, dtype, prob: float = 1.0,
             levels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's operations and magnitude draws for ``n`` images, on ``device`` (see :func:`rand_augment`).

    Returns ``(ops, u)`` for :func:`apply_ops`; an image whose operation is skipped (probability
    ``1 - prob``) gets Identity.
    """
    ops = torch.randint(0, len(OPS), (n,), device=device, generator=generator)
    u = torch.rand(n, device=device, generator=generator, dtype=dtype)
    if levels:
        u = level_draws(u, ops, torch.rand(n, device=device, generator=generator, dtype=dtype), levels)
    if prob < 1.0:
        applied = torch.rand(n, device=device, generator=generator) < prob
        ops = torch.where(applied, ops, torch.zeros_like(ops))  # OPS[0] is Identity
    return ops, u


def rand_augment(images: torch.Tensor, generator: torch.Generator, num_ops: int = 2, cutout: float = 0.5,
                 prob: float = 1.0, levels: int = 0, cutout_fixed: bool = False) -> torch.Tensor:
    """FixMatch's RandAugment: ``num_ops`` random operations per image, random magnitudes, then Cutout.

    Every draw is made on the images' device and nothing is read back to the host.

    Parameters
    ----------
    images : torch.Tensor
        Float images in [0, 1], shape (N, C, H, W), C = 1 or 3, on any device.
    generator : torch.Generator
        Seeded generator on the images' device; every draw (operations, magnitudes, Cutout) comes from it.
    num_ops : int
        Operation slots applied one after another to every image, each drawn uniformly from :data:`OPS`
        (independently, so an image may draw the same operation twice).
    cutout : float
        Cutout side (or its largest value) as a fraction of the shorter image side; 0 disables Cutout.
    prob : float
        Probability that a slot's operation is applied (the authors' RandAugment: 0.5; the paper's text: 1).
    levels : int
        0: magnitudes uniform over each operation's range. ``L`` > 1: a random level in 1..L-1 of ``L``
        (the authors' code: ``randint(1, 10)`` of 10) with a random sign on the symmetric ranges
        (:func:`level_draws`).
    cutout_fixed : bool
        A square of exactly ``cutout``·min(H, W) (the authors') instead of a random side up to it
        (:func:`cutout`).

    Returns
    -------
    torch.Tensor
        The augmented images: same shape, float32 (the input's float dtype), values in [0, 1].
    """
    _check_images(images)
    for _ in range(num_ops):
        ops, u = draw_ops(images.shape[0], generator, images.device, images.dtype, prob, levels)
        images = apply_ops(images, ops, u)
    if cutout > 0:
        images = _cutout(images, generator, cutout, fixed=cutout_fixed)
    return images
