"""What a teacher expects: input size, channels, class count, normalisation, resize rule, class names.

The teacher defines the task; a test set adapts to it, never the other way round. Each field comes,
in this order, from:

1. the config (``teacher.input_size``, ``teacher.mean``, ... — an override always wins);
2. the JSON dfkd writes beside every model it saves (``student.json``, a teacher's ``*.json``);
3. metadata inside the checkpoint (timm's training script stores its ``args``: ``input_size``,
   ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``num_classes``, ``model``);
4. the model itself: timm's ``pretrained_cfg`` corrected by what the built model really is (the
   patch embedding's image size, the first convolution's input channels, ``num_classes``), or a
   torchvision model's documented transforms;
5. for a model trained by dfkd on a built-in dataset, that dataset;

and a field that none of these gives is a one-line error naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from dfkd.errors import DfkdError

FIELDS = ("input_size", "num_classes", "mean", "std", "interpolation", "crop_pct", "class_names")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


@dataclass
class TeacherSpec:
    input_size: tuple[int, int, int]
    num_classes: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    class_names: Optional[list[str]] = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.input_size[0])

    def describe(self) -> str:
        c, h, w = self.input_size
        src = self.sources
        names = f", class names ({src.get('class_names')})" if self.class_names else ""
        return (f"teacher spec: input {c}x{h}x{w} ({src.get('input_size', '?')}), {self.num_classes} classes "
                f"({src.get('num_classes', '?')}), mean/std ({src.get('mean', '?')}), resize {self.interpolation} "
                f"crop {self.crop_pct:g}{names}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d.pop("sources")
        return d

    def eval_transform(self):
        """PIL image → [0, 1] tensor the way timm evaluates: resize to size / crop_pct, centre crop.

        Normalisation stays inside the model wrappers, so the tensor is plain pixels."""
        from torchvision import transforms as T

        c, h, w = self.input_size
        interp = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
                  "bicubic": T.InterpolationMode.BICUBIC, "area": T.InterpolationMode.BILINEAR}[self.interpolation]
        if h == w:
            scale: Any = int(math.floor(h / self.crop_pct))
        else:
            scale = (int(math.floor(h / self.crop_pct)), int(math.floor(w / self.crop_pct)))
        mode = "L" if c == 1 else "RGB"
        return T.Compose([T.Lambda(lambda im: im.convert(mode)), T.Resize(scale, interpolation=interp),
                          T.CenterCrop((h, w)), T.ToTensor()])

    def adapt_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of [0, 1] images (N, C, H, W) of any size and channel count → the teacher's input."""
        c, h, w = self.input_size
        if x.shape[1] != c:
            if x.shape[1] == 3 and c == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(
                    1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            else:
                raise DfkdError(f"test images have {x.shape[1]} channels, the teacher takes {c}")
        if tuple(x.shape[-2:]) != (h, w):
            sh, sw = x.shape[-2:]
            scale = min(sh, sw) * self.crop_pct / min(h, w)
            rh, rw = max(h, round(sh / scale)), max(w, round(sw / scale))
            mode = "bilinear" if self.interpolation in ("nearest", "area") else self.interpolation
            x = torch.nn.functional.interpolate(x, size=(rh, rw), mode=mode, antialias=True,
                                                align_corners=False).clamp(0, 1)
            top, left = (rh - h) // 2, (rw - w) // 2
            x = x[..., top:top + h, left:left + w]
        return x.contiguous()


def _listify(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    return v


def json_beside(checkpoint: str | Path | None) -> dict[str, Any]:
    """The JSON dfkd writes next to a model file (``x.safetensors`` → ``x.json``), or ``{}``."""
    if not checkpoint:
        return {}
    p = Path(checkpoint).expanduser()
    cand = p.with_suffix(".json")
    if cand.is_file() and cand != p:
        try:
            return json.loads(cand.read_text())
        except json.JSONDecodeError as e:
            raise DfkdError(f"cannot read {cand}: {e}") from None
    return {}


def from_checkpoint_args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec fields a timm training checkpoint's ``args`` holds."""
    if not args:
        return {}
    out: dict[str, Any] = {}
    if args.get("input_size"):
        out["input_size"] = list(args["input_size"])
    elif args.get("img_size"):
        s = args["img_size"]
        s = [s, s] if isinstance(s, int) else list(s)
        out["input_size"] = [int(args.get("in_chans") or 3), *s]
    for k in ("mean", "std"):
        if args.get(k):
            out[k] = list(args[k])
    if args.get("interpolation"):
        out["interpolation"] = str(args["interpolation"])
    if args.get("crop_pct"):
        out["crop_pct"] = float(args["crop_pct"])
    if args.get("num_classes"):
        out["num_classes"] = int(args["num_classes"])
    return out


def first_conv_in_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m.in_channels if isinstance(m, nn.Conv2d) else None
    return None


def from_model(model: nn.Module) -> tuple[dict[str, Any], str]:
    """What the built model says about itself: timm's pretrained_cfg corrected by the real
    architecture, or a torchvision model's weights documentation."""
    out: dict[str, Any] = {}
    source = "model"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if cfg:
        source = "timm pretrained_cfg"
        for k in ("mean", "std", "interpolation", "crop_pct"):
            if cfg.get(k) is not None:
                out[k] = _listify(cfg[k])
        if cfg.get("input_size"):
            out["input_size"] = list(cfg["input_size"])
    tv = getattr(model, "_dfkd_torchvision", None)
    if tv:
        out.update(tv)
        source = "torchvision weights documentation"
    # the architecture as built beats the library's defaults (img_size=32, in_chans=1, ...)
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None) if pe is not None else None
    chans = first_conv_in_channels(model)
    if img is not None or chans is not None:
        size = list(out.get("input_size") or [3, None, None])
        if chans is not None:
            size[0] = int(chans)
        if img is not None:
            size[1:] = [int(img[0]), int(img[1])] if isinstance(img, (tuple, list)) else [int(img), int(img)]
        if all(s is not None for s in size):
            out["input_size"] = size
    c = (out.get("input_size") or [None])[0]
    for k in ("mean", "std"):
        if k in out and c and len(out[k]) != c:
            out[k] = [float(sum(out[k]) / len(out[k]))] * c  # e.g. a 1-channel timm model: the channel mean
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        out["num_classes"] = n
    return out, source


def resolve_spec(layers: Sequence[tuple[str, Mapping[str, Any]]]) -> TeacherSpec:
    """Take each field from the first layer that has it (``layers`` in priority order)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        for k in FIELDS:
            v = layer.get(k) if layer else None
            if v is not None and k not in values:
                values[k], sources[k] = _listify(v), name
    missing = [k for k in ("input_size", "num_classes", "mean", "std") if k not in values]
    if missing:
        raise DfkdError(f"the teacher's {', '.join(missing)} could not be found (not in the config, the checkpoint's "
                        f"JSON or metadata, or the model): set teacher.{missing[0]}=...")
    size = [int(s) for s in values["input_size"]]
    if len(size) == 2:
        size = [3, *size]
    if len(size) != 3 or min(size) <= 0:
        raise DfkdError(f"teacher.input_size must be [C, H, W] with positive sides, got {values['input_size']}")
    c = size[0]
    mean, std = [float(v) for v in values["mean"]], [float(v) for v in values["std"]]
    if len(mean) == 1 and c > 1:
        mean = mean * c
    if len(std) == 1 and c > 1:
        std = std * c
    if len(mean) != c or len(std) != c:
        raise DfkdError(f"teacher mean/std need {c} values for {c} input channels, got {len(mean)}/{len(std)}")
    if any(s <= 0 for s in std):
        raise DfkdError(f"teacher.std must be positive, got {std}")
    interp = str(values.get("interpolation", "bilinear"))
    if interp not in _INTERPOLATIONS:
        raise DfkdError(f"teacher.interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interp!r}")
    crop = float(values.get("crop_pct", 1.0))
    if not 0 < crop <= 1:
        raise DfkdError(f"teacher.crop_pct must be in (0, 1], got {crop}")
    names = values.get("class_names")
    n = int(values["num_classes"])
    if names is not None:
        names = [str(x) for x in names]
        if len(names) != n:
            raise DfkdError(f"the teacher has {n} classes but {len(names)} class names ({sources['class_names']})")
    return TeacherSpec(tuple(size), n, mean, std, interp, crop, names, sources)


def check_output_size(model: nn.Module, spec: TeacherSpec, device: torch.device | str = "cpu") -> None:
    """A dry forward pass: the model must take the spec's input and give ``num_classes`` outputs."""
    x = torch.rand(2, *spec.input_size, generator=torch.Generator().manual_seed(0)).to(device)  # not the run's RNG
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - a user's model can raise anything here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DfkdError(f"the teacher does not take {tuple(spec.input_size)} images: {first}") from None
    finally:
        model.train(was)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DfkdError(f"the teacher must return (batch, classes) logits, got {type(out).__name__} "
                        f"{tuple(getattr(out, 'shape', ()))}")
    if out.shape[1] != spec.num_classes:
        raise DfkdError(f"the teacher outputs {out.shape[1]} values per image but its spec says {spec.num_classes} "
                        f"classes ({spec.sources.get('num_classes')}); set teacher.num_classes={out.shape[1]} "
                        "or fix the checkpoint's JSON")
