"""Manifold distillation (Hao et al., "Learning Efficient Vision Transformers via Fine-Grained Manifold
Distillation", NeurIPS 2022).

For a pair of layers with patch tokens F_s (B, N, D_s) and F_t (B, N, D_t), each token L2-normalised
over channels, relation matrices M = F Fᵀ are matched (squared Frobenius norm of M_t − M_s):

- intra-image (patch): per image, N×N relations between its patches, averaged over images;
- inter-image (sample): per patch position, B×B relations between images, averaged over positions;
- random: K tokens drawn from all B·N, K×K relations (the same tokens for both models).

``L = patch · L_intra + sample · L_inter + rand · L_random``, summed over layer pairs. The widths
may differ (relations are N×N / B×B / K×K either way); patch counts are pooled to a common grid.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rel_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Mean over the leading batch of ‖fₜfₜᵀ − fₛfₛᵀ‖²_F for (G, M, D) stacks of unit vectors."""
    ms = fs @ fs.transpose(-1, -2)
    mt = ft @ ft.transpose(-1, -2)
    return (mt - ms).pow(2).sum((-1, -2)).mean()


def manifold_terms(fs: torch.Tensor, ft: torch.Tensor, num_random: int = 192,
                   generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """The three relation losses for one layer pair of patch tokens (B, N, D_s) / (B, N, D_t)."""
    fs = F.normalize(fs.float(), dim=-1)
    ft = F.normalize(ft.float(), dim=-1)
    b, n, _ = fs.shape
    out = {"patch": _rel_loss(fs, ft), "sample": _rel_loss(fs.transpose(0, 1), ft.transpose(0, 1))}
    k = min(int(num_random), b * n)
    idx = torch.randperm(b * n, generator=generator)[:k].to(fs.device)
    out["rand"] = _rel_loss(fs.reshape(b * n, -1)[idx][None], ft.reshape(b * n, -1)[idx][None])
    return out


def manifold_loss(fs: torch.Tensor, ft: torch.Tensor, patch: float = 4.0, sample: float = 0.1,
                  rand: float = 0.2, num_random: int = 192,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    t = manifold_terms(fs, ft, num_random, generator)
    return patch * t["patch"] + sample * t["sample"] + rand * t["rand"]
