"""torchvision detectors in ``dfkd-distill task=detection``: a torchvision builder name plus a state dict.

    dfkd-distill teacher=tv_detector teacher.model=fcos_resnet50_fpn teacher.checkpoint=fcos.pth \\
        teacher.kwargs.image_size=512 data=coco data.path=VAL synthesizer=box_inversion

The network is always built by torchvision's own builder with ``weights=None, weights_backbone=None``
(nothing is downloaded; ``teacher.kwargs.pretrained=true`` asks for torchvision's weights explicitly),
and the checkpoint — a state dict in a ``.pth``/``.pt`` (``torch.load(weights_only=True)``, also
``{"model": sd}`` / ``{"state_dict": sd}`` and torchvision's reference-script checkpoints) or a
``.safetensors`` file — is loaded strictly. ``num_classes`` (torchvision's count, background
included) comes from the checkpoint's head when ``teacher.num_classes`` is not given.

Families (:data:`BUILDERS`): FCOS, RetinaNet (v1, v2), Faster R-CNN (ResNet-50 FPN v1/v2,
MobileNetV3-Large FPN and its 320-px variant), SSD300-VGG16 and SSDlite320-MobileNetV3.

The built module keeps its torchvision class and state-dict keys; its class is swapped for a subclass
(:class:`TVFCOS`, :class:`TVRetinaNet`, :class:`TVFasterRCNN`, :class:`TVSSD`) that gives it the face the
detection task uses for dfkd's own detectors, so :class:`~dfkd.detection.models.DetectionTeacher`, box
inversion, ``box_noise``/``box_real``, the distillation loop and COCO evaluation work unchanged:

* **labels**: torchvision detectors reserve label 0 for the background (all four families); dfkd labels
  are contiguous, ``0..K-1``. ``class_ids[i]`` is the torchvision label of dfkd class ``i``: by
  default ``1..num_classes-1``, and for a 91-class (COCO) head the 80 COCO categories (the "N/A" slots
  dropped), with COCO's names. ``model(images)`` in eval mode gives detections with dfkd labels in each
  image's own pixels; ``model(images, targets)`` in train mode the detector's training losses for
  dfkd-labelled targets, with gradients reaching the pixels.
* **input**: the torchvision transform normalises and resizes the longer side to ``image_size``
  (``min_size = max_size = image_size``; SSD: stretched to ``image_size``²), so the synthesizer's
  ``image_size``² canvases are used as they are. Default: the builder's own size (800, 320 or 300).
* ``score_thresh`` / ``nms_thresh`` / ``detections_per_img``: the detector's own settings (Faster R-CNN:
  its ROI heads' ``box_*`` settings).
* **BatchNorm prior**: the builders pick ``FrozenBatchNorm2d`` only when they load weights; built with
  ``weights=None`` every ResNet / MobileNet backbone has ``nn.BatchNorm2d`` layers, into which a
  checkpoint's frozen statistics (``weight``, ``bias``, ``running_mean``, ``running_var``) load; the
  teacher keeps them in eval mode, where they compute exactly what ``FrozenBatchNorm2d`` computes, and
  the DeepInversion prior on ``model.backbone`` matches their running statistics. (With
  ``pretrained=true`` the frozen layers are turned into such BatchNorm layers.) These statistics are
  those of the ImageNet-pretrained backbone (torchvision's detection recipes never update them), so the
  prior pulls the synthetic images towards natural-image feature statistics; VGG16 (SSD300) has no
  BatchNorm: use ``synthesizer.bn=0`` there.
* **heads**: FCOS, RetinaNet and SSD have ``model.head`` (one output dict per batch: ``cls_logits``,
  ``bbox_regression``[, ``bbox_ctrness``]); head matching, class KD and ADI use it where teacher and
  student have the same geometry. Faster R-CNN's per-proposal heads have none: its students learn from
  the teacher's pseudo-boxes only (class KD / ADI are skipped with a warning).
* ``dfkd_build`` holds the builder name and settings, so ``save_detector`` / ``load_detector`` write and
  read a torchvision student like any dfkd detector (its safetensors keys are torchvision's own).

Two-stage detectors sample anchors and proposals (torch's global random generator) in their training
losses: box inversion against a Faster R-CNN optimises a stochastic objective, as its training did.

Students (:func:`build_tv_student`): ``detection.student_backbone=torchvision`` (``teacher=tv_detector``'s
default) is the teacher's builder with a smaller backbone, ``detection.student_kwargs.backbone``
(default ``resnet18`` for the ResNet families, ``mobilenet_v3_small`` for the MobileNet ones and SSD):
same FPN width, anchors, heads and classes, so head matching and class KD apply (SSD300-VGG16's
MobileNet student has other feature-map sizes: pseudo-boxes only). Any dfkd backbone name (``small_cnn``,
``resnet*_cifar``, ``vit_tiny``, a timm ViT) gives a dfkd FCOS for the teacher's classes and input size.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.ssd import SSD

from dfkd.detection.models import square_teacher_kwargs, thaw_frozen_batchnorm
from dfkd.errors import DfkdError, close_matches

#: torchvision builder name -> family
BUILDERS: dict[str, str] = {
    "fcos_resnet50_fpn": "fcos",
    "retinanet_resnet50_fpn": "retinanet",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fasterrcnn_resnet50_fpn": "faster_rcnn",
    "fasterrcnn_resnet50_fpn_v2": "faster_rcnn",
    "fasterrcnn_mobilenet_v3_large_fpn": "faster_rcnn",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "faster_rcnn",
    "ssd300_vgg16": "ssd",
    "ssdlite320_mobilenet_v3_large": "ssd",
}
TEACHER_KWARGS = ("image_size", "score_thresh", "nms_thresh", "detections_per_img", "class_ids", "pretrained",
                  "builder_kwargs")
STUDENT_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
_DEFAULT_SIZE = {"fasterrcnn_mobilenet_v3_large_320_fpn": 320, "ssd300_vgg16": 300,
                 "ssdlite320_mobilenet_v3_large": 320}
# the final class-logit conv in each family's state dict (and the box-regression conv beside it)
_HEAD_KEYS = {
    "fcos": ("head.classification_head.cls_logits.weight", "head.regression_head.bbox_reg.weight"),
    "retinanet": ("head.classification_head.cls_logits.weight", "head.regression_head.bbox_reg.weight"),
    "faster_rcnn": ("roi_heads.box_predictor.cls_score.weight", None),
    "ssd": ("head.classification_head.module_list.0.weight", "head.regression_head.module_list.0.weight"),
}


def builder_names() -> list[str]:
    return sorted(BUILDERS)


def family_of(name: str) -> str:
    if name not in BUILDERS:
        hint = close_matches(str(name), BUILDERS)
        raise DfkdError(f"unknown torchvision detector {name!r}{hint}; known: {', '.join(builder_names())}")
    return BUILDERS[name]


def coco_layout() -> tuple[list[int], list[str]]:
    """The torchvision labels and names of the 80 COCO categories in a 91-class head."""
    from torchvision.models._meta import _COCO_CATEGORIES

    ids = [i for i, n in enumerate(_COCO_CATEGORIES) if n not in ("__background__", "N/A")]
    return ids, [_COCO_CATEGORIES[i] for i in ids]


def default_class_ids(tv_num_classes: int) -> list[int]:
    return coco_layout()[0] if tv_num_classes == 91 else list(range(1, tv_num_classes))


# -- the detection-task face ------------------------------------------------------------------------------
class _TaskFace:
    """What :class:`TVFCOS` & co. add to a torchvision detector (see the module docstring)."""

    input_letterbox = False  # prepares its input by resizing the longer side (box_real: stretch)

    def _face_init(self, name: str, tv_num_classes: int, class_ids: Sequence[int], class_names: Optional[Sequence[str]],
                   image_size: int, backbone: Optional[str], builder_kwargs: Mapping[str, Any]) -> None:
        ids = [int(c) for c in class_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= tv_num_classes:
            raise DfkdError(f"class_ids must be distinct torchvision labels in 0..{tv_num_classes - 1}, got {ids}")
        self.dfkd_name, self.dfkd_backbone = str(name), backbone
        self.tv_num_classes, self.class_ids = int(tv_num_classes), ids
        self.num_classes, self.image_size = len(ids), int(image_size)
        if class_names is not None and len(class_names) != len(ids):
            raise DfkdError(f"{len(class_names)} class names for {len(ids)} classes")
        self.class_names = [str(n) for n in class_names] if class_names is not None else None
        self.builder_kwargs = dict(builder_kwargs or {})
        of = [-1] * self.tv_num_classes
        for i, c in enumerate(ids):
            of[c] = i
        self._dfkd_of = of

    def _tv_targets(self, targets: list[dict]) -> list[dict]:
        out = []
        for t in targets:
            labels = torch.as_tensor(t["labels"], device=t["boxes"].device).long()
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DfkdError(f"target labels must lie in 0..{self.num_classes - 1}, got "
                                f"{int(labels.min())}..{int(labels.max())}")
            ids = torch.as_tensor(self.class_ids, device=labels.device)
            out.append({"boxes": t["boxes"], "labels": ids[labels]})
        return out

    def _dfkd_detections(self, d: dict) -> dict:
        of = torch.as_tensor(self._dfkd_of, device=d["labels"].device)
        lab = of[d["labels"]]
        keep = lab >= 0
        return {"boxes": d["boxes"][keep], "scores": d["scores"][keep], "labels": lab[keep]}

    def forward(self, images, targets: Optional[list[dict]] = None):
        images = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        if targets is not None:
            if len(targets) != len(images):
                raise DfkdError(f"{len(targets)} targets for {len(images)} images")
            targets = self._tv_targets(targets)
        out = super().forward(images, targets)
        if isinstance(out, dict):  # train mode: the losses
            return out
        return [self._dfkd_detections(d) for d in out]

    @property
    def dfkd_build(self) -> dict[str, Any]:
        return {"arch": "torchvision", "name": self.dfkd_name, "backbone": self.dfkd_backbone,
                "tv_num_classes": self.tv_num_classes, "class_ids": list(self.class_ids),
                "class_names": self.class_names, "num_classes": self.num_classes, "image_size": self.image_size,
                "in_chans": 3, "mean": [float(v) for v in self.transform.image_mean],
                "std": [float(v) for v in self.transform.image_std], "score_thresh": float(self.score_thresh),
                "nms_thresh": float(self.nms_thresh), "detections_per_img": int(self.detections_per_img),
                "builder_kwargs": dict(self.builder_kwargs)}


class TVFCOS(_TaskFace, FCOS):
    """A torchvision FCOS with dfkd's detection-task face."""


