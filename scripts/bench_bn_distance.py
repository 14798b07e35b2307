#!/usr/bin/env python
"""BatchNorm-statistics distance of DeepInversion images on the pretrained CIFAR-10 ResNet-56.

The distance is Σ over the teacher's BatchNorm layers ‖μ − μ̂‖₂ + ‖σ² − σ̂²‖₂ (no weights), with
μ, σ² the batch statistics of a layer's input and μ̂, σ̂² its running statistics. Rows, all on the
same teacher and the same batch size:

- ``real``: a seeded random batch of CIFAR-10 test images;
- ``reference``: NVIDIA's CIFAR-10 DeepInversion recipe, written out here as its own loop
  (normalised input space from N(0, 1), no clamping, BatchNorm weight 10 on every layer, TV 1e-3 on
  the norms of four neighbour differences, roll jitter 2, Adam lr 0.1, lowest-loss batch kept);
- ``ours:<variant>``: ``generators.inversion.DeepInversion`` with the ``deepinversion_cifar`` settings,
  then one choice changed at a time toward the reference, then all together.

Distances are taken on the final images clamped to [0, 1] (what a synthesizer returns) and, for the
reference, also on its unclamped tensor. Teacher agreement with the requested labels is reported.

    DFKD_DATA=PATH python scripts/bench_bn_distance.py --iterations 2000
    DFKD_DATA=PATH python scripts/bench_bn_distance.py --iterations 300 --checkpoints 100 200 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

# the deepinversion_cifar settings as they were before this benchmark (pixel space); the row that the
# current configs/synthesizer/deepinversion_cifar.yaml matches is named in the results file
OURS = dict(lr=0.1, bn=1.0, first_bn_multiplier=10.0, ce=1.0, tv=1e-4, l2=1e-5, jitter=2, flip=True,
            init_std=0.2, space="pixel", clamp=True, tv_kind="l1", betas=(0.5, 0.99))
REF_LIKE = dict(space="normalized", init_std=1.0, clamp=False, bn=10.0, first_bn_multiplier=1.0, tv=1e-3,
                tv_kind="norm", l2=0.0, flip=False, betas=(0.9, 0.999))
VARIANTS = {
    "ours": {},
    "ours+bn10_first1": dict(bn=10.0, first_bn_multiplier=1.0),
    "ours+normalized_space": dict(space="normalized", init_std=1.0),
    "ours+no_clamp": dict(clamp=False),
    "ours+tv_norm_1e-3": dict(tv=1e-3, tv_kind="norm"),
    "ours+betas_0.9": dict(betas=(0.9, 0.999)),
    "ours+normalized_no_clamp": dict(space="normalized", init_std=1.0, clamp=False),
    "ours+normalized_bn10_first1": dict(space="normalized", init_std=1.0, bn=10.0, first_bn_multiplier=1.0),
    "ours+reference_choices": REF_LIKE,
}


def current_config_row() -> str | None:
    """The variant whose settings equal the current deepinversion_cifar config (None: no variant)."""
    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parents[1] / "configs" / "synthesizer"
    cfg = OmegaConf.merge(OmegaConf.load(folder / "deepinversion.yaml"), OmegaConf.load(folder / "deepinversion_cifar.yaml"))
    cfg = OmegaConf.to_container(cfg)
    for name, change in VARIANTS.items():
        settings = {**OURS, **change}
        if all(cfg.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()):
            return name
    return None


def reference_recipe(teacher, labels, iterations, checkpoints, seed):
    """NVIDIA's CIFAR-10 DeepInversion loop on ``teacher.model`` (normalised input space)."""
    import torch
    import torch.nn.functional as F

    from dfkd.losses.priors import batchnorm_distance, tv_norm_prior

    net = teacher.model
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    v = torch.randn(len(labels), *teacher.input_size, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.1)
    mean, std = teacher.mean, teacher.std
    best_cost, best = float("inf"), v.detach().clone()
    curve = []
    with teacher.statistics("batchnorm", first_weight=1.0) as prior:
        for it in range(1, iterations + 1):
            off1, off2 = rnd.randint(-2, 2), rnd.randint(-2, 2)
            vj = torch.roll(v, shifts=(off1, off2), dims=(2, 3))
            opt.zero_grad()
            out = net(vj)
            loss = F.cross_entropy(out, labels) + 1e-3 * tv_norm_prior(vj) + 10.0 * prior.loss()
            if loss.item() < best_cost:
                best_cost, best = loss.item(), v.detach().clone()
            loss.backward(inputs=[v])
            opt.step()
            if it in checkpoints:
                prior.reset()
                x = (best * std + mean)
                curve.append({"iteration": it, "bn_distance": batchnorm_distance(teacher, x.clamp(0, 1)),
                              "bn_distance_unclamped": batchnorm_distance(teacher, x)})
                prior.reset()
    x = best * std + mean
    return x, curve


