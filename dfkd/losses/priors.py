"""Image priors for pixel optimisation."""

from __future__ import annotations

import torch


def tv_prior(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (L1)."""
    dh = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dw = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dh + dw


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """Mean per-image L2 norm of the (centred) pixels."""
    return (images - 0.5).flatten(1).norm(dim=1).mean()


def tv_norm_prior(images: torch.Tensor) -> torch.Tensor:
    """Total variation as in NVIDIA's CIFAR-10 DeepInversion: the sum of the L2 norms (over the whole
    batch) of the four neighbour differences (horizontal, vertical and both diagonals)."""
    d1 = images[..., :, :-1] - images[..., :, 1:]
    d2 = images[..., :-1, :] - images[..., 1:, :]
    d3 = images[..., 1:, :-1] - images[..., :-1, 1:]
    d4 = images[..., :-1, :-1] - images[..., 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))


@torch.no_grad()
def batchnorm_distance(teacher, images: torch.Tensor) -> float:
    """Summed BatchNorm-statistics distance of ``images`` (pixels in [0, 1]) under ``teacher``:
    Σ over BatchNorm layers ‖μ − μ̂‖₂ + ‖σ² − σ̂²‖₂, every layer weighted 1, statistics of the whole batch."""
    with teacher.statistics("batchnorm", first_weight=1.0) as prior:
        teacher(images)
        return float(prior.loss())
