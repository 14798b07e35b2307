"""``dfkd-finetune-detection``: fine-tune a detector on a backbone that dfkd distilled for classification.

Takes the student of a dfkd run (or any classification checkpoint of a model dfkd can build),
puts its feature extractor under a torchvision FCOS or RetinaNet (dfkd.detection.models), trains
on a COCO- or YOLO-format set and scores it like every dfkd detector: COCO mAP@[.5:.95], mAP@.5,
mAP@.75 and per-class AP (pycocotools).

    dfkd-finetune-detection --backbone runs/digits/RUN --train canvases/train --val canvases/test
    dfkd-finetune-detection --backbone student.safetensors --train coco128 --image-size 320
    dfkd-finetune-detection --backbone r20.th --backbone-name resnet20_cifar --train DATA
    dfkd-finetune-detection --backbone none --backbone-name small_cnn --train DATA   # from scratch

--backbone takes a dfkd run folder (student.safetensors + student.json), a .safetensors file
with its .json sidecar (as dfkd's save_model writes them), a bare checkpoint together with
--backbone-name NAME [--backbone-kwargs JSON], or `none` with --backbone-name (a from-scratch
baseline with the same architecture).

Backbones. Classification models map to detection backbones as follows: `small_cnn` to
`small_cnn_cls` (the classifier's own layers at strides 1/2, plus one new stride-4 stage),
`resnet{8,14,20,32,44,56,110}_cifar` to the same CIFAR ResNet (layer1/2/3), and timm ViTs
(`vit_*`, `deit_*`, with their keyword arguments, e.g. patch_size/embed_dim/depth/num_heads) to
the ViT backbone with a ViTDet-style simple pyramid. The classifier head is dropped; every other
weight must fit (one-line error otherwise). With --freeze-backbone exactly the weights taken from
the checkpoint are frozen (their BatchNorm statistics too); the pyramid, neck and head train.

Channels. Detection images are read as RGB. A single-channel (grayscale) student, such as the
digits students, becomes a 3-channel detector: its first layer's weights are multiplied by the
BT.601 luma weights (0.299, 0.587, 0.114) and its one-channel mean/std repeated, so at the start
the detector computes exactly what the student computes on the grayscale image, and the saved
detector takes ordinary RGB images. Fine-tuning may then learn to use colour.

Image size. Every image is letterboxed (resized so its longer side is --image-size, padded
bottom/right to a square) for training and, by the detector's own torchvision transform, for
evaluation; predicted boxes are mapped back to the original image, so the score is against the original annotations. Default size: the longest image
side in the training set, rounded up to a multiple of the backbone's coarsest stride (and the ViT
patch size) -- for a canvas set made at the student's input size, that input size -- but at most
128x the finest pyramid stride (128 px for the stride-1 CIFAR-style backbones, 512 px for a ViT):
a stride-1 level on 640-px images needs tens of GB. A ViT trained at another size (e.g. 8x8
digits) gets its absolute position embedding resampled to the new patch grid (timm's
resample_abs_pos_embed, bicubic); its patch size stays what it was, so small objects span few
patches.

Writes to --out: detector.safetensors + detector.json (dfkd.detection.models.load_detector reads
them), metrics.json (evaluation, hardware, wall time, the exact command), history.jsonl (training
losses). Ctrl-C saves the detector trained so far (metrics.json says "interrupted") and exits 130;
there is no resume: run the command again to start over. Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from dfkd.detection.transfer import MAX_FINEST_CELLS, LetterboxDataset, freeze, load_student_weights, \
    map_backbone, resolve_source
from dfkd.errors import DfkdError

PROG = "dfkd-finetune-detection"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message: keep it to one line
        raise DfkdError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--backbone", required=True, metavar="PATH|none",
      help="dfkd run folder, .safetensors (+ .json sidecar), bare checkpoint (+ --backbone-name), or none")
    a("--backbone-name", default=None, metavar="NAME",
      help="classification model name (small_cnn, resnet20_cifar, a timm ViT, ...); overrides the sidecar's")
    a("--backbone-kwargs", default=None, metavar="JSON",
      help='its build arguments as a JSON object, e.g. \'{"width": 16}\' (merged over the sidecar\'s)')
    a("--train", required=True, metavar="DATA", help="training set: COCO json, folder holding one, or YOLO folder")
    a("--val", default=None, metavar="DATA", help="evaluation set (default: the training set; not a held-out score)")
    a("--split", default=None, help="YOLO split / COCO json name part of --train (and --val unless --val-split)")
    a("--val-split", default=None, help="split of --val (default: --split)")
    a("--arch", choices=["fcos", "retinanet"], default="fcos")
    a("--image-size", type=int, default=None,
      help="square letterbox side in px (default: largest train image side, rounded up to the coarsest stride, "
           "at most 128x the finest stride)")
    a("--epochs", type=int, default=12, help="passes over the training set (default 12)")
    a("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3, help="AdamW learning rate (warm-up, then cosine)")
    a("--weight-decay", type=float, default=1e-4)
    a("--fpn-channels", type=int, default=32, help="channels of the pyramid and heads")
    a("--freeze-backbone", action="store_true",
      help="train only the pyramid/neck and head (the checkpoint's weights and BatchNorm statistics stay fixed)")
    a("--mean", type=float, nargs="+", default=None,
      help="input normalisation (default: the sidecar's, else ImageNet's)")
    a("--std", type=float, nargs="+", default=None)
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--threads", type=int, default=None, help="CPU threads for torch")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=None, help="output folder (default runs/finetune_detection/<date_time>)")
    a("--max-images", type=int, default=None, metavar="N", help="use only the first N train (and val) images")
    a("--log-every", type=int, default=10, help="steps per history.jsonl line")
    a("--no-progress", action="store_true", help="no progress bars")
    return ap



# -- the run -----------------------------------------------------------------------------------
class History:
    """Collects train_detector's per-step losses; writes their mean every ``every`` steps."""

    def __init__(self, path: Path, every: int, batch_size: int, total: int):
        self.path, self.every, self.batch_size, self.total = path, max(1, int(every)), batch_size, total
        self.step, self.sums, self.n = 0, {}, 0
        self.start = time.perf_counter()
        self.last: dict = {}
        path.write_text("")

    def __call__(self, record: dict) -> None:
        self.step = int(record["step"])
        self.lr = float(record.get("lr", 0.0))
        for k, v in record.items():
            if k not in ("step", "lr"):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1
        if self.step % self.every == 0 or self.step == self.total:
            self.flush()

    def flush(self) -> None:
        if not self.n:
            return
        wall = time.perf_counter() - self.start
        rec = {"step": self.step, "lr": self.lr, **{f"loss/{k}": v / self.n for k, v in self.sums.items()},
               "loss": sum(self.sums.values()) / self.n, "wall": round(wall, 3),
               "images_per_second": round(self.step * self.batch_size / max(wall, 1e-9), 2)}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self.last, self.sums, self.n = rec, {}, 0


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise DfkdError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DfkdError(f"--device {name}: CUDA is not available on this machine")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise DfkdError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _check_numbers(args) -> None:
    for flag, v, lo in (("--epochs", args.epochs, 1), ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                        ("--image-size", args.image_size, 8), ("--max-images", args.max_images, 1),
                        ("--threads", args.threads, 1), ("--fpn-channels", args.fpn_channels, 4),
                        ("--log-every", args.log_every, 1)):
        if v is not None and v < lo:
            raise DfkdError(f"{flag} must be at least {lo}, got {v}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise DfkdError(f"--lr must be a positive number, got {args.lr}")
    if (args.mean is None) != (args.std is None):
        raise DfkdError("give --mean and --std together")
    if args.std is not None and any(s <= 0 for s in args.std):
        raise DfkdError("--std values must be positive")


def _norm(values, what: str) -> Optional[list[float]]:
    if values is None:
        return None
    v = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values])]
    if len(v) == 1:
        return v * 3
    if len(v) == 3:
        return v
    raise DfkdError(f"{what} needs 1 or 3 values, got {len(v)}")


