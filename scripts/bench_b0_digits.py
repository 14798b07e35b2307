#!/usr/bin/env python
"""B0: the built-in digits task, side by side, on the CPU.

Teacher (small BatchNorm CNN, trained on the digits train split), then the same tiny ViT student
distilled for the same wall-clock budget from: Gaussian noise (floor), DeepInversion, the adversarial
generator, and real train images (ceiling). Writes results/b0_digits.{json,md}.

    python scripts/bench_b0_digits.py                  # default budget, seed 0
    python scripts/bench_b0_digits.py --seeds 0 1 2 --budget-minutes 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

METHODS = ["noise", "deepinversion", "adversarial", "real"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="same wall-clock budget per method (default: the default run's fixed rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every method")
    args = ap.parse_args()
    os.environ.setdefault("DFKD_CACHE", str(Path(tempfile.gettempdir()) / "dfkd_bench_cache"))

    from dfkd.bench import prepare_teacher, run_methods, write_results

    started = time.perf_counter()
    common = [f"threads={args.threads}", *args.overrides]
    if args.budget_minutes:
        common += [f"distill.budget_minutes={args.budget_minutes}", "distill.rounds=100000",
                   "distill.eval_every=0"]
    t = prepare_teacher("distill", common)
    cfg, teacher_top1, teacher_seconds = t["cfg"], t["teacher_top1"], t["teacher_seconds"]
    out_dir = args.out
    rows = run_methods(args.methods, common, {}, args.seeds, out_dir / "b0_digits")
    d = cfg.distill
    extra = {"per_method": f"{d.rounds} rounds x {d.kd_steps} KD steps, capped at {d.budget_minutes} min",
             "teacher_train_seconds": round(teacher_seconds, 1),
             "task": (f"sklearn digits 8x8, small BatchNorm CNN teacher ({rows[0]['teacher_params']:,} params) -> "
                      f"ViT student ({rows[0]['student_params']:,} params, "
                      f"{rows[0]['teacher_params'] / rows[0]['student_params']:.1f}x fewer)"),
             "test_set": "the digits held-out split (30 %, 540 images), all of it"}
    j, m = write_results("b0_digits", "B0 — digits, CPU, side by side", out_dir, rows, teacher_top1, extra, started)
    print(Path(m).read_text())


if __name__ == "__main__":
    main()
