#!/usr/bin/env python
"""B2-real: a third-party CIFAR-10 ViT (not trained by this project) -> a smaller ViT, side by side.

The teacher is ``$DFKD_DATA/teachers/vit_cifar10_ashu/vit_model.pth`` (a ViT on nn.MultiheadAttention);
it is converted to timm's layout first (``dfkd.models.convert``, num_heads 4, inputs [0, 1], no
normalisation) into a cache folder. Rows: noise (floor), DeepInversion with each teacher-only prior
(PSAQ entropy; bootstrapped token statistics; inter-head attention agreement; patch contrast; their
combination), the generator route (adversarial / fast_meta with the ViT prior), real-data KD (ceiling:
real train images through the same teacher). The same wall-clock budget per row; the prior rows share the
inversion settings of configs/synthesizer/deepinversion_vit_cifar.yaml and swap the prior; ``entropy`` is
PSAQ's entropy with the pixel parametrisation, the ``spec_*`` rows use the 1/f^2 spectrum images.
The student (``--student vit``) is a ViT smaller than the 0.21 M teacher (configs/student/vit_cifar_tiny.yaml).
No row uses statistics recorded on real data (the teacher has none). Students are scored on a seeded
random subset of the test set (``--test-limit``). Writes results/b2_real_<student>.{json,md}.

    DFKD_DATA=PATH python scripts/bench_b2_real.py --budget-minutes 1.5 --threads 1

Hydra overrides go last, after an option that is not --rows (``--rows`` takes every word after it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

FREE = "vit_free"
# label -> (kind, prior, extra overrides). prior None: not DeepInversion (its own synthesizer in the overrides)
ROWS = {
    "noise": ("floor (not data-free)", None, ["synthesizer=noise"]),
    "entropy": ("data-free: teacher only (PSAQ-ViT entropy, maximised; pixel parametrisation)", "vit_patch_entropy",
                ["{PIXEL}"]),
    "bootstrap": ("data-free: teacher only (bootstrapped token statistics + entropy)", "vit_bootstrap", []),
    "heads": ("data-free: teacher only (entropy + head agreement)", f"{FREE}(entropy=1, bootstrap=0, heads=1)", []),
    "contrast": ("data-free: teacher only (entropy + patch contrast)", f"{FREE}(entropy=1, bootstrap=0, contrast=1)", []),
    "combo": ("data-free: teacher only (bootstrap + heads + contrast)", f"{FREE}(bootstrap=1, heads=1, contrast=1)", []),
    "no_prior": ("ablation: no prior", "none", []),
    # the generator route: a generator network trained against the student, with the ViT prior (prior=auto)
    "adversarial": ("data-free: teacher only (adversarial generator + PSAQ entropy)", None,
                    ["synthesizer=adversarial", "synthesizer.prior=auto"]),
    "fast_meta": ("data-free: teacher only (Fast-DFKD meta generator + PSAQ entropy)", None,
                  ["synthesizer=fast_meta", "synthesizer.prior=auto"]),
    # natural-image parametrisation (1/f^2 spectrum, desaturated colour, random-resized-crop views), cheaper
    # synthesis (10 iterations) and more student steps per synthetic batch (30)
    "spec_entropy": ("data-free: teacher only (PSAQ-ViT entropy, 1/f^2 spectrum images)", "vit_patch_entropy",
                     ["{SPEC}", "synthesizer.iterations=10", "distill.kd_steps=30"]),
    "spec_bootstrap": ("data-free: teacher only (bootstrapped token statistics + entropy, 1/f^2 spectrum images)",
                       "vit_bootstrap", ["{SPEC}", "synthesizer.iterations=10", "distill.kd_steps=30"]),
    # a hand-written image prior: dead-leaves images, labelled by the teacher as they are or as inversion's start
    "procedural": ("data-free: teacher only (procedural dead-leaves images, no optimisation)", None,
                   ["{PROC}", "distill.kd_steps=10"]),
    # dead leaves with colours pulled halfway to grey (the B2-real lever that moved the row; not the default)
    "procedural_sat": ("data-free: teacher only (procedural dead-leaves images, colour saturation 0.5, no optimisation)",
                       None, ["synthesizer=procedural", "synthesizer.pattern=dead_leaves", "synthesizer.saturation=0.5",
                              "distill.kd_steps=10"]),
    "dl_entropy": ("data-free: teacher only (PSAQ-ViT entropy, started from dead-leaves images)", "vit_patch_entropy",
                   ["{PIXEL}", "synthesizer.init=dead_leaves", "synthesizer.saturation=1.0", "synthesizer.iterations=10",
                    "distill.kd_steps=30"]),
    "real": ("ceiling (uses real train images)", None, ["synthesizer=real"]),
}
SPEC = ["synthesizer.spectrum_decay=2.0", "synthesizer.saturation=0.4", "synthesizer.lr=0.05",
        "synthesizer.crop_scale=0.4", "synthesizer.downsample=1"]
# the pixel parametrisation B2-real started from (PSAQ-ViT-like: optimise pixels, 20 Adam steps at lr 0.1)
PIXEL = ["synthesizer.batch_size=128", "synthesizer.iterations=20", "synthesizer.lr=0.1", "synthesizer.spectrum_decay=0",
         "synthesizer.saturation=1.0", "synthesizer.crop_scale=1.0", "synthesizer.downsample=1"]
# the procedural settings every procedural row was measured with (pinned, should the defaults move)
PROC = ["synthesizer=procedural", "synthesizer.pattern=dead_leaves", "synthesizer.saturation=1.0"]
_LISTS = {"{SPEC}": SPEC, "{PIXEL}": PIXEL, "{PROC}": PROC}
ROWS = {k: (kind, prior, [x for o in more for x in _LISTS.get(o, [o])]) for k, (kind, prior, more) in ROWS.items()}
FAST = ["synthesizer.iterations=10", "synthesizer.batch_size=64", "distill.kd_steps=60"]
# levers on the inversion settings (each one a row, the prior of the 'entropy' row unless named):
# label -> (kind, prior, overrides on top of synthesizer=deepinversion_vit_cifar)
LEVERS = {
    "e_plain": ("lever: entropy, no crop, full resolution", "vit_patch_entropy",
                ["synthesizer.crop_scale=1.0", "synthesizer.downsample=1"]),
    "e_crop": ("lever: entropy + random resized crop (full resolution)", "vit_patch_entropy",
               ["synthesizer.crop_scale=0.4", "synthesizer.downsample=1"]),
    "e_low": ("lever: entropy + 16x16 variable upsampled (no crop)", "vit_patch_entropy",
              ["synthesizer.crop_scale=1.0", "synthesizer.downsample=2"]),
    "e_low_crop": ("lever: entropy + 16x16 upsampled + crop", "vit_patch_entropy",
                   ["synthesizer.crop_scale=0.4", "synthesizer.downsample=2"]),
    "e_tv1": ("lever: entropy, tv 1.0", "vit_patch_entropy", ["synthesizer.tv=1.0"]),
    "e_it10": ("lever: entropy, 10 iterations per batch", "vit_patch_entropy", ["synthesizer.iterations=10"]),
    "e_it40": ("lever: entropy, 40 iterations per batch", "vit_patch_entropy", ["synthesizer.iterations=40"]),
    "e_kd40": ("lever: entropy, 40 KD steps per round", "vit_patch_entropy", ["distill.kd_steps=40"]),
    "e_kd5": ("lever: entropy, 5 KD steps per round", "vit_patch_entropy", ["distill.kd_steps=5"]),
    "e_cutmix": ("lever: entropy, student inputs mixed (mixup/CutMix alternating)", "vit_patch_entropy",
                 ["distill.mix=both"]),
    "boot_low_crop": ("lever: bootstrap + 16x16 upsampled + crop", "vit_bootstrap",
                      ["synthesizer.crop_scale=0.4", "synthesizer.downsample=2"]),
    "combo_low_crop": ("lever: bootstrap + heads + contrast, 16x16 upsampled + crop",
                       f"{FREE}(bootstrap=1, heads=1, contrast=1)",
                       ["synthesizer.crop_scale=0.4", "synthesizer.downsample=2"]),
    "ce_only": ("lever: no prior, default image settings", "none", []),
    # gentler pixel steps (lr 0.02: images stay unsaturated), smooth (16x16 upsampled) and crop-robust
    "g": ("lever: entropy, lr 0.02, 16x16 upsampled + crop", "vit_patch_entropy",
          ["synthesizer.lr=0.02", "synthesizer.crop_scale=0.4", "synthesizer.downsample=2"]),
    "g_kd60": ("lever: g + 60 KD steps per round", "vit_patch_entropy",
               ["synthesizer.lr=0.02", "synthesizer.crop_scale=0.4", "synthesizer.downsample=2", "distill.kd_steps=60"]),
    "g_kd60_mix": ("lever: g + 60 KD steps per round + mixup/CutMix", "vit_patch_entropy",
                   ["synthesizer.lr=0.02", "synthesizer.crop_scale=0.4", "synthesizer.downsample=2",
                    "distill.kd_steps=60", "distill.mix=both"]),
    "g_kd60_mix_b64": ("lever: g + 60 KD steps + mix, synthesis batches of 64", "vit_patch_entropy",
                       ["synthesizer.lr=0.02", "synthesizer.crop_scale=0.4", "synthesizer.downsample=2",
                        "distill.kd_steps=60", "distill.mix=both", "synthesizer.batch_size=64"]),
    # natural-image statistics without data: 1/f^2 spectrum parametrisation, desaturated colour, crops
    "s2": ("lever: entropy, 1/f^2 spectrum, saturation 0.4, crop", "vit_patch_entropy", [*SPEC]),
    "s2_kd60": ("lever: s2 + 60 KD steps per round", "vit_patch_entropy", [*SPEC, "distill.kd_steps=60"]),
    "s2_kd60_mix": ("lever: s2 + 60 KD steps + mixup/CutMix", "vit_patch_entropy",
                    [*SPEC, "distill.kd_steps=60", "distill.mix=both"]),
    "s2_none": ("lever: s2 without a prior", "none", [*SPEC]),
    "s2_boot": ("lever: s2 with bootstrapped token statistics", "vit_bootstrap", [*SPEC]),
    # cheaper synthesis, more student steps per synthetic image: 10 iterations, batches of 64, 60 KD steps
    "s2f": ("lever: s2 + 10 iterations, batches of 64, 60 KD steps", "vit_patch_entropy", [*SPEC, *FAST]),
    "s2f_mix": ("lever: s2f + mixup/CutMix", "vit_patch_entropy", [*SPEC, *FAST, "distill.mix=both"]),
    "s2f_none": ("lever: s2f without a prior", "none", [*SPEC, *FAST]),
    # the procedural row's levers: class-balanced most-confident picks from 4x candidates, no mixing of the
    # student inputs (mixup/CutMix is the default), KD steps per batch
    "p_os4": ("lever: procedural, class-balanced pick of 4x candidates", None,
              ["{PROC}", "distill.kd_steps=10", "synthesizer.oversample=4"]),
    "p_nomix": ("lever: procedural, no mixup/CutMix", None,
                ["{PROC}", "distill.kd_steps=10", "distill.mix=none"]),
    "p_kd20": ("lever: procedural, 20 KD steps per batch", None, ["{PROC}", "distill.kd_steps=20"]),
    "p_kd5": ("lever: procedural, 5 KD steps per batch", None, ["{PROC}", "distill.kd_steps=5"]),
    # richer procedural families and natural colour saturation
    "p_tex": ("lever: procedural, textured dead leaves (flat, striped or mottled shapes)", None,
              ["{PROC}", "distill.kd_steps=10", "synthesizer.pattern=textured_leaves"]),
    "p_mixed": ("lever: procedural, mixed families (dead leaves, textured, 1/f colour noise)", None,
                ["{PROC}", "distill.kd_steps=10", "synthesizer.pattern=mixed"]),
    "p_sat": ("lever: procedural, colour saturation 0.5", None,
              ["{PROC}", "distill.kd_steps=10", "synthesizer.saturation=0.5"]),
    "p_sat03": ("lever: procedural, colour saturation 0.3", None,
                ["{PROC}", "distill.kd_steps=10", "synthesizer.saturation=0.3"]),
    "p_mixsat03": ("lever: procedural, mixed families, colour saturation 0.3", None,
                   ["{PROC}", "distill.kd_steps=10", "synthesizer.pattern=mixed", "synthesizer.saturation=0.3"]),
    "p_mixsat": ("lever: procedural, mixed families, colour saturation 0.5", None,
                 ["{PROC}", "distill.kd_steps=10", "synthesizer.pattern=mixed",
                  "synthesizer.saturation=0.5"]),
    "pixf": ("lever: pixel parametrisation (lr 0.1, no crop) + 10 iterations, batches of 64, 60 KD steps",
             "vit_patch_entropy", [*FAST]),
}
LEVERS = {k: (kind, prior, [x for o in more for x in _LISTS.get(o, [o])]) for k, (kind, prior, more) in LEVERS.items()}
KINDS = {k: v[0] for k, v in {**ROWS, **LEVERS}.items()}
STUDENTS = {"vit": "vit_cifar_tiny", "vit_small": "vit_cifar_small", "vit_w64_d2": "vit_cifar_w64_d2",
            "resnet20": "resnet20_cifar"}


def redact_files(name: str, out: Path, cache: Path | None = None) -> None:
    """Replace this machine's output and cache folders in results/<name>.{json,md} with placeholders."""
    subs = [(str(out.resolve()), "results"), (str(out), "results")]
    cache = cache or Path(os.environ.get("DFKD_CACHE", Path(tempfile.gettempdir()) / "dfkd_bench_cache"))
    subs += [(str(cache.resolve()), "$DFKD_CACHE"), (str(cache), "$DFKD_CACHE")]
    for ext in ("json", "md"):
        f = out / f"{name}.{ext}"
        if f.is_file():
            text = f.read_text()
            for a, b in subs:
                if a not in (".", "/"):
                    text = text.replace(a, b)
            f.write_text(text)


