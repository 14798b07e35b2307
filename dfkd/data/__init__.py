"""Real datasets: the built-in digits, CIFAR-10 ``.npz`` files, image folders.

Every dataset yields images as float tensors in [0, 1], shape (C, H, W), and int64 labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from dfkd.errors import DfkdError
from dfkd.registry import Registry


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory (uint8 [0, 255] or float [0, 1], NCHW) with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i: int):
        return self._float(self.images[i]), self.labels[i]

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._float(self.images[index]), self.labels[index]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield self.take(order[s : s + batch_size])


@dataclass
class DataSpec:
    """What a task's data looks like; the teacher and student are built to match it."""

    name: str
    train: Optional[ArrayDataset]
    test: ArrayDataset
    num_classes: int
    input_size: tuple[int, int, int]
    mean: Sequence[float]
    std: Sequence[float]
    class_names: list[str] = field(default_factory=list)


DATASETS: Registry[DataSpec] = Registry("dataset")


@DATASETS.register("digits")
def load_digits(seed: int = 0, test_fraction: float = 0.3, train: bool = True, **_: object) -> DataSpec:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images), split by ``seed``."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return DataSpec(
        name="digits",
        train=ArrayDataset(x[tr], y[tr]),
        test=ArrayDataset(x[te], y[te]),
        num_classes=10,
        input_size=(1, 8, 8),
        mean=(0.3,),
        std=(0.4,),
        class_names=[str(i) for i in range(10)],
    )


def _cifar_dir(root: str | Path | None) -> Path:
    if root is None or str(root) in ("", "None", "null"):
        raise DfkdError("CIFAR-10 needs data.root: a folder holding cifar10_test.npz (or its cifar10/ folder); "
                        "set it with data.root=PATH or the DFKD_DATA environment variable")
    root = Path(root).expanduser()
    for cand in (root, root / "cifar10"):
        if (cand / "cifar10_test.npz").is_file():
            return cand
    raise DfkdError(f"no cifar10_test.npz in {root} or {root / 'cifar10'}")


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = torch.from_numpy(np.ascontiguousarray(z["images"].transpose(0, 3, 1, 2)))
            labels = torch.from_numpy(z["labels"].astype(np.int64))
            classes = [str(c) for c in z["classes"]] if "classes" in z else []
    except (OSError, KeyError, ValueError) as e:
        raise DfkdError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return images, labels, classes


@DATASETS.register("cifar10")
def load_cifar10(root: str | Path | None = None, train: bool = True, train_limit: int | None = None,
                 test_limit: int | None = None, seed: int = 0, **_: object) -> DataSpec:
    """CIFAR-10 from ``cifar10_test.npz`` and ``cifar10_train_part{0..4}of5.npz`` (uint8 HWC)."""
    d = _cifar_dir(root)
    xte, yte, classes = _read_npz(d / "cifar10_test.npz")
    train_ds = None
    if train:
        parts = sorted(d.glob("cifar10_train_part*of*.npz"))
        if parts:
            xs, ys = zip(*[_read_npz(p)[:2] for p in parts])
            xtr, ytr = torch.cat(xs), torch.cat(ys)
            if train_limit:
                g = torch.Generator().manual_seed(seed)
                keep = torch.randperm(len(ytr), generator=g)[: int(train_limit)]
                xtr, ytr = xtr[keep], ytr[keep]
            train_ds = ArrayDataset(xtr, ytr)
    if test_limit:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(yte), generator=g)[: int(test_limit)].sort().values
        xte, yte = xte[keep], yte[keep]
    return DataSpec(
        name="cifar10",
        train=train_ds,
        test=ArrayDataset(xte, yte),
        num_classes=10,
        input_size=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=classes or ["airplane", "automobile", "bird", "cat", "deer",
                                "dog", "frog", "horse", "ship", "truck"],
    )


def load_dataset(name: str, **kwargs) -> DataSpec:
    return DATASETS.build(name, **kwargs)
