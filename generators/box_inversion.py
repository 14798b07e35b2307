"""Box-conditioned inversion of a detector (DIODE, Chawla et al., WACV 2021): optimise pixels.

Each :meth:`BoxInversion.step` samples target boxes (sides uniform in ``size`` × the image,
random classes), starts a batch from noise and runs ``iterations`` Adam steps on

    det · L_det(teacher, aug(x), aug(boxes)) + bn · R_feature(x) + tv · TV(x) + l2 · ‖x − ½‖₂
        [− adi · JS_fg(teacher, student)]

where ``L_det`` is the teacher detector's own training loss (classification + box regression
[+ centerness]) for the sampled boxes, computed with its BatchNorm layers in eval mode, and
``R_feature`` is DeepInversion's BatchNorm-statistics prior on the teacher's backbone. ``aug``
moves boxes with the pixels (:class:`~dfkd.detection.boxes.BoxAugment`). Pixels are optimised
directly and clamped to [0, 1] after every step. With ``add_teacher_detections=τ`` the teacher's
confident (score ≥ τ) detections on the final images that do not overlap a sampled box
(IoU < ``overlap_iou``) join the targets.

``adi > 0`` adds Adaptive DeepInversion's competition term (Yin et al., CVPR 2020) for detectors:
when the distillation loop passes the student, the images are also pushed towards locations where
the student's class distribution disagrees with the teacher's — the Jensen–Shannon divergence of
their softmax class distributions per location, weighted by the teacher's top class probability
there (so it acts on the teacher's objects, not on background). Both heads must have the same
geometry (same strides and locations); the student's BatchNorm runs in eval mode for this.

``init="dead_leaves"`` starts the batch from procedural dead-leaves images
(:func:`generators.procedural.dead_leaves`) instead of grey-centred Gaussian noise.

``box_noise`` is the noise floor: Gaussian images with the teacher's detections as targets.
``box_procedural`` is the optimisation-free data-free source: dead-leaves images (occluding shapes
with natural-image size statistics, no teacher step) with the teacher's detections as targets.
Each returns ``SyntheticBatch(images, targets=[{"boxes", "labels"}...], stats)``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from dfkd.detection.boxes import BoxAugment, box_iou, filter_boxes, sample_boxes
from dfkd.detection.models import head_outputs
from dfkd.losses import js_divergence, l2_prior, tv_prior
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch


def _check_detection_teacher(teacher, name: str) -> None:
    if not (hasattr(teacher, "detect") and hasattr(teacher, "loss")):
        from dfkd.errors import DfkdError

        raise DfkdError(f"the {name!r} synthesizer needs a detection teacher (dfkd.detection.models.DetectionTeacher), "
                        f"got {type(teacher).__name__}")


def _teacher_targets(teacher, images: torch.Tensor, score_thresh: float) -> list[dict]:
    dets = teacher.detect(images, score_thresh=score_thresh)
    return [{"boxes": d["boxes"].detach(), "labels": d["labels"].detach(), "scores": d["scores"].detach()}
            for d in dets]


def teacher_recall(teacher, images: torch.Tensor, targets: list[dict], score_thresh: float = 0.3,
                   iou: float = 0.5) -> float:
    """Fraction of target boxes the teacher (or any eval-mode detector) finds: same class,
    IoU ≥ ``iou``, score ≥ ``score_thresh``."""
    if hasattr(teacher, "detect"):
        dets = teacher.detect(images, score_thresh=score_thresh)
    else:
        with torch.no_grad():
            dets = teacher(list(images.unbind(0)) if isinstance(images, torch.Tensor) else images)
        dets = [{k: v[d["scores"] >= score_thresh] for k, v in d.items()} for d in dets]
    hit = total = 0
    for d, t in zip(dets, targets):
        total += len(t["boxes"])
        if len(t["boxes"]) and len(d["boxes"]):
            m = box_iou(t["boxes"], d["boxes"]) >= iou
            m &= t["labels"][:, None] == d["labels"][None, :]
            hit += int(m.any(1).sum())
    return hit / max(1, total)


@SYNTHESIZERS.register("box_inversion")
class BoxInversion(Synthesizer):
    """DIODE-style pixel optimisation against a :class:`~dfkd.detection.models.DetectionTeacher`."""

    task = "detection"
    default_kd_steps = 40  # an expensive batch: the student takes many steps on the memory per round

    def __init__(
        self,
        teacher,
        batch_size: int = 32,
        seed: int = 0,
        device="cpu",
        iterations: int = 200,
        lr: float = 0.1,
        det: float = 1.0,
        bn: float = 0.05,
        first_bn_multiplier: float = 10.0,
        tv: float = 1e-3,
        l2: float = 1e-5,
        boxes_per_image: int = 1,
        size: tuple[float, float] = (0.2, 0.8),
        add_teacher_detections: Optional[float] = None,
        overlap_iou: float = 0.3,
        augment: bool = True,
        flip: bool = True,
        jitter: float = 0.05,
        scale: float = 0.0,
        init_std: float = 0.2,
        adi: float = 0.0,
        init: str = "noise",
    ):
        _check_detection_teacher(teacher, "box_inversion")
        if init not in ("noise", "dead_leaves"):
            from dfkd.errors import DfkdError

            raise DfkdError(f"box_inversion init must be noise or dead_leaves, got {init!r}")
        super().__init__(teacher, batch_size, seed, device)
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.w_det, self.w_bn, self.w_tv, self.w_l2 = map(float, (det, bn, tv, l2))
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.boxes_per_image = int(boxes_per_image)
        self.size = (float(size[0]), float(size[1]))
        self.add_teacher_detections = (None if add_teacher_detections is None or add_teacher_detections is False
                                       else float(add_teacher_detections))
        self.overlap_iou = float(overlap_iou)
        self.augment = BoxAugment(self.input_size[1:], flip=flip, jitter=jitter, scale=scale) if augment else None
        self.init_std = float(init_std)
        self.init = init
        self.w_adi = float(adi)
        self.uses_student = self.w_adi > 0
        if self.w_bn > 0:  # fail now (one line), not mid-run, when the teacher has no BatchNorm
            from dfkd.hooks import BatchNormPrior

            BatchNormPrior(teacher.model.backbone)

    def sample_targets(self) -> list[dict]:
        return sample_boxes(self.batch_size, self.input_size[1:], self.num_classes, self.boxes_per_image,
                            self.size, generator=self.cpu_rng, device=self.device)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        targets = self.sample_targets()
        if self.init == "dead_leaves":
            from generators.procedural import procedural_images

            x = procedural_images("dead_leaves", self.batch_size, self.input_size, self.rng, self.device)
        else:
            x = (0.5 + self.init_std * self.randn(self.batch_size, *self.input_size)).clamp_(0, 1)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr, betas=(0.5, 0.99))
        ctx = (self.teacher.statistics("batchnorm", first_weight=self.first_bn_multiplier)
               if self.w_bn > 0 else nullcontext())
        use_adi = self.w_adi > 0 and student is not None
        head: dict = {}
        hook = None
        sums: dict[str, torch.Tensor] = {}  # last iteration's losses, kept on the device (one sync per step)
        try:  # the head hook and the prior's hooks are removed, and modes restored, on every exit path
            if use_adi:
                hook = self.teacher.model.head.register_forward_hook(lambda m, i, o: head.__setitem__("t", o))
            with ctx as prior:
                for _ in range(self.iterations):
                    opt.zero_grad(set_to_none=True)
                    if self.augment is not None:
                        xa, ta = self.augment(x, targets, generator=self.cpu_rng)
                    else:
                        xa, ta = x, targets
                    parts = self.teacher.loss(xa, ta)
                    loss_det = sum(parts.values())
                    loss_prior = prior.loss() if prior is not None else torch.zeros((), device=x.device)
                    loss = (self.w_det * loss_det + self.w_bn * loss_prior
                            + self.w_tv * tv_prior(x) + self.w_l2 * l2_prior(x))
                    sums = {**{f"syn/{k}": v for k, v in parts.items()}, "syn/det": loss_det,
                            "syn/prior": loss_prior}
                    if use_adi:
                        loss_adi = self._competition(head.pop("t"), head_outputs(student, xa))
                        loss = loss - self.w_adi * loss_adi
                        sums["syn/adi_js"] = loss_adi
                    sums["syn/loss"] = loss
                    loss.backward(inputs=[x])
                    opt.step()
                    with torch.no_grad():
                        x.clamp_(0, 1)
        finally:
            if hook is not None:
                hook.remove()
        stats: dict[str, float] = {}
        if sums:
            values = torch.stack([v.detach().float() for v in sums.values()]).tolist()
            stats = dict(zip(sums, values))
        x = x.detach()
        stats["syn/teacher_recall"] = teacher_recall(self.teacher, x, targets)
        if self.add_teacher_detections is not None:
            targets = self._add_detections(x, targets)
        stats["syn/boxes_per_image"] = sum(len(t["boxes"]) for t in targets) / max(1, len(targets))
        return SyntheticBatch(images=x, targets=targets, stats=stats)

    @staticmethod
    def _competition(teacher_out: dict, student_out: dict) -> torch.Tensor:
        t, s = teacher_out["cls_logits"], student_out["cls_logits"]
        if t.shape != s.shape:
            from dfkd.errors import DfkdError

            raise DfkdError(f"box_inversion adi needs teacher and student heads of one geometry, got class "
                            f"logits {tuple(t.shape)} and {tuple(s.shape)}; set adi=0")
        w = torch.sigmoid(t.detach().float()).amax(-1)
        js = js_divergence(t, s, reduction="none")
        return (w * js).sum() / w.sum().clamp_min(1.0)

    def _add_detections(self, x: torch.Tensor, targets: list[dict]) -> list[dict]:
        out = []
        for t, d in zip(targets, _teacher_targets(self.teacher, x, self.add_teacher_detections)):
            keep = box_iou(d["boxes"], t["boxes"]).amax(1) < self.overlap_iou if len(t["boxes"]) else \
                torch.ones(len(d["boxes"]), dtype=torch.bool, device=d["boxes"].device)
            d = filter_boxes(d, keep)
            out.append({"boxes": torch.cat([t["boxes"], d["boxes"].to(t["boxes"].dtype)]),
                        "labels": torch.cat([t["labels"], d["labels"].to(t["labels"].dtype)])})
        return out


@SYNTHESIZERS.register("box_noise")
class BoxNoise(Synthesizer):
    """The detection noise floor: N(mean, std²) pixels clamped to [0, 1]; targets are the teacher's
    detections with score ≥ ``score_thresh`` (often none)."""

    task = "detection"

    def __init__(self, teacher, batch_size: int = 32, seed: int = 0, device="cpu",
                 mean: float = 0.5, std: float = 0.25, score_thresh: float = 0.3):
        _check_detection_teacher(teacher, "box_noise")
        super().__init__(teacher, batch_size, seed, device)
        self.mean, self.std, self.score_thresh = float(mean), float(std), float(score_thresh)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        x = (self.mean + self.std * self.randn(self.batch_size, *self.input_size)).clamp_(0, 1)
        targets = [{"boxes": t["boxes"], "labels": t["labels"]}
                   for t in _teacher_targets(self.teacher, x, self.score_thresh)]
        n = sum(len(t["boxes"]) for t in targets)
        return SyntheticBatch(images=x, targets=targets, stats={"syn/boxes_per_image": n / max(1, len(x))})


@SYNTHESIZERS.register("box_procedural")
class BoxProcedural(Synthesizer):
    """Data-free and optimisation-free: procedural dead-leaves images at the teacher's input size
    (:func:`generators.procedural.dead_leaves`); targets are the teacher's detections with score ≥
    ``score_thresh``. The student learns the teacher's outputs on them through head matching and class KD;
    an image costs one teacher forward pass."""

    task = "detection"

    def __init__(self, teacher, batch_size: int = 32, seed: int = 0, device="cpu", score_thresh: float = 0.3,
                 shapes: int = 48, r_min: float = 0.03, r_max: float = 0.6, noise: float = 0.02):
        _check_detection_teacher(teacher, "box_procedural")
        if not 0 < r_min < r_max:
            from dfkd.errors import DfkdError

            raise DfkdError(f"box_procedural radii need 0 < r_min < r_max, got {r_min!r}, {r_max!r}")
        super().__init__(teacher, batch_size, seed, device)
        self.score_thresh = float(score_thresh)
        self.kwargs = {"shapes": int(shapes), "r_min": float(r_min), "r_max": float(r_max), "noise": float(noise)}

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        from generators.procedural import procedural_images

        x = procedural_images("dead_leaves", self.batch_size, self.input_size, self.rng, self.device, **self.kwargs)
        targets = [{"boxes": t["boxes"], "labels": t["labels"]}
                   for t in _teacher_targets(self.teacher, x, self.score_thresh)]
        n = sum(len(t["boxes"]) for t in targets)
        return SyntheticBatch(images=x, targets=targets, stats={"syn/boxes_per_image": n / max(1, len(x))})


@SYNTHESIZERS.register("box_real")
class BoxReal(Synthesizer):
    """The detection real-data KD ceiling: random real images (``dataset[i]`` gives ``(image, target)`` or
    an image; ground-truth boxes are ignored), brought to the teacher's input size when they differ:
    ``resize="stretch"`` resizes them to it, ``"letterbox"`` fits the longer side and pads with grey
    114 (as YOLO prepares its input), ``"auto"`` letterboxes for a teacher that letterboxes its own
    input (``model.input_letterbox``, the YOLO detectors) and stretches otherwise."""

    task = "detection"
    needs_real_data = True
    RESIZE = ("auto", "stretch", "letterbox")

    def __init__(self, teacher, dataset=None, batch_size: int = 32, seed: int = 0, device="cpu",
                 resize: str = "auto"):
        from dfkd.errors import DfkdError

        if dataset is None or len(dataset) == 0:
            raise DfkdError("the real-image source needs a non-empty dataset")
        if resize not in self.RESIZE:
            raise DfkdError(f"box_real resize must be one of {', '.join(self.RESIZE)}, got {resize!r}")
        super().__init__(teacher, batch_size, seed, device)
        self.dataset = dataset
        if resize == "auto":
            resize = "letterbox" if getattr(getattr(teacher, "model", None), "input_letterbox", False) else "stretch"
        self.resize = resize

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        import torch.nn.functional as F

        c, h, w = self.input_size
        idx = torch.randint(len(self.dataset), (self.batch_size,), generator=self.cpu_rng).tolist()
        images = []
        for i in idx:
            item = self.dataset[i]
            x = torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item, dtype=torch.float32)
            if tuple(x.shape[-2:]) != (h, w):
                if self.resize == "letterbox" and h == w:
                    from dfkd.detection.yolo import letterbox

                    x = letterbox(x, h)[0]
                else:
                    x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            images.append(x)
        return SyntheticBatch(images=torch.stack(images).to(self.device))
