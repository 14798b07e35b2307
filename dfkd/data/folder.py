"""Test images in a folder per class (``DIR/<class name>/<image>``, torchvision ``ImageFolder``), streamed.

The images are read by a ``DataLoader`` with workers, batch by batch, through the teacher's eval
transform (resize to size / crop_pct, centre crop); nothing holds the whole set in memory. Files
that are not images (by extension) are ignored; images that cannot be decoded are skipped and
counted (``skipped``), not a crash.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import torch

from dfkd.errors import DfkdError

log = logging.getLogger("dfkd")


class _Files(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im.load()
                return self.transform(im), label
        except Exception:  # noqa: BLE001 - a corrupt or truncated image: skipped and counted
            return None


def _collate(items):
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), skipped


class FolderDataset:
    """A streamed image folder; :meth:`set_transform` gives it the teacher's eval transform and the
    folder-class → teacher-class mapping before use."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], workers: int = 2):
        self.root, self.classes, self.samples = root, classes, samples
        self.workers = int(workers)
        self.transform = None
        self.label_map: Optional[list[int]] = None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_transform(self, transform, label_map: Optional[list[int]] = None) -> None:
        self.transform = transform
        self.label_map = label_map

    def _mapped(self) -> list[tuple[str, int]]:
        if self.label_map is None:
            return self.samples
        return [(p, self.label_map[y]) for p, y in self.samples]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self._mapped()], dtype=torch.long)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.transform is None:
            raise RuntimeError("FolderDataset.set_transform must be called before reading")
        loader = torch.utils.data.DataLoader(_Files(self._mapped(), self.transform), batch_size=batch_size,
                                             shuffle=False, num_workers=self.workers, collate_fn=_collate)
        skipped = 0
        for x, y, n_bad in loader:
            skipped += n_bad
            if x is not None:
                yield x, y
        if skipped and skipped != self.skipped:
            log.warning("test folder %s: %d file(s) could not be read as images and were skipped", self.root, skipped)
        self.skipped = skipped


def scan_image_folder(path, workers: int = 2):
    """``DIR/<class>/<image>`` → a :class:`dfkd.data.DataSpec` whose ``test`` streams the images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from dfkd.data import DataSpec

    if path is None or str(path) in ("", "None", "null"):
        raise DfkdError("data=image_folder needs data.path=DIR (one sub-folder of images per class)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DfkdError(f"data.path is not a folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DfkdError(f"no class sub-folders in {root} (expected DIR/<class name>/<image files>)")
    samples: list[tuple[str, int]] = []
    ignored = 0
    for k, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if not f.is_file():
                continue
            if f.suffix.lower() in IMG_EXTENSIONS:
                samples.append((str(f), k))
            else:
                ignored += 1
    if not samples:
        raise DfkdError(f"no image files in the class folders of {root}")
    if ignored:
        log.info("test folder %s: %d file(s) without an image extension ignored", root, ignored)
    ds = FolderDataset(root, classes, samples, workers=workers)
    return DataSpec(name=root.name, train=None, test=ds, num_classes=len(classes), input_size=(0, 0, 0),
                    mean=(), std=(), class_names=classes)


def export_image_folder(images, labels, class_names: list[str], out, limit: int | None = None) -> int:
    """Write uint8 images (N, H, W, C) or (N, C, H, W) as ``out/<class name>/<index>.png``; returns the count.

    Turns an array test set (e.g. the CIFAR ``.npz`` layout) into the image folder users have, for
    ``data=image_folder``. Files are written under a temporary name and renamed."""
    import os

    import numpy as np
    from PIL import Image

    out = Path(out)
    x = np.asarray(images)
    if x.ndim != 4:
        raise DfkdError(f"images must be (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    y = np.asarray(labels)
    n = len(x) if limit is None else min(len(x), int(limit))
    for c in class_names:
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = x[i]
        im = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        dst = out / str(class_names[int(y[i])]) / f"{i:06d}.png"
        if dst.is_file():
            continue
        tmp = dst.with_name(f".{dst.name}.tmp.png")
        im.save(tmp)
        os.replace(tmp, dst)
    return n


def export_npz_folder(npz_path, out, limit: int | None = None) -> int:
    """A ``.npz`` test file in the CIFAR layout → an image folder (see :func:`export_image_folder`)."""
    import numpy as np

    with np.load(Path(npz_path).expanduser(), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
        names = [str(c) for c in z["classes"]] if "classes" in z else [str(i) for i in range(int(labels.max()) + 1)]
    return export_image_folder(images, labels, names, out, limit=limit)
