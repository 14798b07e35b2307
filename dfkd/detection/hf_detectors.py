"""Transformer detectors from Hugging Face ``transformers`` (DETR family, YOLOS) in ``dfkd-distill task=detection``.

    dfkd-distill teacher=hf_detector teacher.checkpoint=FOLDER teacher.kwargs.image_size=512 \\
        synthesizer=box_inversion synthesizer.bn=0 data=coco data.path=VAL

An optional extra: it needs the ``transformers`` package (not a dfkd dependency). ``teacher.checkpoint``
is a local folder that ``save_pretrained`` wrote (``config.json`` + weights); it is read with
``from_pretrained(FOLDER, local_files_only=True)`` and the config's ``use_pretrained_backbone`` is
switched off, so nothing is downloaded. An ``AutoModelForObjectDetection`` whose outputs are DETR's —
``logits`` over the classes (with a last "no object" class, as DETR and YOLOS have, or sigmoid scores per
class, as Conditional DETR has) and ``pred_boxes`` (normalised cx, cy, w, h) — and which computes its set
loss from ``labels`` fits; DETR and YOLOS are tested.

:class:`HFDetector` gives such a model the torchvision-style face of the detection task:

* ``model(images)`` in eval mode: each [0, 1] image is stretched to ``image_size``² and normalised
  (``mean``/``std``: the folder's ``preprocessor_config.json`` if there is one, else ImageNet's); the
  detections are the queries whose best class scores at least ``score_thresh`` (the top
  ``detections_per_img``; set prediction needs no NMS), in the image's own pixels;
* ``model(images, targets)`` in train mode: the model's own Hungarian-matched set loss (``loss``) for
  torchvision-style targets, with gradients reaching the pixels; for a teacher (``eval_loss``, set by
  :func:`load_hf_teacher`) computed with every layer in eval mode, since ``transformers`` layers apply
  dropout and layer drop by their own ``training`` flag, not through ``nn.Dropout`` modules;
* ``backbone``: the convolutional backbone where there is one (DETR's ResNet, whose frozen BatchNorm
  layers are turned into eval-mode ``nn.BatchNorm2d`` with the same statistics, so box inversion's
  BatchNorm prior can use them); YOLOS is a ViT without BatchNorm: ``synthesizer.bn=0``;
* no dense head: the student learns from the teacher's pseudo-boxes (class KD / head matching / ADI are
  skipped with a warning);
* ``dfkd_build`` holds the config, so ``save_detector`` / ``load_detector`` write and read a student.

Students (:func:`build_hf_student`): ``detection.student_backbone=hf`` (``teacher=hf_detector``'s default)
is the teacher's config with half its width and depth (``hidden_size``/``d_model``, feed-forward sizes,
layer counts; the attention heads kept dividing the width) and the same classes, queries and patch size —
``detection.student_kwargs`` overrides any config field. A YOLOS teacher thus gives a smaller ViT detector.
Any dfkd backbone name gives a dfkd FCOS instead.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.detection.models import thaw_frozen_batchnorm
from dfkd.errors import DfkdError, close_matches

TEACHER_KWARGS = ("image_size", "score_thresh", "detections_per_img")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# config fields halved for a student (those the config has)
_WIDTHS = ("hidden_size", "d_model")
_FFNS = ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim")
_DEPTHS = ("num_hidden_layers", "encoder_layers", "decoder_layers")
_HEADS = ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DfkdError("teacher=hf_detector needs the transformers package: pip install transformers") from None
    return transformers


class HFDetector(nn.Module):
    """A DETR-style ``transformers`` detector with the face of dfkd's detection task (module docstring)."""

    input_letterbox = False

    def __init__(self, hf: nn.Module, image_size: int = 512, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, score_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        self.hf = hf
        thaw_frozen_batchnorm(self.hf)
        cfg = hf.config
        self.num_classes = int(cfg.num_labels)
        self.image_size = int(image_size)
        self.score_thresh, self.nms_thresh, self.detections_per_img = float(score_thresh), 1.0, int(detections_per_img)
        self.transform = SimpleNamespace(image_mean=[float(v) for v in mean], image_std=[float(v) for v in std])
        self.register_buffer("_mean", torch.tensor(self.transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.transform.image_std).view(1, 3, 1, 1), persistent=False)
        id2label = getattr(cfg, "id2label", None) or {}
        self.class_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.num_classes)]
        self._no_object: Optional[bool] = None  # a last "no object" class (softmax) or sigmoid scores
        self.eval_loss = False  # True for a teacher: its loss is computed with every layer in eval mode

    @property
    def backbone(self) -> nn.Module:
        """What the BatchNorm prior hooks: the convolutional backbone (DETR), else the whole network."""
        inner = getattr(self.hf, "model", None)
        bb = getattr(inner, "backbone", None)
        return bb if isinstance(bb, nn.Module) else self.hf

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        s = self.image_size
        x = torch.stack([im if tuple(im.shape[-2:]) == (s, s) else
                         F.interpolate(im[None], size=(s, s), mode="bilinear", align_corners=False)[0] for im in images])
        if x.shape[1] != 3:
            raise DfkdError(f"an HF detector takes RGB images, got {x.shape[1]} channels")
        return (x - self._mean) / self._std

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self._no_object is None:
            self._no_object = logits.shape[-1] == self.num_classes + 1
        return logits.softmax(-1)[..., :-1] if self._no_object else logits.sigmoid()

    def forward(self, images, targets: Optional[list[dict]] = None):
        images = list(images.unbind(0)) if isinstance(images, torch.Tensor) else list(images)
        sizes = [tuple(im.shape[-2:]) for im in images]
        x = self._pixels(images)
        if self.training and targets is not None:
            if len(targets) != len(images):
                raise DfkdError(f"{len(targets)} targets for {len(images)} images")
            labels = []
            for t, (h, w) in zip(targets, sizes):
                b = t["boxes"].float()
                scale = b.new_tensor([w, h, w, h])
                cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                      b[:, 3] - b[:, 1]], -1) / scale
                labels.append({"class_labels": t["labels"].long(), "boxes": cxcywh.clamp(0, 1)})
            if not self.eval_loss:
                out = self.hf(pixel_values=x, labels=labels)
            else:  # a teacher's loss: no dropout or layer drop (transformers' layers drop by their .training flag)
                modes = {m: m.training for m in self.hf.modules()}
                try:
                    self.hf.eval()
                    out = self.hf(pixel_values=x, labels=labels)
                finally:
                    for m, mode in modes.items():
                        m.training = mode
            self._probs(out.logits)
            return {"loss_set": out.loss}
        out = self.hf(pixel_values=x)
        probs = self._probs(out.logits.float())
        scores, classes = probs.max(-1)
        dets = []
        for i, (h, w) in enumerate(sizes):
            c = out.pred_boxes[i].float()
            xyxy = torch.stack([c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2, c[:, 0] + c[:, 2] / 2,
                                c[:, 1] + c[:, 3] / 2], -1).clamp(0, 1) * c.new_tensor([w, h, w, h])
            keep = scores[i] >= self.score_thresh
            s, order = scores[i][keep].sort(descending=True)
            order = order[: self.detections_per_img]
            dets.append({"boxes": xyxy[keep][order], "scores": s[: self.detections_per_img],
                         "labels": classes[i][keep][order]})
        return dets

    @property
    def dfkd_build(self) -> dict[str, Any]:
        return {"arch": "hf", "config": json.loads(self.hf.config.to_json_string(use_diff=False)),
                "num_classes": self.num_classes, "class_names": list(self.class_names), "image_size": self.image_size,
                "in_chans": 3, "mean": list(self.transform.image_mean), "std": list(self.transform.image_std),
                "score_thresh": self.score_thresh, "nms_thresh": self.nms_thresh,
                "detections_per_img": self.detections_per_img}


