"""A narrower YOLO initialised from a wider one by channel selection (``detection.student_init=teacher``).

The student is the teacher's architecture description at a smaller width multiple (the same layer
list, so the same blocks in the same places). :func:`slimmed_state_dict` gives the student the
teacher's weights: every convolution keeps the output channels of the teacher's with the largest
importance — ``"bn"``: the |γ| of the BatchNorm after it, ``"l1"``: the L1 norm of its filter — in
their original order, and its filters keep only the input channels that its input kept. The kept
channel index sets travel through the graph as the network computes:

* Concat joins its inputs' index sets, each shifted by the teacher channels before it;
* a residual add (a Bottleneck with a shortcut) forces the block's output selection to equal its
  input's; in a C3/C2f whose bottlenecks add, the residual stream's channels are chosen once, by the
  summed importance of every convolution that writes into the stream (the C3's ``cv1`` / the C2f's
  second half, and each adding bottleneck's ``cv2``);
* a C2f's ``cv1`` output is split in two halves, so each half keeps its own top channels;
* SPPF's/SPP's max-pools, Upsample and Focus's space-to-depth keep channels (the concatenated copies
  are the same index set at each copy's offset);
* Detect keeps all its output channels (anchors × (5 + classes), or DFL bins + classes) and selects
  its inputs; a v8 head's inner convolutions select like any other.

BatchNorm layers take the kept channels' γ, β and running statistics. Optionally (``images=`` of
:func:`init_from_teacher`: real or synthetic images), each convolution also compensates for the input
channels it no longer reads: under the teacher's channel mean and covariance of that input on the images
(:func:`input_statistics`), every dropped channel is replaced by its least-squares estimate from the kept
ones — folded into the kept filters, the constant into the following BatchNorm's running mean (or the
convolution's bias). With the teacher's own width
multiple every selection is the identity and the student equals the teacher. A student with a
smaller depth multiple (fewer bottlenecks in a block) keeps each block's first bottlenecks; a
student wider or deeper than the teacher anywhere is one :class:`~dfkd.errors.DfkdError` line.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from dfkd.detection import yolo_blocks as B
from dfkd.errors import DfkdError, close_matches

IMPORTANCE = ("bn", "l1")


class Sel(NamedTuple):
    """The teacher channels a student tensor holds (``idx``, in order) out of the teacher's ``n``."""

    idx: torch.Tensor
    n: int


def _importance(block: B.Conv, kind: str) -> torch.Tensor:
    if kind == "bn":
        return block.bn.weight.detach().abs().float()
    return block.conv.weight.detach().abs().flatten(1).sum(1).float()


def _top(importance: torch.Tensor, k: int, what: str) -> torch.Tensor:
    n = importance.numel()
    if k > n:
        raise DfkdError(f"the student's {what} has {k} channels, more than the teacher's {n}: a teacher-initialised "
                        "student must be at most as wide as the teacher")
    return importance.topk(k).indices.sort().values


