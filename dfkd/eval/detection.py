"""COCO mAP of a detector on a real detection set (pycocotools' COCOeval, bbox, quietly).

``coco_map`` scores COCO result dicts against a ground truth; ``predictions_to_coco`` turns
torchvision-style outputs into such dicts; ``evaluate_detector`` runs a detector over a
:class:`dfkd.data.detection.DetectionDataset` and does both.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn


def _class_names(gt, class_names) -> dict[int, str]:
    cat_ids = sorted(gt.getCatIds())
    if class_names is None:
        return {c: str(gt.cats[c].get("name", c)) for c in cat_ids}
    if isinstance(class_names, Mapping):
        return {c: str(class_names.get(c, gt.cats[c].get("name", c))) for c in cat_ids}
    names = list(class_names)
    if len(names) != len(cat_ids):
        raise ValueError(f"class_names has {len(names)} entries but the ground truth {len(cat_ids)} categories")
    return {c: str(n) for c, n in zip(cat_ids, names)}


def coco_map(gt, detections: Iterable[Mapping[str, Any]], class_names: Optional[Sequence[str] | Mapping[int, str]] = None,
             image_ids: Optional[Iterable[int]] = None) -> dict[str, Any]:
    """COCO box mAP of ``detections`` against ``gt`` (a ``pycocotools.coco.COCO``).

    ``detections``: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
    ``class_names``: names in ascending category-id order, or ``{category_id: name}`` (default: the
    ground truth's). ``image_ids`` restricts the evaluation to those images (default: all).

    Returns ``map`` (AP averaged over IoU 0.50:0.05:0.95), ``map50``, ``map75`` (all areas, up to 100
    detections per image, COCO's 101-point interpolated precision), ``per_class`` ({name: AP} for
    the classes with ground-truth boxes in the evaluated images), ``num_images`` and
    ``num_detections``. No detections give zeros.
    """
    from pycocotools.cocoeval import COCOeval

    img_ids = sorted(gt.getImgIds()) if image_ids is None else [int(i) for i in image_ids]
    unknown = [i for i in img_ids if i not in gt.imgs]
    if unknown:
        raise ValueError(f"image_ids not in the ground truth, e.g. {unknown[0]}")
    names = _class_names(gt, class_names)
    wanted = set(img_ids)
    dets = []
    for d in detections:
        iid, cid = int(d["image_id"]), int(d["category_id"])
        if iid not in gt.imgs:
            raise ValueError(f"detection on image {iid}, which is not in the ground truth")
        if cid not in gt.cats:
            raise ValueError(f"detection with category_id {cid}, which is not in the ground truth "
                             f"(categories {min(gt.cats)}..{max(gt.cats)}; contiguous labels need mapping)")
        if iid in wanted:
            dets.append({"image_id": iid, "category_id": cid, "bbox": [float(v) for v in d["bbox"]],
                         "score": float(d["score"])})
    with_gt = sorted({a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=img_ids))
                      if not a.get("iscrowd", 0) and not a.get("ignore", 0)})
    result: dict[str, Any] = {"map": 0.0, "map50": 0.0, "map75": 0.0,
                              "per_class": {names[c]: 0.0 for c in with_gt},
                              "num_images": len(img_ids), "num_detections": len(dets)}
    if not dets or not img_ids:
        return result
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
    # precision: [IoU thresholds T, recall points R, categories K, area ranges A, max dets M];
    # area "all" is index 0 and maxDets 100 the last, as in COCOeval.summarize()
    prec = ev.eval["precision"][:, :, :, 0, -1]
    ious = ev.params.iouThrs

    def mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    result["map"] = mean(prec)
    result["map50"] = mean(prec[int(np.argmin(np.abs(ious - 0.5)))])
    result["map75"] = mean(prec[int(np.argmin(np.abs(ious - 0.75)))])
    for k, cid in enumerate(ev.params.catIds):
        pk = prec[:, :, k]
        if (pk > -1).any():
            result["per_class"][names[cid]] = mean(pk)
    return result


def predictions_to_coco(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                        category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """torchvision-style outputs (``boxes`` xyxy, ``scores``, contiguous ``labels``) → COCO result dicts.

    ``category_ids[label]`` is the COCO category of contiguous label ``label``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs for {len(image_ids)} image ids")
    cats = [int(c) for c in category_ids]
    out = []
    for o, iid in zip(outputs, image_ids):
        boxes = torch.as_tensor(o["boxes"]).detach().cpu().double().reshape(-1, 4)
        scores = torch.as_tensor(o["scores"]).detach().cpu().double().reshape(-1)
        labels = torch.as_tensor(o["labels"]).detach().cpu().long().reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError("boxes, scores and labels differ in length")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cats)):
            raise ValueError(f"labels must lie in 0..{len(cats) - 1}, got {labels.min().item()}..{labels.max().item()}")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        for b, s, lab in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": int(iid), "category_id": cats[lab], "bbox": b, "score": s})
    return out


def evaluate_detector(model: nn.Module, dataset, batch_size: int = 16, device: torch.device | str = "cpu",
                      max_images: Optional[int] = None, progress: bool = False) -> dict[str, Any]:
    """COCO mAP (:func:`coco_map`) of a torchvision-style detector on a ``DetectionDataset``.

    The model is called as ``model([image, ...])`` (float [0, 1] CHW images on ``device``) in eval
    mode under ``torch.no_grad()`` and returns one ``{"boxes", "scores", "labels"}`` dict per image;
    its train/eval mode is restored afterwards. ``max_images`` scores only the first images.
    """
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    starts = range(0, n, max(1, int(batch_size)))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="detect", unit="batch")
    was_training = model.training
    model.eval()
    dets: list[dict[str, Any]] = []
    image_ids: list[int] = []
    try:
        with torch.no_grad():
            for s in starts:
                batch = [dataset[i] for i in range(s, min(s + batch_size, n))]
                ids = [int(t["image_id"]) for _, t in batch]
                outputs = model([img.to(device) for img, _ in batch])
                dets += predictions_to_coco(outputs, ids, dataset.category_ids)
                image_ids += ids
    finally:
        model.train(was_training)
    return coco_map(dataset.coco(), dets, class_names=dataset.classes, image_ids=image_ids)
