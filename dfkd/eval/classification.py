"""Top-1 / top-5 accuracy of a model that takes [0, 1] images on a real test set."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.data import ArrayDataset


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset, batch_size: int = 512,
             device: torch.device | str = "cpu") -> dict[str, float]:
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
    loss = 0.0
    for x, y in dataset.batches(batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        total += len(y)
    model.train(was_training)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss / total}