class TVRetinaNet(_TaskFace, RetinaNet):
    """A torchvision RetinaNet with dfkd's detection-task face."""


class TVSSD(_TaskFace, SSD):
    """A torchvision SSD / SSDlite with dfkd's detection-task face."""


class TVFasterRCNN(_TaskFace, FasterRCNN):
    """A torchvision Faster R-CNN with dfkd's detection-task face (its settings live in its ROI heads)."""

    score_thresh = property(lambda self: self.roi_heads.score_thresh,
                            lambda self, v: setattr(self.roi_heads, "score_thresh", float(v)))
    nms_thresh = property(lambda self: self.roi_heads.nms_thresh,
                          lambda self, v: setattr(self.roi_heads, "nms_thresh", float(v)))
    detections_per_img = property(lambda self: self.roi_heads.detections_per_img,
                                  lambda self, v: setattr(self.roi_heads, "detections_per_img", int(v)))


FACES = {"fcos": TVFCOS, "retinanet": TVRetinaNet, "faster_rcnn": TVFasterRCNN, "ssd": TVSSD}


# -- building -------------------------------------------------------------------------------------------------
def _small_backbone(model: nn.Module, name: str, backbone: str, image_size: int) -> None:
    """Replace ``model.backbone`` (a ResNet / MobileNet FPN) by ``backbone`` with the same FPN and levels."""
    from torchvision.models import mobilenet, resnet
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    old = model.backbone
    fpn_norm = nn.BatchNorm2d if any(isinstance(m, nn.BatchNorm2d) for m in old.fpn.modules()) else None
    if "resnet" in name:
        if not backbone.startswith("resnet"):
            raise DfkdError(f"a {name} student takes a ResNet backbone (resnet18, resnet34, resnet50), got {backbone!r}")
        net = getattr(resnet, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
        returned = sorted(int(k[-1]) for k in old.body.return_layers)
        extra = old.fpn.extra_blocks
        if isinstance(extra, LastLevelP6P7):
            cin, cout = extra.p6.in_channels, extra.p6.out_channels
            extra = LastLevelP6P7(cout if cin == cout else net.inplanes, cout)
        elif isinstance(extra, LastLevelMaxPool):
            extra = LastLevelMaxPool()
        model.backbone = _resnet_fpn_extractor(net, 5, returned_layers=returned, extra_blocks=extra,
                                               norm_layer=fpn_norm)
    else:
        if not backbone.startswith("mobilenet_v3"):
            raise DfkdError(f"a {name} student takes a MobileNetV3 backbone (mobilenet_v3_small, "
                            f"mobilenet_v3_large), got {backbone!r}")
        net = getattr(mobilenet, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
        model.backbone = _mobilenet_extractor(net, True, 6)
    if model.backbone.out_channels != old.out_channels:  # pragma: no cover - torchvision's FPNs are 256 wide
        raise DfkdError(f"the {backbone} FPN has {model.backbone.out_channels} channels, the teacher's {old.out_channels}")


def _ssd_student(name: str, tv_num_classes: int, backbone: str, image_size: int, kw: Mapping[str, Any]) -> nn.Module:
    """An SSDlite-style SSD on a small MobileNetV3 with the anchors of ``name`` (free of fixed steps)."""
    from torchvision.models import mobilenet
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection import ssdlite
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    if not backbone.startswith("mobilenet_v3"):
        raise DfkdError(f"an SSD student takes a MobileNetV3 backbone (mobilenet_v3_small, mobilenet_v3_large), "
                        f"got {backbone!r}")
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    net = getattr(mobilenet, backbone)(weights=None, norm_layer=norm, reduced_tail=True)
    ssdlite._normal_init(net)
    body = ssdlite._mobilenet_extractor(net, 6, norm)
    if name == "ssd300_vgg16":
        anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                      scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
    else:
        anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    size = (image_size, image_size)
    head = ssdlite.SSDLiteHead(det_utils.retrieve_out_channels(body, size), anchors.num_anchors_per_location(),
                               tv_num_classes, norm)
    return SSD(body, anchors, size, tv_num_classes, head=head, image_mean=[0.5] * 3, image_std=[0.5] * 3, **kw)


def build_tv_task_detector(name: str, tv_num_classes: int = 91, class_ids: Optional[Sequence[int]] = None,
                           class_names: Optional[Sequence[str]] = None, image_size: Optional[int] = None,
                           score_thresh: Optional[float] = None, nms_thresh: Optional[float] = None,
                           detections_per_img: Optional[int] = None, backbone: Optional[str] = None,
                           builder_kwargs: Optional[Mapping[str, Any]] = None, pretrained: bool = False,
                           **ignored: Any) -> nn.Module:
    """The torchvision detector ``name`` with the task face, freshly initialised (``weights=None``), or
    with torchvision's own weights when ``pretrained`` (a download: only when asked). ``backbone``: a
    smaller backbone of the same family (a student). ``**ignored`` takes the other keys of a
    ``dfkd_build`` dict (``load_detector`` calls it with one)."""
    import torchvision

    family = family_of(name)
    size = int(image_size or _DEFAULT_SIZE.get(name, 800))
    if size < 1:
        raise DfkdError(f"image_size must be positive, got {size}")
    kw = dict(builder_kwargs or {})
    for k in ("weights", "weights_backbone", "num_classes", "min_size", "max_size", "pretrained"):
        if k in kw:
            raise DfkdError(f"builder_kwargs.{k} is set by dfkd (use the teacher's own settings)")
    if family != "ssd":
        kw.update(min_size=size, max_size=size)
    if pretrained and backbone is None:
        weights = {"weights": "DEFAULT"}
        if tv_num_classes not in (None, 91):
            raise DfkdError(f"torchvision's weights for {name} have 91 classes, not {tv_num_classes}")
    else:
        weights = {"weights": None, "weights_backbone": None, "num_classes": int(tv_num_classes)}
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if family == "ssd" and backbone is not None:
                model = _ssd_student(name, int(tv_num_classes), backbone, size, kw)
            else:
                model = torchvision.models.get_model_builder(name)(**weights, **kw)
    except TypeError as e:
        raise DfkdError(f"torchvision detector {name!r}: {e}") from None
    if pretrained:
        thaw_frozen_batchnorm(model)
    if family == "ssd":  # SSD stretches every image to its fixed size
        model.transform.fixed_size = (size, size)
        model.transform.min_size, model.transform.max_size = (size,), size
    if backbone is not None and family != "ssd":
        _small_backbone(model, name, backbone, size)
    tv_nc = int(tv_num_classes if not pretrained else 91)
    if class_ids is None:
        class_ids = default_class_ids(tv_nc)
        if class_names is None and tv_nc == 91:
            class_names = coco_layout()[1]
    model.__class__ = FACES[family]
    model._face_init(name, tv_nc, class_ids, class_names, size, backbone, builder_kwargs or {})
    for k, v in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh),
                 ("detections_per_img", detections_per_img)):
        if v is not None:
            setattr(model, k, type(getattr(model, k))(v))
    return model


