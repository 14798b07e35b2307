"""Small torchvision detectors for 32–128 px canvases, and the frozen detection teacher.

``build_detector(backbone="small_cnn", num_classes=3, image_size=32)`` returns a torchvision
FCOS (or RetinaNet, ``arch="retinanet"``) that takes a list of [0, 1] images and normalises
them itself. Nothing is ever resized (``min_size = max_size = image_size``) and no weights are
downloaded (``weights=None`` everywhere).

Feature levels. Every backbone gives three levels whose strides double (small CNN and ViT:
4/8/16 px; CIFAR ResNets: their ``layer1/2/3`` at 1/2/4 px; ``small_cnn_cls``, the
classification small CNN: 1/2/4 px). What each level is responsible for
does not depend on the strides: the FCOS point sizes are fixed in pixels, ``(2, 4, 8) · u`` with
``u = max(1, round(image_size / 64))``, so the levels take objects whose largest point-to-edge
distance lies in ``(0, 16u)``, ``(16u, 32u)`` and ``(32u, ∞)`` px, and the centre-sampling
radius stays at 1.5 strides. RetinaNet anchors are ``4 · (2, 4, 8) · u · 2^{0, 1/3, 2/3}`` px
with aspect ratios 1:2, 1:1, 2:1.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from dfkd.errors import DfkdError, close_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("fcos", "retinanet")
_CLASSIFIER_PREFIXES = ("linear.", "head.", "fc.", "classifier.", "head_dist.")


# -- backbones -----------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNNBody(nn.Module):
    """A BatchNorm CNN: a stride-1 stem and four stride-2 stages; returns the last three (strides 4/8/16)."""

    strides = (4, 8, 16)

    def __init__(self, in_chans: int = 3, width: int = 16):
        super().__init__()
        w = int(width)
        self.stem = _conv_bn(in_chans, w)
        chans = (w, 2 * w, 4 * w, 4 * w)
        cin = w
        stages = []
        for c in chans:
            stages.append(nn.Sequential(_conv_bn(cin, c, 2), _conv_bn(c, c)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.out_channels_list = list(chans[1:])

    def classification_module(self) -> nn.Module:
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        outs = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                outs[str(i - 1)] = x
        return outs


class SmallCNNClassifierBody(nn.Module):
    """The classification ``small_cnn`` (``dfkd.models.cnn.SmallCNN``) as a pyramid, so its checkpoints load.

    Its ``features`` give stride 1 (after the first two blocks, ``width`` channels) and stride 2
    (after the pool and two more, ``2·width``); one new stride-2 conv-BN stage adds stride 4. The
    network sits in ``self.net`` without its pool and classifier, so a classification checkpoint
    (``features.*``, ``head.*``) loads into ``net`` with ``head`` ignored. (The detector's own
    ``small_cnn`` is a different, deeper layout.)
    """

    strides = (1, 2, 4)

    def __init__(self, in_chans: int = 3, width: int = 32):
        super().__init__()
        from dfkd.models.cnn import SmallCNN

        w = int(width)
        self.net = SmallCNN(num_classes=1, in_chans=in_chans, width=w)
        del self.net.head, self.net.pool
        self.extra = nn.Sequential(_conv_bn(2 * w, 2 * w, 2), _conv_bn(2 * w, 2 * w))
        self.out_channels_list = [w, 2 * w, 2 * w]

    def classification_module(self) -> nn.Module:
        return self.net

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        f = self.net.features
        c1 = f[1](f[0](x))
        c2 = f[4](f[3](f[2](c1)))
        return OrderedDict([("0", c1), ("1", c2), ("2", self.extra(c2))])


class ResNetCifarBody(nn.Module):
    """A CIFAR ResNet (``dfkd.models.resnet_cifar``) whose ``layer1/2/3`` (strides 1/2/4) form the pyramid.

    The network sits in ``self.net`` with its classifier removed, so a classification checkpoint
    (``conv1``, ``bn1``, ``layer*``, ``linear``) loads into ``net`` with ``linear`` ignored.
    """

    strides = (1, 2, 4)

    def __init__(self, depth: int = 20, in_chans: int = 3):
        super().__init__()
        from dfkd.models.resnet_cifar import ResNetCifar

        self.net = ResNetCifar(depth=depth, num_classes=1, in_chans=in_chans)
        del self.net.linear
        self.out_channels_list = [16, 32, 64]

    def classification_module(self) -> nn.Module:
        return self.net

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        n = self.net
        x = torch.relu(n.bn1(n.conv1(x)))
        c1 = n.layer1(x)
        c2 = n.layer2(c1)
        c3 = n.layer3(c2)
        return OrderedDict([("0", c1), ("1", c2), ("2", c3)])


class ViTBody(nn.Module):
    """A timm ViT with a ViTDet-style simple feature pyramid (Li et al. 2022).

    The last block's patch tokens become a 2-D map at stride ``patch_size``; each level of
    ``strides`` is made from that one map by 2× transposed convolutions (finer levels),
    the map itself, or max pooling (coarser levels), then a 1×1 and a 3×3 conv-BN to
    ``out_channels``. The BatchNorm layers of the neck give the DeepInversion prior something
    to match even though the transformer has none.
    """

    def __init__(self, name: str, image_size: int, out_channels: int, in_chans: int = 3,
                 strides: Sequence[int] = (4, 8, 16), **vit_kwargs: Any):
        super().__init__()
        import timm

        vit_kwargs.setdefault("patch_size", 4)
        vit_kwargs.pop("pretrained", None)
        vit_kwargs.pop("num_classes", None)
        try:
            self.vit = timm.create_model(name, pretrained=False, img_size=image_size, in_chans=in_chans,
                                         num_classes=0, **vit_kwargs)
        except TypeError as e:
            raise DfkdError(f"ViT backbone {name!r}: {e}") from None
        if not hasattr(self.vit, "patch_embed") or not hasattr(self.vit, "num_prefix_tokens"):
            raise DfkdError(f"backbone {name!r} is not a plain ViT (no patch_embed / num_prefix_tokens)")
        p = int(self.vit.patch_embed.patch_size[0])
        self.patch = p
        self.grid = tuple(int(g) for g in self.vit.patch_embed.grid_size)
        d = int(self.vit.embed_dim)
        self.strides = tuple(int(s) for s in strides)
        levels = []
        for s in self.strides:
            ops: list[nn.Module] = []
            dim = d
            if s < p:
                if p % s or (p // s) & (p // s - 1):
                    raise DfkdError(f"ViT backbone: stride {s} must be the patch size {p} divided by a power of two")
                for _ in range(int(math.log2(p // s))):
                    ops += [nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.BatchNorm2d(dim // 2), nn.GELU()]
                    dim //= 2
            elif s > p:
                if s % p:
                    raise DfkdError(f"ViT backbone: stride {s} must be a multiple of the patch size {p}")
                ops.append(nn.MaxPool2d(s // p))
            ops += [nn.Conv2d(dim, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)]
            levels.append(nn.Sequential(*ops))
        self.levels = nn.ModuleList(levels)
        self.out_channels = int(out_channels)

    def classification_module(self) -> nn.Module:
        return self.vit

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        fmap = tokens.transpose(1, 2).reshape(len(x), -1, h, w)
        return OrderedDict((str(i), lvl(fmap)) for i, lvl in enumerate(self.levels))


class PyramidBackbone(nn.Module):
    """``body`` (multi-scale features) followed by an FPN (or nothing, for the ViT's simple pyramid)."""

    def __init__(self, body: nn.Module, out_channels: int):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body = body
        self.fpn: Optional[nn.Module] = None
        if not isinstance(body, ViTBody):
            self.fpn = FeaturePyramidNetwork(list(body.out_channels_list), out_channels)
        self.out_channels = int(out_channels)
        self.strides = tuple(body.strides)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(feats) if self.fpn is not None else feats


#: backbone name -> builder(image_size, in_chans, width, fpn_channels, **kw) -> body
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda image_size, in_chans, width, fpn_channels, **kw: SmallCNNBody(in_chans, width, **kw),
    "small_cnn_cls": lambda image_size, in_chans, width, fpn_channels, **kw: SmallCNNClassifierBody(in_chans, width,
                                                                                                  **kw),
    **{
        f"resnet{d}_cifar": (lambda d: lambda image_size, in_chans, width, fpn_channels, **kw:
                             ResNetCifarBody(d, in_chans, **kw))(d)
        for d in (8, 14, 20, 32, 44, 56, 110)
    },
    "vit_tiny": lambda image_size, in_chans, width, fpn_channels, **kw: ViTBody(
        "vit_tiny_patch16_224", image_size, fpn_channels, in_chans,
        **{"embed_dim": 96, "depth": 4, "num_heads": 3, **kw}),
}


