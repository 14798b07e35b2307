"""The synthesizer protocol and the batch every synthesizer returns."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
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
    #: mode-collapse health check: warn once when the requested-class agreement stays at or below
    #: ``collapse_factor`` × chance for ``collapse_patience`` rounds in a row
    collapse_patience: int = 10
    collapse_factor: float = 2.0

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
        self._low_agreement_rounds = 0
        self._collapse_warned = False

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

    def class_stats(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """What the teacher makes of a batch aimed at ``labels`` (logits of the un-augmented images):

        - ``syn/teacher_acc``: fraction of images the teacher assigns to the requested class;
        - ``syn/class_entropy``: entropy of the batch-mean teacher distribution over log(K)
          (1: the batch spreads evenly over the classes, 0: every image is one class);
        - ``syn/top_class_share``: fraction of the images in the teacher's most frequent class.

        Also runs the mode-collapse health check (one warning on the ``dfkd`` logger).
        """
        t = teacher_logits.detach().float()
        pred = t.argmax(1)
        acc = float((pred == labels.to(pred.device)).float().mean())
        p_mean = F.softmax(t, dim=1).mean(0)
        k = t.shape[1]
        entropy = float(-(p_mean * p_mean.clamp_min(1e-12).log()).sum()) / math.log(k) if k > 1 else 0.0
        share = float(torch.bincount(pred, minlength=k).max()) / max(1, len(pred))
        self._check_collapse(acc)
        return {"syn/teacher_acc": acc, "syn/class_entropy": entropy, "syn/top_class_share": share}

    @staticmethod
    def class_spread(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Diversity inside each requested class: ``syn/class_spread`` is the per-pixel standard
        deviation over the images made for one class, averaged over pixels and over the classes with at
        least two images (0: every image of a class is the same)."""
        x = images.detach().float().flatten(1)
        labels = labels.to(x.device)
        spreads = [x[labels == c].std(0).mean() for c in labels.unique() if int((labels == c).sum()) > 1]
        return {"syn/class_spread": float(torch.stack(spreads).mean())} if spreads else {}

    def _check_collapse(self, acc: float) -> None:
        chance = 1.0 / max(1, self.num_classes)
        if acc <= self.collapse_factor * chance:
            self._low_agreement_rounds += 1
        else:
            self._low_agreement_rounds = 0
        if self._low_agreement_rounds >= self.collapse_patience and not self._collapse_warned:
            self._collapse_warned = True
            logging.getLogger("dfkd").warning(
                "%s: the teacher agreed with the requested class on %.1f %% of the last batch and at most "
                "%.0f %% for %d rounds in a row (chance %.0f %%): the synthesizer is not making the classes it "
                "is asked for (mode collapse); raise its cross-entropy / statistics-prior weights or delay "
                "the adversarial term", type(self).__name__, 100 * acc, 100 * self.collapse_factor * chance,
                self._low_agreement_rounds, 100 * chance)

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
