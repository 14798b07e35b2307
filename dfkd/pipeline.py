"""From a composed config to objects and a finished run. The CLI commands only call these."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import dfkd
from dfkd.augment import build_augment
from dfkd.data import DataSpec, load_dataset
from dfkd.distill import Distiller, DistillSettings, resolve_device
from dfkd.errors import DfkdError, close_matches
from dfkd.eval.classification import evaluate
from dfkd.models import build_model, count_parameters
from dfkd.models.checkpoint import atomic_write_json, save_model
from dfkd.teacher import Normalized, Teacher

log = logging.getLogger("dfkd")


def _plain(node: Any) -> Any:
    """OmegaConf node → plain Python (enums as their string values)."""
    if isinstance(node, (DictConfig,)) or OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def cache_dir() -> Path:
    if os.environ.get("DFKD_CACHE"):
        return Path(os.environ["DFKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfkd"


def setup_runtime(cfg: Mapping[str, Any]) -> torch.device:
    device_name = str(cfg.get("device", "auto"))
    if device_name not in ("auto", "cpu", "cuda", "mps") and not device_name.startswith("cuda:"):
        raise DfkdError(f"device must be auto, cpu, cuda or cuda:N, got {device_name!r}")
    from dfkd import dist as D

    device = D.init_from_env(device_name) or resolve_device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DfkdError(f"device {device_name!r} asked for, but torch sees no CUDA device")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg.get("seed", 0)))
    return device


def load_data(data_cfg: Mapping[str, Any], train: bool = True) -> DataSpec:
    """Load the dataset; ``train=False`` skips the train split where reading it costs anything
    (a data-free run needs only the test split)."""
    kw = dict(_plain(data_cfg))
    name = kw.pop("name")
    return load_dataset(name, train=train, **{k: v for k, v in kw.items() if v is not None})


def _wrap_kwargs(data: DataSpec, kwargs: dict) -> dict:
    kw = {"num_classes": data.num_classes, **kwargs}
    return kw


def build_teacher(teacher_cfg: Mapping[str, Any], data: DataSpec, device: torch.device,
                  seed: int = 0, progress: bool = True) -> Teacher:
    """Build the teacher from its config; with no checkpoint and ``train_if_missing``, train and cache it."""
    tc = _plain(teacher_cfg)
    kwargs = _wrap_kwargs(data, tc.get("kwargs") or {})
    mean = tc.get("mean") or list(data.mean)
    std = tc.get("std") or list(data.std)
    ckpt = tc.get("checkpoint")
    model = build_model(tc["model"], **kwargs)
    if ckpt:
        from dfkd.models.checkpoint import load_checkpoint_into

        load_checkpoint_into(model, ckpt)
    elif tc.get("train_if_missing"):
        if data.train is None:
            raise DfkdError("teacher.train_if_missing needs a dataset with a train split")
        key = json.dumps({"model": tc["model"], "kwargs": kwargs, "train": tc.get("train"), "mean": mean,
                          "std": std, "data": data.name, "n_train": len(data.train), "seed": seed},
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        path = cache_dir() / "teachers" / f"{data.name}_{tc['model']}_{digest}.safetensors"
        if path.is_file():
            log.info("teacher: cached %s", path)
            from dfkd.models.checkpoint import load_checkpoint_into

            load_checkpoint_into(model, path)
        else:
            log.info("teacher: training %s on the %s train split (cached at %s)", tc["model"], data.name, path)
            net = Normalized(model, mean, std, data.input_size, data.num_classes)
            tr = tc.get("train") or {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                train_classifier_from_cfg(net, data, tr, device, seed, progress)
            save_model(model, path, build={"model": tc["model"], "kwargs": kwargs, "mean": mean, "std": std,
                                           "input_size": list(data.input_size)})
            from dfkd.priors_vit import save_teacher_token_statistics  # ViT teachers: like BatchNorm running stats

            save_teacher_token_statistics(net, data.train, path, seed=seed)
    else:
        raise DfkdError(f"teacher {tc['model']!r} has no checkpoint: set teacher.checkpoint=PATH "
                        "(or teacher.train_if_missing=true to train one on the data's train split)")
    from dfkd.priors_vit import attach_saved_token_statistics  # *.token_stats.safetensors beside a ViT checkpoint

    attach_saved_token_statistics(model, ckpt or path)
    return Teacher(model, mean, std, data.input_size, data.num_classes).to(device)


def train_classifier_from_cfg(net: Normalized, data: DataSpec, tr: Mapping[str, Any], device, seed: int,
                              progress: bool) -> dict[str, float]:
    from dfkd.train import train_classifier

    aug = build_augment(data.input_size, crop_padding=int(tr.get("crop_padding", 1)), flip=bool(tr.get("flip", False)))
    return train_classifier(net, data.train, data.test, epochs=int(tr.get("epochs", 30)),
                            batch_size=int(tr.get("batch_size", 64)), lr=float(tr.get("lr", 0.05)),
                            weight_decay=float(tr.get("weight_decay", 5e-4)), augment=aug, device=device,
                            seed=seed, progress=progress, optimizer=str(tr.get("optimizer", "sgd")))


def build_student(student_cfg: Mapping[str, Any], data: DataSpec, mean, std) -> tuple[Normalized, dict]:
    """The student takes [0, 1] images normalised like the teacher's."""
    sc = _plain(student_cfg)
    kwargs = {"num_classes": data.num_classes, **(sc.get("kwargs") or {})}
    model = build_model(sc["model"], checkpoint=sc.get("checkpoint"), **kwargs)
    student = Normalized(model, mean, std, data.input_size, data.num_classes)
    meta = student.metadata()
    build = {"model": sc["model"], "kwargs": kwargs, **meta, "dfkd_version": dfkd.__version__}
    return student, build


