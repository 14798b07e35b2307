"""Pieces of the detection benchmark (scripts/bench_b4_detection.py) that are library work: the
canvas set and its FCOS teacher, built once and cached by their settings, and the side-by-side rows
(mean over seeds, ratio to the real-data ceiling, per-seed ratios)."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch


def settings_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def canvas_teacher(work: Path, canvas_cfg: Mapping[str, Any], teacher_cfg: Mapping[str, Any], *,
                   root: Optional[str] = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Canvases (``dfkd.data.detection.build_canvas_benchmark``) and an FCOS teacher on a small BatchNorm
    CNN trained on the train canvases, both kept in ``work`` under a key of their settings and reused.

    ``canvas_cfg``: source, canvas_size, object_pixels, objects, train, test, background, seed.
    ``teacher_cfg``: width, fpn_channels, head_convs, steps, lr, batch, channels, mean, std, flip, warmup
    (augment and format are added). Returns the paths, datasets (one-channel ones read the canvases'
    gray), the teacher (eval mode, on ``device``), its checkpoint, whether it was cached and timings.
    """
    from dfkd.data.detection import build_canvas_benchmark, load_detection
    from dfkd.detection.boxes import BoxAugment
    from dfkd.detection.models import build_detector, load_detector, save_detector
    from dfkd.detection.train import train_detector

    c, t = dict(canvas_cfg), dict(teacher_cfg)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build_canvas_benchmark(c["source"], work / f"canvases_{settings_key(c)}", root=root,
                                   train_canvases=c["train"], test_canvases=c["test"], canvas_size=c["canvas_size"],
                                   seed=c["seed"], object_pixels=tuple(c["object_pixels"]),
                                   objects=tuple(c["objects"]), background=c["background"])
    train_ds, test_ds = load_detection(paths["train"], cache=True), load_detection(paths["test"], cache=True)
    if int(t["channels"]) == 1:  # gray canvases: keep one of the (equal) RGB channels
        for ds in (train_ds, test_ds):
            ds.transform = lambda image, target: (image.mean(0, keepdim=True), target)
    canvas_seconds = time.perf_counter() - t0

    warmup = int(t.pop("warmup", 50))
    key = {"canvases": c, "arch": "fcos", "backbone": "small_cnn", **t,
           "augment": {"jitter": 0.1, "scale": 0.1}, "format": 2}
    if warmup != 50:  # keyed only when set, so teachers cached before the option stay valid
        key["warmup"] = warmup
    tpath = work / f"teacher_{settings_key(key)}.safetensors"
    seconds, cached = 0.0, tpath.is_file()
    if cached:
        model = load_detector(tpath)
    else:
        torch.manual_seed(c["seed"])
        model = build_detector("fcos", "small_cnn", num_classes=train_ds.num_classes, image_size=c["canvas_size"],
                               in_chans=int(t["channels"]), mean=tuple(t["mean"]), std=tuple(t["std"]),
                               width=t["width"], fpn_channels=t["fpn_channels"], head_convs=t["head_convs"])
        t1 = time.perf_counter()
        train_detector(model, train_ds, steps=t["steps"], lr=t["lr"], warmup=warmup, batch_size=t["batch"],
                       device=device, seed=c["seed"], progress=False,
                       augment=BoxAugment(flip=bool(t["flip"]), jitter=0.1, scale=0.1))
        seconds = time.perf_counter() - t1
        save_detector(model, tpath)
        tpath.with_name(tpath.stem + ".settings.json").write_text(json.dumps(key, indent=1))
    model.to(device).eval()
    return {"paths": paths, "train": train_ds, "test": test_ds, "model": model, "checkpoint": tpath,
            "cached": cached, "train_seconds": seconds, "canvas_seconds": canvas_seconds,
            "settings": {k: v for k, v in key.items() if k != "canvases"}}


