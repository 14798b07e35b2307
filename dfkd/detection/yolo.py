"""YOLO-family detectors (YOLOv5, YOLOv8-style) rebuilt in dfkd, loaded safely from their ``.pt`` files.

Loading. ``load_yolo(path)`` reads a YOLOv5/YOLOv8 release checkpoint (a pickled full model)
through :mod:`dfkd.detection.safe_pickle`: the classes it names become inert stand-ins, nothing
of the file's code is imported or run, and ``weights_only=False`` is never used. The network is
rebuilt by :class:`YOLOModel` from the architecture description the checkpoint carries (the
model's ``yaml`` dict: depth/width multiples, backbone and head lists of Conv/C3/C2f/SPPF/
Concat/nn.Upsample/Detect, anchors), and the stand-ins' tensors load into it strictly (the
``ema`` model when the file has one). :func:`read_yolo_checkpoint` gives the pieces without
building anything. A missing, truncated or foreign file, a name outside the allow-list, or
weights that do not fit the description give one :class:`~dfkd.errors.DfkdError` line.

Predictions as the original makes them. :class:`YOLODetector` is torchvision-style: called on a
list of [0, 1] (3, H, W) images it letterboxes each (:func:`letterbox`: longest side to
``image_size``, grey 114 padding; ``auto=True`` pads only to a multiple of the largest stride),
decodes the head (v5: ``xy = (2σ − 0.5 + grid) · stride``, ``wh = (2σ)² · anchor``;
confidence = objectness × class probability; v8: DFL distances around cell centres), keeps
every (box, class) pair above ``conf_thres``, runs class-wise NMS
(:func:`torchvision.ops.batched_nms`, ``iou_thres``), keeps ``max_det`` and maps the boxes
back to the original pixels. With ``conf_thres=0.001, iou_thres=0.6`` (``YOLODetector.for_map``)
it plugs into :func:`dfkd.eval.detection.evaluate_detector` for COCO mAP.

Teacher interface (what box inversion, pseudo-boxes and head matching use):

* ``YOLODetector.head_outputs(x)`` — the raw per-level head outputs before decoding, with
  gradients reaching the pixels ``x`` ((B, 3, H, W) in [0, 1], H and W multiples of
  ``max_stride``): v5 a list of (B, na, H/s, W/s, 5 + nc) (box, objectness, class logits), v8 a
  list of (B, 4·reg_max + nc, H/s, W/s). Every module runs in eval mode; modes are restored.
* ``YOLODetector.decode(raw)`` — (B, N, 4 + nc): boxes ``cx, cy, w, h`` in the pixels of ``x``
  and per-class confidences (differentiable).
* ``YOLODetector.detect(x, conf_thres, iou_thres)`` — NMS'd ``{"boxes" (xyxy), "scores",
  "labels"}`` per image in the pixels of ``x``, without gradients (pseudo-boxes).
* ``YOLODetector.batchnorm_layers()`` and ``YOLODetector.statistics("batchnorm")`` — the
  BatchNorm layers (57 in YOLOv5n) and a :class:`dfkd.hooks.BatchNormPrior` on them.
* ``YOLODetector.model`` is the :class:`YOLOModel` (``model.strides``, ``model.anchors_px``,
  ``model.num_classes``, ``model.version``); ``class_names``; ``image_size``.

Licence. The YOLO code and weights are GPL-3.0 (YOLOv5) / AGPL-3.0 (YOLOv8 and later). dfkd does
not include or import that code: this module rebuilds the architecture from the description
each checkpoint carries. The weights keep their own licence, which the user of a checkpoint
bears.
"""

from __future__ import annotations

import ast
import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.detection import yolo_blocks as B
from dfkd.detection.safe_pickle import is_stub, load_inert, stub_state_dict
from dfkd.errors import DfkdError, close_matches

PAD_VALUE = 114 / 255.0

