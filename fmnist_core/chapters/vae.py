"""The variational auto-encoder chapter: model, loss, training through ``fit_epochs``, and what a VAE can do.

The VAE sees images scaled to [0, 1] (``uint8 / 255``), never standardised: the decoder ends in a sigmoid
and the Bernoulli (BCE) likelihood needs targets in [0, 1]. Every random draw (reparameterisation noise,
samples, the z used to estimate the ELBO) goes through a seeded ``torch.Generator``.

Units: losses are sums over pixels and latent dimensions per image, in nats, averaged over images.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_core.core.config import param, require, require_choice
from fmnist_core.core.data import ImageDataset, Splits, batch_indices, load_dataset, make_generator, make_splits, subset
from fmnist_core.core.errors import ConfigError, DataError
from fmnist_core.core.generative import (RECON_LOSSES, gaussian_constant, kl_divergence, reconstruction_loss,
                                        reparameterize, to_unit, vae_loss)
from fmnist_core.core.train import (Selection, TrainConfig, autocast_context, check_finite, fit_epochs, load_trained,
                    resolve_device)

DATASETS = ("fashion_mnist", "cifar10", "lfw")
ARCHITECTURES = ("seed", "deep")
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "lfw": 1}
# Fashion-MNIST: Sneaker -> Ankle boot, T-shirt/top -> Dress, within Sneaker, within Trouser.
DEFAULT_PAIRS = [[7, 9], [0, 3], [7, 7], [1, 1]]


@dataclass
class VAEConfig(TrainConfig):
    """Parameters of the VAE chapter; training fields are shared with :class:`TrainConfig`.

    The defaults differ from supervised training where a VAE wants otherwise: no augmentation (the
    model should reconstruct the data, not translations of it), no weight decay, plain Adam at 1e-3.
    """

    epochs: int = param(20, "passes over the training images")
    weight_decay: float = param(0.0, "L2 weight decay (none: the KL term already regularises the codes)")
    schedule: str = param("constant", "constant (plain Adam, the usual VAE recipe) | cosine | step")
    augment: bool = param(False, "unused by the VAE (it reconstructs the images as they are)")
    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10 | lfw (faces, 32x32 RGB)")
    latent_dim: int = param(20, "dimensions of the latent code z")
    beta: float = param(1.0, "weight of the KL term (1 = the ELBO; >1 = beta-VAE)")
    recon_loss: str = param("bce", "bce (Bernoulli decoder) | mse (Gaussian decoder, unit variance)")
    kl_warmup_epochs: int = param(0, "raise the KL weight linearly from 0 to beta over this many epochs, "
                                     "per step; 0 = none")
    architecture: str = param("seed", "seed (two conv layers each side, as the source report) | deep (BN)")
    channels: int = param(32, "base width of the convolutions")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split")
    latent_sizes: list[int] = param([], "latent sizes compared in the latent-size study; [] = no study")
    study_epochs: int = param(10, "epochs of each model of the latent-size study")
    interpolation_pairs: list[list[int]] = param(DEFAULT_PAIRS, "[class_a, class_b] pairs to interpolate "
                                                                "between (class indices)")
    interpolation_steps: int = param(11, "images along each interpolation, both endpoints included")
    samples: int = param(64, "images decoded from z ~ N(0, I)")
    embed_images: int = param(2000, "test images (class-balanced) whose latent means are embedded in 2-D")
    perplexity: float = param(30.0, "t-SNE perplexity of the latent-space picture")
    n_jobs: int = param(2, "threads for t-SNE")

    def check(self) -> None:
        super().check()
        require_choice(self.dataset, "dataset", DATASETS)
        require_choice(self.recon_loss, "recon_loss", RECON_LOSSES)
        require_choice(self.architecture, "architecture", ARCHITECTURES)
        require(self.latent_dim >= 1, "latent_dim", f"must be at least 1, got {self.latent_dim}")
        require(self.beta >= 0, "beta", f"must be non-negative, got {self.beta}")
        require(self.kl_warmup_epochs >= 0, "kl_warmup_epochs", "must be 0 (none) or positive")
        require(self.channels >= 1, "channels", f"must be at least 1, got {self.channels}")
        require(self.val_size >= 1, "val_size", f"must be at least 1, got {self.val_size}")
        require(all(n >= 1 for n in self.latent_sizes), "latent_sizes", "must hold positive sizes only")
        require(self.study_epochs >= 1, "study_epochs", f"must be at least 1, got {self.study_epochs}")
        require(self.interpolation_steps >= 9, "interpolation_steps",
                f"must be at least 9 (both endpoints included), got {self.interpolation_steps}")
        require(self.samples >= 1, "samples", f"must be at least 1, got {self.samples}")
        require(self.embed_images >= 10 and self.embed_images % DATASET_CLASSES[self.dataset] == 0,
                "embed_images", "must be at least 10 and divisible by the number of classes")
        require(self.embed_images <= 10000, "embed_images", "cannot exceed the 10,000 test images")
        require(self.split_seed >= 0, "split_seed", f"must be non-negative, got {self.split_seed}")
        require(self.perplexity > 0, "perplexity", "must be positive")
        require(self.n_jobs >= 1, "n_jobs", "must be at least 1")
        self._check_pairs()

    def _check_pairs(self) -> None:
        classes = DATASET_CLASSES[self.dataset]
        for pair in self.interpolation_pairs:
            require(len(pair) == 2, "interpolation_pairs", f"entries must be [class_a, class_b], got {pair}")
            require(all(0 <= c < classes for c in pair), "interpolation_pairs",
                    f"entry {pair} is out of range: {self.dataset} has classes 0..{classes - 1}"
                    + (" (one class, 'face': use [[0, 0]])" if self.dataset == "lfw" else ""))

    def study_config(self) -> "VAEConfig":
        """The configuration of one model of the latent-size study: ``study_epochs`` epochs."""
        return dataclasses.replace(self, epochs=self.study_epochs)


# ------------------------------------------------------------------------------------------- the model
def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _deconv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _seed_layers(in_channels: int, ch: int) -> tuple[nn.Module, nn.Module, int]:
    """The source report's network: two stride-2 4x4 convolutions each side (28→14→7, 32→16→8)."""
    encoder = nn.Sequential(nn.Conv2d(in_channels, ch, 4, 2, 1), nn.ReLU(inplace=True),
                            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.ReLU(inplace=True))
    decoder = nn.Sequential(nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.ReLU(inplace=True),
                            nn.ConvTranspose2d(ch, in_channels, 4, 2, 1))
    return encoder, decoder, 2 * ch


