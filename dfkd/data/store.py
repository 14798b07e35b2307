"""Synthetic datasets on disk: write once, reuse, share, inspect.

A stored dataset is a folder::

    manifest.json                 written last: teacher identity, synthesizer + config, seeds,
                                  counts per class, dfkd version, one sha256 per shard
    spec.json                     what the dataset is to be (written first; checked on resume)
    shards/shard-00000.safetensors  images (uint8 or float16, NCHW), labels (int64), logits (float16),
                                  index (int64, global sample ids)
    shards/shard-00000.json       the shard's count, seed, sha256 and class counts (written after it)

A detection dataset (``task: detection`` in the manifest, written by ``dfkd-synthesize task=detection``)
holds, instead of labels and logits, each image's boxes as flat tensors in the same shard::

    boxes (N, 4) float32 xyxy pixels, box_labels (N,) int64, box_scores (N,) float32
                                  the teacher's detections on the stored image (score ≥ the manifest's
                                  score_thresh), image by image
    box_counts (B,) int64         how many of those rows belong to each image, in order
    target_boxes, target_labels, target_counts
                                  the boxes the synthesizer aimed at (when it gives any), laid out alike

Shard ``i`` holds samples ``i*shard_size ...`` and is made by a synthesizer seeded from
``(base_seed, i)`` alone, so an interrupted run resumes without lost or duplicated samples, and
rank ``r`` of ``w`` writers (torchrun) makes the shards with ``i % w == r``. Every file is written
atomically (temporary file, then rename). The teacher's logits are computed on the stored
(quantised) pixels, so they belong exactly to what a reader gets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json

log = logging.getLogger("dfkd")

FORMAT_VERSION = 1
IMAGE_DTYPES = ("uint8", "float16")
TASKS = ("classification", "detection")
# settings that must match when a run resumes into an existing folder
_SPEC_KEYS = ("format", "task", "teacher", "synthesizer", "seed", "num_images", "shard_size", "image_dtype",
              "input_size", "num_classes", "score_thresh")
_SPEC_DEFAULTS = {"task": "classification"}  # a classification spec.json may not name its task
CLASSIFICATION_KEYS = ("images", "labels", "logits", "index")
DETECTION_KEYS = ("images", "index", "boxes", "box_labels", "box_scores", "box_counts")
TARGET_KEYS = ("target_boxes", "target_labels", "target_counts")
DETECT_CHUNK = 32  # images per teacher call when a detection shard's boxes are computed


# -- identity and checksums ---------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the model's state_dict: sorted keys, each key, dtype, shape and raw tensor bytes."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_identity(teacher, model_name: Optional[str] = None) -> dict[str, Any]:
    """What identifies a teacher: architecture, weights hash, normalisation, input size, classes."""
    model = getattr(teacher, "model", teacher)
    return {
        "architecture": model_name or type(model).__name__,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sha256": state_dict_sha256(model),
        "mean": [round(float(v), 6) for v in teacher.mean.flatten().tolist()],
        "std": [round(float(v), 6) for v in teacher.std.flatten().tolist()],
        "input_size": list(teacher.input_size),
        "num_classes": int(teacher.num_classes),
    }


def detection_teacher_identity(teacher, model_name: Optional[str] = None) -> dict[str, Any]:
    """What identifies a detection teacher (a ``DetectionTeacher`` or the detector): weights hash, input
    size, classes and the build arguments that matter to its detections."""
    from dfkd.detection.models import detector_metadata

    model = getattr(teacher, "model", teacher)
    try:
        build = detector_metadata(model)
    except DfkdError:
        build = {}
    keep = ("arch", "backbone", "version", "num_classes", "image_size", "in_chans", "width", "fpn_channels",
            "head_convs", "score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")
    arch = "/".join(str(build[k]) for k in ("arch", "backbone") if build.get(k)) or type(model).__name__
    c, h, w = (int(v) for v in teacher.input_size)
    return {
        "architecture": model_name or arch,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sha256": state_dict_sha256(model),
        "mean": [round(float(v), 6) for v in build.get("mean", [])],
        "std": [round(float(v), 6) for v in build.get("std", [])],
        "input_size": [c, h, w],
        "num_classes": int(teacher.num_classes),
        "build": {k: build[k] for k in keep if k in build},
    }


def detection_class_names(teacher, given: Optional[Sequence[str]] = None) -> list[str]:
    """The teacher's class names: ``given`` (teacher.class_names), the detector's own (YOLO files carry
    them), or ``"0" ... "K-1"``."""
    k = int(teacher.num_classes)
    if given is not None:
        if len(given) != k:
            raise DfkdError(f"teacher.class_names has {len(given)} names, the detector has {k} classes")
        return [str(n) for n in given]
    own = getattr(getattr(teacher, "model", teacher), "class_names", None)
    return [str(n) for n in own] if own is not None and len(own) == k else [str(i) for i in range(k)]


def shard_seed(base_seed: int, index: int) -> int:
    """The seed of shard ``index``: a function of (base_seed, index) only."""
    d = hashlib.sha256(f"dfkd-shard:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(d[:4], "little") & 0x7FFFFFFF


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- encoding -----------------------------------------------------------------------------
def quantize(images: torch.Tensor, image_dtype: str) -> torch.Tensor:
    """[0, 1] float images → what is stored (uint8 0..255 or float16)."""
    x = images.detach().float().clamp(0, 1).cpu()
    if image_dtype == "uint8":
        return (x * 255.0).round_().to(torch.uint8)
    if image_dtype == "float16":
        return x.to(torch.float16)
    raise DfkdError(f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {image_dtype!r}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Stored images → float [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def encode_shard(images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, index: torch.Tensor,
                 meta: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    tensors = {"images": images.contiguous(), "labels": labels.long().cpu().contiguous(),
               "logits": logits.detach().cpu().to(torch.float16).contiguous(),
               "index": index.long().cpu().contiguous()}
    return save(tensors, metadata={k: str(v) for k, v in meta.items()})


def flatten_boxes(per_image: Sequence[Mapping[str, torch.Tensor]], prefix: str = "box_",
                  with_scores: bool = True) -> dict[str, torch.Tensor]:
    """Per-image ``{"boxes", "labels"[, "scores"]}`` → flat tensors: ``boxes`` (N, 4) float32 for
    ``prefix="box_"`` (``target_boxes`` for ``"target_"``), ``<prefix>labels``, ``<prefix>scores``,
    ``<prefix>counts`` (one count per image)."""
    boxes = [t["boxes"].detach().float().cpu().reshape(-1, 4) for t in per_image]
    labels = [t["labels"].detach().long().cpu().reshape(-1) for t in per_image]
    counts = torch.tensor([len(b) for b in boxes], dtype=torch.long)
    for b, lab in zip(boxes, labels):
        if len(b) != len(lab):
            raise DfkdError(f"a detection target holds {len(b)} boxes and {len(lab)} labels")
    out = {("boxes" if prefix == "box_" else f"{prefix}boxes"): torch.cat(boxes) if boxes else torch.zeros(0, 4),
           f"{prefix}labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
           f"{prefix}counts": counts}
    if with_scores:
        scores = [t["scores"].detach().float().cpu().reshape(-1) for t in per_image]
        out[f"{prefix}scores"] = torch.cat(scores) if scores else torch.zeros(0)
    return {k: v.contiguous() for k, v in out.items()}


def split_boxes(t: Mapping[str, torch.Tensor], which: str = "teacher") -> list[dict[str, torch.Tensor]]:
    """Flat shard tensors → one ``{"boxes", "labels"[, "scores"]}`` per image. ``which``: ``teacher``
    (its detections on the stored images, with scores) or ``synthesizer`` (the boxes aimed at)."""
    if which == "teacher":
        boxes, labels, scores, counts = t["boxes"], t["box_labels"], t["box_scores"], t["box_counts"]
    elif which == "synthesizer":
        if "target_counts" not in t:
            raise DfkdError("this dataset holds no synthesizer targets (its synthesizer gave none); "
                            "use the teacher's boxes")
        boxes, labels, scores, counts = t["target_boxes"], t["target_labels"], None, t["target_counts"]
    else:
        raise DfkdError(f"boxes must be 'teacher' or 'synthesizer', got {which!r}")
    sizes = [int(c) for c in counts]
    parts = {"boxes": boxes.split(sizes), "labels": labels.split(sizes)}
    if scores is not None:
        parts["scores"] = scores.split(sizes)
    return [{k: v[j] for k, v in parts.items()} for j in range(len(sizes))]


def encode_detection_shard(images: torch.Tensor, index: torch.Tensor, detections: Sequence[Mapping[str, torch.Tensor]],
                           targets: Optional[Sequence[Mapping[str, torch.Tensor]]], meta: Mapping[str, Any]) -> bytes:
    """A detection shard's bytes; the same inputs give the same bytes in any process (safetensors orders
    the tensors; its metadata map is not ordered, so the metadata is one sorted-JSON entry)."""
    from safetensors.torch import save

    tensors = {"images": images.contiguous(), "index": index.long().cpu().contiguous(), **flatten_boxes(detections)}
    if targets is not None:
        tensors.update(flatten_boxes(targets, "target_", with_scores=False))
    return save(tensors, metadata={"dfkd": json.dumps(dict(meta), sort_keys=True, default=str)})


def _class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.long().cpu(), minlength=num_classes)[:num_classes].tolist()


# -- writing ------------------------------------------------------------------------------
class StoreWriter:
    """Writes (or resumes) a stored dataset in ``root`` from a per-shard synthesizer factory."""

    def __init__(self, root: str | Path, spec: Mapping[str, Any]):
        self.root = Path(root).expanduser()
        self.spec = {"format": FORMAT_VERSION, **dict(spec)}
        if self.spec["image_dtype"] not in IMAGE_DTYPES:
            raise DfkdError(f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {self.spec['image_dtype']!r}")
        if int(self.spec["num_images"]) <= 0 or int(self.spec["shard_size"]) <= 0:
            raise DfkdError("num_images and shard_size must be positive")
        self.task = str(self.spec.get("task", "classification"))
        if self.task not in TASKS:
            raise DfkdError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "detection" and self.spec.get("score_thresh") is None:
            raise DfkdError("a detection dataset needs the teacher's score threshold (spec score_thresh)")
        self.num_images = int(self.spec["num_images"])
        self.shard_size = int(self.spec["shard_size"])
        self.num_shards = math.ceil(self.num_images / self.shard_size)
        self.shard_dir = self.root / "shards"

    def shard_count(self, i: int) -> int:
        return min(self.shard_size, self.num_images - i * self.shard_size)

    def open(self) -> None:
        """Create the folder and spec.json, or check that an existing one is the same dataset."""
        if self.root.exists() and not self.root.is_dir():
            raise DfkdError(f"output {self.root} exists and is not a folder")
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        spec_path = self.root / "spec.json"
        if spec_path.is_file():
            try:
                old = json.loads(spec_path.read_text())
            except ValueError:
                raise DfkdError(f"{spec_path} is not valid JSON; remove the folder or choose another output") from None
            for k in _SPEC_KEYS:
                a = _jsonable(old.get(k, _SPEC_DEFAULTS.get(k)))
                b = _jsonable(self.spec.get(k, _SPEC_DEFAULTS.get(k)))
                if a != b:
                    what = "teacher" if k == "teacher" else k
                    raise DfkdError(f"{self.root} holds a dataset made with another {what} "
                                    f"({_short(a)} vs {_short(b)}); choose another output folder to start a new one")
        else:
            atomic_write_json(spec_path, self.spec)

    def done(self, i: int) -> Optional[dict]:
        """The sidecar of shard ``i`` when the shard is complete and matches it, else None."""
        side = self.shard_dir / f"{shard_name(i)}.json"
        data = self.shard_dir / f"{shard_name(i)}.safetensors"
        if not (side.is_file() and data.is_file()):
            return None
        try:
            info = json.loads(side.read_text())
        except ValueError:
            return None
        if info.get("bytes") != data.stat().st_size or sha256_bytes(data.read_bytes()) != info.get("sha256"):
            return None
        return info

    def _clean_tmp(self, owned: Iterable[int]) -> None:
        """Remove temporary files left by a killed writer, for this rank's shards only."""
        names = {shard_name(i) for i in owned}
        for p in self.shard_dir.glob(".shard-*.tmp"):
            if p.name[1:12] in names:
                p.unlink(missing_ok=True)

    def write_shard(self, i: int, make_synth: Callable[[int], Any], teacher, device) -> dict:
        if self.task == "detection":
            return self.write_detection_shard(i, make_synth, teacher, device)
        n = self.shard_count(i)
        seed = shard_seed(int(self.spec["seed"]), i)
        synth = make_synth(seed)
        xs, ys = [], []
        got = 0
        while got < n:
            b = synth.step(None)
            xs.append(b.images.detach())
            ys.append(b.labels.detach() if b.labels is not None else None)
            got += len(b)
        x = torch.cat(xs)[:n]
        stored = quantize(x, self.spec["image_dtype"])
        with torch.no_grad():  # the logits of exactly the stored pixels
            logits = teacher(to_float(stored).to(device)).float().cpu()
        if all(y is not None for y in ys):
            labels = torch.cat([y.cpu() for y in ys])[:n].long()
        else:
            labels = logits.argmax(1)
        index = torch.arange(i * self.shard_size, i * self.shard_size + n)
        blob = encode_shard(stored, labels, logits, index, {"shard": i, "seed": seed, "format": FORMAT_VERSION})
        atomic_write_bytes(self.shard_dir / f"{shard_name(i)}.safetensors", blob)
        info = {"index": i, "file": f"shards/{shard_name(i)}.safetensors", "count": n, "seed": seed,
                "bytes": len(blob), "sha256": sha256_bytes(blob),
                "class_counts": _class_counts(labels, int(self.spec["num_classes"]))}
        atomic_write_json(self.shard_dir / f"{shard_name(i)}.json", info)
        return info

    def write_detection_shard(self, i: int, make_synth: Callable[[int], Any], teacher, device) -> dict:
        """Shard ``i`` of a detection dataset: the images, the teacher's detections on exactly the stored
        pixels (``teacher.detect``, score ≥ ``score_thresh``) and the synthesizer's targets when it gives them."""
        n = self.shard_count(i)
        seed = shard_seed(int(self.spec["seed"]), i)
        synth = make_synth(seed)
        xs: list[torch.Tensor] = []
        aimed: list[Optional[dict]] = []
        got = 0
        while got < n:
            b = synth.step(None)
            xs.append(b.images.detach())
            aimed.extend(b.targets if b.targets is not None else [None] * len(b))
            got += len(b)
        stored = quantize(torch.cat(xs)[:n], self.spec["image_dtype"])
        thresh = float(self.spec["score_thresh"])
        dets: list[dict] = []
        for s in range(0, n, DETECT_CHUNK):  # the boxes of exactly the stored pixels
            dets += teacher.detect(to_float(stored[s:s + DETECT_CHUNK]).to(device), score_thresh=thresh)
        targets = None if any(t is None for t in aimed[:n]) else aimed[:n]
        index = torch.arange(i * self.shard_size, i * self.shard_size + n)
        blob = encode_detection_shard(stored, index, dets, targets,
                                      {"shard": i, "seed": seed, "format": FORMAT_VERSION, "task": "detection"})
        atomic_write_bytes(self.shard_dir / f"{shard_name(i)}.safetensors", blob)
        labels = torch.cat([d["labels"].long().cpu() for d in dets]) if dets else torch.zeros(0, dtype=torch.long)
        info = {"index": i, "file": f"shards/{shard_name(i)}.safetensors", "count": n, "seed": seed,
                "bytes": len(blob), "sha256": sha256_bytes(blob), "boxes": len(labels),
                "class_counts": _class_counts(labels, int(self.spec["num_classes"]))}
        atomic_write_json(self.shard_dir / f"{shard_name(i)}.json", info)
        return info

    def finalize(self, complete: bool, wall_seconds: float) -> Optional[dict]:
        """Write manifest.json from the shards' sidecars (the last file written)."""
        shards = [self.done(i) for i in range(self.num_shards)]
        have = [s for s in shards if s is not None]
        if complete and len(have) < self.num_shards:
            return None  # other ranks are still writing; the last one writes the manifest
        k = int(self.spec["num_classes"])
        counts = [sum(s["class_counts"][c] for s in have) for c in range(k)]
        manifest = {
            **self.spec,
            "count": sum(s["count"] for s in have),
            "complete": len(have) == self.num_shards,
            "class_counts": counts,
            "shards": [{kk: s[kk] for kk in ("index", "file", "count", "seed", "bytes", "sha256", "boxes",
                                             "class_counts") if kk in s}
                       for s in have],
            "wall_seconds_last_writer": round(wall_seconds, 3),
        }
        if self.task == "detection":  # class_counts count the teacher's boxes, not images
            manifest["box_count"] = sum(int(s.get("boxes", 0)) for s in have)
        atomic_write_json(self.root / "manifest.json", manifest)
        return manifest

    def run(self, make_synth: Callable[[int], Any], teacher, device: torch.device | str = "cpu",
            rank: int = 0, world: int = 1, budget_minutes: Optional[float] = None,
            progress: bool = True) -> dict:
        t0 = time.perf_counter()
        self.open()
        mine = [i for i in range(self.num_shards) if i % world == rank]
        self._clean_tmp(mine)
        todo = [i for i in mine if self.done(i) is None]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(self.shard_count(i) for i in mine), desc=f"synthesize[{rank}/{world}]"
                       if world > 1 else "synthesize", unit="img", dynamic_ncols=True,
                       initial=sum(self.shard_count(i) for i in mine if i not in todo))
        stopped = False
        made = 0
        try:
            for i in todo:
                if budget_minutes and time.perf_counter() - t0 >= 60.0 * budget_minutes:
                    stopped = True
                    break
                self.write_shard(i, make_synth, teacher, device)
                made += self.shard_count(i)
                if bar is not None:
                    bar.update(self.shard_count(i))
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
        manifest = self.finalize(complete=not (stopped and world == 1), wall_seconds=wall)
        return {"manifest": manifest, "made_this_run": made, "wall_seconds": wall, "stopped_by_budget": stopped,
                "shards_this_rank": len(mine)}


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str)) if v is not None else None


