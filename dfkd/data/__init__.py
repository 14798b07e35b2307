"""Real datasets: the built-in digits, CIFAR-10 ``.npz`` files, image folders.

Every dataset yields images as float tensors in [0, 1], shape (C, H, W), and int64 labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from dfkd.errors import DfkdError, close_matches
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
    test: Optional["EvalSet"]
    num_classes: int
    input_size: tuple[int, int, int]
    mean: Sequence[float]
    std: Sequence[float]
    class_names: list[str] = field(default_factory=list)




class EvalSet:
    """What evaluation needs from a test set: ``len()``, ``batches(batch_size)`` of ([0, 1] images, labels)."""

    def __len__(self) -> int:  # pragma: no cover - protocol
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover
        raise NotImplementedError


class AdaptedDataset(EvalSet):
    """An in-memory dataset seen through the teacher's eyes: each batch resized / channel-converted by
    ``adapt`` (a :class:`dfkd.spec.TeacherSpec` ``adapt_tensor``) and its labels mapped to the teacher's
    class indices by ``label_map`` (dataset index → teacher index)."""

    def __init__(self, base: ArrayDataset, adapt=None, label_map: Optional[torch.Tensor] = None):
        self.base, self.adapt, self.label_map = base, adapt, label_map
        self.labels = base.labels if label_map is None else label_map[base.labels]

    def __len__(self) -> int:
        return len(self.base)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.take(index)
        if self.adapt is not None:
            x = self.adapt(x)
        return x, (y if self.label_map is None else self.label_map[y])

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            yield self.take(order[s : s + batch_size])


DATASETS: Registry[DataSpec] = Registry("dataset")


def _sklearn_file(*parts: str) -> Optional[Path]:
    """A file shipped inside the scikit-learn package, found without importing it (that costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        raise DfkdError("data=digits needs scikit-learn (pip install scikit-learn)")
    p = Path(spec.origin).parent.joinpath(*parts)
    return p if p.is_file() else None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits images (N, 8, 8) and labels, read from the CSV that scikit-learn ships (what its
    ``load_digits`` reads), or through ``load_digits`` when the file is not where it used to be."""
    csv = _sklearn_file("datasets", "data", "digits.csv.gz")
    if csv is None:
        from sklearn.datasets import load_digits as _load

        d = _load()
        return d.images, d.target
    data = np.loadtxt(csv, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _digits_split(target: np.ndarray, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices of scikit-learn's stratified ``train_test_split``, kept in the dfkd
    cache by scikit-learn version, seed and fraction, so that later commands need not import scikit-learn."""
    import importlib.metadata

    from dfkd.models.checkpoint import atomic_write_bytes

    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    from dfkd.pipeline import cache_dir

    path = cache_dir() / "digits" / f"split_sklearn{version}_seed{int(seed)}_test{float(test_fraction):g}.npz"
    try:
        with np.load(path) as z:
            tr, te = z["train"], z["test"]
        if len(tr) + len(te) == len(target):
            return tr, te
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(target)), test_size=test_fraction, random_state=seed, stratify=target)
    tr, te = np.sort(tr), np.sort(te)
    try:
        import io

        buf = io.BytesIO()
        np.savez(buf, train=tr, test=te)
        atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only cache only costs the import next time
        pass
    return tr, te