def _deep_layers(in_channels: int, ch: int) -> tuple[nn.Module, nn.Module, int]:
    """Three batch-normalised convolution blocks each side (one at full resolution, two stride-2)."""
    encoder = nn.Sequential(_conv_bn(in_channels, ch, 3, 1), _conv_bn(ch, 2 * ch, 4, 2), _conv_bn(2 * ch, 4 * ch, 4, 2))
    decoder = nn.Sequential(_deconv_bn(4 * ch, 2 * ch), _deconv_bn(2 * ch, ch), nn.Conv2d(ch, in_channels, 3, 1, 1))
    return encoder, decoder, 4 * ch


class VAE(nn.Module):
    """A convolutional VAE with a diagonal Gaussian encoder and a sigmoid (Bernoulli-mean) decoder.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for Fashion-MNIST, 3 for CIFAR-10 and LFW).
    image_size : int
        Height = width of the images; must be divisible by 4 (two stride-2 stages).
    latent_dim : int
        Dimensions of z.
    channels : int
        Base width of the convolutions.
    architecture : str
        ``seed`` (the source report's two-layer network) or ``deep`` (three BN blocks each side).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 20, channels: int = 32,
                 architecture: str = "seed"):
        super().__init__()
        require_choice(architecture, "architecture", ARCHITECTURES)
        require(image_size % 4 == 0, "image_size", f"must be divisible by 4, got {image_size}")
        require(latent_dim >= 1, "latent_dim", f"must be at least 1, got {latent_dim}")
        require(channels >= 1, "channels", f"must be at least 1, got {channels}")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        build = _seed_layers if architecture == "seed" else _deep_layers
        self.encoder, self.decoder, width = build(in_channels, channels)
        self.feature_shape = (width, image_size // 4, image_size // 4)
        flat = math.prod(self.feature_shape)
        self.fc_mu, self.fc_logvar = nn.Linear(flat, latent_dim), nn.Linear(flat, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, flat)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x) for images ``x`` in [0, 1]."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    reparameterize = staticmethod(reparameterize)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (the decoder's Bernoulli means) for codes ``z``."""
        h = F.relu(self.fc_decode(z)).view(-1, *self.feature_shape)
        return torch.sigmoid(self.decoder(h))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Returns ``(x_hat, mu, logvar)``; z is sampled with ``generator`` (the mean without one)."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar


