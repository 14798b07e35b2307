#!/usr/bin/env python
"""Where the CPU time of one B1 round goes: ResNet-56 teacher (pretrained), ResNet-20 student.

Times each piece of a generator round and of the student's KD steps at the B1 CPU settings, by
itself, with the same models the benchmark builds (median of ``--repeats`` after one warm-up call):

- the teacher forward (no grad) and forward+backward to the input (with the BatchNorm prior),
- the generator forward and forward+backward for each ``--ngf``,
- one whole synthesizer step (``fast_meta`` and ``adversarial``, their configs plus ``--synth-overrides``),
- one KD step of the student on a batch from memory (augmentation, mixing, the live teacher forward,
  the student forward+backward) and the same step with the stored teacher logits (no teacher).

Writes results/<name>.{json,md} with images/s for each piece.

    DFKD_DATA=PATH python scripts/profile_b1_round.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive caches)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64, help="synthesis batch")
    ap.add_argument("--kd-batch", type=int, default=128)
    ap.add_argument("--ngf", nargs="+", type=int, default=[64, 32, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="b1_round_profile_cpu")
    ap.add_argument("--synth-overrides", nargs="*", default=[])
    args = ap.parse_args(argv)
    if not args.data_root or not Path(args.data_root).is_dir():
        sys.exit("profile_b1_round: error: set --data-root or DFKD_DATA to the folder with cifar10/ and teachers/")

    import torch

    from dfkd.augment import build_augment
    from dfkd.bench import compose, hardware_line, redact_paths
    from dfkd.distill import Distiller, DistillSettings
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import (_plain, build_student, build_synthesizer_from_cfg, build_teacher, hardware,
                               load_data, setup_runtime)
    from generators.nets import Generator

    started = time.perf_counter()
    load_start = os.getloadavg()
    root = Path(args.data_root)
    common = ["experiment=cifar10_resnet56_resnet20", "student=resnet20_cifar", f"data.root={root}",
              f"teacher.checkpoint={root / 'teachers/resnet_cifar10/resnet56-4bfd9763.th'}", "device=cpu",
              f"threads={args.threads}", "data.test_limit=100", f"synthesizer.batch_size={args.batch}",
              f"distill.batch_size={args.kd_batch}", "distill.kd_steps=10"]
    cfg = compose("distill", ["synthesizer=fast_meta", *common, *args.synth_overrides])
    device = setup_runtime(cfg)
    data = load_data(cfg.data, train=False)
    teacher = build_teacher(cfg.teacher, data, device, seed=0, progress=False)
    torch.manual_seed(0)
    student, _ = build_student(cfg.student, teacher.spec)
    rows: list[dict] = []

    def add(piece: str, seconds: float, images: int, note: str = "") -> None:
        rows.append({"piece": piece, "seconds": seconds, "images": images, "images_per_second": images / seconds,
                     "note": note})
        print(f"{piece:<48} {seconds * 1000:8.1f} ms  {images / seconds:8.1f} img/s  {note}", flush=True)

    B, K = args.batch, args.kd_batch
    x = torch.rand(B, 3, 32, 32)
    with torch.no_grad():
        add("teacher forward, no grad", timed(lambda: teacher(x), args.repeats), B)

    def t_fb():
        xi = x.clone().requires_grad_(True)
        with teacher.statistics("batchnorm") as prior:
            loss = teacher(xi).logsumexp(1).mean() + prior.loss()
            loss.backward(inputs=[xi])
    add("teacher forward+backward to the input, BN prior", timed(t_fb, args.repeats), B)

    def s_f():
        with torch.no_grad():
            student.eval()(x)
    add("student forward, no grad (adversarial term)", timed(s_f, args.repeats), B)
    for ngf in args.ngf:
        g = Generator(256, ngf, 32, 3, 10)
        z, y = torch.randn(B, 256), torch.randint(10, (B,))
        with torch.no_grad():
            add(f"generator ngf {ngf} forward (sampling)", timed(lambda: g(z, y), args.repeats), B,
                f"{sum(p.numel() for p in g.parameters()):,} params")

        def g_fb(g=g, z=z, y=y):
            g(z, y).mean().backward()
        add(f"generator ngf {ngf} forward+backward", timed(g_fb, args.repeats), B)

    for option in ("fast_meta", "adversarial"):
        scfg = compose("distill", [f"synthesizer={option}", *common, *args.synth_overrides]).synthesizer
        synth = build_synthesizer_from_cfg(scfg, teacher, data, 0, device)
        sec = timed(lambda: synth.step(student), args.repeats)
        add(f"{option} step (g_steps {synth.g_steps}, ngf {scfg.ngf})", sec, B,
            f"{sec / synth.g_steps * 1000:.0f} ms per g-step")

    # the KD step exactly as the Distiller runs it (augment + mix + live teacher + student fwd/bwd)
    for logits in ("live", "stored"):
        settings = DistillSettings(**{**_plain(cfg.distill), "teacher_logits": logits, "budget_minutes": None})
        aug = build_augment(teacher.spec.input_size, **_plain(cfg.augment))
        d = Distiller(teacher, student, synth, settings, None, augment=aug, device=device, progress=False)
        imgs = torch.rand(K, 3, 32, 32)
        with torch.no_grad():
            tl = teacher(imgs)
        student.train()
        d.engine.set_lr()
        add(f"KD step, teacher logits {logits} (mix {settings.mix})",
            timed(lambda: d.train_student_step(imgs, tl), args.repeats), K)

    # the same KD step and teacher pass with every model in channels-last memory format (distill.channels_last)
    student.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    settings = DistillSettings(**{**_plain(cfg.distill), "channels_last": True, "budget_minutes": None})
    d = Distiller(teacher, student, synth, settings, None, augment=aug, device=device, progress=False)
    d.engine.set_lr()
    add("KD step, teacher logits live, channels-last", timed(lambda: d.train_student_step(imgs, tl), args.repeats), K)
    add("teacher forward+backward to the input, BN prior, channels-last", timed(t_fb, args.repeats), B)

    payload = {"benchmark": args.name, "command": " ".join(["python", *sys.argv]), "hardware": hardware(),
               "wall_seconds": time.perf_counter() - started, "batch": B, "kd_batch": K, "threads": args.threads,
               "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
               "synth_overrides": args.synth_overrides, "rows": rows}
    payload = redact_paths(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", payload)
    md = ["# Where a B1 CPU round's time goes — ResNet-56 teacher, ResNet-20 student", "",
          f"- command: `{payload['command']}`", hardware_line(payload["hardware"]),
          f"- synthesis batch {B}, KD batch {K}; median of {args.repeats} calls after one warm-up; "
          f"total {payload['wall_seconds']:.0f} s; load average {load_start[0]:.1f} → {os.getloadavg()[0]:.1f} "
          "(shared machine: times are noisy)", "",
          "| piece | ms per call | images/s | note |", "|---|---|---|---|"]
    md += [f"| {r['piece']} | {r['seconds'] * 1000:.1f} | {r['images_per_second']:.1f} | {r['note']} |" for r in rows]
    atomic_write_bytes(args.out / f"{args.name}.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))


if __name__ == "__main__":
    main()
