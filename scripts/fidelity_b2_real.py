#!/usr/bin/env python
"""Where does a distilled student agree with its teacher? B2-real's diagnostic for "what limits it".

For each finished run folder of ``bench_b2_real.py`` (``<out>/<name>/runs/<row>_seed<s>/``), the
student and the third-party CIFAR-10 ViT teacher are compared on three image sets of the same size:
the seeded CIFAR-10 test subset the benchmark scores on, dead-leaves images (the procedural row's
source) and Gaussian noise. Per set: top-1 agreement of student and teacher, and the mean KL(teacher ‖
student) of their softmax outputs; on the test set also each one's top-1 against the labels. A student
that matches its teacher on the images it was taught on but not on real images is limited by how far
those images are from real ones, not by the distillation. Writes results/<name>.{json,md}.

    DFKD_DATA=PATH python scripts/fidelity_b2_real.py \
        --runs results/b2_real_w64_d2_10min/runs/procedural_seed0 results/b2_real_w64_d2_10min/runs/real_seed0
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="finished bench_b2_real run folders")
    ap.add_argument("--data-root", default=os.environ.get("DFKD_DATA"))
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="b2_real_fidelity")
    args = ap.parse_args(argv)

    from dfkd.bench import ASHU_VIT, ashu_vit_teacher, write_report
    from dfkd.errors import DfkdError

    if not args.data_root or not (Path(args.data_root) / ASHU_VIT).is_file():
        print(f"error: needs --data-root or DFKD_DATA with {ASHU_VIT} and cifar10/", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from dfkd.data import load_cifar10
    from dfkd.load import load_model, load_student
    from generators.procedural import dead_leaves

    started = time.perf_counter()
    try:
        cache = Path(os.environ.get("DFKD_CACHE", Path(tempfile.gettempdir()) / "dfkd_bench_cache"))
        cache.mkdir(parents=True, exist_ok=True)
        teacher = load_model(ashu_vit_teacher(args.data_root, cache))
        students = {p.name: load_student(p) for p in args.runs}
    except DfkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = load_cifar10(Path(args.data_root) / "cifar10", train=False, test_limit=args.test_limit, seed=0)
    real, labels = data.test.take(torch.arange(len(data.test)))
    g = torch.Generator().manual_seed(args.seed)
    n, size = len(real), tuple(real.shape[-2:])
    sets = {"cifar10_test": real, "dead_leaves": dead_leaves(n, 3, size, g),
            "noise": (0.5 + 0.25 * torch.randn(n, 3, *size, generator=g)).clamp(0, 1)}

    @torch.no_grad()
    def logits(model, x):
        return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])

    t_out = {k: logits(teacher, x) for k, x in sets.items()}
    teacher_top1 = float((t_out["cifar10_test"].argmax(1) == labels).float().mean())
    rows = []
    for run, student in students.items():
        row = {"run": run}
        for k, x in sets.items():
            s, t = logits(student, x), t_out[k]
            row[f"{k}/agreement"] = round(float((s.argmax(1) == t.argmax(1)).float().mean()), 4)
            kl = torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
            row[f"{k}/kl"] = round(float(kl), 4)
            if k == "cifar10_test":
                row["student_top1"] = round(float((s.argmax(1) == labels).float().mean()), 4)
        rows.append(row)
    payload = {
        "command": "python scripts/fidelity_b2_real.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "hardware": f"CPU, {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} threads), "
                    f"{platform.platform()}",
        "images_per_set": n, "teacher_top1": round(teacher_top1, 4), "rows": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "note": "agreement: share of images where student and teacher take the same arg-max; kl: mean "
                "KL(teacher || student) of their softmax outputs (temperature 1). Dead leaves (at full colour, saturation 1) and noise are "
                f"drawn with seed {args.seed}; the test set is the benchmark's seeded subset (seed 0).",
    }
    md = ["# B2-real fidelity: where each student agrees with the teacher", "",
          f"- command: `{payload['command']}`", f"- hardware: {payload['hardware']}",
          f"- {n} images per set; teacher top-1 on the test subset {teacher_top1:.4f}; wall time "
          f"{payload['wall_seconds']} s", f"- {payload['note']}", "",
          "| run | student top-1 | agreement: test | agreement: dead leaves | agreement: noise "
          "| KL: test | KL: dead leaves | KL: noise |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['run']} | {r['student_top1']:.4f} | {r['cifar10_test/agreement']:.4f} "
                  f"| {r['dead_leaves/agreement']:.4f} | {r['noise/agreement']:.4f} | {r['cifar10_test/kl']:.4f} "
                  f"| {r['dead_leaves/kl']:.4f} | {r['noise/kl']:.4f} |")
    write_report(args.out, args.name, payload, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
