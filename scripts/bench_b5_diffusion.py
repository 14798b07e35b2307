#!/usr/bin/env python
"""B5 (diffusion): teacher-distilled diffusion sampling vs DeepInversion at equal synthesis time.

One run, side by side, on the built-in digits task (CPU) or any dfkd task given by overrides:

1. DeepInversion writes a source dataset (``--source-images``) with ``dfkd-synthesize``.
2. ``dfkd-train-diffusion`` trains a small class-conditional UNet2DModel on it.
3. Equal synthesis time: DeepInversion and teacher-guided diffusion sampling (and unguided
   sampling, as an ablation) each write as many images as they can in ``--synth-seconds``.
4. The same student is distilled, with the same KD steps, from each stored set, from Gaussian
   noise (floor) and from real train images (ceiling); the source set is a row too.

Writes results/b5_diffusion_<task>.{json,md}.

    python scripts/bench_b5_diffusion.py                        # digits, CPU
    python scripts/bench_b5_diffusion.py --synth-seconds 20 --train-steps 3000
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth-seconds", type=float, default=15.0, help="synthesis time given to each method")
    ap.add_argument("--source-images", type=int, default=2048, help="DeepInversion images the diffusion model learns from")
    ap.add_argument("--train-steps", type=int, default=2000, help="diffusion training steps")
    ap.add_argument("--widths", default="16,32", help="UNet channels per level")
    ap.add_argument("--sample-steps", type=int, default=3)
    ap.add_argument("--scheduler", default="dpm")
    ap.add_argument("--guidance", type=float, default=0.05)
    ap.add_argument("--sample-batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for datasets and runs (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="b5_diffusion_digits")
    ap.add_argument("--distill", nargs="*", default=[], metavar="OVERRIDE",
                    help="Hydra overrides for the student runs only (student=..., distill.*)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (data=..., teacher=...) for every step")
    args = ap.parse_args()
    os.environ.setdefault("DFKD_CACHE", str(Path(tempfile.gettempdir()) / "dfkd_bench_cache"))

    import torch

    from dfkd.bench import compose, hardware_line, prepare_teacher, redact_paths
    from dfkd.cli.synthesize import run_synthesize
    from dfkd.data.store import SyntheticStore
    from dfkd.diffusion import train_diffusion_from_store
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware, run_distill

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="dfkd_b5_"))
    work.mkdir(parents=True, exist_ok=True)
    common = [f"threads={args.threads}", f"seed={args.seed}", "progress=false", *args.overrides]
    t = prepare_teacher("distill", common)
    teacher_top1 = t["teacher_top1"]

    def synthesize(out: Path, synth: list[str], num_images: int, budget_s: float | None) -> dict:
        over = [*common, f"output={out}", f"num_images={num_images}", *synth]
        if budget_s is not None:
            over.append(f"budget_minutes={budget_s / 60}")
        s = run_synthesize(compose("synthesize", over))
        s["images_per_second"] = s["made_this_run"] / s["wall_seconds"]
        print(f"  {out.name}: {s['made_this_run']} images in {s['wall_seconds']:.1f} s "
              f"({s['images_per_second']:.0f} img/s)", flush=True)
        return s

    # 1. the source dataset and 2. the teacher-distilled diffusion model
    print("source dataset (DeepInversion)", flush=True)
    src = synthesize(work / "di_source", ["synthesizer=deepinversion"], args.source_images, None)
    print("training the diffusion model", flush=True)
    torch.set_num_threads(args.threads)
    dm = train_diffusion_from_store(work / "di_source", work / "ddpm", steps=args.train_steps,
                                    widths=[int(v) for v in args.widths.split(",")], seed=args.seed,
                                    progress=False)
    print(f"  {dm['steps_done']} steps in {dm['wall_seconds']:.0f} s, loss {dm['final_loss']:.4f}", flush=True)

    # 3. equal synthesis time
    big = 10_000_000
    diff = ["synthesizer=diffusion", f"synthesizer.path={work / 'ddpm'}", f"synthesizer.steps={args.sample_steps}",
            f"synthesizer.scheduler={args.scheduler}", f"synthesizer.batch_size={args.sample_batch}",
            "shard_size=1024"]
    sets = {
        "deepinversion": synthesize(work / "di_equal", ["synthesizer=deepinversion"], big, args.synth_seconds),
        "diffusion_guided": synthesize(work / "diff_guided", [*diff, f"synthesizer.guidance={args.guidance}"], big,
                                       args.synth_seconds),
        "diffusion_unguided": synthesize(work / "diff_unguided", [*diff, "synthesizer.guidance=0"], big,
                                         args.synth_seconds),
    }

    # 4. the same student, the same KD steps, from every source
    kd = ["distill.budget_minutes=60", "distill.eval_every=10", "resume=false", *args.distill]
    cfg0 = compose("distill", [*common, *kd])
    rounds = int(cfg0.distill.rounds)

    def stored(path: Path) -> list[str]:
        n = len(SyntheticStore(path, verify=False))
        per_round = max(1, math.ceil(n / (rounds // 2)))  # the whole set is in memory by mid-run
        return ["synthesizer=stored", f"synthesizer.path={path}", f"synthesizer.batch_size={per_round}"]

    plan = [
        ("noise", "floor (not data-free)", ["synthesizer=noise"], None),
        ("deepinversion (equal time)", "data-free", stored(work / "di_equal"), sets["deepinversion"]),
        ("diffusion, teacher-guided (equal time)", "data-free", stored(work / "diff_guided"),
         sets["diffusion_guided"]),
        ("diffusion, unguided (equal time)", "data-free (ablation)", stored(work / "diff_unguided"),
         sets["diffusion_unguided"]),
        ("deepinversion source set", "data-free (what the diffusion model learned from)",
         stored(work / "di_source"), src),
        ("real", "ceiling (uses real train images)", ["synthesizer=real"], None),
    ]
    rows = []
    for method, kind, over, made in plan:
        cfg = compose("distill", [*common, *kd, *over])
        run_dir = work / "runs" / method.split(" ")[0].replace(",", "") / str(len(rows))
        summary = run_distill(cfg, run_dir)
        row = {"method": method, "kind": kind, "student_top1": summary["student_top1"],
               "distill_seconds": summary["distill_seconds"], "overrides": over,
               "images": made["made_this_run"] if made else None,
               "synth_seconds": made["wall_seconds"] if made else None,
               "images_per_second": made["images_per_second"] if made else None}
        rows.append(row)
        print(f"{method:>42}: student top-1 {row['student_top1']:.4f}", flush=True)

    by = {r["method"]: r for r in rows}
    di, dg = by["deepinversion (equal time)"], by["diffusion, teacher-guided (equal time)"]
    verdict = {
        "speedup_images_per_second": dg["images_per_second"] / di["images_per_second"],
        "accuracy_ratio_vs_deepinversion": dg["student_top1"] / di["student_top1"],
        "target": ">= 10x images/s at >= 95% of DeepInversion's student top-1",
    }
    verdict["target_met"] = verdict["speedup_images_per_second"] >= 10 and verdict["accuracy_ratio_vs_deepinversion"] >= 0.95
    one_time = {"source_images": src["made_this_run"], "source_seconds": src["wall_seconds"],
                "diffusion_train_steps": dm["steps_done"], "diffusion_train_seconds": dm["wall_seconds"],
                "diffusion_final_loss": dm["final_loss"]}
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    result = redact_paths({
        "benchmark": args.name, "command": command, "hardware": hardware(), "seed": args.seed,
        "wall_seconds": time.perf_counter() - started, "teacher_top1": teacher_top1,
        "synth_seconds_each": args.synth_seconds, "kd": f"{rounds} rounds x {cfg0.distill.kd_steps} KD steps",
        "sampling": {"steps": args.sample_steps, "scheduler": args.scheduler, "guidance": args.guidance,
                     "batch": args.sample_batch, "unet_widths": args.widths},
        "one_time_cost": one_time, "verdict": verdict, "rows": rows,
    }, {work: "$WORK"})  # the work folder is this machine's: named by its option
    command = result["command"]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", result)
    hw = result["hardware"]
    lines = [
        "# B5 — diffusion sampling from a teacher-distilled model vs DeepInversion, equal synthesis time",
        "",
        f"- command: `{command}`",
        hardware_line(hw),
        f"- seed {args.seed}; total wall time {result['wall_seconds']:.0f} s; every student: {result['kd']}",
        f"- synthesis time per method: {args.synth_seconds:g} s; sampling: {args.sample_steps} {args.scheduler} steps, "
        f"teacher guidance {args.guidance:g}, UNet widths {args.widths}",
        f"- one-time cost of the diffusion route: {src['made_this_run']} DeepInversion images "
        f"({src['wall_seconds']:.0f} s) + {dm['steps_done']} training steps ({dm['wall_seconds']:.0f} s)",
        "",
        "| source of the student's images | kind | images | synth s | images/s | student top-1 |",
        "|---|---|---|---|---|---|",
        f"| teacher | — | | | | {teacher_top1:.4f} |",
    ]
    for r in rows:
        n = "—" if r["images"] is None else str(r["images"])
        s = "—" if r["synth_seconds"] is None else f"{r['synth_seconds']:.1f}"
        ips = "—" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
        lines.append(f"| {r['method']} | {r['kind']} | {n} | {s} | {ips} | {r['student_top1']:.4f} |")
    lines += ["", f"Guided diffusion vs DeepInversion at equal time: "
              f"{verdict['speedup_images_per_second']:.1f}x images/s, "
              f"{100 * verdict['accuracy_ratio_vs_deepinversion']:.1f}% of its student top-1 "
              f"(target {verdict['target']}: {'met' if verdict['target_met'] else 'not met'})."]
    atomic_write_bytes(args.out / f"{args.name}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
