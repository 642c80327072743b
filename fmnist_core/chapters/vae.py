"""The variational auto-encoder chapter: model, training as an :class:`~fmnist_core.core.loop.Algorithm`, the
``vae`` job kind, the chapter's study (the main model and the latent-size study), and what a VAE can do.

The VAE sees images scaled to [0, 1] (``uint8 / 255``), never standardised: the decoder ends in a sigmoid
and the Bernoulli (BCE) likelihood needs targets in [0, 1]. Every random draw (batch order,
reparameterisation noise, samples, the z used to estimate the ELBO) goes through a seeded ``torch.Generator``.

Units: losses are sums over pixels and latent dimensions per image, in nats, averaged over images. With the
BCE loss on grey levels these are nats of the objective, not of a density over the images: the negative
ELBO is then no bound on −log p(x) (see :func:`evaluate_elbo`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist_core.core import loop
from fmnist_core.core.config import Config, param, require, require_choice
from fmnist_core.core.data import (ImageDataset, Splits, batch_indices, job_dataset, make_generator,
                                   make_splits, permutation, subset)
from fmnist_core.core.errors import ConfigError, DataError
from fmnist_core.core.generative import (RECON_LOSSES, gaussian_constant, kl_divergence, reconstruction_loss,
                                        reparameterize, to_unit, vae_loss)
from fmnist_core.core.io import read_json, write_json
from fmnist_core.core.jobs import Job, job_kind, run_jobs
from fmnist_core.core.loop import Algorithm, Plan, Selection
from fmnist_core.core.train import (EpochBudget, OptimizerConfig, RuntimeConfig, ScheduleConfig, autocast_context,
                                    prepare_model, resolve_device, resolve_dtype)

DATASETS = ("fashion_mnist", "cifar10", "lfw")
ARCHITECTURES = ("report", "deep")
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "lfw": 1}
# Fashion-MNIST: Sneaker -> Ankle boot, T-shirt/top -> Dress, within Sneaker, within Trouser.
DEFAULT_PAIRS = [[7, 9], [0, 3], [7, 7], [1, 1]]


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class VAEDataConfig(Config):
    """The images a VAE is trained and selected on."""

    dataset: str = param("fashion_mnist", "fashion_mnist | cifar10 | lfw (faces, 32x32 RGB)")
    val_size: int = param(5000, "validation images held out of the training set (class-balanced)")
    split_seed: int = param(0, "seed of the train/validation split")
    train_images: int = param(0, "use only this many training images (class-balanced); 0 = all")

    def check(self) -> None:
        super().check()
        require_choice(self.dataset, "dataset", DATASETS)
        require(self.val_size >= 1, "val_size", f"must be at least 1, got {self.val_size}")
        require(self.split_seed >= 0, "split_seed", f"must be non-negative, got {self.split_seed}")
        require(self.train_images >= 0, "train_images", "must be 0 (all) or positive")


@dataclass
class VAEModelConfig(Config):
    """The network and its loss."""

    architecture: str = param("report", "report (the LeNet / layer-wise / VAE report's network: 3x3 stride-2 "
                                        "convolutions, 4x4 stride-2 transposed convolutions, no batch norm) | "
                                        "deep (three batch-normalised blocks each side)")
    channels: int = param(16, "width of the first encoder convolution, doubled by each stride-2 stage "
                              "(the report: 16, then 32)")
    latent_dim: int = param(20, "dimensions of the latent code z")
    recon_loss: str = param("bce", "bce (Bernoulli decoder) | mse (Gaussian decoder, unit variance)")
    beta: float = param(1.0, "weight of the KL term (1 = the ELBO; >1 = beta-VAE)")
    kl_warmup_epochs: int = param(0, "raise the KL weight linearly from 0 to beta over this many epochs, "
                                     "per step; 0 = none")

    def check(self) -> None:
        super().check()
        require_choice(self.recon_loss, "recon_loss", RECON_LOSSES)
        require_choice(self.architecture, "architecture", ARCHITECTURES)
        require(self.latent_dim >= 1, "latent_dim", f"must be at least 1, got {self.latent_dim}")
        require(self.beta >= 0, "beta", f"must be non-negative, got {self.beta}")
        require(self.kl_warmup_epochs >= 0, "kl_warmup_epochs", "must be 0 (none) or positive")
        require(self.channels >= 1, "channels", f"must be at least 1, got {self.channels}")


@dataclass
class VAEJobConfig(VAEModelConfig, VAEDataConfig, EpochBudget, OptimizerConfig, ScheduleConfig, RuntimeConfig):
    """One ``vae`` job: train one VAE, keep its best-on-validation weights, report it on the test set.

    The defaults differ from supervised training where a VAE wants otherwise: no weight decay, a constant
    learning rate (plain Adam at 1e-3, the usual VAE recipe; the report used Adam, its learning rate unstated).
    """

    epochs: int = param(20, "passes over the training images")
    weight_decay: float = param(0.0, "weight decay (none: the KL term already regularises the codes)")
    schedule: str = param("constant", "constant (plain Adam, the usual VAE recipe) | cosine | step")
    seed: int = param(0, "seed of initialisation, batch order and the reparameterisation noise")

    def check(self) -> None:
        super().check()
        require(self.seed >= 0, "seed", f"must be non-negative, got {self.seed}")


@dataclass
class VAEConfig(VAEJobConfig):
    """Parameters of the VAE chapter: its main model (a :class:`VAEJobConfig`), the latent-size study and
    the figures."""

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
        require(all(n >= 1 for n in self.latent_sizes), "latent_sizes", "must hold positive sizes only")
        require(self.study_epochs >= 1, "study_epochs", f"must be at least 1, got {self.study_epochs}")
        require(self.interpolation_steps >= 9, "interpolation_steps",
                f"must be at least 9 (both endpoints included), got {self.interpolation_steps}")
        require(self.samples >= 1, "samples", f"must be at least 1, got {self.samples}")
        require(self.embed_images >= 10 and self.embed_images % DATASET_CLASSES[self.dataset] == 0,
                "embed_images", "must be at least 10 and divisible by the number of classes")
        require(self.embed_images <= 10000, "embed_images", "cannot exceed the 10,000 test images")
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

    def job_config(self) -> VAEJobConfig:
        """The configuration of the chapter's main model."""
        return self.narrow(VAEJobConfig)

    def study_config(self, latent_dim: int) -> VAEJobConfig:
        """The configuration of one model of the latent-size study: ``latent_dim``, ``study_epochs`` epochs."""
        return self.narrow(VAEJobConfig, {"latent_dim": latent_dim, "epochs": self.study_epochs},
                           where=f"latent_sizes ({latent_dim})")