def backbone_names() -> list[str]:
    return sorted(BACKBONES)


def _is_timm_vit(name: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return False
    return timm.is_model(name) and name.split("_")[0] in ("vit", "deit", "deit3")


def build_backbone_body(backbone: str, image_size: int, in_chans: int = 3, width: int = 16,
                        fpn_channels: int = 32, **kwargs: Any) -> nn.Module:
    """The multi-scale feature extractor named ``backbone`` (a project name or any timm ViT)."""
    if backbone in BACKBONES:
        try:
            return BACKBONES[backbone](image_size=image_size, in_chans=in_chans, width=width,
                                       fpn_channels=fpn_channels, **kwargs)
        except TypeError as e:
            raise DfkdError(f"backbone {backbone!r}: {e}") from None
    if _is_timm_vit(backbone):
        return ViTBody(backbone, image_size, fpn_channels, in_chans, **kwargs)
    raise DfkdError(
        f"unknown detector backbone {backbone!r}{close_matches(backbone, BACKBONES)}; "
        f"known: {', '.join(backbone_names())} or any timm ViT name (vit_*, deit_*)"
    )


def load_backbone_weights(body: nn.Module, path: str | Path) -> None:
    """Load a classification checkpoint into ``body``, ignoring its classifier head.

    Takes every layout :func:`dfkd.models.checkpoint.read_state_dict` reads; keys of the
    classifier (``linear.``, ``head.``, ``fc.``, ...) that the body lacks are dropped, everything
    else must fit exactly (one-line :class:`DfkdError` otherwise).
    """
    from dfkd.models.checkpoint import read_state_dict

    target = body.classification_module() if hasattr(body, "classification_module") else body
    state = read_state_dict(path)
    own = target.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_CLASSIFIER_PREFIXES)}
    load_fitting(target, state, f"backbone checkpoint {path} does not fit the backbone")