@DATASETS.register("digits")
def load_digits(seed: int = 0, test_fraction: float = 0.3, train: bool = True, **_: object) -> DataSpec:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images), split by ``seed`` (stratified)."""
    images, target = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(target.astype(np.int64))
    tr, te = _digits_split(target, seed, test_fraction)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
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


@DATASETS.register("none")
def load_none(**_: object) -> DataSpec:
    """No data at all: a purely data-free run (student, samples and synthesis statistics, no accuracy)."""
    return DataSpec(name="none", train=None, test=None, num_classes=0, input_size=(0, 0, 0), mean=(), std=())


def _npz_file(path: str | Path | None, what: str = "data.path") -> Path:
    if path is None or str(path) in ("", "None", "null"):
        raise DfkdError(f"data=npz needs {what}=FILE.npz (arrays 'images' (N, H, W, C) uint8 and 'labels')")
    p = Path(path).expanduser()
    if p.is_dir():
        cands = sorted(p.glob("*test*.npz")) or sorted(p.glob("*.npz"))
        if len(cands) != 1:
            raise DfkdError(f"{what}={p} is a folder with {len(cands)} .npz test files; name the file")
        p = cands[0]
    if not p.is_file():
        raise DfkdError(f"{what} not found: {p}")
    return p


@DATASETS.register("npz")
def load_npz(path: str | Path | None = None, train_path: str | Path | None = None, train: bool = True,
             train_limit: int | None = None, test_limit: int | None = None, seed: int = 0,
             **_: object) -> DataSpec:
    """Any ``.npz`` test file in the shared CIFAR layout (``images`` uint8 NHWC, ``labels``, optionally
    ``classes``), any class count; ``train_path`` (a file, or a glob such as ``dir/*train*.npz``) adds a
    train split (only the real-data ceiling needs one)."""
    test_file = _npz_file(path)
    xte, yte, classes = _read_npz(test_file)
    train_ds = None
    if train and train_path:
        files = sorted(Path().glob(str(train_path))) if any(ch in str(train_path) for ch in "*?[") \
            else [Path(train_path).expanduser()]
        files = [f for f in files if f.is_file()]
        if not files:
            raise DfkdError(f"data.train_path matches no file: {train_path}")
        xs, ys = zip(*[_read_npz(f)[:2] for f in files])
        xtr, ytr = torch.cat(xs), torch.cat(ys)
        if train_limit:
            keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))[: int(train_limit)]
            xtr, ytr = xtr[keep], ytr[keep]
        train_ds = ArrayDataset(xtr, ytr)
    if test_limit:
        keep = torch.randperm(len(yte), generator=torch.Generator().manual_seed(seed))[: int(test_limit)].sort().values
        xte, yte = xte[keep], yte[keep]
    n = max(len(classes), int(yte.max()) + 1 if len(yte) else 0)
    return DataSpec(name=test_file.stem, train=train_ds, test=ArrayDataset(xte, yte), num_classes=n,
                    input_size=tuple(xte.shape[1:]), mean=(0.5,) * xte.shape[1], std=(0.25,) * xte.shape[1],
                    class_names=classes or [str(i) for i in range(n)])


@DATASETS.register("image_folder")
def load_image_folder(path: str | Path | None = None, train: bool = True, **_: object) -> DataSpec:
    """A test folder ``DIR/<class name>/<image>`` (torchvision ``ImageFolder``), streamed, never held in
    memory. Its images are resized the way the teacher expects when the task is set up."""
    from dfkd.data.folder import scan_image_folder

    return scan_image_folder(path)


def load_dataset(name: str, **kwargs) -> DataSpec:
    return DATASETS.build(name, **kwargs)


def _norm_name(s: str) -> str:
    return str(s).strip().lower().replace(" ", "_").replace("-", "_")


def map_class_names(names: Sequence[str], num_classes: int, teacher_names: Optional[Sequence[str]],
                    what: str = "test set") -> list[int]:
    """Dataset class index → teacher class index, by name.

    With teacher class names, every dataset class must be one of them (a subset is fine: the test set
    then covers those classes only). Without them, folders named ``0``..``N-1`` map to those indices,
    and otherwise the dataset must have exactly the teacher's class count (sorted order is taken)."""
    names = [str(c) for c in names]
    if teacher_names:
        idx = {_norm_name(c): i for i, c in enumerate(teacher_names)}
        out = []
        for c in names:
            if _norm_name(c) not in idx:
                raise DfkdError(f"{what} class {c!r} is not one of the teacher's classes"
                                f"{close_matches(c, list(teacher_names))} ({len(teacher_names)} classes: "
                                f"{', '.join(list(teacher_names)[:5])}{', ...' if len(teacher_names) > 5 else ''})")
            out.append(idx[_norm_name(c)])
        return out
    if names and all(c.isdigit() for c in names):
        ints = [int(c) for c in names]
        if max(ints) >= num_classes:
            raise DfkdError(f"{what} has class {max(ints)} but the teacher has {num_classes} classes (0..{num_classes - 1})")
        return ints
    if len(names) == num_classes:
        return list(range(num_classes))
    raise DfkdError(f"{what} has {len(names)} classes, the teacher {num_classes} and no class names: name the "
                    f"class folders 0..{num_classes - 1}, or give teacher.class_names=[...]")


def fit_to_teacher(data: DataSpec, spec) -> DataSpec:
    """The dataset as the teacher sees it: images resized and channel-converted to the teacher's input
    (its eval transform), labels mapped to the teacher's class indices by name. The teacher's spec
    (:class:`dfkd.spec.TeacherSpec`) replaces the dataset's own size, normalisation and class count."""
    from dfkd.data.folder import FolderDataset

    if data.name == "none" or data.test is None and data.train is None:
        return DataSpec(name=data.name, train=None, test=None, num_classes=spec.num_classes,
                        input_size=tuple(spec.input_size), mean=tuple(spec.mean), std=tuple(spec.std),
                        class_names=list(spec.class_names or []))
    mapping = map_class_names(data.class_names, spec.num_classes, spec.class_names, what=f"data {data.name!r}")
    identity = mapping == list(range(spec.num_classes))
    lut = None if identity else torch.tensor(mapping, dtype=torch.long)
    same_pixels = tuple(data.input_size) == tuple(spec.input_size)

    def adapt(ds):
        if ds is None:
            return None
        if isinstance(ds, FolderDataset):
            ds.set_transform(spec.eval_transform(), None if identity else mapping)
            return ds
        if same_pixels and lut is None:
            return ds
        return AdaptedDataset(ds, None if same_pixels else spec.adapt_tensor, lut)

    return DataSpec(name=data.name, train=adapt(data.train), test=adapt(data.test), num_classes=spec.num_classes,
                    input_size=tuple(spec.input_size), mean=tuple(spec.mean), std=tuple(spec.std),
                    class_names=list(spec.class_names or data.class_names if identity else spec.class_names or []))
