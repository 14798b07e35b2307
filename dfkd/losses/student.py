"""Student objectives: what the student minimises on a batch of (augmented) images.

A student loss is a callable ``loss(student, teacher, images, teacher_logits=None) -> (loss, stats)``.
It runs the models itself, so losses that need intermediate features (distillation tokens,
manifold relations) can read them without changes to the loop. Registered in :data:`STUDENT_LOSSES`
and chosen by the ``loss`` config group.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dfkd.losses.kd import kd_loss
from dfkd.registry import Registry

STUDENT_LOSSES: Registry["StudentLoss"] = Registry("student loss")


class StudentLoss:
    def __call__(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError  # pragma: no cover


@STUDENT_LOSSES.register("kd")
class LogitKD(StudentLoss):
    """Hinton KD on logits, T²·KL(teacher ‖ student) at temperature T (plus optional hard-label CE
    on the teacher's arg-max, weight ``hard``)."""

    def __init__(self, temperature: float = 4.0, hard: float = 0.0):
        self.temperature = float(temperature)
        self.hard = float(hard)

    def __call__(self, student, teacher, images, teacher_logits=None):
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher(images)
        s = student(images)
        loss = kd_loss(s, teacher_logits, self.temperature)
        if self.hard > 0:
            loss = loss + self.hard * nn.functional.cross_entropy(s.float(), teacher_logits.argmax(1))
        return loss, {}


def build_student_loss(name: str, **kwargs) -> StudentLoss:
    return STUDENT_LOSSES.build(name, **kwargs)


from dfkd.losses import deit as _deit  # noqa: E402,F401  (registers the ViT losses: vit, deit, manifold, feature)


def classifier_head(model: nn.Module, num_classes: Optional[int] = None) -> nn.Linear:
    """The network's classifier: its last ``nn.Linear`` (with ``num_classes`` outputs when given)."""
    from dfkd.errors import DfkdError

    inner = getattr(model, "module", model)
    inner = getattr(inner, "model", inner)
    heads = [m for m in inner.modules() if isinstance(m, nn.Linear)
             and (num_classes is None or m.out_features == num_classes)]
    if not heads:
        raise DfkdError(f"the penultimate-feature loss needs a classifier nn.Linear in {type(inner).__name__}; "
                        "it has none (use loss=kd)")
    return heads[-1]


class _HeadInput:
    """Context manager: ``.value`` is the input of ``head`` in the forward passes run inside it."""

    def __init__(self, head: nn.Module):
        self.head, self.value = head, None

    def __enter__(self):
        self._h = self.head.register_forward_pre_hook(lambda _m, args: setattr(self, "value", args[0]))
        return self

    def __exit__(self, *exc):
        self._h.remove()
        return False


@STUDENT_LOSSES.register("penultimate")
class PenultimateKD(nn.Module, StudentLoss):
    """Logit KD plus regression of the student's penultimate features (the input of its classifier) onto
    the teacher's: ``kd``·T²·KL + ``feature``·‖proj(f_s) − f_t‖² / mean ‖f_t‖² (scale-free). ``proj`` is
    a learned Linear where the widths differ and the identity otherwise (``project='always'``: always
    learned). On a synthetic image the teacher's logits give one number per class; its features give one per
    channel, so each image carries more of what the teacher knows (SimKD, Chen et al. 2022, regresses the
    same features)."""

    def __init__(self, kd: float = 1.0, feature: float = 1.0, temperature: float = 4.0, hard: float = 0.0,
                 project: str = "auto", head_from_teacher: bool = False):
        super().__init__()
        from dfkd.errors import DfkdError

        if min(kd, feature, hard) < 0:
            raise DfkdError(f"loss weights must be >= 0, got kd={kd}, feature={feature}, hard={hard}")
        if project not in ("auto", "always"):
            raise DfkdError(f"loss.project must be 'auto' or 'always', got {project!r}")
        self.w_kd, self.w_feature, self.temperature, self.hard = float(kd), float(feature), float(temperature), float(hard)
        self.project, self.head_from_teacher = project, bool(head_from_teacher)
        self.proj: nn.Module = nn.Identity()
        self._heads: Optional[tuple[nn.Linear, nn.Linear]] = None

    def setup(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        from dfkd.errors import DfkdError

        if teacher is None:
            raise DfkdError("the penultimate-feature loss needs the teacher (distill.teacher_logits=live)")
        hs = classifier_head(student)
        ht = classifier_head(teacher, hs.out_features)
        if self.project == "always" or hs.in_features != ht.in_features:
            self.proj = nn.Linear(hs.in_features, ht.in_features).to(hs.weight.device)
        if self.head_from_teacher:
            # SimKD-style: the student starts from the teacher's classifier, so regressing the features onto
            # the teacher's moves its logits towards the teacher's from the first step (called before any
            # checkpoint is restored: a resumed run keeps its trained head)
            if not isinstance(self.proj, nn.Identity) or hs.weight.shape != ht.weight.shape \
                    or (hs.bias is None) != (ht.bias is None):
                raise DfkdError(f"loss.head_from_teacher needs classifiers of the same shape; the student's is "
                                f"{tuple(hs.weight.shape)}, the teacher's {tuple(ht.weight.shape)} (set it false)")
            with torch.no_grad():
                hs.weight.copy_(ht.weight)
                if hs.bias is not None:
                    hs.bias.copy_(ht.bias)
        self._heads = (hs, ht)

    def forward(self, student, teacher, images, teacher_logits=None):
        if self._heads is None:
            self.setup(student, teacher)
        hs, ht = self._heads
        with torch.no_grad(), _HeadInput(ht) as cap_t:
            t_out = teacher(images)
        if teacher_logits is None:
            teacher_logits = t_out
        with _HeadInput(hs) as cap_s:
            s = student(images)
        f_s, f_t = cap_s.value.flatten(1).float(), cap_t.value.flatten(1).float()
        feat = (self.proj(f_s) - f_t).pow(2).sum(1).mean() / f_t.pow(2).sum(1).mean().clamp_min(1e-8)
        loss = self.w_kd * kd_loss(s, teacher_logits, self.temperature) + self.w_feature * feat
        if self.hard > 0:
            loss = loss + self.hard * nn.functional.cross_entropy(s.float(), teacher_logits.argmax(1))
        return loss, {"loss/feature": float(feat.detach())}
