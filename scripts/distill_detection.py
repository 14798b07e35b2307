#!/usr/bin/env python
"""Distil a smaller detector from a trained one, data-free (box-conditioned inversion).

The teacher is a detector that dfkd saved (``save_detector``: a .safetensors file and its .json,
e.g. the teacher of ``scripts/bench_b4_detection.py`` or a detector from
``scripts/finetune_detection.py``). No training image is read: each round ``box_inversion``
optimises a batch of images so that the frozen teacher finds sampled boxes of sampled classes in
them (its detection loss + its BatchNorm statistics + image priors, with box-aware jitter and
flips), and the student then trains on a memory of those images against the teacher's
pseudo-boxes and its class distribution on its objects (``dfkd.detection.train.distill_detector``).
With ``--adi`` (default 1) the inversion also steers the images towards objects where the student's
class distribution disagrees with the teacher's (Adaptive DeepInversion's competition term); a
student whose head differs in geometry from the teacher's (e.g. a ViT backbone) runs without it.
``--method box_noise`` is the noise floor (Gaussian images) for comparison.

    python scripts/distill_detection.py --teacher det.safetensors --val canvases/test
    python scripts/distill_detection.py --teacher det.safetensors --budget-minutes 10 --student-width 8
    python scripts/distill_detection.py --teacher det.safetensors --student-backbone vit_tiny --steps 5000

The student keeps the teacher's detector type, input size, channels and normalisation; by default
its small CNN has half the teacher's width and pyramid channels and one head convolution.
``--val DATA`` (COCO json, a folder holding one, or a YOLO folder) scores the student (and the
teacher, for reference) with COCO mAP@[.5:.95], mAP@.5 and per-class AP at the end, and every
``--eval-every`` steps; images are letterboxed to the teacher's input size, boxes mapped back.

Resuming: the whole run (student, optimizer, image memory, random generators, counters) is written
to OUT/state.pt every ``--checkpoint-every`` rounds and on Ctrl-C; running the same command again
continues from there, and a larger ``--steps`` extends a finished run. Other settings than the
saved run's give a one-line error (``--restart`` starts over). Writes to --out:
student.safetensors + student.json (``load_detector`` reads them), metrics.json (scores, settings,
hardware, wall time, the command) and history.jsonl (losses per round). Bad input is one line on
stderr and exit 2; Ctrl-C exits 130 after saving.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune_detection import UsageError, _device, _fmt_time, _Parser, letterboxed, script_main  # noqa: E402

PROG = "distill_detection"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
STATE_VERSION = 1
# settings that may change between a run and its resumption
RESUMABLE = {"steps", "device", "threads", "no_progress", "eval_every", "checkpoint_every", "val", "val_split",
             "max_val_images", "restart", "out"}


def build_parser() -> _Parser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--teacher", required=True, type=Path, metavar="PATH", help="teacher detector (.safetensors with its .json)")
    a("--out", type=Path, default=None, help="output folder (default runs/distill_detection/<teacher name>)")
    a("--method", choices=["box_inversion", "box_noise"], default="box_inversion")
    a("--steps", type=int, default=3000, help="student optimizer steps (default 3000)")
    a("--budget-minutes", type=float, default=None, help="also stop after this much wall time (resumes count it)")
    g = ap.add_argument_group("student")
    g.add_argument("--student-backbone", default="small_cnn",
                   help="small_cnn, resnet8_cifar..resnet110_cifar, vit_tiny or a timm ViT name")
    g.add_argument("--student-width", type=int, default=None, help="small CNN width (default: half the teacher's)")
    g.add_argument("--student-fpn", type=int, default=None, help="pyramid/head channels (default: half the teacher's)")
    g.add_argument("--student-head-convs", type=int, default=1)
    g = ap.add_argument_group("distillation")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (cosine over the run)")
    g.add_argument("--score-thresh", type=float, default=0.45, help="teacher score for a pseudo-box")
    g.add_argument("--class-kd", type=float, default=2.0,
                   help="weight of the teacher's class distribution on its objects (0: pseudo-boxes only)")
    g.add_argument("--class-kd-temperature", type=float, default=2.0)
    g.add_argument("--head-matching", action="store_true", help="also match all head outputs (same geometry)")
    g.add_argument("--memory-size", type=int, default=4096, help="synthetic images kept for the student")
    g.add_argument("--kd-steps-per-round", type=int, default=None,
                   help="student steps per synthesized batch (default 40 for box_inversion, 4 for box_noise)")
    g = ap.add_argument_group("box inversion")
    g.add_argument("--inv-batch", type=int, default=32, help="images per round")
    g.add_argument("--inv-iterations", type=int, default=50)
    g.add_argument("--inv-lr", type=float, default=0.05)
    g.add_argument("--inv-bn", type=float, default=0.05, help="BatchNorm-statistics prior weight")
    g.add_argument("--inv-first-bn", type=float, default=10.0, help="its multiplier on the first BatchNorm layer")
    g.add_argument("--inv-tv", type=float, default=10.0)
    g.add_argument("--boxes-per-image", type=int, default=2)
    g.add_argument("--box-size", nargs=2, type=float, default=(0.2, 0.6), metavar=("MIN", "MAX"),
                   help="sampled box sides as fractions of the image (default 0.2 0.6)")
    g.add_argument("--add-teacher-detections", type=float, default=0.5,
                   help="score above which the teacher's extra detections join the targets (<0: off)")
    g.add_argument("--adi", type=float, default=1.0,
                   help="competition weight: also steer images to where the student disagrees with the teacher "
                        "(Adaptive DeepInversion; needs a student head of the teacher's geometry)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="horizontal flips in the augmentations (turn off for mirror-sensitive classes, e.g. digits)")
    g = ap.add_argument_group("evaluation and run")
    g.add_argument("--val", default=None, metavar="DATA", help="evaluation set: COCO json, folder holding one, or YOLO")
    g.add_argument("--val-split", default=None, help="YOLO split / COCO json name part of --val")
    g.add_argument("--max-val-images", type=int, default=None, metavar="N")
    g.add_argument("--eval-every", type=int, default=0, help="student steps between evaluations (0: at the end only)")
    g.add_argument("--checkpoint-every", type=int, default=5, help="rounds between run-state saves")
    g.add_argument("--restart", action="store_true", help="ignore a saved run in --out and start over")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    return ap


def _check(args) -> None:
    for flag, v, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                        ("--memory-size", args.memory_size, 1), ("--kd-steps-per-round", args.kd_steps_per_round, 1),
                        ("--inv-batch", args.inv_batch, 1), ("--inv-iterations", args.inv_iterations, 0),
                        ("--boxes-per-image", args.boxes_per_image, 1), ("--student-width", args.student_width, 2),
                        ("--student-fpn", args.student_fpn, 4), ("--student-head-convs", args.student_head_convs, 0),
                        ("--eval-every", args.eval_every, 0), ("--checkpoint-every", args.checkpoint_every, 1),
                        ("--threads", args.threads, 1), ("--max-val-images", args.max_val_images, 1)):
        if v is not None and v < lo:
            raise UsageError(f"{flag} must be at least {lo}, got {v}")
    for flag, v in (("--lr", args.lr), ("--inv-lr", args.inv_lr), ("--budget-minutes", args.budget_minutes)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UsageError(f"{flag} must be a positive number, got {v}")
    for flag, v in (("--class-kd", args.class_kd), ("--inv-bn", args.inv_bn), ("--inv-tv", args.inv_tv),
                    ("--adi", args.adi)):
        if not (v >= 0 and math.isfinite(v)):
            raise UsageError(f"{flag} must be a number ≥ 0, got {v}")
    if not 0 <= args.score_thresh < 1:
        raise UsageError(f"--score-thresh must be in [0, 1), got {args.score_thresh}")
    lo, hi = args.box_size
    if not 0 < lo <= hi <= 1:
        raise UsageError(f"--box-size needs 0 < MIN <= MAX <= 1, got {lo} {hi}")
    if not args.class_kd_temperature > 0:
        raise UsageError(f"--class-kd-temperature must be positive, got {args.class_kd_temperature}")


def _settings(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in sorted(vars(args).items())}


def run(args, argv: list[str]) -> int:
    started = time.perf_counter()
    _check(args)
    import torch

    from dfkd.detection.boxes import BoxAugment
    from dfkd.detection.models import DetectionTeacher, build_detector, detector_metadata, load_detector, \
        save_detector
    from dfkd.detection.train import distill_detector
    from dfkd.models.checkpoint import atomic_torch_save, atomic_write_json
    from dfkd.pipeline import hardware
    from generators import build_synthesizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    teacher_model = load_detector(args.teacher)
    tb = detector_metadata(teacher_model)
    out = args.out or Path("runs/distill_detection") / args.teacher.stem
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    settings = _settings(args)

    # resume?
    state = None
    if state_path.is_file() and not args.restart:
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: say so, do not guess
            raise UsageError(f"cannot read the saved run {state_path} ({type(e).__name__}); use --restart") from None
        if saved.get("version") != STATE_VERSION:
            raise UsageError(f"{state_path} was written by another version; use --restart")
        diff = sorted(k for k in set(settings) | set(saved["settings"])
                      if k not in RESUMABLE and settings.get(k) != saved["settings"].get(k))
        if diff:
            k = diff[0]
            raise UsageError(f"{out} holds a run with other settings ({k}: {saved['settings'].get(k)!r} there, "
                             f"{settings.get(k)!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                             "use the same settings to resume, --restart to start over, or another --out")
        state = saved["run"]
        print(f"{PROG}: resuming {out} at step {state['step']} ({_fmt_time(state['wall'])} done)", file=sys.stderr)

    teacher_model.to(device).eval()
    teacher = DetectionTeacher(teacher_model)
    torch.manual_seed(args.seed)
    small = args.student_backbone == "small_cnn"
    width = args.student_width or max(2, int(tb.get("width", 16)) // 2)
    fpn = args.student_fpn or max(4, int(tb.get("fpn_channels", 32)) // 2)
    student = build_detector(tb["arch"], args.student_backbone, num_classes=tb["num_classes"],
                             image_size=tb["image_size"], in_chans=tb["in_chans"], mean=tb["mean"], std=tb["std"],
                             width=width if small else 16, fpn_channels=fpn, head_convs=args.student_head_convs,
                             score_thresh=tb.get("score_thresh", 0.2), nms_thresh=tb.get("nms_thresh", 0.5),
                             detections_per_img=tb.get("detections_per_img", 20))
    adi = args.adi
    if adi > 0 and args.method == "box_inversion":
        from dfkd.detection.models import head_outputs

        probe = torch.zeros(1, tb["in_chans"], tb["image_size"], tb["image_size"], device=device)
        student.to(device)
        with torch.no_grad():
            shapes = [tuple(head_outputs(m, probe)["cls_logits"].shape) for m in (teacher.model, student)]
        if shapes[0] != shapes[1]:
            print(f"note: --adi needs a student head of the teacher's geometry ({shapes[1]} vs {shapes[0]} class "
                  "logits); running without it", file=sys.stderr, flush=True)
            adi = 0.0
    if args.method == "box_inversion":
        source = build_synthesizer("box_inversion", teacher=teacher, batch_size=args.inv_batch, seed=args.seed,
                                   device=device, iterations=args.inv_iterations, lr=args.inv_lr, bn=args.inv_bn,
                                   first_bn_multiplier=args.inv_first_bn, tv=args.inv_tv,
                                   boxes_per_image=args.boxes_per_image, size=tuple(args.box_size),
                                   add_teacher_detections=(args.add_teacher_detections
                                                           if args.add_teacher_detections >= 0 else None),
                                   flip=args.flip, adi=adi)
    else:
        source = build_synthesizer("box_noise", teacher=teacher, batch_size=args.inv_batch, seed=args.seed,
                                   device=device, score_thresh=args.score_thresh)
    kd_steps = args.kd_steps_per_round or (40 if args.method == "box_inversion" else 4)

    val_set = None
    if args.val:
        from dfkd.data.detection import load_detection

        val_set = load_detection(args.val, split=args.val_split)
        if tb["in_chans"] == 1:  # a grayscale detector: score it on the luminance of RGB images
            luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            val_set.transform = lambda image, target: (
                (image * luma).sum(0, keepdim=True) if image.shape[0] == 3 else image[:1], target)

    def evaluate(model) -> dict:
        from dfkd.eval.detection import evaluate_detector

        old = model.score_thresh
        model.score_thresh = min(old, 0.05)  # mAP needs the low-score tail
        try:
            return evaluate_detector(letterboxed(model, tb["image_size"]), val_set, batch_size=64, device=device,
                                     max_images=args.max_val_images, progress=False)
        finally:
            model.score_thresh = old

    history_path = out / "history.jsonl"
    if state is None:
        history_path.write_text("")

    def log(record: dict) -> None:
        with history_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(run_state: dict) -> None:
        atomic_torch_save({"version": STATE_VERSION, "settings": settings, "run": run_state}, state_path)

    eval_fn = (lambda s: {k: v for k, v in evaluate(s).items() if k in ("map", "map50")}) if val_set else None
    interrupted = False
    try:
        res = distill_detector(teacher, student, source, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               score_thresh=args.score_thresh, head_matching=args.head_matching,
                               class_kd=args.class_kd, class_kd_temperature=args.class_kd_temperature,
                               memory_size=args.memory_size, kd_steps_per_round=kd_steps,
                               augment=BoxAugment(flip=args.flip, jitter=0.1, scale=0.1),
                               budget_seconds=60 * args.budget_minutes if args.budget_minutes else None,
                               device=device, seed=args.seed, progress=not args.no_progress,
                               eval_fn=eval_fn if args.eval_every else None, eval_every=args.eval_every,
                               log_fn=log, state=state, checkpoint_fn=checkpoint,
                               checkpoint_every=args.checkpoint_every)
    except KeyboardInterrupt:
        interrupted = True
    student.eval().cpu()
    save_detector(student, out / "student.safetensors")
    params = {"teacher": sum(p.numel() for p in teacher_model.parameters()),
              "student": sum(p.numel() for p in student.parameters())}
    cmd = " ".join(shlex.quote(a) for a in [f"scripts/{Path(__file__).name}", *argv])
    info = {"command": cmd, "settings": settings, "teacher": tb, "student": detector_metadata(student),
            "parameters": params, "hardware": hardware(), "device": str(device)}
    if interrupted:
        atomic_write_json(out / "metrics.json", {**info, "interrupted": True,
                                                 "wall_seconds": round(time.perf_counter() - started, 3)})
        print(f"{PROG}: interrupted; the run is saved in {out} — run the same command again to continue",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    metrics = {**info, "interrupted": False, "steps": res["steps"], "rounds": res["rounds"],
               "distill_seconds": res["wall"], "images_synthesized": res["images_synthesized"],
               "synth_seconds": res["synth_seconds"], "class_kd": res["class_kd"], "adi": adi,
               "time_to_map": [[e["wall"], e["step"], e.get("map"), e.get("map50")] for e in res["evals"]
                               if "map50" in e]}
    rows = [("steps", str(res["steps"])), ("images synthesized", str(res["images_synthesized"])),
            ("student params", f"{params['student']} (teacher {params['teacher']})")]
    if val_set is not None:
        student.to(device)
        s, t = evaluate(student), evaluate(teacher_model)
        metrics.update({"map": s["map"], "map50": s["map50"], "map75": s["map75"], "per_class": s["per_class"],
                        "teacher_map": t["map"], "teacher_map50": t["map50"], "val_images": s["num_images"]})
        rows += [("student mAP", f"{s['map']:.4f}  (mAP@.5 {s['map50']:.4f})"),
                 ("teacher mAP", f"{t['map']:.4f}  (mAP@.5 {t['map50']:.4f})")]
    metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(out / "metrics.json", metrics)
    rows += [("wall time", _fmt_time(metrics["wall_seconds"])), ("output", str(out))]
    for k, v in rows:
        print(f"{k:<20}{v}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return script_main(PROG, build_parser(), run, argv, "distillation")

if __name__ == "__main__":
    sys.exit(main())
