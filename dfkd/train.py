"""Supervised training of a classifier on real data (teachers for the built-in tasks)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.data import ArrayDataset
from dfkd.eval.classification import evaluate


def train_classifier(
    model: nn.Module,
    train: ArrayDataset,
    test: Optional[ArrayDataset] = None,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    augment: Optional[nn.Module] = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    label_smoothing: float = 0.0,
    progress: bool = True,
    optimizer: str = "sgd",
) -> dict[str, float]:
    """SGD with Nesterov momentum and a cosine schedule; ``model`` takes [0, 1] images."""
    device = torch.device(device)
    model.to(device).train()
    from dfkd.optim import OPTIMIZERS, build_optimizer, lr_factor

    if optimizer not in OPTIMIZERS:  # adamw for ViTs: they train poorly with SGD
        from dfkd.errors import DfkdError

        raise DfkdError(f"teacher.train.optimizer must be sgd or adamw, got {optimizer!r}")
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s / total))
    g = torch.Generator().manual_seed(seed)
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="train teacher", unit="epoch", dynamic_ncols=True)
    for _ in it:
        model.train()
        for x, y in train.batches(batch_size, shuffle=True, generator=g):
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x)
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return evaluate(model, test, device=device) if test is not None else {}
