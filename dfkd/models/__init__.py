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


SOURCES = ("auto", "dfkd", "timm", "torchvision")


def _torchvision_spec(name: str, num_classes: int | None) -> dict:
    """Input size, normalisation, resize rule and class names from a torchvision model's documented
    weights (read from the package: nothing is downloaded)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # noqa: BLE001 - a model without documented weights
        return {}
    tf = weights.transforms()
    crop = list(getattr(tf, "crop_size", []) or [])
    resize = list(getattr(tf, "resize_size", []) or [])
    out: dict = {}
    if crop:
        out["input_size"] = [3, crop[0], crop[-1]]
        if resize:
            out["crop_pct"] = round(crop[0] / resize[0], 4)
    if getattr(tf, "mean", None):
        out["mean"], out["std"] = list(tf.mean), list(tf.std)
    interp = getattr(tf, "interpolation", None)
    if interp is not None:
        out["interpolation"] = str(getattr(interp, "value", interp)).lower()
    cats = weights.meta.get("categories")
    if cats and (num_classes is None or num_classes == len(cats)):
        out["class_names"] = list(cats)
    return out


def _build_torchvision(name: str, **kwargs: Any) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except ValueError as e:
        if name not in torchvision.models.list_models():
            raise DfkdError(f"unknown torchvision model {name!r}"
                            f"{close_matches(name, torchvision.models.list_models())}") from None
        raise DfkdError(f"torchvision model {name!r}: {e}") from None
    model._dfkd_torchvision = _torchvision_spec(name, kwargs.get("num_classes"))
    if getattr(model, "num_classes", None) is None:
        head = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if head:
            model.num_classes = head[-1].out_features
    return model


def import_callable(target: str):
    """``pkg.module:function`` or ``pkg.module.function`` → the callable (a user's own model builder)."""
    import importlib

    mod, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    if not mod or not attr:
        raise DfkdError(f"_target_ must be 'package.module:callable' or 'package.module.callable', got {target!r}")
    try:
        module = importlib.import_module(mod)
    except ImportError as e:
        raise DfkdError(f"cannot import {mod!r} for _target_={target!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise DfkdError(f"{mod!r} has no {attr!r} (_target_={target!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise DfkdError(f"_target_={target!r} is not callable")
    return fn


def build_model(name: str, checkpoint: str | Path | None = None, source: str = "auto", **kwargs: Any) -> nn.Module:
    """Build a model by project, timm or torchvision name, optionally loading a local checkpoint.

    ``source``: ``auto`` (project names, then timm, then torchvision), ``dfkd``, ``timm`` or ``torchvision``.
    Nothing is downloaded: timm models are built with ``pretrained=False``, torchvision's with ``weights=None``."""
    if source not in SOURCES:
        raise DfkdError(f"model source must be one of {', '.join(SOURCES)}, got {source!r}")
    kwargs.pop("pretrained", None)
    kwargs.pop("weights", None)
    try:
        if source in ("auto", "dfkd") and name in MODELS:
            model = MODELS.build(name, **kwargs)
        elif source == "dfkd":
            raise DfkdError(f"unknown dfkd model {name!r}{close_matches(name, list(MODELS))}")
        elif source == "torchvision":
            model = _build_torchvision(name, **kwargs)
        else:
            import timm

            if timm.is_model(name):
                model = timm.create_model(name, pretrained=False, **kwargs)
            elif source == "auto" and _is_torchvision(name):
                model = _build_torchvision(name, **kwargs)
            else:
                choices = list(MODELS) + _timm_names() if source == "auto" else _timm_names()
                raise DfkdError(f"unknown model {name!r}{close_matches(name, choices)}")
    except DfkdError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if isinstance(e, AssertionError) and "embed_dim" in kwargs and "num_heads" in kwargs:
            hint = f" (embed_dim={kwargs['embed_dim']} must be divisible by num_heads={kwargs['num_heads']})"
        raise DfkdError(f"model {name!r} with {kwargs}: {msg or 'invalid arguments'}{hint}") from None
    if checkpoint:
        load_checkpoint_into(model, checkpoint)
    return model


def _is_torchvision(name: str) -> bool:
    try:
        import torchvision

        return name in torchvision.models.list_models()
    except Exception:  # noqa: BLE001
        return False


def model_names() -> list[str]:
    return list(MODELS)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "SOURCES", "build_model", "import_callable", "model_names", "count_parameters", "torch"]