def check_named_cfg(group: str, node: Mapping[str, Any], registry, reserved=()) -> tuple[Any, str, dict]:
    """``{name: ..., **settings}`` → (builder, name, settings), settings checked against its arguments."""
    kw = dict(_plain(node))
    if "name" not in kw:
        raise DfkdError(f"{group}.name is missing; known: {', '.join(registry)}")
    name = kw.pop("name")
    builder = registry.get(name)
    fn = builder.__init__ if inspect.isclass(builder) else builder
    params = inspect.signature(fn).parameters
    allowed = [p for p in params if p not in ("self", *reserved)]
    for k in kw:
        if k not in allowed:
            raise DfkdError(f"unknown setting {group}.{k} for {name!r}{close_matches(k, allowed)}; "
                            f"its settings: {', '.join(allowed)}")
    return builder, name, kw


def check_synthesizer_cfg(syn_cfg: Mapping[str, Any]) -> tuple[type, str, dict]:
    from generators import SYNTHESIZERS

    return check_named_cfg("synthesizer", syn_cfg, SYNTHESIZERS, ("teacher", "dataset", "seed", "device"))


def build_loss_from_cfg(loss_cfg: Mapping[str, Any]):
    from dfkd.losses.student import STUDENT_LOSSES

    builder, name, kw = check_named_cfg("loss", loss_cfg, STUDENT_LOSSES)
    try:
        return builder(**kw)
    except (TypeError, ValueError) as e:
        raise DfkdError(f"loss {name!r}: {e}") from None


def build_synthesizer_from_cfg(syn_cfg: Mapping[str, Any], teacher: Teacher, data: DataSpec, seed: int,
                               device: torch.device):
    cls, name, kw = check_synthesizer_cfg(syn_cfg)
    if getattr(cls, "needs_real_data", False):
        if data.train is None:
            raise DfkdError(f"synthesizer {name!r} needs the dataset's train split")
        kw["dataset"] = data.train
    if "class_names" in inspect.signature(cls.__init__).parameters and kw.get("class_names") is None:
        kw["class_names"] = list(data.class_names)  # text-to-image prompts
    try:
        return cls(teacher=teacher, seed=seed, device=device, **kw)
    except (TypeError, ValueError) as e:
        raise DfkdError(f"synthesizer {name!r}: {e}") from None