def ours(teacher, settings, batch, iterations, checkpoints, seed, final_only=False):
    """Our DeepInversion, stepped ``checkpoints`` at a time (one call per checkpoint segment would restart
    from noise, so the batch is run once per checkpoint length and the distance of each is recorded)."""

    from dfkd.losses.priors import batchnorm_distance
    from generators.inversion import DeepInversion

    curve, out = [], None
    for it in checkpoints[-1:] if final_only else checkpoints:
        syn = DeepInversion(teacher, batch_size=batch, seed=seed, iterations=it, **settings)
        t0 = time.perf_counter()
        out = syn.step()
        curve.append({"iteration": it, "bn_distance": batchnorm_distance(teacher, out.images),
                      "teacher_acc": out.stats["syn/teacher_acc"], "seconds": time.perf_counter() - t0,
                      "mean_rgb": [round(float(c), 4) for c in out.images.mean((0, 2, 3))]})
    return out, curve


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--checkpoints", nargs="*", type=int, default=None,
                    help="iteration counts at which the distance is recorded (default: the final one)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--curves", nargs="*", default=["ours", "ours+reference_choices"],
                    help="variants also run to every checkpoint (the others only to the last)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="bn_distance_resnet56_cpu")
    args = ap.parse_args(argv)
    root = Path(args.data_root) if args.data_root else None
    ckpt = root / "teachers/resnet_cifar10/resnet56-4bfd9763.th" if root else None
    if ckpt is None or not ckpt.is_file() or not (root / "cifar10/cifar10_test.npz").is_file():
        sys.exit("bench_bn_distance: error: set --data-root or DFKD_DATA to the folder with cifar10/ and teachers/")
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        sys.exit(f"bench_bn_distance: error: unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    checkpoints = sorted(set(args.checkpoints or []) | {args.iterations})

    import numpy as np
    import torch

    from dfkd.losses.priors import batchnorm_distance
    from dfkd.models import build_model
    from dfkd.teacher import Teacher

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    model = build_model("resnet56_cifar", num_classes=10, checkpoint=str(ckpt))
    teacher = Teacher(model, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (3, 32, 32), 10)

    test = np.load(root / "cifar10/cifar10_test.npz")
    idx = np.random.default_rng(args.seed).choice(len(test["labels"]), args.batch, replace=False)
    real = torch.from_numpy(test["images"][idx]).permute(0, 3, 1, 2).float() / 255
    rows = [{"row": "real", "iteration": 0, "bn_distance": batchnorm_distance(teacher, real),
             "mean_rgb": [round(float(c), 4) for c in real.mean((0, 2, 3))],
             "teacher_acc": float((teacher(real).argmax(1) == torch.from_numpy(test["labels"][idx])).float().mean())}]
    print(rows[-1], flush=True)

    labels = torch.arange(args.batch) % 10
    t0 = time.perf_counter()
    x, curve = reference_recipe(teacher, labels, args.iterations, set(checkpoints), args.seed)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((teacher(x.clamp(0, 1)).argmax(1) == labels).float().mean())
    for c in curve:
        rows.append({"row": "reference", **c, "teacher_acc": acc if c["iteration"] == args.iterations else None,
                     "seconds": secs if c["iteration"] == args.iterations else None,
                     "mean_rgb": [round(float(v), 4) for v in x.clamp(0, 1).mean((0, 2, 3))]
                     if c["iteration"] == args.iterations else None})
        print(rows[-1], flush=True)

    for name in args.variants:
        settings = {**OURS, **VARIANTS[name]}
        _, curve = ours(teacher, settings, args.batch, args.iterations, checkpoints, args.seed,
                        final_only=name not in args.curves)
        for c in curve:
            rows.append({"row": name, **c, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in settings.items()}})
            print({k: v for k, v in rows[-1].items() if k != "settings"}, flush=True)

    total = time.perf_counter() - started
    command = "python scripts/bench_bn_distance.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.replace(str(root), "$DFKD_DATA")
    result = {
        "benchmark": "BatchNorm-statistics distance, CIFAR-10 ResNet-56 ($DFKD_DATA/teachers/resnet_cifar10/"
                     "resnet56-4bfd9763.th), DeepInversion variants against real test images and the reference recipe",
        "command": command, "hardware": f"CPU, {os.cpu_count()} cores, torch {torch.__version__} "
                                        f"({args.threads} thread(s)), {platform.platform()}",
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "note": "wall times are from a shared machine (see loadavg) and are noisy",
        "batch": args.batch, "seed": args.seed, "iterations": args.iterations, "checkpoints": checkpoints,
        "real_images": f"$DFKD_DATA/cifar10/cifar10_test.npz, {args.batch} images drawn with numpy "
                       f"default_rng({args.seed}).choice",
        "total_seconds": total, "deepinversion_cifar_config_matches": current_config_row(), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# BatchNorm-statistics distance — CIFAR-10 ResNet-56, batch {args.batch}", "",
             f"- command: `{command}`", f"- hardware: {result['hardware']}",
             f"- seed {args.seed}; total wall time {total:.0f} s; load average {load_start[0]:.1f} → "
             f"{result['loadavg_end'][0]:.1f} (shared machine: times are noisy)",
             "- distance: Σ over BatchNorm layers ‖μ−μ̂‖₂ + ‖σ²−σ̂²‖₂ (unweighted), on the final images "
             "clamped to [0, 1]; lower is closer to the teacher's training statistics",
             f"- `ours` is deepinversion_cifar as it was (pixel space); the current deepinversion_cifar config "
             f"matches row `{result['deepinversion_cifar_config_matches']}`", "",
             "| row | iterations | BN distance | teacher agreement | mean RGB | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = "" if r.get("teacher_acc") is None else f"{r['teacher_acc']:.2f}"
        rgb = "" if not r.get("mean_rgb") else "/".join(f"{c:.2f}" for c in r["mean_rgb"])
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        extra = f" (unclamped {r['bn_distance_unclamped']:.1f})" if "bn_distance_unclamped" in r else ""
        lines.append(f"| {r['row']} | {r['iteration']} | {r['bn_distance']:.1f}{extra} | {acc} | {rgb} | {sec} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
