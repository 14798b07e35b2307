"""Top-1 / top-5 accuracy of a model that takes [0, 1] images on a real test set."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 512, device: torch.device | str = "cpu",
             confusion: bool = False) -> dict[str, Any]:
    """``dataset``: anything with ``batches(batch_size)`` of ([0, 1] images, labels) — an in-memory
    :class:`dfkd.data.ArrayDataset`, a teacher-adapted view of one, or a streamed image folder.

    Counts stay on the device and are read once at the end. ``confusion=True`` adds the confusion matrix
    (rows: true class, columns: predicted) and per-class accuracy over the classes present."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    cm = None
    try:
        for x, y in dataset.batches(batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum()
            correct5 += hit.any(dim=1).sum()
            total += len(y)
            if confusion:
                n = logits.shape[1]
                if cm is None:
                    cm = torch.zeros(n, n, dtype=torch.long, device=device)
                cm += torch.bincount(y * n + top[:, 0], minlength=n * n).view(n, n)
    finally:
        model.train(was_training)
    if total == 0:
        from dfkd.errors import DfkdError

        raise DfkdError("the test set has no readable images")
    out: dict[str, Any] = {"top1": int(correct1) / total, "top5": int(correct5) / total, "loss": float(loss) / total,
                           "n": total}
    if confusion and cm is not None:
        cm = cm.cpu()
        support = cm.sum(1)
        out["confusion"] = cm.tolist()
        out["per_class"] = {int(c): float(cm[c, c]) / int(support[c]) for c in range(len(cm)) if support[c] > 0}
    return out
