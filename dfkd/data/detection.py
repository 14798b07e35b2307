"""Detection data: COCO / YOLO folders as one dataset type, and a canvas builder for small benchmarks.

``load_detection(path)`` reads

* a COCO json file (images resolved beside it, in ``images/`` beside it, or in the usual
  ``annotations/`` + ``<split>/`` layout), or a folder holding one such json;
* a YOLO folder: ``images/<split>/*.jpg``, ``labels/<split>/*.txt`` (``class cx cy w h``,
  normalised; a polygon line is reduced to its bounding box) and a ``*.yaml`` with ``names``.

Both give a :class:`DetectionDataset` yielding ``(image, target)`` in the torchvision style and a
pycocotools ground truth (:meth:`DetectionDataset.coco`) for :func:`dfkd.eval.detection.coco_map`.
Images are read as stored (EXIF orientation is not applied), as COCO's annotations assume.

``build_canvases`` pastes real classification images (objects) onto another real image of the
same set (background) and writes a COCO set, deterministically; ``build_canvas_benchmark`` does
this for the built-in digits or CIFAR-10, train canvases from the train split and test canvases
from the test split only.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from dfkd.errors import DfkdError
from dfkd.models.checkpoint import atomic_write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# decoded images are kept in memory when the whole set needs at most this many bytes (cache=None)
AUTO_CACHE_BYTES = 64 * 2**20


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _quiet_coco(dataset: dict):
    """A ``pycocotools.coco.COCO`` built in memory from ``dataset``, without its prints."""
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3); grayscale, palette and alpha images become RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DfkdError(f"image not found: {path}") from None
    except OSError as e:
        raise DfkdError(f"cannot read image {path}: {_first_line(e)}") from None


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise DfkdError(f"cannot read image {path}: {_first_line(e)}") from None


class DetectionDataset(torch.utils.data.Dataset):
    """Images with boxes, from a COCO-format dict and the folder its ``file_name``\\ s are relative to.

    ``dataset[i]`` is ``(image, target)``: ``image`` float32 (3, H, W) in [0, 1], ``target`` a dict
    with ``boxes`` float32 (K, 4) xyxy in pixels, ``labels`` int64 (K,) in ``[0, num_classes)`` and
    ``image_id`` (int). Contiguous label ``i`` is COCO category ``category_ids[i]`` named
    ``classes[i]`` (categories in ascending id order). Crowd annotations and boxes without area
    (after clipping to the image) are left out of the targets but stay in :meth:`coco`.

    ``cache``: keep decoded images in memory (uint8); ``None`` caches when the whole set fits in
    ``AUTO_CACHE_BYTES``. ``transform(image, target) -> (image, target)`` is applied last.
    Normally built by :func:`load_detection`.
    """

    def __init__(self, coco: Mapping[str, Any], image_root: str | Path, *, name: str = "",
                 cache: Optional[bool] = None,
                 transform: Optional[Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]] = None):
        self.name = name or str(image_root)
        self.image_root = Path(image_root)
        self.transform = transform
        cats = sorted(coco.get("categories") or [], key=lambda c: int(c["id"]))
        if not cats:
            raise DfkdError(f"{self.name}: no categories")
        self.category_ids: list[int] = [int(c["id"]) for c in cats]
        if len(set(self.category_ids)) != len(cats):
            raise DfkdError(f"{self.name}: duplicate category ids")
        self.classes: list[str] = [str(c.get("name", c["id"])) for c in cats]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = [dict(im) for im in coco.get("images") or []]
        if not images:
            raise DfkdError(f"{self.name}: no images")
        self.image_ids: list[int] = [int(im["id"]) for im in images]
        if len(set(self.image_ids)) != len(images):
            raise DfkdError(f"{self.name}: duplicate image ids")
        index_of = {iid: i for i, iid in enumerate(self.image_ids)}
        for im in images:
            if "width" not in im or "height" not in im:
                im["width"], im["height"] = _image_size(self.image_root / im["file_name"])

        annotations = []
        per_image: list[list[tuple[list[float], int]]] = [[] for _ in images]
        for n, a in enumerate(coco.get("annotations") or []):
            a = dict(a)
            if "bbox" not in a or len(a["bbox"]) != 4:
                continue  # e.g. keypoint-only or segmentation-only entries
            if int(a["image_id"]) not in index_of:
                raise DfkdError(f"{self.name}: annotation {a.get('id', n)} refers to unknown image {a['image_id']}")
            if int(a["category_id"]) not in label_of:
                raise DfkdError(f"{self.name}: annotation {a.get('id', n)} has unknown category {a['category_id']}")
            x, y, w, h = (float(v) for v in a["bbox"])
            a.setdefault("id", n + 1)
            a.setdefault("area", w * h)
            a.setdefault("iscrowd", 0)
            annotations.append(a)
            i = index_of[int(a["image_id"])]
            if a["iscrowd"]:
                continue
            W, H = float(images[i]["width"]), float(images[i]["height"])
            x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
            x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
            if x2 > x1 and y2 > y1:
                per_image[i].append(([x1, y1, x2, y2], label_of[int(a["category_id"])]))
        if len({a["id"] for a in annotations}) != len(annotations):
            raise DfkdError(f"{self.name}: duplicate annotation ids")

        self._images = images
        self._boxes = [np.asarray([b for b, _ in p], dtype=np.float32).reshape(-1, 4) for p in per_image]
        self._labels = [np.asarray([c for _, c in p], dtype=np.int64) for p in per_image]
        self._gt = {"info": dict(coco.get("info") or {}), "images": images, "annotations": annotations,
                    "categories": [dict(c) for c in cats]}
        self._coco = None
        if cache is None:
            cache = sum(int(im["width"]) * int(im["height"]) * 3 for im in images) <= AUTO_CACHE_BYTES
        self._cache: Optional[dict[int, np.ndarray]] = {} if cache else None

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_boxes(self) -> int:
        """Boxes in the targets (crowd and empty boxes excluded)."""
        return sum(len(b) for b in self._boxes)

    def image_path(self, i: int) -> Path:
        return self.image_root / self._images[i]["file_name"]

    def image_info(self, i: int) -> dict:
        """The COCO ``images`` entry of image ``i`` (id, file_name, width, height, ...)."""
        return dict(self._images[i])

    def get_target(self, i: int) -> dict:
        """The target of image ``i`` without decoding the image."""
        return {"boxes": torch.from_numpy(self._boxes[i].copy()), "labels": torch.from_numpy(self._labels[i].copy()),
                "image_id": self.image_ids[i]}

    def _pixels(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.image_path(i)
        x = _read_rgb(path)
        info = self._images[i]
        if (x.shape[1], x.shape[0]) != (int(info["width"]), int(info["height"])):
            raise DfkdError(f"image {path} is {x.shape[1]}x{x.shape[0]} but its annotation says "
                            f"{info['width']}x{info['height']}")
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        image = torch.from_numpy(self._pixels(i)).permute(2, 0, 1).float().div_(255.0)
        target = self.get_target(i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def coco(self):
        """The ground truth as a ``pycocotools.coco.COCO`` object (built once, then shared)."""
        if self._coco is None:
            self._coco = _quiet_coco(copy.deepcopy(self._gt))
        return self._coco

    def __repr__(self) -> str:
        return (f"DetectionDataset({self.name!r}, images={len(self)}, boxes={self.num_boxes}, "
                f"classes={self.num_classes})")


def collate_detection(batch):
    """``[(image, target), ...]`` → ``([image, ...], [target, ...])`` (images may differ in size)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


