"""Procedural images labelled by the teacher: a hand-written image prior, no real data and no teacher step.

``pattern``: ``dead_leaves`` draws occluding shapes (discs and rotated rectangles) whose sizes follow the 1/r³ law of
natural-image occlusion models, each filled with a random colour and a linear shading gradient, then adds
faint pixel noise. Such images have the edge and colour statistics of natural scenes at the cost of a few
tensor operations per batch — far cheaper than a teacher step — and the teacher's soft labels on them
carry its decision boundaries to the student. The ``procedural`` synthesizer is the generator-free,
optimisation-free data-free row; DeepInversion can start from these images instead of Gaussian noise
(``synthesizer.init=dead_leaves``). ``textured_leaves`` fills the shapes with stripes or 1/f mottling as
well as flat colour; ``spectral`` is coloured 1/f^a noise; ``mixed`` draws each image from one of the three.

``saturation`` < 1 pulls each pixel's colour towards its grey level (natural photographs are far less
saturated than colours drawn uniformly from the RGB cube). 0.5 beat 1.0 by 0.04 top-1 on the third-party
CIFAR-10 ViT of B2-real (three seeds each) but lost on the ResNet-56 -> ResNet-20 of B1 (one seed), so
the default stays 1.0. One-channel images are left as they are.

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
                textured: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` dead-leaves images in [0, 1], shape (n, channels, H, W).

    Radii (fractions of the image side) are drawn from p(r) ∝ r⁻³ on [r_min, r_max]; each shape is a disc
    or a rectangle (random aspect and angle), painted over the earlier ones; colours are uniform per
    channel with a random linear gradient of up to ±0.25 across each shape. ``textured``: each shape is
    instead flat, striped (a sinusoidal grating of random frequency, angle and phase between its colour and
    a second one) or mottled (an image-wide 1/f noise field blending the two colours), a third each.
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
    if textured:
        def per_pixel(t):  # (n, k+1) per-shape values -> (n, h*w, 1) at each pixel's top shape
            return torch.gather(t, 1, idx)[..., None]

        kind = per_pixel((u(n, k + 1) * 3).floor())                       # 0 flat, 1 striped, 2 mottled
        second = torch.gather(u(n, k + 1, channels), 1, idx[..., None].expand(-1, -1, channels))
        freq = per_pixel(2 + 14 * u(n, k + 1))                             # cycles per image side
        ang, phase = per_pixel(u(n, k + 1) * math.pi), per_pixel(u(n, k + 1) * 2 * math.pi)
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (xx * ang.cos() + yy * ang.sin()) + phase)
        mottle = _pink_field(n, (h, w), 1.5, generator, dev).flatten(1)[..., None]
        blend = torch.where(kind == 1, stripes, torch.where(kind == 2, mottle, torch.zeros_like(stripes)))
        img = img * (1 - blend) + second * blend
    img = img.transpose(1, 2).reshape(n, channels, h, w)
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=generator, device=dev)
    return img.clamp_(0, 1)


def _pink_field(n: int, size: tuple[int, int], decay: float, generator: torch.Generator,
                dev: torch.device) -> torch.Tensor:
    """(n, h, w) random fields with a 1/f^decay amplitude spectrum, each scaled to [0, 1]."""
    h, w = size
    fy = torch.fft.fftfreq(h, device=dev).view(h, 1)
    fx = torch.fft.rfftfreq(w, device=dev).view(1, -1)
    amp = (fy ** 2 + fx ** 2).sqrt().clamp_min(1.0 / max(h, w)) ** -decay
    z = torch.randn(n, h, fx.shape[1], 2, generator=generator, device=dev)
    f = torch.fft.irfft2(torch.complex(z[..., 0], z[..., 1]) * amp, s=(h, w))
    lo, hi = f.flatten(1).aminmax(dim=1)
    return (f - lo.view(n, 1, 1)) / (hi - lo).clamp_min(1e-8).view(n, 1, 1)


def textured_leaves(n: int, channels: int, size: tuple[int, int], generator: torch.Generator, **kwargs):
    """Dead leaves whose shapes are flat, striped or mottled (:func:`dead_leaves` with ``textured``)."""
    return dead_leaves(n, channels, size, generator, textured=True, **kwargs)


def spectral(n: int, channels: int, size: tuple[int, int], generator: torch.Generator, *,
             device: torch.device | str = "cpu", **_unused) -> torch.Tensor:
    """Coloured noise with a natural-image amplitude spectrum, 1/f^a with a drawn per image from
    [1, 2.5]; channels are mixed by a random colour matrix around grey, contrast 0.15-0.3."""
    dev = torch.device(device)
    h, w = size
    fy = torch.fft.fftfreq(h, device=dev).view(1, 1, h, 1)
    fx = torch.fft.rfftfreq(w, device=dev).view(1, 1, 1, -1)
    decay = (1.0 + 1.5 * torch.rand(n, 1, 1, 1, generator=generator, device=dev))
    amp = (fy ** 2 + fx ** 2).sqrt().clamp_min(1.0 / max(h, w)) ** -decay
    z = torch.randn(n, channels, h, fx.shape[-1], 2, generator=generator, device=dev)
    f = torch.fft.irfft2(torch.complex(z[..., 0], z[..., 1]) * amp, s=(h, w))
    f = f / f.flatten(1).std(1).clamp_min(1e-8).view(n, 1, 1, 1)
    mix = 0.6 * torch.eye(channels, device=dev) + 0.4 * torch.rand(n, channels, channels, generator=generator,
                                                                    device=dev)
    f = torch.einsum("ncd,nd...->nc...", mix / mix.sum(2, keepdim=True), f)
    contrast = 0.15 + 0.15 * torch.rand(n, 1, 1, 1, generator=generator, device=dev)
    mean = 0.3 + 0.4 * torch.rand(n, channels, 1, 1, generator=generator, device=dev)
    return (mean + contrast * f / f.flatten(1).std(1).clamp_min(1e-8).view(n, 1, 1, 1)).clamp_(0, 1)


def mixed(n: int, channels: int, size: tuple[int, int], generator: torch.Generator, *,
          device: torch.device | str = "cpu", **kwargs) -> torch.Tensor:
    """Each image drawn from dead leaves, textured dead leaves or spectral noise with equal probability."""
    dev = torch.device(device)
    pick = torch.randint(0, 3, (n,), generator=generator, device=dev)
    out = torch.empty(n, channels, *size, device=dev)
    for j, make in enumerate((dead_leaves, textured_leaves, spectral)):
        m = int((pick == j).sum())
        if m:
            out[pick == j] = make(m, channels, size, generator, device=dev, **kwargs)
    return out


PATTERNS = {"dead_leaves": dead_leaves, "textured_leaves": textured_leaves, "spectral": spectral, "mixed": mixed}


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
                 r_max: float = 0.6, noise: float = 0.02, saturation: float = 1.0):
        super().__init__(teacher, batch_size, seed, device)
        if not 0 <= float(saturation) <= 1:
            raise DfkdError(f"procedural saturation must be in [0, 1], got {saturation!r}")
        self.saturation = float(saturation)
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
        if self.saturation < 1 and x.shape[1] == 3:  # pull colours towards each pixel's grey
            grey = x.mean(1, keepdim=True)
            x = grey + self.saturation * (x - grey)
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
