"""``dfkd-eval``: score any student or teacher on any test set.

    dfkd-eval model=runs/digits/RUN                             # a run folder, on the data it was run with
    dfkd-eval model=student.safetensors data=image_folder data.path=DIR
    dfkd-eval teacher=timm teacher.model=NAME teacher.checkpoint=PATH data=npz data.path=test.npz

Prints top-1/top-5 and the weakest classes; writes ``eval.json`` (top-1, top-5, per-class accuracy, the
confusion matrix) and ``confusion.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from dfkd.cli.common import hydra_app


def save_confusion_png(cm: list[list[int]], names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib when installed, else a plain heat map)."""
    import numpy as np

    m = np.asarray(cm, dtype=np.float64)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(m)
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * n + 2), max(4, 0.4 * n + 1.5)))
        ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
        if n <= 40:
            ax.set_xticks(range(n), [str(x) for x in names[:n]], rotation=90, fontsize=7)
            ax.set_yticks(range(n), [str(x) for x in names[:n]], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except ImportError:
        from PIL import Image

        cell = max(1, 256 // max(1, len(m)))
        img = (255 * (1 - m)).astype("uint8").repeat(cell, 0).repeat(cell, 1)
        Image.fromarray(img, mode="L").save(path)


def run_eval(cfg: DictConfig | Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    from dfkd.data import fit_to_teacher
    from dfkd.errors import DfkdError
    from dfkd.eval.classification import evaluate
    from dfkd.load import load_model
    from dfkd.models.checkpoint import atomic_write_json
    from dfkd.pipeline import _plain, build_teacher, load_data, setup_runtime

    device = setup_runtime(cfg)
    data_cfg = dict(_plain(cfg["data"]))
    model_path = cfg.get("model")
    out_dir = Path(cfg["output"]) if cfg.get("output") else None
    if model_path:
        p = Path(str(model_path)).expanduser()
        if not p.exists():
            raise DfkdError(f"model not found: {p}")
        net = load_model(p, device=str(device))
        spec, what = net.spec, str(p)
        if data_cfg.get("name") == "run":
            if not p.is_dir() or not (p / "config.json").is_file():
                raise DfkdError("give the test set (data=image_folder data.path=DIR, data=npz ..., data=digits): "
                                f"{p} is not a run folder with a config.json to take it from")
            data_cfg = json.loads((p / "config.json").read_text())["data"]
        if out_dir is None and p.is_dir():
            out_dir = p
    else:
        if data_cfg.get("name") == "run":
            raise DfkdError("give model=RUN_DIR (or a model file), or a test set with data=...")
        tc = _plain(cfg["teacher"])
        trains = bool(tc.get("train_if_missing") and not tc.get("checkpoint") and not tc.get("_target_"))
        raw = load_data(data_cfg, train=trains)
        net = build_teacher(cfg["teacher"], raw if trains else None, device, seed=int(cfg.get("seed", 0)),
                            progress=bool(cfg.get("progress", True)))
        spec, what = net.spec, f"teacher {getattr(net, 'build_info', {}).get('name', '')}".strip()
    if data_cfg.get("name") == "none":
        raise DfkdError("dfkd-eval needs a test set: name one, e.g. data=image_folder data.path=DIR, data=npz "
                        "data.path=FILE or data=cifar10 (data=none, the default for a teacher of your own, has none)")
    data = fit_to_teacher(load_data(data_cfg, train=False) if model_path else raw, spec)
    if data.test is None:
        raise DfkdError(f"data {data.name!r} has no test images")
    res = evaluate(net, data.test, batch_size=int(cfg.get("batch_size", 512)), device=device, confusion=True)
    names = list(spec.class_names or [str(i) for i in range(spec.num_classes)])
    per_class = {names[k]: v for k, v in res.pop("per_class").items()}
    summary = {"model": what, "test_set": data.name, "images": res["n"], "top1": res["top1"], "top5": res["top5"],
               "loss": res["loss"], "per_class": per_class, "confusion": res["confusion"], "class_names": names,
               "skipped_files": getattr(data.test, "skipped", 0)}
    out_dir = out_dir or run_dir
    atomic_write_json(out_dir / "eval.json", summary)
    save_confusion_png(res["confusion"], names, out_dir / "confusion.png")
    summary["output"] = str(out_dir)
    return summary


def format_eval(s: Mapping[str, Any]) -> str:
    worst = sorted(s["per_class"].items(), key=lambda kv: kv[1])[:3]
    rows = [("model", s["model"]), ("test set", f"{s['test_set']} ({s['images']} images"
                                      + (f", {s['skipped_files']} unreadable skipped" if s.get("skipped_files") else "")
                                      + ")"),
            ("top-1", f"{s['top1']:.4f}"), ("top-5", f"{s['top5']:.4f}"),
            ("weakest classes", ", ".join(f"{k} {v:.3f}" for k, v in worst)),
            ("written", f"{s['output']}/eval.json, confusion.png")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def task(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = run_eval(cfg, run_dir)
    print(format_eval(summary))
    return summary


main = hydra_app("dfkd-eval", "eval", task)

if __name__ == "__main__":
    main()