def _config_offline(config) -> Any:
    for k in ("use_pretrained_backbone",):
        if getattr(config, k, False):
            setattr(config, k, False)
    return config


def build_hf_detector(config: Mapping[str, Any], image_size: int = 512, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, score_thresh: float = 0.5, detections_per_img: int = 100,
                      **ignored: Any) -> HFDetector:
    """A freshly initialised :class:`HFDetector` from a config dict (``load_detector`` calls it with a
    ``dfkd_build`` dict)."""
    tr = _transformers()
    cfg = dict(config)
    model_type = cfg.get("model_type")
    try:
        config_obj = _config_offline(tr.AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items()
                                                                             if k != "model_type"}))
        hf = tr.AutoModelForObjectDetection.from_config(config_obj)
    except (ValueError, KeyError, TypeError) as e:
        raise DfkdError(f"cannot build a transformers detector of type {model_type!r}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return HFDetector(hf, image_size, mean, std, score_thresh, detections_per_img)


def _preprocessor_stats(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    p = folder / "preprocessor_config.json"
    if p.is_file():
        try:
            d = json.loads(p.read_text())
            if d.get("image_mean") and d.get("image_std"):
                return [float(v) for v in d["image_mean"]], [float(v) for v in d["image_std"]]
        except (ValueError, TypeError):
            raise DfkdError(f"cannot read {p}") from None
    return IMAGENET_MEAN, IMAGENET_STD


def is_hf_teacher(teacher_cfg: Mapping[str, Any]) -> bool:
    return str(teacher_cfg.get("source") or "") == "hf_detector"


def load_hf_teacher(teacher_cfg: Mapping[str, Any]) -> HFDetector:
    """The teacher in the ``save_pretrained`` folder ``teacher.checkpoint``, frozen, eval mode."""
    ck = teacher_cfg.get("checkpoint")
    if not ck:
        raise DfkdError("teacher=hf_detector needs teacher.checkpoint=FOLDER (a transformers save_pretrained folder)")
    kw = dict(teacher_cfg.get("kwargs") or {})
    for k in kw:
        if k not in TEACHER_KWARGS:
            raise DfkdError(f"unknown HF detector setting teacher.kwargs.{k}{close_matches(k, TEACHER_KWARGS)}; "
                            f"its settings: {', '.join(TEACHER_KWARGS)}")
    folder = Path(str(ck)).expanduser()
    if not folder.is_dir():
        raise DfkdError(f"HF detector folder not found: {folder} (teacher.checkpoint is a save_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise DfkdError(f"{folder} has no config.json: not a transformers save_pretrained folder")
    tr = _transformers()
    try:
        config = _config_offline(tr.AutoConfig.from_pretrained(str(folder), local_files_only=True))
        hf = tr.AutoModelForObjectDetection.from_pretrained(str(folder), config=config, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise DfkdError(f"cannot load the transformers detector in {folder}: {str(e).strip().splitlines()[0][:200]}") \
            from None
    mean, std = _preprocessor_stats(folder)
    size = kw.get("image_size")
    if size is None:
        size = getattr(config, "image_size", None)
        size = max(size) if isinstance(size, (list, tuple)) else size
    score, cap = kw.get("score_thresh"), kw.get("detections_per_img")
    det = HFDetector(hf, int(size or 512), mean, std, 0.5 if score is None else float(score),
                     100 if cap is None else int(cap))
    names = teacher_cfg.get("class_names")
    if names:
        if len(names) != det.num_classes:
            raise DfkdError(f"{len(names)} class names for a detector of {det.num_classes} classes")
        det.class_names = [str(n) for n in names]
    det.eval_loss = True
    det.eval().requires_grad_(False)
    return det


def student_config(config: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """``config`` with half its width, feed-forward sizes and depth (see the module docstring), then ``overrides``."""
    out = copy.deepcopy(dict(config))
    for k in _WIDTHS + _FFNS:
        if isinstance(out.get(k), int):
            out[k] = max(8, out[k] // 2)
    for k in _DEPTHS:
        if isinstance(out.get(k), int):
            out[k] = max(1, out[k] // 2)
    width = next((out[k] for k in _WIDTHS if isinstance(out.get(k), int)), None)
    for k in _HEADS:
        if isinstance(out.get(k), int) and width:
            h = out[k]
            while h > 1 and width % h:
                h -= 1
            out[k] = h
    for k, v in dict(overrides or {}).items():
        if k not in out:
            raise DfkdError(f"unknown HF student setting detection.student_kwargs.{k}{close_matches(k, list(out))}; "
                            "it sets a field of the teacher's config")
        out[k] = v
    return out


def build_hf_student(tb: Mapping[str, Any], s) -> nn.Module:
    """The student for an HF teacher whose ``dfkd_build`` is ``tb`` (``s``: the ``DetectionSettings``)."""
    if s.student_backbone == "hf":
        cfg = student_config(tb["config"], s.student_kwargs)
        return build_hf_detector(cfg, tb["image_size"], tb["mean"], tb["std"], tb.get("score_thresh", 0.5),
                                 tb.get("detections_per_img", 100))
    from dfkd.detection.models import fcos_student_for

    return fcos_student_for(tb, s, 0.5, s.student_kwargs)