def load_fitting(target: nn.Module, state: dict, what: str) -> None:
    """``target.load_state_dict(state, strict=True)`` after a check that says, in one line starting with
    ``what``, how many keys are missing, unexpected or of another shape (missing BatchNorm counters are kept)."""
    own = target.state_dict()
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
        raise DfkdError(f"{what}: {'; '.join(parts)}")
    target.load_state_dict(state, strict=True)


# -- detectors -----------------------------------------------------------------------------
def _canvas_transform(image_size: int, mean: Sequence[float], std: Sequence[float], size_divisible: int):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class CanvasTransform(GeneralizedRCNNTransform):
        """Normalises, letterboxes to the square canvas and batches; images already at the canvas size are
        not resized (and no RNG is used). Predicted boxes come back in the original image's pixels."""

        def resize(self, image, target=None):
            if max(image.shape[-2:]) == self.max_size:
                return image, target
            return super().resize(image, target)  # longer side to the canvas size (boxes mapped back later)

        def batch_images(self, images, size_divisible=32):
            # letterbox: pad bottom/right to the square canvas (ViT backbones need their patch grid)
            batch = super().batch_images(images, size_divisible)
            h, w = batch.shape[-2:]
            if h < self.max_size or w < self.max_size:
                batch = torch.nn.functional.pad(batch, (0, max(0, self.max_size - w), 0, max(0, self.max_size - h)))
            return batch

    return CanvasTransform(image_size, image_size, list(mean), list(std), size_divisible=size_divisible)


def _group_norm(channels: int) -> nn.Module:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return nn.GroupNorm(g, channels)
    return nn.GroupNorm(1, channels)


def _level_sizes(image_size: int) -> tuple[int, int, int]:
    u = max(1, round(image_size / 64))
    return (2 * u, 4 * u, 8 * u)


