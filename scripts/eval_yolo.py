#!/usr/bin/env python
"""COCO mAP of a YOLO checkpoint on a detection set, through dfkd's loader and evaluation.

Loads the ``.pt`` file without running its code (``dfkd.detection.yolo.load_yolo``), reads the
set with ``dfkd.data.detection.load_detection`` (COCO json or YOLO folder) and scores it with
``dfkd.eval.detection`` (pycocotools) at confidence 0.001, IoU 0.6, 300 detections per image,
once per letterbox mode (``square``: every image padded to ``--image-size``²; ``auto``: padded
only to a multiple of the largest stride). Writes ``<out>/<name>.{json,md}``.

    DFKD_DATA=PATH python scripts/eval_yolo.py                     # YOLOv5n on coco128, 640 px
    python scripts/eval_yolo.py --weights my.pt --data my_set/ --name my_yolo --letterbox square
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

PROG = "eval_yolo"
# mAP@.5 of the shared YOLOv5n on coco128 at 640 px measured outside this project
# (teachers/yolov5n facts in the data folder's README)
REFERENCE_MAP50 = 0.545


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = os.environ.get("DFKD_DATA")
    a = ap.add_argument
    a("--weights", default=str(Path(data) / "teachers/yolov5n/yolov5n.pt") if data else None,
      help="YOLO .pt checkpoint (default: $DFKD_DATA/teachers/yolov5n/yolov5n.pt)")
    a("--data", default=str(Path(data) / "detection/coco128") if data else None,
      help="detection set: COCO json or YOLO folder (default: $DFKD_DATA/detection/coco128)")
    a("--image-size", type=int, default=640)
    a("--letterbox", nargs="+", choices=["square", "auto"], default=["square", "auto"])
    a("--batch-size", type=int, default=8)
    a("--max-images", type=int, default=None)
    a("--device", default="cpu")
    a("--threads", type=int, default=1)
    a("--reference-map50", type=float, default=REFERENCE_MAP50,
      help="the original's mAP@.5 to compare with (default: the shared YOLOv5n's on coco128)")
    a("--out", default="results")
    a("--name", default="yolov5n_coco128")
    return ap


def run(args: argparse.Namespace) -> int:
    import torch

    from dfkd.bench import redact_paths
    from dfkd.data.detection import load_detection
    from dfkd.detection.yolo import evaluate_yolo, load_yolo
    from dfkd.errors import DfkdError
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware

    if not args.weights or not args.data:
        raise DfkdError("give --weights and --data, or set DFKD_DATA to the shared data folder")
    torch.set_num_threads(max(1, args.threads))
    started, load_start = time.perf_counter(), os.getloadavg()
    det = load_yolo(args.weights, image_size=args.image_size)
    dataset = load_detection(args.data)
    rows = []
    for mode in args.letterbox:
        det.auto = mode == "auto"
        r = evaluate_yolo(det, dataset, batch_size=args.batch_size, device=args.device, max_images=args.max_images,
                          progress=True)
        rows.append({"letterbox": mode, "map": r["map"], "map50": r["map50"], "map75": r["map75"],
                     "map50_minus_reference": r["map50"] - args.reference_map50, "num_images": r["num_images"],
                     "num_detections": r["num_detections"], "classes_scored": len(r["per_class"]),
                     "seconds": r["seconds"], "images_per_second": r["images_per_second"],
                     "per_class_ap": r["per_class"]})
        print(f"{mode:<7} mAP@[.5:.95] {r['map']:.4f}  mAP@.5 {r['map50']:.4f}  "
              f"({r['num_images']} images, {r['seconds']:.0f} s)")
    result = redact_paths({
        "benchmark": args.name,
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "weights": args.weights, "data": args.data, "image_size": args.image_size,
        "settings": {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300, "multi_label": True,
                     "pad_value": 114, "evaluation": "pycocotools COCOeval bbox (maxDets 100), classes with boxes"},
        "model": {"parameters": sum(p.numel() for p in det.parameters()), "batchnorm_layers": len(det.batchnorm_layers()),
                  "strides": det.model.strides, "classes": det.num_classes, "version": det.model.version},
        "class_names_match_data": list(det.class_names) == list(dataset.classes),
        "reference_map50": args.reference_map50,
        "reference": "mAP@.5 of the original implementation on the same set, measured outside this project",
        "hardware": hardware(), "device": args.device,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
        "rows": rows,
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{args.name}.json", out / f"{args.name}.md"
    atomic_write_json(jpath, result)
    hw = result["hardware"]
    m = result["model"]
    lines = [
        f"# {Path(args.weights).name} on {Path(args.data).name}: COCO mAP through dfkd",
        "",
        f"- command: `{result['command']}`",
        f"- weights: `{result['weights']}` (loaded without running its code; {m['parameters']:,} parameters, "
        f"{m['batchnorm_layers']} BatchNorm layers, strides {m['strides']})",
        f"- data: `{result['data']}`; {args.image_size} px; confidence 0.001, IoU 0.6, 300 detections per image, "
        "pycocotools (100 per image), classes with ground-truth boxes",
        f"- hardware: {hw.get('gpu') or 'CPU'}, {hw['cpu_count']} cores, torch {hw['torch']} ({hw['cpu_threads']} "
        f"threads), device {args.device}; wall time {result['wall_seconds']:.0f} s; load average "
        f"{load_start[0]:.1f} → {result['loadavg_end'][0]:.1f} (shared machine: times are noisy)",
        f"- reference mAP@.5 (the original implementation, measured outside this project): {args.reference_map50}",
        "",
        "| letterbox | mAP@[.5:.95] | mAP@.5 | mAP@.75 | mAP@.5 − reference | images | classes | images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['letterbox']} | {r['map']:.4f} | {r['map50']:.4f} | {r['map75']:.4f} "
                     f"| {r['map50_minus_reference']:+.4f} | {r['num_images']} | {r['classes_scored']} "
                     f"| {r['images_per_second']:.2f} |")
    lines += ["", "`square`: every image letterboxed to the full size; `auto`: padded only to a multiple of 32."]
    atomic_write_bytes(mpath, ("\n".join(lines) + "\n").encode())
    print(f"wrote {jpath} and {mpath}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from dfkd.cli.common import run_script

    return run_script(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
