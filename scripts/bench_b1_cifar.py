#!/usr/bin/env python
"""B1: CIFAR-10 with the pretrained ResNet-56 teacher (93.39 %), side by side, equal wall-clock budget.

Rows: teacher; noise-KD floor; DeepInversion; adversarial generator; Fast-DFKD-style meta generator;
real-data-KD ceiling — the same student, the same budget per method, one run. Writes
results/b1_<student>_<device>.{json,md} and a time-to-accuracy PNG.

    DFKD_DATA=PATH python scripts/bench_b1_cifar.py --budget-minutes 10 --device cuda
    DFKD_DATA=PATH python scripts/bench_b1_cifar.py --budget-minutes 2 --device cpu   # CPU mode
    DFKD_DATA=PATH python scripts/bench_b1_cifar.py --student vit_cifar
    DFKD_DATA=PATH python scripts/bench_b1_cifar.py --methods fast_meta --budget-minutes 30 --device cpu --threads 2 \
        --name b1_resnet20_cifar_cpu_30min
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

METHODS = ["noise", "deepinversion", "adversarial", "fast_meta", "real"]

# CPU mode: smaller batches and fewer inversion iterations so a round fits the budget
CPU = ["synthesizer.batch_size=64", "distill.batch_size=128", "distill.kd_steps=10", "data.test_limit=2000",
       "distill.pool_size=20000"]
PER_METHOD_CPU = {
    "deepinversion": ["synthesizer.iterations=50"],
    # no label input: with the label embedding the generator made one image per class (within-class spread near
    # zero) and the student stayed near chance; tying each image's class to its noise vector kept the images
    # apart and gave the best student of the one-lever rows, at a lower requested-class agreement
    # (results/b1_levers_a_cpu.md, rows fm and fm_noembed, 5 minutes; results/b1_levers_10min_cpu.md, 10 minutes)
    "fast_meta": ["synthesizer.label_embedding=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--student", default="resnet20_cifar", help="student config: resnet20_cifar | vit_cifar")
    ap.add_argument("--budget-minutes", type=float, default=10.0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--seeds-for", action="append", default=[], metavar="METHOD=S[,S...]",
                    help="a method's own seeds (repeatable), e.g. --seeds-for noise=0 --seeds-for real=0 beside "
                         "--seeds 0 1 2 for the others")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default=None, help="results file name (default: b1_<student>_<device>), e.g. for a "
                                                  "longer-budget row beside the 10-minute table")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every method")
    args = ap.parse_args()
    from dfkd.bench import parse_seeds_for

    seeds_for = parse_seeds_for(args.seeds_for, args.methods, "bench_b1_cifar")
    if not args.data_root or not Path(args.data_root).is_dir():
        sys.exit("bench_b1_cifar: error: set --data-root or DFKD_DATA to the folder with cifar10/ and teachers/")

    import torch

    from dfkd.bench import add_agreement, prepare_teacher, run_methods, write_results

    started = time.perf_counter()
    root = Path(args.data_root)
    common = ["experiment=cifar10_resnet56_resnet20", f"student={args.student}", f"data.root={root}",
              f"teacher.checkpoint={root / 'teachers/resnet_cifar10/resnet56-4bfd9763.th'}",
              f"device={args.device}", f"distill.budget_minutes={args.budget_minutes}", "distill.eval_every=10"]
    if args.threads:
        common.append(f"threads={args.threads}")
    if args.student.startswith("vit"):
        common += ["distill.optimizer=adamw", "distill.lr=1e-3", "distill.weight_decay=0.05", "distill.warmup=0.05"]
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    per_method = dict(PER_METHOD_CPU) if cpu else {}
    if cpu:
        common += CPU
    common += args.overrides
    limit = next((o.split("=", 1)[1] for o in reversed(common) if o.startswith("data.test_limit=")), "null")
    test_set = ("all 10,000 CIFAR-10 test images" if limit in ("null", "0", "None") else
                f"a seeded random {int(limit):,} of the 10,000 CIFAR-10 test images (data.test_limit={limit}); "
                "the teacher row is scored on the same subset")
    t = prepare_teacher("distill", common, train_split=False)
    device, teacher_top1 = t["device"], t["teacher_top1"]
    name = args.name or f"b1_{args.student}_{device.type}"
    rows = run_methods(args.methods, common, per_method, args.seeds, args.out / name,
                       options={"deepinversion": "deepinversion_cifar"}, seeds_for=seeds_for)
    extra = {"budget_minutes_per_method": args.budget_minutes, "student": args.student,
             "task": "CIFAR-10, pretrained ResNet-56 teacher", "cpu_mode": cpu,
             "test_set": test_set}
    js, md = write_results(name, f"B1 — CIFAR-10, ResNet-56 → {args.student}, {device.type}", args.out, rows,
                           teacher_top1, extra, started)
    add_agreement(js, md)  # each method's requested-class agreement beside its accuracy
    print(Path(md).read_text())


if __name__ == "__main__":
    main()
