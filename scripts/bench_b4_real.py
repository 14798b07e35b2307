#!/usr/bin/env python
"""B4-real: a real detector (the shared YOLOv5n) distilled data-free into a narrower YOLO, against its floor
and ceiling, through ``dfkd-distill task=detection teacher=yolo`` (``dfkd.pipeline.run_distill``).

Rows, the same student (the teacher's architecture at ``--width-multiple``, from the same start:
``--student-init scratch`` or ``teacher``, the teacher's weights by channel selection,
:mod:`dfkd.detection.yolo_slim`), the same settings and the same wall-clock budget each
(``detection.budget_minutes``), after the student's mAP as it starts (no training):

* ``box_noise`` — Gaussian images, the teacher's detections as targets (the floor, not data-free);
* ``box_inversion`` — DIODE-style box-conditioned inversion against the teacher's loss and its
  BatchNorm statistics (data-free);
* ``box_procedural`` — procedural dead-leaves images, the teacher's detections as targets (data-free,
  no optimisation: one teacher forward pass per image);
* ``box_dl_inversion`` — ``box_inversion`` started from dead-leaves images instead of noise (data-free);
* ``box_real`` — the coco128 images themselves, letterboxed, ground truth ignored, the teacher's
  pseudo-boxes as targets (the real-image KD ceiling; the images it trains on are the evaluation
  images, so it is an optimistic ceiling).

Every student is scored on coco128 (COCO mAP@[.5:.95] and mAP@.5, pycocotools, the classes with
boxes), the teacher once, all at ``--image-size`` (letterboxed). Writes
``<out>/<name>.{json,md}`` with the hardware, wall times, seed and the exact command.

    DFKD_DATA=PATH python scripts/bench_b4_real.py                       # CPU, 256 px, ~13 min
    DFKD_DATA=PATH python scripts/bench_b4_real.py --image-size 640 --device cuda --budget-minutes 20 \\
        --name b4_real_gpu
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROWS = ["box_noise", "box_inversion", "box_procedural", "box_dl_inversion", "box_real"]
DEFAULT_ROWS = ["box_noise", "box_inversion", "box_procedural", "box_real"]
KIND = {"box_noise": "floor (not data-free)", "box_inversion": "data-free",
        "box_procedural": "data-free (dead-leaves images, no optimisation)",
        "box_dl_inversion": "data-free (inversion from dead-leaves images)",
        "box_real": "ceiling (the evaluation images, teacher pseudo-boxes)"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    data = os.environ.get("DFKD_DATA")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--weights", default=str(Path(data) / "teachers/yolov5n/yolov5n.pt") if data else None)
    a("--data", default=str(Path(data) / "detection/coco128") if data else None)
    a("--rows", nargs="+", choices=ROWS, default=DEFAULT_ROWS)
    a("--image-size", type=int, default=256)
    a("--budget-minutes", type=float, default=3.5, help="wall-clock budget of each row's distillation")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1)
    a("--device", default="cpu")
    a("--width-multiple", type=float, default=None, help="the student's (default: half the teacher's)")
    a("--student-init", choices=["scratch", "teacher"], default="scratch",
      help="the student's start: a fresh initialisation, or the teacher's weights by channel selection")
    a("--compensate", choices=["none", "dead_leaves", "inversion"], default="none",
      help="with --student-init teacher: compensate the dropped channels from the teacher's statistics on these "
           "images (inversion: dead leaves matched to the teacher's BatchNorm statistics; no real data)")
    a("--compensate-images", type=int, default=32)
    a("--compensate-iterations", type=int, default=100)
    a("--importance", choices=["bn", "l1"], default="bn",
      help="with --student-init teacher: keep the channels of largest BatchNorm |γ| or filter L1 norm")
    a("--kd-batch", type=int, default=8)
    a("--lr", type=float, default=5e-3)
    a("--memory-size", type=int, default=256)
    a("--score-thresh", type=float, default=0.3, help="teacher confidence for a pseudo-box")
    a("--head-matching", action=argparse.BooleanOptionalAction, default=True)
    a("--class-kd", type=float, default=2.0)
    a("--feature-kd", type=float, default=0.0,
      help="with --student-init teacher: weight of the neck features' regression onto the teacher's kept channels")
    a("--freeze-bn", action="store_true",
      help="the student's BatchNorm keeps its starting running statistics (the teacher's, with --student-init teacher)")
    a("--source-batch", type=int, default=8, help="images per round of box_noise and box_real")
    a("--kd-steps", type=int, default=4, help="student steps per round of box_noise and box_real")
    a("--inv-batch", type=int, default=8)
    a("--inv-iterations", type=int, default=30)
    a("--inv-kd-steps", type=int, default=20, help="student steps per inversion batch")
    a("--max-val-images", type=int, default=None)
    a("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    a("--out", type=Path, default=Path("results"))
    a("--name", default="b4_real_cpu")
    return ap.parse_args(argv)


def overrides(args: argparse.Namespace, row: str, score_teacher: bool) -> list[str]:
    common = [
        "teacher=yolo", f"teacher.checkpoint={args.weights}", f"teacher.kwargs.image_size={args.image_size}",
        "data=yolo", f"data.path={args.data}", f"seed={args.seed}", f"threads={args.threads}",
        f"device={args.device}", "progress=false",
        "detection.steps=10000000", f"detection.budget_minutes={args.budget_minutes}",
        f"detection.batch_size={args.kd_batch}", f"detection.lr={args.lr}",
        f"detection.memory_size={args.memory_size}", f"detection.score_thresh={args.score_thresh}",
        f"detection.head_matching={str(args.head_matching).lower()}", f"detection.class_kd={args.class_kd}",
        "detection.checkpoint_every=1000000", "detection.eval_batch_size=16",
        f"detection.score_teacher={str(score_teacher).lower()}",
    ]
    if args.max_val_images:
        common.append(f"detection.max_val_images={args.max_val_images}")
    if args.width_multiple:
        common.append(f"+detection.student_kwargs.width_multiple={args.width_multiple}")
    if args.student_init != "scratch":
        common += [f"detection.student_init={args.student_init}",
                   f"+detection.student_kwargs.importance={args.importance}",
                   f"detection.compensate={args.compensate}", f"detection.compensate_images={args.compensate_images}",
                   f"detection.compensate_iterations={args.compensate_iterations}"]
        if args.compensate != "none" and getattr(args, "work_cache", None):
            common.append(f"detection.compensate_cache={args.work_cache}")
    if args.freeze_bn:
        common.append("detection.freeze_bn=true")
    if args.feature_kd:
        common.append(f"detection.feature_kd={args.feature_kd}")
    if row in ("box_inversion", "box_dl_inversion"):
        init = ["synthesizer.init=dead_leaves"] if row == "box_dl_inversion" else []
        return [*common, "synthesizer=box_inversion", f"synthesizer.batch_size={args.inv_batch}",
                f"synthesizer.iterations={args.inv_iterations}", f"detection.kd_steps={args.inv_kd_steps}", *init]
    extra = [f"synthesizer.score_thresh={args.score_thresh}"] if row in ("box_noise", "box_procedural") else \
        [f"detection.train_path={args.data}"]
    return [*common, f"synthesizer={row}", f"synthesizer.batch_size={args.source_batch}",
            f"detection.kd_steps={args.kd_steps}", *extra]


def command() -> str:
    """This run's command line as run from the repository root (the run folders' location left out)."""
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--work":
            skip = True
            continue
        if not a.startswith("--work="):
            out.append(a)
    return " ".join(shlex.quote(a) for a in ["python", "scripts/bench_b4_real.py", *out])


def untrained_student(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """mAP of the student as it starts (``--student-init``), before any distillation step."""
    from dfkd.bench import compose
    from dfkd.detection.models import detector_metadata
    from dfkd.detection.run import detection_settings, initial_student, load_eval_set, load_teacher_detector, score_detector
    from dfkd.pipeline import _plain, setup_runtime

    cfg = _plain(compose("distill", overrides(args, "box_real", score_teacher=False)))
    s, device = detection_settings(cfg["detection"]), setup_runtime(cfg)
    teacher = load_teacher_detector(cfg["teacher"])
    tb = detector_metadata(teacher)
    t0 = time.perf_counter()
    student = initial_student(teacher, tb, s, args.seed, device).eval()
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = score_detector(student, load_eval_set(cfg["data"], s.val_split, tb["in_chans"]), s, device, s.max_val_images)
    start = args.student_init + (f", compensated: {args.compensate}" if args.compensate != "none" else "")
    return {"method": "untrained", "kind": f"the student as it starts ({start}), no training",
            "map": r["map"], "map50": r["map50"], "map75": r["map75"], "eval_seconds": round(time.perf_counter() - t0, 1),
            "student_params": sum(p.numel() for p in student.parameters()), "init_seconds": round(init_seconds, 1)}


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from dfkd.bench import compose, write_report
    from dfkd.detection.bench import b4_real_markdown, b4_real_row
    from dfkd.errors import DfkdError
    from dfkd.pipeline import hardware, run_distill

    if not args.weights or not args.data:
        raise DfkdError("give --weights and --data, or set DFKD_DATA to the shared data folder")
    torch.set_num_threads(max(1, args.threads))
    started, load_start = time.perf_counter(), os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="b4_real_"))
    rows: list[dict[str, Any]] = []
    teacher: dict[str, Any] = {}
    args.work_cache = str(work / "compensation_images.pt")  # made once, read by every row
    start = untrained_student(args, work)
    print(f"untrained   mAP {start['map']:.4f}  mAP@.5 {start['map50']:.4f}", flush=True)
    for i, row in enumerate(args.rows):
        ov = overrides(args, row, score_teacher=i == 0)
        t0 = time.perf_counter()
        s = run_distill(compose("distill", ov), work / row)
        wall = time.perf_counter() - t0
        if i == 0:
            teacher = {"map": s.get("teacher_map"), "map50": s.get("teacher_map50"), "map75": s.get("teacher_map75"),
                       "params": s["teacher_params"]}
            print(f"teacher     mAP {teacher['map']:.4f}  mAP@.5 {teacher['map50']:.4f}", flush=True)
        rows.append(b4_real_row(row, KIND[row], s, work / row, wall, ov, work))
        print(f"{row:<13} mAP {rows[-1]['map']:.4f}  mAP@.5 {rows[-1]['map50']:.4f}  ({s['steps']} steps, "
              f"{s['images_synthesized']} images, {wall:.0f} s)", flush=True)
    by = {r["method"]: r for r in rows}
    ceiling = by.get("box_real", {}).get("map50")
    for r in [start, *rows]:
        r["ratio_to_ceiling_map50"] = (r["map50"] / ceiling) if ceiling else None
        r["ratio_to_teacher_map50"] = (r["map50"] / teacher["map50"]) if teacher.get("map50") else None
    hw = hardware()
    payload = {
        "benchmark": "B4-real", "command": command(),
        "teacher": {"weights": args.weights, **teacher}, "data": args.data, "image_size": args.image_size,
        "seed": args.seed, "budget_minutes_per_row": args.budget_minutes, "device": args.device,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("weights", "data", "work", "work_cache", "out", "name")},
        "hardware": hw, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - started, 1), "untrained_student": start, "rows": rows,
    }
    lines = b4_real_markdown(payload)
    write_report(args.out, args.name, payload, lines)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from dfkd.cli.common import run_script

    return run_script("bench_b4_real", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