def build_detector(
    arch: str = "fcos",
    backbone: str = "small_cnn",
    num_classes: int = 3,
    image_size: int = 32,
    in_chans: int = 3,
    width: int = 16,
    fpn_channels: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    backbone_checkpoint: str | Path | None = None,
    head_convs: int = 2,
    score_thresh: float = 0.2,
    nms_thresh: float = 0.5,
    detections_per_img: int = 20,
    topk_candidates: int = 200,
    backbone_kwargs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """A torchvision FCOS/RetinaNet for square ``image_size`` canvases; takes a list of [0, 1] images.

    ``width`` sizes the small CNN (ignored by ResNets and ViTs), ``fpn_channels`` the pyramid and
    heads, ``head_convs`` the FCOS tower depth (RetinaNet always has 4), ``backbone_kwargs`` go to
    the backbone (e.g. ``embed_dim``/``depth``/``num_heads``/``patch_size`` for a ViT).
    ``backbone_checkpoint`` loads classification weights into the backbone (classifier ignored).
    The returned model carries ``dfkd_build`` (its JSON-able build arguments) for :func:`save_detector`.
    """
    if arch not in ARCHS:
        raise DfkdError(f"unknown detector arch {arch!r}{close_matches(arch, ARCHS)}; known: {', '.join(ARCHS)}")
    image_size, num_classes = int(image_size), int(num_classes)
    if num_classes < 1:
        raise DfkdError(f"a detector needs num_classes >= 1, got {num_classes}")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) == 1:
        mean, std = mean * in_chans, std * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise DfkdError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
    body = build_backbone_body(backbone, image_size, in_chans, width, fpn_channels, **dict(backbone_kwargs or {}))
    if backbone_checkpoint:
        load_backbone_weights(body, backbone_checkpoint)
    bb = PyramidBackbone(body, fpn_channels)
    strides = bb.strides
    if image_size % max(strides):
        raise DfkdError(f"image_size {image_size} must be a multiple of the coarsest stride {max(strides)}")
    sizes = _level_sizes(image_size)
    common = dict(min_size=image_size, max_size=image_size, image_mean=mean, image_std=std,
                  score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                  topk_candidates=topk_candidates)
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if arch == "fcos":
        from torchvision.models.detection.fcos import (FCOS, FCOSClassificationHead, FCOSHead,
                                                       FCOSRegressionHead)

        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))
        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, head_convs,
                                                          norm_layer=_group_norm)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, head_convs, norm_layer=_group_norm)
        model = FCOS(bb, num_classes, anchor_generator=anchors, head=head,
                     center_sampling_radius=1.5 * strides[0] / sizes[0], **common)
    else:
        from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

        scales = tuple(tuple(4 * s * 2 ** (i / 3) for i in range(3)) for s in sizes)
        anchors = AnchorGenerator(scales, ((0.5, 1.0, 2.0),) * len(sizes))
        head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=_group_norm)
        model = RetinaNet(bb, num_classes, anchor_generator=anchors, head=head, **common)
    model.transform = _canvas_transform(image_size, mean, std, size_divisible=max(strides))
    model.num_classes = num_classes
    model.image_size = image_size
    model.dfkd_build = {
        "arch": arch, "backbone": backbone, "num_classes": num_classes, "image_size": image_size,
        "in_chans": int(in_chans), "width": int(width), "fpn_channels": int(fpn_channels),
        "mean": mean, "std": std, "head_convs": int(head_convs), "score_thresh": float(score_thresh),
        "nms_thresh": float(nms_thresh), "detections_per_img": int(detections_per_img),
        "topk_candidates": int(topk_candidates), "backbone_kwargs": dict(backbone_kwargs or {}),
    }
    return model


def detector_metadata(model: nn.Module) -> dict[str, Any]:
    """The JSON-able arguments that rebuild ``model`` with :func:`build_detector` (``kind: detector``)."""
    build = getattr(model, "dfkd_build", None)
    if build is None and isinstance(getattr(model, "model", None), nn.Module):
        build = getattr(model.model, "dfkd_build", None)
    if build is None:
        raise DfkdError("this detector was not made by build_detector, so its build arguments are unknown; "
                        "pass build_kwargs to save_detector")
    return {"kind": "detector", **build}