# classes a YOLO checkpoint may name; each becomes an inert stand-in
YOLO_MODULES = frozenset({
    "models.common", "models.yolo", "models.experimental",
    "ultralytics.nn.tasks", "ultralytics.nn.modules", "ultralytics.nn.modules.conv",
    "ultralytics.nn.modules.block", "ultralytics.nn.modules.head", "ultralytics.utils",
    "ultralytics.yolo.utils",
})
YOLO_CLASSES = frozenset({
    "Model", "DetectionModel", "Detect", "Conv", "Bottleneck", "BottleneckCSP", "C3", "C2f", "SPP",
    "SPPF", "Focus", "Concat", "DFL", "DWConv", "GhostConv", "C3TR", "C3Ghost", "Contract", "Expand",
    "IterableSimpleNamespace",
})


def yolo_name_allowed(full_name: str) -> bool:
    """The allow-list: YOLO package classes by exact module and name, and ``torch.nn`` module classes."""
    module, _, cls = full_name.rpartition(".")
    if module.startswith("torch.nn.modules."):
        obj = getattr(nn, cls, None)
        return isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module
    return module in YOLO_MODULES and cls in YOLO_CLASSES


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _arg(v: Any, nc: int, anchors: Any) -> Any:
    if not isinstance(v, str):
        return v
    if v == "nc":
        return nc
    if v == "anchors":
        return anchors
    try:
        return ast.literal_eval(v)  # 'None', 'False', '2', ...
    except (ValueError, SyntaxError):
        return v  # e.g. 'nearest'


