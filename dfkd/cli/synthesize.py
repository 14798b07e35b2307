"""``dfkd-synthesize``: write a synthetic dataset (safetensors shards + manifest.json) once, reuse it.

    dfkd-synthesize output=synthetic/digits_di num_images=2000            # DeepInversion, digits teacher
    dfkd-synthesize output=DIR synthesizer=adversarial budget_minutes=30   # stop after a time budget
    torchrun --nproc_per_node 4 -m dfkd.cli.synthesize output=DIR          # ranks write disjoint shards;
                                                                           # rank 0 trains the teacher
    dfkd-synthesize output=DIR import_folder=IMAGES                        # import class/xxx.png, teacher labels
    dfkd-synthesize task=detection teacher=detector teacher.checkpoint=DET.safetensors \
        synthesizer=box_inversion output=DIR num_images=N                  # images + the teacher's boxes

Run the same command again to resume: finished shards are kept, the rest are made with the
same per-shard seeds, and manifest.json is written last.

A detection dataset (``task=detection``, a detector teacher, ``synthesizer=box_inversion | box_noise |
box_real``) keeps with each image the teacher's detections on the stored pixels with score ≥
``detection.score_thresh`` (the same setting as the distillation's pseudo-boxes) and the boxes the
synthesizer aimed at; read it with ``SyntheticStore(DIR).dataset()`` (image, {"boxes", "labels",
"scores"}) or distil from it with ``dfkd-distill task=detection ... synthesizer=stored synthesizer.path=DIR``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

import dfkd
from dfkd.cli.common import hydra_app


def run_synthesize(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Everything ``dfkd-synthesize`` does; returns a summary."""
    from dfkd import dist as D
    from dfkd.data.store import IMAGE_DTYPES, import_image_folder, teacher_identity
    from dfkd.errors import DfkdError
    from dfkd.pipeline import _plain, build_synthesizer_from_cfg, build_teacher, check_synthesizer_cfg, load_data, \
        setup_runtime

    if str(_plain(cfg).get("task", "classification")) == "detection":
        return run_synthesize_detection(cfg)
    t0 = time.perf_counter()
    device = setup_runtime(cfg)
    seed = int(cfg["seed"])
    progress = bool(cfg.get("progress", True))
    if str(cfg["image_dtype"]) not in IMAGE_DTYPES:
        raise DfkdError(f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {cfg['image_dtype']!r}")
    data = load_data(cfg["data"])
    syn = _plain(cfg["synthesizer"])
    if not cfg.get("import_folder"):
        syn_cls, syn_name, syn_kw = check_synthesizer_cfg(syn)
        if syn.get("name") == "stored":
            raise DfkdError("dfkd-synthesize writes new datasets; synthesizer=stored only reads one")
        from dfkd.detection.run import check_task

        check_task(syn_cls, syn_name, "classification")  # box_inversion & co.: task=detection teacher=detector
        if hasattr(syn_cls, "check_settings"):  # e.g. a missing synthesizer.path, before the teacher
            syn_cls.check_settings(syn_kw)
    rank, world = D.rank(), D.world_size()
    # under torchrun, rank 0 builds (on a cold cache: trains and caches) the teacher while the
    # others wait; they then load the cached one
    if rank != 0:
        D.barrier()
    teacher = build_teacher(cfg["teacher"], data, device, seed=seed, progress=progress and rank == 0)
    if rank == 0:
        D.barrier()
    from dfkd.data import fit_to_teacher

    data = fit_to_teacher(data, teacher.spec)  # the teacher's size, classes and names, not the dataset's
    spec = {
        "teacher": teacher_identity(teacher, _plain(cfg["teacher"]).get("model")
                                    or getattr(teacher, "build_info", {}).get("name")),
        "synthesizer": {"name": syn.get("name"), "config": syn},
        "seed": seed, "num_images": int(cfg["num_images"]), "shard_size": int(cfg["shard_size"]),
        "image_dtype": str(cfg["image_dtype"]), "input_size": list(data.input_size),
        "num_classes": int(data.num_classes), "class_names": list(data.class_names),
        "data": data.name, "dfkd_version": dfkd.__version__,
    }
    out = Path(str(cfg["output"])).expanduser()
    if cfg.get("import_folder"):
        manifest = import_image_folder(cfg["import_folder"], out, spec, teacher=teacher, device=device)
        return {"output": str(out), "count": manifest["count"], "complete": True,
                "wall_seconds": time.perf_counter() - t0, "made_this_run": manifest["count"]}

    def make_synth(shard_seed: int):
        return build_synthesizer_from_cfg(syn, teacher, data, shard_seed, device)

    make_synth(seed)  # settings errors surface before any file is written
    return _write(cfg, out, spec, make_synth, teacher, device, rank, world, t0)


def _write(cfg, out: Path, spec: dict, make_synth, teacher, device, rank: int, world: int, t0: float) -> dict:
    """Write (or resume) the dataset shard by shard; under torchrun rank 0 writes the manifest last."""
    from dfkd import dist as D
    from dfkd.data.store import StoreWriter

    writer = StoreWriter(out, spec)
    res = writer.run(make_synth, teacher, device=device, rank=rank, world=world,
                     budget_minutes=cfg.get("budget_minutes"), progress=bool(cfg.get("progress", True)))
    m = res["manifest"]
    if world > 1:  # every rank's shards are written: rank 0 writes the manifest (again, with all of them)
        D.barrier()
        m = writer.finalize(complete=True, wall_seconds=res["wall_seconds"]) if rank == 0 else None
    return {"output": str(out), "rank": rank, "world_size": world,
            "count": m["count"] if m else None, "num_images": writer.num_images,
            "complete": bool(m and m["complete"]), "made_this_run": res["made_this_run"],
            "stopped_by_budget": res["stopped_by_budget"], "wall_seconds": time.perf_counter() - t0}


def run_synthesize_detection(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``dfkd-synthesize task=detection``: images from a detection synthesizer and, with each, the teacher
    detector's boxes on the stored pixels (and the synthesizer's targets)."""
    from dfkd import dist as D
    from dfkd.data.store import IMAGE_DTYPES, detection_class_names, detection_teacher_identity
    from dfkd.detection.models import DetectionTeacher, detector_metadata
    from dfkd.detection.run import (build_detection_source, check_task, detection_settings, load_detection_set,
                                    load_teacher_detector)
    from dfkd.errors import DfkdError
    from dfkd.pipeline import _plain, check_synthesizer_cfg, setup_runtime

    t0 = time.perf_counter()
    cfg_p = _plain(cfg)
    s = detection_settings(cfg_p.get("detection"))  # an unknown detection.* key is one line
    if str(cfg_p["image_dtype"]) not in IMAGE_DTYPES:
        raise DfkdError(f"image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {cfg_p['image_dtype']!r}")
    if cfg_p.get("import_folder"):
        raise DfkdError("import_folder imports class folders (task=classification); a detection dataset is "
                        "made by a detection synthesizer")
    syn = dict(cfg_p["synthesizer"])
    if syn.get("name") == "stored":
        raise DfkdError("dfkd-synthesize writes new datasets; synthesizer=stored only reads one")
    syn_cls, syn_name, _ = check_synthesizer_cfg(syn)  # cheap checks first: before the teacher is read
    check_task(syn_cls, syn_name, "detection")
    needs_real = bool(getattr(syn_cls, "needs_real_data", False))
    if needs_real and not s.train_path:
        raise DfkdError(f"synthesizer {syn_name!r} reads real train images: set detection.train_path=PATH")
    if float(syn.get("adi", 0) or 0) > 0:
        syn["adi"] = 0.0  # the competition term needs a student; a stored dataset is made without one
    device = setup_runtime(cfg_p)
    seed = int(cfg_p["seed"])
    tc = cfg_p["teacher"]
    model = load_teacher_detector(tc)
    tb = detector_metadata(model)
    teacher = DetectionTeacher(model.to(device).eval())
    dataset = load_detection_set(s.train_path, s.train_split, tb["in_chans"]) if needs_real else None
    rank, world = D.rank(), D.world_size()
    ckpt = tc.get("checkpoint")
    spec = {
        "task": "detection",
        "teacher": detection_teacher_identity(teacher),
        "teacher_checkpoint": Path(str(ckpt)).name if ckpt else None,  # the file name only (no machine paths)
        "synthesizer": {"name": syn_name, "config": syn},
        "seed": seed, "num_images": int(cfg_p["num_images"]), "shard_size": int(cfg_p["shard_size"]),
        "image_dtype": str(cfg_p["image_dtype"]), "input_size": list(teacher.input_size),
        "num_classes": int(teacher.num_classes), "class_names": detection_class_names(teacher, tc.get("class_names")),
        "score_thresh": float(s.score_thresh), "data": None, "dfkd_version": dfkd.__version__,
    }

    def make_synth(shard_seed: int):
        return build_detection_source(syn, teacher, None, tb, s, shard_seed, device, dataset=dataset)[0]

    make_synth(seed)  # settings errors surface before any file is written
    return _write(cfg_p, Path(str(cfg_p["output"])).expanduser(), spec, make_synth, teacher, device, rank, world, t0)


def task(cfg: DictConfig) -> dict:
    from dfkd import dist as D

    try:
        summary = run_synthesize(cfg)
    except BaseException:
        D.cleanup(synchronize=False)
        raise
    D.cleanup()
    if summary.get("count") is None:
        print(f"rank {summary['rank']}: wrote its shards of {summary['output']}; rank 0 writes manifest.json")
    else:
        state = "complete" if summary["complete"] else "incomplete (run the same command again to continue)"
        print(f"dataset {summary['output']}: {summary['count']} images, {state}; "
              f"{summary['made_this_run']} made in {summary['wall_seconds']:.1f} s")
    return summary


main = hydra_app("dfkd-synthesize", "synthesize", task)

if __name__ == "__main__":
    main()
