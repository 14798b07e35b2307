"""Teacher and student wrappers: models that take [0, 1] pixels and normalise themselves."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from dfkd.hooks import StatisticsPrior, build_prior


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]; carries the input metadata."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: Sequence[int],
        num_classes: int,
    ):
        super().__init__()
        self.model = model
        c = int(input_size[0])
        mean = list(mean) * c if len(mean) == 1 and c > 1 else list(mean)
        std = list(std) * c if len(std) == 1 and c > 1 else list(std)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values for {c} input channels, got {len(mean)}/{len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.input_size = tuple(int(s) for s in input_size)
        self.num_classes = int(num_classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))

    def metadata(self) -> dict:
        return {
            "mean": [round(v, 6) for v in self.mean.flatten().tolist()],
            "std": [round(v, 6) for v in self.std.flatten().tolist()],
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
        }


class Teacher(Normalized):
    """A frozen, eval-mode model that takes [0, 1] images.

    ``statistics(kind)`` opens a prior on the wrapped model (``auto``: BatchNorm statistics
    when the model has BatchNorm layers, otherwise a prior that fits it, e.g. a ViT's).
    """

    def __init__(self, model: nn.Module, mean, std, input_size, num_classes, spec=None):
        super().__init__(model, mean, std, input_size, num_classes)
        self.spec = spec
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_module(cls, model: nn.Module, *, input_size=None, num_classes=None, mean=None, std=None,
                    interpolation=None, crop_pct=None, class_names=None, check: bool = True) -> "Teacher":
        """Any trained ``nn.Module`` as a teacher. Fields not given come from the model itself (timm's
        ``pretrained_cfg`` corrected by the built architecture, torchvision's documented transforms); a
        field nobody gives is a one-line :class:`dfkd.errors.DfkdError`. ``check`` runs one forward pass
        to make sure the model takes that input and gives ``num_classes`` outputs."""
        from dfkd.spec import check_output_size, from_model, resolve_spec

        given = {"input_size": input_size, "num_classes": num_classes, "mean": mean, "std": std,
                 "interpolation": interpolation, "crop_pct": crop_pct, "class_names": class_names}
        own, source = from_model(model)
        spec = resolve_spec([("given", given), (source, own)])
        if check:
            check_output_size(model, spec)
        return cls.from_spec(model, spec)

    @classmethod
    def from_spec(cls, model: nn.Module, spec) -> "Teacher":
        return cls(model, spec.mean, spec.std, spec.input_size, spec.num_classes, spec=spec)

    def metadata(self) -> dict:
        meta = super().metadata()
        if self.spec is not None:
            meta.update({"interpolation": self.spec.interpolation, "crop_pct": self.spec.crop_pct})
            if self.spec.class_names:
                meta["class_names"] = list(self.spec.class_names)
        return meta

    def train(self, mode: bool = True) -> "Teacher":
        # A teacher stays in eval mode: BatchNorm must use its running statistics.
        return super().train(False)

    @contextmanager
    def statistics(self, kind: str = "auto", **kwargs) -> Iterator[StatisticsPrior]:
        prior = build_prior(self.model, kind, **kwargs)
        with prior:
            yield prior
