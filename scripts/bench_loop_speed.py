#!/usr/bin/env python
"""Training-loop speed of two versions of dfkd, side by side: the detection distillation loop
(``distill_detector``, box-noise source, the B4 student and KD settings) for a fixed number of student
steps, each revision extracted from git (``git archive``) and run in its own process at the same time,
so both see the same machine load. Writes results/<name>.{json,md}.

    python scripts/bench_loop_speed.py --teacher WORK/teacher_<key>.safetensors --revs REV_A REV_B --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(teacher_path: str, steps: int, threads: int) -> None:
    """Only the public API both versions share: load_detector, DetectionTeacher, build_detector, BoxNoise."""
    import torch

    torch.set_num_threads(threads)
    from dfkd.detection.models import DetectionTeacher, build_detector, load_detector
    from dfkd.detection.train import distill_detector
    from generators.box_inversion import BoxNoise

    teacher = DetectionTeacher(load_detector(teacher_path))
    torch.manual_seed(0)
    build = json.loads(Path(teacher_path).with_suffix(".json").read_text())
    student = build_detector("fcos", "small_cnn", num_classes=build["num_classes"], image_size=build["image_size"],
                             in_chans=build["in_chans"], mean=build["mean"], std=build["std"], width=16,
                             fpn_channels=16, head_convs=1)
    source = BoxNoise(teacher, batch_size=32, seed=0, score_thresh=0.45)
    t0 = time.perf_counter()
    out = distill_detector(teacher, student, source, steps=steps, batch_size=32, kd_steps_per_round=4, lr=5e-3,
                           class_kd=2.0, class_kd_temperature=2.0, score_thresh=0.45, progress=False)
    print(json.dumps({"steps": out["steps"], "wall_seconds": round(time.perf_counter() - t0, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="a saved dfkd detector (.safetensors + .json), e.g. the B4 teacher")
    ap.add_argument("--revs", nargs="+", default=["HEAD"], help="git revisions to compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--name", default="loop_speed_detection_cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.teacher or not Path(args.teacher).is_file():
        sys.exit(f"bench_loop_speed: error: --teacher must be a saved detector file, got {args.teacher!r}")
    if args.child:
        return child(args.teacher, args.steps, args.threads)

    from dfkd.bench import redact_paths
    from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json
    from dfkd.pipeline import hardware

    repo = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for rev in args.revs:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True,
                                    capture_output=True, text=True).stdout.strip()
            tree = Path(tmp) / commit
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--teacher", args.teacher,
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            procs[(rev, commit)] = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, text=True)
        rows = []
        for (rev, commit), p in procs.items():
            out, _ = p.communicate()
            if p.returncode:
                sys.exit(f"bench_loop_speed: error: revision {rev} ({commit}) failed with exit code {p.returncode}")
            r = json.loads(out.strip().splitlines()[-1])
            rows.append({"rev": rev, "commit": commit, **r, "steps_per_second": round(r["steps"] / r["wall_seconds"], 3)})
    hw = hardware()
    command = "python scripts/bench_loop_speed.py " + " ".join(
        ["--teacher", "$WORK/" + Path(args.teacher).name, "--revs", *args.revs, "--steps", str(args.steps),
         "--threads", str(args.threads)])
    payload = {"benchmark": args.name, "command": command, "hardware": hw, "wall_seconds": round(time.perf_counter() - started, 1),
               "loop": "distill_detector, box_noise source (batch 32, score >= 0.45), FCOS small_cnn width 16 FPN 16 "
                       "student, 4 KD steps per round, class KD 2 (T 2), AdamW lr 5e-3", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", redact_paths(payload))
    load = hw.get("load_average_1_5_15min")
    lines = [f"# Training-loop speed, side by side ({len(rows)} revisions at the same time)", "",
             f"- command: `{command}`",
             f"- hardware: CPU, {hw['cpu_count']} cores, torch {hw['torch']}, {args.threads} thread(s) per process, "
             f"{hw['platform']}" + (f"; load average {load[0]:g} / {load[1]:g} / {load[2]:g} at the end" if load else ""),
             f"- loop: {payload['loop']}; {args.steps} student steps; seed 0", "",
             "| revision | commit | steps | wall (s) | steps/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['rev']} | {r['commit']} | {r['steps']} | {r['wall_seconds']} | {r['steps_per_second']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(args.out / f"{args.name}.md", text.encode())
    print(text, end="")


if __name__ == "__main__":
    main()
