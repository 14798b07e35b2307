#!/usr/bin/env python
"""Requested-class agreement of the generator synthesizers on the pretrained CIFAR-10 ResNet-56.

Each row alternates synthesizer rounds with a few KD steps of a freshly initialised ResNet-20 student
on the round's batch (the start of a distillation run, where an unbounded adversarial KL runs away),
and records per round the fraction of the un-augmented images the teacher assigns to the requested
class (``syn/teacher_acc``), the class entropy and the adversarial term.

    DFKD_DATA=PATH python scripts/bench_generator_agreement.py --rounds 15 --batch 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROWS = {
    "adversarial_kl": ("adversarial", dict(adv_loss="kl")),
    "adversarial_bounded": ("adversarial", dict(adv_loss="js", adv_mask=True, adv_gate=0.5)),
    "fast_meta_kl": ("fast_meta", dict(adv_loss="kl")),
    "fast_meta_bounded": ("fast_meta", dict(adv_loss="js", adv_mask=True, adv_gate=0.5)),
    "fast_meta_bounded_bn1_g4": ("fast_meta", dict(adv_loss="js", adv_mask=True, adv_gate=0.5, bn=1.0, g_steps=4)),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kd-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="generator_agreement_resnet56_cpu")
    args = ap.parse_args(argv)
    root = Path(args.data_root) if args.data_root else None
    ckpt = root / "teachers/resnet_cifar10/resnet56-4bfd9763.th" if root else None
    if ckpt is None or not ckpt.is_file():
        sys.exit("bench_generator_agreement: error: set --data-root or DFKD_DATA to the folder with teachers/")
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        sys.exit(f"bench_generator_agreement: error: unknown row(s) {bad}; known: {', '.join(ROWS)}")

    import torch

    from dfkd.losses import kd_loss
    from dfkd.models import build_model
    from dfkd.teacher import Normalized, Teacher
    from generators.base import build_synthesizer

    torch.set_num_threads(args.threads)
    load_start, started = os.getloadavg(), time.perf_counter()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    teacher = Teacher(build_model("resnet56_cifar", num_classes=10, checkpoint=str(ckpt)), mean, std, (3, 32, 32), 10)
    results = []
    for row in args.rows:
        option, kw = ROWS[row]
        torch.manual_seed(args.seed)
        student = Normalized(build_model("resnet20_cifar", num_classes=10), mean, std, (3, 32, 32), 10)
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        syn = build_synthesizer(option, teacher, batch_size=args.batch, seed=args.seed, **kw)
        per_round, t0 = [], time.perf_counter()
        for r in range(args.rounds):
            batch = syn.step(student)
            student.train()
            for _ in range(args.kd_steps):
                loss = kd_loss(student(batch.images), batch.teacher_logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            per_round.append({k: round(float(v), 4) for k, v in batch.stats.items()})
            print(row, r, per_round[-1], flush=True)
        accs = [p["syn/teacher_acc"] for p in per_round]
        results.append({"row": row, "synthesizer": option, "settings": kw, "seconds": time.perf_counter() - t0,
                        "agreement_first3": sum(accs[:3]) / 3, "agreement_last5": sum(accs[-5:]) / 5,
                        "adv_min": min(p.get("syn/adv", 0.0) for p in per_round), "per_round": per_round})
    command = "python scripts/bench_generator_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"benchmark": "generator requested-class agreement, $DFKD_DATA/teachers/resnet_cifar10/resnet56-4bfd9763.th, "
                        "fresh ResNet-20 student", "command": command.replace(str(root), "$DFKD_DATA"),
           "hardware": f"CPU, {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} thread(s)), "
                       f"{platform.platform()}",
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "seed": args.seed, "rounds": args.rounds,
           "batch": args.batch, "kd_steps_per_round": args.kd_steps, "total_seconds": time.perf_counter() - started,
           "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = ["# Generator requested-class agreement — ResNet-56 teacher, fresh ResNet-20 student", "",
             f"- command: `{out['command']}`", f"- hardware: {out['hardware']}",
             f"- seed {args.seed}; {args.rounds} rounds of batch {args.batch}, {args.kd_steps} KD steps per round; "
             f"total {out['total_seconds']:.0f} s; load average {load_start[0]:.1f} → {out['loadavg_end'][0]:.1f} "
             "(shared machine: times are noisy)", "- chance agreement 0.100", "",
             "| row | settings | agreement, rounds 1–3 | agreement, last 5 rounds | most negative adversarial term | seconds |",
             "|---|---|---|---|---|---|"]
    for r in results:
        sets = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"| {r['row']} | {r['synthesizer']}: {sets} | {r['agreement_first3']:.3f} | "
                     f"{r['agreement_last5']:.3f} | {r['adv_min']:.2f} | {r['seconds']:.0f} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