# -- checkpoints and teachers ----------------------------------------------------------------------------------
def read_tv_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision detector's state dict from ``path`` (one-line :class:`DfkdError` when it cannot be read)."""
    from dfkd.models.checkpoint import read_checkpoint

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DfkdError(f"torchvision detector checkpoint not found: {p}")
    return dict(read_checkpoint(p))


def _fit_keys(state: dict, name: str) -> dict:
    """``state`` with a framework prefix (``model.``, ...) stripped when the family's head keys lie under it."""
    from dfkd.models.checkpoint import _FRAMEWORK_PREFIXES

    key = _HEAD_KEYS[family_of(name)][0]
    if key in state or key.replace("module_list.0.", "module_list.0.1.") in state:
        return state
    for prefix in _FRAMEWORK_PREFIXES:
        if prefix + key in state or prefix + key.replace("module_list.0.", "module_list.0.1.") in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def num_classes_from_state(state: Mapping[str, torch.Tensor], name: str, path: str = "the checkpoint") -> int:
    """torchvision's ``num_classes`` (background included) from the class-logit layer of ``state``."""
    family = family_of(name)
    cls_key, reg_key = _HEAD_KEYS[family]
    if family == "ssd" and cls_key not in state:  # SSDlite: a depthwise block, then the 1×1 conv
        cls_key, reg_key = (k.replace("module_list.0.", "module_list.0.1.") for k in (cls_key, reg_key))
    if cls_key not in state or (reg_key is not None and reg_key not in state):
        first = next(iter(state), "none")
        raise DfkdError(f"{path} is not a {name} state dict: it has no {cls_key} (its first key: {first})")
    n = int(state[cls_key].shape[0])
    if reg_key is not None:
        anchors = int(state[reg_key].shape[0]) // 4
        if anchors < 1 or n % anchors:
            raise DfkdError(f"{path}: {cls_key} has {n} outputs, not a multiple of the {anchors} anchors of {reg_key}")
        n //= anchors
    return n


