#!/usr/bin/env python
"""B2: ViT teacher without BatchNorm -> smaller ViT student, side by side, same budget per row.

Rows: noise KD (floor); teacher-only DeepInversion (the headline: nothing but the teacher's weights —
PSAQ-ViT entropy, bootstrapped token statistics, with or without random-resized-crop views); DeepInversion
with statistics recorded on the teacher's real train split (``prior=vit``: token statistics + entropy
matched to the real images' value; labelled, never the headline); real-data KD (ceiling); and an ablation
of priors (token statistics only, no prior) and student losses (manifold, DeiT distillation token, feature KD). Every data-free row uses the same DeepInversion
settings (digits: configs/synthesizer/deepinversion_vit_digits.yaml) and only swaps the prior or loss.
Writes results/b2_vit_<task>.{json,md}. Extra Hydra overrides on the command line apply to every row.

    python scripts/bench_b2_vit.py                                   # CPU, built-in digits
    python scripts/bench_b2_vit.py --budget-minutes 1 --rows noise vit real
    python scripts/bench_b2_vit.py --cifar10 --data-root DATA --teacher-checkpoint OUT/teacher.safetensors  # GPU

CPU mode trains (and caches) the digits ViT teacher of configs/teacher/vit_digits.yaml. The CIFAR-10
mode needs a teacher from scripts/train_vit_teacher.py (its token statistics are read beside it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# label -> (kind, overrides). The synthesizer and loss come from the overrides; {df} is the data-free
# synthesizer of the mode (digits: configs/synthesizer/deepinversion_vit_digits.yaml, whose prior is vit).
FREE = "data-free: teacher only"
RECORDED = "uses statistics recorded on real train images (not data-free)"
ROWS = {
    "noise": ("floor (not data-free)", ["synthesizer=noise"]),
    # teacher only: nothing recorded on real data
    "entropy_only": (f"{FREE} (PSAQ-ViT entropy)", ["{df}", "synthesizer.prior=vit_patch_entropy"]),
    "entropy_crop": (f"{FREE} (PSAQ-ViT entropy, random resized crops)",
                     ["{df}", "synthesizer.prior=vit_patch_entropy", "++synthesizer.crop_scale=0.5"]),
    "bootstrap": (f"{FREE} (bootstrapped token statistics)", ["{df}", "synthesizer.prior=vit_bootstrap"]),
    "bootstrap_crop": (f"{FREE} (bootstrapped token statistics, random resized crops)",
                       ["{df}", "synthesizer.prior=vit_bootstrap", "++synthesizer.crop_scale=0.5"]),
    # a hand-written image prior: dead-leaves images labelled by the teacher, as they are or as inversion's start
    "procedural": (f"{FREE} (procedural dead-leaves images, no optimisation)", ["synthesizer=procedural", "synthesizer.saturation=1.0"]),
    "entropy_dl": (f"{FREE} (PSAQ-ViT entropy, started from dead-leaves images)",
                   ["{df}", "synthesizer.prior=vit_patch_entropy", "synthesizer.init=dead_leaves"]),
    "vit": (RECORDED, ["{df}", "synthesizer.prior=vit"]),
    "real": ("ceiling (uses real train images)", ["synthesizer=real"]),
    # ablation: priors (same synthesizer settings, another prior)
    "stats_only": (f"ablation: prior ({RECORDED})", ["{df}", "synthesizer.prior=vit_token_stats"]),
    "no_prior": ("ablation: prior", ["{df}", "synthesizer.bn=0"]),
    # ablation: student losses (with prior=vit)
    "vit+manifold": (f"ablation: loss ({RECORDED})", ["{df}", "synthesizer.prior=vit", "loss=manifold"]),
    "vit+deit": (f"ablation: loss ({RECORDED})", ["{df}", "synthesizer.prior=vit", "loss=deit", "student={deit}"]),
    "vit+feature": (f"ablation: loss ({RECORDED})", ["{df}", "synthesizer.prior=vit", "loss=feature"]),
}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--seeds-for", action="append", default=[], metavar="ROW=S[,S...]",
                    help="a row's own seeds (repeatable), e.g. --seeds-for noise=0 beside --seeds 0 1 2")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="wall-clock budget per row (default: 1.5 on digits, 10 on CIFAR-10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cifar10", action="store_true", help="CIFAR-10 mode (GPU)")
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--teacher-checkpoint", default=None)
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default=None, help="results name (default b2_vit_digits / b2_vit_cifar10)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = ap.parse_args()
    os.environ.setdefault("DFKD_CACHE", str(Path(tempfile.gettempdir()) / "dfkd_bench_cache"))

    from dfkd.bench import compose, parse_seeds_for, prepare_teacher, write_results
    from dfkd.errors import DfkdError
    from dfkd.pipeline import run_distill

    seeds_for = parse_seeds_for(args.seeds_for, args.rows, "bench_b2_vit")
    started = time.perf_counter()
    if args.cifar10:
        if not args.teacher_checkpoint:
            raise SystemExit("error: --cifar10 needs --teacher-checkpoint (train one with scripts/train_vit_teacher.py)")
        name, title, deit = "b2_vit_cifar10", "B2 — ViT teacher (no BatchNorm) → smaller ViT, CIFAR-10", "deit_cifar"
        budget = args.budget_minutes or 10.0
        df = ["synthesizer=deepinversion", "synthesizer.iterations=200", "synthesizer.lr=0.2"]
        common = ["experiment=b2_vit_cifar10", f"teacher.checkpoint={args.teacher_checkpoint}"]
        if args.data_root:
            common.append(f"data.root={args.data_root}")
    else:
        name, title, deit = "b2_vit_digits", "B2 — ViT teacher (no BatchNorm) → smaller ViT, digits, CPU", "deit_digits"
        budget = args.budget_minutes or 1.5
        df = ["synthesizer=deepinversion_vit_digits"]
        common = ["experiment=b2_vit_digits", "device=cpu"]
    base = [*common, f"threads={args.threads}", f"distill.budget_minutes={budget}", "distill.rounds=100000",
            "distill.eval_every=0", "distill.checkpoint_every=0"]
    t = prepare_teacher("distill", [*base, *args.overrides])
    teacher_top1, teacher_seconds = t["teacher_top1"], t["teacher_seconds"]
    if not args.cifar10 and teacher_top1 < 0.9:
        print("warning: the digits ViT teacher is below 90 % top-1", flush=True)

    name = args.name or name
    rows = []
    out_dir = args.out / name
    for label in args.rows:
        kind, extra = ROWS[label]
        extra = [x for o in extra for x in (df if o == "{df}" else [o.replace("{deit}", deit)])]
        for seed in seeds_for.get(label, args.seeds):
            # the command line's overrides come last: they apply to every row and win
            overrides = [*base, f"seed={seed}", "progress=false", "resume=false", *extra, *args.overrides]
            try:
                run_cfg = compose("distill", overrides)
                s = run_distill(run_cfg, out_dir / "runs" / f"{label.replace('+', '_')}_seed{seed}")
            except DfkdError as e:
                print(f"{label:>14} seed {seed}: error: {e}", flush=True)
                continue
            s.update(method=label, kind=kind, overrides=overrides)
            rows.append(s)
            print(f"{label:>14} seed {seed}: student top-1 {s['student_top1']:.4f} ({s['distill_seconds']:.0f} s, "
                  f"{s['rounds']} rounds)", flush=True)

    import dfkd.bench as bench

    bench.KIND.update({label: kind for label, (kind, _) in ROWS.items()})
    acc: dict[str, list[float]] = {}
    for r in rows:
        acc.setdefault(r["method"], []).append(r["student_top1"])
    by = {k: sum(v) / len(v) for k, v in acc.items()}
    free = {k: v for k, v in by.items() if ROWS[k][0].startswith(FREE)}
    head = max(free, key=free.get) if free else None
    extra_info = {
        "task": ("CIFAR-10, ViT teacher (8x192, patch 4) -> ViT student (4x128)" if args.cifar10 else
                 "sklearn digits 8x8, ViT teacher (4x96, patch 2, 0.3 M params) -> ViT student (4x64, 0.14 M)"),
        "budget_minutes_per_row": budget,
        "teacher_train_seconds": round(teacher_seconds, 1),
        "headline_teacher_only_row": head,
        "teacher_only_over_ceiling": round(by[head] / by["real"], 4) if head and by.get("real") else None,
        "teacher_only_minus_floor": round(by[head] - by["noise"], 4) if head and "noise" in by else None,
        "recorded_statistics_over_ceiling (not data-free)":
            round(by["vit"] / by["real"], 4) if "vit" in by and by.get("real") else None,
        "note": "teacher-only rows use nothing but the teacher's weights; rows marked as using recorded "
                "statistics use token statistics (and the patch-similarity entropy of real images) recorded "
                "from the teacher on its train split when it was trained, as BatchNorm running statistics are",
    }
    _, m = write_results(name, title, args.out, rows, teacher_top1, extra_info, started)
    print(Path(m).read_text())


if __name__ == "__main__":
    main()
