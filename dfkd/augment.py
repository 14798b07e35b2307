"""Differentiable augmentation in pixel space ([0, 1] images), built on kornia."""

from __future__ import annotations

import torch
from torch import nn


def build_augment(input_size, crop_padding: int | None = None, flip: bool = True,
                  translate: float = 0.0, color: bool = False) -> nn.Module:
    """Student-side augmentation: random crop with padding, optional flip and colour jitter.

    Runs on batches on the current device and keeps gradients, so it also serves
    generator training. Returns ``nn.Identity()`` when nothing is enabled.
    """
    import kornia.augmentation as K

    h, w = int(input_size[-2]), int(input_size[-1])
    ops: list[nn.Module] = []
    if crop_padding is None:
        crop_padding = max(1, h // 8)
    if crop_padding > 0:
        ops.append(K.RandomCrop((h, w), padding=crop_padding, padding_mode="reflect"))
    if translate > 0:
        ops.append(K.RandomAffine(degrees=0, translate=(translate, translate), p=1.0))
    if flip:
        ops.append(K.RandomHorizontalFlip())
    if color and int(input_size[0]) == 3:
        ops.append(K.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.5))
    if not ops:
        return nn.Identity()
    return K.AugmentationSequential(*ops, data_keys=["input"], same_on_batch=False)


def random_jitter(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepInversion's jitter: roll the whole batch by a random offset up to ``max_shift`` px."""
    if max_shift <= 0:
        return images
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dx, dy), dims=(2, 3))


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image: a random crop of the reflect-padded image (shifts up to ``padding`` px) and a random
    horizontal flip; differentiable, random numbers from ``generator`` (CPU). Fast-DFKD's synthesis view."""
    import torch.nn.functional as F

    n, _, h, w = images.shape
    if padding > 0:
        p = F.pad(images, (padding, padding, padding, padding), mode="reflect")
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        rows = (oy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        images = p[torch.arange(n, device=images.device)[:, None, None, None],
                   torch.arange(images.shape[1], device=images.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)