def save_detector(model: nn.Module, path: str | Path, build_kwargs: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``path`` (safetensors) and ``path`` with ``.json`` (build arguments), both atomically."""
    from dfkd.models.checkpoint import save_model

    if isinstance(model, DetectionTeacher):
        model = model.model
    build = {"kind": "detector", **dict(build_kwargs)} if build_kwargs is not None else detector_metadata(model)
    save_model(model, path, build)


def load_detector(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild a detector from ``path`` and its JSON sidecar (``overrides`` replace build arguments)."""
    from dfkd.models.checkpoint import load_checkpoint_into

    path = Path(path).expanduser()
    meta = path.with_suffix(".json")
    if not path.is_file():
        raise DfkdError(f"detector checkpoint not found: {path}")
    if not meta.is_file():
        raise DfkdError(f"detector checkpoint {path} has no {meta.name} beside it (its build arguments)")
    try:
        build = json.loads(meta.read_text())
    except ValueError as e:
        raise DfkdError(f"cannot read {meta}: {e}") from None
    if build.pop("kind", "detector") != "detector":
        raise DfkdError(f"{meta} does not describe a detector")
    build.pop("backbone_checkpoint", None)
    build.update(overrides)
    if build.get("arch") == "yolo":  # a YOLO student dfkd saved (dfkd.detection.yolo_task)
        from dfkd.detection.yolo_task import build_yolo_task_detector

        model = build_yolo_task_detector(**build)
    elif build.get("arch") == "torchvision":  # a torchvision student dfkd saved (dfkd.detection.tv_detectors)
        from dfkd.detection.tv_detectors import build_tv_task_detector

        model = build_tv_task_detector(**build)
    elif build.get("arch") == "hf":  # a transformers student dfkd saved (dfkd.detection.hf_detectors)
        from dfkd.detection.hf_detectors import build_hf_detector

        model = build_hf_detector(**build)
    else:
        model = build_detector(**build)
    load_checkpoint_into(model, path)
    return model.eval()


# -- the frozen teacher --------------------------------------------------------------------
def _as_list(images) -> list[torch.Tensor]:
    return list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)


def head_outputs(model: nn.Module, images) -> dict[str, torch.Tensor]:
    """The raw head outputs of a torchvision one-stage detector (FCOS/RetinaNet) on ``images``.

    ``{"cls_logits": (B, locations, classes), "bbox_regression": (B, locations, 4)[, "bbox_ctrness"]}``,
    with gradients reaching the images; BatchNorm and dropout layers run in eval mode (the model's
    modes are restored), so a student's running statistics are not touched.
    """
    if hasattr(model, "head_dict"):  # a YOLO (dfkd.detection.yolo_task): its flat head view
        return model.head_dict(images)
    if not hasattr(model, "head") or not hasattr(model, "backbone"):
        raise DfkdError(f"{type(model).__name__} has no one-stage detection head (FCOS/RetinaNet)")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        batch, _ = model.transform(_as_list(images))
        features = model.backbone(batch.tensors)
        features = list(features.values()) if isinstance(features, dict) else [features]
        return model.head(features)
    finally:
        for m, mode in modes.items():
            m.training = mode