class _Slimmer:
    def __init__(self, teacher: nn.Module, student: nn.Module, importance: str):
        if importance not in IMPORTANCE:
            raise DfkdError(f"unknown channel importance {importance!r}{close_matches(importance, IMPORTANCE)}; "
                            f"choose one of: {', '.join(IMPORTANCE)}")
        self.kind = importance
        self.stats = None
        self.ridge = 1e-3
        self.names = {m: n for n, m in student.named_modules()}
        self.state: dict[str, torch.Tensor] = {}

    def imp(self, block: B.Conv) -> torch.Tensor:
        return _importance(block, self.kind)

    def put(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        own = getattr(module, attr)
        name = f"{self.names[module]}.{attr}".lstrip(".")
        if tuple(own.shape) != tuple(value.shape):
            raise DfkdError(f"teacher-initialised student: {name} is {tuple(own.shape)} but the selection gives "
                            f"{tuple(value.shape)}")
        self.state[name] = value.detach().clone().to(own.dtype)

    # -- single layers ---------------------------------------------------------------------
    def conv2d(self, t: nn.Conv2d, s: nn.Conv2d, x: Sel, out: Optional[torch.Tensor]) -> None:
        if t.groups != 1 or s.groups != 1:
            raise DfkdError("a teacher-initialised YOLO student supports ungrouped convolutions only")
        if x.n != t.in_channels:
            raise DfkdError(f"channel bookkeeping: a convolution takes {t.in_channels} teacher channels, "
                            f"its input has {x.n}")
        w = t.weight.detach()
        if out is not None:
            w = w[out]
        shift = None
        st = self.stats.get(t) if self.stats else None
        if st is not None and len(x.idx) < x.n:
            w, shift = _compensate(w, x.idx, *st, ridge=self.ridge)
        else:
            w = w[:, x.idx]
        self.put(s, "weight", w)
        if t.bias is not None:
            b = t.bias.detach() if out is None else t.bias.detach()[out]
            self.put(s, "bias", b + shift if shift is not None else b)
        return shift

    def bn(self, t: nn.BatchNorm2d, s: nn.BatchNorm2d, out: torch.Tensor, shift=None) -> None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(t, attr)[out]
            if attr == "running_mean" and shift is not None:
                v = v - shift  # the convolution's output lacks the constant ``shift``: so does its mean
            self.put(s, attr, v)
        self.put(s, "num_batches_tracked", t.num_batches_tracked)

    def conv(self, t: B.Conv, s: B.Conv, x: Sel, forced: Optional[torch.Tensor] = None,
             importance: Optional[torch.Tensor] = None) -> Sel:
        out = forced if forced is not None else _top(self.imp(t) if importance is None else importance,
                                                     s.conv.out_channels, f"convolution {self.names[s]}")
        if len(out) != s.conv.out_channels:
            raise DfkdError(f"channel bookkeeping: {self.names[s]} has {s.conv.out_channels} output channels, "
                            f"its forced selection {len(out)}")
        shift = self.conv2d(t.conv, s.conv, x, out)
        self.bn(t.bn, s.bn, out, shift)
        return Sel(out, t.conv.out_channels)

    # -- blocks ----------------------------------------------------------------------------
    def bottleneck(self, t: B.Bottleneck, s: B.Bottleneck, x: Sel) -> Sel:
        if t.add != s.add:
            raise DfkdError(f"{self.names[s]}: the teacher's and the student's bottleneck differ in their residual")
        h = self.conv(t.cv1, s.cv1, x)
        return self.conv(t.cv2, s.cv2, h, forced=x.idx if t.add else None)

    def _chain(self, ts: Sequence[B.Bottleneck], ss: Sequence[B.Bottleneck], x: Sel, what: str) -> list[Sel]:
        if len(ss) > len(ts):
            raise DfkdError(f"{what} has {len(ss)} bottlenecks, more than the teacher's {len(ts)}: a "
                            "teacher-initialised student must be at most as deep as the teacher")
        outs = []
        for t, s in zip(ts, ss):  # a shallower student keeps the first bottlenecks
            x = self.bottleneck(t, s, x)
            outs.append(x)
        return outs

    def _stream(self, first: torch.Tensor, ts: Sequence[B.Bottleneck], n: int) -> torch.Tensor:
        """The importance of a residual stream: its first writer's plus every adding bottleneck's."""
        imp = first.clone()
        for b in list(ts)[:n]:
            if not b.add:
                break
            imp += self.imp(b.cv2)
        return imp

    def c3(self, t: B.C3, s: B.C3, x: Sel) -> Sel:
        stream = self._stream(self.imp(t.cv1), t.m, len(s.m)) if len(s.m) and t.m[0].add else None
        a = self.conv(t.cv1, s.cv1, x, importance=stream)
        outs = self._chain(t.m, s.m, a, self.names[s])
        m_out = outs[-1] if outs else a
        b = self.conv(t.cv2, s.cv2, x)
        return self.conv(t.cv3, s.cv3, concat([m_out, b]))

    def c2f(self, t: B.C2f, s: B.C2f, x: Sel) -> Sel:
        c, cs = t.c, s.c
        imp = self.imp(t.cv1)
        first = _top(imp[:c], cs, f"{self.names[s]}.cv1 (first half)")
        second_imp = self._stream(imp[c:], t.m, len(s.m)) if len(s.m) and t.m[0].add else imp[c:]
        second = _top(second_imp, cs, f"{self.names[s]}.cv1 (second half)")
        self.conv(t.cv1, s.cv1, x, forced=torch.cat((first, second + c)))
        parts = [Sel(first, c), Sel(second, c)]
        parts += self._chain(t.m, s.m, parts[-1], self.names[s])
        return self.conv(t.cv2, s.cv2, concat(parts))

    def sppf(self, t, s, x: Sel) -> Sel:
        h = self.conv(t.cv1, s.cv1, x)
        copies = 4 if isinstance(t, B.SPPF) else len(t.m) + 1
        return self.conv(t.cv2, s.cv2, concat([h] * copies))

    def focus(self, t: B.Focus, s: B.Focus, x: Sel) -> Sel:
        return self.conv(t.conv, s.conv, concat([x] * 4))

    def detect(self, t: B.Detect, s: B.Detect, xs: Sequence[Sel]) -> None:
        if t.nc != s.nc or t.na != s.na or t.nl != s.nl:
            raise DfkdError("a teacher-initialised student's Detect head must have the teacher's classes, anchors "
                            "and levels")
        for tc, sc, x in zip(t.m, s.m, xs):
            self.conv2d(tc, sc, x, None)
        self.put(s, "anchors", t.anchors)

    def detect_v8(self, t: B.DetectV8, s: B.DetectV8, xs: Sequence[Sel]) -> None:
        if t.nc != s.nc or t.nl != s.nl or t.reg_max != s.reg_max:
            raise DfkdError("a teacher-initialised student's Detect head must have the teacher's classes, levels "
                            "and DFL bins")
        for branch_t, branch_s in ((t.cv2, s.cv2), (t.cv3, s.cv3)):
            for seq_t, seq_s, x in zip(branch_t, branch_s, xs):
                x = self.conv(seq_t[0], seq_s[0], x)
                x = self.conv(seq_t[1], seq_s[1], x)
                self.conv2d(seq_t[2], seq_s[2], x, None)
        if isinstance(t.dfl, B.DFL):
            self.put(s.dfl.conv, "weight", t.dfl.conv.weight)

    def layer(self, t: nn.Module, s: nn.Module, x, where: str):
        if type(t) is not type(s):
            raise DfkdError(f"{where}: the teacher has a {type(t).__name__}, the student a {type(s).__name__}")
        handlers: dict[type, Callable] = {
            B.Conv: self.conv, B.Bottleneck: self.bottleneck, B.C3: self.c3, B.C2f: self.c2f, B.SPPF: self.sppf,
            B.SPP: self.sppf, B.Focus: self.focus, B.Detect: self.detect, B.DetectV8: self.detect_v8,
        }
        if type(t) in handlers:
            return handlers[type(t)](t, s, x)
        if isinstance(t, B.Concat):
            if t.d != 1:
                raise DfkdError(f"{where}: a Concat along dimension {t.d} (only channels, 1, are supported)")
            return concat(x)
        if isinstance(t, nn.Upsample):
            return x
        if isinstance(t, nn.BatchNorm2d):
            self.bn(t, s, x.idx)
            return x
        if isinstance(t, nn.Sequential):  # a block the description repeats (n > 1)
            if len(s) > len(t):
                raise DfkdError(f"{where} repeats its block {len(s)} times, the teacher {len(t)}")
            for i, (tm, sm) in enumerate(zip(t, s)):
                x = self.layer(tm, sm, x, f"{where}.{i}")
            return x
        raise DfkdError(f"{where}: a teacher-initialised student cannot select the channels of a "
                        f"{type(t).__name__}")


def _compensate(w, keep, mean, cov, ridge=1e-3):
    """The filter ``w`` (O, I, kh, kw) reading only the input channels ``keep``: each dropped channel is
    replaced by its least-squares estimate from the kept ones (``x_r ≈ A x_k + b`` under the input's channel
    ``mean`` and covariance ``cov``); returns the new filter and the constant it adds to the output."""
    dev, w, keep = w.device, w.detach().cpu(), keep.cpu()
    n = w.shape[1]
    drop = torch.ones(n, dtype=torch.bool)
    drop[keep] = False
    drop = drop.nonzero().flatten()
    ckk = cov[keep][:, keep].double()
    ckk = ckk + ridge * ckk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=ckk.dtype)
    a = torch.linalg.solve(ckk, cov[keep][:, drop].double()).T  # (R, K)
    b = mean[drop].double() - a @ mean[keep].double()
    wr = w[:, drop].double()
    wk = w[:, keep].double() + torch.einsum("orhw,rk->okhw", wr, a)
    shift = torch.einsum("orhw,r->o", wr, b)
    return wk.to(w.dtype).to(dev), shift.to(w.dtype).to(dev)


