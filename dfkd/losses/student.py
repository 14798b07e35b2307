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
