"""Boxes for detection inversion: DIODE-style box sampling and box-aware augmentation.

Boxes are ``xyxy`` in continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1]``), as
torchvision detectors use them; targets are ``{"boxes": (K, 4) float, "labels": (K,) int64}``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[-2]), int(size[-1])
    return int(size), int(size)


def sample_boxes(
    batch: int,
    image_size: int | Sequence[int],
    num_classes: int,
    per_image: int = 1,
    size: tuple[float, float] = (0.2, 0.8),
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """DIODE's targets: ``per_image`` boxes per image, each side uniform in ``size`` × the image side,
    placed uniformly so that the box lies inside the image, with a uniformly random class.

    Corners are whole pixels; every box is at least 1 px wide and high.
    """
    h, w = _pair(image_size)
    lo, hi = float(size[0]), float(size[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"box size range must satisfy 0 < lo <= hi <= 1, got {size}")
    n = int(batch) * int(per_image)
    u = torch.rand(n, 4, generator=generator)
    bw = (lo + (hi - lo) * u[:, 0]) * w
    bh = (lo + (hi - lo) * u[:, 1]) * h
    bw = bw.round().clamp(1, w)
    bh = bh.round().clamp(1, h)
    x0 = (u[:, 2] * (w - bw + 1)).floor().clamp(max=w - bw)
    y0 = (u[:, 3] * (h - bh + 1)).floor().clamp(max=h - bh)
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1).view(batch, per_image, 4)
    labels = torch.randint(int(num_classes), (batch, per_image), generator=generator)
    return [{"boxes": boxes[i].to(device), "labels": labels[i].to(device)} for i in range(batch)]


def filter_boxes(target: dict, keep: torch.Tensor) -> dict:
    """``target`` with only the boxes in ``keep`` (every per-box tensor is indexed alike)."""
    k = len(target["boxes"])
    return {key: (v[keep] if isinstance(v, torch.Tensor) and v.dim() >= 1 and len(v) == k else v)
            for key, v in target.items()}


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as _iou

    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b), device=a.device)
    return _iou(a.float(), b.float())


class BoxAugment(nn.Module):
    """Random flip, scaling and translation applied to images and their boxes alike.

    Per image: horizontal flip with probability 0.5 (``flip``), scaling about the centre by a
    factor uniform in ``[1 - scale, 1 + scale]``, translation by whole pixels up to
    ``jitter`` × the image side. Images are warped with kornia (bilinear, zero padding) and stay
    differentiable; boxes take the same affine map, are clamped to the image, and boxes of which
    less than ``min_visible`` of the area or less than ``min_side`` px per side remains are dropped.
    """

    def __init__(self, image_size: int | Sequence[int] | None = None, flip: bool = True, jitter: float = 0.1,
                 scale: float = 0.1, min_visible: float = 0.3, min_side: float = 1.0):
        super().__init__()
        self.image_size = _pair(image_size) if image_size is not None else None
        self.flip, self.jitter, self.scale = bool(flip), float(jitter), float(scale)
        self.min_visible, self.min_side = float(min_visible), float(min_side)

    def sample(self, n: int, h: int, w: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Affine maps (n, 2, 3) in continuous pixel coordinates: ``p' = A p + t``."""
        u = torch.rand(n, 4, generator=generator)
        s = 1.0 + self.scale * (2 * u[:, 0] - 1)
        sign = torch.where((u[:, 1] < 0.5) & self.flip, -1.0, 1.0)
        tx = (self.jitter * w * (2 * u[:, 2] - 1)).round()
        ty = (self.jitter * h * (2 * u[:, 3] - 1)).round()
        a = sign * s
        m = torch.zeros(n, 2, 3)
        m[:, 0, 0], m[:, 1, 1] = a, s
        m[:, 0, 2] = w / 2 - a * w / 2 + tx
        m[:, 1, 2] = h / 2 - s * h / 2 + ty
        return m

    @staticmethod
    def warp_images(images: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        from kornia.geometry.transform import warp_affine

        # kornia (align_corners=True) maps pixel indices; an index is the continuous coordinate - 0.5
        mi = m.clone()
        mi[:, :, 2] = m[:, :, 2] + 0.5 * (m[:, :, 0] + m[:, :, 1]) - 0.5
        mi = mi.to(images.device, images.dtype)
        return warp_affine(images, mi, tuple(images.shape[-2:]), mode="bilinear", padding_mode="zeros",
                           align_corners=True)

    def warp_boxes(self, target: dict, m: torch.Tensor, h: int, w: int) -> dict:
        boxes = target["boxes"]
        if len(boxes) == 0:
            return dict(target)
        a = m.to(boxes.device, boxes.dtype)
        xs = boxes[:, [0, 2]] * a[0, 0] + a[0, 2]
        ys = boxes[:, [1, 3]] * a[1, 1] + a[1, 2]
        new = torch.stack([xs.min(1).values, ys.min(1).values, xs.max(1).values, ys.max(1).values], 1)
        area = (new[:, 2] - new[:, 0]) * (new[:, 3] - new[:, 1])
        new[:, 0::2] = new[:, 0::2].clamp(0, w)
        new[:, 1::2] = new[:, 1::2].clamp(0, h)
        bw, bh = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
        keep = (bw >= self.min_side) & (bh >= self.min_side) & (bw * bh >= self.min_visible * area)
        out = filter_boxes(target, keep)
        out["boxes"] = new[keep]
        return out

    def forward(self, images: torch.Tensor, targets: Optional[list[dict]] = None,
                generator: Optional[torch.Generator] = None):
        """Augment ``images`` (B, C, H, W) and, when given, ``targets``; returns ``(images, targets)``."""
        h, w = images.shape[-2:]
        m = self.sample(len(images), h, w, generator)
        out = self.warp_images(images, m)
        if targets is None:
            return out, None
        return out, [self.warp_boxes(t, m[i], h, w) for i, t in enumerate(targets)]


def hflip(images: torch.Tensor, targets: list[dict], flags: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Flip the images (and boxes) where ``flags`` is true; exact (no resampling)."""
    w = images.shape[-1]
    images = torch.where(flags.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    out = []
    for t, f in zip(targets, flags.tolist()):
        t = dict(t)
        if f and len(t["boxes"]):
            b = t["boxes"]
            t["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        out.append(t)
    return images, out