# ------------------------------------------------------------------------------------------- the model
def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _deconv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _report_layers(in_channels: int, ch: int) -> tuple[nn.Module, nn.Module, int]:
    """The LeNet / layer-wise / VAE report's network (section 2.1.1), with ``ch`` = 16 its exact layers.

    Encoder: ``Conv2d(C, 16, 3, stride 2, padding 1)``, ReLU, ``Conv2d(16, 32, 3, stride 2, padding 1)``, ReLU
    (28→14→7, 32→16→8). Decoder (after the linear layer and its ReLU, see :meth:`VAE.decode`):
    ``ConvTranspose2d(32, 16, 4, stride 2, padding 1)``, ReLU, ``ConvTranspose2d(16, C, 4, stride 2, padding 1)``.
    """
    encoder = nn.Sequential(nn.Conv2d(in_channels, ch, 3, 2, 1), nn.ReLU(inplace=True),
                            nn.Conv2d(ch, 2 * ch, 3, 2, 1), nn.ReLU(inplace=True))
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
        Width of the first encoder convolution (each stride-2 stage doubles it).
    architecture : str
        ``report`` (the LeNet / layer-wise / VAE report's network) or ``deep`` (three BN blocks each side).
        Both map the flattened features to μ and log σ² with one linear layer each, and a code back to the
        features with a linear layer and a ReLU.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 20, channels: int = 16,
                 architecture: str = "report"):
        super().__init__()
        require_choice(architecture, "architecture", ARCHITECTURES)
        require(image_size % 4 == 0, "image_size", f"must be divisible by 4, got {image_size}")
        require(latent_dim >= 1, "latent_dim", f"must be at least 1, got {latent_dim}")
        require(channels >= 1, "channels", f"must be at least 1, got {channels}")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        build = _report_layers if architecture == "report" else _deep_layers
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


def _layer_text(layer: nn.Module) -> list[str]:
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        kind = "transposed convolution" if isinstance(layer, nn.ConvTranspose2d) else "convolution"
        (k, _), (s, _), (p, _) = layer.kernel_size, layer.stride, layer.padding
        return [f"{k}×{k} {kind} {layer.in_channels}→{layer.out_channels} (stride {s}, padding {p})"]
    if isinstance(layer, nn.Sequential):
        return [text for child in layer for text in _layer_text(child)]
    return {nn.ReLU: ["ReLU"], nn.BatchNorm2d: ["batch norm"]}[type(layer)]