def load_tv_teacher(teacher_cfg: Mapping[str, Any]) -> nn.Module:
    """The teacher named by ``teacher.model`` (a torchvision builder) with ``teacher.checkpoint``, frozen, eval mode."""
    from dfkd.detection.models import load_fitting

    name = teacher_cfg.get("model")
    if not name:
        raise DfkdError(f"teacher=tv_detector needs teacher.model=NAME, a torchvision detector builder: "
                        f"{', '.join(builder_names())}")
    name = str(name)
    family_of(name)
    kw = square_teacher_kwargs(teacher_cfg, TEACHER_KWARGS, "torchvision detector")
    pretrained = bool(kw.pop("pretrained", False))
    ck = teacher_cfg.get("checkpoint")
    nc = teacher_cfg.get("num_classes")
    state = None
    if ck:
        state = _fit_keys(read_tv_state(ck), name)
        found = num_classes_from_state(state, name, str(ck))
        if nc is not None and int(nc) != found:
            raise DfkdError(f"teacher.num_classes={nc} but the checkpoint's {name} head has {found} classes "
                            "(torchvision counts the background)")
        nc = found
    elif not pretrained:
        raise DfkdError(f"teacher=tv_detector needs teacher.checkpoint=FILE (a {name} state dict: .pth, .pt or "
                        ".safetensors), or teacher.kwargs.pretrained=true to download torchvision's weights")
    if nc is None:
        nc = 91
    if int(nc) < 2:
        raise DfkdError(f"a torchvision detector needs num_classes >= 2 (background included), got {nc}")
    model = build_tv_task_detector(name, int(nc), class_ids=kw.pop("class_ids", None),
                                   class_names=teacher_cfg.get("class_names"), pretrained=pretrained, **kw)
    if state is not None:
        load_fitting(model, state, f"checkpoint {ck} does not fit {name} with {nc} classes")
    model.eval().requires_grad_(False)
    return model


