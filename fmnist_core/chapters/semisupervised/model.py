"""The semi-supervised chapter: a VAE whose latent code also classifies, Kingma et al.'s M2, and baselines.

Four models learn from the same class-balanced labeled subset of the training split:

* ``semisup_vae`` — :class:`SemiSupVAE`: a two-branch convolutional VAE whose classifier reads the latent
  mean; every image (labeled or not) trains reconstruction + KL, labeled images also the classifier.
* ``m2`` — :class:`M2`, Kingma et al. (2014), "Semi-Supervised Learning with Deep Generative Models".
* ``encoder_only`` — :class:`EncoderOnlyClassifier`: the SemiSupVAE's encoder and classifier, layer for
  layer, trained on the labeled images only; the difference to ``semisup_vae`` is what unlabeled images add.
* ``cnn`` — the classification chapter's ``mycnn`` trained on the labeled images only.

Inputs: the generative models and ``encoder_only`` take images in [0, 1] (``uint8 / 255``, never
standardised: the decoders end in a sigmoid and the Bernoulli likelihood needs targets in [0, 1]); ``cnn``
takes standardised images like every classifier of the classification chapter. Checkpoints say which in
their ``input`` field ("unit" or, when absent, "standardised").

An epoch is one pass over the *unlabeled* images (the whole training split), ``batch_size *
unlabeled_ratio`` of them per step; every step also takes ``batch_size`` labeled images, cycling through
the labeled subset as often as needed (a fresh shuffle per pass). All four models get the same number of
labeled batches per epoch, so with 100 labels an epoch is not a single step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_core.core import metrics
from fmnist_core.core.config import param, require, require_choice
from fmnist_core.core.data import (TRAIN_IMAGES, ImageDataset, Split, Splits, balanced_subset, batch_indices, make_splits,
                                   save_indices, tta_augment, weak_augment)
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.models import build_model, model_meta, rebuild
from fmnist_core.core.train import (TrainConfig, autocast_context, check_finite, evaluate, fit, fit_epochs,
                    load_trained)
from fmnist_core.core.generative import kl_divergence, reconstruction_loss, reparameterize, to_unit, vae_loss

SEMISUP_MODELS = ("semisup_vae", "m2", "encoder_only", "cnn")
CNN_ARCHITECTURE = "mycnn"  # the classification chapter's registry name of the "cnn" baseline
CLASSIFIER_HIDDEN = 128


@dataclass
class SemiSupConfig(TrainConfig):
    """Parameters of the semi-supervised chapter; training fields are shared with :class:`TrainConfig`.

    ``class_weight`` is the alpha of Kingma et al. (2014): the weight of the labeled cross-entropy next to
    the (per-image mean) generative losses. Left at 0 it follows their alpha = 0.1 * N: their objective sums
    L over the labeled images, U over the N unlabeled ones and alpha * CE over the labeled ones; divided by N,
    with per-batch means, the cross-entropy's weight next to mean U becomes alpha * num_labels / N =
    0.1 * num_labels (10 for 100 labels, 500 for 5,000).
    """

    epochs: int = param(20, "passes over the unlabeled images (the training split)")
    augment: bool = param(True, "random 2-pixel shift and horizontal flip of labeled and unlabeled batches")
    num_labels: int = param(5000, "labeled images (class-balanced, drawn from the training split); 0 = all")
    label_seed: int = param(0, "seed of the labeled subset")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split")
    latent_dim: int = param(80, "dimensions of the latent code z")
    branch_channels: list[int] = param([32, 64], "[a, b]: the one-convolution branch has a channels, the "
                                                 "two-convolution branch a then b")
    dropout: float = param(0.25, "dropout after every encoder convolution and in the classifier")
    kl_weight: float = param(1.0, "weight of the KL term (1 = the ELBO; the source report had no weight)")
    class_weight: float = param(0.0, "alpha, weight of the labeled cross-entropy; 0 = Kingma et al.'s "
                                     "0.1 * num_labels (their alpha = 0.1 N, per image)")
    unlabeled_ratio: int = param(1, "unlabeled images per labeled image in each step")
    models: list[str] = param(list(SEMISUP_MODELS), "semisup_vae | m2 | encoder_only | cnn")
    tta: int = param(8, "test-time augmentation: average softmax over this many extra shifted/flipped copies")

    def check(self) -> None:
        super().check()
        # The labeled subset, the validation split and the train_images cut are all class-balanced.
        require(self.num_labels >= 0 and self.num_labels % 10 == 0, "num_labels",
                f"must be 0 (all) or a positive multiple of 10 (the same number of every class), got {self.num_labels}")
        require(10 <= self.val_size < TRAIN_IMAGES["fashion_mnist"] and self.val_size % 10 == 0, "val_size",
                f"must be a positive multiple of 10 below Fashion-MNIST's 60,000 training images, got {self.val_size}")
        require(self.train_images % 10 == 0, "train_images",
                f"must be 0 (all) or a multiple of 10 (the same number of every class), got {self.train_images}")
        for name in ("seed", "label_seed", "split_seed"):  # NumPy's generators refuse negative seeds
            require(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)}")
        require(self.latent_dim >= 1, "latent_dim", f"must be at least 1, got {self.latent_dim}")
        require(len(self.branch_channels) == 2 and all(c >= 1 for c in self.branch_channels), "branch_channels",
                f"must be two positive widths [a, b], got {self.branch_channels}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.kl_weight >= 0, "kl_weight", f"must be non-negative, got {self.kl_weight}")
        require(self.class_weight >= 0, "class_weight", "must be positive, or 0 for Kingma et al.'s rule")
        require(self.unlabeled_ratio >= 1, "unlabeled_ratio", f"must be at least 1, got {self.unlabeled_ratio}")
        require(len(self.models) > 0, "models", "must name at least one model")
        require(len(set(self.models)) == len(self.models), "models", "must not name a model twice")
        for name in self.models:
            require_choice(name, "models", SEMISUP_MODELS)
        require(self.tta >= 0, "tta", "must be non-negative")
        require(self.label_smoothing == 0, "label_smoothing", "is not supported here (the losses of the "
                                                              "semi-supervised models have none)")


# ------------------------------------------------------------------------------------------ the models
def _conv_block(cin: int, cout: int, kernel: int, stride: int, dropout: float) -> nn.Sequential:
    """Convolution, batch norm, ReLU, dropout: the unit both encoder branches are made of."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Dropout(dropout))


