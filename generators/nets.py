"""Generator architectures only; no training logic lives here."""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """DCGAN-style generator (as in DAFL / DFAD / Fast-DFKD): z → linear → 2× upsample-conv blocks.

    With ``num_classes`` set, a learned label embedding is added to the noise (NAYER-style
    label-conditioned input), so the generator can be asked for a class. Output in [0, 1].
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3,
                 num_classes: int | None = None):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"generator img_size must be a multiple of 4, got {img_size}")
        self.nz, self.img_size, self.nc = nz, img_size, nc
        self.init_size = img_size // 4
        self.embed = nn.Embedding(num_classes, nz) if num_classes else None
        self.l1 = nn.Linear(nz, ngf * 2 * self.init_size ** 2)
        self.ngf = ngf
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, 1, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, 1, 1),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None and labels is not None:
            z = z + self.embed(labels)
        h = self.l1(z).view(len(z), self.ngf * 2, self.init_size, self.init_size)
        return torch.sigmoid(self.blocks(h))
