"""Supervised detector training (teachers, real-data baselines) and detector distillation.

:func:`distill_detector` is the detection counterpart of :class:`dfkd.distill.Distiller`: each
round a source (box inversion, noise, real images — anything whose ``step()`` returns a
``SyntheticBatch``) adds images to a bounded memory, then the student takes
``kd_steps_per_round`` steps on augmented memory batches. Targets are the teacher's
pseudo-labels on those same augmented images (boxes with score ≥ ``score_thresh``), trained
with the student's own detection loss; optionally the student's head outputs also match the
teacher's (sigmoid BCE on class logits and centerness, L1 on box regression), and/or its class
logits match the teacher's class probabilities on the teacher's objects (``class_kd``: this passes
on which class the teacher almost chose — the knowledge that hard pseudo-labels drop), and/or a
teacher-initialised YOLO student's neck features (its Detect layer's inputs) match the teacher's at the
channels it was given (``feature_kd``, :func:`neck_feature_loss`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.detection.boxes import BoxAugment, hflip
from dfkd.engine import Engine, Schedule, Task
from dfkd.optim import build_optimizer
from dfkd.errors import DfkdError


def collate(batch) -> tuple[list[torch.Tensor], list[dict]]:
    """``[(image, target), ...]`` -> ``(images, targets)`` lists (same as the data side's collate)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def _loader(data, batch_size: int, seed: int) -> Iterable:
    if isinstance(data, torch.utils.data.DataLoader) or not hasattr(data, "__getitem__"):
        return data
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                       generator=g, drop_last=len(data) > batch_size)


def _augment_batch(images: list[torch.Tensor], targets: list[dict], augment, g: torch.Generator):
    if augment is None or augment is False:
        return images, targets
    same = len({tuple(x.shape) for x in images}) == 1
    if augment is True:  # horizontal flip with probability 0.5, exact
        flags = torch.rand(len(images), generator=g) < 0.5
        if same:
            x, t = hflip(torch.stack(images), targets, flags)
            return list(x.unbind(0)), t
        out = [hflip(x[None], [t], f[None]) for x, t, f in zip(images, targets, flags)]
        return [o[0][0] for o in out], [o[1][0] for o in out]
    if not same:
        raise DfkdError("a batch augmentation needs images of one size; use augment=True (flips) instead")
    x, t = augment(torch.stack(images), targets, generator=g)
    return list(x.unbind(0)), t


class SupervisedDetection(Task):
    """Supervised detector training as an engine task: a round is ``log_every`` steps on real batches
    (the loader starts a new epoch when it runs out); the round's mean losses are its record."""

    name = "train detector"

    def __init__(self, model: nn.Module, loader: Iterable, augment, device: torch.device, log_every: int, g):
        self.model, self.loader, self.augment, self.device = model, loader, augment, device
        self.log_every, self.g = max(1, int(log_every)), g
        self.it: Optional[Iterator] = None

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def begin(self, engine: Engine) -> None:
        self.model.train()

    def _next(self):
        if self.it is not None:
            try:
                return next(self.it)
            except StopIteration:
                pass
        self.it = iter(self.loader)
        try:
            return next(self.it)
        except StopIteration:
            raise DfkdError("train_detector: the training data is empty") from None

    def round(self, engine: Engine) -> dict[str, Any]:
        running: dict[str, torch.Tensor] = {}  # on the device: one host sync per round (the log interval)
        n = 0
        while n < self.log_every and not engine.finished():
            images, targets = self._next()
            images, targets = _augment_batch(list(images), list(targets), self.augment, self.g)
            images = [x.to(self.device) for x in images]
            targets = [{"boxes": t["boxes"].to(self.device).float(), "labels": t["labels"].to(self.device).long()}
                       for t in targets]
            losses = self.model(images, targets)
            loss = sum(losses.values())
            engine.optimizer_step(loss)
            n += 1
            for k, v in {**losses, "loss": loss}.items():
                running[k] = running[k] + v.detach() if k in running else v.detach()
        return {k: v / max(1, n) for k, v in running.items()}