def _check_architecture(image_size: int, latent_dim: int, branch_channels) -> None:
    require(image_size % 4 == 0, "image_size", f"must be divisible by 4, got {image_size}")
    require(latent_dim >= 1, "latent_dim", f"must be at least 1, got {latent_dim}")
    require(len(branch_channels) == 2 and min(branch_channels) >= 1, "branch_channels",
            f"must be two positive widths, got {list(branch_channels)}")


class BranchEncoder(nn.Module):
    """Two parallel branches on the image, concatenated and flattened: (N, (a + b) * (size / 4)^2).

    One branch is a single 5x5 convolution (a channels) followed by 4x4 max-pooling; the other two
    stride-2 3x3 convolutions (a, then b channels): both reach size / 4 (7x7 for 28x28 images), one with
    a wide single-layer view, one with a deeper one.
    """

    def __init__(self, in_channels: int, image_size: int, branch_channels, dropout: float):
        super().__init__()
        a, b = branch_channels
        self.one_conv = nn.Sequential(_conv_block(in_channels, a, 5, 1, dropout), nn.MaxPool2d(4))
        self.two_conv = nn.Sequential(_conv_block(in_channels, a, 3, 2, dropout), _conv_block(a, b, 3, 2, dropout))
        self.out_features = (a + b) * (image_size // 4) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.one_conv(x), self.two_conv(x)], dim=1).flatten(1)


class Decoder(nn.Module):
    """Mirror of the two-convolution branch: a linear layer to b x (size / 4)^2, then two stride-2
    transposed convolutions (b -> a -> channels) and a sigmoid: Bernoulli means in [0, 1]."""

    def __init__(self, code_dim: int, out_channels: int, image_size: int, branch_channels):
        super().__init__()
        a, b = branch_channels
        self.shape = (b, image_size // 4, image_size // 4)
        self.fc = nn.Linear(code_dim, math.prod(self.shape))
        self.up = nn.Sequential(nn.ConvTranspose2d(b, a, 4, 2, 1, bias=False), nn.BatchNorm2d(a),
                                nn.ReLU(inplace=True), nn.ConvTranspose2d(a, out_channels, 4, 2, 1))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(F.relu(self.fc(code)).view(-1, *self.shape)))


class EncoderOnlyClassifier(nn.Module):
    """The SemiSupVAE's classification path alone: :class:`BranchEncoder`, linear layer to the latent
    mean, two linear layers to the logits. Trained on labeled images only (the ``encoder_only`` baseline).

    Parameters
    ----------
    in_channels, image_size : int
        Image shape; ``image_size`` must be divisible by 4.
    num_classes : int
    latent_dim : int
        Width of the latent mean the classifier reads.
    branch_channels : pair of int
        Widths ``(a, b)`` of the encoder branches (see :class:`BranchEncoder`).
    dropout : float
        After every encoder convolution and between the classifier's two layers.
    hidden : int
        Width of the classifier's hidden layer.

    Notes
    -----
    Inputs are images in [0, 1] (``uint8 / 255``), not standardised ones.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, latent_dim: int = 80,
                 branch_channels=(32, 64), dropout: float = 0.25, hidden: int = CLASSIFIER_HIDDEN):
        super().__init__()
        _check_architecture(image_size, latent_dim, branch_channels)
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        self.num_classes = num_classes
        self.encoder = BranchEncoder(in_channels, image_size, branch_channels, dropout)
        self.fc_mu = nn.Linear(self.encoder.out_features, latent_dim)
        self.classifier = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images ``x`` in [0, 1], read from the latent mean."""
        return self.classifier(self.fc_mu(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x)


class SemiSupVAE(EncoderOnlyClassifier):
    """A VAE whose latent mean also feeds a classifier (same parameters as :class:`EncoderOnlyClassifier`).

    Encoder: :class:`BranchEncoder`, then linear heads to the mean and log-variance of q(z | x); decoder:
    :class:`Decoder` from z; classifier: two linear layers on the mean (not on a noisy z, so a prediction
    is deterministic). Images are in [0, 1].
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, latent_dim: int = 80,
                 branch_channels=(32, 64), dropout: float = 0.25, hidden: int = CLASSIFIER_HIDDEN):
        super().__init__(in_channels, image_size, num_classes, latent_dim, branch_channels, dropout, hidden)
        self.fc_logvar = nn.Linear(self.encoder.out_features, latent_dim)
        self.decoder = Decoder(latent_dim, in_channels, image_size, branch_channels)

    # z = mu + sigma * eps with eps from the given generator; the mean itself without one.
    reparameterize = staticmethod(reparameterize)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x) for images ``x`` in [0, 1]."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """``dict(x_hat, mu, logvar, logits)``; z is drawn with ``generator`` (the mean without one)."""
        mu, logvar = self.encode(x)
        x_hat = self.decoder(self.reparameterize(mu, logvar, generator))
        return {"x_hat": x_hat, "mu": mu, "logvar": logvar, "logits": self.classifier(mu)}


class M2(nn.Module):
    """Kingma et al.'s M2: q(y | x), q(z | x, y), p(x | y, z), p(z) = N(0, I), p(y) uniform.

    q(y | x) is an :class:`EncoderOnlyClassifier` (the same classification path as the other models);
    q(z | x, y) has its own :class:`BranchEncoder`, whose features are concatenated with one-hot y before
    the linear mean and log-variance heads; p(x | y, z) is a :class:`Decoder` on z concatenated with
    one-hot y. Parameters as :class:`EncoderOnlyClassifier`; images in [0, 1].
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, latent_dim: int = 80,
                 branch_channels=(32, 64), dropout: float = 0.25, hidden: int = CLASSIFIER_HIDDEN):
        super().__init__()
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        self.num_classes = num_classes
        self.q_y = EncoderOnlyClassifier(in_channels, image_size, num_classes, latent_dim, branch_channels,
                                         dropout, hidden)
        self.features = BranchEncoder(in_channels, image_size, branch_channels, dropout)
        self.fc_mu = nn.Linear(self.features.out_features + num_classes, latent_dim)
        self.fc_logvar = nn.Linear(self.features.out_features + num_classes, latent_dim)
        self.decoder = Decoder(latent_dim + num_classes, in_channels, image_size, branch_channels)

    reparameterize = staticmethod(reparameterize)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x) for images ``x`` in [0, 1]."""
        return self.q_y(x)

    def encode(self, features: torch.Tensor, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x, y) from ``self.features(x)`` and one-hot ``y``."""
        h = torch.cat([features, y_onehot], dim=1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
        """Bernoulli means p(x | y, z) in [0, 1]."""
        return self.decoder(torch.cat([z, y_onehot], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x)


class ClassifierView(nn.Module):
    """Wraps a model with a ``classify`` method so that its ``forward`` returns those logits (for
    :func:`fmnist_core.core.metrics.predict_proba` and :func:`fmnist_core.core.train.evaluate`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classify(x)


_ARCHITECTURES = {"semisup_vae": SemiSupVAE, "encoder_only": EncoderOnlyClassifier, "m2": M2}
REBUILDABLE = tuple(_ARCHITECTURES)  # checkpoint "model" values :func:`rebuild_semisup` builds


def rebuild_semisup(config: dict) -> nn.Module:
    """Build the model described by a checkpoint's config: ``semisup_vae``, ``encoder_only`` or ``m2``
    (the ``cnn`` baseline's checkpoints name ``mycnn``: :func:`fmnist_core.chapters.classification.rebuild` builds it)."""
    if config.get("model") not in _ARCHITECTURES:
        raise ConfigError(f"checkpoint model {config.get('model')!r} is not one of {', '.join(_ARCHITECTURES)}")
    return _ARCHITECTURES[config["model"]](config["in_channels"], config["image_size"], len(config["class_names"]),
                                           config["latent_dim"], tuple(config["branch_channels"]),
                                           config["dropout"], config["hidden"])


# -------------------------------------------------------------------------------------------- the losses
def _nll(x_hat: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    # BCE is unsafe under autocast: computed in float32 outside it, so callers may run inside autocast.
    with torch.autocast(x.device.type, enabled=False):
        return reconstruction_loss(x_hat.float(), x.float(), kind)


def semisup_loss(out: dict, x: torch.Tensor, labels: torch.Tensor, labeled_mask: torch.Tensor, kl_weight: float,
                 class_weight: float, recon_kind: str = "bce") -> dict:
    """The SemiSupVAE objective: ``recon + kl_weight * KL + class_weight * CE``.

    Parameters
    ----------
    out : dict
        :meth:`SemiSupVAE.forward`'s ``x_hat``, ``mu``, ``logvar``, ``logits`` for the batch ``x``.
    x : torch.Tensor
        The images in [0, 1] (the reconstruction targets), labeled and unlabeled.
    labels : torch.Tensor
        Class indices; entries where ``labeled_mask`` is False are ignored (any value).
    labeled_mask : torch.Tensor of bool
        Which images have a label.
    kl_weight, class_weight : float
        Weights of the KL term and of the cross-entropy.
    recon_kind : str
        ``bce`` or ``mse`` (see :func:`fmnist_core.chapters.vae.reconstruction_loss`).

    Returns
    -------
    dict
        ``loss`` (what is minimised), ``recon`` and ``kl`` (means over every image, nats), and
        ``classification`` (cross-entropy averaged over the labeled images; a constant 0, through which no
        gradient reaches the classifier, when the batch has none).
    """
    with torch.autocast(x.device.type, enabled=False):
        elbo = vae_loss(out["x_hat"].float(), x.float(), out["mu"].float(), out["logvar"].float(), kl_weight,
                        recon_kind)
    logits = out["logits"].float()
    if bool(labeled_mask.any()):
        ce = F.cross_entropy(logits[labeled_mask], labels[labeled_mask])
    else:
        ce = logits.new_zeros(())
    return {"loss": elbo["loss"] + class_weight * ce, "recon": elbo["recon"], "kl": elbo["kl"],
            "classification": ce}


def _m2_bound(model: M2, features, x, y, generator, kl_weight: float, recon_kind: str) -> torch.Tensor:
    """L(x, y) per sample from precomputed encoder features: recon + kl_weight * KL - log p(y)."""
    y_onehot = F.one_hot(y, model.num_classes).to(features.dtype)
    mu, logvar = model.encode(features, y_onehot)
    x_hat = model.decode(model.reparameterize(mu, logvar, generator), y_onehot)
    kl = kl_divergence(mu.float(), logvar.float())
    return _nll(x_hat, x, recon_kind) + kl_weight * kl + math.log(model.num_classes)


def m2_labeled_bound(model: M2, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                     kl_weight: float = 1.0, recon_kind: str = "bce") -> torch.Tensor:
    """L(x, y), the negative labeled bound, per sample: shape (N,).

    ``-L(x, y) = E_q(z|x,y)[log p(x | y, z)] + log p(y) - KL(q(z | x, y) || p(z))`` with p(y) = 1/K, the
    expectation estimated with one z per image drawn with ``generator`` (z = the mean without one).
    ``kl_weight`` other than 1 weights the KL term (then it is no longer a bound).
    """
    return _m2_bound(model, model.features(x), x, y, generator, kl_weight, recon_kind)


def m2_unlabeled_bound(model: M2, x: torch.Tensor, generator: torch.Generator | None = None,
                       kl_weight: float = 1.0, recon_kind: str = "bce") -> torch.Tensor:
    """U(x), the negative unlabeled bound, per sample: shape (N,).

    ``-U(x) = sum_y q(y | x) (-L(x, y)) + H(q(y | x))``: L is evaluated for all K classes of every image in
    one batched pass (N * K rows, class-major), the encoder features of x computed once.
    """
    n, k = len(x), model.num_classes
    log_q = model.classify(x).float().log_softmax(dim=1)
    y = torch.arange(k, device=x.device).repeat_interleave(n)
    features = model.features(x).repeat(k, 1)
    bound = _m2_bound(model, features, x.repeat(k, 1, 1, 1), y, generator, kl_weight, recon_kind)
    q = log_q.exp()
    entropy = -(q * log_q).sum(dim=1)
    return (q * bound.view(k, n).t()).sum(dim=1) - entropy


def m2_loss(model: M2, x_labeled: torch.Tensor, y_labeled: torch.Tensor, x_unlabeled: torch.Tensor | None,
            class_weight: float, generator: torch.Generator | None = None, kl_weight: float = 1.0,
            recon_kind: str = "bce") -> dict:
    """Kingma et al.'s J^alpha per image: ``mean L(x, y) + mean U(x) + alpha * mean(-log q(y | x))``.

    Means over the labeled and the unlabeled batch (rather than the paper's sums over the data sets),
    hence the per-image weight 0.1 * num_labels for their alpha = 0.1 N (see :func:`resolve_class_weight`). Returns ``loss``, ``labeled``, ``unlabeled`` (0 without
    unlabeled images) and ``classification``.
    """
    labeled = m2_labeled_bound(model, x_labeled, y_labeled, generator, kl_weight, recon_kind).mean()
    has_unlabeled = x_unlabeled is not None and len(x_unlabeled) > 0
    unlabeled = (m2_unlabeled_bound(model, x_unlabeled, generator, kl_weight, recon_kind).mean() if has_unlabeled
                 else labeled.new_zeros(()))
    ce = F.cross_entropy(model.classify(x_labeled).float(), y_labeled)
    return {"loss": labeled + unlabeled + class_weight * ce, "labeled": labeled, "unlabeled": unlabeled,
            "classification": ce}


def resolve_class_weight(cfg: SemiSupConfig, num_unlabeled: int, num_labeled: int) -> float:
    """``cfg.class_weight``, or Kingma et al.'s alpha = 0.1 N expressed per image when it is 0.

    Their J = sum_labeled L + sum_unlabeled U + alpha sum_labeled CE; divided by the N unlabeled images and
    written with batch means, the weight of mean CE next to mean U is alpha * num_labeled / N = 0.1 * num_labeled.
    """
    alpha = 0.1 * num_unlabeled
    return cfg.class_weight if cfg.class_weight > 0 else alpha * num_labeled / num_unlabeled


# ----------------------------------------------------------------------------------------------- data
@dataclass
class SemiSupData:
    """The splits (``train`` = every unlabeled image), the labeled subset of ``train``, and the indices
    into the dataset's training images of the labeled subset, the training split and the validation split."""

    splits: Splits
    labeled: Split
    labeled_idx: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


def semisup_splits(cfg: SemiSupConfig, ds: ImageDataset) -> SemiSupData:
    """The class-balanced train/validation split (``train`` cut to ``train_images`` if set) and the
    class-balanced labeled subset of ``train``: ``balanced_subset(train labels, num_labels, label_seed)``."""
    labels = ds.train_labels.cpu().numpy()
    try:
        splits, indices = make_splits(ds, cfg.val_size, cfg.split_seed)
        train_idx = indices["train"]
        if 0 < cfg.train_images < len(train_idx):
            train_idx = train_idx[balanced_subset(labels[train_idx], cfg.train_images, cfg.seed, ds.num_classes)]
        labeled_idx = (train_idx[balanced_subset(labels[train_idx], cfg.num_labels, cfg.label_seed, ds.num_classes)]
                       if cfg.num_labels else train_idx)
    except ValueError as err:
        raise ConfigError(f"parameter 'num_labels', 'val_size' or 'train_images' does not fit {ds.name}: "
                          f"{err}") from None

    def part(idx):
        idx_t = torch.as_tensor(idx, device=ds.train_images.device)
        return Split(ds.train_images[idx_t], ds.train_labels[idx_t], ds.mean, ds.std)

    return SemiSupData(Splits(part(train_idx), splits.val, splits.test), part(labeled_idx), labeled_idx,
                       train_idx, indices["val"])


def steps_per_epoch(cfg: SemiSupConfig, num_unlabeled: int) -> int:
    """Optimiser steps in one pass over the unlabeled images, ``batch_size * unlabeled_ratio`` per step."""
    return math.ceil(num_unlabeled / (cfg.batch_size * cfg.unlabeled_ratio))


def unit_split(split: Split) -> Split:
    """The same images with mean 0 and std 1: its ``inputs()`` are then images in [0, 1]."""
    channels = split.images.shape[1]
    return Split(split.images, split.labels, (0.0,) * channels, (1.0,) * channels)


# ------------------------------------------------------------------------------------------- training
def _endless_batches(n: int, batch_size: int, generator: torch.Generator, device):
    """Shuffled batches of ``range(n)``, pass after pass (the labeled subset is cycled through)."""
    while True:
        yield from batch_indices(n, batch_size, generator, device)


def _unit_batch(images: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
    return to_unit(weak_augment(images, generator) if augment else images)


def make_step(model_name: str, cfg: SemiSupConfig, class_weight: float):
    """``step(model, x_labeled, y_labeled, x_unlabeled, generator) -> dict`` of losses for one model."""
    def semisup_vae(model, xl, yl, xu, generator):
        x = torch.cat([xl, xu])
        labels = torch.cat([yl, yl.new_full((len(xu),), -1)])
        mask = torch.arange(len(x), device=x.device) < len(xl)
        with autocast_context(x.device, cfg.dtype):
            out = model(x, generator=generator)
        return semisup_loss(out, x, labels, mask, cfg.kl_weight, class_weight)

    def encoder_only(model, xl, yl, xu, generator):
        with autocast_context(xl.device, cfg.dtype):
            ce = F.cross_entropy(model(xl).float(), yl)
        return {"loss": ce, "classification": ce}

    def m2(model, xl, yl, xu, generator):
        with autocast_context(xl.device, cfg.dtype):
            return m2_loss(model, xl, yl, xu, class_weight, generator, cfg.kl_weight)

    return {"semisup_vae": semisup_vae, "encoder_only": encoder_only, "m2": m2}[model_name]


def make_epoch_fn(step, labeled: Split, unlabeled_images: torch.Tensor, cfg: SemiSupConfig,
                  uses_unlabeled: bool = True):
    """The ``epoch_fn`` of :func:`fit_epochs`: one pass over ``unlabeled_images``, each step with a labeled
    batch of ``batch_size`` (cycled) and an unlabeled one ``unlabeled_ratio`` times as large; returns the
    losses averaged over steps."""
    def epoch_fn(model, optimizer, scheduler, generator, where):
        model.train()
        device = labeled.images.device
        labeled_batches = _endless_batches(len(labeled.labels), cfg.batch_size, generator, device)
        totals, steps = {}, 0
        for u_index in batch_indices(len(unlabeled_images), cfg.batch_size * cfg.unlabeled_ratio, generator, device):
            l_index = next(labeled_batches)
            xl = _unit_batch(labeled.images[l_index], cfg.augment, generator)
            xu = _unit_batch(unlabeled_images[u_index], cfg.augment, generator) if uses_unlabeled else None
            losses = step(model, xl, labeled.labels[l_index], xu, generator)
            check_finite(losses["loss"], f"{where}, step {scheduler.last_epoch}")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
        return {key: value / steps for key, value in totals.items()}
    return epoch_fn


def semisup_meta(model_name: str, ds: ImageDataset, cfg: SemiSupConfig, class_weight: float) -> dict:
    """What :func:`rebuild_semisup` and ``predict`` need, stored in the checkpoints: the classification
    chapter's fields, ``input`` = "unit" (images / 255), the architecture and the alpha used."""
    return {**model_meta(model_name, ds), "input": "unit", "latent_dim": cfg.latent_dim,
            "branch_channels": list(cfg.branch_channels), "dropout": cfg.dropout, "hidden": CLASSIFIER_HIDDEN,
            "class_weight_used": class_weight}


def _train_generative(cfg: SemiSupConfig, model_name: str, ds: ImageDataset, data: SemiSupData, out_dir, log):
    pool = data.splits.train.images
    class_weight = resolve_class_weight(cfg, len(pool), len(data.labeled.labels))
    meta = semisup_meta(model_name, ds, cfg, class_weight)
    torch.manual_seed(cfg.seed)  # the initial weights, as in the other chapters
    model = rebuild_semisup(meta).to(pool.device)
    epoch_fn = make_epoch_fn(make_step(model_name, cfg, class_weight), data.labeled, pool, cfg,
                             uses_unlabeled=model_name != "encoder_only")
    val = unit_split(data.splits.val)
    history = fit_epochs(model, cfg, out_dir, steps_per_epoch(cfg, len(pool)), epoch_fn,
                         lambda m: evaluate(ClassifierView(m), val, cfg.eval_batch_size, cfg.dtype),
                         device=pool.device, log=log, name=model_name, meta=meta)
    return model, history


def _train_cnn(cfg: SemiSupConfig, ds: ImageDataset, data: SemiSupData, out_dir, log):
    """``mycnn`` with :func:`fmnist_core.core.train.fit` on the labeled subset, tiled to the same number of
    steps per epoch as the other models."""
    tcfg = cfg.narrow(TrainConfig, {"train_images": 0})
    n = steps_per_epoch(cfg, len(data.splits.train.labels)) * cfg.batch_size
    tile = torch.arange(n, device=data.labeled.labels.device) % len(data.labeled.labels)
    labeled = Split(data.labeled.images[tile], data.labeled.labels[tile], ds.mean, ds.std)
    # The semi-supervised settings go into the checkpoints too: another labeled subset is not resumed.
    meta = {**model_meta(CNN_ARCHITECTURE, ds), "input": "standardised", "semisup": cfg.to_dict()}
    torch.manual_seed(cfg.seed)
    c, h, _ = ds.image_shape
    model = build_model(CNN_ARCHITECTURE, in_channels=c, image_size=h, num_classes=ds.num_classes)
    history = fit(model.to(labeled.images.device), labeled, data.splits.val, tcfg, out_dir, log=log, name="cnn",
                  meta=meta)
    return model, history


def train_semisup(cfg: SemiSupConfig, model_name: str, ds: ImageDataset, out_dir, log=print):
    """Train one model of the chapter with :func:`fmnist_core.core.train.fit_epochs`; ``best.pt`` has the best
    validation accuracy.

    Parameters
    ----------
    cfg : SemiSupConfig
    model_name : str
        ``semisup_vae``, ``m2``, ``encoder_only`` or ``cnn``.
    ds : ImageDataset
        The dataset, on the training device.
    out_dir : path
        Receives ``last.pt``, ``best.pt``, ``history.json``, ``history.csv`` (resumed if present) and
        ``labeled_indices.npz`` (``labeled``, ``train``, ``val``: indices into the training images).
    log : callable

    Returns
    -------
    model : torch.nn.Module
        The model after the last epoch (``best.pt`` holds the best one; ``predict`` rebuilds it).
    history : list of dict
        Per epoch: ``train_*`` losses (per-step means), ``val_loss`` and ``val_accuracy``.
    splits : fmnist_core.chapters.classification.Splits
        ``train`` (the unlabeled images: the whole training split), ``val``, ``test``.
    labeled_idx : np.ndarray
        Indices into ``ds.train_images`` of the labeled subset.
    """
    require_choice(model_name, "model_name", SEMISUP_MODELS)
    data = semisup_splits(cfg, ds)
    save_indices(Path(out_dir) / "labeled_indices.npz", labeled=data.labeled_idx, train=data.train_idx,
                 val=data.val_idx)
    if model_name == "cnn":
        model, history = _train_cnn(cfg, ds, data, out_dir, log)
    else:
        model, history = _train_generative(cfg, model_name, ds, data, out_dir, log)
    return model, history, data.splits, data.labeled_idx


# ------------------------------------------------------------------------------------------ prediction
def predict_semisup_proba(model: nn.Module, images: torch.Tensor, tta: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, K) on the CPU from a model with a ``classify`` method.

    ``images``: ``uint8`` (N, C, H, W), or float already in [0, 1], on the model's device. With ``tta``
    the softmax is averaged over that many extra shifted/flipped copies (the training augmentation; its
    zero padding is black in [0, 1] images), by :func:`fmnist_core.core.metrics.predict_proba`.
    """
    return metrics.predict_proba(ClassifierView(model), to_unit(images), batch_size, tta,
                                 weak_augment if tta else None)


def load_trained_semisup(path, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild any model of the chapter from its checkpoint; returns (model in eval mode, state)."""
    def build(config):
        return rebuild_semisup(config) if config["model"] in REBUILDABLE else rebuild(config)
    return load_trained(path, build, device)


def class_probabilities(model: torch.nn.Module, config: dict, images: torch.Tensor, tta: int = 0,
                        batch_size: int = 256) -> torch.Tensor:
    """Softmax probabilities (N, K) on the CPU for images in [0, 1] (float, N x C x H x W, on the model's
    device), fed as the checkpoint's ``input`` field says; ``tta`` extra shifted/flipped copies are
    averaged in (:func:`fmnist_core.core.metrics.predict_proba`)."""
    kind = config.get("input", "standardised")
    if kind == "unit":
        return predict_semisup_proba(model, images, tta, batch_size)
    if kind != "standardised":
        raise ConfigError(f"the checkpoint's input kind {kind!r} is unknown (expected 'unit' or 'standardised')")
    shape = (1, -1, 1, 1)
    mean = torch.tensor(config["mean"], device=images.device).view(shape)
    std = torch.tensor(config["std"], device=images.device).view(shape)
    return metrics.predict_proba(model, (images - mean) / std, batch_size, tta,
                                 tta_augment(config["mean"], config["std"]) if tta else None)