def is_tv_teacher(teacher_cfg: Mapping[str, Any]) -> bool:
    return str(teacher_cfg.get("source") or "") == "tv_detector"


# -- students ----------------------------------------------------------------------------------------------------
def default_student_backbone(name: str) -> str:
    return "resnet18" if "resnet" in name else "mobilenet_v3_small"


def build_tv_student(tb: Mapping[str, Any], s) -> nn.Module:
    """The student for a torchvision teacher whose ``dfkd_build`` is ``tb`` (``s``: the ``DetectionSettings``)."""
    kw = dict(s.student_kwargs or {})
    if s.student_backbone == "torchvision":
        for k in kw:
            if k != "backbone":
                raise DfkdError(f"unknown torchvision student setting detection.student_kwargs.{k}; "
                                f"its setting: backbone ({', '.join(STUDENT_BACKBONES)})")
        backbone = str(kw.get("backbone") or default_student_backbone(tb["name"]))
        if backbone not in STUDENT_BACKBONES:
            raise DfkdError(f"unknown student backbone {backbone!r}{close_matches(backbone, STUDENT_BACKBONES)}; "
                            f"known: {', '.join(STUDENT_BACKBONES)}")
        return build_tv_task_detector(tb["name"], tb["tv_num_classes"], tb["class_ids"], tb.get("class_names"),
                                      tb["image_size"], tb.get("score_thresh"), tb.get("nms_thresh"),
                                      tb.get("detections_per_img"), backbone=backbone,
                                      builder_kwargs=tb.get("builder_kwargs"))
    from dfkd.detection.models import fcos_student_for

    return fcos_student_for(tb, s, 0.2, kw)