def save_sample_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, num_classes: int,
                     per_class: int = 8, min_side: int = 32) -> None:
    """A PNG with one row of up to ``per_class`` images per class."""
    from torchvision.utils import save_image

    rows = []
    c, h, w = images.shape[1:]
    for k in range(num_classes):
        sel = images[labels == k][:per_class].float()
        pad = torch.ones(per_class - len(sel), c, h, w)
        rows.append(torch.cat([sel.cpu(), pad]))
    grid = torch.cat(rows)
    scale = max(1, min_side // max(h, w))
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode="nearest")
    if c == 1:
        grid = grid.repeat(1, 3, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid.clamp(0, 1), str(tmp), nrow=per_class, padding=1, pad_value=1.0)
    os.replace(tmp, path)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def hardware() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_distill(cfg: DictConfig | Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Everything ``dfkd-distill`` does: build, distil, evaluate, write the run folder."""
    if str(_plain(cfg).get("task", "classification")) == "detection":
        from dfkd.detection.run import run_detection

        return run_detection(cfg, run_dir)
    from dfkd import dist as D

    t_start = time.perf_counter()
    device = setup_runtime(cfg)
    run_dir = Path(D.gather_objects(str(run_dir))[0])  # under torchrun every rank uses rank 0's folder
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    progress = bool(cfg.get("progress", True))
    # everything cheap to check is checked before the teacher (which may need training)
    syn_cls, syn_name, _ = check_synthesizer_cfg(cfg["synthesizer"])
    from dfkd.detection.run import check_task

    check_task(syn_cls, syn_name, "classification")
    tc = _plain(cfg["teacher"])
    need_train = getattr(syn_cls, "needs_real_data", False) or (tc.get("train_if_missing") and not tc.get("checkpoint"))
    data = load_data(cfg["data"], train=bool(need_train))
    student, build = build_student(cfg["student"], data, tc.get("mean") or data.mean, tc.get("std") or data.std)
    student_loss = build_loss_from_cfg(cfg["loss"])
    settings = DistillSettings(**_plain(cfg["distill"]))
    aug = build_augment(data.input_size, **_plain(cfg["augment"]))
    # a stored dataset distilled with its stored logits needs no teacher
    stored_only = (_plain(cfg["synthesizer"]).get("name") == "stored"
                   and str(_plain(cfg["distill"]).get("teacher_logits")) == "stored")
    if not D.is_main():
        D.barrier()  # rank 0 trains (or finds) the cached teacher first
    teacher = None if stored_only else build_teacher(cfg["teacher"], data, device, seed=seed,
                                                     progress=progress and D.is_main())
    if D.is_main():
        D.barrier()
    t_teacher = time.perf_counter() - t_start
    teacher_eval = evaluate(teacher, data.test, device=device) if teacher is not None else {"top1": None}
    # each rank synthesizes its own samples: a seed of its own
    synth = build_synthesizer_from_cfg(cfg["synthesizer"], teacher, data, seed + 1000 * D.rank(), device)
    if tuple(synth.input_size) != tuple(data.input_size) or synth.num_classes != data.num_classes:
        raise DfkdError(f"the synthesizer's images ({synth.num_classes} classes, {tuple(synth.input_size)}) do not "
                        f"fit data {data.name!r} ({data.num_classes} classes, {tuple(data.input_size)})")
    if D.is_main():
        atomic_write_json(run_dir / "config.json", _plain(cfg))
    distiller = Distiller(teacher, student, synth, settings, data.test, augment=aug, run_dir=run_dir,
                          device=device, seed=seed + 1000 * D.rank(), progress=progress, loss=student_loss)
    result = distiller.fit(resume=bool(cfg.get("resume", True)))
    if not D.is_main():
        return {"rank": D.rank(), **result}
    save_model(student.model, run_dir / "student.safetensors", build=build)
    if distiller.memory.size:
        save_sample_grid(distiller.memory.images[: distiller.memory.size].float(),
                         distiller.memory.labels[: distiller.memory.size], run_dir / "samples.png",
                         data.num_classes)
    summary = {
        "teacher_top1": teacher_eval["top1"],
        "student_top1": result["student_top1"],
        "student_top5": result["student_top5"],
        "wall_seconds": time.perf_counter() - t_start,
        "teacher_seconds": t_teacher,
        "distill_seconds": result["wall_seconds"],
        "rounds": result["rounds"],
        "world_size": result["world_size"],
        "ranks": result["ranks"],
        "run_dir": str(run_dir),
        "synthesizer": _plain(cfg["synthesizer"]).get("name"),
        "synth_images_per_second": result["synth_images_per_second"],
        "student_params": count_parameters(student.model),
        "teacher_params": count_parameters(teacher.model) if teacher is not None else None,
        "device": str(device),
        "peak_memory_mb": peak_memory_mb(device),
        "seed": seed,
        "hardware": hardware(),
        "dfkd_version": dfkd.__version__,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def format_summary(summary: Mapping[str, Any], run_dir: Path) -> str:
    if summary.get("task") == "detection":
        from dfkd.detection.run import format_detection_summary

        return format_detection_summary(summary, run_dir)
    rows = [
        ("teacher top-1", f"{summary['teacher_top1']:.4f}" if summary.get("teacher_top1") is not None else "-"),
        ("student top-1", f"{summary['student_top1']:.4f}" if summary.get("student_top1") is not None else "-"),
        ("synthesizer", str(summary.get("synthesizer"))),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("run folder", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
