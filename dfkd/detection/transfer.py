"""Detection transfer: a backbone that dfkd distilled for classification, under a detection head.

What ``dfkd-finetune-detection`` builds on (:mod:`dfkd.cli.finetune_detection`): where the backbone
comes from (:func:`resolve_source`), which detection backbone a classification model becomes
(:func:`map_backbone`), loading its weights with the adaptations a detector needs
(:func:`load_student_weights`: classifier dropped, a one-channel stem expanded to RGB with the BT.601
luma weights, a ViT's absolute position embedding resampled with timm's ``resample_abs_pos_embed``),
freezing (:func:`freeze`) and letterboxed training images cached as uint8 (:class:`LetterboxDataset`;
at evaluation the detector's own torchvision transform letterboxes and maps boxes back).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path
from typing import Optional

from dfkd.errors import DfkdError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
PAD_VALUE = 114 / 255  # letterbox fill (YOLO's gray)
MAX_FINEST_CELLS = 128  # default image size: the finest pyramid level gets at most 128x128 positions


class Source:
    """Where the backbone comes from: classification model name + kwargs, weights, normalisation."""

    def __init__(self, name: str, kwargs: dict, weights: Optional[Path], mean=None, std=None,
                 input_size=None, origin: str = ""):
        self.name, self.kwargs, self.weights = name, dict(kwargs), weights
        self.mean, self.std, self.input_size, self.origin = mean, std, input_size, origin


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DfkdError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise DfkdError(f"{path} is not a JSON object")
    return data



def resolve_source(backbone: str, backbone_name: Optional[str] = None,
                   backbone_kwargs: Optional[str | dict] = None) -> Source:
    """Where the backbone comes from: a dfkd run folder, a .safetensors file (+ .json sidecar), a bare
    checkpoint with ``backbone_name`` (+ ``backbone_kwargs``, a dict or JSON text), or ``"none"``."""
    kw_override: dict = {}
    if isinstance(backbone_kwargs, dict):
        kw_override = dict(backbone_kwargs)
    elif backbone_kwargs is not None:
        try:
            kw_override = json.loads(backbone_kwargs)
        except ValueError as e:
            raise DfkdError(f"--backbone-kwargs (backbone_kwargs) is not valid JSON: {e}") from None
        if not isinstance(kw_override, dict):
            raise DfkdError("--backbone-kwargs (backbone_kwargs) must be a JSON object, e.g. '{\"width\": 16}'")
    if backbone.strip().lower() == "none":
        if not backbone_name:
            raise DfkdError("--backbone none (train from scratch) needs --backbone-name NAME (backbone_name)")
        return Source(backbone_name, kw_override, None, origin="none (from scratch)")
    path = Path(backbone).expanduser()
    if not path.exists():
        raise DfkdError(f"backbone not found: {path}")
    if path.is_dir():
        weights, meta = path / "student.safetensors", path / "student.json"
        if not weights.is_file():
            raise DfkdError(f"{path} is a folder without student.safetensors (expected a dfkd run folder)")
        origin = "dfkd run folder"
    else:
        weights, meta = path, path.with_suffix(".json")
        origin = "checkpoint"
    build: dict = {}
    if meta.is_file():
        build = _read_json(meta)
        if build.get("kind") == "detector":
            raise DfkdError(f"{weights} is a detector checkpoint, not a classification backbone")
        origin += f" with {meta.name}"
    name = backbone_name or build.get("model")
    if not name:
        raise DfkdError(f"{weights} has no {meta.name} beside it (or it names no model): "
                         "pass --backbone-name NAME [--backbone-kwargs JSON] (backbone_name, backbone_kwargs)")
    same_model = not backbone_name or backbone_name == build.get("model")
    kwargs = dict(build.get("kwargs") or {}) if same_model else {}  # another model: the sidecar's kwargs don't apply
    kwargs.update(kw_override)
    return Source(str(name), kwargs, weights, build.get("mean"), build.get("std"), build.get("input_size"), origin)



class BackboneSpec:
    """How a classification model becomes a detection backbone."""

    def __init__(self, detector_backbone: str, width: int = 16, backbone_kwargs: Optional[dict] = None,
                 in_chans: int = 3, divisor: int = 4, vit_grid: Optional[tuple[int, int]] = None,
                 finest_stride: int = 1):
        self.detector_backbone, self.width = detector_backbone, int(width)
        self.finest_stride = int(finest_stride)
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.in_chans, self.divisor, self.vit_grid = int(in_chans), int(divisor), vit_grid


def _default(cls, name: str, fallback):
    try:
        p = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def map_backbone(name: str, kwargs: dict) -> BackboneSpec:
    from dfkd.detection.models import BACKBONES, _is_timm_vit
    from dfkd.errors import close_matches
    from dfkd.models import MODELS, build_model
    from dfkd.models.cnn import SmallCNN
    from dfkd.models.resnet_cifar import ResNetCifar

    depths = sorted(int(m.group(1)) for b in BACKBONES if (m := re.fullmatch(r"resnet(\d+)_cifar", b)))
    supported = (f"small_cnn, resnet{{{','.join(map(str, depths))}}}_cifar and timm ViTs (vit_*, deit_*)")
    if name == "small_cnn":
        unknown_kw = sorted(set(kwargs) - {"num_classes", "in_chans", "width"})
        if unknown_kw:
            raise DfkdError(f"small_cnn takes no argument(s) {', '.join(unknown_kw)}")
        width = int(kwargs.get("width", _default(SmallCNN, "width", 32)))
        in_chans = int(kwargs.get("in_chans", _default(SmallCNN, "in_chans", 1)))
        return BackboneSpec("small_cnn_cls", width=width, in_chans=in_chans, divisor=4)
    m = re.fullmatch(r"resnet(\d+)_cifar", name)
    if m and name in MODELS and getattr(MODELS.get(name), "func", None) is ResNetCifar:
        extra = sorted(set(kwargs) - {"num_classes", "in_chans", "depth"})
        if extra:
            raise DfkdError(f"{name} takes no argument(s) {', '.join(extra)}")
        depth = int(kwargs.get("depth", int(m.group(1))))
        det = f"resnet{depth}_cifar"
        if det not in BACKBONES:
            raise DfkdError(f"no detection backbone for a depth-{depth} CIFAR ResNet; supported: {supported}")
        return BackboneSpec(det, in_chans=int(kwargs.get("in_chans", 3)), divisor=4)
    if _is_timm_vit(name):
        try:
            model = build_model(name, **kwargs)
        except DfkdError:
            raise
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise DfkdError(f"cannot build ViT {name!r} with {kwargs}: {e}") from None
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(model, "num_prefix_tokens"):
            raise DfkdError(f"{name!r} is not a plain ViT (no patch_embed / num_prefix_tokens)")
        ph, pw = (int(v) for v in pe.patch_size)
        if ph != pw:
            raise DfkdError(f"ViT {name!r} has non-square patches {ph}x{pw}; the detection backbone needs square ones")
        grid = tuple(int(g) for g in pe.grid_size)
        in_chans = int(pe.proj.in_channels)
        bkw = {k: v for k, v in kwargs.items() if k not in ("img_size", "in_chans", "num_classes", "pretrained")}
        bkw["patch_size"] = ph
        strides = (4, 8, 16)  # ViTBody's default pyramid
        return BackboneSpec(name, backbone_kwargs=bkw, in_chans=in_chans,
                            divisor=math.lcm(max(strides), ph), vit_grid=grid, finest_stride=min(strides))
    if name in MODELS:
        raise DfkdError(f"no detection backbone for classification model {name!r}; supported: {supported}")
    import timm

    if timm.is_model(name):
        raise DfkdError(f"no detection backbone for timm model {name!r} (only ViTs); supported: {supported}")
    raise DfkdError(f"unknown classification model {name!r}{close_matches(name, list(MODELS))}; "
                     f"supported: {supported}")


def load_student_weights(body, path: Path, spec: BackboneSpec) -> list[str]:
    """Load the classification checkpoint into ``body``'s classification part; return notes on adaptations.

    Drops the classifier, expands a 1-channel stem to RGB (luma weights), resamples a ViT's
    position embedding to the detector's patch grid; anything else must fit exactly.
    """
    import torch

    from dfkd.detection.models import _CLASSIFIER_PREFIXES, ViTBody, load_fitting
    from dfkd.models.checkpoint import read_state_dict

    state = read_state_dict(path)
    target = body.classification_module()
    own = target.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_CLASSIFIER_PREFIXES)}
    notes: list[str] = []
    luma = torch.tensor(LUMA)
    for k, v in list(state.items()):
        o = own.get(k)
        if (o is not None and v.ndim == 4 and o.ndim == 4 and v.shape[1] == 1 and o.shape[1] == 3
                and v.shape[0] == o.shape[0] and v.shape[2:] == o.shape[2:]):
            state[k] = (v.float() * luma.view(1, 3, 1, 1)).to(o.dtype)
            notes.append(f"{k}: 1-channel stem expanded to RGB with luma weights {LUMA}")
    if isinstance(body, ViTBody) and "pos_embed" in state and "pos_embed" in own \
            and tuple(state["pos_embed"].shape) != tuple(own["pos_embed"].shape):
        from timm.layers import resample_abs_pos_embed

        pe = state["pos_embed"]
        npt = 0 if getattr(body.vit, "no_embed_class", False) else int(body.vit.num_prefix_tokens)
        n_old = pe.shape[1] - npt
        old = spec.vit_grid if spec.vit_grid and spec.vit_grid[0] * spec.vit_grid[1] == n_old else None
        if old is None:
            side = math.isqrt(max(n_old, 0))
            if side * side != n_old or pe.ndim != 3 or pe.shape[-1] != own["pos_embed"].shape[-1]:
                raise DfkdError(f"backbone checkpoint {path}: cannot resample pos_embed {tuple(pe.shape)} to "
                                 f"{tuple(own['pos_embed'].shape)} (not a square patch grid of this width)")
            old = (side, side)
        state["pos_embed"] = resample_abs_pos_embed(pe.float(), list(body.grid), list(old),
                                                    num_prefix_tokens=npt).to(own["pos_embed"].dtype)
        notes.append(f"pos_embed resampled from a {old[0]}x{old[1]} to a {body.grid[0]}x{body.grid[1]} patch grid")
    load_fitting(target, state, f"backbone checkpoint {path} does not fit backbone {spec.detector_backbone!r} "
                                "(check --backbone-name / --backbone-kwargs)")
    return notes


def freeze(module) -> None:
    """No gradients, and BatchNorm/dropout stay in eval mode whatever ``.train()`` the detector gets."""
    import types

    from torch import nn

    module.requires_grad_(False)
    module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
    module.eval()



# -- letterboxing ------------------------------------------------------------------------------
def letterbox(image, size: int):
    """(C, H, W) in [0, 1] → (C, size, size): longer side resized to ``size``, padded bottom/right.

    Returns the image and the (x, y) scale factors applied.
    """
    import torch
    import torch.nn.functional as F

    h, w = int(image.shape[-2]), int(image.shape[-1])
    if h == size and w == size:
        return image, (1.0, 1.0)
    s = size / max(h, w)
    nh, nw = max(1, min(size, round(h * s))), max(1, min(size, round(w * s)))
    x = image
    if (nh, nw) != (h, w):
        x = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=nh < h)[0].clamp_(0, 1)
    out = torch.full((image.shape[0], size, size), PAD_VALUE, dtype=torch.float32, device=image.device)
    out[:, :nh, :nw] = x
    return out, (nw / w, nh / h)


class LetterboxDataset:
    """``(image, target)`` of a DetectionDataset, letterboxed to ``size``; cached as uint8 when small."""

    def __init__(self, dataset, size: int, indices, cache_bytes: int = 512 * 2**20):
        self.dataset, self.size, self.indices = dataset, int(size), list(indices)
        self.cache = {} if len(self.indices) * 3 * size * size <= cache_bytes else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        if self.cache is not None and i in self.cache:
            img8, target = self.cache[i]
            return img8.float().div_(255.0), dict(target)
        image, t = self.dataset[self.indices[i]]
        x, (sx, sy) = letterbox(image, self.size)
        boxes = t["boxes"].clone()
        boxes[:, 0::2] *= sx
        boxes[:, 1::2] *= sy
        target = {"boxes": boxes, "labels": t["labels"], "image_id": t["image_id"]}
        if self.cache is not None:
            self.cache[i] = ((x * 255).round_().to(torch.uint8), target)
            x = self.cache[i][0].float().div_(255.0)
        return x, dict(target)
