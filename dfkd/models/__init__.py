"""Model building: the project's own models by name, any timm model by name, plus checkpoints.

``build_model("resnet56_cifar", num_classes=10, checkpoint="r56.th")`` and
``build_model("vit_tiny_patch16_224", img_size=32, patch_size=4)`` use the same call.
Project names are tried first; every other name goes to ``timm.create_model`` with
``pretrained=False`` (nothing is ever downloaded).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError, close_matches
from dfkd.models.checkpoint import load_checkpoint_into
from dfkd.models.cnn import SmallCNN
from dfkd.models.resnet_cifar import ResNetCifar
from dfkd.models.resnet_wide import ResNetCifarWide, WideResNet
from dfkd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")

MODELS.register("small_cnn")(SmallCNN)
for _depth in (20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}_cifar")(partial(ResNetCifar, depth=_depth))
MODELS.register("resnet18_cifar")(partial(ResNetCifarWide, layers=(2, 2, 2, 2)))
MODELS.register("resnet34_cifar")(partial(ResNetCifarWide, layers=(3, 4, 6, 3)))
for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"wrn{_d}_{_w}")(partial(WideResNet, depth=_d, width=_w))


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def build_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by project or timm name, optionally loading a local checkpoint."""
    if name in MODELS:
        try:
            model = MODELS.build(name, **kwargs)
        except TypeError as e:
            raise DfkdError(f"model {name!r}: {e}") from None
    else:
        import timm

        if not timm.is_model(name):
            choices = list(MODELS) + _timm_names()
            raise DfkdError(f"unknown model {name!r}{close_matches(name, choices)}")
        kwargs.pop("pretrained", None)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as e:
            raise DfkdError(f"model {name!r}: {e}") from None
    if checkpoint:
        load_checkpoint_into(model, checkpoint)
    return model


def model_names() -> list[str]:
    return list(MODELS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "model_names", "count_parameters", "torch"]
