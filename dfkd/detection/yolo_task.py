"""YOLO detectors in ``dfkd-distill task=detection``: a YOLO file as the teacher, a YOLO (or dfkd) student.

    dfkd-distill task=detection teacher=yolo teacher.checkpoint=yolov5n.pt teacher.kwargs.image_size=256 \\
        data=yolo data.path=coco128 synthesizer=box_inversion

:class:`YOLOTaskDetector` gives a :class:`~dfkd.detection.yolo.YOLODetector` the torchvision-style
face the detection task uses for dfkd's own detectors, so :class:`~dfkd.detection.models.DetectionTeacher`,
box inversion, ``box_noise``/``box_real``, the distillation loop and COCO evaluation work unchanged:

* ``model(images)`` in eval mode: NMS'd detections in each image's own pixels (letterboxed to
  ``image_size`` with grey padding, as the original); ``model(images, targets)`` in train mode: the
  YOLO training loss (:mod:`dfkd.detection.yolo_loss`) for torchvision-style targets (xyxy pixels
  of the ``image_size``² input), with gradients reaching the pixels;
* ``score_thresh`` / ``nms_thresh`` / ``detections_per_img`` are the detector's confidence cut-off,
  NMS IoU and detection cap; ``backbone`` is the whole network (the BatchNorm prior covers all of
  its BatchNorm layers, 57 in YOLOv5n); ``transform.image_mean``/``image_std`` say "pixels / 255";
* ``head`` is a parameter-free view whose output — recorded by head matching and class KD — is the
  flat dict ``{"cls_logits" (B, N, nc), "bbox_regression" (B, N, 4)[, "bbox_ctrness" (B, N, 1)]}``:
  v5: class logits of objectness × class probability (the decoded confidence), σ of the box
  outputs, objectness logits; v8: class logits and the DFL distances / (reg_max − 1);
* ``dfkd_build`` holds the architecture description and settings, so ``save_detector`` /
  ``load_detector`` write and read a YOLO student like any dfkd detector.

Teachers (``teacher=yolo`` or ``teacher=detector`` with a ``.pt``/``.yaml`` file): a YOLOv5/YOLOv8
``.pt`` read without running its code (:func:`~dfkd.detection.yolo.load_yolo`), or an architecture
``.yaml`` built with random weights (tests, trials). Settings in ``teacher.kwargs``: ``image_size``
(the square input, default 640), ``conf_thres`` (0.25), ``iou_thres`` (0.45), ``max_det`` (100),
``seed`` (a ``.yaml`` network's initialisation, 0).

Students (:func:`build_yolo_task_student`): ``detection.student_backbone=yolo`` (teacher=yolo's
default) is the teacher's own architecture description with a smaller width multiple (default half
the teacher's) and depth multiple (default the teacher's), ``detection.student_kwargs.width_multiple``
/ ``depth_multiple`` to choose; same strides, anchors and classes, so head matching and class KD
apply. ``detection.student_init=teacher`` starts that student from the teacher's weights by channel
selection (:mod:`dfkd.detection.yolo_slim`; ``detection.student_kwargs.importance``: ``bn``, the
BatchNorm |γ| (default), or ``l1``, the filter's L1 norm); ``scratch`` (the default) from a fresh
initialisation. Any other backbone (``small_cnn``, ``resnet*_cifar``, ``vit_tiny``, a timm ViT) gives a
dfkd FCOS for the teacher's classes and input size, trained on the teacher's pseudo-boxes only.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.detection.models import square_teacher_kwargs
from dfkd.detection.yolo import YOLODetector, YOLOModel, load_yolo
from dfkd.detection.yolo_loss import yolo_loss
from dfkd.errors import DfkdError, close_matches

YOLO_FILE_SUFFIXES = (".pt", ".yaml", ".yml")
TEACHER_KWARGS = ("image_size", "conf_thres", "iou_thres", "max_det", "seed")
STUDENT_KWARGS = ("width_multiple", "depth_multiple", "importance")


class YOLOHeadView(nn.Module):
    """The raw per-level outputs of a YOLO head as one flat dict (see the module docstring); no parameters."""

    def __init__(self, version: int, reg_max: int = 16):
        super().__init__()
        self.version, self.reg_max = int(version), int(reg_max)

    def forward(self, raw: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.version == 5:
            flat = torch.cat([r.flatten(1, 3) for r in raw], 1).float()  # (B, na·ΣHW, 5 + nc)
            obj, cls = flat[..., 4:5], flat[..., 5:]
            log_p = F.logsigmoid(obj) + F.logsigmoid(cls)  # log(σ(obj) σ(cls)), the decoded confidence
            conf_logit = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
            return {"cls_logits": conf_logit, "bbox_regression": flat[..., :4].sigmoid(), "bbox_ctrness": obj}
        flat = torch.cat([r.flatten(2) for r in raw], 2).transpose(1, 2).float()  # (B, ΣHW, 4R + nc)
        r = self.reg_max
        dist, cls = flat[..., : 4 * r], flat[..., 4 * r:]
        bins = torch.arange(r, device=flat.device, dtype=flat.dtype) / max(1, r - 1)
        ltrb = (dist.reshape(*dist.shape[:-1], 4, r).softmax(-1) * bins).sum(-1)
        return {"cls_logits": cls, "bbox_regression": ltrb}


class YOLOTaskDetector(YOLODetector):
    """A :class:`YOLODetector` with the torchvision-style face of dfkd's detection task (module docstring)."""

    input_letterbox = True  # prepares its input by letterboxing (box_real's resize=auto follows it)

    def __init__(self, model: YOLOModel, class_names: Optional[Sequence[str]] = None, image_size: int = 640,
                 conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 100, auto: bool = False,
                 loss_hyp: Optional[Mapping[str, float]] = None):
        super().__init__(model, class_names, image_size=image_size, conf_thres=conf_thres, iou_thres=iou_thres,
                         max_det=max_det, auto=auto)
        self.head = YOLOHeadView(model.version, getattr(model.head, "reg_max", 16))
        self.transform = SimpleNamespace(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        self.loss_hyp = dict(loss_hyp or {})

    # the torchvision detector's settings
    @property
    def score_thresh(self) -> float:
        return self.conf_thres

    @score_thresh.setter
    def score_thresh(self, value: float) -> None:
        self.conf_thres = float(value)

    @property
    def nms_thresh(self) -> float:
        return self.iou_thres

    @property
    def detections_per_img(self) -> int:
        return self.max_det

    @property
    def backbone(self) -> nn.Module:
        """The whole network: what the BatchNorm prior hooks."""
        return self.model

    @property
    def dfkd_build(self) -> dict[str, Any]:
        return {"arch": "yolo", "yolo_cfg": copy.deepcopy(self.model.cfg), "version": self.model.version,
                "num_classes": self.num_classes, "class_names": list(self.class_names),
                "image_size": self.image_size, "in_chans": 3, "mean": [0.0] * 3, "std": [1.0] * 3,
                "score_thresh": self.conf_thres, "nms_thresh": self.iou_thres, "detections_per_img": self.max_det,
                "strides": self.model.strides, "loss_hyp": dict(self.loss_hyp)}

    def head_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        raw = super().head_outputs(x)
        self.head(raw)  # the flat view, for the hooks of head matching / class KD / ADI
        return raw

    def head_dict(self, images) -> dict[str, torch.Tensor]:
        """:func:`dfkd.detection.models.head_outputs` for a YOLO: the flat head dict, modules in eval mode."""
        x = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
        return self.head(super().head_outputs(x))

    def forward(self, images, targets: Optional[list[dict]] = None):
        if not (self.training and targets is not None):
            return super().forward(images)
        x = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
        self._check_pixels(x)
        if len(targets) != len(x):
            raise DfkdError(f"{len(targets)} targets for {len(x)} images")
        raw = self.model(x)
        self.head(raw)
        return yolo_loss(self.model, raw, targets, self.loss_hyp)


def build_yolo_task_detector(yolo_cfg: Mapping[str, Any], num_classes: Optional[int] = None,
                             class_names: Optional[Sequence[str]] = None, image_size: int = 640,
                             score_thresh: float = 0.25, nms_thresh: float = 0.45, detections_per_img: int = 100,
                             loss_hyp: Optional[Mapping[str, float]] = None, **ignored: Any) -> YOLOTaskDetector:
    """A freshly initialised :class:`YOLOTaskDetector` from an architecture description (and, through
    ``**ignored``, the other keys of a ``dfkd_build`` dict: ``load_detector`` calls it with one)."""
    model = YOLOModel(yolo_cfg, nc=num_classes)
    return YOLOTaskDetector(model, class_names, image_size=int(image_size), conf_thres=score_thresh,
                            iou_thres=nms_thresh, max_det=int(detections_per_img), loss_hyp=loss_hyp)


# -- teachers -----------------------------------------------------------------------------------
def is_yolo_teacher(teacher_cfg: Mapping[str, Any]) -> bool:
    """``teacher.source=yolo`` (``teacher=yolo``), or a ``.pt``/``.yaml`` checkpoint without a dfkd JSON beside it."""
    if str(teacher_cfg.get("source") or "") == "yolo":
        return True
    ck = teacher_cfg.get("checkpoint")
    if not ck:
        return False
    p = Path(str(ck)).expanduser()
    return p.suffix.lower() in YOLO_FILE_SUFFIXES and not p.with_suffix(".json").is_file()


def load_yolo_teacher(teacher_cfg: Mapping[str, Any]) -> YOLOTaskDetector:
    """The teacher named by ``teacher.checkpoint`` (a YOLO ``.pt`` or an architecture ``.yaml``), frozen, eval mode."""
    ck = teacher_cfg.get("checkpoint")
    if not ck:
        raise DfkdError("teacher=yolo needs teacher.checkpoint=FILE: a YOLOv5/YOLOv8 .pt (read without running "
                        "its code) or an architecture .yaml (random weights)")
    kw = square_teacher_kwargs(teacher_cfg, TEACHER_KWARGS, "YOLO teacher")
    image_size = int(kw.get("image_size") or 640)
    settings = dict(image_size=image_size, conf_thres=float(kw.get("conf_thres", 0.25)),
                    iou_thres=float(kw.get("iou_thres", 0.45)), max_det=int(kw.get("max_det", 100)))
    path = Path(str(ck)).expanduser()
    names = teacher_cfg.get("class_names")
    if path.suffix.lower() in (".yaml", ".yml"):
        cfg = read_yolo_yaml(path)
        nc = teacher_cfg.get("num_classes")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(kw.get("seed", 0)))
            model = YOLOModel(cfg, nc=int(nc) if nc is not None else None)
        det = YOLOTaskDetector(model, names or cfg.get("names") or None, **settings)
    else:
        base = load_yolo(path, image_size=image_size)
        det = YOLOTaskDetector(base.model, names or base.class_names, **settings)
    if det.model.version == 8:  # its loss serves box inversion only: hard class targets (dfkd.detection.yolo_loss)
        det.loss_hyp = {"hard_targets": 1}
    det.eval().requires_grad_(False)
    return det


