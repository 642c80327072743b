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
the labeled subset as often as needed (a fresh shuffle per pass, the cycle restarting with every epoch).
All four models get the same number of labeled batches per epoch, so with 100 labels an epoch is not a
single step.

Training goes through the book's one loop: ``semisup_vae``, ``m2`` and ``encoder_only`` are the
:class:`SemiSupervised` algorithm run by :func:`fmnist_core.core.loop.train`, the ``cnn`` baseline is
:func:`fmnist_core.core.supervised.fit` on the labeled subset. One trained and evaluated model is a
``semisup`` job (:func:`run_semisup`, configured by :class:`SemiSupConfig`). The weights of the
classification terms are derived in :func:`m2_loss` (M2's ``alpha``) and :func:`semisup_loss` (the
Semi-SupVAE's ``class_weight``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_core.core import loop, metrics
from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import (TEST_IMAGES, TRAIN_IMAGES, ImageDataset, Split, Splits, balanced_subset, job_dataset,
                                   make_generator, make_splits, permutation, save_indices, tta_augment, weak_augment)
from fmnist_core.core.errors import ConfigError
from fmnist_core.core.generative import kl_divergence, reconstruction_loss, reparameterize, to_unit, vae_loss
from fmnist_core.core.io import write_json
from fmnist_core.core.jobs import job_kind
from fmnist_core.core.loop import Algorithm, Plan, Selection, load_trained
from fmnist_core.core.models import build_model, model_meta, rebuild
from fmnist_core.core.supervised import fit
from fmnist_core.core.train import (EpochBudget, OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig,
                                    autocast_context, evaluate, prepare_model, resolve_device, resolve_dtype)

SEMISUP_MODELS = ("semisup_vae", "m2", "encoder_only", "cnn")
CNN_ARCHITECTURE = "mycnn"  # the classification chapter's registry name of the "cnn" baseline
CLASSIFIER_HIDDEN = 128
M2_DIAGNOSTIC_IMAGES = 200  # validation (and unlabeled) images of M2's decoder-agreement and gradient-ratio figures
DATASET = "fashion_mnist"
KINGMA_ALPHA = 0.1  # Kingma et al. (2014): alpha = 0.1 N, i.e. 0.1 on the mean cross-entropy (see m2_loss)
SEMISUP_VAE_CLASS_WEIGHT = 784.0  # 28 x 28 pixels: see SemiSupParams.class_weight


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class SemiSupBudget(EpochBudget):
    """The budget of every model of the chapter, counted in passes over the unlabeled images."""

    epochs: int = param(20, "passes over the unlabeled images (the training split)")


@dataclass
class SemiSupParams(Config):
    """The chapter's own parameters: data, architecture, loss weights, sampling and evaluation.

    ``alpha`` weighs M2's classification term as Kingma et al. (2014) did (derivation in :func:`m2_loss`).
    ``class_weight`` weighs the Semi-SupVAE's. Its source, the Semi-SupVAE report, gives no weight: for labeled
    images it computes the reconstruction loss and the classification loss and back-propagates both, i.e. adds them
    unweighted, without saying how either is reduced. Here the ELBO is in nats per image (summed over the pixels:
    a few hundred nats) and the cross-entropy a mean over the labeled images (2.3 nats untrained), so a weight of
    1 would leave the shared encoder to the reconstruction alone. The default, 784 = 28 x 28, is the report's
    unweighted sum written in these units under PyTorch's default reductions (reconstruction averaged over pixels,
    cross-entropy over images): multiplying that sum by the pixels per image gives the per-image reconstruction
    plus 784 times the mean cross-entropy. It does not depend on the label count. A short check (3 epochs over
    12,000 unlabeled images, one seed; validation accuracy) put weights of 1 and 10 well behind 100 and 784, which
    were close: 65 / 71 / 75 / 73 % at 100 labels, 71 / 77 / 82 / 84 % at 1,000.
    """

    augment: bool = param(True, "random 2-pixel shift and horizontal flip of labeled and unlabeled batches")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split and of the test subset")
    train_images: int = param(0, "cut the training split (the unlabeled pool) to this many images, class-balanced "
                                 "(drawn with the run's seed); 0 = all")
    test_images: int = param(0, "evaluate on a class-balanced test subset of this size, the same for every run; "
                                "0 = all")
    latent_dim: int = param(80, "dimensions of the latent code z")
    branch_channels: list[int] = param([32, 64], "[a, b]: the one-convolution branch has a channels, the "
                                                 "two-convolution branch a then b")
    dropout: float = param(0.25, "dropout after every encoder convolution and in the classifier")
    kl_weight: float = param(1.0, "weight of the KL term (1 = the ELBO; the source report had no KL term)")
    class_weight: float = param(SEMISUP_VAE_CLASS_WEIGHT,
                                "Semi-SupVAE: weight of the labeled images' mean cross-entropy next to the per-image "
                                "ELBO; the Semi-SupVAE report added the two losses with no weight (784 = 28 x 28: that "
                                "unweighted sum under PyTorch's mean reductions, in nats per image)")
    alpha: float = param(KINGMA_ALPHA, "M2: weight of the labeled images' mean cross-entropy next to the per-image "
                                       "bounds; Kingma et al.'s alpha = 0.1 N on sums over N images is 0.1 here")
    m2_warmup: int = param(0, "M2: optimiser steps at the start on the labeled images only (labeled bound + alpha "
                              "x cross-entropy, no unlabeled bound), so that the decoder learns what each class looks "
                              "like before U(x) steers q(y | x) towards the class it reconstructs best; 0 = none "
                              "(Kingma et al.'s objective from the first step)")
    m2_gate_every: int = param(0, "M2: after the warm-up, keep the unlabeled bound out until the decoder's best class "
                                  "agrees with the labels of the diagnostic validation images at least as often as "
                                  "q(y | x) is right, checked every this many steps; 0 = no gate (the full objective "
                                  "from step m2_warmup)")
    unlabeled_ratio: int = param(1, "unlabeled images per labeled image in each step")
    tta: int = param(8, "test-time augmentation: average softmax over this many extra shifted/flipped copies")

    def check(self) -> None:
        super().check()
        # The labeled subset, the validation split and the train_images cut are all class-balanced.
        require(10 <= self.val_size < TRAIN_IMAGES[DATASET] and self.val_size % 10 == 0, "val_size",
                f"must be a positive multiple of 10 below Fashion-MNIST's 60,000 training images, got {self.val_size}")
        require(self.split_seed >= 0, "split_seed", f"must be non-negative, got {self.split_seed}")
        require(self.train_images >= 0 and self.train_images % 10 == 0, "train_images",
                f"must be 0 (all) or a multiple of 10 (the same number of every class), got {self.train_images}")
        require(self.test_images == 0 or (10 <= self.test_images <= TEST_IMAGES[DATASET]
                                          and self.test_images % 10 == 0), "test_images",
                f"must be 0 (all) or a positive multiple of 10 up to 10,000, got {self.test_images}")
        require(self.latent_dim >= 1, "latent_dim", f"must be at least 1, got {self.latent_dim}")
        require(len(self.branch_channels) == 2 and all(c >= 1 for c in self.branch_channels), "branch_channels",
                f"must be two positive widths [a, b], got {self.branch_channels}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("kl_weight", "class_weight", "alpha"):
            require(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)}")
        require(self.unlabeled_ratio >= 1, "unlabeled_ratio", f"must be at least 1, got {self.unlabeled_ratio}")
        require(self.m2_warmup >= 0, "m2_warmup", f"must be 0 (none) or a number of steps, got {self.m2_warmup}")
        require(self.m2_gate_every >= 0, "m2_gate_every",
                f"must be 0 (no gate) or a number of steps, got {self.m2_gate_every}")
        require(self.tta >= 0, "tta", "must be non-negative")


@dataclass
class SemiSupConfig(SemiSupBudget, OptimizerConfig, ScheduleConfig, RuntimeConfig, SemiSupParams):
    """One ``semisup`` job: one model trained on one labeled subset with one seed, then evaluated."""

    model: str = param("semisup_vae", "semisup_vae | m2 | encoder_only | cnn")
    num_labels: int = param(5000, "labeled images (class-balanced, drawn from the training split); 0 = all")
    label_seed: int = param(0, "seed of the labeled subset")
    seed: int = param(0, "seed of the initial weights, the batch order, augmentation, dropout and z noise")

    def check(self) -> None:
        super().check()
        require_choice(self.model, "model", SEMISUP_MODELS)
        require(self.num_labels >= 0 and self.num_labels % 10 == 0, "num_labels",
                f"must be 0 (all) or a positive multiple of 10 (the same number of every class), got {self.num_labels}")
        for name in ("seed", "label_seed"):  # NumPy's generators refuse negative seeds
            require(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)}")


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
    (the ``cnn`` baseline's checkpoints name ``mycnn``: :func:`fmnist_core.core.models.rebuild` builds it)."""
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


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows where ``mask`` is True, computed on the device without branching.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, K)
    labels : torch.Tensor, shape (N,)
        Class indices; entries where ``mask`` is False may hold anything (-1, say).
    mask : torch.Tensor of bool, shape (N,)

    Returns
    -------
    torch.Tensor
        A 0-dim tensor: the mean over the masked rows, or 0 (through which no gradient flows) when no row is.
    """
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    each = F.cross_entropy(logits, safe, reduction="none")
    weight = mask.to(each.dtype)
    return (each * weight).sum() / weight.sum().clamp(min=1.0)


def semisup_loss(out: dict, x: torch.Tensor, labels: torch.Tensor, labeled_mask: torch.Tensor, kl_weight: float,
                 class_weight: float, recon_kind: str = "bce") -> dict:
    """The SemiSupVAE objective: ``mean(recon + kl_weight * KL) + class_weight * mean_labeled(CE)``.

    Every image of the batch contributes its negative ELBO (nats per image); the labeled ones also their
    cross-entropy, averaged over the labeled images of the batch and weighted by ``class_weight`` (see
    :class:`SemiSupParams` for the default and for what the Semi-SupVAE report did). Nothing is read back
    to the host: the labeled images are selected by masking (:func:`masked_cross_entropy`).

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
        Weights of the KL term and of the mean cross-entropy.
    recon_kind : str
        ``bce`` or ``mse`` (see :func:`fmnist_core.core.generative.reconstruction_loss`).

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
    ce = masked_cross_entropy(out["logits"].float(), labels, labeled_mask)
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
            alpha: float, generator: torch.Generator | None = None, kl_weight: float = 1.0,
            recon_kind: str = "bce") -> dict:
    """Kingma et al.'s J^alpha per image: ``mean L(x, y) + mean U(x) + alpha * mean(-log q(y | x))``.

    The weight ``alpha`` of the mean cross-entropy is 0.1 by default, whatever the number of labels:

    * the paper (Kingma et al., 2014, section 3.1.2, eq. 9) writes
      ``J^alpha = sum_labeled L(x, y) + sum_unlabeled U(x) + alpha * E_p~l(x,y)[-log q(y | x)]``, the bounds
      *summed* over the data and the classification term an *expectation*, i.e. a mean over the labeled
      pairs, with ``alpha = 0.1 N``; divided by N (a per-image objective for stochastic gradients) this is
      ``(sum L + sum U) / N + 0.1 * mean_labeled(-log q(y | x))``;
    * their code (dpkingma/nips14-ssl, ``learn_yz_x_ss.py``, run with ``alpha=0.1`` by ``exp_ssl.py``)
      multiplies each labeled ``log q(y | x)`` by ``beta = alpha * n_tot / n_labeled`` and divides the
      objective by ``n_tot``: ``beta / n_tot * sum_labeled = alpha * mean_labeled``, again 0.1 on the mean
      cross-entropy next to bounds averaged per image.

    Here both bounds are batch means (one labeled and one unlabeled batch per step), so ``alpha`` multiplies
    the labeled batch's mean cross-entropy directly. (The paper's sums weigh the labeled bound by the labeled
    share of the data, n_labeled / N; the per-batch means of this chapter give both bounds equal weight.)

    Returns
    -------
    dict
        ``loss``, ``labeled`` (mean L), ``unlabeled`` (mean U; 0 without unlabeled images) and
        ``classification`` (mean cross-entropy of the labeled batch), all 0-dim tensors.
    """
    labeled = m2_labeled_bound(model, x_labeled, y_labeled, generator, kl_weight, recon_kind).mean()
    has_unlabeled = x_unlabeled is not None and len(x_unlabeled) > 0
    unlabeled = (m2_unlabeled_bound(model, x_unlabeled, generator, kl_weight, recon_kind).mean() if has_unlabeled
                 else labeled.new_zeros(()))
    ce = F.cross_entropy(model.classify(x_labeled).float(), y_labeled)
    return {"loss": labeled + unlabeled + alpha * ce, "labeled": labeled, "unlabeled": unlabeled,
            "classification": ce}