def describe(model: VAE) -> str:
    """The layers of ``model`` in words, read from the built modules (what a page states about its network).

    Parameters
    ----------
    model : VAE

    Returns
    -------
    str
        ``encoder: …; linear …; decoder: …, sigmoid``.
    """
    features, z = model.fc_mu.in_features, model.latent_dim
    return (f"encoder: {', '.join(_layer_text(model.encoder))}; linear {features}→{z} to μ and another to "
            f"log σ²; decoder: linear {z}→{features}, ReLU, {', '.join(_layer_text(model.decoder))}, sigmoid")


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

    With ``bce`` the reconstruction term is the Bernoulli cross-entropy of grey levels in [0, 1]: a
    Bernoulli is a distribution over {0, 1}, so for grey levels this is not the negative log of a normalised
    density and the negative ELBO is not an upper bound on −log p(x); it compares runs with the same loss.

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
        the full negative ELBO of a unit-variance Gaussian decoder (an upper bound on −log p(x) of that
        density).
    """
    device = images_uint8.device
    generator = generator or make_generator(0, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # read back once, at the end
    for index in batch_indices(len(images_uint8), batch_size, device=device):
        x = to_unit(images_uint8[index])
        x_hat, mu, logvar = model(x, generator=generator)
        sums += torch.stack([reconstruction_loss(x_hat.float(), x, kind).sum(),
                             kl_divergence(mu.float(), logvar.float()).sum()]).double()
    model.train(was_training)
    n = len(images_uint8)
    recon_sum, kl_sum = sums.tolist()
    result = {"neg_elbo": (recon_sum + kl_sum) / n, "recon": recon_sum / n, "kl": kl_sum / n}
    if kind == "mse":
        result["gaussian_constant"] = gaussian_constant(images_uint8.shape[1:])
        result["neg_elbo_nats"] = result["neg_elbo"] + result["gaussian_constant"]
    return result


def validation_stats(model: VAE, images_uint8: torch.Tensor, cfg: VAEJobConfig) -> dict:
    """Validation ``loss`` (the negative ELBO with beta = 1, whatever beta training uses), ``recon``, ``kl``.

    z is drawn from a generator seeded afresh with ``cfg.seed + 1`` at every call, so epochs are compared
    on the same noise and validation does not disturb the training generator.
    """
    generator = make_generator(cfg.seed + 1, images_uint8.device)
    stats = evaluate_elbo(model, images_uint8, cfg.eval_batch_size, generator, cfg.recon_loss)
    return {"loss": stats["neg_elbo"], "recon": stats["recon"], "kl": stats["kl"]}


def elbo_on_test_set(model: VAE, images_uint8: torch.Tensor, cfg: VAEJobConfig) -> dict:
    """The test-set report of a trained VAE: :func:`evaluate_elbo` with z drawn from a generator seeded with
    ``cfg.seed``."""
    generator = make_generator(cfg.seed, images_uint8.device)
    return evaluate_elbo(model, images_uint8, cfg.eval_batch_size, generator, cfg.recon_loss)


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

    ``linear``: z(a) = (1 - a) z1 + a z2 for a in linspace(0, 1, steps). ``slerp``: z(a) =
    [sin((1 - a) W) z1 + sin(a W) z2] / sin W, W the angle between z1 and z2, applied to the codes as they
    are (not normalised). The path lies in the plane of z1, z2 and the origin; it is the arc of the circle
    through both when they have the same norm (the norm stays constant, where the straight line's midpoint
    is shorter by cos(W / 2)), and otherwise an elliptical arc whose norm is neither constant nor
    interpolated linearly. For (anti-)parallel codes it is the straight line. The endpoints are set to z1 and
    z2 exactly, so a = 0 and a = 1 decode to exactly the endpoints' mean decodings.
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
class VAETraining(Algorithm):
    """The negative ELBO (with the warmed-up KL weight) on shuffled batches; validated with beta = 1.

    Parameters
    ----------
    model, runnable : VAE
        The model on the device, and what the forward pass calls (itself or its compiled version).
    train, val : torch.Tensor
        ``uint8`` training and validation images on the device.
    cfg : VAEJobConfig
        ``batch_size``, ``beta``, ``recon_loss``, ``dtype`` are read here; ``seed``, ``eval_batch_size`` at
        every evaluation.
    warmup_steps : int
        Steps over which the KL weight rises from 0 to ``beta`` (:func:`kl_weight` of the step number).
    """

    def __init__(self, model, runnable, train: torch.Tensor, val: torch.Tensor, cfg: VAEJobConfig,
                 warmup_steps: int):
        self.model, self.runnable, self.images, self.val, self.cfg = model, runnable, train, val, cfg
        self.batch_size, self.beta, self.kind = cfg.batch_size, cfg.beta, cfg.recon_loss
        self.dtype = resolve_dtype(cfg.dtype, train.device, "vae")
        self.warmup_steps, self.steps_per_epoch = warmup_steps, math.ceil(len(train) / cfg.batch_size)
        self.order, self.weight = None, None

    def train_step(self, step, generator):
        position = step % self.steps_per_epoch
        if position == 0:  # the batch order of the epoch, drawn at its first step
            self.order = permutation(len(self.images), generator).to(self.images.device)
        x = to_unit(self.images[self.order[position * self.batch_size:(position + 1) * self.batch_size]])
        self.weight = kl_weight(step, self.warmup_steps, self.beta)  # from the step number: no host sync
        self.runnable.train()
        with autocast_context(x.device, self.dtype):
            x_hat, mu, logvar = self.runnable(x, generator=generator)
        # BCE is unsafe under autocast: the loss is computed in float32 outside it.
        losses = vae_loss(x_hat.float(), x, mu.float(), logvar.float(), self.weight, self.kind)
        n = x.new_full((), float(len(x)))  # a fill on the device, not a copy from the host
        return losses["loss"], {"loss_sum": losses["loss"].detach() * n, "recon_sum": losses["recon"].detach() * n,
                                "kl_sum": losses["kl"].detach() * n, "count": n}

    def summarize(self, sums, steps):
        """Per-image means over the interval; ``train_kl_weight`` is the weight of its last step."""
        count = sums["count"]
        return {"train_loss": sums["loss_sum"] / count, "train_recon": sums["recon_sum"] / count,
                "train_kl": sums["kl_sum"] / count, "train_kl_weight": self.weight}

    def evaluate(self):
        return {f"val_{k}": v for k, v in validation_stats(self.runnable, self.val, self.cfg).items()}

    def state_dict(self):
        return {"order": self.order}

    def load_state_dict(self, state):
        self.order = state["order"]


def vae_meta(ds: ImageDataset, cfg: VAEModelConfig) -> dict:
    """What :func:`load_trained_vae` needs to rebuild the model, stored in its checkpoints."""
    c, h, w = ds.image_shape
    if h != w:
        raise DataError(f"{ds.name}: the VAE needs square images, got {h}x{w}")
    return {"in_channels": c, "image_size": h, "latent_dim": cfg.latent_dim, "channels": cfg.channels,
            "architecture": cfg.architecture, "dataset_name": ds.name}


def rebuild_vae(config: dict) -> VAE:
    """Build the VAE described by a checkpoint's config."""
    return VAE(config["in_channels"], config["image_size"], config["latent_dim"], config["channels"],
               config["architecture"])