def report(args, name: str, rows: list, teacher_top1: float, load0, started: float) -> str:
    """Write results/<name>.{json,md} from the rows so far (called after every row: a crash keeps them)."""
    import dfkd.bench as bench
    from dfkd.bench import write_results

    bench.KIND.update(KINDS)
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r["student_top1"])
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    free = {k: v for k, v in mean.items() if k in ROWS and k not in ("noise", "real", "no_prior")}
    best = max(free, key=free.get) if free else None
    extra_info = {
        "task": f"CIFAR-10, third-party ViT teacher (4x64, patch 4, 0.21 M params, not trained here; converted "
                f"from nn.MultiheadAttention to timm) -> student {STUDENTS[args.student]}",
        "scoring": f"seeded random subset of {args.test_limit or 10000} CIFAR-10 test images (data.test_limit, seed 0)",
        "budget_minutes_per_row": args.budget_minutes,
        "threads": args.threads,
        "loadavg_start_end": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "best_teacher_only_row": best,
        "best_teacher_only_over_ceiling": round(mean[best] / mean["real"], 4) if best and mean.get("real") else None,
        "entropy_only_over_ceiling": round(mean["entropy"] / mean["real"], 4) if "entropy" in mean and mean.get("real") else None,
        "note": "no row uses statistics recorded on real data; the ceiling row trains on real train images. "
                "Wall-clock budgets on a shared 2-core machine: noisy (load averages above).",
    }
    agree: dict[str, list[float]] = {}
    for r in rows:
        a = r.get("synthesis", {}).get("syn/teacher_acc")
        if a is not None:
            agree.setdefault(r["method"], []).append(a)
    extra_info["requested_class_agreement"] = {k: round(sum(v) / len(v), 4) for k, v in agree.items()}
    extra_info["rounds"] = {k: [r["rounds"] for r in rows if r["method"] == k] for k in by}
    reused = [Path(r["run_dir"]).name for r in rows if r.get("reused")]
    if reused:
        extra_info["reused_runs"] = reused
        extra_info["note"] += (" Runs marked in reused_runs were measured in an earlier sitting or by a process "
                               "running beside this one (--reuse); each run's own load average is in its summary.")
    _, m = write_results(name, f"B2-real — third-party CIFAR-10 ViT → {args.student}, CPU", args.out, rows,
                         teacher_top1, extra_info, started)
    text = Path(m).read_text()
    if agree:  # the requested-class agreement of every synthesizer row (the teacher on the un-augmented images)
        text += ("\nRequested-class agreement (teacher on the synthetic images, mean over rounds and seeds): "
                 + ", ".join(f"{k} {v}" for k, v in extra_info["requested_class_agreement"].items()) + "\n")
        Path(m).write_text(text)
    redact_files(name, args.out)
    return Path(m).read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=[r for r in ROWS if r not in ("adversarial", "fast_meta")],
                    choices=[*ROWS, *LEVERS])
    ap.add_argument("--name", default=None, help="results name (default b2_real_<student>)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--seeds-for", action="append", default=[], metavar="ROW=S[,S...]",
                    help="a row's own seeds (repeatable), e.g. --seeds-for noise=0 beside --seeds 0 1 2")
    ap.add_argument("--reuse", action="store_true",
                    help="take a row's run from <out>/<name>/runs/<row>_seed<s>/ when a finished run with the same "
                         "settings is there: a table measured in more than one sitting, or by two processes side "
                         "by side (give each its --rows, then run once more with every row and --reuse)")
    ap.add_argument("--student", choices=list(STUDENTS), default="vit")
    ap.add_argument("--budget-minutes", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--test-limit", type=int, default=2000, help="seeded random test subset (0: all 10,000)")
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = ap.parse_args()
    from dfkd.bench import ASHU_VIT, parse_seeds_for

    seeds_for = parse_seeds_for(args.seeds_for, args.rows, "bench_b2_real")

    if not args.data_root or not (Path(args.data_root) / ASHU_VIT).is_file():
        raise SystemExit(f"error: needs --data-root or DFKD_DATA with {ASHU_VIT} and cifar10/")
    os.environ.setdefault("DFKD_CACHE", str(Path(tempfile.gettempdir()) / "dfkd_bench_cache"))
    cache = Path(os.environ["DFKD_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(args.threads)
    from dfkd.bench import ashu_vit_teacher, compose, prepare_teacher, stored_run
    from dfkd.errors import DfkdError
    from dfkd.pipeline import run_distill

    started = time.perf_counter()
    load0 = os.getloadavg()
    ckpt = ashu_vit_teacher(args.data_root, cache)
    root = Path(args.data_root) / "cifar10"
    df = ["synthesizer=deepinversion_vit_cifar"]
    base = ["data=cifar10", f"data.root={root}", f"data.test_limit={args.test_limit or 'null'}",
            "teacher=timm", f"teacher.checkpoint={ckpt}", "teacher.model=null",
            f"student={STUDENTS[args.student]}", "loss=kd", "device=cpu", f"threads={args.threads}",
            f"distill.budget_minutes={args.budget_minutes}", "distill.rounds=100000", "distill.eval_every=0",
            "distill.checkpoint_every=0", "distill.batch_size=128", "distill.kd_steps=20", "distill.lr=1e-3",
            # the rate is set once per round and rounds are long on a CPU: no warm-up round at ~0
            "distill.warmup=0",
            "augment.crop_padding=4", "augment.flip=true"]
    t = prepare_teacher("distill", [*base, *args.overrides])
    teacher_top1 = t["teacher_top1"]
    print(f"teacher top-1 on the test subset: {teacher_top1:.4f}", flush=True)

    rows = []
    name = args.name or f"b2_real_{args.student}"
    for label in args.rows:
        kind, prior, more = {**ROWS, **LEVERS}[label]
        if prior is None:
            extra = list(more)
        elif prior == "none":
            extra = [*df, "synthesizer.bn=0", *more]
        else:
            extra = [*df, f"synthesizer.prior='{prior}'", *more]
        for seed in seeds_for.get(label, args.seeds):
            overrides = [*base, f"seed={seed}", "progress=false", "resume=false", *extra, *args.overrides]
            run_dir = args.out / name / "runs" / f"{label}_seed{seed}"
            s = stored_run(run_dir, overrides) if args.reuse else None
            if s is not None:
                print(f"{label:>10} seed {seed}: reused {run_dir}", flush=True)
                s.update(method=label, kind=kind, prior=prior)
                rows.append(s)
                continue
            try:
                s = run_distill(compose("distill", overrides), run_dir)
            except (DfkdError, Exception) as e:  # one failing row must not lose the others
                print(f"{label:>10} seed {seed}: error: {type(e).__name__}: {e}", flush=True)
                continue
            s.update(method=label, kind=kind, overrides=overrides, prior=prior)
            rows.append(s)
            agree = s.get("synthesis", {}).get("syn/teacher_acc")
            print(f"{label:>10} seed {seed}: student top-1 {s['student_top1']:.4f} ({s['distill_seconds']:.0f} s, "
                  f"{s['rounds']} rounds, synth {s['synth_images_per_second'] or 0:.0f} img/s, requested-class "
                  f"agreement {agree if agree is None else round(agree, 3)})", flush=True)
            report(args, name, rows, teacher_top1, load0, started)
    print(report(args, name, rows, teacher_top1, load0, started))



if __name__ == "__main__":
    main()
