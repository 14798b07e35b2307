"""Benchmark: images/s when loading a stored synthetic dataset vs reading the same images from PNG files.

    python scripts/bench_store_read.py                      # 20,000 images, 3x32x32, uint8
    python scripts/bench_store_read.py --num 5000 --size 8 --out results

Writes results/store_read.json and results/store_read.md (hardware, wall time, command).
Both paths end in the same place: a float [0, 1] NCHW tensor of every image with its label.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from dfkd.bench import hardware_line
    from dfkd.data.store import SyntheticStore, export_image_folder, read_image_folder, to_float
    from dfkd.models import build_model
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware
    from dfkd.teacher import Teacher
    from generators.baselines import NoiseSynthesizer
    from dfkd.data.store import StoreWriter, teacher_identity

    torch.manual_seed(0)
    c, s = args.channels, args.size
    teacher = Teacher(build_model("small_cnn", num_classes=10, in_chans=c, width=8), [0.5] * c, [0.25] * c,
                      (c, s, s), 10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = {"teacher": teacher_identity(teacher, "small_cnn"), "synthesizer": {"name": "noise", "config": {}},
                "seed": 0, "num_images": args.num, "shard_size": args.shard_size, "image_dtype": "uint8",
                "input_size": [c, s, s], "num_classes": 10, "class_names": [str(k) for k in range(10)],
                "dfkd_version": "bench"}
        w = StoreWriter(tmp / "store", spec)
        w.run(lambda seed: NoiseSynthesizer(teacher, batch_size=512, seed=seed), teacher, progress=False)
        store = SyntheticStore(tmp / "store")
        export_image_folder(store, tmp / "png", progress=False)

        def read_store():
            t = SyntheticStore(tmp / "store").load_all()  # checksums verified
            return to_float(t["images"]), t["labels"]

        def read_png():
            x, y, _, _ = read_image_folder(tmp / "png", (c, s, s))
            return to_float(x), y

        times = {}
        for name, fn in (("store", read_store), ("png", read_png)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                x, y = fn()
                best = min(best, time.perf_counter() - t0)
                assert len(x) == args.num
            times[name] = best
        store_bytes = sum(p.stat().st_size for p in (tmp / "store" / "shards").glob("*.safetensors"))
        png_bytes = sum(p.stat().st_size for p in (tmp / "png").rglob("*.png"))
    result = {
        "benchmark": "store_read",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "hardware": hardware(),
        "images": args.num, "image_shape": [c, s, s], "shard_size": args.shard_size, "repeats (best of)": args.repeats,
        "store_seconds": times["store"], "png_seconds": times["png"],
        "store_images_per_second": args.num / times["store"], "png_images_per_second": args.num / times["png"],
        "speedup": times["png"] / times["store"],
        "store_mib": store_bytes / 2**20, "png_mib": png_bytes / 2**20,
        "note": "store: safetensors shards incl. sha256 verification; png: PIL decode of class/xxxx.png files; "
                "both to one float [0,1] tensor. Noise images (PNG compresses natural images better).",
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    atomic_write_json(out / "store_read.json", result)
    hw = result["hardware"]
    md = [
        "# Reading a stored synthetic dataset vs PNG files",
        "",
        f"- command: `{result['command']}`",
        hardware_line(hw),
        f"- {args.num} images of {c}x{s}x{s} (uint8), best of {args.repeats}; total wall time {result['wall_seconds']:.0f} s",
        f"- {result['note']}",
        "",
        "| format | seconds | images/s | size (MiB) |",
        "|---|---|---|---|",
        f"| stored (safetensors shards) | {times['store']:.3f} | {result['store_images_per_second']:.0f} | {result['store_mib']:.1f} |",
        f"| PNG folder | {times['png']:.3f} | {result['png_images_per_second']:.0f} | {result['png_mib']:.1f} |",
        "",
        f"Speed-up: {result['speedup']:.1f}x",
    ]
    atomic_write_bytes(out / "store_read.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