def _fmt_time(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"



def run(args, argv: list[str]) -> int:
    started = time.perf_counter()
    _check_numbers(args)
    source = resolve_source(args.backbone, args.backbone_name, args.backbone_kwargs)
    spec = map_backbone(source.name, source.kwargs)
    if spec.in_chans not in (1, 3):
        raise DfkdError(f"{source.name} takes {spec.in_chans} input channels; detection images are RGB "
                         "(1-channel and 3-channel backbones are supported)")

    import torch

    from dfkd.data.detection import load_detection
    from dfkd.detection.models import IMAGENET_MEAN, IMAGENET_STD, build_detector, save_detector
    from dfkd.models.checkpoint import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    train_set = load_detection(args.train, split=args.split)
    val_given = args.val is not None
    val_set = load_detection(args.val, split=args.val_split or args.split) if val_given else train_set
    if val_set.classes != train_set.classes:
        raise DfkdError(f"--val has other classes than --train ({val_set.num_classes} vs {train_set.num_classes}: "
                         f"{val_set.classes[:3]}... vs {train_set.classes[:3]}...)")
    n_train = len(train_set) if args.max_images is None else min(len(train_set), args.max_images)
    n_val = len(val_set) if args.max_images is None else min(len(val_set), args.max_images)

    # image size: the data's, rounded up to what the backbone needs
    if args.image_size is None:
        side = max(max(int(train_set.image_info(i)["width"]), int(train_set.image_info(i)["height"]))
                   for i in range(n_train))
        image_size = -(-side // spec.divisor) * spec.divisor
        how = f"largest train image side {side} px" + (f", rounded up to a multiple of {spec.divisor}"
                                                      if image_size != side else "")
        cap = MAX_FINEST_CELLS * spec.finest_stride
        if image_size > cap:
            image_size = max(spec.divisor, cap // spec.divisor * spec.divisor)
            how += (f", capped at {image_size} so the stride-{spec.finest_stride} level has at most "
                    f"{MAX_FINEST_CELLS}x{MAX_FINEST_CELLS} positions; --image-size overrides")
    else:
        image_size = int(args.image_size)
        if image_size % spec.divisor:
            raise DfkdError(f"--image-size {image_size} must be a multiple of {spec.divisor} (the backbone's "
                             f"coarsest stride{' and ViT patch size' if spec.vit_grid else ''})")
        how = "--image-size"

    # normalisation: --mean/--std, else the student's, else ImageNet's
    mean = _norm(args.mean, "--mean") or _norm(source.mean, "the sidecar's mean") or list(IMAGENET_MEAN)
    std = _norm(args.std, "--std") or _norm(source.std, "the sidecar's std") or list(IMAGENET_STD)

    if args.freeze_backbone and source.weights is None:
        raise DfkdError("--freeze-backbone needs backbone weights (with --backbone none nothing would train it)")

    torch.manual_seed(args.seed)
    try:
        detector = build_detector(args.arch, spec.detector_backbone, num_classes=train_set.num_classes,
                                  image_size=image_size, in_chans=3, width=spec.width,
                                  fpn_channels=args.fpn_channels, mean=mean, std=std,
                                  backbone_kwargs=spec.backbone_kwargs, score_thresh=0.05,
                                  detections_per_img=100, topk_candidates=1000)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise DfkdError(f"cannot build the detector on {spec.detector_backbone!r}: {e}") from None
    body = detector.backbone.body
    notes: list[str] = []
    if source.weights is not None:
        notes = load_student_weights(body, source.weights, spec)
    if spec.in_chans == 1 and source.weights is None:
        notes.append("1-channel model built with 3 input channels for RGB images")
    if args.freeze_backbone:
        freeze(body.classification_module())
    n_params = sum(p.numel() for p in detector.parameters())
    n_train_params = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    # one dry forward pass, so shape problems are a clear error before training
    detector.eval()
    try:
        with torch.no_grad():
            detector([torch.zeros(3, image_size, image_size)])
    except RuntimeError as e:
        raise DfkdError(f"the detector on {spec.detector_backbone!r} fails at image size {image_size}: "
                         f"{str(e).splitlines()[0]}") from None

    out = args.out or Path("runs") / "finetune_detection" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DfkdError(f"cannot create --out {out}: {e.strerror or e}") from None

    train_data = LetterboxDataset(train_set, image_size, range(n_train))
    # train_detector drops the last partial batch when there is more than one
    batches = len(train_data) // args.batch_size if len(train_data) > args.batch_size else 1
    steps = args.steps or args.epochs * batches
    print(f"backbone   {source.name} ({source.origin}) -> detection backbone {spec.detector_backbone}, "
          f"{'weights loaded' if source.weights else 'random init'}"
          f"{', frozen' if args.freeze_backbone else ''}")
    for n in notes:
        print(f"           {n}")
    print(f"detector   {args.arch}, {train_set.num_classes} classes, {image_size} px ({how}), "
          f"{n_params / 1e6:.2f} M parameters ({n_train_params / 1e6:.2f} M trained)")
    print(f"data       train {n_train} images ({train_set.name}); val {n_val} images"
          f"{'' if val_given else ' (= train)'}; {steps} steps of {args.batch_size}, device {device}")

    if not val_given:
        print(f"{PROG}: warning: no --val given: evaluating on the training images, which is not a held-out score",
              file=sys.stderr)
    history = History(out / "history.jsonl", 1, args.batch_size, steps)  # train_detector means over log_every
    build = dict(detector.dfkd_build)
    info: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in ["dfkd-finetune-detection", *argv]),
        "backbone": {"source": source.origin, "model": source.name, "kwargs": source.kwargs,
                     "detector_backbone": spec.detector_backbone, "weights_loaded": source.weights is not None,
                     "frozen": bool(args.freeze_backbone), "adaptations": notes},
        "detector": build,
        "data": {"train": str(args.train), "val": str(args.val) if val_given else None, "val_is_train": not val_given,
                 "train_images": n_train, "val_images": n_val, "classes": train_set.classes,
                 "image_size": image_size},
        "train": {"steps_planned": steps, "batch_size": args.batch_size, "lr": args.lr,
                  "weight_decay": args.weight_decay, "seed": args.seed, "parameters": n_params,
                  "trained_parameters": n_train_params},
        "device": str(device),
    }

    def write_metrics(extra: dict) -> None:
        from dfkd.pipeline import hardware

        atomic_write_json(out / "metrics.json", {**extra, **info, "hardware": hardware(),
                                                 "wall_seconds": round(time.perf_counter() - started, 3)})

    from dfkd.detection.train import train_detector

    t0 = time.perf_counter()
    interrupted = None
    try:
        train_detector(detector, train_data, steps=steps, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay, device=device, seed=args.seed,
                       progress=not args.no_progress, log_fn=history, log_every=args.log_every, augment=True)
    except KeyboardInterrupt:
        interrupted = "training"
    train_seconds = time.perf_counter() - t0
    history.flush()
    detector.eval().cpu()
    save_detector(detector, out / "detector.safetensors")
    info["train"].update({"steps": history.step, "seconds": round(train_seconds, 3),
                          "images_per_second": round(history.step * args.batch_size / max(train_seconds, 1e-9), 2),
                          "final": history.last})
    if interrupted:
        write_metrics({"interrupted": interrupted})
        print(f"{PROG}: interrupted after {history.step}/{steps} steps; the detector so far is in {out} "
              "(no resume: run the command again to start over)", file=sys.stderr)
        return EXIT_INTERRUPTED

    detector.to(device)
    t1 = time.perf_counter()
    from dfkd.eval.detection import evaluate_detector

    try:
        result = evaluate_detector(detector, val_set, batch_size=args.batch_size,
                                   device=device, max_images=n_val, progress=not args.no_progress)
    except KeyboardInterrupt:
        write_metrics({"interrupted": "evaluation"})
        print(f"{PROG}: interrupted during evaluation; the trained detector is in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    eval_seconds = time.perf_counter() - t1
    result["images_per_second"] = round(n_val / max(eval_seconds, 1e-9), 2)
    write_metrics({"map": result["map"], "map50": result["map50"], "map75": result["map75"],
                   "per_class": result["per_class"], "interrupted": None,
                   "eval": {"num_images": result["num_images"], "num_detections": result["num_detections"],
                            "seconds": round(eval_seconds, 3), "images_per_second": result["images_per_second"]}})
    wall = time.perf_counter() - started
    rows = [("mAP@[.5:.95]", f"{result['map']:.4f}"), ("mAP@.5", f"{result['map50']:.4f}"
                                                         + ("" if val_given else "  (on train images)")),
            ("train images/s", f"{info['train']['images_per_second']:.1f}"),
            ("eval images/s", f"{result['images_per_second']:.1f}"),
            ("wall time", _fmt_time(wall)), ("output", str(out))]
    for k, v in rows:
        print(f"{k:<15}{v}")
    return 0



def main(argv: Optional[list[str]] = None) -> int:
    """Parse ``argv`` and run; a user error is one line on stderr and exit 2, Ctrl-C before training 130."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(build_parser().parse_args(argv), argv)
    except DfkdError as e:
        from dfkd.cli.common import one_line

        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before training started; nothing saved", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