def _flat_grad(value: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def m2_agreement(model: M2, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                 kl_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's agreement and q(y | x)'s accuracy on images ``x`` with labels ``y`` (0-dim tensors, float32,
    eval mode, no gradients): the share of ``x`` whose best class under the decoder, argmin_y L(x, y), is ``y``,
    and the share that q(y | x) classifies right."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        n, k = len(x), model.num_classes
        classes = torch.arange(k, device=x.device).repeat_interleave(n)
        bounds = _m2_bound(model, model.features(x).repeat(k, 1), x.repeat(k, 1, 1, 1), classes, generator,
                           kl_weight, "bce").view(k, n)
        agreement = (bounds.argmin(0) == y).float().mean()
        q_accuracy = (model.classify(x).argmax(1) == y).float().mean()
    model.train(was_training)
    return agreement, q_accuracy


def m2_diagnostics(model: M2, x: torch.Tensor, y: torch.Tensor, x_unlabeled: torch.Tensor, alpha: float,
                   generator: torch.Generator | None = None, kl_weight: float = 1.0) -> dict:
    """Why M2 learns or does not: two figures of a trained (or training) model, in float32.

    * ``decoder_agreement``: the share of the images ``x`` whose best class under the decoder, argmin_y L(x, y)
      (the class the model reconstructs at the lowest cost), is their label ``y``. The unlabeled bound U(x)
      pulls q(y | x) towards that class, so below q(y | x)'s own accuracy it teaches the classifier mistakes.
    * ``gradient_ratio``: the norm of the gradient of mean U(x) (over ``x_unlabeled``) with respect to q(y | x)'s
      parameters over that of ``alpha`` x the mean cross-entropy of (``x``, ``y``): how much more the unlabeled
      bound than the labels steers the classifier.
    """
    agreement, q_accuracy = m2_agreement(model, x, y, generator, kl_weight)
    was_training = model.training
    model.eval()
    params = [p for p in model.q_y.parameters() if p.requires_grad]
    with torch.autocast(x.device.type, enabled=False):
        g_u = _flat_grad(m2_unlabeled_bound(model, x_unlabeled, generator, kl_weight).mean(), params)
        g_ce = _flat_grad(alpha * F.cross_entropy(model.classify(x).float(), y), params)
    model.train(was_training)
    ratio = g_u.norm() / g_ce.norm().clamp(min=1e-12)
    agreement, q_accuracy, ratio = torch.stack([agreement, q_accuracy, ratio]).tolist()
    return {"decoder_agreement": agreement, "classifier_accuracy": q_accuracy, "gradient_ratio": ratio}


def classification_weight(cfg: SemiSupConfig) -> float:
    """The weight of the mean cross-entropy in the loss of ``cfg.model``: ``class_weight`` for the
    Semi-SupVAE, ``alpha`` for M2, 1 for the classifiers trained on labels alone (their only term)."""
    if cfg.model == "semisup_vae":
        return cfg.class_weight
    if cfg.model == "m2":
        return cfg.alpha
    return 1.0


def _semisup_vae_step(model, xl, yl, xu, generator, *, dtype, weight, kl_weight):
    x = torch.cat([xl, xu])
    labels = torch.cat([yl, yl.new_full((len(xu),), -1)])
    mask = torch.arange(len(x), device=x.device) < len(xl)
    with autocast_context(x.device, dtype):
        out = model(x, generator=generator)
    return semisup_loss(out, x, labels, mask, kl_weight, weight)


def _m2_step(model, xl, yl, xu, generator, *, dtype, weight, kl_weight):
    with autocast_context(xl.device, dtype):
        return m2_loss(model, xl, yl, xu, weight, generator, kl_weight)


def _encoder_only_step(model, xl, yl, xu, generator, *, dtype):
    with autocast_context(xl.device, dtype):
        ce = F.cross_entropy(model(xl).float(), yl)
    return {"loss": ce, "classification": ce}


def make_step(cfg: SemiSupConfig):
    """``step(model, x_labeled, y_labeled, x_unlabeled, generator) -> dict`` of 0-dim losses (``loss`` and
    the terms recorded in the history) for ``cfg.model`` (not ``cnn``), with its weights read once."""
    name, dtype = cfg.model, resolve_dtype(cfg.dtype, resolve_device(cfg.device), cfg.model)
    if name == "encoder_only":
        return functools.partial(_encoder_only_step, dtype=dtype)
    step = _semisup_vae_step if name == "semisup_vae" else _m2_step
    return functools.partial(step, dtype=dtype, weight=classification_weight(cfg), kl_weight=cfg.kl_weight)


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
    """The class-balanced train/validation split (``train`` cut to ``train_images`` if set), the
    class-balanced labeled subset of ``train`` (``balanced_subset(train labels, num_labels, label_seed)``)
    and the test set (or its class-balanced subset of ``test_images``, drawn with ``split_seed``)."""
    labels = ds.train_labels.cpu().numpy()
    try:
        splits, indices = make_splits(ds, cfg.val_size, cfg.split_seed, cfg.test_images)
        train_idx = indices["train"]
        if 0 < cfg.train_images < len(train_idx):
            train_idx = train_idx[balanced_subset(labels[train_idx], cfg.train_images, cfg.seed, ds.num_classes)]
        labeled_idx = (train_idx[balanced_subset(labels[train_idx], cfg.num_labels, cfg.label_seed, ds.num_classes)]
                       if cfg.num_labels else train_idx)
    except ValueError as err:
        raise ConfigError(f"parameter 'num_labels', 'val_size', 'train_images' or 'test_images' does not fit "
                          f"{ds.name}: {err}") from None

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
def _permutation(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return permutation(n, generator).to(device)


def _unit_batch(images: torch.Tensor, augment: bool, generator: torch.Generator) -> torch.Tensor:
    return to_unit(weak_augment(images, generator) if augment else images)


class SemiSupervised(Algorithm):
    """One labeled and one unlabeled batch per step for ``semisup_vae``, ``m2`` or ``encoder_only``.

    Step ``k`` of an epoch takes the ``k``-th slice of that epoch's permutation of the unlabeled pool
    (``batch_size * unlabeled_ratio`` images) and the next ``batch_size`` images of the labeled cycle (a
    fresh permutation whenever one is used up, and at the start of every epoch); both are augmented when
    ``augment`` is set (``encoder_only`` ignores the unlabeled batch). Losses are :func:`make_step`'s; their
    terms are the step statistics (``train_recon``, ``train_kl``, ``train_labeled``, ``train_unlabeled``,
    ``train_classification``: means over the steps of an epoch). Evaluation: cross-entropy and accuracy of
    the classifier on the validation split (``val_loss``, ``val_accuracy``).

    Parameters
    ----------
    model, runnable : torch.nn.Module
        The model on the device and what the forward pass calls (itself, or its compiled version).
    data : SemiSupData
    cfg : SemiSupConfig
    """

    def __init__(self, model, runnable, data: SemiSupData, cfg: SemiSupConfig):
        self.model, self.runnable, self.labeled, self.pool = model, runnable, data.labeled, data.splits.train.images
        self.view, self.val = ClassifierView(runnable), unit_split(data.splits.val)
        self.batch_size, self.unlabeled_batch = cfg.batch_size, cfg.batch_size * cfg.unlabeled_ratio
        self.augment, self.eval_batch_size = cfg.augment, cfg.eval_batch_size
        self.dtype = resolve_dtype(cfg.dtype, data.labeled.images.device, cfg.model)
        self.step_fn, self.uses_unlabeled = make_step(cfg), cfg.model != "encoder_only"
        self.m2 = cfg.model == "m2"
        self.warmup, self.gate_every = (cfg.m2_warmup, cfg.m2_gate_every) if self.m2 else (0, 0)
        self.full_from = None if self.gate_every else self.warmup  # first step of the full objective (None: not yet)
        n = min(M2_DIAGNOSTIC_IMAGES, len(self.val.labels))  # M2's gate and diagnostics: the same images every time
        self.diagnostic_val = (to_unit(self.val.images[:n]), self.val.labels[:n]) if self.m2 else None
        self.diagnostic_pool = to_unit(self.pool[:n]) if self.m2 else None
        self.alpha, self.kl_weight = classification_weight(cfg), cfg.kl_weight
        self.steps_per_epoch = steps_per_epoch(cfg, len(self.pool))
        self.u_order, self.l_order, self.l_next = None, None, 0

    def _labeled_index(self, generator) -> torch.Tensor:
        if self.l_order is None or self.l_next >= len(self.l_order):
            self.l_order, self.l_next = _permutation(len(self.labeled.labels), generator, self.pool.device), 0
        index = self.l_order[self.l_next:self.l_next + self.batch_size]
        self.l_next += self.batch_size
        return index

    def train_step(self, step, generator):
        position = step % self.steps_per_epoch
        if position == 0:  # a new pass over the unlabeled pool; the labeled cycle restarts too
            self.u_order, self.l_order = _permutation(len(self.pool), generator, self.pool.device), None
        u_index = self.u_order[position * self.unlabeled_batch:(position + 1) * self.unlabeled_batch]
        l_index = self._labeled_index(generator)
        xl = _unit_batch(self.labeled.images[l_index], self.augment, generator)
        xu = _unit_batch(self.pool[u_index], self.augment, generator) if self.uses_unlabeled else None
        full = self._full_objective(step)
        if not full:  # M2's labeled-only warm-up (or its gate still shut): no unlabeled bound
            xu = xu[:0]
        self.runnable.train()
        losses = self.step_fn(self.runnable, xl, self.labeled.labels[l_index], xu, generator)
        logs = {k: v.detach() for k, v in losses.items() if k != "loss"}
        if self.m2:  # the share of an interval's steps on the full objective
            logs["full_objective"] = xl.new_full((), float(full))
        return losses["loss"], logs

    def _full_objective(self, step: int) -> bool:
        """Whether step ``step`` takes the unlabeled bound: from ``full_from`` on; with M2's gate, ``full_from`` is
        the first check (every ``gate_every`` steps after the warm-up) at which the decoder's best class agrees
        with the diagnostic validation images' labels at least as often as q(y | x) is right."""
        if self.full_from is None and step >= self.warmup and (step - self.warmup) % self.gate_every == 0:
            agreement, q_accuracy = m2_agreement(self.model, *self.diagnostic_val, make_generator(0, self.pool.device),
                                                 self.kl_weight)
            if agreement >= q_accuracy:
                self.full_from = step
        return self.full_from is not None and step >= self.full_from

    def evaluate(self):
        stats = evaluate(self.view, self.val, self.eval_batch_size, self.dtype)
        out = {f"val_{k}": v for k, v in stats.items()}
        if self.m2:  # on the first validation images and unlabeled images, the same every evaluation
            out.update({f"val_{k}": v for k, v in m2_diagnostics(
                self.model, *self.diagnostic_val, self.diagnostic_pool, self.alpha,
                make_generator(0, self.pool.device), self.kl_weight).items()})
        return out

    def state_dict(self):
        return {"u_order": self.u_order, "l_order": self.l_order, "l_next": self.l_next, "full_from": self.full_from}

    def load_state_dict(self, state):
        self.u_order, self.l_order, self.l_next = state["u_order"], state["l_order"], state["l_next"]
        self.full_from = state.get("full_from", self.full_from)


def semisup_meta(cfg: SemiSupConfig, ds: ImageDataset) -> dict:
    """What :func:`rebuild_semisup` and ``predict`` need, stored in the checkpoints: the classification
    chapter's fields, ``input`` = "unit" (images / 255), the architecture and the classification weight."""
    return {**model_meta(cfg.model, ds), "input": "unit", "latent_dim": cfg.latent_dim,
            "branch_channels": list(cfg.branch_channels), "dropout": cfg.dropout, "hidden": CLASSIFIER_HIDDEN,
            "classification_weight": classification_weight(cfg)}


def _train_generative(cfg: SemiSupConfig, ds: ImageDataset, data: SemiSupData, out_dir: Path, log):
    meta = semisup_meta(cfg, ds)
    torch.manual_seed(cfg.seed)  # the initial weights, as in the other chapters
    device = data.labeled.images.device
    raw, runnable = prepare_model(rebuild_semisup(meta), cfg, device, resolve_dtype(cfg.dtype, device, cfg.model))
    algo = SemiSupervised(raw, runnable, data, cfg)
    plan = Plan.epochs(cfg.epochs, algo.steps_per_epoch, Selection("val_accuracy"))
    return loop.train(algo, plan, cfg, cfg.schedule, cfg.seed, out_dir, {**cfg.to_dict(), **meta},
                      name=out_dir.name, log=log)


def _train_cnn(cfg: SemiSupConfig, ds: ImageDataset, data: SemiSupData, out_dir: Path, log):
    """``mycnn`` with :func:`fmnist_core.core.supervised.fit` on the labeled subset, tiled to the same number of
    steps per epoch as the other models."""
    tcfg = cfg.narrow(TrainConfig, {"train_images": 0}, where="semisup job (cnn)")
    n = steps_per_epoch(cfg, len(data.splits.train.labels)) * cfg.batch_size
    tile = torch.arange(n, device=data.labeled.labels.device) % len(data.labeled.labels)
    labeled = Split(data.labeled.images[tile], data.labeled.labels[tile], ds.mean, ds.std)
    # The semi-supervised settings go into the checkpoints too: they say which labeled subset it learnt from.
    meta = {**model_meta(CNN_ARCHITECTURE, ds), "input": "standardised", "semisup": cfg.to_dict()}
    torch.manual_seed(cfg.seed)
    c, h, _ = ds.image_shape
    model = build_model(CNN_ARCHITECTURE, in_channels=c, image_size=h, num_classes=ds.num_classes)
    return fit(model.to(labeled.images.device), labeled, data.splits.val, tcfg, out_dir, meta=meta,
               name=out_dir.name, log=log)


def train_semisup(cfg: SemiSupConfig, ds: ImageDataset, out_dir, log=print) -> tuple[list[dict], SemiSupData]:
    """Train ``cfg.model`` on ``ds``; ``best.pt`` has the best validation accuracy.

    Parameters
    ----------
    cfg : SemiSupConfig
    ds : ImageDataset
        The dataset, on the training device.
    out_dir : path
        The job folder: ``best.pt``, ``final.pt``, ``history.json``/``.csv`` (``last.pt`` while training,
        resumed if it matches) and ``labeled_indices.npz`` (``labeled``, ``train``, ``val``: indices into
        the training images).
    log : callable

    Returns
    -------
    history : list of dict
        Per epoch: ``train_*`` means over its steps, ``val_loss``, ``val_accuracy``, ``lr``, ``seconds``.
    data : SemiSupData
        The splits and the labeled subset the model learnt from.
    """
    out_dir = Path(out_dir)
    data = semisup_splits(cfg, ds)
    save_indices(out_dir / "labeled_indices.npz", labeled=data.labeled_idx, train=data.train_idx,
                 val=data.val_idx)
    train = _train_cnn if cfg.model == "cnn" else _train_generative
    return train(cfg, ds, data, out_dir, log), data


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose most probable class is the label (an exact fraction, as the loop's evaluation)."""
    return int((probs.argmax(1) == labels.cpu()).sum()) / len(labels)


def evaluate_run(out_dir, data: SemiSupData, tta: int, batch_size: int = 256) -> dict:
    """Accuracy of a run's ``best.pt`` on its labeled subset, the validation split and the test set (also with
    ``tta`` extra augmented copies, whose probabilities are saved as ``test_probs.npy``); its epoch."""
    out_dir = Path(out_dir)
    model, state = load_trained_semisup(out_dir / "best.pt", data.splits.test.images.device)

    def probs(split, copies=0):
        return class_probabilities(model, state["config"], to_unit(split.images), copies, batch_size)

    test = data.splits.test
    test_probs = probs(test, tta)
    np.save(out_dir / "test_probs.npy", test_probs.numpy())
    return {"train_accuracy": accuracy(probs(data.labeled), data.labeled.labels),
            "val_accuracy": accuracy(probs(data.splits.val), data.splits.val.labels),
            "test_accuracy": accuracy(probs(test), test.labels),
            "test_accuracy_tta": accuracy(test_probs, test.labels), "best_epoch": int(state["epoch"])}


def train_and_evaluate(cfg: SemiSupConfig, ds: ImageDataset, out_dir, log=print) -> dict:
    """:func:`train_semisup`, then :func:`evaluate_run`; the training time goes to ``timings.json``.

    Returns
    -------
    dict
        The job's metrics (reproduced bit for bit by a re-run on the CPU): ``model``, ``num_labels`` (the
        labeled images used), ``unlabeled_images``, ``seed``, ``label_seed``, ``classification_weight`` and
        :func:`evaluate_run`'s accuracies and best epoch.
    """
    history, data = train_semisup(cfg, ds, out_dir, log)
    write_json(Path(out_dir) / "timings.json", {"train_s": sum(r["seconds"] for r in history)})
    return {"model": cfg.model, "num_labels": len(data.labeled.labels), "unlabeled_images": len(data.splits.train.labels),
            "seed": cfg.seed, "label_seed": cfg.label_seed, "classification_weight": classification_weight(cfg),
            **evaluate_run(out_dir, data, cfg.tta, cfg.eval_batch_size)}


@job_kind("semisup", SemiSupConfig)
def run_semisup(cfg: SemiSupConfig, out_dir, log=print) -> dict:
    """The ``semisup`` job: load Fashion-MNIST on the configured device, train and evaluate one model
    (:func:`train_and_evaluate`); returns its metrics."""
    return train_and_evaluate(cfg, job_dataset(DATASET, resolve_device(cfg.device)), out_dir, log)


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