def read_yolo_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise DfkdError(f"YOLO architecture file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DfkdError(f"cannot read YOLO architecture {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise DfkdError(f"{path} is not a YOLO architecture description (no 'backbone' and 'head' lists)")
    if isinstance(cfg.get("names"), dict):
        cfg["names"] = [str(cfg["names"][k]) for k in sorted(cfg["names"], key=int)]
    return cfg


# -- students -------------------------------------------------------------------------------------
def narrower_yolo_cfg(cfg: Mapping[str, Any], width_multiple: Optional[float] = None,
                      depth_multiple: Optional[float] = None) -> dict:
    """``cfg`` with other multiples (default: half the width, the same depth)."""
    out = copy.deepcopy(dict(cfg))
    if "scales" in out:
        scales = out["scales"]
        gd, gw, max_ch = scales[out.get("scale") or next(iter(scales))]
        out["scales"] = {"student": [depth_multiple if depth_multiple is not None else gd,
                                     width_multiple if width_multiple is not None else gw / 2, max_ch]}
        out["scale"] = "student"
    else:
        out["width_multiple"] = (width_multiple if width_multiple is not None
                                 else float(out.get("width_multiple", 1.0)) / 2)
        out["depth_multiple"] = depth_multiple if depth_multiple is not None else float(out.get("depth_multiple", 1.0))
    return out


def build_yolo_task_student(tb: Mapping[str, Any], s) -> nn.Module:
    """The student for a YOLO teacher whose ``dfkd_build`` is ``tb`` (``s``: the ``DetectionSettings``)."""
    kw = dict(s.student_kwargs or {})
    if s.student_backbone == "yolo":
        for k in kw:
            if k not in STUDENT_KWARGS:
                raise DfkdError(f"unknown YOLO student setting detection.student_kwargs.{k}"
                                f"{close_matches(k, STUDENT_KWARGS)}; its settings: {', '.join(STUDENT_KWARGS)}")
        for k in ("width_multiple", "depth_multiple"):
            v = kw.get(k)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise DfkdError(f"detection.student_kwargs.{k} must be a positive number, got {v!r}")
        cfg = narrower_yolo_cfg(tb["yolo_cfg"], kw.get("width_multiple"), kw.get("depth_multiple"))
        # the student trains with the original loss (not the teacher's inversion settings)
        return build_yolo_task_detector(cfg, tb["num_classes"], tb.get("class_names"), tb["image_size"],
                                        tb.get("score_thresh", 0.25), tb.get("nms_thresh", 0.45),
                                        tb.get("detections_per_img", 100))
    from dfkd.detection.models import fcos_student_for

    return fcos_student_for(tb, s, 0.25, kw)


def init_yolo_student(student: nn.Module, teacher: nn.Module, tb: Mapping[str, Any], s, seed: int = 0,
                      compensate: bool = True) -> nn.Module:
    """``detection.student_init=teacher``: a YOLO student of a YOLO teacher gets the teacher's weights by
    channel selection (:func:`dfkd.detection.yolo_slim.init_from_teacher`), compensated from the teacher's
    statistics on ``detection.compensate`` images (:func:`dfkd.detection.yolo_slim.compensation_images`);
    any other pair is one line."""
    from dfkd.detection.yolo_slim import compensation_images, init_from_teacher

    if tb.get("arch") != "yolo" or not isinstance(getattr(student, "model", None), YOLOModel):
        raise DfkdError("detection.student_init=teacher needs a YOLO teacher (teacher=yolo) and a YOLO student "
                        "(detection.student_backbone=yolo)")
    kind = getattr(s, "compensate", "none") if compensate else "none"
    t_model = teacher.model if isinstance(getattr(teacher, "model", None), YOLOModel) else teacher
    images = compensation_images(t_model, kind, s.compensate_images, int(tb["image_size"]),
                                 s.compensate_iterations, seed, cache=s.compensate_cache) if kind != "none" else None
    return init_from_teacher(student, teacher, str((s.student_kwargs or {}).get("importance", "bn")), images=images)
