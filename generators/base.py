"""The synthesizer protocol and the batch every synthesizer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from dfkd.registry import Registry
from dfkd.teacher import Teacher


@dataclass
class SyntheticBatch:
    images: torch.Tensor                       # (B, C, H, W), float in [0, 1], detached
    labels: Optional[torch.Tensor] = None      # class ids the synthesizer aimed at
    targets: Optional[list[dict]] = None       # detection: {"boxes": (K, 4) xyxy px, "labels": (K,)}
    teacher_logits: Optional[torch.Tensor] = None
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


class Synthesizer:
    """Base class of every synthesizer.

    ``step(student)`` returns a fresh :class:`SyntheticBatch`; methods that learn (generators)
    use ``student`` for their adversarial terms and update their own parameters inside
    ``step``. ``state_dict``/``load_state_dict`` round-trip everything needed to resume,
    including the random generator.
    """

    #: whether ``step`` needs the current student (adversarial terms)
    uses_student: bool = False
    #: whether the synthesizer reads real training images (only the real-data ceiling does)
    needs_real_data: bool = False
    #: "classification" (images + labels + teacher logits) or "detection" (images + box targets)
    task: str = "classification"

    def __init__(self, teacher: Teacher, batch_size: int = 64, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.teacher = teacher
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.num_classes = teacher.num_classes
        self.input_size = tuple(teacher.input_size)
        self.rng = torch.Generator(device=self.device).manual_seed(int(seed))
        self.cpu_rng = torch.Generator().manual_seed(int(seed) + 1)
        self._label_queue = torch.empty(0, dtype=torch.long)

    # -- helpers -------------------------------------------------------------------------
    def sample_labels(self, n: int) -> torch.Tensor:
        """Class-balanced labels: consecutive shuffled rounds over all classes."""
        while len(self._label_queue) < n:
            self._label_queue = torch.cat(
                [self._label_queue, torch.randperm(self.num_classes, generator=self.cpu_rng)]
            )
        out, self._label_queue = self._label_queue[:n], self._label_queue[n:]
        return out.to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.rng, device=self.device)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).float()

    # -- protocol ------------------------------------------------------------------------
    def step(self, student: nn.Module | None = None) -> SyntheticBatch:  # pragma: no cover
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Learnable modules of the synthesizer (empty for pixel methods)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.get_state(),
            "cpu_rng": self.cpu_rng.get_state(),
            "label_queue": self._label_queue.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"].cpu() if hasattr(state["rng"], "cpu") else state["rng"])
        self.cpu_rng.set_state(state["cpu_rng"])
        self._label_queue = state["label_queue"].clone()


SYNTHESIZERS: Registry[Synthesizer] = Registry("synthesizer")


def build_synthesizer(name: str, teacher: Teacher, **kwargs) -> Synthesizer:
    return SYNTHESIZERS.build(name, teacher=teacher, **kwargs)
