"""Pieces shared by every generative model of the book: images in [0, 1], the reparameterisation, the KL
term and the reconstruction losses of a VAE (per image, in nats, summed over pixels and latent dimensions)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmnist_core.core.config import require_choice

RECON_LOSSES = ("bce", "mse")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``.

    Without a generator ``mu`` itself is returned (a deterministic code): noise never comes from the
    global random state.
    """
    if generator is None:
        return mu
    eps = torch.randn(mu.shape, generator=generator, device=generator.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps.to(mu.device)



def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images to ``float32`` in [0, 1]; float images are taken to be in [0, 1] already."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, in closed form: shape (N,).

    ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)`` over the latent dimensions.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Negative log-likelihood of ``x`` under the decoder, summed over pixels: shape (N,).

    ``bce``: Bernoulli decoder with means ``x_hat`` (grey levels in [0, 1] as soft targets; the usual
    choice, though not a normalised density for continuous pixels). ``mse``: Gaussian decoder with unit
    variance, ``0.5 * sum((x_hat - x)^2)``; the constant ``0.5 * D * log(2 pi)`` nats per image (D = pixels
    x channels) is dropped here — :func:`gaussian_constant` gives it for reporting nats.
    """
    require_choice(kind, "recon_loss", RECON_LOSSES)
    if kind == "bce":
        return F.binary_cross_entropy(x_hat, x, reduction="none").flatten(1).sum(1)
    return 0.5 * (x_hat - x).pow(2).flatten(1).sum(1)


def gaussian_constant(image_shape) -> float:
    """Nats per image dropped by the ``mse`` loss: ``0.5 * D * log(2 pi)`` for D values per image."""
    return 0.5 * math.prod(image_shape) * math.log(2 * math.pi)


def vae_loss(x_hat, x, mu, logvar, beta: float = 1.0, kind: str = "bce") -> dict:
    """``loss`` = batch mean of recon + beta * KL; also the batch means ``recon`` and ``kl``.

    With ``beta = 1`` the loss is the negative ELBO (up to the dropped constant for ``mse``).
    """
    recon, kl = reconstruction_loss(x_hat, x, kind), kl_divergence(mu, logvar)
    return {"loss": (recon + beta * kl).mean(), "recon": recon.mean(), "kl": kl.mean()}