class DetectionTeacher(nn.Module):
    """A trained detector, frozen, for synthesis and distillation.

    ``teacher(images)`` gives the detector's predictions (eval mode; gradients are not
    blocked), ``teacher.loss(images, targets)`` its training losses with gradients reaching
    the images while every BatchNorm and dropout layer stays in eval mode, and
    ``teacher.statistics()`` a :class:`~dfkd.hooks.BatchNormPrior` on the backbone.
    ``images``: a (B, C, H, W) tensor or a list of (C, H, W) tensors in [0, 1].
    """

    def __init__(self, model: nn.Module, num_classes: Optional[int] = None, image_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes if num_classes is not None else model.num_classes)
        self.image_size = int(image_size if image_size is not None else model.image_size)
        in_chans = len(model.transform.image_mean)
        self.input_size = (in_chans, self.image_size, self.image_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DetectionTeacher":
        # A teacher stays in eval mode; loss() switches the detector to its loss branch itself.
        return super().train(False)

    def forward(self, images) -> list[dict[str, torch.Tensor]]:
        self.model.eval()
        return self.model(_as_list(images))

    def detect(self, images, score_thresh: Optional[float] = None) -> list[dict[str, torch.Tensor]]:
        """Predictions without gradients; ``score_thresh`` (if lower) also lowers the detector's own cut-off."""
        old = getattr(self.model, "score_thresh", None)
        try:
            if score_thresh is not None and old is not None:
                self.model.score_thresh = min(float(score_thresh), old)
            with torch.no_grad():
                out = self(images)
        finally:
            if old is not None:
                self.model.score_thresh = old
        if score_thresh is not None:
            out = [{k: v[d["scores"] >= score_thresh] for k, v in d.items()} for d in out]
        return out

    def loss(self, images, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The detector's training losses for ``targets`` (BatchNorm and dropout in eval mode)."""
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.train()
            for m in self.model.modules():
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
                    m.eval()
            return self.model(_as_list(images), [dict(t) for t in targets])
        finally:
            for m, mode in modes.items():
                m.training = mode

    @contextmanager
    def statistics(self, kind: str = "batchnorm", **kwargs: Any) -> Iterator:
        """A statistics prior (BatchNorm by default) hooked on the detector's backbone."""
        from dfkd.hooks import build_prior

        prior = build_prior(self.model.backbone, kind, **kwargs)
        with prior:
            yield prior

    def metadata(self) -> dict[str, Any]:
        return detector_metadata(self.model)


# -- shared by the foreign-detector adapters (YOLO, torchvision, Hugging Face) -------------------------

def square_teacher_kwargs(teacher_cfg: Mapping[str, Any], allowed: Sequence[str], family: str) -> dict[str, Any]:
    """``teacher.kwargs`` of a detector teacher that takes square RGB input, checked against ``allowed``;
    ``teacher.input_size=[3, S, S]`` is accepted for ``image_size`` (they must agree when both are given)."""
    kw = dict(teacher_cfg.get("kwargs") or {})
    for k in kw:
        if k not in allowed:
            raise DfkdError(f"unknown {family} setting teacher.kwargs.{k}{close_matches(k, allowed)}; "
                            f"its settings: {', '.join(allowed)}")
    size = teacher_cfg.get("input_size")
    if size is not None:
        size = [int(v) for v in size]
        if len(size) != 3 or size[0] != 3 or size[1] != size[2]:
            raise DfkdError(f"a {family} takes square RGB input: teacher.input_size=[3, S, S], got {size}")
        if kw.get("image_size") not in (None, size[1]):
            raise DfkdError(f"teacher.input_size {size} and teacher.kwargs.image_size {kw['image_size']} disagree")
        kw["image_size"] = size[1]
    return kw


def thaw_frozen_batchnorm(module: nn.Module) -> None:
    """Replace every frozen BatchNorm (torchvision's or Hugging Face's ``FrozenBatchNorm2d``) with an
    ``nn.BatchNorm2d`` of the same statistics in eval mode — the same computation, and the BatchNorm
    prior of box inversion sees it."""
    for name, child in module.named_children():
        if type(child).__name__.endswith("FrozenBatchNorm2d") and hasattr(child, "running_var"):
            bn = nn.BatchNorm2d(child.weight.numel(), eps=float(getattr(child, "eps", 1e-5))).to(child.weight.device)
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, k).copy_(getattr(child, k))
            setattr(module, name, bn.eval())
        else:
            thaw_frozen_batchnorm(child)


def fcos_student_for(tb: Mapping[str, Any], s: Any, score_thresh: float,
                     backbone_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """A dfkd FCOS student for a foreign teacher's classes and square input (``tb``: its ``dfkd_build``;
    ``s``: the detection settings): ``detection.student_backbone`` at ``student_width``/``student_fpn``,
    trained on the teacher's pseudo-boxes."""
    return build_detector("fcos", s.student_backbone, num_classes=tb["num_classes"], image_size=tb["image_size"],
                          in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, width=s.student_width or 16,
                          fpn_channels=s.student_fpn or 64, head_convs=s.student_head_convs,
                          score_thresh=tb.get("score_thresh", score_thresh), nms_thresh=0.5,
                          detections_per_img=tb.get("detections_per_img", 100), topk_candidates=1000,
                          backbone_kwargs=dict(backbone_kwargs or {}))
