#!/usr/bin/env python
"""B4: detection, side by side — box-conditioned inversion against its floor and ceiling.

One run, same student and same wall-clock budget for every method:

1. Canvases: real object images pasted on real backgrounds (``build_canvas_benchmark``,
   deterministic), train canvases from the train split, test canvases from the test split only.
   ``--source digits`` (built in, default) or ``--source cifar10`` (``--root`` or ``$DFKD_DATA``).
2. The teacher: an FCOS detector on a small BatchNorm CNN, trained here on the train canvases and
   cached in the work folder (keyed by its settings), scored on the test canvases.
3. A smaller student (fewer channels in backbone, pyramid and heads) distilled from
   ``box_noise`` (Gaussian images: the floor), ``box_inversion`` (DIODE-style, data-free) and
   ``real`` (the train canvases, ground truth ignored, teacher pseudo-labels: the ceiling),
   each under the same wall-clock budget, with mAP on a test subset along the way and on the
   full test set at the end.

COCO mAP@[.5:.95] and mAP@.5 by pycocotools. Target: data-free mAP@.5 ≥ 80 % of the ceiling's.
Writes ``results/b4_detection_<source>.{json,md}`` (+ a time-to-mAP png when matplotlib is there).

    python scripts/bench_b4_detection.py --threads 2                 # digits, CPU (~15 min)
    python scripts/bench_b4_detection.py --budget-minutes 1 --methods box_inversion real
    DFKD_DATA=PATH python scripts/bench_b4_detection.py --source cifar10 --device cuda
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["box_noise", "box_inversion", "real"]
KIND = {"box_noise": "floor (not data-free)", "box_inversion": "data-free",
        "real": "ceiling (uses real train canvases)"}
TARGET = 0.8

# CPU-sized defaults per source (command-line flags override them)
SOURCE_DEFAULTS = {
    # digits canvases are grayscale (detectors take one channel) and digits are not mirror-symmetric
    "digits": {"canvas_size": 32, "object_pixels": (10, 20), "objects": (1, 3), "train_canvases": 2000,
               "test_canvases": 500, "channels": 1, "flip": False, "mean": (0.4,), "std": (0.3,)},
    "cifar10": {"canvas_size": 64, "object_pixels": (16, 38), "objects": (1, 3), "train_canvases": 5000,
                "test_canvases": 1000, "channels": 3, "flip": True, "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225)},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--source", choices=sorted(SOURCE_DEFAULTS), default="digits")
    a("--root", default=None, help="CIFAR-10 folder (default $DFKD_DATA)")
    a("--methods", nargs="+", choices=METHODS, default=METHODS)
    a("--seeds", "--seed", nargs="+", type=int, default=[0], help="student seeds")
    a("--data-seed", type=int, default=None,
      help="seed of the canvases and the teacher (default: the first student seed)")
    a("--threads", type=int, default=2)
    a("--device", default="cpu")
    a("--work", type=Path, default=None,
      help="folder for canvases and the cached teacher (default: a fixed folder in the temp dir, reused)")
    a("--out", type=Path, default=Path("results"))
    a("--name", default=None, help="results name (default b4_detection_<source>)")
    g = ap.add_argument_group("canvases")
    g.add_argument("--canvas-size", type=int, default=None)
    g.add_argument("--object-pixels", nargs=2, type=int, default=None, metavar=("MIN", "MAX"))
    g.add_argument("--objects", nargs=2, type=int, default=None, metavar=("MIN", "MAX"))
    g.add_argument("--train-canvases", type=int, default=None)
    g.add_argument("--test-canvases", type=int, default=None)
    g.add_argument("--background", default="image", choices=["image", "raw", "gray"])
    g.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels the detectors take (default: 1 for digits, whose canvases are gray, 3 else)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal flips in every augmentation (default: off for digits, on for cifar10)")
    g = ap.add_argument_group("teacher (FCOS, small BatchNorm CNN)")
    g.add_argument("--teacher-width", type=int, default=16)
    g.add_argument("--teacher-fpn", type=int, default=32)
    g.add_argument("--teacher-head-convs", type=int, default=2)
    g.add_argument("--teacher-steps", type=int, default=3000)
    g.add_argument("--teacher-lr", type=float, default=3e-3)
    g.add_argument("--teacher-warmup", type=int, default=50, help="linear warm-up steps of the teacher's lr")
    g.add_argument("--teacher-batch", type=int, default=32)
    g.add_argument("--min-teacher-map50", type=float, default=0.8,
                   help="below this, the teacher is flagged as failed in the console and the results")
    g = ap.add_argument_group("student (same for every method)")
    g.add_argument("--student-backbone", default="small_cnn")
    g.add_argument("--student-width", type=int, default=16)
    g.add_argument("--student-fpn", type=int, default=16)
    g.add_argument("--student-head-convs", type=int, default=1)
    g = ap.add_argument_group("distillation (same for every method)")
    g.add_argument("--budget-minutes", type=float, default=5.0, help="wall-clock budget per student method")
    g.add_argument("--steps", type=int, default=None,
                   help="a fixed number of student steps per method instead of the budget (rows that do not "
                        "depend on the machine's speed or load)")
    g.add_argument("--kd-batch", type=int, default=32)
    g.add_argument("--kd-lr", type=float, default=5e-3)
    g.add_argument("--kd-steps-per-round", type=int, default=4,
                   help="student steps per source round for box_noise and real (cheap sources)")
    g.add_argument("--memory-size", type=int, default=4096)
    g.add_argument("--score-thresh", type=float, default=0.45, help="teacher score for a pseudo-label box")
    g.add_argument("--head-matching", action=argparse.BooleanOptionalAction, default=False,
                   help="also match the teacher's head outputs (same pyramid geometry)")
    g.add_argument("--head-weight", type=float, default=1.0)
    g.add_argument("--class-kd", type=float, default=2.0,
                   help="weight of the teacher's class distribution on its objects (0: pseudo-labels only)")
    g.add_argument("--class-kd-temperature", type=float, default=2.0)
    g.add_argument("--source-batch", type=int, default=32, help="images per round for box_noise and real")
    g = ap.add_argument_group("box inversion")
    g.add_argument("--inv-batch", type=int, default=32)
    g.add_argument("--inv-iterations", type=int, default=50)
    g.add_argument("--inv-kd-steps-per-round", type=int, default=40,
                   help="student steps on the memory per synthesized batch (box_inversion)")
    g.add_argument("--inv-lr", type=float, default=0.05)
    g.add_argument("--inv-det", type=float, default=1.0)
    g.add_argument("--inv-bn", type=float, default=0.05)
    g.add_argument("--inv-first-bn", type=float, default=10.0)
    g.add_argument("--inv-tv", type=float, default=10.0)
    g.add_argument("--inv-l2", type=float, default=1e-5)
    g.add_argument("--boxes-per-image", type=int, default=2)
    g.add_argument("--box-size", nargs=2, type=float, default=None, metavar=("MIN", "MAX"),
                   help="sampled box sides as fractions of the canvas (default: the canvases' object range)")
    g.add_argument("--add-teacher-detections", type=float, default=0.5,
                   help="score above which the teacher's extra detections join the targets (<0: off)")
    g.add_argument("--inv-jitter", type=float, default=0.05)
    g.add_argument("--inv-scale", type=float, default=0.0)
    g.add_argument("--init-std", type=float, default=0.2)
    g.add_argument("--inv-adi", type=float, default=1.0,
                   help="Adaptive-DeepInversion competition weight (teacher/student class disagreement)")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-score-thresh", type=float, default=0.05, help="detector score cut-off when scoring mAP")
    g.add_argument("--eval-images", type=int, default=200, help="test canvases scored along the way")
    g.add_argument("--eval-every-seconds", type=float, default=30.0)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from dfkd.bench import plot_curves, redact_paths
    from dfkd.detection.bench import b4_markdown, canvas_teacher, run_record, side_by_side
    from dfkd.eval.detection import evaluate_detector
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware

    started = time.perf_counter()
    device = torch.device(args.device)
    d = SOURCE_DEFAULTS[args.source]
    size = int(args.canvas_size or d["canvas_size"])
    obj_px = tuple(args.object_pixels or d["object_pixels"])
    objects = tuple(args.objects or d["objects"])
    canvas_cfg = {"source": args.source, "canvas_size": size, "object_pixels": list(obj_px),
                  "objects": list(objects), "train": int(args.train_canvases or d["train_canvases"]),
                  "test": int(args.test_canvases or d["test_canvases"]), "background": args.background,
                  "seed": args.seeds[0] if args.data_seed is None else args.data_seed}
    work = args.work or Path(tempfile.gettempdir()) / "dfkd_b4_work"
    work.mkdir(parents=True, exist_ok=True)
    name = args.name or f"b4_detection_{args.source}"

    # 1.-2. canvases and the teacher, cached by their settings (dfkd.detection.bench.canvas_teacher)
    channels = int(args.channels or d["channels"])
    flip = d["flip"] if args.flip is None else bool(args.flip)
    mean, std = (d["mean"], d["std"]) if channels == len(d["mean"]) else ((0.45,) * channels, (0.25,) * channels)
    prep = canvas_teacher(work, canvas_cfg, dict(
        width=args.teacher_width, fpn_channels=args.teacher_fpn, head_convs=args.teacher_head_convs,
        steps=args.teacher_steps, lr=args.teacher_lr, batch=args.teacher_batch, channels=channels,
        mean=list(mean), std=list(std), flip=flip, warmup=args.teacher_warmup), root=args.root, device=device)
    paths, train_ds, test_ds, model = prep["paths"], prep["train"], prep["test"], prep["model"]
    tpath, cached, teacher_seconds, canvas_seconds = (prep["checkpoint"], prep["cached"], prep["train_seconds"],
                                                      prep["canvas_seconds"])
    print(f"canvases: {len(train_ds)} train ({train_ds.num_boxes} boxes), {len(test_ds)} test "
          f"({test_ds.num_boxes} boxes), {size} px, {canvas_seconds:.1f} s", flush=True)

    def score(detector, max_images=None) -> dict:
        old = detector.score_thresh
        detector.score_thresh = min(old, args.eval_score_thresh)
        try:
            return evaluate_detector(detector, test_ds, batch_size=64, device=device, max_images=max_images)
        finally:
            detector.score_thresh = old

    t0 = time.perf_counter()
    teacher_map = score(model)
    teacher_eval_seconds = time.perf_counter() - t0
    teacher_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: mAP {teacher_map['map']:.4f}, mAP@.5 {teacher_map['map50']:.4f} "
          f"({teacher_params} params, {'cached' if cached else f'trained in {teacher_seconds:.0f} s'}, "
          f"eval {teacher_eval_seconds:.1f} s)", flush=True)
    weak_teacher = teacher_map["map50"] < args.min_teacher_map50
    if weak_teacher:  # a failed teacher makes every row meaningless: say so loudly, in the results too
        print(f"warning: the teacher's mAP@.5 {teacher_map['map50']:.4f} is below {args.min_teacher_map50:g}; its "
              "training did not converge (try --teacher-warmup 300, more --teacher-steps or a lower --teacher-lr)",
              file=sys.stderr, flush=True)

    # 3. students: each method is one `dfkd-distill task=detection` run (dfkd.detection.run.run_detection)
    box_size = tuple(args.box_size) if args.box_size else (obj_px[0] / size, obj_px[1] / size)
    inv_kwargs = dict(batch_size=args.inv_batch, iterations=args.inv_iterations, lr=args.inv_lr, det=args.inv_det,
                      bn=args.inv_bn, first_bn_multiplier=args.inv_first_bn, tv=args.inv_tv, l2=args.inv_l2,
                      boxes_per_image=args.boxes_per_image, size=box_size,
                      add_teacher_detections=(args.add_teacher_detections if args.add_teacher_detections >= 0
                                              else None),
                      flip=flip, jitter=args.inv_jitter, scale=args.inv_scale, init_std=args.init_std,
                      adi=args.inv_adi)
    student_kwargs = dict(width=args.student_width, fpn_channels=args.student_fpn,
                          head_convs=args.student_head_convs)
    distill_kwargs = dict(batch_size=args.kd_batch, lr=args.kd_lr, score_thresh=args.score_thresh,
                          head_matching=args.head_matching, head_weight=args.head_weight,
                          class_kd=args.class_kd, class_kd_temperature=args.class_kd_temperature,
                          memory_size=args.memory_size)

    def _v(v) -> str:
        if v is None:
            return "null"
        if isinstance(v, (tuple, list)):
            return "[" + ",".join(_v(x) for x in v) + "]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    def overrides(method: str, seed: int) -> list[str]:
        ov = ["teacher=detector", f"teacher.checkpoint={tpath}", "data=coco", f"data.path={paths['test']}",
              f"seed={seed}", "progress=false", "resume=false", f"threads={args.threads}", f"device={args.device}",
              f"detection.steps={args.steps or 10 ** 9}",
              f"detection.budget_minutes={'null' if args.steps else args.budget_minutes}",
              f"detection.kd_steps={args.inv_kd_steps_per_round if method == 'box_inversion' else args.kd_steps_per_round}",
              f"detection.student_backbone={args.student_backbone}", f"detection.student_width={args.student_width}",
              f"detection.student_fpn={args.student_fpn}", f"detection.student_head_convs={args.student_head_convs}",
              f"detection.flip={_v(flip)}", "detection.jitter=0.1", "detection.scale=0.1",
              f"detection.eval_every_seconds={args.eval_every_seconds}", f"detection.eval_images={args.eval_images}",
              f"detection.eval_score_thresh={args.eval_score_thresh}", "detection.score_teacher=false",
              *[f"detection.{k}={_v(v)}" for k, v in distill_kwargs.items()]]
        if method == "box_inversion":
            ov += ["synthesizer=box_inversion", *[f"synthesizer.{k}={_v(v)}" for k, v in inv_kwargs.items()]]
        elif method == "box_noise":
            ov += ["synthesizer=box_noise", f"synthesizer.batch_size={args.source_batch}",
                   f"synthesizer.score_thresh={args.score_thresh}"]
        else:
            ov += ["synthesizer=box_real", f"synthesizer.batch_size={args.source_batch}",
                   f"detection.train_path={paths['train']}"]
        return ov

    from dfkd.bench import compose
    from dfkd.detection.run import run_detection

    budget = None if args.steps else 60.0 * args.budget_minutes
    runs = []
    student_params = None
    for method in args.methods:
        for seed in args.seeds:
            ov = overrides(method, seed)
            run_dir = work / "runs" / f"{name}_{method}_seed{seed}"
            out = run_detection(compose("distill", ov), run_dir)
            student_params = out["student_params"]
            run = run_record(method, KIND[method], seed, "dfkd-distill " + " ".join(shlex.quote(o) for o in ov),
                             out, run_dir)
            runs.append(run)
            print(f"{method:>14} seed {seed}: mAP {run['map']:.4f} mAP@.5 {run['map50']:.4f} "
                  f"({run['steps']} steps, {run['images_synthesized']} images, {run['distill_seconds']:.0f} s)",
                  flush=True)

    # 4. table
    table = side_by_side(runs, KIND, TARGET)
    rows, met, per_seed = table["rows"], table["target_met"], table["per_seed"]
    met_every_seed = table["target_met_every_seed"]

    wall = time.perf_counter() - started
    cmd = " ".join(shlex.quote(a) for a in ["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    scrub = {work: "$WORK", **({args.out: "$OUT"} if args.out.is_absolute() else {})}  # this machine's folders
    result = redact_paths({
        "benchmark": name, "command": cmd, "hardware": hardware(), "wall_seconds": round(wall, 1),
        "seeds": list(args.seeds), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items() if k not in ("work", "out")},
        "canvases": {**canvas_cfg, "train_boxes": train_ds.num_boxes, "test_boxes": test_ds.num_boxes,
                     "build_seconds": round(canvas_seconds, 1)},
        "teacher": {"map": teacher_map["map"], "map50": teacher_map["map50"], "map75": teacher_map["map75"],
                    "per_class_ap": teacher_map["per_class"], "params": teacher_params,
                    "train_seconds": round(teacher_seconds, 1), "cached": cached, "settings": prep["settings"]},
        "student": {"backbone": args.student_backbone, **student_kwargs, "params": student_params},
        "inversion": {k: (list(v) if isinstance(v, tuple) else v) for k, v in inv_kwargs.items()},
        "distill": {**distill_kwargs, "budget_seconds": budget, "kd_steps_per_round": args.kd_steps_per_round,
                    "kd_steps_per_round_box_inversion": args.inv_kd_steps_per_round,
                    "augment": {"flip": flip, "jitter": 0.1, "scale": 0.1}},
        "target": f"box_inversion mAP@.5 >= {TARGET:.0%} of the real-data KD ceiling's",
        "weak_teacher": weak_teacher,
        "target_met": met, "ratio_to_ceiling_map50_per_seed": {str(k): v for k, v in per_seed.items()},
        "target_met_every_seed": met_every_seed, "rows": rows, "runs": runs,
    }, scrub)
    args.out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = args.out / f"{name}.json", args.out / f"{name}.md"
    atomic_write_json(jpath, result)

    png = args.out / f"{name}_time_to_map.png"
    curves = {f"{r['method']} (seed {r['seed']})": [[p[0], p[3]] for p in r["time_to_map"]] for r in runs}
    drawn = plot_curves(curves, png, f"B4 — {args.source} detection", teacher_map["map50"],
                        ylabel="student mAP@.5 (real test canvases)")
    lines = b4_markdown(result, TARGET, png.name if drawn else None)
    atomic_write_bytes(mpath, redact_paths("\n".join(lines) + "\n", scrub).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
