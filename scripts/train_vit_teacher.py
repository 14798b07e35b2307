#!/usr/bin/env python
"""Train a small ViT teacher on CIFAR-10 (for B2, ViT teacher without BatchNorm). Meant for a GPU.

Writes into ``--out``:
  teacher.safetensors              the weights (≤ 12 MB, float32), with teacher.json (how to build it)
  teacher.token_stats.safetensors  per-block token statistics on the train images (the ViT analogue of
                                   BatchNorm running statistics, used by the ``vit_token_stats`` prior)
  teacher_metrics.json             test top-1/top-5, wall time, hardware, the exact command

    python scripts/train_vit_teacher.py --data-root DATA --out runs/vit_teacher_cifar10      # GPU
    python scripts/train_vit_teacher.py --smoke --out vit_smoke                             # CPU, seconds

The data root holds cifar10_test.npz and cifar10_train_part{0..4}of5.npz (or a cifar10/ folder).
``--smoke`` trains a tiny ViT for a few steps on the built-in digits (no files needed).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path


MAX_BYTES = 12 * 2**20

# ViT for 32x32 CIFAR-10: 64 patches of 4x4, 8 blocks of width 192 (2.4 M parameters, ~9.5 MB).
CIFAR_VIT = dict(model="vit_tiny_patch16_224", kwargs=dict(img_size=32, patch_size=4, embed_dim=192, depth=8,
                                                           num_heads=3, mlp_ratio=2.0, global_pool="avg",
                                                           class_token=False))
SMOKE_VIT = dict(model="vit_tiny_patch16_224", kwargs=dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16,
                                                           depth=1, num_heads=2, mlp_ratio=2.0, global_pool="avg",
                                                           class_token=False))


def train_vit(net, train, test, epochs: int, batch_size: int, lr: float, weight_decay: float, warmup_epochs: float,
              label_smoothing: float, device, amp: bool, seed: int, max_steps: int | None = None,
              progress: bool = True, crop_padding: int = 4, flip: bool = True):
    """AdamW + warmup/cosine + random crop/flip (kornia, on the device) + label smoothing + clipping,
    through the library's supervised trainer (dfkd.train.train_classifier, the one engine)."""
    from dfkd.augment import build_augment
    from dfkd.train import train_classifier

    aug = build_augment(net.input_size, crop_padding=crop_padding, flip=flip).to(device)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    return train_classifier(net, train, test, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            augment=aug, device=device, seed=seed, label_smoothing=label_smoothing,
                            progress=progress, optimizer="adamw",
                            warmup=min(0.5, warmup_epochs * steps_per_epoch / max(1, total)), grad_clip=1.0,
                            amp="auto" if amp else "none", max_steps=max_steps, desc="train ViT teacher")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"), help="CIFAR-10 npz folder (default: $DFKD_DATA)")
    ap.add_argument("--out", type=Path, default=Path("runs/vit_teacher_cifar10"))
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=5.0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny ViT, a few steps on the built-in digits, CPU")
    args = ap.parse_args(argv)

    import torch

    from dfkd.data import load_cifar10, load_digits
    from dfkd.distill import resolve_device
    from dfkd.errors import DfkdError
    from dfkd.models import build_model, count_parameters
    from dfkd.models.checkpoint import atomic_write_json, save_model
    from dfkd.pipeline import hardware
    from dfkd.priors_vit import save_teacher_token_statistics
    from dfkd.teacher import Normalized

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.smoke:
        data, spec, device = load_digits(), SMOKE_VIT, torch.device("cpu")
        epochs, max_steps, crop, flip = 1, 5, 1, False
    else:
        data = load_cifar10(args.data_root)
        if data.train is None:
            raise DfkdError(f"no CIFAR-10 train parts (cifar10_train_part*of5.npz) under {args.data_root}")
        spec, device = CIFAR_VIT, resolve_device(args.device)
        epochs, max_steps, crop, flip = args.epochs, None, 4, True
    kwargs = {"num_classes": data.num_classes, **spec["kwargs"]}
    model = build_model(spec["model"], **kwargs)
    net = Normalized(model, list(data.mean), list(data.std), data.input_size, data.num_classes)
    metrics = train_vit(net, data.train, data.test, epochs, args.batch_size, args.lr, args.weight_decay,
                        args.warmup_epochs, args.label_smoothing, device, args.amp, args.seed, max_steps,
                        progress=not args.smoke, crop_padding=crop, flip=flip)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "teacher.safetensors"
    save_model(model, ckpt, build={"model": spec["model"], "kwargs": kwargs, "mean": list(data.mean),
                                   "std": list(data.std), "input_size": list(data.input_size)})
    size = ckpt.stat().st_size
    if size > MAX_BYTES:
        raise DfkdError(f"{ckpt} is {size / 2**20:.1f} MB, over the 12 MB limit")
    save_teacher_token_statistics(net, data.train, ckpt, seed=args.seed)
    result = {
        "test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_loss": metrics["loss"],
        "model": spec["model"], "kwargs": kwargs, "params": count_parameters(model), "checkpoint_bytes": size,
        "epochs": epochs, "smoke": args.smoke, "dataset": data.name, "seed": args.seed,
        "wall_seconds": time.perf_counter() - t0, "device": str(device), "hardware": hardware(),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }
    atomic_write_json(args.out / "teacher_metrics.json", result)
    print(f"teacher top-1 {metrics['top1']:.4f}  checkpoint {ckpt} ({size / 2**20:.1f} MB)")
    return result


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one clear line for user errors
        from dfkd.errors import DfkdError

        if isinstance(e, DfkdError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