def vae_splits(cfg: VAEJobConfig, ds: ImageDataset) -> Splits:
    """The class-balanced train/validation split of the training images (training part cut to
    ``train_images`` if set) and the whole test set."""
    try:
        splits, _ = make_splits(ds, cfg.val_size, cfg.split_seed)
        train = subset(splits.train, cfg.train_images, cfg.seed, ds.num_classes)
    except ValueError as err:
        raise ConfigError(f"parameter 'val_size' or 'train_images' does not fit {ds.name}: {err}") from None
    return Splits(train, splits.val, splits.test)


def train_vae(cfg: VAEJobConfig, ds: ImageDataset, out_dir, log=print, name: str | None = None):
    """Train a VAE with :func:`fmnist_core.core.loop.train`; ``best.pt`` has the lowest validation loss.

    Parameters
    ----------
    cfg : VAEJobConfig
    ds : ImageDataset
        The dataset, on the training device.
    out_dir : path
        The job folder: ``best.pt``, ``final.pt``, ``history.json``/``.csv`` (``last.pt`` while training;
        a matching one is resumed).
    log : callable
    name : str, optional
        Names the run in log lines and errors (default: the folder's name).

    Returns
    -------
    model : VAE
        The model after the last step (``best.pt`` holds the best one; see :func:`load_trained_vae`).
    history : list of dict
        Per epoch: ``train_loss`` (the objective, with the warmed-up KL weight), ``train_recon``,
        ``train_kl`` (per-image means over the epoch), ``train_kl_weight`` (the weight at the epoch's last
        step), and ``val_loss`` (negative ELBO, beta = 1), ``val_recon``, ``val_kl``, in nats per image.
    splits : Splits
        The train, validation and test parts used.
    """
    out_dir = Path(out_dir)
    splits = vae_splits(cfg, ds)
    meta = vae_meta(ds, cfg)
    torch.manual_seed(cfg.seed)  # the initial weights
    device = splits.train.images.device
    model, runnable = prepare_model(rebuild_vae(meta), cfg, device, resolve_dtype(cfg.dtype, device, "vae"))
    steps_per_epoch = math.ceil(len(splits.train.images) / cfg.batch_size)
    algo = VAETraining(model, runnable, splits.train.images, splits.val.images, cfg,
                       cfg.kl_warmup_epochs * steps_per_epoch)
    plan = Plan.epochs(cfg.epochs, steps_per_epoch, Selection("val_loss", higher_is_better=False))
    history = loop.train(algo, plan, cfg, cfg.schedule, cfg.seed, out_dir, {**cfg.to_dict(), **meta},
                         name=name or out_dir.name, log=log)
    return model, history, splits