def _short(v: Any) -> str:
    if isinstance(v, dict) and "sha256" in v:
        return f"{v.get('architecture')} sha256 {str(v['sha256'])[:12]}"
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# -- reading ------------------------------------------------------------------------------
class SyntheticStore:
    """A stored dataset, read-only. Shards are checked against their sha256 when read."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.root = Path(str(path)).expanduser()
        self.verify = verify
        if not self.root.exists():
            raise DfkdError(f"dataset folder not found: {self.root}")
        if not self.root.is_dir():
            raise DfkdError(f"dataset path is not a folder: {self.root}")
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            hint = (" (synthesis did not finish: run the same dfkd-synthesize command again to complete it)"
                    if (self.root / "spec.json").is_file() else "")
            raise DfkdError(f"no manifest.json in {self.root}: not a dfkd synthetic dataset{hint}")
        try:
            self.manifest = json.loads(mpath.read_text())
            self.shards = list(self.manifest["shards"])
            self.num_classes = int(self.manifest["num_classes"])
            self.input_size = tuple(int(s) for s in self.manifest["input_size"])
            self.task = str(self.manifest.get("task", "classification"))
            if self.task not in TASKS:
                raise ValueError(f"unknown task {self.task!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise DfkdError(f"manifest {mpath} is corrupt ({type(e).__name__}: {e})") from None
        if not self.manifest.get("complete", True):
            log.warning("dataset %s is incomplete: %d of %d images", self.root, self.manifest.get("count", 0),
                        self.manifest.get("num_images", 0))

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.get("class_names") or []
        return list(names) if len(names) == self.num_classes else [str(k) for k in range(self.num_classes)]

    @property
    def teacher(self) -> dict[str, Any]:
        return dict(self.manifest.get("teacher") or {})

    def check_teacher(self, teacher) -> None:
        """DfkdError unless ``teacher`` has the weights (and normalisation) the dataset was made with."""
        want = self.teacher
        detector = hasattr(teacher, "detect")
        if detector != (self.task == "detection"):
            raise DfkdError(f"dataset {self.root} holds {self.task} data, the teacher given is a "
                            f"{'detector' if detector else 'classifier'}"
                            + ("; distil from it with dfkd-distill task=detection teacher=detector ..."
                               if self.task == "detection" else ""))
        have = detection_teacher_identity(teacher) if detector else teacher_identity(teacher)
        if want.get("sha256") != have["sha256"]:
            raise DfkdError(f"dataset {self.root} was made with another teacher ({want.get('architecture')}, "
                            f"weights sha256 {str(want.get('sha256'))[:12]}) than the one given "
                            f"({have['architecture']}, sha256 {have['sha256'][:12]})")
        for k in ("mean", "std", "input_size", "num_classes"):
            if k in want and want[k] and _jsonable(want[k]) != _jsonable(have[k]):
                raise DfkdError(f"dataset {self.root} was made with teacher {k} {want[k]}, the teacher given has {have[k]}")

    def read_shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard number ``i`` in the manifest's list: images, labels, logits, index (classification), or
        images, index and the flat box tensors (detection: :data:`DETECTION_KEYS`, and
        :data:`TARGET_KEYS` when the synthesizer gave targets; :func:`split_boxes` cuts them per image)."""
        from safetensors.torch import load

        info = self.shards[i]
        path = self.root / info["file"]
        if not path.is_file():
            raise DfkdError(f"shard missing: {path}")
        blob = path.read_bytes()
        if len(blob) != int(info.get("bytes", len(blob))):
            raise DfkdError(f"shard {path} is truncated or corrupt ({len(blob)} bytes, manifest says {info['bytes']})")
        if self.verify and sha256_bytes(blob) != info["sha256"]:
            raise DfkdError(f"shard {path} is corrupt: sha256 does not match the manifest")
        try:
            t = load(blob)
            assert set(self._keys()) <= set(t) and len(t["images"]) == info["count"]
            if self.task == "detection":
                for c, rows in (("box_counts", "boxes"), ("target_counts", "target_boxes")):
                    if c in t:
                        assert len(t[c]) == info["count"] and int(t[c].sum()) == len(t[rows])
        except Exception as e:  # noqa: BLE001 - unreadable safetensors
            raise DfkdError(f"shard {path} is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return t

    def _keys(self) -> tuple[str, ...]:
        return DETECTION_KEYS if self.task == "detection" else CLASSIFICATION_KEYS

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every shard concatenated (images stay in their stored dtype); a detection dataset's flat box
        tensors stay in image order, so :func:`split_boxes` (or :meth:`targets`) cuts them per image."""
        parts = [self.read_shard(i) for i in range(len(self.shards))]
        if not parts:
            raise DfkdError(f"dataset {self.root} holds no shards")
        keys = list(self._keys())
        if self.task == "detection" and all("target_counts" in p for p in parts):
            keys += TARGET_KEYS
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    @property
    def score_thresh(self) -> Optional[float]:
        """The teacher score above which a detection dataset's boxes were kept (None: classification)."""
        v = self.manifest.get("score_thresh")
        return None if v is None else float(v)

    def targets(self, which: str = "teacher", data: Optional[Mapping[str, torch.Tensor]] = None) -> list[dict]:
        """A detection dataset's boxes, one ``{"boxes", "labels"[, "scores"]}`` per image (see :func:`split_boxes`)."""
        self._need_detection("targets()")
        return split_boxes(data if data is not None else self.load_all(), which)

    def _need_detection(self, what: str) -> None:
        if self.task != "detection":
            raise DfkdError(f"{what} reads boxes; dataset {self.root} holds {self.task} data")

    def dataset(self, boxes: str = "teacher", score_thresh: Optional[float] = None):
        """Classification: an ``ArrayDataset`` of (image, label). Detection: a :class:`DetectionStoreDataset`
        of (image, ``{"boxes", "labels", "scores"}``) — the teacher's detections (``boxes="teacher"``; only
        those with score ≥ ``score_thresh`` when given) or the synthesizer's targets (``"synthesizer"``)."""
        t = self.load_all()
        if self.task == "detection":
            return DetectionStoreDataset(t["images"], split_boxes(t, boxes), self.class_names,
                                         score_thresh=score_thresh)
        from dfkd.data import ArrayDataset

        return ArrayDataset(t["images"], t["labels"])


class DetectionStoreDataset(torch.utils.data.Dataset):
    """A detection dataset in memory: ``ds[i]`` is a float [0, 1] CHW image and its target
    ``{"boxes" (K, 4) float32 xyxy px, "labels" (K,) int64[, "scores" (K,) float32]}`` — what
    :func:`dfkd.detection.train.train_detector` and torchvision's detectors take."""

    def __init__(self, images: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
                 class_names: Sequence[str], score_thresh: Optional[float] = None):
        if len(images) != len(targets):
            raise DfkdError(f"{len(images)} images and {len(targets)} targets")
        self.images = images
        if score_thresh is not None:
            targets = [{k: v[t["scores"] >= score_thresh] for k, v in t.items()} if "scores" in t else t
                       for t in targets]
        self.targets = [dict(t) for t in targets]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transform: Optional[Callable] = None  # (image, target) -> (image, target), as the data side's sets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = to_float(self.images[i])
        target = {k: v.clone() for k, v in self.targets[i].items()}
        return self.transform(image, target) if self.transform is not None else (image, target)


# -- inspection ---------------------------------------------------------------------------
def confidence_stats(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    p = logits.float().softmax(1)
    conf, pred = p.max(1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(1)
    per_class = []
    for k in range(num_classes):
        m = labels == k
        per_class.append(float(conf[m].mean()) if m.any() else None)
    q = torch.quantile(conf, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean_confidence": float(conf.mean()), "confidence_p10_p50_p90": [float(v) for v in q],
            "mean_entropy": float(ent.mean()), "agreement_with_targets": float((pred == labels).float().mean()),
            "predicted_counts": _class_counts(pred, num_classes), "mean_confidence_per_class": per_class}


def box_stats(data: Mapping[str, torch.Tensor], num_classes: int) -> dict[str, Any]:
    """A detection dataset's boxes: per image, per class, their scores and sizes."""
    def q(v: torch.Tensor) -> Optional[list[float]]:
        return [float(x) for x in torch.quantile(v, torch.tensor([0.1, 0.5, 0.9]))] if len(v) else None

    counts, scores, b = data["box_counts"], data["box_scores"].float(), data["boxes"].float()
    side = ((b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)).sqrt()
    out = {"boxes": int(counts.sum()), "boxes_per_image": float(counts.float().mean()) if len(counts) else 0.0,
           "images_without_boxes": int((counts == 0).sum()),
           "max_boxes_per_image": int(counts.max()) if len(counts) else 0,
           "score_p10_p50_p90": q(scores), "box_side_p10_p50_p90": q(side),
           "boxes_per_class": _class_counts(data["box_labels"], num_classes)}
    if "target_counts" in data:
        out["synthesizer_boxes"] = int(data["target_counts"].sum())
        out["synthesizer_boxes_per_class"] = _class_counts(data["target_labels"], num_classes)
    return out


def summarize(store: SyntheticStore, data: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, Any]:
    m = store.manifest
    t = data if data is not None else store.load_all()
    if store.task == "detection":
        return {
            "path": str(store.root), "task": "detection", "count": len(store), "num_images": m.get("num_images"),
            "complete": m.get("complete"), "shards": len(store.shards), "image_dtype": m.get("image_dtype"),
            "input_size": list(store.input_size), "num_classes": store.num_classes,
            "teacher": store.teacher, "synthesizer": m.get("synthesizer"), "seed": m.get("seed"),
            "score_thresh": store.score_thresh, "dfkd_version": m.get("dfkd_version"),
            "class_counts": m.get("class_counts"), "detections": box_stats(t, store.num_classes),
            "duplicates": int(len(t["index"]) - len(torch.unique(t["index"]))),
        }
    return {
        "path": str(store.root), "count": len(store), "num_images": m.get("num_images"),
        "complete": m.get("complete"), "shards": len(store.shards), "image_dtype": m.get("image_dtype"),
        "input_size": list(store.input_size), "num_classes": store.num_classes,
        "teacher": store.teacher, "synthesizer": m.get("synthesizer"), "seed": m.get("seed"),
        "dfkd_version": m.get("dfkd_version"), "class_counts": m.get("class_counts"),
        "confidence": confidence_stats(t["logits"], t["labels"], store.num_classes),
        "duplicates": int(len(t["index"]) - len(torch.unique(t["index"]))),
    }


# -- export / import ----------------------------------------------------------------------
def export_image_folder(store: SyntheticStore, out: str | Path, progress: bool = True) -> Path:
    """Write ``out/<class>/<id>.png`` plus ``labels.csv`` and ``labels.json`` (labels and soft labels).

    Class folders are named so that their sorted order is the label order (torchvision's
    ImageFolder assigns indices by sorted folder name); labels.json maps folder → label. Every
    class gets a folder; when some are empty, read it with ``ImageFolder(path, allow_empty=True)``.
    """
    from PIL import Image

    if store.task == "detection":
        raise DfkdError(f"{store.root} is a detection dataset; export writes class folders (classification "
                        "only): read its boxes with SyntheticStore(PATH).targets() or .dataset()")
    out = Path(out).expanduser()
    names = store.class_names
    # folder names that sort in label order (zero-padded prefix unless the names already do)
    if sorted(names) != names or len(set(names)) != len(names):
        width = len(str(len(names) - 1))
        names = [f"{k:0{width}d}_{n}" for k, n in enumerate(names)]
    names = [n.replace(os.sep, "_") for n in names]
    for n in names:  # every class gets its folder, so folder order = label order even for empty classes
        (out / n).mkdir(parents=True, exist_ok=True)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(store), desc="export", unit="img", dynamic_ncols=True)
    for s in range(len(store.shards)):
        t = store.read_shard(s)
        x = t["images"] if t["images"].dtype == torch.uint8 else quantize(to_float(t["images"]), "uint8")
        soft = t["logits"].float().softmax(1)
        for j in range(len(x)):
            y, idx = int(t["labels"][j]), int(t["index"][j])
            rel = f"{names[y]}/{idx:08d}.png"
            arr = x[j].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(out / rel, buf.getvalue())
            rows.append({"file": rel, "label": y, "class": names[y], "index": idx,
                         "soft_label": [round(float(v), 6) for v in soft[j]],
                         "logits": [round(float(v), 4) for v in t["logits"][j].float()]})
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "label", "class", *(f"p{k}" for k in range(store.num_classes))])
    for r in rows:
        w.writerow([r["file"], r["label"], r["class"], *r["soft_label"]])
    atomic_write_bytes(out / "labels.csv", buf.getvalue().encode())
    atomic_write_json(out / "labels.json", {"classes": names, "class_to_idx": {n: k for k, n in enumerate(names)},
                                            "source": {"teacher": store.teacher, "manifest_count": len(store)},
                                            "samples": rows})
    return out