# -- loading ------------------------------------------------------------------------------
def load_detection(path: str | Path, split: Optional[str] = None, cache: Optional[bool] = None) -> DetectionDataset:
    """A COCO json file, a folder holding one, a YOLO folder or a Pascal VOC folder, as a :class:`DetectionDataset`.

    ``split`` picks ``images/<split>`` of a YOLO folder (needed when it has several) or, for a
    folder of several COCO jsons, the one whose name contains it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DfkdError(f"detection data not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DfkdError(f"unknown detection format: {path} (expected a COCO .json file or a folder)")
        return _load_coco_json(path, cache)
    if (path / "labels").is_dir() and (path / "images").is_dir():
        return _load_yolo(path, split, cache)
    if (path / "Annotations").is_dir():
        return _load_voc(path, split, cache)
    jsons = sorted(path.glob("*.json")) or sorted((path / "annotations").glob("*.json"))
    if split is not None and len(jsons) > 1:
        jsons = [j for j in jsons if split in j.stem] or jsons
    if len(jsons) > 1 and any(j.name == "annotations.json" for j in jsons):
        jsons = [j for j in jsons if j.name == "annotations.json"]
    if len(jsons) == 1:
        return _load_coco_json(jsons[0], cache)
    if len(jsons) > 1:
        raise DfkdError(f"{path} holds several COCO jsons ({', '.join(j.name for j in jsons)}): "
                        "pass the file itself or split=")
    raise DfkdError(f"unknown detection format in {path}: expected a COCO json, images/ and labels/ "
                    "folders with a YOLO *.yaml, or a Pascal VOC folder (Annotations/*.xml, JPEGImages/)")


def _image_root_for(json_path: Path, first_file: str) -> Optional[Path]:
    d = json_path.parent
    cands = [d, d / "images", d.parent, d.parent / "images"]
    stem_split = json_path.stem.split("_")[-1]  # instances_val2017.json → val2017
    cands += [d / "images" / stem_split, d.parent / stem_split, d.parent / "images" / stem_split]
    for c in cands:
        if (c / first_file).is_file():
            return c
    return None


def _load_coco_json(path: Path, cache: Optional[bool]) -> DetectionDataset:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DfkdError(f"cannot read COCO json {path}: {_first_line(e)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DfkdError(f"{path} is not a COCO detection json (needs 'images' and 'categories' lists)")
    if not data["images"]:
        raise DfkdError(f"{path} lists no images")
    try:
        files = [str(im["file_name"]) for im in data["images"]]
    except (KeyError, TypeError):
        raise DfkdError(f"{path}: every entry of 'images' needs a file_name") from None
    root = _image_root_for(path, files[0])
    if root is None:
        raise DfkdError(f"image {files[0]} of {path} not found beside it, in images/ beside it, "
                        "or in its parent folder")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DfkdError(f"{len(missing)} of {len(files)} images of {path} are missing under {root} "
                        f"(e.g. {missing[0]})")
    try:
        return DetectionDataset(data, root, name=str(path), cache=cache)
    except (KeyError, TypeError, ValueError) as e:
        raise DfkdError(f"malformed COCO json {path}: {type(e).__name__} {_first_line(e)}") from None


def _yolo_names(root: Path) -> list[str]:
    import yaml

    for y in sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml")):
        try:
            doc = yaml.safe_load(y.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise DfkdError(f"cannot read {y}: {_first_line(e)}") from None
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, list):
            return [str(n) for n in names]
        if isinstance(names, dict):
            try:
                keys = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise DfkdError(f"{y}: the keys of 'names' must be class indices") from None
            if keys != list(range(len(keys))):
                raise DfkdError(f"{y}: 'names' must number the classes 0..{len(keys) - 1}")
            return [str(names[k] if k in names else names[str(k)]) for k in keys]
        if names is not None:
            raise DfkdError(f"{y}: 'names' must be a list or a mapping of class index to name")
    raise DfkdError(f"no *.yaml with class 'names' in YOLO folder {root}")


def _yolo_boxes(label_file: Path, width: int, height: int, num_classes: int) -> list[tuple[int, list[float]]]:
    out = []
    try:
        text = label_file.read_text()
    except OSError as e:
        raise DfkdError(f"cannot read {label_file}: {_first_line(e)}") from None
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, vals = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            raise DfkdError(f"{label_file}:{ln}: expected 'class cx cy w h', got {line.strip()!r}") from None
        if len(vals) == 4:
            cx, cy, w, h = vals
        elif len(vals) >= 6 and len(vals) % 2 == 0:  # segmentation polygon x1 y1 x2 y2 ...
            xs, ys = vals[0::2], vals[1::2]
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise DfkdError(f"{label_file}:{ln}: expected 'class cx cy w h', got {line.strip()!r}")
        if not 0 <= cls < num_classes:
            raise DfkdError(f"{label_file}:{ln}: class {cls} outside 0..{num_classes - 1}")
        x1, y1 = max((cx - w / 2) * width, 0.0), max((cy - h / 2) * height, 0.0)
        x2, y2 = min((cx + w / 2) * width, float(width)), min((cy + h / 2) * height, float(height))
        if x2 > x1 and y2 > y1:
            out.append((cls, [x1, y1, x2 - x1, y2 - y1]))
    return out


def _load_yolo(root: Path, split: Optional[str], cache: Optional[bool]) -> DetectionDataset:
    names = _yolo_names(root)
    img_dir, lbl_dir = root / "images", root / "labels"
    direct = [p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    splits = sorted(p.name for p in img_dir.iterdir() if p.is_dir())
    if split is not None:
        if split not in splits:
            raise DfkdError(f"no split {split!r} in {img_dir} (found: {', '.join(splits) or 'none'})")
        img_dir, lbl_dir = img_dir / split, lbl_dir / split
    elif not direct:
        if len(splits) > 1:
            raise DfkdError(f"{img_dir} holds several splits ({', '.join(splits)}): pass split=")
        if not splits:
            raise DfkdError(f"no images in {img_dir}")
        split = splits[0]
        img_dir, lbl_dir = img_dir / split, lbl_dir / split
    files = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DfkdError(f"no images in {img_dir}")
    stems = [p.stem for p in files]
    # COCO-style numeric names (000000000009.jpg) keep their id; anything else is numbered from 1
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        ids = [int(s) for s in stems]
    else:
        ids = list(range(1, len(files) + 1))
    images, annotations = [], []
    for iid, f in zip(ids, files):
        w, h = _image_size(f)
        images.append({"id": iid, "file_name": f.name, "width": w, "height": h})
        lf = lbl_dir / (f.stem + ".txt")
        if lf.is_file():  # no label file: an image without objects
            for cls, box in _yolo_boxes(lf, w, h, len(names)):
                annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": cls + 1,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    coco = {"info": {"description": f"converted from YOLO folder {root.name}" + (f" ({split})" if split else "")},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    name = f"{root}" + (f" [{split}]" if split else "")
    return DetectionDataset(coco, img_dir, name=name, cache=cache)


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _voc_objects(xml_path: Path) -> tuple[Optional[str], Optional[tuple[int, int]], list[tuple[str, list[float], int]]]:
    """(file name, (width, height), [(class name, [xmin, ymin, xmax, ymax], difficult), ...]) of one VOC XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DfkdError(f"cannot read {xml_path}: {_first_line(e)}") from None

    def text(node, tag):
        child = node.find(tag)
        return None if child is None or child.text is None else child.text.strip()

    size = root.find("size")
    wh = None
    if size is not None and text(size, "width") and text(size, "height"):
        wh = (int(float(text(size, "width"))), int(float(text(size, "height"))))
    objects = []
    for obj in root.iter("object"):
        name, bb = text(obj, "name"), obj.find("bndbox")
        if not name or bb is None:
            raise DfkdError(f"{xml_path}: an <object> without <name> or <bndbox>")
        try:
            box = [float(text(bb, k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise DfkdError(f"{xml_path}: object {name!r} has a bndbox without numeric xmin/ymin/xmax/ymax") from None
        objects.append((name, box, int(float(text(obj, "difficult") or 0))))
    return text(root, "filename"), wh, objects


def _load_voc(root: Path, split: Optional[str], cache: Optional[bool]) -> DetectionDataset:
    """A Pascal VOC folder: ``Annotations/*.xml`` and ``JPEGImages/``, optionally ``ImageSets/Main/<split>.txt``.

    Classes: the 20 VOC classes in their usual order when every name is one of them, else the sorted
    names found. Boxes use VOC's 1-based pixel corners (``xmin - 1``, ``ymin - 1`` become the COCO
    origin). ``difficult`` objects are kept as crowd regions: not training targets, and ignored by COCOeval.
    """
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if split is not None:
        lst = root / "ImageSets" / "Main" / f"{split}.txt"
        if not lst.is_file():
            raise DfkdError(f"no split {split!r} in {root} (expected {lst.relative_to(root)})")
        stems = [line.split()[0] for line in lst.read_text().splitlines() if line.strip()]
        xmls = [ann_dir / f"{s}.xml" for s in stems]
        missing = [x for x in xmls if not x.is_file()]
        if missing:
            raise DfkdError(f"{lst.name} names {len(missing)} image(s) without an annotation, e.g. {missing[0].name}")
    else:
        xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise DfkdError(f"no annotations in {ann_dir}")
    parsed = []
    for x in xmls:
        fname, wh, objects = _voc_objects(x)
        f = img_dir / (fname or "")
        if not fname or not f.is_file():
            cands = [p for p in img_dir.glob(x.stem + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not cands:
                raise DfkdError(f"{x.name}: no image {fname or x.stem} in {img_dir}")
            f = cands[0]
        parsed.append((f, wh or _image_size(f), objects))
    names = sorted({o[0] for _, _, objs in parsed for o in objs})
    if set(names) <= set(VOC_CLASSES):
        names = list(VOC_CLASSES)
    if not names:
        raise DfkdError(f"{root}: no objects in any annotation (class names unknown)")
    label = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for iid, (f, (w, h), objects) in enumerate(parsed, start=1):
        images.append({"id": iid, "file_name": str(f.relative_to(img_dir)), "width": w, "height": h})
        for name, (x1, y1, x2, y2), difficult in objects:
            x1, y1 = x1 - 1.0, y1 - 1.0
            box = [x1, y1, max(0.0, x2 - x1), max(0.0, y2 - y1)]
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": label[name],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(bool(difficult))})
    coco = {"info": {"description": f"converted from Pascal VOC folder {root.name}" + (f" ({split})" if split else "")},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    return DetectionDataset(coco, img_dir, name=f"{root}" + (f" [{split}]" if split else ""), cache=cache)


# -- canvas builder -----------------------------------------------------------------------
CANVAS_FORMAT = 1
BACKGROUNDS = ("image", "raw", "gray")
_ASPECT = (0.8, 1.25)  # height/width of an object before clipping its sides to the scale range
_MAX_IOU, _MAX_COVER = 0.1, 0.25  # placement limits against objects already on the canvas
_TRIES = 20


def _as_uint8_nhwc(images) -> np.ndarray:
    """uint8 or [0, 1] float images, NCHW, NHWC or NHW, as uint8 (N, H, W, 3)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DfkdError(f"object images must be NCHW or NHWC, got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    elif x.shape[-1] not in (1, 3):
        raise DfkdError(f"object images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def _render_object(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A uint8 HWC object image resized to (height, width, 3): PIL bilinear, antialiased when shrinking."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((int(width), int(height)), Image.BILINEAR), dtype=np.uint8)


def _render_background(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """The canvas background from a uint8 HWC image: ``image`` = resized, Gaussian-blurred (radius
    size/32) and its contrast halved toward mid-gray, so the sharp full-contrast objects stand out
    while the scene stays real; ``raw`` = resized only; ``gray`` = constant 128."""
    from PIL import Image, ImageFilter

    if mode == "gray":
        return np.full((size, size, 3), 128, dtype=np.uint8)
    im = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    if mode == "raw":
        return np.asarray(im, dtype=np.uint8)
    im = im.filter(ImageFilter.GaussianBlur(radius=size / 32))
    return ((np.asarray(im, dtype=np.uint16) + 128) // 2).astype(np.uint8)


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        if inter / (w * h + pw * ph - inter) > _MAX_IOU or inter > _MAX_COVER * min(w * h, pw * ph):
            return True
    return False


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{images.shape}".encode())
    h.update(images.tobytes())
    h.update(labels.astype("<i8").tobytes())
    return h.hexdigest()


def _existing(json_path: Path, params: dict) -> Optional[bool]:
    """True: a finished set with these parameters; False: something else; None: nothing there."""
    if not json_path.exists():
        return None
    try:
        data = json.loads(json_path.read_text())
        same = data["info"]["dfkd_canvases"] == params
        files = [im["file_name"] for im in data["images"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return same and all((json_path.parent / "images" / f).is_file() for f in files)


def build_canvases(images, labels, classes: Sequence[str], out_dir: str | Path, num_canvases: int,
                   canvas_size: int = 64, objects: tuple[int, int] = (1, 3), scale: tuple[float, float] = (0.25, 0.6),
                   seed: int = 0, background: str = "image", overwrite: bool = False,
                   info: Optional[Mapping[str, Any]] = None) -> Path:
    """Paste real object images onto real backgrounds; write a COCO set; return its json path.

    ``images``: uint8 (or [0, 1] float) NCHW/NHWC arrays or tensors of a classification set, with
    int ``labels`` indexing ``classes``. Each of ``num_canvases`` square canvases of ``canvas_size``
    pixels gets a background made from one image of the set (see ``_render_background``:
    ``background`` ∈ ``image``, ``raw``, ``gray``) and ``objects`` (min, max) other images of the set,
    each resized (bilinear, antialiased) to a square-ish box whose sides lie in
    ``scale`` × ``canvas_size`` (aspect 0.8–1.25), at a random position; a placement overlapping an
    earlier box by IoU > 0.1 or covering more than a quarter of either box is retried (20 tries, then
    the object is dropped; the first always fits). Objects are pasted opaquely, so a box holds
    exactly its resized source image except where a later object covers it.

    Writes ``out_dir/images/NNNNNN.png`` and then, atomically, ``out_dir/annotations.json``:
    categories ``id = label + 1``, annotations with ``bbox`` xywh, ``area``, ``iscrowd`` 0 and the
    ``source_index`` of the object image, images with their ``background_index``, and the build
    parameters (with a hash of the source arrays, and ``info``) under ``info.dfkd_canvases``. Canvas
    ``i`` depends only on ``(seed, i)`` and the sources, so the same call gives byte-identical files;
    a finished set with the same parameters is returned as it is, an interrupted one (no json) is
    rebuilt, and one with other parameters is an error unless ``overwrite``.
    """
    x = _as_uint8_nhwc(images)
    y = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    classes = [str(c) for c in classes]
    n = len(x)
    if y.shape != (n,):
        raise DfkdError(f"labels must be a vector of {n} class indices, got shape {tuple(y.shape)}")
    if n < 2:
        raise DfkdError("a canvas set needs at least 2 source images (objects and a different background)")
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise DfkdError(f"labels must lie in 0..{len(classes) - 1}")
    lo_n, hi_n = int(objects[0]), int(objects[1])
    if not 1 <= lo_n <= hi_n or hi_n >= n:
        raise DfkdError(f"objects must be (min, max) with 1 <= min <= max < {n}, got {tuple(objects)}")
    canvas_size, num_canvases = int(canvas_size), int(num_canvases)
    if canvas_size < 4 or num_canvases < 1:
        raise DfkdError("canvas_size must be >= 4 and num_canvases >= 1")
    if not 0 < float(scale[0]) <= float(scale[1]) <= 1:
        raise DfkdError(f"scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
    if background not in BACKGROUNDS:
        raise DfkdError(f"unknown background {background!r} (choose from {', '.join(BACKGROUNDS)})")
    lo_px = max(2, int(round(float(scale[0]) * canvas_size)))
    hi_px = max(lo_px, min(canvas_size, int(round(float(scale[1]) * canvas_size))))

    params = {"format": CANVAS_FORMAT, "num_canvases": num_canvases, "canvas_size": canvas_size,
              "objects": [lo_n, hi_n], "scale": [float(scale[0]), float(scale[1])], "object_pixels": [lo_px, hi_px],
              "seed": int(seed), "background": background, "classes": classes, "num_sources": n,
              "sources_sha256": _fingerprint(x, y), "source": dict(info or {})}
    out_dir = Path(out_dir).expanduser()
    json_path = out_dir / "annotations.json"
    state = _existing(json_path, params)
    if state:
        return json_path
    if state is False and not overwrite:
        raise DfkdError(f"{out_dir} holds another canvas set (other parameters or sources, or incomplete); "
                        "rebuild it with overwrite=True (--overwrite) or choose another folder")
    if json_path.exists():
        json_path.unlink()  # from here on the folder counts as unfinished until the new json lands
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    from PIL import Image

    coco_images, annotations = [], []
    for i in range(num_canvases):
        rng = np.random.default_rng([int(seed), i])
        k = int(rng.integers(lo_n, hi_n + 1))
        picks: list[int] = []
        while len(picks) < k + 1:  # k objects and a background, all different images
            j = int(rng.integers(n))
            if j not in picks:
                picks.append(j)
        *obj_idx, bg_idx = picks
        canvas = _render_background(x[bg_idx], canvas_size, background).copy()
        placed: list[tuple[int, int, int, int]] = []
        for j in obj_idx:
            for _ in range(_TRIES):
                w = int(rng.integers(lo_px, hi_px + 1))
                h = int(np.clip(round(w * rng.uniform(*_ASPECT)), lo_px, hi_px))
                bx = int(rng.integers(0, canvas_size - w + 1))
                by = int(rng.integers(0, canvas_size - h + 1))
                if not _overlaps((bx, by, w, h), placed):
                    break
            else:
                continue
            placed.append((bx, by, w, h))
            canvas[by:by + h, bx:bx + w] = _render_object(x[j], w, h)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(y[j]) + 1,
                                "bbox": [bx, by, w, h], "area": w * h, "iscrowd": 0, "source_index": j})
        name = f"{i:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="PNG")
        (img_dir / name).write_bytes(buf.getvalue())
        coco_images.append({"id": i + 1, "file_name": name, "width": canvas_size, "height": canvas_size,
                            "background_index": bg_idx})
    for stale in img_dir.glob("*.png"):  # left by an earlier, larger build
        if re.fullmatch(r"\d{6}", stale.stem) and int(stale.stem) >= num_canvases:
            stale.unlink()
    data = {"info": {"description": "dfkd canvas detection set: real object images pasted on real backgrounds",
                     "dfkd_canvases": params},
            "images": coco_images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": name} for c, name in enumerate(classes)]}
    atomic_write_json(json_path, data)
    return json_path


# per source: canvas size, object side range in pixels, canvases per split
CANVAS_BENCHMARKS = {
    "digits": {"canvas_size": 48, "object_pixels": (12, 24), "train": 2000, "test": 500},
    "cifar10": {"canvas_size": 64, "object_pixels": (16, 38), "train": 5000, "test": 1000},
}


def build_canvas_benchmark(source: str, out_dir: str | Path, root: str | Path | None = None,
                           train_canvases: Optional[int] = None, test_canvases: Optional[int] = None,
                           canvas_size: Optional[int] = None, seed: int = 0,
                           object_pixels: Optional[tuple[int, int]] = None, objects: tuple[int, int] = (1, 3),
                           background: str = "image", overwrite: bool = False) -> dict[str, Path]:
    """Canvas sets from a classification dataset: ``out_dir/train`` from its train split only
    (objects and backgrounds), ``out_dir/test`` from its test split only. Returns both json paths.

    ``source``: ``digits`` (built in; 48-px canvases, digits 12–24 px, 2000/500 canvases) or
    ``cifar10`` (``root`` or ``$DFKD_DATA``; 64-px canvases, objects 16–38 px, 5000/1000 canvases).
    """
    if source not in CANVAS_BENCHMARKS:
        raise DfkdError(f"unknown canvas source {source!r} (choose from {', '.join(CANVAS_BENCHMARKS)})")
    d = CANVAS_BENCHMARKS[source]
    size = int(canvas_size or d["canvas_size"])
    lo, hi = object_pixels or d["object_pixels"]
    if not 2 <= lo <= hi:
        raise DfkdError(f"object_pixels must be (min, max) with 2 <= min <= max, got {(lo, hi)}")
    if hi > size:
        raise DfkdError(f"objects up to {hi} px do not fit a {size}-px canvas: raise canvas_size or "
                        "lower object_pixels")
    if source == "digits":
        from dfkd.data import load_digits

        spec = load_digits(train=True)
    else:
        from dfkd.data import load_cifar10

        if root is None:
            root = os.environ.get("DFKD_DATA")
        spec = load_cifar10(root, train=True)
        if spec.train is None:
            raise DfkdError("no CIFAR-10 train parts (cifar10_train_part*of5.npz) beside cifar10_test.npz")
    out_dir = Path(out_dir).expanduser()
    counts = {"train": train_canvases or d["train"], "test": test_canvases or d["test"]}
    out = {}
    for split, ds in (("train", spec.train), ("test", spec.test)):
        out[split] = build_canvases(ds.images, ds.labels, spec.class_names, out_dir / split, counts[split],
                                    canvas_size=size, objects=objects, scale=(lo / size, hi / size), seed=seed,
                                    background=background, overwrite=overwrite,
                                    info={"dataset": source, "split": split})
    return out