def train_detector(
    model: nn.Module,
    data,
    epochs: Optional[int] = 10,
    steps: Optional[int] = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    warmup: int = 50,
    grad_clip: float = 10.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    log_fn: Optional[Callable[[dict], None]] = None,
    log_every: int = 20,
    augment: bool | BoxAugment | Callable | None = True,
) -> nn.Module:
    """Train ``model`` (a torchvision detector taking [0, 1] images) on real detection data.

    ``data`` is a dataset of ``(image, {"boxes", "labels", ...})`` or a loader of
    ``(images, targets)`` lists. Runs ``steps`` optimizer steps if given, else ``epochs``
    passes; AdamW (or SGD) with linear warm-up over ``warmup`` steps and a cosine schedule,
    gradient clipping — the engine's (:mod:`dfkd.engine`). ``augment``: ``True`` random horizontal
    flips, a :class:`BoxAugment` (or any ``(images, targets, generator) -> (images, targets)``), or
    ``None``. ``log_fn`` gets ``{"step", "lr", **mean losses}`` every ``log_every`` steps. Returns the
    model in eval mode.
    """
    device = torch.device(device)
    model.to(device)
    loader = _loader(data, batch_size, seed)
    if steps is None:
        try:
            steps = int(epochs) * len(loader)
        except TypeError:
            raise DfkdError("train_detector: give steps= for a loader without a length") from None
    steps = int(steps)
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay)  # no decay on norms/biases
    g = torch.Generator().manual_seed(seed + 1)

    def on_record(record: dict) -> None:
        if log_fn is not None:
            log_fn({"step": record["step"], "lr": record["lr"],
                    **{k: v for k, v in record.items() if k not in ("round", "step", "wall", "lr", "loss")}})

    engine = Engine(model, opt, Schedule(lr, steps, "step", min(warmup, steps // 5) / max(1, steps)),
                    device=device, grad_clip=grad_clip, progress="train detector" if progress else None,
                    on_record=on_record)
    engine.run(SupervisedDetection(model, loader, augment, device, log_every, g))
    return model.eval()


# -- memory ----------------------------------------------------------------------------------
class ImageMemory:
    """A ring buffer of images stored as float16 (0: keep only the newest batch)."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device = int(capacity), device
        self.images: Optional[torch.Tensor] = None
        self.size = self.head = 0

    def add(self, images: torch.Tensor) -> None:
        x = images.detach().to(self.device, torch.float16)
        if self.capacity <= 0:
            self.images, self.size, self.head = x, len(x), 0
            return
        if self.images is None:
            self.images = torch.empty((self.capacity, *x.shape[1:]), dtype=torch.float16, device=self.device)
        n = min(len(x), self.capacity)
        idx = (self.head + torch.arange(n, device=self.device)) % self.capacity
        self.images[idx] = x[-n:]
        self.head = int((self.head + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(self.size, (n,), generator=generator).to(self.device)
        return self.images[idx].float()

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: max(self.size, 0)].cpu()
        return {"images": images, "size": self.size, "head": self.head, "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise DfkdError(f"the saved image memory holds {state['capacity']} images, this run "
                            f"{self.capacity}; use the same memory size to resume")
        self.size, self.head = int(state["size"]), int(state["head"])
        images = state["images"]
        if images is None:
            self.images = None
            return
        images = images.to(self.device, torch.float16)
        if self.capacity <= 0:
            self.images = images
            return
        self.images = torch.empty((self.capacity, *images.shape[1:]), dtype=torch.float16, device=self.device)
        self.images[: len(images)] = images


# -- head matching ---------------------------------------------------------------------------
class _HeadOutputs:
    """Records ``model.head``'s output dict during forward passes."""

    def __init__(self, model: nn.Module):
        self.out: Optional[dict] = None
        self.handle = model.head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.out = output

    def remove(self) -> None:
        self.handle.remove()


def head_matching_loss(student_out: dict, teacher_out: dict) -> torch.Tensor:
    """BCE(student cls logits, sigmoid(teacher cls logits)) + L1(box regression) [+ BCE on centerness]."""
    loss = F.binary_cross_entropy_with_logits(student_out["cls_logits"].float(),
                                              torch.sigmoid(teacher_out["cls_logits"].float()))
    loss = loss + F.l1_loss(student_out["bbox_regression"].float(), teacher_out["bbox_regression"].float())
    if "bbox_ctrness" in student_out and "bbox_ctrness" in teacher_out:
        loss = loss + F.binary_cross_entropy_with_logits(student_out["bbox_ctrness"].float(),
                                                         torch.sigmoid(teacher_out["bbox_ctrness"].float()))
    return loss


def class_kd_loss(student_out: dict, teacher_out: dict, temperature: float = 1.0) -> torch.Tensor:
    """Foreground-weighted soft class matching between two detection heads' class logits.

    Per location, sigmoid BCE between the student's class logits and the teacher's class
    probabilities (both divided by ``temperature``), summed over classes; locations are weighted by
    the teacher's highest class probability, so the loss concentrates on the teacher's objects and
    passes on its full class distribution there (which class it *almost* chose), not only the
    arg-max that a pseudo-label keeps.
    """
    t = teacher_out["cls_logits"].detach().float()
    s = student_out["cls_logits"].float()
    w = torch.sigmoid(t).amax(-1)
    bce = F.binary_cross_entropy_with_logits(s / temperature, torch.sigmoid(t / temperature),
                                             reduction="none").sum(-1)
    return (w * bce).sum() / w.sum().clamp_min(1.0)


class _DetectInputs:
    """Records the feature maps that ``detect`` (a YOLO Detect layer) is called with."""

    def __init__(self, detect: nn.Module):
        self.out: Optional[list[torch.Tensor]] = None
        self.handle = detect.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.out = list(args[0])

    def remove(self) -> None:
        self.handle.remove()


def neck_feature_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                      channels: list[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of ‖s − t[:, channels]‖² / mean t[:, channels]²: the student's neck features
    regressed onto the teacher's at the teacher channels it holds (scale-free per level, so the wide
    low-resolution levels do not outweigh the fine ones)."""
    terms = []
    for s, t, idx in zip(student_feats, teacher_feats, channels):
        t = t.detach().float()[:, idx.to(t.device)]  # a no-op when the indices are already there
        terms.append(F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-6))
    return torch.stack(terms).mean()


def _same_geometry(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


def pseudo_targets(detections: list[dict], score_thresh: float, min_side: float = 1.0) -> list[dict]:
    """Teacher detections with score ≥ ``score_thresh`` and sides ≥ ``min_side`` px, as training targets."""
    out = []
    for d in detections:
        b = d["boxes"]
        keep = (d["scores"] >= score_thresh) & ((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)
        out.append({"boxes": b[keep].detach().float(), "labels": d["labels"][keep].detach().long()})
    return out


class DetectionDistillation(Task):
    """Detector distillation as an engine task: each round one source step into the image memory,
    then ``kd_steps`` student steps on augmented memory batches against the teacher's pseudo-boxes
    (plus head matching / class KD on the teacher's head outputs when the geometry allows)."""

    name = "distill detector"

    def __init__(self, teacher, student, source, memory: ImageMemory, augment, g: torch.Generator, batch_size: int,
                 kd_steps: int, score_thresh: float, head_matching: bool, head_weight: float, class_kd: float,
                 class_kd_temperature: float, eval_fn: Optional[Callable[[nn.Module], dict]],
                 feature_kd: float = 0.0, feature_channels: Optional[list[torch.Tensor]] = None,
                 freeze_bn: bool = False):
        self.teacher, self.student, self.source, self.memory = teacher, student, source, memory
        self.augment, self.g, self.batch_size, self.kd_steps = augment, g, int(batch_size), int(kd_steps)
        self.score_thresh, self.head_matching, self.head_weight = score_thresh, head_matching, head_weight
        self.class_kd, self.class_kd_temperature, self.eval_fn = class_kd, class_kd_temperature, eval_fn
        self.feature_kd, self.feature_channels = float(feature_kd), feature_channels
        self.freeze_bn = bool(freeze_bn)
        self.synth_seconds, self.synth_images = 0.0, 0
        self.hooks_t = self.hooks_s = self.feats_t = self.feats_s = None

    def modules(self) -> list[nn.Module]:
        return [self.student, self.teacher]

    def begin(self, engine: Engine) -> None:
        if self.head_matching or self.class_kd > 0:
            self.hooks_t, self.hooks_s = _HeadOutputs(self.teacher.model), _HeadOutputs(self.student)
        if self.feature_kd > 0:
            self.feats_t = _DetectInputs(self.teacher.model.model.head)
            self.feats_s = _DetectInputs(self.student.model.head)

    def end(self, engine: Engine) -> None:  # hooks removed on every exit path
        for h in (self.hooks_t, self.hooks_s, self.feats_t, self.feats_s):
            if h is not None:
                h.remove()
        self.hooks_t = self.hooks_s = self.feats_t = self.feats_s = None

    def round(self, engine: Engine) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = self.source.step(self.student if getattr(self.source, "uses_student", False) else None)
        self.synth_seconds += time.perf_counter() - t0
        self.synth_images += len(batch.images)
        self.memory.add(batch.images)
        self.student.train()
        if self.freeze_bn:  # normalise with the running statistics the student started with (γ, β still learn)
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        sums: dict[str, torch.Tensor] = {}  # on the device: synced once per round (the log interval)
        n_boxes = taken = 0
        for _ in range(self.kd_steps):
            if engine.finished():
                break
            x = self.memory.sample(self.batch_size, self.g)
            if self.augment is not None:
                with torch.no_grad():
                    x, _ = self.augment(x, None, generator=self.g)
                x = x.clamp(0, 1)
            dets = self.teacher.detect(x, self.score_thresh) if hasattr(self.teacher, "detect") else self.teacher(x)
            targets = pseudo_targets(dets, self.score_thresh)
            n_boxes += sum(len(t["boxes"]) for t in targets)
            losses = self.student(list(x.unbind(0)), targets)
            loss = sum(losses.values())
            parts = {k: v.detach() for k, v in losses.items()}
            if self.head_matching or self.class_kd > 0:
                if _same_geometry(self.hooks_s.out, self.hooks_t.out):
                    if self.head_matching:
                        lh = head_matching_loss(self.hooks_s.out, self.hooks_t.out)
                        loss = loss + self.head_weight * lh
                        parts["head"] = lh.detach()
                    if self.class_kd > 0:
                        lc = class_kd_loss(self.hooks_s.out, self.hooks_t.out, self.class_kd_temperature)
                        loss = loss + self.class_kd * lc
                        parts["class_kd"] = lc.detach()
                else:
                    warnings.warn("head matching / class KD skipped: teacher and student heads differ in "
                                  f"shape ({ {k: tuple(v.shape) for k, v in self.hooks_t.out.items()} } vs "
                                  f"{ {k: tuple(v.shape) for k, v in self.hooks_s.out.items()} })")
                    self.head_matching, self.class_kd = False, 0.0
            if self.feature_kd > 0:
                shapes_t = [tuple(t.shape[-2:]) for t in self.feats_t.out]
                shapes_s = [tuple(t.shape[-2:]) for t in self.feats_s.out]
                if shapes_t != shapes_s:
                    raise DfkdError(f"detection.feature_kd: the teacher's neck features are {shapes_t}, the "
                                    f"student's {shapes_s}; they need the same input size")
                lf = neck_feature_loss(self.feats_s.out, self.feats_t.out, self.feature_channels)
                loss = loss + self.feature_kd * lf
                parts["feature"] = lf.detach()
            parts["loss"] = engine.optimizer_step(loss)
            taken += 1
            for k, v in parts.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
        n = max(1, taken)
        return {**{f"kd/{k}": v / n for k, v in sums.items()},
                "kd/pseudo_boxes_per_image": n_boxes / max(1, n * self.batch_size), **batch.stats}

    def evaluate(self, engine: Engine) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        self.student.eval()
        return self.eval_fn(self.student)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "rng": self.g.get_state(),
                "source": self.source.state_dict() if hasattr(self.source, "state_dict") else None,
                "synth_seconds": self.synth_seconds, "images_synthesized": self.synth_images}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.memory.load_state_dict(st["memory"])
        self.g.set_state(st["rng"])
        if st.get("source") is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(st["source"])
        self.synth_seconds, self.synth_images = float(st["synth_seconds"]), int(st["images_synthesized"])


def distill_detector(
    teacher,
    student: nn.Module,
    source,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    score_thresh: float = 0.3,
    head_matching: bool = False,
    head_weight: float = 1.0,
    class_kd: float = 0.0,
    class_kd_temperature: float = 1.0,
    feature_kd: float = 0.0,
    feature_channels: Optional[list[torch.Tensor]] = None,
    freeze_bn: bool = False,
    memory_size: int = 4096,
    kd_steps_per_round: int = 10,
    augment: bool | BoxAugment | None = True,
    grad_clip: float = 10.0,
    budget_seconds: Optional[float] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    eval_fn: Optional[Callable[[nn.Module], dict]] = None,
    eval_every: int = 100,
    eval_every_seconds: Optional[float] = None,
    log_fn: Optional[Callable[[dict], None]] = None,
    metrics_path: Optional[str] = None,
    tensorboard_dir: Optional[str] = None,
    state: Optional[dict[str, Any]] = None,
    checkpoint_fn: Optional[Callable[[dict], None]] = None,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Distil ``student`` (a torchvision detector) from ``teacher`` (a ``DetectionTeacher``) on ``source``.

    A :class:`DetectionDistillation` task on the one engine (:mod:`dfkd.engine`). ``steps`` counts
    student optimizer steps; each round calls ``source.step()`` once (with the student when
    ``source.uses_student``) and then takes ``kd_steps_per_round`` steps on batches from the image
    memory (``memory_size`` images). ``augment``: ``True`` = flips and ±10 % translation/scale (a
    :class:`BoxAugment`), or your own, or ``None``. AdamW with a cosine schedule over ``steps`` (or
    over ``budget_seconds`` of wall time, whichever ends first). ``class_kd > 0`` adds
    :func:`class_kd_loss` (the teacher's class distribution on its objects, at
    ``class_kd_temperature``) with that weight; like ``head_matching`` it needs heads of the same
    geometry and is skipped with a warning otherwise. ``feature_kd > 0`` adds :func:`neck_feature_loss`
    with that weight: a YOLO student's Detect-layer inputs against the teacher's at ``feature_channels``
    (one index tensor per level, :func:`dfkd.detection.yolo_slim.kept_channels`). ``freeze_bn``: the
    student's BatchNorm layers normalise with the running statistics it started with (a teacher-initialised
    student keeps the teacher's; synthetic batches do not overwrite them), their γ and β still learn.
    ``eval_fn(student) -> {metric: value}`` runs at the end of the round in which the step count
    passes a multiple of ``eval_every`` (or ``eval_every_seconds`` after the last), and at the end;
    its metrics join that round's record as ``test/<name>``.

    Resuming: ``checkpoint_fn(run_state)`` is called every ``checkpoint_every`` rounds, at the end
    and on Ctrl-C with the whole run (the engine's state: student, optimizer, image memory, random
    generators, the source's ``state_dict()``, counters, history, wall time); pass it back as
    ``state=`` (same settings) and the run continues where it was. Round records go to ``log_fn``
    to ``metrics_path`` (rewritten from the saved history on resume) and TensorBoard (``tensorboard_dir``).

    Returns ``{"history", "evals", "steps", "rounds", "wall", "images_synthesized", "synth_seconds",
    "head_matching", "class_kd"}``; ``evals`` holds ``{"round", "step", "wall", **metrics}`` (time to
    accuracy).
    """
    device = torch.device(device)
    student.to(device)
    teacher.to(device)
    if augment is True:
        augment = BoxAugment(flip=True, jitter=0.1, scale=0.1)
    opt = build_optimizer(student, "adamw", lr=lr, weight_decay=weight_decay)
    memory = ImageMemory(memory_size, device)
    g = torch.Generator().manual_seed(int(seed) + 17)
    class_kd = float(class_kd)
    if (head_matching or class_kd > 0) and not (hasattr(teacher.model, "head") and hasattr(student, "head")):
        warnings.warn("head matching and class KD need torchvision detectors with a .head; skipped")
        head_matching, class_kd = False, 0.0
    if feature_kd > 0:
        from dfkd.detection.yolo import YOLOModel

        if not (isinstance(getattr(student, "model", None), YOLOModel)
                and isinstance(getattr(teacher.model, "model", None), YOLOModel)):
            raise DfkdError("detection.feature_kd needs a YOLO teacher and a YOLO student")
        levels = len(student.model.strides)
        if feature_channels is None or len(feature_channels) != levels:
            raise DfkdError("detection.feature_kd needs the teacher channels of each of the student's "
                            f"{levels} neck features (detection.student_init=teacher)")
        feature_channels = [c.to(device) for c in feature_channels]  # once, not a copy per step
    task = DetectionDistillation(teacher, student, source, memory, augment, g, batch_size, kd_steps_per_round,
                                 score_thresh, head_matching, head_weight, class_kd, class_kd_temperature, eval_fn,
                                 feature_kd, feature_channels, freeze_bn)
    engine = Engine(student, opt, Schedule(lr, int(steps), "step", 0.0, "cosine", budget_seconds), device=device,
                    grad_clip=grad_clip, checkpoint_every=checkpoint_every, save_fn=checkpoint_fn,
                    eval_every=eval_every if eval_fn is not None else 0,
                    eval_every_seconds=eval_every_seconds if eval_fn is not None else None,
                    metrics_path=metrics_path, tensorboard_dir=tensorboard_dir,
                    progress="distill detector" if progress else None, on_record=log_fn)
    out = engine.run(task, state)
    student.eval()
    return {"history": engine.history, "evals": engine.evals, "steps": out["steps"], "rounds": out["rounds"],
            "wall": round(out["wall_seconds"], 3), "images_synthesized": task.synth_images,
            "synth_seconds": round(task.synth_seconds, 3), "head_matching": bool(task.head_matching),
            "class_kd": task.class_kd}
