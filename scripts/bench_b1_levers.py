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
import json
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

# Accuracy per CPU-second: one lever per row against the ``fm`` (or ``adv``) base row. The base pins every
# setting a lever row changes, so a row keeps its meaning when a config default moves.
FM = ["synthesizer.adv_loss=js", "synthesizer.adv_mask=true", "synthesizer.adv_gate=0.5", "synthesizer.bn=1.0",
      "synthesizer.g_steps=4", "synthesizer.ngf=64", "synthesizer.train_every=1", "synthesizer.train_warmup=0",
      "synthesizer.view=roll", "synthesizer.jitter=1", "synthesizer.label_embedding=true",
      "synthesizer.div=0.0", "loss.temperature=4.0", "distill.mix=both"]
ADV = ["synthesizer.adv_loss=js", "synthesizer.adv_mask=true", "synthesizer.adv_gate=0.5", "synthesizer.bn=1.0",
       "synthesizer.g_steps=5", "synthesizer.ngf=64", "synthesizer.train_every=1", "synthesizer.train_warmup=0",
       "synthesizer.view=roll", "synthesizer.jitter=1", "synthesizer.label_embedding=true",
       "synthesizer.div=0.0", "loss.temperature=4.0", "distill.mix=both"]
DI = ["synthesizer.iterations=50", "synthesizer.init=noise", "synthesizer.space=normalized"]
# the procedural colour setting these rows were measured with (pinned, should the default move)
PROC1 = ["synthesizer.saturation=1.0"]
LEVERS: dict[str, tuple[str, list[str], str]] = {  # row → (synthesizer option, base + lever, the lever in words)
    "fm": ("fast_meta", FM, "base: fast_meta, bounded adversarial term, bn 1, g_steps 4, ngf 64, 10 KD steps per batch"),
    "fm_kd30": ("fast_meta", FM + ["distill.kd_steps=30"], "30 KD steps per synthesized batch (not 10)"),
    "fm_g2": ("fast_meta", FM + ["synthesizer.g_steps=2"], "2 generator steps per round (not 4)"),
    "fm_ngf32": ("fast_meta", FM + ["synthesizer.ngf=32"], "generator width ngf 32 (not 64)"),
    "fm_sample4": ("fast_meta", FM + ["synthesizer.train_warmup=10", "synthesizer.train_every=4"],
                   "after 10 trained rounds the generator trains every 4th round; the others only sample"),
    "fm_t20": ("fast_meta", FM + ["loss.temperature=20.0"], "KD temperature 20 (not 4)"),
    "fm_nomix": ("fast_meta", FM + ["distill.mix=none"], "no mixup/CutMix on the student's batches"),
    "fm_bn3": ("fast_meta", FM + ["synthesizer.bn=3.0"], "BatchNorm-prior weight 3 (not 1)"),
    "fm_bn10": ("fast_meta", FM + ["synthesizer.bn=10.0"], "BatchNorm-prior weight 10 (not 1)"),
    "fm_cropflip": ("fast_meta", FM + ["synthesizer.view=crop_flip", "synthesizer.jitter=4"],
                    "the teacher sees each synthetic image shifted by up to 4 px on its own and flipped at random "
                    "(Fast-DFKD's synthesis view), not the whole batch rolled by up to 1 px"),
    "fm_nomask": ("fast_meta", FM + ["synthesizer.adv_mask=false"],
                  "the bounded (JS) adversarial term on every image, not only where student and teacher agree"),
    "fm_noembed": ("fast_meta", FM + ["synthesizer.label_embedding=false"],
                   "no label input to the generator: each image's class is tied to its noise vector (Fast-DFKD)"),
    "fm_div": ("fast_meta", FM + ["synthesizer.div=1.0"],
               "diversity term 1: same-class cosine similarity of the teacher's penultimate features"),
    "fm_div_t20": ("fast_meta", FM + ["synthesizer.div=1.0", "loss.temperature=20.0"],
                   "two levers together: the diversity term 1 (fm_div) and KD temperature 20 (fm_t20)"),
    "fm_noembed_t20": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss.temperature=20.0"],
                       "two levers together: no label input (fm_noembed) and KD temperature 20 (fm_t20)"),
    "fm_noembed_kd30": ("fast_meta", FM + ["synthesizer.label_embedding=false", "distill.kd_steps=30"],
                        "two levers together: no label input (fm_noembed) and 30 KD steps per batch (fm_kd30)"),
    "fm_cl": ("fast_meta", FM + ["distill.channels_last=true"], "channels-last memory format for the models"),
    "fm_kdbatch64": ("fast_meta", FM + ["distill.batch_size=64"], "student batch 64 (not 128)"),
    "di": ("deepinversion_cifar", DI, "base: DeepInversion, deepinversion_cifar settings, 50 iterations from noise"),
    "di_dl": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves"],
              "start from procedural dead-leaves images, not Gaussian noise"),
    "di_dl_it20": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves", "synthesizer.iterations=20"],
                   "two levers: dead-leaves start (di_dl) and 20 iterations (not 50)"),
    "di_dl_it20_kd30": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves", "synthesizer.iterations=20",
                                                     "distill.kd_steps=30"],
                        "three levers: di_dl_it20 and 30 KD steps per synthesized batch (not 10)"),
    "proc": ("procedural", [*PROC1, "synthesizer.oversample=1"],
             "procedural dead-leaves images labelled by the teacher: no optimisation, no generator"),
    "proc_sat": ("procedural", ["synthesizer.saturation=0.5", "synthesizer.oversample=1"],
                 "procedural (proc) with colours pulled halfway to grey (saturation 0.5)"),
    "proc_os4": ("procedural", [*PROC1, "synthesizer.oversample=4"],
                 "procedural, 4x candidates, the class-balanced most confident quarter kept"),
    "proc_feat": ("procedural", [*PROC1, "synthesizer.oversample=1", "loss=penultimate"],
                  "procedural (proc) with the penultimate-feature loss: the student also regresses the teacher's "
                  "classifier input"),
    "di_feat": ("deepinversion_cifar", DI + ["loss=penultimate"], "DeepInversion (di) with the penultimate-feature loss"),
    "di_dl_it20_feat": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves", "synthesizer.iterations=20",
                                                     "loss=penultimate"],
                        "di_dl_it20 with the penultimate-feature loss"),
    "di_dl_it20_kd60": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves", "synthesizer.iterations=20",
                                                     "distill.kd_steps=60"],
                        "di_dl_it20_kd30 with 60 KD steps per synthesized batch (not 30)"),
    "di_dl_it20_kd30_feat": ("deepinversion_cifar", DI + ["synthesizer.init=dead_leaves", "synthesizer.iterations=20",
                                                          "distill.kd_steps=30", "loss=penultimate"],
                             "di_dl_it20_kd30 with the penultimate-feature loss"),
    "fm_noembed_feat": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss=penultimate"],
                        "fm_noembed with the penultimate-feature loss"),
    "fm_noembed_feat_head": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss=penultimate",
                                                "loss.head_from_teacher=true"],
                             "fm_noembed_feat with the student's classifier started as a copy of the teacher's"),
    "fm_noembed_feat_head_f5": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss=penultimate",
                                                   "loss.head_from_teacher=true", "loss.feature=5.0"],
                                "fm_noembed_feat_head with feature weight 5 (not 1)"),
    "fm_noembed_feat_head_kd20": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss=penultimate",
                                                     "loss.head_from_teacher=true", "distill.kd_steps=20"],
                                  "fm_noembed_feat_head with 20 KD steps per synthesized batch (not 10)"),
    "fm_noembed_feat_init": ("fast_meta", FM + ["synthesizer.label_embedding=false", "loss=penultimate",
                                                "student.init=teacher"],
                             "fm_noembed_feat with the student started from the teacher's weights (evenly spaced "
                             "blocks)"),
    "adv": ("adversarial", ADV, "base: adversarial generator, bounded adversarial term, bn 1, g_steps 5, ngf 64"),
    "adv_bn10": ("adversarial", ADV + ["synthesizer.bn=10.0"], "BatchNorm-prior weight 10 (not 1)"),
    "adv_sample4": ("adversarial", ADV + ["synthesizer.train_warmup=10", "synthesizer.train_every=4"],
                    "after 10 trained rounds the generator trains every 4th round; the others only sample"),
}
ROWS.update({k: (opt, ov) for k, (opt, ov, _) in LEVERS.items()})
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
    ap.add_argument("--reuse", action="store_true",
                    help="take a row's run from <out>/<name>/runs/<row>_seed<s>/summary.json when a finished run with "
                         "the same settings is there (rows of one table measured in more than one sitting)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = ap.parse_args(argv)
    if not args.data_root or not Path(args.data_root).is_dir():
        sys.exit("bench_b1_levers: error: set --data-root or DFKD_DATA to the folder with cifar10/ and teachers/")
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        sys.exit(f"bench_b1_levers: error: unknown row(s) {bad}; known: {', '.join(ROWS)}")

    from dfkd.bench import add_agreement, prepare_teacher, run_methods, stored_run, write_results

    started = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(args.data_root)
    common = ["experiment=cifar10_resnet56_resnet20", "student=resnet20_cifar", f"data.root={root}",
              f"teacher.checkpoint={root / 'teachers/resnet_cifar10/resnet56-4bfd9763.th'}",
              f"device={args.device}", f"distill.budget_minutes={args.budget_minutes}", "distill.eval_every=10",
              f"threads={args.threads}", f"data.test_limit={args.test_limit or 'null'}", *CPU, *args.overrides]
    t = prepare_teacher("distill", common, train_split="real" in args.rows)
    out_dir = args.out / args.name
    per_row = {r: ROWS[r][1] for r in args.rows}
    reused: dict[tuple[str, int], dict] = {}
    if args.reuse:
        for r in args.rows:
            for seed in args.seeds:
                want = [f"synthesizer={ROWS[r][0]}", f"seed={seed}", "progress=false", "resume=false", *common,
                        *per_row[r]]
                summary = stored_run(out_dir / "runs" / f"{r}_seed{seed}", want)
                if summary is not None:
                    summary["method"] = r
                    reused[(r, seed)] = summary
                    print(f"{r:>14} seed {seed}: reused {summary['run_dir']}", flush=True)
    todo = [r for r in args.rows if any((r, s) not in reused for s in args.seeds)]
    fresh = run_methods(todo, common, per_row, args.seeds, out_dir, options={r: ROWS[r][0] for r in todo})
    by_key = {(r["method"], r["seed"]): r for r in fresh}
    rows = [reused.get((r, s)) or by_key[(r, s)] for r in args.rows for s in args.seeds]
    extra = {"budget_minutes_per_row": args.budget_minutes, "test_limit": args.test_limit,
             "threads": args.threads, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
             "note": "shared machine: wall-clock budgets buy less compute when the load average exceeds the "
                     "core count; rows ran one after another, compare neighbours",
             "rows_definition": {r: {"synthesizer": ROWS[r][0], "overrides": ROWS[r][1],
                                     **({"lever": LEVERS[r][2]} if r in LEVERS else {})} for r in args.rows}}
    jpath, mpath = write_results(args.name, f"B1 levers — CIFAR-10, ResNet-56 → ResNet-20, {t['device'].type}",
                                 args.out, rows, t["teacher_top1"], extra, started)
    add_agreement(jpath, mpath)
    lines = ["", f"- load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end "
             f"({os.cpu_count()} cores, shared machine: times are noisy)",
             "- rows: " + "; ".join(f"`{r}`: synthesizer={ROWS[r][0]} {' '.join(ROWS[r][1])}" for r in args.rows)]
    spread = {}
    for run in rows:
        f = Path(run["run_dir"]) / "metrics.jsonl"
        vals = [json.loads(x).get("syn/class_spread") for x in f.read_text().splitlines() if x.strip()] \
            if f.is_file() else []
        vals = [v for v in vals if v is not None]
        if vals:
            spread.setdefault(run["method"], []).append(sum(vals[-max(1, len(vals) // 4):]) / max(1, len(vals[-max(1, len(vals) // 4):])))
    if spread:
        lines += ["", "Diversity inside a class (`syn/class_spread`: per-pixel std over the images made for one class, "
                  "mean over the classes; last quarter of the rounds; 0 = one image per class):", "",
                  "| row | class spread |", "|---|---|"]
        lines += [f"| {r} | {sum(v) / len(v):.3f} |" for r, v in spread.items()]
    reused_rows = sorted({r for (r, _s) in reused})
    if reused_rows:
        lines.append(f"- rows taken from an earlier sitting's finished runs (--reuse): {', '.join(reused_rows)}; the "
                     "total wall time and load averages above are this sitting's; each run's own distill time is "
                     "in the table and its load below")
    loads = [f"{run['method']} {run['hardware']['load_average_1_5_15min'][0]:g}" for run in rows
             if run.get("hardware", {}).get("load_average_1_5_15min")]
    if loads:
        lines.append("- 1-minute load average at the end of each row's run: " + ", ".join(loads))
    levers = [r for r in args.rows if r in LEVERS]
    if levers:
        lines += ["", "| row | lever |", "|---|---|"] + [f"| {r} | {LEVERS[r][2]} |" for r in levers]
    with open(mpath, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(Path(mpath).read_text())


if __name__ == "__main__":
    main()
