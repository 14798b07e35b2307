"""``dfkd-inspect PATH``: what a stored synthetic dataset holds.

    dfkd-inspect synthetic/digits_deepinversion                 # summary, histogram, teacher confidence, grid PNG
    dfkd-inspect DATASET --grid grid.png --per-class 16
    dfkd-inspect DATASET --export images/                       # class/xxxxxxxx.png + labels.csv/json
    dfkd-inspect DATASET --json                                 # the summary as JSON

A detection dataset (``dfkd-synthesize task=detection``) is summarised by its boxes (per image, per
class, scores, sizes); its grid shows the first images with the teacher's boxes drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dfkd.cli.common import fail

PROG = "dfkd-inspect"


def _bar(n: int, top: int, width: int = 30) -> str:
    return "#" * (round(width * n / top) if top else 0)


def format_report(s: dict) -> str:
    t = s["teacher"] or {}
    syn = s.get("synthesizer") or {}
    c = s["confidence"]
    lines = [
        f"dataset       {s['path']}",
        f"images        {s['count']} of {s['num_images']} ({'complete' if s['complete'] else 'INCOMPLETE'}), "
        f"{s['shards']} shards, {s['image_dtype']}, {'x'.join(map(str, s['input_size']))}",
        f"teacher       {t.get('architecture')}  sha256 {str(t.get('sha256'))[:16]}  mean {t.get('mean')} std {t.get('std')}",
        f"synthesizer   {syn.get('name')}  seed {s['seed']}  dfkd {s['dfkd_version']}",
        f"confidence    mean {c['mean_confidence']:.3f}  p10/p50/p90 "
        + "/".join(f"{v:.3f}" for v in c["confidence_p10_p50_p90"])
        + f"  entropy {c['mean_entropy']:.3f}  teacher agrees with target {c['agreement_with_targets']:.3f}",
        f"duplicates    {s['duplicates']}",
        "class histogram (target | teacher arg-max | mean confidence):",
    ]
    counts = s["class_counts"] or []
    top = max(counts) if counts else 0
    names = s.get("class_names") or [str(k) for k in range(len(counts))]
    for k, n in enumerate(counts):
        conf = c["mean_confidence_per_class"][k]
        lines.append(f"  {names[k]:>12} {n:>7} {c['predicted_counts'][k]:>7} "
                     f"{conf if conf is None else format(conf, '.3f'):>6}  {_bar(n, top)}")
    return "\n".join(lines)


def format_detection_report(s: dict) -> str:
    t = s["teacher"] or {}
    syn = s.get("synthesizer") or {}
    d = s["detections"]
    fmt = lambda v: "-" if v is None else "/".join(f"{x:.3g}" for x in v)  # noqa: E731
    lines = [
        f"dataset       {s['path']}  (detection)",
        f"images        {s['count']} of {s['num_images']} ({'complete' if s['complete'] else 'INCOMPLETE'}), "
        f"{s['shards']} shards, {s['image_dtype']}, {'x'.join(map(str, s['input_size']))}",
        f"teacher       {t.get('architecture')}  sha256 {str(t.get('sha256'))[:16]}",
        f"synthesizer   {syn.get('name')}  seed {s['seed']}  dfkd {s['dfkd_version']}",
        f"boxes         {d['boxes']} teacher detections with score >= {s['score_thresh']} "
        f"({d['boxes_per_image']:.2f} per image, at most {d['max_boxes_per_image']}, "
        f"{d['images_without_boxes']} images without any)",
        f"scores        p10/p50/p90 {fmt(d['score_p10_p50_p90'])}  box side (px) {fmt(d['box_side_p10_p50_p90'])}",
        f"duplicates    {s['duplicates']}",
        "boxes per class (teacher" + (" | synthesizer targets" if "synthesizer_boxes" in d else "") + "):",
    ]
    counts = d["boxes_per_class"]
    top = max(counts) if counts else 0
    names = s.get("class_names") or [str(k) for k in range(len(counts))]
    for k, n in enumerate(counts):
        aimed = f" {d['synthesizer_boxes_per_class'][k]:>7}" if "synthesizer_boxes" in d else ""
        lines.append(f"  {names[k]:>12} {n:>7}{aimed}  {_bar(n, top)}")
    return "\n".join(lines)


def save_box_grid(images, targets, path: Path, count: int = 32, min_side: int = 96) -> None:
    """The first ``count`` images with their boxes drawn, in one PNG."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import draw_bounding_boxes, make_grid, save_image

    from dfkd.data.store import to_float

    x = to_float(images[:count])
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    scale = max(1, min_side // max(x.shape[-2:]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    drawn = []
    for img, t in zip(x, targets):
        img = (img * 255).round().to(torch.uint8)[:3]
        if len(t["boxes"]):  # (an image without boxes is shown as it is)
            img = draw_bounding_boxes(img, t["boxes"] * scale, labels=[str(int(v)) for v in t["labels"]],
                                      colors="red")
        drawn.append(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid([d.float() / 255 for d in drawn], nrow=8, padding=2), str(path))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description="Summarise a stored synthetic dataset (dfkd-synthesize output).")
    p.add_argument("path", help="the dataset folder (holding manifest.json)")
    p.add_argument("--grid", default=None, help="where to write the per-class image grid PNG "
                                                 "(default: PATH/inspect_grid.png)")
    p.add_argument("--per-class", type=int, default=8, help="images per class in the grid")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also export an image folder (class/xxxxxxxx.png, labels.csv, labels.json)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the shard checksums")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from dfkd.data.store import SyntheticStore, export_image_folder, summarize, to_float
    from dfkd.errors import DfkdError
    from dfkd.pipeline import save_sample_grid

    try:
        store = SyntheticStore(args.path, verify=not args.no_verify)
        data = store.load_all()
        s = summarize(store, data)
        s["class_names"] = store.class_names
        grid = Path(args.grid) if args.grid else store.root / "inspect_grid.png"
        if store.task == "detection":
            save_box_grid(data["images"], store.targets(data=data), grid, count=8 * args.per_class)
        else:
            save_sample_grid(to_float(data["images"]), data["labels"], grid, store.num_classes,
                             per_class=args.per_class)
        s["grid"] = str(grid)
        if args.export:
            s["export"] = str(export_image_folder(store, args.export, progress=False))
    except DfkdError as e:
        fail(PROG, str(e))
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(format_detection_report(s) if s.get("task") == "detection" else format_report(s))
        print(f"grid          {s['grid']}")
        if args.export:
            print(f"exported      {s['export']}")


if __name__ == "__main__":
    main(sys.argv[1:])
