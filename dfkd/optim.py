"""The one optimizer and learning-rate schedule builder every training loop uses.

Weight decay applies to weight matrices and convolution kernels only: not to biases, normalisation
parameters, position embeddings or class/distillation tokens (what timm's ``no_weight_decay()`` lists,
and every parameter with fewer than two dimensions) — decaying those hurts ViTs in particular.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from dfkd.errors import DfkdError

OPTIMIZERS = ("adamw", "sgd")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that take no weight decay, from every submodule's ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if callable(fn):
            try:
                listed = fn()
            except Exception:  # noqa: BLE001 - a module's own helper; only a hint
                continue
            for n in listed:
                names.add(f"{prefix}.{n}" if prefix else str(n))
    return names


def param_groups(model: nn.Module, weight_decay: float, extra: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Two groups: decayed weights, and everything that should not be decayed."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = name.split("model.", 1)[1] if name.startswith("model.") else name
        if p.ndim <= 1 or name in skip or bare in skip or any(name.endswith("." + s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    for p in extra:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05,
                    momentum: float = 0.9, extra: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, extra)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise DfkdError(f"unknown optimizer {name!r}; choose {' or '.join(OPTIMIZERS)}")


def lr_factor(progress: float, warmup: float = 0.0, schedule: str = "cosine") -> float:
    """Linear warm-up over the first ``warmup`` fraction of the run, then cosine to 0 (or constant);
    ``progress`` is the fraction of the run done (rounds, steps or wall-clock budget, whichever is further)."""
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    if schedule == "cosine":
        p = (progress - warmup) / max(1e-8, 1 - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))
    return 1.0


def grad_scaler(amp_dtype: Optional[torch.dtype], device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if amp_dtype is torch.float16:
        return torch.amp.GradScaler(device.type)
    return None
