"""Pieces of the detection benchmark (scripts/bench_b4_detection.py) that are library work: the
canvas set and its FCOS teacher, built once and cached by their settings, and the side-by-side rows
(mean over seeds, ratio to the real-data ceiling, per-seed ratios)."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch


def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def canvas_teacher(work: Path, canvas_cfg: Mapping[str, Any], teacher_cfg: Mapping[str, Any], *,
                   root: Optional[str] = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Canvases (``dfkd.data.detection.build_canvas_benchmark``) and an FCOS teacher on a small BatchNorm
    CNN trained on the train canvases, both kept in ``work`` under a key of their settings and reused.

    ``canvas_cfg``: source, canvas_size, object_pixels, objects, train, test, background, seed.
    ``teacher_cfg``: width, fpn_channels, head_convs, steps, lr, batch, channels, mean, std, flip, warmup
    (augment and format are added). Returns the paths, datasets (one-channel ones read the canvases'
    gray), the teacher (eval mode, on ``device``), its checkpoint, whether it was cached and timings.
    """
    from dfkd.data.detection import build_canvas_benchmark, load_detection
    from dfkd.detection.boxes import BoxAugment
    from dfkd.detection.models import build_detector, load_detector, save_detector
    from dfkd.detection.train import train_detector

    c, t = dict(canvas_cfg), dict(teacher_cfg)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_canvas_benchmark(c["source"], work / f"canvases_{settings_key(c)}", root=root,
                                   train_canvases=c["train"], test_canvases=c["test"], canvas_size=c["canvas_size"],
                                   seed=c["seed"], object_pixels=tuple(c["object_pixels"]),
                                   objects=tuple(c["objects"]), background=c["background"])
    train_ds, test_ds = load_detection(paths["train"], cache=True), load_detection(paths["test"], cache=True)
    if int(t["channels"]) == 1:  # gray canvases: keep one of the (equal) RGB channels
        for ds in (train_ds, test_ds):
            ds.transform = lambda image, target: (image.mean(0, keepdim=True), target)
    canvas_seconds = time.perf_counter() - t0

    warmup = int(t.pop("warmup", 50))
    key = {"canvases": c, "arch": "fcos", "backbone": "small_cnn", **t,
           "augment": {"jitter": 0.1, "scale": 0.1}, "format": 2}
    if warmup != 50:  # keyed only when set, so teachers cached before the option stay valid
        key["warmup"] = warmup
    tpath = work / f"teacher_{settings_key(key)}.safetensors"
    seconds, cached = 0.0, tpath.is_file()
    if cached:
        model = load_detector(tpath)
    else:
        torch.manual_seed(c["seed"])
        model = build_detector("fcos", "small_cnn", num_classes=train_ds.num_classes, image_size=c["canvas_size"],
                               in_chans=int(t["channels"]), mean=tuple(t["mean"]), std=tuple(t["std"]),
                               width=t["width"], fpn_channels=t["fpn_channels"], head_convs=t["head_convs"])
        t1 = time.perf_counter()
        train_detector(model, train_ds, steps=t["steps"], lr=t["lr"], warmup=warmup, batch_size=t["batch"],
                       device=device, seed=c["seed"], progress=False,
                       augment=BoxAugment(flip=bool(t["flip"]), jitter=0.1, scale=0.1))
        seconds = time.perf_counter() - t1
        save_detector(model, tpath)
        tpath.with_name(tpath.stem + ".settings.json").write_text(json.dumps(key, indent=1))
    model.to(device).eval()
    return {"paths": paths, "train": train_ds, "test": test_ds, "model": model, "checkpoint": tpath,
            "cached": cached, "train_seconds": seconds, "canvas_seconds": canvas_seconds,
            "settings": {k: v for k, v in key.items() if k != "canvases"}}


def side_by_side(runs: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], target: float,
                 ceiling: str = "real", data_free: str = "box_inversion") -> dict[str, Any]:
    """Rows (means over seeds) with each method's mAP@.5 ratio to the ceiling's, whether the data-free
    method meets ``target`` on the mean, and the same ratio per student seed."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]

        def mean(k, rs=rs):
            vals = [r[k] for r in rs if r[k] is not None]
            return statistics.mean(vals) if vals else None

        rows.append({"method": method, "kind": kinds[method], "map": mean("map"), "map50": mean("map50"),
                     "map50_std": statistics.pstdev([r["map50"] for r in rs]) if len(rs) > 1 else None,
                     "map50_per_seed": [r["map50"] for r in rs], "distill_seconds": mean("distill_seconds"),
                     "images_synthesized": mean("images_synthesized"),
                     "synth_images_per_second": mean("synth_images_per_second"), "steps": mean("steps"),
                     "per_class_ap": {c: statistics.mean(r["per_class_ap"][c] for r in rs)
                                      for c in rs[0]["per_class_ap"]}})
    top = next((r["map50"] for r in rows if r["method"] == ceiling), None)
    for r in rows:
        r["ratio_to_ceiling_map50"] = r["map50"] / top if top else None
    df = next((r for r in rows if r["method"] == data_free), None)
    met = None if df is None or df["ratio_to_ceiling_map50"] is None else df["ratio_to_ceiling_map50"] >= target
    per_seed = {}
    for r in runs:  # the data-free run against the ceiling trained from the same seed
        if r["method"] == data_free:
            c = next((q for q in runs if q["method"] == ceiling and q["seed"] == r["seed"]), None)
            if c is not None and c["map50"] > 0:
                per_seed[r["seed"]] = r["map50"] / c["map50"]
    return {"rows": rows, "data_free": df, "target_met": met, "per_seed": per_seed,
            "target_met_every_seed": all(v >= target for v in per_seed.values()) if per_seed else None}
