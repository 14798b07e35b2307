"""The 224-px preset on the CPU: does a DeiT-Tiny-sized teacher with a 4,000-image pool fit?

Builds a timm ``deit_tiny_patch16_224`` teacher with random weights (saved as a timm training
checkpoint), runs ``experiment=timm_224_cpu_smoke`` (2 rounds, host-side uint8 pool of 4,000 images)
through ``dfkd.pipeline.run_distill``, and writes peak host memory (RSS), the pool's size and the
checkpoint size to ``results/<name>.{json,md}``.

    python scripts/bench_224_memory.py [--pool 4000] [--threads N] [--name timm_224_cpu_smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=4000)
    ap.add_argument("--memory", default="auto", choices=["auto", "host", "device"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="timm_224_cpu_smoke")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    import argparse as _ap

    import timm
    import torch
    from hydra import compose, initialize_config_dir

    from dfkd.bench import write_report
    from dfkd.pipeline import hardware
    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs
    from dfkd.pipeline import run_distill

    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        teacher = timm.create_model("deit_tiny_patch16_224", pretrained=False)
        ckpt = tmp / "model_best.pth.tar"
        torch.save({"state_dict": teacher.state_dict(), "arch": "deit_tiny_patch16_224",
                    "args": _ap.Namespace(model="deit_tiny_patch16_224", num_classes=1000)}, ckpt)
        register_configs()
        overrides = ["experiment=timm_224_cpu_smoke", "teacher.model=deit_tiny_patch16_224",
                     f"teacher.checkpoint={ckpt}", f"distill.pool_size={args.pool}", f"distill.memory={args.memory}",
                     "progress=false", *( [f"threads={args.threads}"] if args.threads else [])]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("distill", overrides=overrides)
        t0 = time.perf_counter()
        s = run_distill(cfg, tmp / "run")
        wall = time.perf_counter() - t0
    c, h, w = s["teacher_spec"]["input_size"]
    per_image = c * h * w * (1 if args.memory != "device" else 2)
    row = {"teacher": "deit_tiny_patch16_224 (random weights)", "teacher_params": s["teacher_params"],
           "student_params": s["student_params"], "student_model": s["student_model"],
           "pool_images": args.pool, "pool_storage": args.memory,
           "pool_mb": args.pool * per_image / 2**20, "peak_rss_mb": s["peak_host_memory_mb"],
           "checkpoint_mb": s["checkpoint_mb"], "rounds": s["rounds"], "wall_seconds": wall,
           "synth_images_per_second": s["synth_images_per_second"]}
    target = 4096.0
    payload = {"benchmark": "224-px preset on the CPU (memory)", "command": "python scripts/bench_224_memory.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "overrides": [o for o in overrides if not o.startswith("teacher.checkpoint")],
               "rows": [row], "target": {"peak_rss_mb_below": target, "met": row["peak_rss_mb"] < target},
               "load_average_start_end": [load0, os.getloadavg()]}
    md = ["# 224-px preset on the CPU: memory", "",
          f"`{payload['command']}` — `experiment=timm_224_cpu_smoke`, {s['rounds']} rounds, teacher "
          "`deit_tiny_patch16_224` with random weights (a timm training checkpoint), data=none.", "",
          "| teacher params | student | pool | pool storage | pool MB | peak RSS MB | checkpoint MB | wall s |",
          "|---|---|---|---|---|---|---|---|",
          f"| {row['teacher_params']:,} | {row['student_model']} ({row['student_params']:,}) | {args.pool:,} | "
          f"{args.memory} | {row['pool_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['checkpoint_mb']:.1f} | {wall:.0f} |",
          "", f"Target: peak RSS under {target:.0f} MB — {'met' if payload['target']['met'] else 'NOT met'}. "
          "The pool is allocated (and zero-filled) in full at the first round, so its memory counts from the start. "
          f"Load average at start/end: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} (other work shared the machine)."]
    payload["hardware"] = hardware()
    write_report(args.out, args.name, payload, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
