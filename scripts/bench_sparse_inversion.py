#!/usr/bin/env python
"""Sparse inversion (SMI-style patch dropping) against dense inversion: synthesized images per second.

The third-party CIFAR-10 ViT of B2-real (``$DFKD_DATA/teachers/vit_cifar10_ashu``, converted to timm's
layout) is inverted with the B2-real inversion settings (configs/synthesizer/deepinversion_vit_cifar.yaml,
prior vit_patch_entropy) at several ``sparse_keep`` fractions. Settings are interleaved repeat by repeat
(so machine load hits them alike) and the median images/s per setting is reported, with the teacher's
requested-class agreement on the finished images. Writes results/sparse_inversion_vit_cifar_cpu.{json,md}.

    DFKD_DATA=PATH python scripts/bench_sparse_inversion.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("overrides", nargs="*", help="synthesizer settings, key=value (e.g. iterations=40)")
    args = ap.parse_args()
    if not args.data_root:
        raise SystemExit("error: needs --data-root or DFKD_DATA")
    os.environ.setdefault("DFKD_CACHE", str(Path(tempfile.gettempdir()) / "dfkd_bench_cache"))
    cache = Path(os.environ["DFKD_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from dfkd.bench import ashu_vit_teacher, prepare_teacher
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware
    from generators import build_synthesizer

    started = time.perf_counter()
    ckpt = ashu_vit_teacher(args.data_root, cache)
    t = prepare_teacher("distill", ["data=cifar10", f"data.root={Path(args.data_root) / 'cifar10'}",
                                    "data.test_limit=500", "teacher=timm", f"teacher.checkpoint={ckpt}",
                                    "teacher.model=null", "device=cpu", f"threads={args.threads}",
                                    "synthesizer=deepinversion_vit_cifar"], train_split=False)
    cfg, teacher = t["cfg"], t["teacher"]
    syn_cfg = {k: v for k, v in dict(cfg.synthesizer).items() if k not in ("name", "defaults")}
    syn_cfg["prior"] = "vit_patch_entropy"
    for o in args.overrides:
        k, _, v = o.partition("=")
        syn_cfg[k] = yaml.safe_load(v)
    syn_cfg = {k: (list(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for k, v in syn_cfg.items()}
    speeds: dict[float, list[float]] = {k: [] for k in args.keep}
    agree: dict[float, list[float]] = {k: [] for k in args.keep}
    synths = {k: build_synthesizer("deepinversion", teacher, seed=0, device="cpu", **{**syn_cfg, "sparse_keep": k})
              for k in args.keep}
    for rep in range(args.repeats + 1):  # the first repeat warms up and is not counted
        for k, syn in synths.items():
            t0 = time.perf_counter()
            b = syn.step()
            dt = time.perf_counter() - t0
            if rep:
                speeds[k].append(len(b.images) / dt)
                agree[k].append(b.stats["syn/teacher_acc"])
                print(f"keep {k}: {speeds[k][-1]:.1f} images/s, agreement {agree[k][-1]:.3f}", flush=True)
    dense = statistics.median(speeds[1.0]) if 1.0 in speeds else None
    rows = [{"sparse_keep": k, "images_per_second_median": statistics.median(v), "images_per_second": v,
             "speedup_over_dense": statistics.median(v) / dense if dense else None,
             "requested_class_agreement": statistics.mean(agree[k])} for k, v in speeds.items()]
    result = {"benchmark": "sparse_inversion_vit_cifar_cpu", "command": " ".join(["python", *sys.argv]),
              "hardware": hardware(), "threads": args.threads, "synthesizer": syn_cfg,
              "loadavg_end": list(os.getloadavg()), "wall_seconds": time.perf_counter() - started, "rows": rows}
    from dfkd.bench import hardware_line, redact_paths

    result = redact_paths(result)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "sparse_inversion_vit_cifar_cpu.json", result)
    lines = ["# Sparse inversion (SMI-style patch dropping) — third-party CIFAR-10 ViT, CPU", "",
             f"- command: `{result['command']}`", hardware_line(result["hardware"]),
             f"- inversion: batch {syn_cfg['batch_size']}, {syn_cfg['iterations']} iterations, drops at "
             f"{syn_cfg.get('sparse_at')} of the run, prior vit_patch_entropy; {args.repeats} interleaved repeats "
             f"(median), load average at the end {result['loadavg_end'][0]:.2f}", "",
             "| sparse_keep | images/s (median) | speed-up | requested-class agreement |", "|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_over_dense']:.2f}x" if r["speedup_over_dense"] else "—"
        lines.append(f"| {r['sparse_keep']} | {r['images_per_second_median']:.1f} | {sp} | "
                     f"{r['requested_class_agreement']:.3f} |")
    atomic_write_bytes(args.out / "sparse_inversion_vit_cifar_cpu.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
