#!/usr/bin/env python
"""Fine-tune a detector on a backbone that dfkd distilled for classification.

Takes the student of a dfkd run (or any classification checkpoint of a model dfkd can build),
puts its feature extractor under a torchvision FCOS or RetinaNet (dfkd.detection.models), trains
on a COCO- or YOLO-format set and scores it like every dfkd detector: COCO mAP@[.5:.95], mAP@.5,
mAP@.75 and per-class AP (pycocotools).

    python scripts/finetune_detection.py --backbone runs/digits/RUN --train canvases/train --val canvases/test
    python scripts/finetune_detection.py --backbone student.safetensors --train coco128 --image-size 320
    python scripts/finetune_detection.py --backbone r20.th --backbone-name resnet20_cifar --train DATA
    python scripts/finetune_detection.py --backbone none --backbone-name small_cnn --train DATA   # from scratch

--backbone takes a dfkd run folder (student.safetensors + student.json), a .safetensors file
with its .json sidecar (as dfkd's save_model writes them), a bare checkpoint together with
--backbone-name NAME [--backbone-kwargs JSON], or `none` with --backbone-name (a from-scratch
baseline with the same architecture).

Backbones. Classification models map to detection backbones as follows: `small_cnn` to
`small_cnn_cls` (the classifier's own layers at strides 1/2, plus one new stride-4 stage),
`resnet{8,14,20,32,44,56,110}_cifar` to the same CIFAR ResNet (layer1/2/3), and timm ViTs
(`vit_*`, `deit_*`, with their keyword arguments, e.g. patch_size/embed_dim/depth/num_heads) to
the ViT backbone with a ViTDet-style simple pyramid. The classifier head is dropped; every other
weight must fit (one-line error otherwise). With --freeze-backbone exactly the weights taken from
the checkpoint are frozen (their BatchNorm statistics too); the pyramid, neck and head train.

Channels. Detection images are read as RGB. A single-channel (grayscale) student, such as the
digits students, becomes a 3-channel detector: its first layer's weights are multiplied by the
BT.601 luma weights (0.299, 0.587, 0.114) and its one-channel mean/std repeated, so at the start
the detector computes exactly what the student computes on the grayscale image, and the saved
detector takes ordinary RGB images. Fine-tuning may then learn to use colour.

Image size. Every image is letterboxed (resized so its longer side is --image-size, padded
bottom/right to a square) for training and for evaluation; predicted boxes are mapped back to the
original image, so the score is against the original annotations. Default size: the longest image
side in the training set, rounded up to a multiple of the backbone's coarsest stride (and the ViT
patch size) -- for a canvas set made at the student's input size, that input size -- but at most
128x the finest pyramid stride (128 px for the stride-1 CIFAR-style backbones, 512 px for a ViT):
a stride-1 level on 640-px images needs tens of GB. A ViT trained at another size (e.g. 8x8
digits) gets its absolute position embedding resampled to the new patch grid (timm's
resample_abs_pos_embed, bicubic); its patch size stays what it was, so small objects span few
patches.

Writes to --out: detector.safetensors + detector.json (dfkd.detection.models.load_detector reads
them), metrics.json (evaluation, hardware, wall time, the exact command), history.jsonl (training
losses). Ctrl-C saves the detector trained so far (metrics.json says "interrupted") and exits 130;
there is no resume: run the command again to start over. Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "finetune_detection"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
PAD_VALUE = 114 / 255  # letterbox fill (YOLO's gray)
MAX_FINEST_CELLS = 128  # default image size: the finest pyramid level gets at most 128x128 positions


class UsageError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message: keep it to one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--backbone", required=True, metavar="PATH|none",
      help="dfkd run folder, .safetensors (+ .json sidecar), bare checkpoint (+ --backbone-name), or none")
    a("--backbone-name", default=None, metavar="NAME",
      help="classification model name (small_cnn, resnet20_cifar, a timm ViT, ...); overrides the sidecar's")
    a("--backbone-kwargs", default=None, metavar="JSON",
      help='its build arguments as a JSON object, e.g. \'{"width": 16}\' (merged over the sidecar\'s)')
    a("--train", required=True, metavar="DATA", help="training set: COCO json, folder holding one, or YOLO folder")
    a("--val", default=None, metavar="DATA", help="evaluation set (default: the training set; not a held-out score)")
    a("--split", default=None, help="YOLO split / COCO json name part of --train (and --val unless --val-split)")
    a("--val-split", default=None, help="split of --val (default: --split)")
    a("--arch", choices=["fcos", "retinanet"], default="fcos")
    a("--image-size", type=int, default=None,
      help="square letterbox side in px (default: largest train image side, rounded up to the coarsest stride, "
           "at most 128x the finest stride)")
    a("--epochs", type=int, default=12, help="passes over the training set (default 12)")
    a("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3, help="AdamW learning rate (warm-up, then cosine)")
    a("--weight-decay", type=float, default=1e-4)
    a("--fpn-channels", type=int, default=32, help="channels of the pyramid and heads")
    a("--freeze-backbone", action="store_true",
      help="train only the pyramid/neck and head (the checkpoint's weights and BatchNorm statistics stay fixed)")
    a("--mean", type=float, nargs="+", default=None,
      help="input normalisation (default: the sidecar's, else ImageNet's)")
    a("--std", type=float, nargs="+", default=None)
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--threads", type=int, default=None, help="CPU threads for torch")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=None, help="output folder (default runs/finetune_detection/<date_time>)")
    a("--max-images", type=int, default=None, metavar="N", help="use only the first N train (and val) images")
    a("--log-every", type=int, default=10, help="steps per history.jsonl line")
    a("--no-progress", action="store_true", help="no progress bars")
    return ap


# -- the backbone ------------------------------------------------------------------------------
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
        raise UsageError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def resolve_source(args) -> Source:
    kw_override: dict = {}
    if args.backbone_kwargs is not None:
        try:
            kw_override = json.loads(args.backbone_kwargs)
        except ValueError as e:
            raise UsageError(f"--backbone-kwargs is not valid JSON: {e}") from None
        if not isinstance(kw_override, dict):
            raise UsageError("--backbone-kwargs must be a JSON object, e.g. '{\"width\": 16}'")
    if args.backbone.strip().lower() == "none":
        if not args.backbone_name:
            raise UsageError("--backbone none (train from scratch) needs --backbone-name NAME")
        return Source(args.backbone_name, kw_override, None, origin="none (from scratch)")
    path = Path(args.backbone).expanduser()
    if not path.exists():
        raise UsageError(f"backbone not found: {path}")
    if path.is_dir():
        weights, meta = path / "student.safetensors", path / "student.json"
        if not weights.is_file():
            raise UsageError(f"{path} is a folder without student.safetensors (expected a dfkd run folder)")
        origin = "dfkd run folder"
    else:
        weights, meta = path, path.with_suffix(".json")
        origin = "checkpoint"
    build: dict = {}
    if meta.is_file():
        build = _read_json(meta)
        if build.get("kind") == "detector":
            raise UsageError(f"{weights} is a detector checkpoint, not a classification backbone")
        origin += f" with {meta.name}"
    name = args.backbone_name or build.get("model")
    if not name:
        raise UsageError(f"{weights} has no {meta.name} beside it (or it names no model): "
                         "pass --backbone-name NAME [--backbone-kwargs JSON]")
    same_model = not args.backbone_name or args.backbone_name == build.get("model")
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
    from dfkd.errors import DfkdError, close_matches
    from dfkd.models import MODELS, build_model
    from dfkd.models.cnn import SmallCNN
    from dfkd.models.resnet_cifar import ResNetCifar

    depths = sorted(int(m.group(1)) for b in BACKBONES if (m := re.fullmatch(r"resnet(\d+)_cifar", b)))
    supported = (f"small_cnn, resnet{{{','.join(map(str, depths))}}}_cifar and timm ViTs (vit_*, deit_*)")
    if name == "small_cnn":
        unknown_kw = sorted(set(kwargs) - {"num_classes", "in_chans", "width"})
        if unknown_kw:
            raise UsageError(f"small_cnn takes no argument(s) {', '.join(unknown_kw)}")
        width = int(kwargs.get("width", _default(SmallCNN, "width", 32)))
        in_chans = int(kwargs.get("in_chans", _default(SmallCNN, "in_chans", 1)))
        return BackboneSpec("small_cnn_cls", width=width, in_chans=in_chans, divisor=4)
    m = re.fullmatch(r"resnet(\d+)_cifar", name)
    if m and name in MODELS and getattr(MODELS.get(name), "func", None) is ResNetCifar:
        extra = sorted(set(kwargs) - {"num_classes", "in_chans", "depth"})
        if extra:
            raise UsageError(f"{name} takes no argument(s) {', '.join(extra)}")
        depth = int(kwargs.get("depth", int(m.group(1))))
        det = f"resnet{depth}_cifar"
        if det not in BACKBONES:
            raise UsageError(f"no detection backbone for a depth-{depth} CIFAR ResNet; supported: {supported}")
        return BackboneSpec(det, in_chans=int(kwargs.get("in_chans", 3)), divisor=4)
    if _is_timm_vit(name):
        try:
            model = build_model(name, **kwargs)
        except DfkdError as e:
            raise UsageError(str(e)) from None
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise UsageError(f"cannot build ViT {name!r} with {kwargs}: {e}") from None
        pe = getattr(model, "patch_embed", None)
        if pe is None or not hasattr(model, "num_prefix_tokens"):
            raise UsageError(f"{name!r} is not a plain ViT (no patch_embed / num_prefix_tokens)")
        ph, pw = (int(v) for v in pe.patch_size)
        if ph != pw:
            raise UsageError(f"ViT {name!r} has non-square patches {ph}x{pw}; the detection backbone needs square ones")
        grid = tuple(int(g) for g in pe.grid_size)
        in_chans = int(pe.proj.in_channels)
        bkw = {k: v for k, v in kwargs.items() if k not in ("img_size", "in_chans", "num_classes", "pretrained")}
        bkw["patch_size"] = ph
        strides = (4, 8, 16)  # ViTBody's default pyramid
        return BackboneSpec(name, backbone_kwargs=bkw, in_chans=in_chans,
                            divisor=math.lcm(max(strides), ph), vit_grid=grid, finest_stride=min(strides))
    if name in MODELS:
        raise UsageError(f"no detection backbone for classification model {name!r}; supported: {supported}")
    import timm

    if timm.is_model(name):
        raise UsageError(f"no detection backbone for timm model {name!r} (only ViTs); supported: {supported}")
    raise UsageError(f"unknown classification model {name!r}{close_matches(name, list(MODELS))}; "
                     f"supported: {supported}")


def load_student_weights(body, path: Path, spec: BackboneSpec) -> list[str]:
    """Load the classification checkpoint into ``body``'s classification part; return notes on adaptations.

    Drops the classifier, expands a 1-channel stem to RGB (luma weights), resamples a ViT's
    position embedding to the detector's patch grid; anything else must fit exactly.
    """
    import torch

    from dfkd.detection.models import _CLASSIFIER_PREFIXES, ViTBody
    from dfkd.errors import DfkdError
    from dfkd.models.checkpoint import read_state_dict

    try:
        state = read_state_dict(path)
    except DfkdError as e:
        raise UsageError(str(e)) from None
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
                raise UsageError(f"backbone checkpoint {path}: cannot resample pos_embed {tuple(pe.shape)} to "
                                 f"{tuple(own['pos_embed'].shape)} (not a square patch grid of this width)")
            old = (side, side)
        state["pos_embed"] = resample_abs_pos_embed(pe.float(), list(body.grid), list(old),
                                                    num_prefix_tokens=npt).to(own["pos_embed"].dtype)
        notes.append(f"pos_embed resampled from a {old[0]}x{old[1]} to a {body.grid[0]}x{body.grid[1]} patch grid")
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} "
                         f"vs backbone {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UsageError(f"backbone checkpoint {path} does not fit backbone {spec.detector_backbone!r}: "
                         f"{'; '.join(parts)} (check --backbone-name / --backbone-kwargs)")
    target.load_state_dict(state, strict=True)
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


def letterboxed(detector, size: int):
    """A module calling ``detector`` on letterboxed images and returning boxes in original pixels."""
    import torch
    from torch import nn

    class Letterboxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.detector = detector

        def forward(self, images):
            xs, scales, sizes = [], [], []
            for im in images:
                x, s = letterbox(im, size)
                xs.append(x)
                scales.append(s)
                sizes.append((im.shape[-1], im.shape[-2]))
            outs = self.detector(xs)
            for o, (sx, sy), (w, h) in zip(outs, scales, sizes):
                if (sx, sy) != (1.0, 1.0):
                    b = o["boxes"] / torch.tensor([sx, sy, sx, sy], device=o["boxes"].device)
                    b[:, 0::2] = b[:, 0::2].clamp(0, w)
                    b[:, 1::2] = b[:, 1::2].clamp(0, h)
                    o["boxes"] = b
            return outs

    return Letterboxed()


# -- the run -----------------------------------------------------------------------------------
class History:
    """Collects train_detector's per-step losses; writes their mean every ``every`` steps."""

    def __init__(self, path: Path, every: int, batch_size: int, total: int):
        self.path, self.every, self.batch_size, self.total = path, max(1, int(every)), batch_size, total
        self.step, self.sums, self.n = 0, {}, 0
        self.start = time.perf_counter()
        self.last: dict = {}
        path.write_text("")

    def __call__(self, record: dict) -> None:
        self.step = int(record["step"])
        self.lr = float(record.get("lr", 0.0))
        for k, v in record.items():
            if k not in ("step", "lr"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        if self.step % self.every == 0 or self.step == self.total:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        wall = time.perf_counter() - self.start
        rec = {"step": self.step, "lr": self.lr, **{f"loss/{k}": v / self.n for k, v in self.sums.items()},
               "loss": sum(self.sums.values()) / self.n, "wall": round(wall, 3),
               "images_per_second": round(self.step * self.batch_size / max(wall, 1e-9), 2)}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.last, self.sums, self.n = rec, {}, 0


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _check_numbers(args) -> None:
    for flag, v, lo in (("--epochs", args.epochs, 1), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                        ("--image-size", args.image_size, 8), ("--max-images", args.max_images, 1),
                        ("--threads", args.threads, 1), ("--fpn-channels", args.fpn_channels, 4),
                        ("--log-every", args.log_every, 1)):
        if v is not None and v < lo:
            raise UsageError(f"{flag} must be at least {lo}, got {v}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if (args.mean is None) != (args.std is None):
        raise UsageError("give --mean and --std together")
    if args.std is not None and any(s <= 0 for s in args.std):
        raise UsageError("--std values must be positive")


def _norm(values, what: str) -> Optional[list[float]]:
    if values is None:
        return None
    v = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])]
    if len(v) == 1:
        return v * 3
    if len(v) == 3:
        return v
    raise UsageError(f"{what} needs 1 or 3 values, got {len(v)}")


