"""The building blocks of YOLOv5/YOLOv8-style detectors, written for dfkd from their published
architecture description (module names follow the checkpoints' so their weights load strictly).

Every convolution block is conv (no bias) → BatchNorm (eps 1e-3, momentum 0.03) → SiLU.
``Detect`` (v5, anchor-based) and ``DetectV8`` (anchor-free, DFL boxes) return the raw per-level
head outputs; decoding lives in :mod:`dfkd.detection.yolo`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def same_padding(k, p=None):
    if p is not None:
        return p
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


class Conv(nn.Module):
    """conv(k, s, p, groups, no bias) → BatchNorm → SiLU (``act=False``: identity)."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, same_padding(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two convs (kernels ``k``) on ``int(c2·e)`` hidden channels, with a residual when shapes allow."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5, k=(1, 3)):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, k[0], 1)
        self.cv2 = Conv(hidden, c2, k[1], 1, g=g)
        self.add = bool(shortcut) and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: ``cv3(cat(m(cv1(x)), cv2(x)))``, ``n`` bottlenecks in ``m``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    """YOLOv8's CSP block: split ``cv1(x)`` in two, chain ``n`` bottlenecks (3×3, 3×3) on the
    second half keeping every output, and fuse all ``2 + n`` parts with ``cv2``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, e=1.0, k=(3, 3)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            parts.append(m(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one k×k max-pool applied three times in a row."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools of sizes ``k`` (older YOLOv5 releases)."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class Focus(nn.Module):
    """Space-to-depth (every second pixel into channels, 4× channels) then a conv (YOLOv5 < v6)."""

    def __init__(self, c1: int, c2: int, k=1, s=1, p=None, g: int = 1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), self.d)


class Detect(nn.Module):
    """YOLOv5 anchor head: one 1×1 conv per level giving ``na·(5 + nc)`` channels.

    ``forward`` returns per level a raw (B, na, H, W, 5 + nc) tensor (box, objectness and class
    logits before any sigmoid). ``anchors`` (nl, na, 2) are in units of each level's stride,
    as the checkpoints store them; ``stride`` (nl,) is in pixels.
    """

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = ()):
        super().__init__()
        self.nc = int(nc)
        self.no = self.nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for conv, x in zip(self.m, xs):
            y = conv(x)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def init_biases(self) -> None:
        """Prior biases for a fresh head: about 8 objects per 640² image, classes near 0.6/nc."""
        for conv, s in zip(self.m, self.stride.tolist()):
            b = conv.bias.detach().view(self.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            b[:, 5:] += math.log(0.6 / (self.nc - 0.99))
            conv.bias.data.copy_(b.view(-1))


class DFL(nn.Module):
    """Distribution focal loss integral: the expectation of a softmax over ``c1`` bins (a fixed conv)."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # (B, 4·c1, anchors)
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectV8(nn.Module):
    """YOLOv8 anchor-free head: per level a box branch (``cv2``, 4·reg_max distance bins) and a
    class branch (``cv3``, nc logits); ``forward`` returns per level the raw (B, 4·reg_max + nc, H, W)."""

    def __init__(self, nc: int = 80, ch: Sequence[int] = (), reg_max: int = 16):
        super().__init__()
        self.nc = int(nc)
        self.nl = len(ch)
        self.reg_max = int(reg_max)
        self.no = self.nc + 4 * self.reg_max
        c2 = max(16, ch[0] // 4, self.reg_max * 4)
        c3 = max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
                                 for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((box(x), cls(x)), 1) for box, cls, x in zip(self.cv2, self.cv3, xs)]


# names used in the architecture descriptions → the class that builds them
BLOCKS = {"Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "C2f": C2f, "SPPF": SPPF, "SPP": SPP,
          "Focus": Focus, "Concat": Concat, "Detect": Detect, "nn.Upsample": nn.Upsample,
          "torch.nn.Upsample": nn.Upsample, "Upsample": nn.Upsample, "nn.BatchNorm2d": nn.BatchNorm2d}
# blocks whose first two arguments are (in channels, out channels) and whose out channels scale with width
CHANNEL_BLOCKS = (Conv, Bottleneck, C3, C2f, SPPF, SPP, Focus)
# blocks that take their repeat count as an argument instead of being repeated
REPEAT_BLOCKS = (C3, C2f)
