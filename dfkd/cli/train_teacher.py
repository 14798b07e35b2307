"""``dfkd-train-teacher``: supervised training of a teacher on a real dataset's train split.

    dfkd-train-teacher                                  # the digits teacher
    dfkd-train-teacher teacher.train.epochs=60 output=teacher.safetensors
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from dfkd.cli.common import hydra_app


def task(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from dfkd.errors import DfkdError
    from dfkd.models import build_model
    from dfkd.models.checkpoint import atomic_write_json, save_model
    from dfkd.pipeline import _plain, hardware, load_data, setup_runtime, train_classifier_from_cfg
    from dfkd.teacher import Normalized

    t0 = time.perf_counter()
    device = setup_runtime(cfg)
    data = load_data(cfg.data)
    if data.train is None:
        raise DfkdError(f"dataset {data.name!r} has no train split to train a teacher on")
    tc = _plain(cfg.teacher)
    kwargs = {"num_classes": data.num_classes, **(tc.get("kwargs") or {})}
    model = build_model(tc["model"], checkpoint=tc.get("checkpoint"), **kwargs)
    mean, std = tc.get("mean") or list(data.mean), tc.get("std") or list(data.std)
    net = Normalized(model, mean, std, data.input_size, data.num_classes)
    metrics = train_classifier_from_cfg(net, data, tc.get("train") or {}, device, int(cfg.seed), bool(cfg.progress))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = Path(cfg.output) if cfg.output else run_dir / "teacher.safetensors"
    save_model(model, out, build={"model": tc["model"], "kwargs": kwargs, "mean": mean, "std": std,
                                  "input_size": list(data.input_size)})
    result = {"top1": metrics["top1"], "top5": metrics["top5"], "checkpoint": str(out),
              "wall_seconds": time.perf_counter() - t0, "hardware": hardware()}
    atomic_write_json(run_dir / "summary.json", result)
    print(f"teacher top-1 {metrics['top1']:.4f}  checkpoint {out}")
    return result


main = hydra_app("dfkd-train-teacher", "train_teacher", task)

if __name__ == "__main__":
    main()
