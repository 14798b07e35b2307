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
