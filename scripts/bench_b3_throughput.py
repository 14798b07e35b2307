#!/usr/bin/env python
"""B3: synthesis speed against the hardware limit.

Every DeepInversion iteration costs at least one teacher forward and backward (to the pixels) on
the batch. This measures, on the same batch and device:
  - the limit: bare teacher forward + backward to the input, images/s;
  - DeepInversion: image-iterations/s with everything on (statistics hooks, priors, jitter, Adam);
  - the generator methods: images/s delivered per round (their cost includes the student).
Writes results/b3_throughput_<teacher>.{json,md}.

    python scripts/bench_b3_throughput.py                       # digits CNN teacher on the CPU
    python scripts/bench_b3_throughput.py --teacher resnet56 --data-root PATH --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def measure_variants(teacher, student, b, device, iters, timed, sync) -> list[dict]:
    """Teacher limit and DeepInversion in channels-last; the student's KD step eager, channels-last and
    compiled. Each variant is timed on the same batch after warm-up (compilation excluded)."""
    import copy

    from dfkd.losses import kd_loss
    from generators import build_synthesizer

    rows = []
    x = torch.rand(b, *teacher.input_size, device=device)

    def kd_step_fn(model, opt, channels_last):
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def step():
            with torch.no_grad():
                t = teacher(xin)
            loss = kd_loss(model(xin), t, 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    base = None
    for label, cl, comp in (("eager", False, False), ("channels-last", True, False), ("torch.compile", False, True)):
        s = copy.deepcopy(student).to(device).train()
        if cl:
            s.to(memory_format=torch.channels_last)
            teacher.to(memory_format=torch.channels_last)
        model = torch.compile(s) if comp else s
        opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
        t_step = timed(kd_step_fn(model, opt, cl), device, 3 if comp else 2, iters)
        base = base or t_step
        rows.append({"what": f"student KD step, {label}", "images_per_s": b / t_step,
                     "fraction_of_limit": None, "speedup_vs_eager": base / t_step})
        if cl:
            def bare():
                xi = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
                teacher(xi).float().logsumexp(1).sum().backward(inputs=[xi])
            t_lim = timed(bare, device, 3, iters)
            di = build_synthesizer("deepinversion", teacher, batch_size=b, iterations=iters, device=device,
                                   jitter=2, flip=True)
            di.step()
            sync(device)
            t0 = time.perf_counter()
            di.step()
            sync(device)
            t_di = (time.perf_counter() - t0) / iters
            rows.append({"what": "teacher forward+backward, channels-last", "images_per_s": b / t_lim,
                         "fraction_of_limit": None})
            rows.append({"what": "DeepInversion iteration, channels-last teacher", "images_per_s": b / t_di,
                         "fraction_of_limit": t_lim / t_di})
            teacher.to(memory_format=torch.contiguous_format)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=["digits_cnn", "resnet56"], default="digits_cnn")
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--variants", action="store_true",
                    help="also measure channels-last and torch.compile (distill.channels_last / distill.compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dfkd.bench import compose
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import build_teacher, hardware, load_data, setup_runtime
    from generators import build_synthesizer

    started = time.perf_counter()
    if args.teacher == "digits_cnn":
        cfg = compose("distill", [f"device={args.device}", f"threads={args.threads}"])
    else:
        if not args.data_root:
            sys.exit("bench_b3_throughput: error: --data-root (or DFKD_DATA) is needed for the resnet56 teacher")
        cfg = compose("distill", ["experiment=cifar10_resnet56_resnet20", f"data.root={args.data_root}",
                                  f"teacher.checkpoint={Path(args.data_root) / 'teachers/resnet_cifar10/resnet56-4bfd9763.th'}",
                                  f"device={args.device}"])
    device = setup_runtime(cfg)
    data = load_data(cfg.data, train=args.teacher == "digits_cnn")
    teacher = build_teacher(cfg.teacher, data, device, progress=False)
    b = args.batch
    x = torch.rand(b, *teacher.input_size, device=device)

    def bare():
        xi = x.clone().requires_grad_(True)
        teacher(xi).float().logsumexp(1).sum().backward(inputs=[xi])

    t_limit = timed(bare, device, 3, args.iters)
    rows = [{"what": "teacher forward+backward (limit)", "images_per_s": b / t_limit, "fraction_of_limit": 1.0}]

    n_it = args.iters
    di = build_synthesizer("deepinversion", teacher, batch_size=b, iterations=n_it, device=device, jitter=2, flip=True)
    di.step()  # warm-up
    _sync(device)
    t = time.perf_counter()
    di.step()
    _sync(device)
    t_di = (time.perf_counter() - t) / n_it
    rows.append({"what": "DeepInversion iteration (hooks + priors + jitter + Adam)", "images_per_s": b / t_di,
                 "fraction_of_limit": t_limit / t_di})

    from dfkd.pipeline import build_student

    student, _ = build_student(cfg.student, data, teacher.metadata()["mean"], teacher.metadata()["std"])
    student.to(device)
    for name, kw in (("adversarial", {"g_steps": 1}), ("fast_meta", {"g_steps": 2})):
        syn = build_synthesizer(name, teacher, batch_size=b, device=device, **kw)
        step_t = timed(lambda: syn.step(student), device, 1, max(2, args.iters // 5))
        rows.append({"what": f"{name} round ({kw['g_steps']} generator step(s), incl. student)",
                     "images_per_s": b / step_t, "fraction_of_limit": None})

    if args.variants:
        rows += measure_variants(teacher, student, b, device, args.iters, timed, _sync)

    hw = hardware()
    result = {"benchmark": "b3_throughput", "teacher": args.teacher, "batch": b, "device": str(device),
              "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]), "hardware": hw,
              "wall_seconds": time.perf_counter() - started, "seeds": [0], "rows": rows}
    name = f"b3_throughput_{args.teacher}_{device.type}"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{name}.json", result)
    lines = [f"# B3 — synthesis throughput, {args.teacher} teacher, batch {b}, {device.type}", "",
             f"- command: `{result['command']}`",
             f"- hardware: {hw.get('gpu') or 'CPU'}, {hw['cpu_count']} cores, torch {hw['torch']} "
             f"({hw['cpu_threads']} threads)",
             f"- wall time {result['wall_seconds']:.0f} s", "",
             "| what | images/s | fraction of limit | speed-up vs eager |", "|---|---|---|---|"]
    for r in rows:
        frac = f"{r['fraction_of_limit']:.2f}" if r["fraction_of_limit"] is not None else "—"
        sp = f"{r['speedup_vs_eager']:.2f}" if r.get("speedup_vs_eager") is not None else "—"
        lines.append(f"| {r['what']} | {r['images_per_s']:.0f} | {frac} | {sp} |")
    atomic_write_bytes(args.out / f"{name}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
