#!/usr/bin/env python
"""B1 levers on the CPU: one change at a time against its baseline, same budget, same script.

ResNet-56 (pretrained, 93.39 %) → ResNet-20 from scratch on CIFAR-10, the B1 CPU settings of
``scripts/bench_b1_cifar.py`` (batch 64 synthesis, KD batch 128, 10 KD steps per batch), a shorter
budget and a seeded random test subset so many rows fit. Each row reports student top-1, synthesis
images/s and the synthesizer's requested-class agreement (``syn/teacher_acc``: the teacher's arg-max
on the un-augmented images against the class each was made for), over the run and its last quarter.

    DFKD_DATA=PATH python scripts/bench_b1_levers.py --budget-minutes 3 --threads 1 --test-limit 1000
    DFKD_DATA=PATH python scripts/bench_b1_levers.py --rows adversarial adversarial_bounded --budget-minutes 10 --threads 2 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# row name → (synthesizer config option, overrides); the lever is what differs from the row above it
ROWS: dict[str, tuple[str, list[str]]] = {
    "noise": ("noise", []),
    "adversarial_kl": ("adversarial", ["synthesizer.adv_loss=kl", "synthesizer.adv_mask=false",
                                       "synthesizer.adv_gate=0.0", "synthesizer.adv_warmup=0"]),
    "adversarial_bounded": ("adversarial", ["synthesizer.adv_loss=js", "synthesizer.adv_mask=true",
                                            "synthesizer.adv_gate=0.5"]),
    "fast_meta_kl": ("fast_meta", ["synthesizer.adv_loss=kl", "synthesizer.adv_mask=false",
                                   "synthesizer.adv_gate=0.0", "synthesizer.adv_warmup=0"]),
    "fast_meta_bounded": ("fast_meta", ["synthesizer.adv_loss=js", "synthesizer.adv_mask=true",
                                        "synthesizer.adv_gate=0.5"]),
    "fast_meta_bounded_bn1_g4": ("fast_meta", ["synthesizer.adv_loss=js", "synthesizer.adv_mask=true",
                                               "synthesizer.adv_gate=0.5", "synthesizer.bn=1.0",
                                               "synthesizer.g_steps=4"]),
    "deepinversion_pixel": ("deepinversion_cifar", ["synthesizer.iterations=50", "synthesizer.space=pixel",
                                                    "synthesizer.clamp=true", "synthesizer.bn=1.0",
                                                    "synthesizer.first_bn_multiplier=10.0", "synthesizer.tv=1e-4",
                                                    "synthesizer.tv_kind=l1", "synthesizer.init_std=0.2"]),
    "deepinversion_normalized": ("deepinversion_cifar", ["synthesizer.iterations=50", "synthesizer.space=normalized",
                                                         "synthesizer.clamp=false", "synthesizer.bn=10.0",
                                                         "synthesizer.first_bn_multiplier=1.0", "synthesizer.tv=1e-3",
                                                         "synthesizer.tv_kind=norm", "synthesizer.init_std=1.0",
                                                         "synthesizer.l2=0.0", "synthesizer.betas=[0.9,0.999]"]),
    "real": ("real", []),
}
DEFAULT_ROWS = ["adversarial_kl", "adversarial_bounded", "fast_meta_kl", "fast_meta_bounded",
                "fast_meta_bounded_bn1_g4"]
CPU = ["synthesizer.batch_size=64", "distill.batch_size=128", "distill.kd_steps=10", "distill.pool_size=20000"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, help=f"rows from: {', '.join(ROWS)}")
    ap.add_argument("--budget-minutes", type=float, default=3.0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-limit", type=int, default=1000, help="seeded random test subset (0: all 10,000)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="b1_levers_cpu")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = ap.parse_args(argv)
    if not args.data_root or not Path(args.data_root).is_dir():
        sys.exit("bench_b1_levers: error: set --data-root or DFKD_DATA to the folder with cifar10/ and teachers/")
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        sys.exit(f"bench_b1_levers: error: unknown row(s) {bad}; known: {', '.join(ROWS)}")

    from dfkd.bench import add_agreement, prepare_teacher, run_methods, write_results

    started = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(args.data_root)
    common = ["experiment=cifar10_resnet56_resnet20", "student=resnet20_cifar", f"data.root={root}",
              f"teacher.checkpoint={root / 'teachers/resnet_cifar10/resnet56-4bfd9763.th'}",
              f"device={args.device}", f"distill.budget_minutes={args.budget_minutes}", "distill.eval_every=10",
              f"threads={args.threads}", f"data.test_limit={args.test_limit or 'null'}", *CPU, *args.overrides]
    t = prepare_teacher("distill", common, train_split="real" in args.rows)
    out_dir = args.out / args.name
    rows = run_methods(args.rows, common, {r: ROWS[r][1] for r in args.rows}, args.seeds, out_dir,
                       options={r: ROWS[r][0] for r in args.rows})
    extra = {"budget_minutes_per_row": args.budget_minutes, "test_limit": args.test_limit,
             "threads": args.threads, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
             "note": "shared machine: wall-clock budgets buy less compute when the load average exceeds the "
                     "core count; rows ran one after another, compare neighbours",
             "rows_definition": {r: {"synthesizer": ROWS[r][0], "overrides": ROWS[r][1]} for r in args.rows}}
    jpath, mpath = write_results(args.name, f"B1 levers — CIFAR-10, ResNet-56 → ResNet-20, {t['device'].type}",
                                 args.out, rows, t["teacher_top1"], extra, started)
    add_agreement(jpath, mpath)
    lines = ["", f"- load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end "
             f"({os.cpu_count()} cores, shared machine: times are noisy)",
             "- rows: " + "; ".join(f"`{r}`: synthesizer={ROWS[r][0]} {' '.join(ROWS[r][1])}" for r in args.rows)]
    with open(mpath, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(Path(mpath).read_text())


if __name__ == "__main__":
    main()
