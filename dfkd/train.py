"""Supervised training of a classifier on real data (teachers for the built-in tasks, the ViT
teacher script), as a task on the one engine (:mod:`dfkd.engine`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.data import ArrayDataset
from dfkd.engine import Engine, Schedule, Task, amp_dtype
from dfkd.eval.classification import evaluate


class SupervisedClassification(Task):
    """A round is one pass over the training set (the last one stops at the step budget)."""

    name = "train"

    def __init__(self, model: nn.Module, train: ArrayDataset, test: Optional[ArrayDataset], batch_size: int,
                 augment: Optional[nn.Module], device: torch.device, seed: int, label_smoothing: float):
        self.model, self.train, self.test, self.batch_size = model, train, test, int(batch_size)
        self.augment, self.device, self.label_smoothing = augment, device, float(label_smoothing)
        self.g = torch.Generator().manual_seed(seed)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def round(self, engine: Engine) -> dict[str, Any]:
        self.model.train()
        total, n = None, 0  # summed on the device: one host sync per epoch
        for x, y in self.train.batches(self.batch_size, shuffle=True, generator=self.g):
            if engine.finished():
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.augment is not None:
                with torch.no_grad():
                    x = self.augment(x)
            with engine.autocast():
                loss = F.cross_entropy(engine.train_model(x).float(), y, label_smoothing=self.label_smoothing)
            loss = engine.optimizer_step(loss)
            total = loss if total is None else total + loss
            n += 1
        return {"loss": total / n if n else 0.0}

    def evaluate(self, engine: Engine) -> dict[str, float]:
        if self.test is None or not engine.finished():
            return {}  # the test set is scored once, at the end
        return evaluate(self.model, self.test, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.g.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g.set_state(state["rng"])


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
    warmup: float = 0.0,
    grad_clip: float = 0.0,
    amp: str = "none",
    max_steps: Optional[int] = None,
    desc: str = "train teacher",
) -> dict[str, float]:
    """SGD with Nesterov momentum (or AdamW) with linear warm-up over the first ``warmup`` fraction
    and a cosine schedule over the steps; ``model`` takes [0, 1] images. Returns the test metrics
    (``{}`` without a test set)."""
    device = torch.device(device)
    model.to(device).train()
    from dfkd.optim import OPTIMIZERS, build_optimizer

    if optimizer not in OPTIMIZERS:  # adamw for ViTs: they train poorly with SGD
        from dfkd.errors import DfkdError

        raise DfkdError(f"teacher.train.optimizer must be sgd or adamw, got {optimizer!r}")
    opt = build_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(len(train) / batch_size)
    if max_steps is not None:
        total = min(total, int(max_steps))
    engine = Engine(model, opt, Schedule(lr, total, "step", warmup), device=device, amp=amp_dtype(amp, device),
                    grad_clip=grad_clip, progress=desc if progress else None)
    engine.run(SupervisedClassification(model, train, test, batch_size, augment, device, seed, label_smoothing))
    model.eval()
    return dict(engine.last_eval)