# -- the network ---------------------------------------------------------------------------
class YOLOModel(nn.Module):
    """A YOLO network built from its architecture description (``cfg``: the ``yaml`` dict).

    ``forward(x)`` returns the raw per-level head outputs (see the module docstring);
    :meth:`decode` turns them into (B, N, 4 + nc). ``version`` is 5 (anchor head) or 8
    (anchor-free DFL head). A fresh model gets strides from a 256-px probe, anchors ordered
    like the strides and the usual prior biases.
    """

    def __init__(self, cfg: Mapping[str, Any], ch: int = 3, nc: Optional[int] = None):
        super().__init__()
        if not isinstance(cfg, Mapping) or not isinstance(cfg.get("backbone"), list) \
                or not isinstance(cfg.get("head"), list):
            raise DfkdError("a YOLO architecture needs 'backbone' and 'head' layer lists")
        self.cfg = copy.deepcopy(dict(cfg))
        self.num_classes = int(nc if nc is not None else self.cfg.get("nc", 80))
        self.cfg["nc"] = self.num_classes
        self.model, self.save = self._parse(self.cfg, int(ch))
        head = self.model[-1]
        if not isinstance(head, (B.Detect, B.DetectV8)):
            raise DfkdError("the last layer of a YOLO architecture must be Detect")
        self.version = 5 if isinstance(head, B.Detect) else 8
        probe = 256
        was = self.training
        self.eval()
        with torch.no_grad():
            raw = self.forward(torch.zeros(1, ch, probe, probe))
        self.train(was)
        head.stride.copy_(torch.tensor([probe / r.shape[-3 if self.version == 5 else -2] for r in raw]))
        if self.version == 5:
            head.anchors /= head.stride.view(-1, 1, 1)
            area = head.anchors.prod(-1).mean(-1)
            if (area[-1] - area[0]).sign() != (head.stride[-1] - head.stride[0]).sign():
                head.anchors.copy_(head.anchors.flip(0))
        head.init_biases() if self.version == 5 else self._init_v8_biases()

    def _init_v8_biases(self) -> None:
        head = self.model[-1]
        for box, cls, s in zip(head.cv2, head.cv3, head.stride.tolist()):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[: head.nc] = math.log(5 / head.nc / (640 / s) ** 2)

    @staticmethod
    def _parse(cfg: dict, ch: int):
        nc = cfg["nc"]
        anchors = cfg.get("anchors")
        if "scales" in cfg:  # YOLOv8-style: one description, several sizes
            scales = cfg["scales"]
            scale = cfg.get("scale") or next(iter(scales))
            if scale not in scales:
                raise DfkdError(f"unknown YOLO scale {scale!r}{close_matches(str(scale), scales)}")
            gd, gw, max_ch = scales[scale]
        else:
            gd, gw, max_ch = cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), float("inf")
        if isinstance(anchors, int):
            raise DfkdError("anchors given as a count need k-means on data; give them in pixels")
        na = len(anchors[0]) // 2 if anchors else 0
        no = na * (nc + 5)
        layers, save, chans = [], [], [ch]
        for i, spec in enumerate(cfg["backbone"] + cfg["head"]):
            try:
                f, n, name, args = spec
            except (TypeError, ValueError):
                raise DfkdError(f"YOLO layer {i}: expected [from, number, module, args], got {spec!r}") from None
            block = B.BLOCKS.get(name)
            if block is None:
                raise DfkdError(f"YOLO layer {i}: unknown module {name!r}{close_matches(str(name), B.BLOCKS)}")
            args = [_arg(a, nc, anchors) for a in args]
            n = max(round(n * gd), 1) if n > 1 else n
            try:
                src = [f] if isinstance(f, int) else list(f)
                c_in = [chans[x] for x in src]
            except (TypeError, IndexError):
                raise DfkdError(f"YOLO layer {i} ({name}) takes input from {f!r}, which is no earlier layer") from None
            if block in B.CHANNEL_BLOCKS:
                c1, c2 = c_in[0], args[0]
                if c2 != no:
                    c2 = make_divisible(min(c2, max_ch) * gw, 8)
                args = [c1, c2, *args[1:]]
                if block in B.REPEAT_BLOCKS:
                    args.insert(2, n)
                    n = 1
            elif block is nn.BatchNorm2d:
                c2 = c_in[0]
                args = [c2]
            elif block is B.Concat:
                c2 = sum(c_in)
            elif block is B.Detect:
                if anchors:
                    block, args = B.Detect, [nc, anchors, c_in]
                else:
                    block, args = B.DetectV8, [nc, c_in]
                c2 = None
            else:
                c2 = c_in[0]
            try:
                m = nn.Sequential(*(block(*args) for _ in range(n))) if n > 1 else block(*args)
            except (TypeError, ValueError, IndexError) as e:
                raise DfkdError(f"YOLO layer {i} ({name} {args!r}): {e}") from None
            m.f, m.i = f, i
            save.extend(x % i for x in src if x != -1)
            layers.append(m)
            if i == 0:
                chans = []
            chans.append(c2)
        return nn.Sequential(*layers), sorted(set(save))

    # the network
    @property
    def head(self) -> nn.Module:
        return self.model[-1]

    @property
    def strides(self) -> list[float]:
        return [float(s) for s in self.head.stride]

    @property
    def max_stride(self) -> int:
        return int(max(self.strides))

    @property
    def anchors_px(self) -> Optional[torch.Tensor]:
        """(nl, na, 2) anchor sizes in pixels (v5), ``None`` for an anchor-free head."""
        if self.version != 5:
            return None
        return self.head.anchors * self.head.stride.view(-1, 1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[Optional[torch.Tensor]] = []
        for m in self.model:
            if m.f != -1:
                x = outs[m.f] if isinstance(m.f, int) else [x if j == -1 else outs[j] for j in m.f]
            x = m(x)
            outs.append(x if m.i in self.save else None)
        return x

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, N, 4 + nc): ``cx, cy, w, h`` in input pixels, then per-class confidences."""
        return self._decode_v5(raw) if self.version == 5 else self._decode_v8(raw)

    def _decode_v5(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        head = self.head
        out = []
        for i, r in enumerate(raw):
            b, na, h, w, no = r.shape
            y = r.float().sigmoid()
            gy, gx = torch.meshgrid(torch.arange(h, device=r.device), torch.arange(w, device=r.device), indexing="ij")
            grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2).float()
            stride = float(head.stride[i])
            anchor = (head.anchors[i] * stride).view(1, na, 1, 1, 2).float()
            xy = (y[..., 0:2] * 2 - 0.5 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            conf = y[..., 5:] * y[..., 4:5]
            out.append(torch.cat((xy, wh, conf), -1).view(b, -1, 4 + head.nc))
        return torch.cat(out, 1)

    def _decode_v8(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        head = self.head
        b = raw[0].shape[0]
        flat = torch.cat([r.float().flatten(2) for r in raw], 2)  # (B, 4R + nc, A)
        points, strides = [], []
        for i, r in enumerate(raw):
            h, w = r.shape[-2:]
            gy, gx = torch.meshgrid(torch.arange(h, device=r.device), torch.arange(w, device=r.device), indexing="ij")
            points.append(torch.stack((gx, gy), -1).view(-1, 2).float() + 0.5)
            strides.append(torch.full((h * w, 1), float(head.stride[i]), device=r.device))
        points, strides = torch.cat(points).T, torch.cat(strides).T  # (2, A), (1, A)
        box, cls = flat.split((4 * head.reg_max, head.nc), 1)
        lt, rb = head.dfl(box).chunk(2, 1)
        x1y1, x2y2 = points - lt, points + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((xywh, cls.sigmoid()), 1).transpose(1, 2).reshape(b, -1, 4 + head.nc)


def build_yolo(cfg: Mapping[str, Any], nc: Optional[int] = None, ch: int = 3) -> YOLOModel:
    """A freshly initialised :class:`YOLOModel` from an architecture description."""
    return YOLOModel(cfg, ch=ch, nc=nc)


# -- pre- and post-processing ----------------------------------------------------------------
def letterbox(image: torch.Tensor, size: int = 640, stride: int = 32, auto: bool = False,
              scaleup: bool = True) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """Resize a (3, H, W) [0, 1] image so its longest side is ``size`` (bilinear, antialiased when
    shrinking; ``scaleup=False`` never enlarges) and pad it with grey 114 to ``size``² (``auto``:
    only to a multiple of ``stride``), centred. Returns ``(image, ratio, (left, top))``."""
    _, h, w = image.shape
    r = min(size / h, size / w)
    if not scaleup:
        r = min(r, 1.0)
    nw, nh = int(round(w * r)), int(round(h * r))
    if (nw, nh) != (w, h):
        image = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=r < 1)[0].clamp_(0, 1)
    dw, dh = size - nw, size - nh
    if auto:
        dw, dh = dw % stride, dh % stride
    left, top = int(round(dw / 2 - 0.1)), int(round(dh / 2 - 0.1))
    right, bottom = dw - left, dh - top
    if dw or dh:
        image = F.pad(image, (left, right, top, bottom), value=PAD_VALUE)
    return image, r, (left, top)


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    xy, wh = b[..., :2], b[..., 2:4] / 2
    return torch.cat((xy - wh, xy + wh), -1)


def nms(decoded: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 300,
        multi_label: bool = True, max_candidates: int = 30000) -> list[dict[str, torch.Tensor]]:
    """Per image of ``decoded`` (B, N, 4 + nc): every (box, class) whose confidence exceeds
    ``conf_thres`` (only the best class per box if not ``multi_label``), the ``max_candidates``
    most confident of them, class-wise NMS at ``iou_thres``, then the ``max_det`` best."""
    from torchvision.ops import batched_nms

    out = []
    for x in decoded.detach():
        boxes, scores = xywh_to_xyxy(x[:, :4]), x[:, 4:]
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            s = scores[i, j]
        else:
            s, j = scores.max(1)
            i = (s > conf_thres).nonzero(as_tuple=True)[0]
            s, j = s[i], j[i]
        if s.numel() > max_candidates:
            top = s.topk(max_candidates).indices
            i, j, s = i[top], j[top], s[top]
        b = boxes[i]
        keep = batched_nms(b, s, j, iou_thres)[:max_det]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": j[keep]})
    return out


@contextmanager
def eval_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in eval mode inside the block; each one's mode restored on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


# -- the detector / teacher ------------------------------------------------------------------
class YOLODetector(nn.Module):
    """A :class:`YOLOModel` with letterbox, decode and NMS (see the module docstring)."""

    def __init__(self, model: YOLOModel, class_names: Optional[Sequence[str]] = None, image_size: int = 640,
                 conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 300, auto: bool = False):
        super().__init__()
        self.model = model
        n = model.num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
        if len(self.class_names) != n:
            raise DfkdError(f"{len(self.class_names)} class names for a {n}-class YOLO model")
        self.image_size = int(image_size)
        if self.image_size % model.max_stride:
            raise DfkdError(f"YOLO image size {image_size} is not a multiple of its largest stride {model.max_stride}")
        self.conf_thres, self.iou_thres, self.max_det, self.auto = float(conf_thres), float(iou_thres), int(max_det), bool(auto)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def max_stride(self) -> int:
        return self.model.max_stride

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def for_map(self) -> "YOLODetector":
        """The settings for mAP: confidence 0.001, IoU 0.6, 300 detections (a shallow copy)."""
        other = copy.copy(self)
        other.conf_thres, other.iou_thres, other.max_det = 0.001, 0.6, 300
        return other

    def _check_pixels(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise DfkdError(f"YOLO input must be a (B, 3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        s = self.max_stride
        if x.shape[-1] % s or x.shape[-2] % s:
            raise DfkdError(f"YOLO input {tuple(x.shape[-2:])} is not a multiple of the stride {s} (letterbox it)")

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw per-level head outputs on [0, 1] pixels ``x``, gradients kept, modules in eval mode."""
        self._check_pixels(x)
        with eval_modes(self.model):
            return self.model(x)

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model.decode(raw)

    def detect(self, x: torch.Tensor, conf_thres: Optional[float] = None, iou_thres: Optional[float] = None,
               max_det: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
        """NMS'd detections on network-sized pixels ``x`` (boxes xyxy in those pixels), no gradients."""
        with torch.no_grad():
            decoded = self.decode(self.head_outputs(x))
        return nms(decoded, self.conf_thres if conf_thres is None else conf_thres,
                   self.iou_thres if iou_thres is None else iou_thres, self.max_det if max_det is None else max_det)

    def batchnorm_layers(self) -> list[nn.modules.batchnorm._BatchNorm]:
        from dfkd.hooks import batchnorm_layers

        return batchnorm_layers(self.model)

    @contextmanager
    def statistics(self, kind: str = "batchnorm", **kwargs: Any) -> Iterator:
        """A statistics prior (BatchNorm by default) hooked on the network; hooks removed on exit."""
        from dfkd.hooks import build_prior

        with build_prior(self.model, kind, **kwargs) as prior:
            yield prior

    def forward(self, images) -> list[dict[str, torch.Tensor]]:
        """Detections on original images (a list of (3, H, W) [0, 1] tensors or a batch), in their pixels."""
        imgs = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        prepared = [letterbox(im, self.image_size, self.max_stride, auto=self.auto) for im in imgs]
        out: list[Optional[dict]] = [None] * len(imgs)
        groups: dict[tuple, list[int]] = {}
        for k, (p, _, _) in enumerate(prepared):
            groups.setdefault(tuple(p.shape), []).append(k)
        for idx in groups.values():
            x = torch.stack([prepared[k][0] for k in idx])
            for k, det in zip(idx, self.detect(x)):
                _, r, (left, top) = prepared[k]
                h, w = imgs[k].shape[-2:]
                b = det["boxes"].clone()
                b[:, 0::2] = ((b[:, 0::2] - left) / r).clamp(0, w)
                b[:, 1::2] = ((b[:, 1::2] - top) / r).clamp(0, h)
                out[k] = {"boxes": b, "scores": det["scores"], "labels": det["labels"]}
        return out  # type: ignore[return-value]


# -- checkpoints -----------------------------------------------------------------------------
def read_yolo_checkpoint(path: str | Path) -> dict[str, Any]:
    """The pieces of a YOLO ``.pt`` file, read without running its code.

    Returns ``{"cfg": architecture dict, "state_dict": tensors of the chosen model, "names": class
    names or None, "stride": list or None, "nc": int, "source": "ema" | "model", "meta": plain
    values of the file (epoch, date, ...)}``.
    """
    path = Path(path).expanduser()
    ck = load_inert(path, yolo_name_allowed, what="YOLO checkpoint")
    if is_stub(ck):
        ck = {"model": ck}
    if not isinstance(ck, Mapping):
        raise DfkdError(f"{path} is not a YOLO checkpoint (it holds a {type(ck).__name__}, not a model)")
    source = "ema" if is_stub(ck.get("ema")) else "model"
    model = ck.get(source)
    if not is_stub(model):
        raise DfkdError(f"{path} is not a YOLO checkpoint (no pickled 'model' or 'ema'; keys: "
                        f"{', '.join(map(str, list(ck)[:8]))})")
    attrs = model.__dict__
    cfg = attrs.get("yaml")
    if not isinstance(cfg, Mapping) or "backbone" not in cfg or "head" not in cfg:
        raise DfkdError(f"{path}: its model carries no architecture description (the 'yaml' dict with "
                        "'backbone' and 'head')")
    names = attrs.get("names")
    if isinstance(names, Mapping):
        names = [str(names[k]) for k in sorted(names, key=int)]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        names = None
    stride = attrs.get("stride")
    stride = [float(s) for s in stride] if isinstance(stride, (torch.Tensor, list, tuple)) else None
    nc = int(attrs.get("nc") or cfg.get("nc") or (len(names) if names else 80))
    meta = {k: v for k, v in ck.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"cfg": dict(cfg), "state_dict": stub_state_dict(model), "names": names, "stride": stride, "nc": nc,
            "source": source, "meta": meta}


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with any mismatch as one :class:`DfkdError` line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
        raise DfkdError(f"{what} does not fit the network it describes: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)


def load_yolo(path: str | Path, image_size: int = 640, frozen: bool = True, **detector_kwargs: Any) -> YOLODetector:
    """A YOLO ``.pt`` checkpoint as a :class:`YOLODetector` (float32, eval mode; ``frozen``: no
    parameter gradients, as a teacher). Nothing of the file's code runs (see the module docstring)."""
    ck = read_yolo_checkpoint(path)
    model = YOLOModel(ck["cfg"], nc=ck["nc"])
    load_state_strict(model, ck["state_dict"], f"YOLO checkpoint {Path(path).name}")
    model.float()
    if ck["stride"] is not None and [round(s) for s in ck["stride"]] != [round(s) for s in model.strides]:
        raise DfkdError(f"YOLO checkpoint {Path(path).name} says strides {ck['stride']} but its architecture "
                        f"gives {model.strides}")
    names = ck["names"] if ck["names"] and len(ck["names"]) == model.num_classes else None
    det = YOLODetector(model, names, image_size=image_size, **detector_kwargs)
    det.eval()
    if frozen:
        det.requires_grad_(False)
    return det


def evaluate_yolo(detector: YOLODetector, dataset, batch_size: int = 8, device: torch.device | str = "cpu",
                  max_images: Optional[int] = None, progress: bool = False) -> dict[str, Any]:
    """COCO mAP (:func:`dfkd.eval.detection.evaluate_detector`) of ``detector`` at the mAP settings
    (:meth:`YOLODetector.for_map`) on a ``DetectionDataset`` whose contiguous labels are the
    detector's classes; adds ``seconds`` and ``images_per_second``."""
    import time

    from dfkd.eval.detection import evaluate_detector

    if dataset.num_classes != detector.num_classes:
        raise DfkdError(f"the detection set has {dataset.num_classes} classes but the YOLO model "
                        f"{detector.num_classes}")
    started = time.perf_counter()
    result = evaluate_detector(detector.for_map().to(device), dataset, batch_size=batch_size, device=device,
                               max_images=max_images, progress=progress)
    result["seconds"] = time.perf_counter() - started
    result["images_per_second"] = result["num_images"] / max(result["seconds"], 1e-9)
    return result