def input_statistics(model: nn.Module, images: torch.Tensor, batch: int = 8) -> dict:
    """Per ``nn.Conv2d`` of ``model`` the channel mean and covariance of its input over ``images``."""
    acc: dict = {}

    def hook(mod, args):
        x = args[0].detach().double().transpose(0, 1).flatten(1)  # (C, N)
        s = acc.setdefault(mod, [0, 0.0, 0.0])
        s[0] += x.shape[1]
        s[1] = s[1] + x.sum(1)
        s[2] = s[2] + x @ x.T

    from dfkd.detection.yolo import eval_modes

    dev = next(model.parameters()).device
    hs = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with eval_modes(model), torch.no_grad():
            for c in images.split(batch):
                model(c.to(dev))
    finally:
        for h in hs:
            h.remove()
    out = {}
    for m, (n, s1, s2) in acc.items():
        mean = s1 / n
        out[m] = (mean.float().cpu(), (s2 / n - torch.outer(mean, mean)).float().cpu())
    return out


def concat(sels: Sequence[Sel]) -> Sel:
    """The channels of ``torch.cat`` of tensors holding ``sels``: each set shifted by the teacher channels before it."""
    idx, offset = [], 0
    for x in sels:
        idx.append(x.idx + offset)
        offset += x.n
    return Sel(torch.cat(idx), offset)