def _script_name() -> str:
    """The script as it was invoked (its repository path when called as a function)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return arg0 if Path(arg0).name == Path(__file__).name else f"scripts/{Path(__file__).name}"


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def run(args, argv: list[str]) -> int:
    started = time.perf_counter()
    _check_numbers(args)
    source = resolve_source(args)
    spec = map_backbone(source.name, source.kwargs)
    if spec.in_chans not in (1, 3):
        raise UsageError(f"{source.name} takes {spec.in_chans} input channels; detection images are RGB "
                         "(1-channel and 3-channel backbones are supported)")

    import torch

    from dfkd.data.detection import load_detection
    from dfkd.detection.models import IMAGENET_MEAN, IMAGENET_STD, build_detector, save_detector
    from dfkd.errors import DfkdError
    from dfkd.models.checkpoint import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    try:
        train_set = load_detection(args.train, split=args.split)
        val_given = args.val is not None
        val_set = load_detection(args.val, split=args.val_split or args.split) if val_given else train_set
    except DfkdError as e:
        raise UsageError(str(e)) from None
    if val_set.classes != train_set.classes:
        raise UsageError(f"--val has other classes than --train ({val_set.num_classes} vs {train_set.num_classes}: "
                         f"{val_set.classes[:3]}... vs {train_set.classes[:3]}...)")
    n_train = len(train_set) if args.max_images is None else min(len(train_set), args.max_images)
    n_val = len(val_set) if args.max_images is None else min(len(val_set), args.max_images)

    # image size: the data's, rounded up to what the backbone needs
    if args.image_size is None:
        side = max(max(int(train_set.image_info(i)["width"]), int(train_set.image_info(i)["height"]))
                   for i in range(n_train))
        image_size = -(-side // spec.divisor) * spec.divisor
        how = f"largest train image side {side} px" + (f", rounded up to a multiple of {spec.divisor}"
                                                      if image_size != side else "")
        cap = MAX_FINEST_CELLS * spec.finest_stride
        if image_size > cap:
            image_size = max(spec.divisor, cap // spec.divisor * spec.divisor)
            how += (f", capped at {image_size} so the stride-{spec.finest_stride} level has at most "
                    f"{MAX_FINEST_CELLS}x{MAX_FINEST_CELLS} positions; --image-size overrides")
    else:
        image_size = int(args.image_size)
        if image_size % spec.divisor:
            raise UsageError(f"--image-size {image_size} must be a multiple of {spec.divisor} (the backbone's "
                             f"coarsest stride{' and ViT patch size' if spec.vit_grid else ''})")
        how = "--image-size"

    # normalisation: --mean/--std, else the student's, else ImageNet's
    mean = _norm(args.mean, "--mean") or _norm(source.mean, "the sidecar's mean") or list(IMAGENET_MEAN)
    std = _norm(args.std, "--std") or _norm(source.std, "the sidecar's std") or list(IMAGENET_STD)

    if args.freeze_backbone and source.weights is None:
        raise UsageError("--freeze-backbone needs backbone weights (with --backbone none nothing would train it)")

    torch.manual_seed(args.seed)
    try:
        detector = build_detector(args.arch, spec.detector_backbone, num_classes=train_set.num_classes,
                                  image_size=image_size, in_chans=3, width=spec.width,
                                  fpn_channels=args.fpn_channels, mean=mean, std=std,
                                  backbone_kwargs=spec.backbone_kwargs, score_thresh=0.05,
                                  detections_per_img=100, topk_candidates=1000)
    except DfkdError as e:
        raise UsageError(str(e)) from None
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f"cannot build the detector on {spec.detector_backbone!r}: {e}") from None
    body = detector.backbone.body
    notes: list[str] = []
    if source.weights is not None:
        notes = load_student_weights(body, source.weights, spec)
    if spec.in_chans == 1 and source.weights is None:
        notes.append("1-channel model built with 3 input channels for RGB images")
    if args.freeze_backbone:
        freeze(body.classification_module())
    n_params = sum(p.numel() for p in detector.parameters())
    n_train_params = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    # one dry forward pass, so shape problems are a clear error before training
    detector.eval()
    try:
        with torch.no_grad():
            detector([torch.zeros(3, image_size, image_size)])
    except RuntimeError as e:
        raise UsageError(f"the detector on {spec.detector_backbone!r} fails at image size {image_size}: "
                         f"{str(e).splitlines()[0]}") from None

    out = args.out or Path("runs") / "finetune_detection" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror or e}") from None

    train_data = LetterboxDataset(train_set, image_size, range(n_train))
    # train_detector drops the last partial batch when there is more than one
    batches = len(train_data) // args.batch_size if len(train_data) > args.batch_size else 1
    steps = args.steps or args.epochs * batches
    print(f"backbone   {source.name} ({source.origin}) -> detection backbone {spec.detector_backbone}, "
          f"{'weights loaded' if source.weights else 'random init'}"
          f"{', frozen' if args.freeze_backbone else ''}")
    for n in notes:
        print(f"           {n}")
    print(f"detector   {args.arch}, {train_set.num_classes} classes, {image_size} px ({how}), "
          f"{n_params / 1e6:.2f} M parameters ({n_train_params / 1e6:.2f} M trained)")
    print(f"data       train {n_train} images ({train_set.name}); val {n_val} images"
          f"{'' if val_given else ' (= train)'}; {steps} steps of {args.batch_size}, device {device}")

    if not val_given:
        print(f"{PROG}: warning: no --val given: evaluating on the training images, which is not a held-out score",
              file=sys.stderr)
    history = History(out / "history.jsonl", args.log_every, args.batch_size, steps)
    build = dict(detector.dfkd_build)
    info: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["python", _script_name(), *argv]),
        "backbone": {"source": source.origin, "model": source.name, "kwargs": source.kwargs,
                     "detector_backbone": spec.detector_backbone, "weights_loaded": source.weights is not None,
                     "frozen": bool(args.freeze_backbone), "adaptations": notes},
        "detector": build,
        "data": {"train": str(args.train), "val": str(args.val) if val_given else None, "val_is_train": not val_given,
                 "train_images": n_train, "val_images": n_val, "classes": train_set.classes,
                 "image_size": image_size},
        "train": {"steps_planned": steps, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "seed": args.seed, "parameters": n_params,
                  "trained_parameters": n_train_params},
        "device": str(device),
    }

    def write_metrics(extra: dict) -> None:
        from dfkd.pipeline import hardware

        atomic_write_json(out / "metrics.json", {**extra, **info, "hardware": hardware(),
                                                 "wall_seconds": round(time.perf_counter() - started, 3)})

    from dfkd.detection.train import train_detector

    t0 = time.perf_counter()
    interrupted = None
    try:
        train_detector(detector, train_data, steps=steps, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay, device=device, seed=args.seed,
                       progress=not args.no_progress, log_fn=history, log_every=1, augment=True)
    except KeyboardInterrupt:
        interrupted = "training"
    train_seconds = time.perf_counter() - t0
    history.flush()
    detector.eval().cpu()
    save_detector(detector, out / "detector.safetensors")
    info["train"].update({"steps": history.step, "seconds": round(train_seconds, 3),
                          "images_per_second": round(history.step * args.batch_size / max(train_seconds, 1e-9), 2),
                          "final": history.last})
    if interrupted:
        write_metrics({"interrupted": interrupted})
        print(f"{PROG}: interrupted after {history.step}/{steps} steps; the detector so far is in {out} "
              "(no resume: run the command again to start over)", file=sys.stderr)
        return EXIT_INTERRUPTED

    detector.to(device)
    t1 = time.perf_counter()
    from dfkd.eval.detection import evaluate_detector

    try:
        result = evaluate_detector(letterboxed(detector, image_size), val_set, batch_size=args.batch_size,
                                   device=device, max_images=n_val, progress=not args.no_progress)
    except KeyboardInterrupt:
        write_metrics({"interrupted": "evaluation"})
        print(f"{PROG}: interrupted during evaluation; the trained detector is in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    eval_seconds = time.perf_counter() - t1
    result["images_per_second"] = round(n_val / max(eval_seconds, 1e-9), 2)
    write_metrics({"map": result["map"], "map50": result["map50"], "map75": result["map75"],
                   "per_class": result["per_class"], "interrupted": None,
                   "eval": {"num_images": result["num_images"], "num_detections": result["num_detections"],
                            "seconds": round(eval_seconds, 3), "images_per_second": result["images_per_second"]}})
    wall = time.perf_counter() - started
    rows = [("mAP@[.5:.95]", f"{result['map']:.4f}"), ("mAP@.5", f"{result['map50']:.4f}"
                                                         + ("" if val_given else "  (on train images)")),
            ("train images/s", f"{info['train']['images_per_second']:.1f}"),
            ("eval images/s", f"{result['images_per_second']:.1f}"),
            ("wall time", _fmt_time(wall)), ("output", str(out))]
    for k, v in rows:
        print(f"{k:<15}{v}")
    return 0


def script_main(prog: str, parser, run_fn, argv: Optional[list[str]], before: str) -> int:
    """Parse ``argv`` and call ``run_fn(args, argv)``; a user error is one line on stderr and exit 2,
    Ctrl-C before ``run_fn`` handles it exits 130 (``before`` says what had not started)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return run_fn(args, argv)
    except Exception as e:  # noqa: BLE001 - only user errors are caught here, the rest re-raised
        from dfkd.errors import DfkdError

        if not isinstance(e, (UsageError, DfkdError)):
            raise
        from dfkd.cli.common import one_line

        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before {before} started; nothing saved", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Optional[list[str]] = None) -> int:
    return script_main(PROG, build_parser(), run, argv, "training")

if __name__ == "__main__":
    sys.exit(main())