def read_image_folder(folder: str | Path, input_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[str],
                                                                              Optional[torch.Tensor]]:
    """An ImageFolder-style tree → (uint8 NCHW images resized to ``input_size``, labels, class names,
    soft labels from labels.json when present)."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DfkdError(f"image folder not found: {folder}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DfkdError(f"no class folders in {folder} (expected {folder}/<class>/<image>.png)")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    c, h, w = (int(v) for v in input_size)
    soft_map: dict[str, list[float]] = {}
    lj = folder / "labels.json"
    if lj.is_file():
        try:
            soft_map = {s["file"]: s["soft_label"] for s in json.loads(lj.read_text()).get("samples", [])}
        except (ValueError, KeyError, TypeError):
            soft_map = {}
    xs, ys, files = [], [], []
    for k, name in enumerate(classes):
        for p in sorted((folder / name).iterdir()):
            if p.suffix.lower() not in exts:
                continue
            try:
                img = Image.open(p).convert("L" if c == 1 else "RGB")
            except OSError as e:
                raise DfkdError(f"cannot read image {p}: {e}") from None
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            t = torch.from_numpy(__import__("numpy").asarray(img).copy())
            xs.append(t.unsqueeze(0) if c == 1 else t.permute(2, 0, 1))
            ys.append(k)
            files.append(f"{name}/{p.name}")
    if not xs:
        raise DfkdError(f"no images in {folder}")
    soft_t = None
    if soft_map and all(f in soft_map for f in files):
        soft_t = torch.tensor([soft_map[f] for f in files], dtype=torch.float32)
    return torch.stack(xs), torch.tensor(ys), classes, soft_t


def import_image_folder(folder: str | Path, out: str | Path, spec: Mapping[str, Any], teacher=None,
                        device: torch.device | str = "cpu", batch_size: int = 256) -> dict:
    """Turn an image folder into a stored dataset; logits from ``teacher`` (or labels.json soft labels)."""
    x, y, classes, soft = read_image_folder(folder, spec["input_size"])
    if teacher is None and soft is None:
        raise DfkdError(f"importing {folder} needs a teacher (or a labels.json with soft labels)")
    if teacher is not None:
        with torch.no_grad():
            logits = torch.cat([teacher(to_float(x[s:s + batch_size]).to(device)).float().cpu()
                                for s in range(0, len(x), batch_size)])
    else:
        logits = soft.clamp_min(1e-8).log()
    spec = {**dict(spec), "num_images": len(x), "image_dtype": "uint8",
            "class_names": spec.get("class_names") or classes,
            "synthesizer": {"name": "image_folder", "config": {"folder": Path(folder).name}}}
    if len(classes) != int(spec["num_classes"]):
        raise DfkdError(f"{folder} has {len(classes)} class folders, the teacher has {spec['num_classes']} classes")

    class _Fixed:  # a "synthesizer" that returns the folder's images shard by shard
        def __init__(self, i):
            self.i = i

        def step(self, student=None):
            from generators.base import SyntheticBatch

            s = self.i * writer.shard_size
            e = s + writer.shard_count(self.i)
            return SyntheticBatch(images=to_float(x[s:e]), labels=y[s:e])

    class _Logits(nn.Module):  # stored logits looked up by the images' position
        def forward(self, imgs):
            return logits[self.s:self.s + len(imgs)]

    writer = StoreWriter(out, spec)
    writer.open()
    lookup = _Logits()
    for i in range(writer.num_shards):
        if writer.done(i) is None:
            lookup.s = i * writer.shard_size
            writer.write_shard(i, lambda seed, i=i: _Fixed(i), lookup, "cpu")
    return writer.finalize(complete=True, wall_seconds=0.0)