def kl_weight(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """The KL weight at optimiser step ``step`` (from 0): linear from 0 to ``beta`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate_elbo(model: VAE, images_uint8: torch.Tensor, batch_size: int = 500,
                  generator: torch.Generator | None = None, kind: str = "bce") -> dict:
    """Negative ELBO (beta = 1) in nats per image, with one sample of z per image.

    Parameters
    ----------
    model : VAE
    images_uint8 : torch.Tensor
        ``uint8`` images N×C×H×W on the model's device.
    batch_size : int
    generator : torch.Generator, optional
        Draws z; defaults to a generator seeded with 0, so the estimate is reproducible.
    kind : str
        The decoder likelihood, ``bce`` or ``mse``.

    Returns
    -------
    dict
        ``neg_elbo``, ``recon``, ``kl`` (means per image). For ``mse`` also ``gaussian_constant`` (the
        nats per image that ``recon`` leaves out) and ``neg_elbo_nats`` = ``neg_elbo`` + that constant,
        the full negative ELBO of a unit-variance Gaussian decoder.
    """
    generator = generator or make_generator(0, images_uint8.device)
    was_training = model.training
    model.eval()
    recon_sum, kl_sum = 0.0, 0.0
    for index in batch_indices(len(images_uint8), batch_size, device=images_uint8.device):
        x = to_unit(images_uint8[index])
        x_hat, mu, logvar = model(x, generator=generator)
        recon_sum += float(reconstruction_loss(x_hat.float(), x, kind).sum())
        kl_sum += float(kl_divergence(mu.float(), logvar.float()).sum())
    model.train(was_training)
    n = len(images_uint8)
    result = {"neg_elbo": (recon_sum + kl_sum) / n, "recon": recon_sum / n, "kl": kl_sum / n}
    if kind == "mse":
        result["gaussian_constant"] = gaussian_constant(images_uint8.shape[1:])
        result["neg_elbo_nats"] = result["neg_elbo"] + result["gaussian_constant"]
    return result


def validation_stats(model: VAE, images_uint8: torch.Tensor, cfg: VAEConfig) -> dict:
    """Validation ``loss`` (the negative ELBO with beta = 1, whatever beta training uses), ``recon``, ``kl``.

    z is drawn from a generator seeded afresh with ``cfg.seed + 1`` at every call, so epochs are compared
    on the same noise and validation does not disturb the training generator.
    """
    generator = make_generator(cfg.seed + 1, images_uint8.device)
    stats = evaluate_elbo(model, images_uint8, cfg.eval_batch_size, generator, cfg.recon_loss)
    return {"loss": stats["neg_elbo"], "recon": stats["recon"], "kl": stats["kl"]}


@torch.inference_mode()
def latent_means(model: VAE, images_uint8: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """The encoder means of ``images_uint8`` as an (N, latent_dim) array."""
    was_training = model.training
    model.eval()
    means = [model.encode(to_unit(images_uint8[index]))[0].float().cpu()
             for index in batch_indices(len(images_uint8), batch_size, device=images_uint8.device)]
    model.train(was_training)
    return torch.cat(means).numpy()


# ------------------------------------------------------------------------------ interpolation, samples
def _slerp(z1: torch.Tensor, z2: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    cos = torch.dot(F.normalize(z1, dim=0), F.normalize(z2, dim=0)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if float(torch.sin(omega)) < 1e-6:  # (anti-)parallel codes: the great circle is undefined, use a line
        return (1 - alphas)[:, None] * z1 + alphas[:, None] * z2
    a = alphas[:, None]
    return (torch.sin((1 - a) * omega) * z1 + torch.sin(a * omega) * z2) / torch.sin(omega)


@torch.inference_mode()
def interpolate(model: VAE, x1: torch.Tensor, x2: torch.Tensor, steps: int = 11,
                method: str = "linear") -> torch.Tensor:
    """Decode ``steps`` codes between the encoder means of images ``x1`` and ``x2``: (steps, C, H, W).

    ``linear``: z(a) = (1 - a) z1 + a z2 for a in linspace(0, 1, steps); ``slerp``: along the great circle
    (codes of a Gaussian prior concentrate on a shell, which straight lines cut through). The endpoints
    are set to z1 and z2 exactly, so a = 0 and a = 1 decode to exactly the endpoints' mean decodings.
    ``x1``, ``x2``: one image each, C×H×W or 1×C×H×W, ``uint8`` or float in [0, 1].
    """
    require_choice(method, "method", ("linear", "slerp"))
    require(steps >= 2, "steps", f"must be at least 2 (both endpoints), got {steps}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.cat([to_unit(x1).reshape(1, *x1.shape[-3:]), to_unit(x2).reshape(1, *x2.shape[-3:])]).to(device)
    z1, z2 = model.encode(x)[0].float()
    alphas = torch.linspace(0.0, 1.0, steps, device=device)
    z = (1 - alphas)[:, None] * z1 + alphas[:, None] * z2 if method == "linear" else _slerp(z1, z2, alphas)
    z[0], z[-1] = z1, z2
    images = model.decode(z)
    model.train(was_training)
    return images


@torch.inference_mode()
def sample(model: VAE, n: int, generator: torch.Generator) -> torch.Tensor:
    """Decode ``n`` codes z ~ N(0, I) drawn with ``generator``: images (n, C, H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    z = torch.randn((n, model.latent_dim), generator=generator, device=generator.device).to(device)
    images = model.decode(z)
    model.train(was_training)
    return images


def pick_pair(images: torch.Tensor, labels: torch.Tensor, class_a: int, class_b: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two different images, one of ``class_a`` and one of ``class_b``, chosen with ``generator``."""
    first = torch.nonzero(labels.cpu() == class_a).flatten()
    if len(first) == 0:
        raise DataError(f"no image of class {class_a} to interpolate from")
    i = int(first[torch.randint(len(first), (1,), generator=generator, device=generator.device).cpu()])
    second = torch.nonzero(labels.cpu() == class_b).flatten()
    second = second[second != i]
    if len(second) == 0:
        raise DataError(f"no image of class {class_b} other than the first to interpolate to")
    j = int(second[torch.randint(len(second), (1,), generator=generator, device=generator.device).cpu()])
    return images[i], images[j]


# ------------------------------------------------------------------------------------------- training
def vae_meta(ds: ImageDataset, cfg: VAEConfig, latent_dim: int) -> dict:
    """What :func:`load_trained_vae` needs to rebuild the model, stored in its checkpoints."""
    c, h, w = ds.image_shape
    if h != w:
        raise DataError(f"{ds.name}: the VAE needs square images, got {h}x{w}")
    return {"in_channels": c, "image_size": h, "latent_dim": latent_dim, "channels": cfg.channels,
            "architecture": cfg.architecture, "dataset_name": ds.name}


def rebuild_vae(config: dict) -> VAE:
    """Build the VAE described by a checkpoint's config."""
    return VAE(config["in_channels"], config["image_size"], config["latent_dim"], config["channels"],
               config["architecture"])


def vae_splits(cfg: VAEConfig, ds: ImageDataset) -> Splits:
    """The class-balanced train/validation split of the training images (training part cut to
    ``train_images`` if set) and the whole test set."""
    try:
        splits, _ = make_splits(ds, cfg.val_size, cfg.split_seed)
        train = subset(splits.train, cfg.train_images, cfg.seed, ds.num_classes)
    except ValueError as err:
        raise ConfigError(f"parameter 'val_size' or 'train_images' does not fit {ds.name}: {err}") from None
    return Splits(train, splits.val, splits.test)


def make_epoch_fn(images: torch.Tensor, cfg: VAEConfig, warmup_steps: int):
    """The ``epoch_fn`` of :func:`fit_epochs`: shuffled batches, loss with the warmed-up KL weight.

    The returned ``loss`` is the objective optimised (recon + weight * KL); ``kl_weight`` is the weight
    at the epoch's last step.
    """
    def epoch_fn(model, optimizer, scheduler, generator, where):
        model.train()
        totals = dict.fromkeys(("loss", "recon", "kl"), 0.0)
        for index in batch_indices(len(images), cfg.batch_size, generator, images.device):
            # The scheduler counts optimiser steps and is restored on resume: the warm-up resumes too.
            weight = kl_weight(scheduler.last_epoch, warmup_steps, cfg.beta)
            x = to_unit(images[index])
            with autocast_context(x.device, cfg.dtype):
                x_hat, mu, logvar = model(x, generator=generator)
            # BCE is unsafe under autocast: the loss is computed in float32 outside it.
            losses = vae_loss(x_hat.float(), x, mu.float(), logvar.float(), weight, cfg.recon_loss)
            check_finite(losses["loss"], f"{where}, step {scheduler.last_epoch}")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            scheduler.step()
            for key in totals:
                totals[key] += float(losses[key].detach()) * len(index)
        return {**{k: v / len(images) for k, v in totals.items()}, "kl_weight": weight}
    return epoch_fn


def train_vae(cfg: VAEConfig, ds: ImageDataset, out_dir, log=print, latent_dim: int | None = None):
    """Train a VAE with :func:`fmnist_core.core.train.fit_epochs`; ``best.pt`` has the lowest validation loss.

    Parameters
    ----------
    cfg : VAEConfig
    ds : ImageDataset
        The dataset, on the training device.
    out_dir : path
        Receives ``last.pt``, ``best.pt``, ``history.json`` and ``history.csv`` (resumed if present).
    log : callable
    latent_dim : int, optional
        Overrides ``cfg.latent_dim`` (the latent-size study).

    Returns
    -------
    model : VAE
        The model after the last epoch (``best.pt`` holds the best one; see :func:`load_trained_vae`).
    history : list of dict
        Per epoch: ``train_loss`` (the objective, with the warmed-up KL weight), ``train_recon``,
        ``train_kl``, ``train_kl_weight``, and ``val_loss`` (negative ELBO, beta = 1), ``val_recon``,
        ``val_kl``, in nats per image.
    splits : fmnist_core.chapters.classification.Splits
        The train, validation and test parts used.
    """
    latent_dim = cfg.latent_dim if latent_dim is None else latent_dim
    splits = vae_splits(cfg, ds)
    meta = vae_meta(ds, cfg, latent_dim)
    device = splits.train.images.device
    torch.manual_seed(cfg.seed)  # the initial weights, as in the classification chapter
    model = rebuild_vae(meta).to(device)
    steps_per_epoch = math.ceil(len(splits.train.images) / cfg.batch_size)
    epoch_fn = make_epoch_fn(splits.train.images, cfg, cfg.kl_warmup_epochs * steps_per_epoch)
    history = fit_epochs(model, cfg, out_dir, steps_per_epoch, epoch_fn,
                         lambda m: validation_stats(m, splits.val.images, cfg), device=device,
                         selection=Selection("val_loss", higher_is_better=False), log=log,
                         name=f"vae-z{latent_dim}", meta=meta)
    return model, history, splits


def load_trained_vae(path, device="cpu") -> tuple[VAE, dict]:
    """Rebuild a VAE from a checkpoint written by :func:`train_vae`; returns (model in eval mode, state)."""
    return load_trained(path, rebuild_vae, device)


def load_vae_dataset(name: str, data_dir=None, device="auto") -> ImageDataset:
    """Load ``fashion_mnist``, ``cifar10`` or ``lfw`` on ``device`` (``auto`` = CUDA when present)."""
    device = resolve_device(device) if isinstance(device, str) else device
    if name == "lfw":
        from fmnist_core.core.lfw import load_lfw  # scikit-learn's fetcher, needed for LFW only
        return load_lfw(data_dir, device=device)
    return load_dataset(name, data_dir, device)