def slimmed_state_dict(teacher: nn.Module, student: nn.Module, importance: str = "bn",
                       stats: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``student``'s state dict, selected from ``teacher``'s (two :class:`YOLOModel`s of one
    architecture description at different width multiples; see the module docstring)."""
    return _slim(teacher, student, importance, stats)[0]


def kept_channels(teacher: nn.Module, student: nn.Module, importance: str = "bn") -> list[torch.Tensor]:
    """For each input of ``student``'s Detect layer (in order), the indices of the teacher channels it holds
    after :func:`init_from_teacher` with the same ``importance``: the teacher's activations at those channels
    are the features the student started from (the targets of ``detection.feature_kd``)."""
    from dfkd.detection.yolo import YOLOModel

    s_model = student if isinstance(student, YOLOModel) else student.model
    t_model = teacher if isinstance(teacher, YOLOModel) else teacher.model
    sels = _slim(t_model, s_model, importance, None)[1]
    f = t_model.model[-1].f
    return [sels[j].idx.clone() for j in ([f] if isinstance(f, int) else f)]


def _slim(teacher: nn.Module, student: nn.Module, importance: str,
          stats: Optional[dict]) -> tuple[dict[str, torch.Tensor], list[Sel]]:
    if len(teacher.model) != len(student.model):
        raise DfkdError(f"the teacher has {len(teacher.model)} layers, the student {len(student.model)}: a "
                        "teacher-initialised student needs the teacher's layer list")
    sl = _Slimmer(teacher, student, importance)
    sl.stats = stats
    sels: list[Sel] = []
    x = Sel(torch.arange(3), 3)
    with torch.no_grad():
        for t, s in zip(teacher.model, student.model):
            if t.f != s.f:
                raise DfkdError(f"layer {t.i}: the teacher's takes input from {t.f}, the student's from {s.f}")
            if t.f != -1:
                x = sels[t.f] if isinstance(t.f, int) else [x if j == -1 else sels[j] for j in t.f]
            x = sl.layer(t, s, x, f"layer {t.i} ({type(t).__name__})")
            sels.append(x)
    return sl.state, sels


def init_from_teacher(student: nn.Module, teacher: nn.Module, importance: str = "bn",
                      images: Optional[torch.Tensor] = None) -> nn.Module:
    """Load :func:`slimmed_state_dict` into ``student`` strictly (a :class:`YOLOModel` or a detector holding
    one as ``.model``); ``images`` ((N, 3, H, W) in [0, 1]): compensate the dropped channels from the
    teacher's statistics on them (module docstring). Returns ``student``."""
    from dfkd.detection.yolo import YOLOModel, load_state_strict

    s_model = student if isinstance(student, YOLOModel) else student.model
    t_model = teacher if isinstance(teacher, YOLOModel) else teacher.model
    stats = input_statistics(t_model, images) if images is not None else None
    state = slimmed_state_dict(t_model, s_model, importance, stats)
    load_state_strict(s_model, state, "the teacher-selected state")
    return student


COMPENSATE = ("none", "dead_leaves", "inversion")


def batchnorm_matched_images(model: nn.Module, n: int, image_size: int, iterations: int = 100, lr: float = 0.05,
                             batch: int = 16, seed: int = 0, jitter: Optional[int] = None) -> torch.Tensor:
    """``n`` (3, ``image_size``²) images in [0, 1] from the teacher's weights alone: dead-leaves images whose
    pixels (a sigmoid parametrisation) are optimised for ``iterations`` Adam steps so that every BatchNorm
    layer's input statistics match the layer's running statistics (DeepInversion's prior, no class or box
    loss; the step size decays on a cosine), with random shifts of up to ``jitter`` pixels (default a 32nd of
    the side) and flips. They stand in for real images where
    only the *statistics* of the teacher's activations are needed (:func:`input_statistics`). The model's
    modes and ``requires_grad`` flags are restored."""
    from dfkd.detection.yolo import eval_modes
    from dfkd.hooks import BatchNormPrior
    from generators.procedural import procedural_images

    g = torch.Generator().manual_seed(int(seed))
    jitter = max(1, image_size // 32) if jitter is None else int(jitter)
    dev = next(model.parameters()).device
    start = procedural_images("dead_leaves", n, (3, image_size, image_size), g)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    out = []
    try:
        for p in params:
            p.requires_grad_(False)
        with eval_modes(model), BatchNormPrior(model) as prior:
            for chunk in start.split(batch):
                z = torch.logit(chunk.clamp(0.02, 0.98)).to(dev).requires_grad_(True)
                opt = torch.optim.Adam([z], lr=lr)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
                for it in range(iterations):
                    img = z.sigmoid()
                    dx, dy = (torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() if jitter else (0, 0))
                    img = torch.roll(img, (dy, dx), (2, 3))
                    if it % 2:
                        img = img.flip(3)
                    model(img)
                    loss = prior.loss()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                out.append(z.detach().sigmoid().cpu())
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.cat(out)


def compensation_images(model: nn.Module, kind: str, n: int, image_size: int, iterations: int,
                        seed: int = 0, cache: Optional[str] = None) -> Optional[torch.Tensor]:
    """The images whose teacher statistics a teacher-initialised student compensates from
    (``detection.compensate``): ``none``; ``dead_leaves`` (procedural, as drawn); ``inversion``
    (:func:`batchnorm_matched_images`). None of them uses real data. ``cache``: a file that keeps them —
    read when it holds images made with these settings for this teacher, else (re)written."""
    if kind not in COMPENSATE:
        raise DfkdError(f"detection.compensate must be one of {', '.join(COMPENSATE)}, got {kind!r}"
                        f"{close_matches(str(kind), COMPENSATE)}")
    if kind == "none":
        return None
    key = {"kind": kind, "n": int(n), "image_size": int(image_size), "iterations": int(iterations),
           "seed": int(seed), "teacher": _checksum(model)}
    if cache:
        from pathlib import Path

        path = Path(cache)
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                saved = None
            if isinstance(saved, dict) and saved.get("key") == key:
                return saved["images"]
    if kind == "dead_leaves":
        from generators.procedural import procedural_images

        images = procedural_images("dead_leaves", n, (3, image_size, image_size),
                                   torch.Generator().manual_seed(seed))
    else:
        images = batchnorm_matched_images(model, n, image_size, iterations=iterations, seed=seed)
    if cache:
        from dfkd.models.checkpoint import atomic_torch_save

        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": key, "images": images}, Path(cache))
    return images


def _checksum(model: nn.Module) -> float:
    """A cheap fingerprint of a network's weights (the sum of |w| and of w·index over its state)."""
    total = 0.0
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                total += float(t.double().abs().sum()) * (1 + i % 7)
    return round(total, 6)
