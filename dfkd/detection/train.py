"""Supervised detector training (teachers, real-data baselines) and detector distillation.

:func:`distill_detector` is the detection counterpart of :class:`dfkd.distill.Distiller`: each
round a source (box inversion, noise, real images — anything whose ``step()`` returns a
``SyntheticBatch``) adds images to a bounded memory, then the student takes
``kd_steps_per_round`` steps on augmented memory batches. Targets are the teacher's
pseudo-labels on those same augmented images (boxes with score ≥ ``score_thresh``), trained
with the student's own detection loss; optionally the student's head outputs also match the
teacher's (sigmoid BCE on class logits and centerness, L1 on box regression), and/or its class
logits match the teacher's class probabilities on the teacher's objects (``class_kd``: this passes
on which class the teacher almost chose — the knowledge that hard pseudo-labels drop).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.detection.boxes import BoxAugment, hflip
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


@contextmanager
def kept_modes(*modules: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (normal or not)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise DfkdError(f"unknown optimizer {name!r}; choose adamw or sgd")


def _cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))


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
    passes; AdamW (or SGD) with linear warm-up and a cosine schedule, gradient clipping.
    ``augment``: ``True`` random horizontal flips, a :class:`BoxAugment` (or any
    ``(images, targets, generator) -> (images, targets)``), or ``None``. Returns the model in eval mode.
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
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, min(warmup, steps // 5)))
    g = torch.Generator().manual_seed(seed + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train detector", unit="step", dynamic_ncols=True)
    step, n, running = 0, 0, {}  # running sums stay on the device: one host sync per log interval
    with kept_modes(model):
        model.train()
        try:
            while step < steps:
                for images, targets in loader:
                    if step >= steps:
                        break
                    images, targets = _augment_batch(list(images), list(targets), augment, g)
                    images = [x.to(device) for x in images]
                    targets = [{"boxes": t["boxes"].to(device).float(), "labels": t["labels"].to(device).long()}
                               for t in targets]
                    losses = model(images, targets)
                    loss = sum(losses.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    opt.step()
                    sched.step()
                    step += 1
                    n += 1
                    for k, v in {**losses, "loss": loss}.items():
                        running[k] = running.get(k, 0.0) + v.detach()
                    if bar is not None:
                        bar.update(1)
                    if step % log_every == 0 or step == steps:
                        means = dict(zip(running, (torch.stack(list(running.values())) / n).tolist()))
                        if bar is not None:
                            bar.set_postfix(loss=f"{means['loss']:.3f}")
                        if log_fn is not None:
                            log_fn({"step": step, "lr": sched.get_last_lr()[0],
                                    **{k: v for k, v in means.items() if k != "loss"}})
                        running, n = {}, 0
        finally:
            if bar is not None:
                bar.close()
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
    log_fn: Optional[Callable[[dict], None]] = None,
    state: Optional[dict[str, Any]] = None,
    checkpoint_fn: Optional[Callable[[dict], None]] = None,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Distil ``student`` (a torchvision detector) from ``teacher`` (a ``DetectionTeacher``) on ``source``.

    ``steps`` counts student optimizer steps; each round calls ``source.step()`` once (with the
    student when ``source.uses_student``) and then takes ``kd_steps_per_round`` steps on batches
    from the image memory (``memory_size`` images). ``augment``: ``True`` = flips and ±10 %
    translation/scale (a :class:`BoxAugment`), or your own, or ``None``. AdamW with a cosine
    schedule over ``steps`` (or over ``budget_seconds`` of wall time, whichever ends first).
    ``class_kd > 0`` adds :func:`class_kd_loss` (the teacher's class distribution on its objects,
    at ``class_kd_temperature``) with that weight; like ``head_matching`` it needs heads of the same
    geometry and is skipped with a warning otherwise.
    ``eval_fn(student) -> {metric: value}`` runs every ``eval_every`` steps and at the end.

    Resuming: ``checkpoint_fn(run_state)`` is called every ``checkpoint_every`` rounds (and when
    the run ends or is interrupted) with the whole run — student, optimizer, image memory, random
    generators, the source's ``state_dict()`` when it has one, counters, history and the wall time
    spent; pass that dict back as ``state=`` (same settings) and the run continues where it was.

    Returns ``{"history": [...], "evals": [...], "steps", "rounds", "wall", "images_synthesized",
    "synth_seconds", "head_matching", "class_kd"}``; ``evals`` holds ``{"step", "wall", **metrics}``
    (time to accuracy).
    """
    device = torch.device(device)
    student.to(device)
    teacher.to(device)
    if augment is True:
        augment = BoxAugment(flip=True, jitter=0.1, scale=0.1)
    opt = _optimizer([p for p in student.parameters() if p.requires_grad], "adamw", lr, weight_decay)
    memory = ImageMemory(memory_size, device)
    g = torch.Generator().manual_seed(int(seed) + 17)
    class_kd = float(class_kd)
    if (head_matching or class_kd > 0) and not (hasattr(teacher.model, "head") and hasattr(student, "head")):
        warnings.warn("head matching and class KD need torchvision detectors with a .head; skipped")
        head_matching, class_kd = False, 0.0
    history: list[dict] = []
    evals: list[dict] = []
    synth_seconds, synth_images, step, rounds, spent = 0.0, 0, 0, 0, 0.0
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        memory.load_state_dict(state["memory"])
        g.set_state(state["rng"])
        if state.get("source") is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(state["source"])
        history, evals = list(state["history"]), list(state["evals"])
        synth_seconds, synth_images = float(state["synth_seconds"]), int(state["images_synthesized"])
        step, rounds, spent = int(state["step"]), int(state["rounds"]), float(state["wall"])
    start = time.perf_counter() - spent  # wall time counts across resumes

    def run_state() -> dict[str, Any]:
        return {"student": student.state_dict(), "optimizer": opt.state_dict(), "memory": memory.state_dict(),
                "rng": g.get_state(),
                "source": source.state_dict() if hasattr(source, "state_dict") else None,
                "history": history, "evals": evals, "synth_seconds": synth_seconds,
                "images_synthesized": synth_images, "step": step, "rounds": rounds,
                "wall": time.perf_counter() - start}

    def run_eval() -> None:
        if eval_fn is None:
            return
        flags = [p.requires_grad for p in student.parameters()]
        with kept_modes(student), torch.no_grad():
            student.eval()
            metrics = eval_fn(student)
        for p, f in zip(student.parameters(), flags):  # e.g. an eval_fn that wraps it in a DetectionTeacher
            p.requires_grad_(f)
        evals.append({"step": step, "wall": round(time.perf_counter() - start, 3), **metrics})
        if log_fn is not None and metrics:
            log_fn({"step": step, **{f"test/{k}": v for k, v in metrics.items()}})

    bar = hooks_t = hooks_s = None
    try:  # hooks removed and the modules' modes restored on every exit path
        with kept_modes(student, teacher):
            if head_matching or class_kd > 0:
                hooks_t, hooks_s = _HeadOutputs(teacher.model), _HeadOutputs(student)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, initial=min(step, steps), desc="distill detector", unit="step",
                           dynamic_ncols=True)
            while step < steps:
                wall = time.perf_counter() - start
                if budget_seconds is not None and wall >= budget_seconds:
                    break
                t0 = time.perf_counter()
                batch = source.step(student if getattr(source, "uses_student", False) else None)
                synth_seconds += time.perf_counter() - t0
                synth_images += len(batch.images)
                memory.add(batch.images)
                student.train()
                sums: dict[str, torch.Tensor] = {}  # on the device: synced once per round (the log interval)
                n_boxes = taken = 0
                for _ in range(kd_steps_per_round):
                    if step >= steps:
                        break
                    progress_frac = step / max(1, steps)
                    if budget_seconds:
                        progress_frac = max(progress_frac, (time.perf_counter() - start) / budget_seconds)
                    for grp in opt.param_groups:
                        grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))
                    x = memory.sample(batch_size, g)
                    if augment is not None:
                        with torch.no_grad():
                            x, _ = augment(x, None, generator=g)
                        x = x.clamp(0, 1)
                    dets = teacher.detect(x, score_thresh) if hasattr(teacher, "detect") else teacher(x)
                    targets = pseudo_targets(dets, score_thresh)
                    n_boxes += sum(len(t["boxes"]) for t in targets)
                    losses = student(list(x.unbind(0)), targets)
                    loss = sum(losses.values())
                    parts = {k: v.detach() for k, v in losses.items()}
                    if head_matching or class_kd > 0:
                        if _same_geometry(hooks_s.out, hooks_t.out):
                            if head_matching:
                                lh = head_matching_loss(hooks_s.out, hooks_t.out)
                                loss = loss + head_weight * lh
                                parts["head"] = lh.detach()
                            if class_kd > 0:
                                lc = class_kd_loss(hooks_s.out, hooks_t.out, class_kd_temperature)
                                loss = loss + class_kd * lc
                                parts["class_kd"] = lc.detach()
                        else:
                            warnings.warn("head matching / class KD skipped: teacher and student heads differ in "
                                          f"shape ({ {k: tuple(v.shape) for k, v in hooks_t.out.items()} } vs "
                                          f"{ {k: tuple(v.shape) for k, v in hooks_s.out.items()} })")
                            head_matching, class_kd = False, 0.0
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
                    opt.step()
                    step += 1
                    taken += 1
                    parts["loss"] = loss.detach()
                    for k, v in parts.items():
                        sums[k] = sums[k] + v.float() if k in sums else v.float()
                    if bar is not None:
                        bar.update(1)
                    if eval_every and step % eval_every == 0 and step < steps:
                        run_eval()
                rounds += 1
                n = max(1, taken)
                means = dict(zip(sums, (torch.stack(list(sums.values())) / n).tolist())) if sums else {}
                record = {"round": rounds, "step": step, "wall": round(time.perf_counter() - start, 3),
                          "lr": opt.param_groups[0]["lr"], **{f"kd/{k}": v for k, v in means.items()},
                          "kd/pseudo_boxes_per_image": n_boxes / max(1, n * batch_size), **batch.stats}
                history.append(record)
                if log_fn is not None:
                    log_fn(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record.get('kd/loss', 0.0):.3f}")
                if checkpoint_fn is not None and checkpoint_every and rounds % checkpoint_every == 0:
                    checkpoint_fn(run_state())
    except KeyboardInterrupt:
        if checkpoint_fn is not None:  # keep what the interrupted round finished
            checkpoint_fn(run_state())
        raise
    finally:
        if bar is not None:
            bar.close()
        for h in (hooks_t, hooks_s):
            if h is not None:
                h.remove()
    if not evals or evals[-1]["step"] != step:
        run_eval()
    if checkpoint_fn is not None:
        checkpoint_fn(run_state())
    student.eval()
    return {"history": history, "evals": evals, "steps": step, "rounds": rounds,
            "wall": round(time.perf_counter() - start, 3), "images_synthesized": synth_images,
            "synth_seconds": round(synth_seconds, 3), "head_matching": bool(head_matching),
            "class_kd": class_kd}
