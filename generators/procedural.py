"""Procedural images labelled by the teacher: a hand-written image prior, no real data and no teacher step.

``dead_leaves`` draws occluding shapes (discs and rotated rectangles) whose sizes follow the 1/r³ law of
natural-image occlusion models, each filled with a random colour and a linear shading gradient, then adds
faint pixel noise. Such images have the edge and colour statistics of natural scenes at the cost of a few
tensor operations per batch — far cheaper than a teacher step — and the teacher's soft labels on them
carry its decision boundaries to the student. The ``procedural`` synthesizer is the generator-free,
optimisation-free data-free row; DeepInversion can start from these images instead of Gaussian noise
(``synthesizer.init=dead_leaves``).

Optional class-balanced selection (``oversample`` m > 1): draw m·batch candidates, score them with the
teacher (forward only) and keep, for each class in turn, the candidates the teacher assigns to it most
confidently, so rarely predicted classes are not drowned out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dfkd.errors import DfkdError
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch


def dead_leaves(n: int, channels: int, size: tuple[int, int], generator: torch.Generator, *,
                shapes: int = 48, r_min: float = 0.03, r_max: float = 0.6, noise: float = 0.02,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` dead-leaves images in [0, 1], shape (n, channels, H, W).

    Radii (fractions of the image side) are drawn from p(r) ∝ r⁻³ on [r_min, r_max]; each shape is a disc
    or a rectangle (random aspect and angle), painted over the earlier ones; colours are uniform per
    channel with a random linear gradient of up to ±0.25 across each shape.
    """
    h, w = size
    dev = torch.device(device)

    def u(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    k = int(shapes)
    # inverse CDF of p(r) ∝ r^-3 on [r_min, r_max]
    a, b = r_min ** -2, r_max ** -2
    r = (a - u(n, k) * (a - b)) ** -0.5                                     # (n, k)
    cy, cx = u(n, k), u(n, k)
    ys = torch.linspace(0, 1, h, device=dev).view(1, 1, h, 1)
    xs = torch.linspace(0, 1, w, device=dev).view(1, 1, 1, w)
    dy, dx = ys - cy[..., None, None], xs - cx[..., None, None]             # (n, k, h, w)
    theta = u(n, k) * math.pi
    c, s = theta.cos()[..., None, None], theta.sin()[..., None, None]
    ry, rx = dy * c - dx * s, dy * s + dx * c
    aspect = (0.3 + 0.7 * u(n, k))[..., None, None]
    rr = r[..., None, None]
    disc = (dy ** 2 + dx ** 2) <= rr ** 2
    rect = (ry.abs() <= rr) & (rx.abs() <= rr * aspect)
    is_disc = (u(n, k) < 0.5)[..., None, None]
    mask = torch.where(is_disc, disc, rect)                                # (n, k, h, w)
    # the last shape drawn over a pixel wins: index of the highest covering shape, 0 = background
    order = torch.arange(1, k + 1, device=dev).view(1, k, 1, 1)
    top = (mask * order).amax(1)                                            # (n, h, w)
    colour = u(n, k + 1, channels)                                          # slot 0: background
    grad = (u(n, k + 1, channels, 2) - 0.5) * 0.5                          # per-shape shading gradient
    idx = top.flatten(1)                                                    # (n, h*w)
    base = torch.gather(colour, 1, idx[..., None].expand(-1, -1, channels))  # (n, h*w, C)
    g = torch.gather(grad, 1, idx[..., None, None].expand(-1, -1, channels, 2))
    yy = (ys.view(h, 1).expand(h, w).reshape(1, -1, 1) - 0.5)
    xx = (xs.view(1, w).expand(h, w).reshape(1, -1, 1) - 0.5)
    img = base + g[..., 0] * yy + g[..., 1] * xx
    img = img.transpose(1, 2).reshape(n, channels, h, w)
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=generator, device=dev)
    return img.clamp_(0, 1)


PATTERNS = {"dead_leaves": dead_leaves}


def procedural_images(pattern: str, n: int, input_size: tuple[int, ...], generator: torch.Generator,
                      device: torch.device | str = "cpu", **kwargs) -> torch.Tensor:
    if pattern not in PATTERNS:
        raise DfkdError(f"procedural pattern must be one of {sorted(PATTERNS)}, got {pattern!r}")
    c, h, w = input_size
    return PATTERNS[pattern](n, c, (h, w), generator, device=device, **kwargs)


@SYNTHESIZERS.register("procedural")
class ProceduralSynthesizer(Synthesizer):
    """Procedural images (``pattern``, default dead leaves) with the teacher's logits; no real data."""

    def __init__(self, teacher, batch_size: int = 128, seed: int = 0, device="cpu",
                 pattern: str = "dead_leaves", oversample: int = 1, shapes: int = 48, r_min: float = 0.03,
                 r_max: float = 0.6, noise: float = 0.02):
        super().__init__(teacher, batch_size, seed, device)
        if pattern not in PATTERNS:
            raise DfkdError(f"procedural pattern must be one of {sorted(PATTERNS)}, got {pattern!r}")
        if int(oversample) < 1:
            raise DfkdError(f"procedural oversample must be >= 1, got {oversample!r}")
        if not 0 < r_min < r_max:
            raise DfkdError(f"procedural radii need 0 < r_min < r_max, got {r_min!r}, {r_max!r}")
        self.pattern, self.oversample = pattern, int(oversample)
        self.kwargs = {"shapes": int(shapes), "r_min": float(r_min), "r_max": float(r_max), "noise": float(noise)}

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        m = self.oversample * self.batch_size
        x = procedural_images(self.pattern, m, self.input_size, self.rng, self.device, **self.kwargs)
        logits = self.teacher_logits(x)
        if self.oversample > 1:
            keep = self._balanced_pick(logits)
            x, logits = x[keep], logits[keep]
        labels = logits.argmax(1)
        stats = {"syn/class_entropy": self.class_stats(logits, labels)["syn/class_entropy"]}
        return SyntheticBatch(images=x, labels=labels, teacher_logits=logits, stats=stats)

    def _balanced_pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices of ``batch_size`` candidates: classes take turns picking their most confident one."""
        prob = logits.softmax(1)
        want = self.sample_labels(self.batch_size)
        taken = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        keep = []
        for c in want.tolist():
            score = prob[:, c].masked_fill(taken, -1.0)
            i = int(score.argmax())
            taken[i] = True
            keep.append(i)
        return torch.tensor(keep, device=logits.device)
