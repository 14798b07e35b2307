"""Token-level helpers for ViT distillation and feature KD with learned projections.

:func:`layer_pairs` pairs student blocks with teacher blocks; :func:`match_grid` brings two token
maps to the same number of patches; :class:`FeatureKD` regresses (projected) student tokens onto the
teacher's. The combined loss that uses them is :class:`dfkd.losses.deit.ViTDistillLoss`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError


def layer_pairs(n_student: int, n_teacher: int, pairs: Optional[Sequence[Sequence[int]]] = None) -> list[tuple[int, int]]:
    """``pairs`` (a list of [student_block, teacher_block], negative indices allowed) checked and made
    non-negative; None pairs every student block i with teacher block ⌈(i+1)·T/S⌉ − 1 (so the last
    blocks always meet)."""
    if pairs is None:
        return [(i, math.ceil((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]
    out = []
    for p in pairs:
        if len(p) != 2:
            raise DfkdError(f"a layer pair is [student_block, teacher_block], got {list(p)}")
        s, t = int(p[0]), int(p[1])
        if not (-n_student <= s < n_student and -n_teacher <= t < n_teacher):
            raise DfkdError(f"layer pair [{s}, {t}] is out of range: the student has {n_student} blocks, "
                            f"the teacher {n_teacher}")
        out.append((s % n_student, t % n_teacher))
    return out


def match_grid(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens (B, N, D) of both models on a common square grid (the coarser one, by average
    pooling) when their patch counts differ."""
    ns, nt = fs.shape[1], ft.shape[1]
    if ns == nt:
        return fs, ft
    gs, gt = int(round(ns ** 0.5)), int(round(nt ** 0.5))
    if gs * gs != ns or gt * gt != nt:
        raise DfkdError(f"student and teacher have {ns} and {nt} patch tokens, which are not square grids to pool")
    g = min(gs, gt)

    def pool(f: torch.Tensor, side: int) -> torch.Tensor:
        if side == g:
            return f
        b, n, d = f.shape
        x = f.transpose(1, 2).reshape(b, d, side, side)
        return F.adaptive_avg_pool2d(x, g).reshape(b, d, g * g).transpose(1, 2)

    return pool(fs, gs), pool(ft, gt)


class FeatureKD(nn.Module):
    """Σ over layer pairs of MSE(LN(proj(student tokens)), LN(teacher tokens)), LN without affine
    parameters (scale-free targets). ``proj`` is a learned Linear where the widths differ (or always,
    with ``project='always'``), the identity otherwise. Needs the widths: built by :meth:`setup`."""

    def __init__(self, project: str = "auto"):
        super().__init__()
        if project not in ("auto", "always"):
            raise DfkdError(f"feature projection must be 'auto' or 'always', got {project!r}")
        self.project = project
        self.proj = nn.ModuleDict()

    def setup(self, pairs: Sequence[tuple[int, int]], dim_student: int, dim_teacher: int) -> None:
        for s, t in pairs:
            key = f"{s}_{t}"
            if key not in self.proj:
                need = self.project == "always" or dim_student != dim_teacher
                self.proj[key] = nn.Linear(dim_student, dim_teacher) if need else nn.Identity()

    def forward(self, pairs, feats_s: dict[int, torch.Tensor], feats_t: dict[int, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for s, t in pairs:
            fs, ft = match_grid(feats_s[s], feats_t[t])
            p = self.proj[f"{s}_{t}"](fs.float())
            total = total + F.mse_loss(F.layer_norm(p, p.shape[-1:]), F.layer_norm(ft.float(), ft.shape[-1:]))
        return total
