"""How torch's thread count holds up when another process shares the cores.

Times a fixed piece of the default job (DeepInversion steps on the digits teacher and student KD steps)
with 1, 2, ... threads, alone and next to one competing single-thread process (a busy loop of matrix
products, as another job on the machine would be), and writes ``results/<name>.{json,md}``.

    python scripts/bench_threads.py [--threads 1 2] [--repeats 3] [--name threads_cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _busy(stop) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = torch.tanh(a @ a) * 0.5


def _workload(threads: int) -> float:
    """Seconds for 20 inversion iterations on 64 images + 40 student KD steps (batch 128)."""
    import torch

    from dfkd.models import build_model
    from dfkd.teacher import Normalized, Teacher
    from generators import build_synthesizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # the default's teacher (configs/teacher/digits_cnn.yaml) and student (configs/student/digits_cnn.yaml)
    teacher = Teacher(build_model("small_cnn", in_chans=1, width=32, num_classes=10), [0.3], [0.4], (1, 8, 8), 10)
    student = Normalized(build_model("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                     embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, global_pool="avg",
                                     class_token=False), [0.3], [0.4], (1, 8, 8), 10)
    synth = build_synthesizer("deepinversion", teacher, batch_size=64, iterations=20)
    opt = torch.optim.AdamW(student.parameters(), 1e-3)
    t0 = time.perf_counter()
    x = synth.step().images
    for _ in range(40):
        xb = x[torch.randint(len(x), (128,))]
        with torch.no_grad():
            t = teacher(xb)
        loss = torch.nn.functional.kl_div(student(xb).log_softmax(1), t.softmax(1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="threads_cpu")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    from dfkd.bench import write_report
    from dfkd.pipeline import hardware

    load0 = os.getloadavg()
    rows = []
    ctx = mp.get_context("spawn")
    for competing in (False, True):
        stop, proc = None, None
        if competing:
            stop = ctx.Event()
            proc = ctx.Process(target=_busy, args=(stop,), daemon=True)
            proc.start()
            time.sleep(1.0)
        for n in args.threads:
            times = []
            for _ in range(args.repeats):
                with ctx.Pool(1) as pool:  # a fresh process per measurement: thread pools start clean
                    times.append(pool.apply(_workload, (n,)))
            rows.append({"threads": n, "competing_process": competing, "seconds_median": statistics.median(times),
                         "seconds": times})
        if proc is not None:
            stop.set()
            proc.join(5)
    alone = {r["threads"]: r["seconds_median"] for r in rows if not r["competing_process"]}
    for r in rows:
        r["slowdown_vs_alone_same_threads"] = r["seconds_median"] / alone[r["threads"]]
        r["slowdown_vs_best_alone"] = r["seconds_median"] / min(alone.values())
    busy = {r["threads"]: r["seconds_median"] for r in rows if r["competing_process"]}
    best_shared = min(busy, key=busy.get)
    payload = {"benchmark": "threads under a competing process", "command": "python scripts/bench_threads.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "hardware": hardware(), "rows": rows,
               "best_threads_alone": min(alone, key=alone.get), "best_threads_shared": best_shared,
               "load_average_start_end": [load0, os.getloadavg()], "repeats": args.repeats}
    md = ["# Thread count under a competing process (CPU)", "", f"`{payload['command']}` — {os.cpu_count()} cores; "
          "workload: 20 DeepInversion iterations on 64 digits images (the default width-32 teacher) + 40 KD steps of "
          "the default width-32, depth-2 ViT student; "
          f"median of {args.repeats} fresh processes.", "",
          "| threads | competing single-thread process | seconds (median) | slowdown vs. alone, same threads |",
          "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['threads']} | {'yes' if r['competing_process'] else 'no'} | {r['seconds_median']:.2f} | "
                  f"{r['slowdown_vs_alone_same_threads']:.2f}x |")
    md += ["", f"Fastest alone: {payload['best_threads_alone']} thread(s); fastest next to a competing process: "
           f"{best_shared} thread(s). Load average at start/end: {load0[0]:.2f} / {os.getloadavg()[0]:.2f}."]
    write_report(args.out, args.name, payload, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