def load_trained_vae(path, device="cpu") -> tuple[VAE, dict]:
    """Rebuild a VAE from ``best.pt`` or ``final.pt`` of :func:`train_vae`; returns (model in eval mode, state)."""
    return loop.load_trained(path, rebuild_vae, device)


# -------------------------------------------------------------------------------------- jobs and study
def vae_dataset(name: str, device) -> ImageDataset:
    """The dataset a VAE job trains on, from ``$FMNIST_DATA_DIR`` (or the usual places), on ``device``;
    loaded once per process by :func:`fmnist_core.core.data.job_dataset` (LFW with scikit-learn's fetcher)."""
    device = resolve_device(device) if isinstance(device, str) else device
    return job_dataset(name, device, _load_lfw if name == "lfw" else None)


def _load_lfw(name: str, data_dir, device) -> ImageDataset:
    from fmnist_core.core.lfw import load_lfw  # scikit-learn's fetcher, needed for LFW only
    return load_lfw(data_dir, device=device)


@job_kind("vae", VAEJobConfig)
def run_vae(cfg: VAEJobConfig, out_dir, log=print) -> dict:
    """Train one VAE (:func:`train_vae`), then report its best-on-validation checkpoint on the test set.

    Returns the job's metrics: ``test`` (:func:`elbo_on_test_set`), ``best_epoch``, ``val_loss`` (of that epoch),
    ``latent_dim``, ``epochs``, ``train_images``. The training time goes to ``timings.json``.
    """
    out_dir = Path(out_dir)
    ds = vae_dataset(cfg.dataset, cfg.device)
    _, history, splits = train_vae(cfg, ds, out_dir, log=log)
    best, state = load_trained_vae(out_dir / "best.pt", splits.test.images.device)
    write_json(out_dir / "timings.json", {"train_s": sum(r["seconds"] for r in history)})
    return {"test": elbo_on_test_set(best, splits.test.images, cfg), "best_epoch": int(state["epoch"]),
            "val_loss": state["record"]["val_loss"], "latent_dim": cfg.latent_dim, "epochs": cfg.epochs,
            "train_images": len(splits.train.labels)}


def plan_jobs(cfg: VAEConfig, run_dir) -> list[Job]:
    """The chapter's main model (``models/main``) and one model per latent size of the study
    (``models/latent_<z>``, :meth:`VAEConfig.study_config`)."""
    models = Path(run_dir) / "models"
    jobs = [Job("vae", cfg.job_config(), models / "main", "main", {"latent_dim": cfg.latent_dim, "study": False})]
    return jobs + [Job("vae", cfg.study_config(z), models / f"latent_{z}", f"latent_{z}",
                       {"latent_dim": z, "study": True}) for z in cfg.latent_sizes]


def run_study(cfg: VAEConfig, run_dir, log=print):
    """Plan the jobs, run them (finished ones are skipped), gather their results.

    Returns
    -------
    ds : ImageDataset
    splits : Splits
        The split every job used.
    results : dict
        label (``main``, ``latent_<z>``) -> {"latent_dim", "study", "out_dir", "metrics", "history",
        "timing"} (timing: wall-clock figures, kept apart from the metrics).
    """
    ds = vae_dataset(cfg.dataset, cfg.device)
    splits = vae_splits(cfg, ds)
    jobs = plan_jobs(cfg, run_dir)
    return ds, splits, {job.label: {**job.info, "out_dir": job.out_dir, "metrics": metrics,
                                    "history": read_json(job.out_dir / "history.json"),
                                    "timing": read_json(job.out_dir / "timings.json")}
                        for job, metrics in zip(jobs, run_jobs(jobs, log))}