def side_by_side(runs: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], target: float,
                 ceiling: str = "real", data_free: str = "box_inversion") -> dict[str, Any]:
    """Rows (means over seeds) with each method's mAP@.5 ratio to the ceiling's, whether the data-free
    method meets ``target`` on the mean, and the same ratio per student seed."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]

        def mean(k, rs=rs):
            vals = [r[k] for r in rs if r[k] is not None]
            return statistics.mean(vals) if vals else None

        rows.append({"method": method, "kind": kinds[method], "map": mean("map"), "map50": mean("map50"),
                     "map50_std": statistics.pstdev([r["map50"] for r in rs]) if len(rs) > 1 else None,
                     "map50_per_seed": [r["map50"] for r in rs], "distill_seconds": mean("distill_seconds"),
                     "images_synthesized": mean("images_synthesized"),
                     "synth_images_per_second": mean("synth_images_per_second"), "steps": mean("steps"),
                     "per_class_ap": {c: statistics.mean(r["per_class_ap"][c] for r in rs)
                                      for c in rs[0]["per_class_ap"]}})
    top = next((r["map50"] for r in rows if r["method"] == ceiling), None)
    for r in rows:
        r["ratio_to_ceiling_map50"] = r["map50"] / top if top else None
    df = next((r for r in rows if r["method"] == data_free), None)
    met = None if df is None or df["ratio_to_ceiling_map50"] is None else df["ratio_to_ceiling_map50"] >= target
    per_seed = {}
    for r in runs:  # the data-free run against the ceiling trained from the same seed
        if r["method"] == data_free:
            c = next((q for q in runs if q["method"] == ceiling and q["seed"] == r["seed"]), None)
            if c is not None and c["map50"] > 0:
                per_seed[r["seed"]] = r["map50"] / c["map50"]
    return {"rows": rows, "data_free": df, "target_met": met, "per_seed": per_seed,
            "target_met_every_seed": all(v >= target for v in per_seed.values()) if per_seed else None}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run folder's ``metrics.jsonl`` records (empty when the file is missing)."""
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def run_record(method: str, kind: str, seed: int, command: str, out: Mapping[str, Any],
               run_dir: Path) -> dict[str, Any]:
    """One B4 row per run: ``run_detection``'s summary, its time-to-mAP curve ending at the final score and
    the means of its ``syn/``/``kd/`` metrics over the last quarter of the rounds."""
    history = read_metrics(run_dir)
    syn_keys = sorted({k for h in history for k in h if k.startswith(("syn/", "kd/"))})
    tail = history[-max(1, len(history) // 4):]
    keep = ("per_class_ap", "num_detections", "distill_seconds", "steps", "rounds", "images_synthesized",
            "synth_seconds", "synth_images_per_second", "eval_seconds_in_budget", "final_eval_seconds",
            "head_matching", "class_kd")
    return {"method": method, "kind": kind, "seed": seed, "command": command,
            "map": out["student_map"], "map50": out["student_map50"], "map75": out["student_map75"],
            **{k: out[k] for k in keep},
            "time_to_map": list(out["time_to_map"]) + [[out["distill_seconds"], out["steps"], out["student_map"],
                                                        out["student_map50"]]],
            "last_quarter_means": {k: statistics.mean(h[k] for h in tail if k in h) for k in syn_keys
                                   if any(k in h for h in tail)}}


def b4_markdown(result: Mapping[str, Any], target: float, curves_png: Optional[str] = None) -> list[str]:
    """The B4 results table and its header, rendered from the results JSON alone."""
    from dfkd.bench import hardware_line

    s, c, t, inv = result["settings"], result["canvases"], result["teacher"], result["inversion"]
    seeds, rows, met, per_seed = result["seeds"], result["rows"], result["target_met"], \
        result["ratio_to_ceiling_map50_per_seed"]
    df = next((r for r in rows if r["method"] == "box_inversion"), None)
    size, obj, objects, box = c["canvas_size"], c["object_pixels"], c["objects"], inv["size"]
    trained = "cached" if t["cached"] else f"trained in {t['train_seconds']:.0f} s"
    lines = [
        f"# B4 — detection ({s['source']} canvases), side by side", "",
        f"- command: `{result['command']}`",
        hardware_line(result["hardware"]),
        f"- seeds: {', '.join(map(str, seeds))}; total wall time {result['wall_seconds']:.0f} s (teacher {trained})",
        f"- canvases: {size}×{size} px, {objects[0]}–{objects[1]} objects of {obj[0]}–{obj[1]} px on "
        f"blurred real backgrounds; {c['train']} train canvases ({c['train_boxes']} boxes) from the train "
        f"split, {c['test']} test canvases ({c['test_boxes']} boxes) from the test split only",
        f"- teacher: FCOS, small BatchNorm CNN width {s['teacher_width']}, FPN {s['teacher_fpn']}, "
        f"{t['params']} params, {s['teacher_steps']} steps on the train canvases",
        f"- student: FCOS, {s['student_backbone']} width {s['student_width']}, FPN {s['student_fpn']}, "
        f"{s['student_head_convs']} head conv(s), {result['student']['params']} params; same init, budget "
        + (f"({s['steps']} student steps) " if s["steps"] else
           f"({s['budget_minutes']:g} min wall clock, evaluation included) ")
        + f"and KD loop for every method: batch {s['kd_batch']}, {s['kd_steps_per_round']} steps per round from a "
        f"{s['memory_size']}-image memory, teacher pseudo-labels (score ≥ {s['score_thresh']})"
        + (f" + head matching (weight {s['head_weight']:g})" if s["head_matching"] else "")
        + (f" + the teacher's class distribution on its objects (class KD, weight {s['class_kd']:g}, "
           f"T {s['class_kd_temperature']:g})" if s["class_kd"] > 0 else ""),
        f"- box_inversion: {s['inv_iterations']} iterations × {s['inv_batch']} images, lr {s['inv_lr']:g}, "
        f"{s['boxes_per_image']} sampled box(es) per image (sides {box[0]:.2f}–{box[1]:.2f} of the "
        f"canvas), BN prior {s['inv_bn']:g} (first layer ×{s['inv_first_bn']:g}), TV {s['inv_tv']:g}"
        + (f", teacher detections ≥ {s['add_teacher_detections']:g} added" if s["add_teacher_detections"] >= 0
           else "")
        + (f", ADI competition with the student (weight {s['inv_adi']:g})" if s["inv_adi"] > 0 else ""),
        "- mAP: pycocotools COCOeval (bbox, 101-point), on the full test set; scored with score ≥ "
        f"{s['eval_score_thresh']:g}", "",
        "| method | kind | mAP@[.5:.95] | mAP@.5 | mAP@.5 / ceiling | distill time (s) | images synthesized "
        "| synth images/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher | — | {t['map']:.4f} | {t['map50']:.4f} | | | | |",
    ]
    for r in rows:
        ratio = f"{r['ratio_to_ceiling_map50']:.1%}" if r["ratio_to_ceiling_map50"] is not None else "—"
        std = f" ± {r['map50_std']:.4f}" if r["map50_std"] is not None else ""
        ips = f"{r['synth_images_per_second']:.0f}" if r["synth_images_per_second"] else "—"
        lines.append(f"| {r['method']} | {r['kind']} | {r['map']:.4f} | {r['map50']:.4f}{std} | {ratio} "
                     f"| {r['distill_seconds']:.0f} | {r['images_synthesized']:.0f} | {ips} |")
    lines.append("")
    if result["weak_teacher"]:
        lines.append(f"**Warning:** the teacher's mAP@.5 ({t['map50']:.4f}) is below "
                     f"{s['min_teacher_map50']:g}: its training did not converge, so these rows say little.\n")
    goal = f"Target (data-free mAP@.5 ≥ {target * 100:g} % of the real-data KD ceiling's)"
    if met is None:
        lines.append(f"{goal}: not evaluated (needs both box_inversion and real).")
    else:
        lines.append(f"{goal}: **{'met' if met else 'not met'}** — box_inversion reaches "
                     f"{df['ratio_to_ceiling_map50']:.1%} of the ceiling"
                     + (f" (mean mAP@.5 over {len(seeds)} seeds)." if len(seeds) > 1 else "."))
    if len(per_seed) > 1:
        lines.append("Per student seed, box_inversion against the ceiling of the same seed: "
                     + ", ".join(f"seed {k}: {v:.1%}" for k, v in per_seed.items())
                     + f" — target {'met on every seed' if result['target_met_every_seed'] else 'missed on some seed'}.")
    if curves_png:
        lines.append(f"\nTime to mAP@.5 (test subset of {s['eval_images']} canvases along the way, full test set "
                     f"at the end): `{curves_png}`; data: `time_to_map` ([wall s, step, mAP, mAP@.5]) per run in "
                     f"`{result['benchmark']}.json`, with per-class AP.")
    return lines


def b4_real_row(row: str, kind: str, summary: Mapping[str, Any], run_dir: Path, wall: float,
                overrides: Sequence[str], work: Path) -> dict[str, Any]:
    """One B4-real row from ``run_distill``'s summary and the run's metrics: the mean pseudo-boxes per
    image and the KD losses of the first and last round."""
    recs = read_metrics(run_dir)
    vals = [r["kd/pseudo_boxes_per_image"] for r in recs if "kd/pseudo_boxes_per_image" in r]
    kd = [r for r in recs if "kd/loss" in r]
    losses = {k: [kd[0][k], kd[-1][k]] for k in ("kd/loss", "kd/head", "kd/class_kd", "kd/feature")
              if kd and k in kd[0] and k in kd[-1]}
    s = summary
    return {"method": row, "kind": kind, "map": s.get("student_map"), "map50": s.get("student_map50"),
            "map75": s.get("student_map75"), "steps": s["steps"], "rounds": s["rounds"],
            "images_synthesized": s["images_synthesized"], "synth_seconds": s["synth_seconds"],
            "distill_seconds": s["distill_seconds"], "row_wall_seconds": round(wall, 1),
            "pseudo_boxes_per_image": sum(vals) / len(vals) if vals else None,
            "kd_losses_first_last_round": losses, "student_params": s["student_params"],
            "head_matching": s["head_matching"], "class_kd": s["class_kd"], "adi": s.get("adi"),
            "time_to_map": s.get("time_to_map") or [], "overrides": [o.replace(str(work), "$WORK") for o in overrides]}


def b4_real_markdown(payload: Mapping[str, Any]) -> list[str]:
    """The B4-real results table and its header, rendered from the results JSON alone."""
    a, teacher, start, rows, hw = (payload["settings"], payload["teacher"], payload["untrained_student"],
                                   payload["rows"], payload["hardware"])
    fmt = (lambda v: "-" if v is None else f"{v:.4f}")
    by = {r["method"]: r for r in rows}
    ceiling = by.get("box_real", {}).get("map50")
    free = [r for r in rows if str(r["kind"]).startswith("data-free")]
    df = max(free, key=lambda r: r["map50"] or 0.0) if free else {}
    width = "half the width multiple" if not a["width_multiple"] else f"width multiple {a['width_multiple']}"
    init = ("trained from scratch" if a["student_init"] == "scratch" else
            "initialised from the teacher by channel selection (every convolution keeps the teacher's channels of "
            f"largest {'BatchNorm |γ|' if a['importance'] == 'bn' else 'filter L1 norm'}; "
            "`detection.student_init=teacher`)"
            + ({"none": "", "dead_leaves": ", its dropped channels compensated from the teacher's statistics on "
                f"{a.get('compensate_images')} dead-leaves images (`detection.compensate=dead_leaves`)",
                "inversion": ", its dropped channels compensated (least squares) from the teacher's statistics on "
                f"{a.get('compensate_images')} dead-leaves images optimised for {a.get('compensate_iterations')} "
                "steps to match the teacher's BatchNorm statistics (`detection.compensate=inversion`; no real "
                f"data; {start.get('init_seconds', 0):.0f} s, outside the row budgets)"}[a.get("compensate", "none")])
            + ", the same start for every row")
    lines = [
        f"# B4-real: YOLOv5n distilled into a narrower YOLO on the {a['device'].upper()}, {a['image_size']} px", "",
        f"- command: `{payload['command']}`",
        f"- teacher: the shared YOLOv5n (`{Path(teacher['weights']).name}`, {teacher.get('params', 0):,} parameters), "
        f"teacher=yolo; student: its architecture at {width}, {start['student_params']:,} parameters, {init}",
        f"- data: coco128 (128 COCO train2017 images, 71 classes with boxes), letterboxed to {a['image_size']} px; "
        "COCO mAP by pycocotools (confidence ≥ 0.001, NMS IoU 0.45, 100 detections per image)",
        f"- budget: {a['budget_minutes']} min of distillation per row (synthesis included), seed {a['seed']}; "
        f"student batch {a['kd_batch']}, AdamW lr {a['lr']} (cosine over the budget), pseudo-boxes at confidence "
        f"≥ {a['score_thresh']}, class KD {a['class_kd']}, head matching {'on' if a['head_matching'] else 'off'}"
        + (f", neck-feature KD {a['feature_kd']} (the student's Detect inputs onto the teacher's kept channels)"
           if a.get("feature_kd") else "")
        + (", the student's BatchNorm frozen at its starting statistics" if a.get("freeze_bn") else "") + "; "
        f"box_inversion: batch {a['inv_batch']}, {a['inv_iterations']} iterations, {a['inv_kd_steps']} student "
        f"steps per batch, the shipped synthesizer weights",
        f"- hardware: {hw.get('gpu') or 'CPU'}, {hw['cpu_count']} cores, torch {hw['torch']} ({hw['cpu_threads']} "
        f"thread(s)); wall time {payload['wall_seconds']:.0f} s; load average {payload['loadavg_start'][0]:.1f} → "
        f"{payload['loadavg_end'][0]:.1f} (a shared machine: other jobs ran, so times and step counts are noisy)", "",
        "| row | kind | mAP@[.5:.95] | mAP@.5 | mAP@.5 / ceiling | steps | images made | synthesis s | pseudo-boxes / image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| teacher (YOLOv5n) | — | {fmt(teacher.get('map'))} | {fmt(teacher.get('map50'))} | — | — | — | — | — |",
        f"| untrained student | {start['kind']} | {fmt(start['map'])} | {fmt(start['map50'])} "
        f"| {fmt(start['ratio_to_ceiling_map50'])} | 0 | — | — | — |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kind']} | {fmt(r['map'])} | {fmt(r['map50'])} "
                     f"| {fmt(r['ratio_to_ceiling_map50'])} | {r['steps']} | {r['images_synthesized']} "
                     f"| {r['synth_seconds']:.0f} | {fmt(r['pseudo_boxes_per_image'])} |")
    if df and ceiling:
        which = "Data-free mAP@.5" if len(free) == 1 else f"The best data-free mAP@.5 ({df['method']})"
        lines += ["", f"{which} is {df['ratio_to_ceiling_map50']:.2f} of the ceiling's "
                      f"({fmt(df['map50'])} vs {fmt(ceiling)}); the floor's is {fmt(by['box_noise']['map50'])}."
                  if "box_noise" in by else f"{which} is {df['ratio_to_ceiling_map50']:.2f} of the ceiling's."]
    return lines
