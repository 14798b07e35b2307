"""Side-by-side benchmark harness: the same teacher, student and budget for every method, one run.

Rows: teacher, noise-KD floor, each data-free method, real-data-KD ceiling. Writes a JSON file and a
Markdown table with the hardware, wall times, seeds and the exact command.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from dfkd.models.checkpoint import atomic_write_bytes, atomic_write_json

KIND = {"noise": "floor (not data-free)", "real": "ceiling (uses real train images)"}


def compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose as _compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return _compose(config_name=config_name, overrides=list(overrides))


def run_methods(methods: Sequence[str], common: Sequence[str], per_method: dict[str, Sequence[str]],
                seeds: Sequence[int], out_dir: Path) -> list[dict[str, Any]]:
    from dfkd.pipeline import run_distill

    rows = []
    for method in methods:
        for seed in seeds:
            overrides = [f"synthesizer={method}", f"seed={seed}", "progress=false", "resume=false",
                         *common, *per_method.get(method, [])]
            cfg = compose("distill", overrides)
            run_dir = out_dir / "runs" / f"{method}_seed{seed}"
            t0 = time.perf_counter()
            summary = run_distill(cfg, run_dir)
            summary["method"] = method
            summary["overrides"] = overrides
            summary["process_seconds"] = time.perf_counter() - t0
            rows.append(summary)
            print(f"{method:>14} seed {seed}: student top-1 {summary['student_top1']:.4f} "
                  f"({summary['distill_seconds']:.0f} s)", flush=True)
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        accs = [r["student_top1"] for r in rs]
        ips = [r["synth_images_per_second"] for r in rs if r.get("synth_images_per_second")]
        out.append({
            "method": method,
            "kind": KIND.get(method, "data-free"),
            "student_top1_mean": statistics.mean(accs),
            "student_top1_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "student_top1_per_seed": accs,
            "distill_seconds_mean": statistics.mean(r["distill_seconds"] for r in rs),
            "synth_images_per_second": statistics.mean(ips) if ips else None,
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0) for r in rs) or None,
        })
    return out


def write_results(name: str, title: str, out_dir: Path, rows: list[dict[str, Any]], teacher_top1: float,
                  extra: dict[str, Any], started: float) -> tuple[Path, Path]:
    from dfkd.pipeline import hardware

    table = aggregate(rows)
    result = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "hardware": hardware(),
        "wall_seconds": time.perf_counter() - started,
        "teacher_top1": teacher_top1,
        "seeds": sorted({r["seed"] for r in rows}),
        "rows": table,
        "runs": rows,
        **extra,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_json(jpath, result)
    hw = result["hardware"]
    lines = [
        f"# {title}",
        "",
        f"- command: `{result['command']}`",
        f"- hardware: {hw.get('gpu') or 'CPU'}, {hw['cpu_count']} cores, torch {hw['torch']} "
        f"({hw['cpu_threads']} threads), {hw['platform']}",
        f"- seeds: {', '.join(map(str, result['seeds']))}; total wall time {result['wall_seconds']:.0f} s",
        *(f"- {k}: {v}" for k, v in extra.items() if not isinstance(v, (dict, list))),
        "",
        "| method | kind | student top-1 | ± (seeds) | distill time (s) | synth images/s |",
        "|---|---|---|---|---|---|",
        f"| teacher | — | {teacher_top1:.4f} | | | |",
    ]
    for r in table:
        ips = f"{r['synth_images_per_second']:.0f}" if r["synth_images_per_second"] else "—"
        lines.append(f"| {r['method']} | {r['kind']} | {r['student_top1_mean']:.4f} | {r['student_top1_std']:.4f} "
                     f"| {r['distill_seconds_mean']:.0f} | {ips} |")
    atomic_write_bytes(mpath, ("\n".join(lines) + "\n").encode())
    return jpath, mpath
