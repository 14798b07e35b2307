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
from dfkd.data import DataSpec, fit_to_teacher, load_dataset
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


def load_data(data_cfg: Mapping[str, Any], train: bool = True, spec=None) -> DataSpec:
    """Load the dataset; ``train=False`` skips the train split where reading it costs anything
    (a data-free run needs only the test split). With a teacher ``spec`` the data is fitted to the
    teacher: resized the way it expects, labels mapped to its classes by name."""
    from dfkd.data import fit_to_teacher

    kw = dict(_plain(data_cfg))
    name = kw.pop("name")
    for k in ("batch_size",):
        kw.pop(k, None)
    if name != "image_folder":
        kw.pop("workers", None)
    data = load_dataset(name, train=train, **{k: v for k, v in kw.items() if v is not None})
    return fit_to_teacher(data, spec) if spec is not None else data


def _wrap_kwargs(data: DataSpec, kwargs: dict) -> dict:
    kw = {"num_classes": data.num_classes, **kwargs}
    return kw


SPEC_FIELDS = ("input_size", "num_classes", "mean", "std", "interpolation", "crop_pct", "class_names")


def _head_classes(ckpt: Mapping[str, torch.Tensor], name: Optional[str]) -> Optional[int]:
    """The class count a checkpoint's classifier head has (timm's pretrained_cfg names the head)."""
    heads = []
    try:
        import timm

        if name and timm.is_model(name):
            cls = timm.models.get_pretrained_cfg(name)
            if cls is not None and getattr(cls, "classifier", None):
                c = cls.classifier
                heads += list(c) if isinstance(c, (list, tuple)) else [c]
    except Exception:  # noqa: BLE001 - only a hint
        pass
    heads += ["head", "head.fc", "fc", "classifier", "linear", "head.l", "last_linear", "classifier.1",
              "classifier.6", "heads.head"]
    for h in heads:
        w = ckpt.get(f"{h}.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])
    return None


def _build_or_retry(name: str, source: str, kwargs: dict) -> torch.nn.Module:
    """Build; a task-derived keyword the model does not take (``img_size`` on a CNN) is dropped."""
    try:
        return build_model(name, source=source, **kwargs)
    except DfkdError as e:
        for k in ("img_size", "in_chans"):
            if k in kwargs and k in str(e):
                return _build_or_retry(name, source, {kk: v for kk, v in kwargs.items() if kk != k})
        raise


def build_teacher_model(tc: Mapping[str, Any], num_classes: Optional[int] = None):
    """The teacher network from its config: a dfkd/timm/torchvision name (``teacher.model``, or the one the
    checkpoint's JSON or timm ``args`` names), or a user's builder (``teacher._target_``), with the checkpoint
    loaded. Returns (model, spec layers in priority order, a note of which weights were used)."""
    from dfkd.models import import_callable
    from dfkd.models.checkpoint import load_checkpoint_into, read_checkpoint
    from dfkd.spec import from_checkpoint_args, json_beside

    ckpt_path = tc.get("checkpoint")
    beside = json_beside(ckpt_path)
    ck = read_checkpoint(ckpt_path) if ckpt_path else None
    args = (ck.meta.get("args") if ck is not None else None) or {}
    target = tc.get("_target_")
    name = tc.get("model") or beside.get("model") or args.get("model") or (ck.meta.get("arch") if ck is not None else None)
    kwargs = dict(beside.get("kwargs") or {}) if beside.get("model") in (None, name) else {}
    if args.get("model") in (None, name) and isinstance(args.get("model_kwargs"), Mapping):
        kwargs.update(args["model_kwargs"])  # timm's train.py --model-kwargs
    kwargs.update(tc.get("kwargs") or {})
    config_layer = {k: tc.get(k) for k in SPEC_FIELDS}
    if target is None and not name:
        raise DfkdError("no teacher model named: set teacher.model=NAME (dfkd, timm or torchvision) or "
                        "teacher._target_=package.module:builder, or give a checkpoint with dfkd's JSON beside it")
    if target is None:
        n = config_layer.get("num_classes") or num_classes or beside.get("num_classes") or args.get("num_classes")
        if n is None and ck is not None:
            n = _head_classes(ck, name)
        if n is not None:
            kwargs.setdefault("num_classes", int(n))
        if args and "img_size" not in kwargs and args.get("img_size"):
            kwargs["img_size"] = args["img_size"]
        if args and "in_chans" not in kwargs and args.get("in_chans"):
            kwargs["in_chans"] = args["in_chans"]
        model = _build_or_retry(name, str(tc.get("source") or "auto"), kwargs)
    else:
        try:
            model = import_callable(str(target))(**kwargs)
        except DfkdError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's builder
            raise DfkdError(f"teacher._target_={target!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(model, torch.nn.Module):
            raise DfkdError(f"teacher._target_={target!r} returned {type(model).__name__}, not an nn.Module")
    if beside.get("norm_eps") is not None:  # a converted ViT: timm builds its LayerNorms with eps 1e-6
        from dfkd.models.convert import apply_norm_eps

        apply_norm_eps(model, beside["norm_eps"])
    used = ""
    if ckpt_path:
        ck = load_checkpoint_into(model, ckpt_path)
        used = ck.source
        if ck.source.startswith("state_dict_ema"):
            log.info("teacher: using the EMA weights (state_dict_ema) of %s", ckpt_path)
    layers = [("config", config_layer), ("checkpoint JSON", beside), ("checkpoint args", from_checkpoint_args(args))]
    return model, layers, {"name": name or str(target), "kwargs": kwargs, "weights": used}


def build_teacher(teacher_cfg: Mapping[str, Any], data: Optional[DataSpec], device: torch.device,
                  seed: int = 0, progress: bool = True) -> Teacher:
    """Build the teacher from its config; its spec (input size, classes, normalisation) comes from the
    teacher (see :mod:`dfkd.spec`). With no checkpoint and ``train_if_missing``, it is trained on ``data``'s
    train split and cached, and then the dataset defines its spec."""
    from dfkd.models.checkpoint import load_checkpoint_into
    from dfkd.spec import check_output_size, from_model, json_beside, resolve_spec

    tc = _plain(teacher_cfg)
    ckpt = tc.get("checkpoint")
    if ckpt or tc.get("_target_") or not tc.get("train_if_missing"):
        if not ckpt and not tc.get("_target_"):
            raise DfkdError(f"teacher {tc.get('model')!r} has no checkpoint: set teacher.checkpoint=PATH "
                            "(or teacher.train_if_missing=true to train one on the data's train split)")
        model, layers, info = build_teacher_model(tc)
        path = ckpt
    else:
        if data is None or data.train is None:
            raise DfkdError("teacher.train_if_missing needs a dataset with a train split")
        kwargs = _wrap_kwargs(data, tc.get("kwargs") or {})
        mean = tc.get("mean") or list(data.mean)
        std = tc.get("std") or list(data.std)
        model = build_model(tc["model"], **kwargs)
        key = json.dumps({"model": tc["model"], "kwargs": kwargs, "train": tc.get("train"), "mean": mean,
                          "std": std, "data": data.name, "n_train": len(data.train), "seed": seed},
                         sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        path = cache_dir() / "teachers" / f"{data.name}_{tc['model']}_{digest}.safetensors"
        build = {"model": tc["model"], "kwargs": kwargs, "mean": mean, "std": std,
                 "input_size": list(data.input_size), "num_classes": data.num_classes,
                 "class_names": list(data.class_names) or None}
        if path.is_file():
            log.info("teacher: cached %s", path)
            load_checkpoint_into(model, path)
        else:
            log.info("teacher: training %s on the %s train split (cached at %s)", tc["model"], data.name, path)
            net = Normalized(model, mean, std, data.input_size, data.num_classes)
            tr = tc.get("train") or {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                train_classifier_from_cfg(net, data, tr, device, seed, progress)
            save_model(model, path, build=build)
            from dfkd.priors_vit import save_teacher_token_statistics  # ViT teachers: like BatchNorm running stats

            save_teacher_token_statistics(net, data.train, path, seed=seed)
        layers = [("config", {k: tc.get(k) for k in SPEC_FIELDS}), ("checkpoint JSON", json_beside(path)),
                  (f"trained on {data.name}", build)]
        info = {"name": tc["model"], "kwargs": kwargs, "weights": "trained here"}
    own, source = from_model(model)
    layers.append((source, own))
    if not any(layer.get("num_classes") for _, layer in layers):
        probe = next((layer.get("input_size") for _, layer in layers if layer.get("input_size")), None)
        if probe is not None:  # the model's own output width
            with torch.no_grad():
                out = model.eval()(torch.rand(1, *[int(v) for v in probe], generator=torch.Generator().manual_seed(0)))
            layers.append(("model output", {"num_classes": int(out.shape[-1])}))
    spec = resolve_spec(layers)
    check_output_size(model, spec)
    from dfkd.priors_vit import attach_saved_token_statistics  # *.token_stats.safetensors beside a ViT checkpoint

    if path:
        attach_saved_token_statistics(model, path)
    log.info("%s", spec.describe())
    teacher = Teacher.from_spec(model, spec).to(device)
    teacher.build_info = info
    return teacher


def train_classifier_from_cfg(net: Normalized, data: DataSpec, tr: Mapping[str, Any], device, seed: int,
                              progress: bool) -> dict[str, float]:
    from dfkd.train import train_classifier

    aug = build_augment(data.input_size, crop_padding=int(tr.get("crop_padding", 1)), flip=bool(tr.get("flip", False)))
    return train_classifier(net, data.train, data.test, epochs=int(tr.get("epochs", 30)),
                            batch_size=int(tr.get("batch_size", 64)), lr=float(tr.get("lr", 0.05)),
                            weight_decay=float(tr.get("weight_decay", 5e-4)), augment=aug, device=device,
                            seed=seed, progress=progress, optimizer=str(tr.get("optimizer", "sgd")))


# ViT students chosen for a teacher when none is named (student=auto): width, depth, heads, MLP ratio,
# largest first; the first one with at most half the teacher's parameters is taken.
AUTO_VIT_LADDER = ((192, 12, 3, 4.0), (192, 6, 3, 4.0), (128, 6, 4, 4.0), (128, 4, 4, 2.0), (96, 4, 4, 2.0),
                   (64, 4, 4, 2.0), (48, 4, 4, 2.0), (32, 4, 4, 2.0), (32, 2, 2, 2.0), (16, 2, 2, 2.0),
                   (16, 1, 2, 2.0))


def _spec_of(spec_or_data, mean=None, std=None):
    from dfkd.spec import TeacherSpec

    if isinstance(spec_or_data, TeacherSpec):
        return spec_or_data
    d = spec_or_data  # a DataSpec (older callers): its size and classes, the given normalisation
    return TeacherSpec(tuple(d.input_size), int(d.num_classes), list(mean if mean is not None else d.mean),
                       list(std if std is not None else d.std), class_names=list(d.class_names) or None)


def _patch_for(side: int) -> int:
    return 2 if side <= 16 else 4 if side <= 64 else 16


def auto_student(spec, teacher_params: Optional[int]) -> tuple[str, dict]:
    """A timm ViT for the teacher's input: patches of 2 px up to 16-px images, 4 px up to 64, 16 above;
    the widest of :data:`AUTO_VIT_LADDER` with at most half the teacher's parameters."""
    c, h, w = spec.input_size
    base = {"img_size": [h, w] if h != w else h, "patch_size": _patch_for(min(h, w)), "in_chans": c,
            "num_classes": spec.num_classes}
    if min(h, w) < 64:
        base.update(global_pool="avg", class_token=False)
    chosen = None
    for e, d, nh, m in AUTO_VIT_LADDER:
        kw = {**base, "embed_dim": e, "depth": d, "num_heads": nh, "mlp_ratio": m}
        if teacher_params is None:
            chosen = kw if min(h, w) >= 128 or e <= 64 else None
            if chosen:
                break
            continue
        with torch.device("meta"):  # counted without allocating or drawing random numbers
            n = count_parameters(build_model("vit_tiny_patch16_224", **kw))
        chosen = kw
        if n <= teacher_params // 2:
            break
    return "vit_tiny_patch16_224", chosen


def build_student(student_cfg: Mapping[str, Any], spec, mean=None, std=None,
                  teacher_params: Optional[int] = None) -> tuple[Normalized, dict]:
    """The student takes [0, 1] images normalised like the teacher's, at the teacher's input size, with its
    class count: ``num_classes``, ``in_chans`` and (for ViTs) ``img_size`` come from the teacher's spec
    unless ``student.kwargs`` sets them. With no ``student.model``, :func:`auto_student` picks a ViT."""
    spec = _spec_of(spec, mean, std)
    sc = _plain(student_cfg)
    c, h, w = spec.input_size
    name = sc.get("model")
    user = dict(sc.get("kwargs") or {})
    if not name:
        name, kwargs = auto_student(spec, teacher_params)
        kwargs.update(user)
    else:
        kwargs = {"num_classes": spec.num_classes, **user}
        import timm

        if name not in MODELS_REGISTRY() and timm.is_model(name):
            kwargs.setdefault("in_chans", c)
            kwargs.setdefault("img_size", [h, w] if h != w else h)
        elif name in MODELS_REGISTRY():
            import inspect as _inspect

            from dfkd.models import MODELS

            params = _inspect.signature(MODELS.get(name)).parameters
            if "in_chans" in params:
                kwargs.setdefault("in_chans", c)
    model = _build_or_retry(name, str(sc.get("source") or "auto"), kwargs)
    if sc.get("checkpoint"):
        from dfkd.models.checkpoint import load_checkpoint_into

        load_checkpoint_into(model, sc["checkpoint"])
    student = Normalized(model, spec.mean, spec.std, spec.input_size, spec.num_classes)
    meta = student.metadata()
    build = {"model": name, "kwargs": kwargs, **meta, "interpolation": spec.interpolation,
             "crop_pct": spec.crop_pct, "class_names": spec.class_names, "dfkd_version": dfkd.__version__}
    return student, build


def student_init(student_cfg: Mapping[str, Any]) -> str:
    init = str(_plain(student_cfg).get("init") or "scratch")
    if init not in ("scratch", "teacher"):
        raise DfkdError(f"student.init must be 'scratch' or 'teacher', got {init!r}")
    return init


def start_student(student_cfg: Mapping[str, Any], student: torch.nn.Module, teacher) -> Optional[dict]:
    """``student.init``: ``scratch`` (as built) or ``teacher`` (copy the teacher's matching weights, evenly
    spaced blocks where the student is shallower); returns what was copied (None: scratch)."""
    if student_init(student_cfg) == "scratch":
        return None
    if teacher is None:
        raise DfkdError("student.init=teacher needs the teacher's weights (this run has no teacher)")
    from dfkd.models.from_teacher import describe, init_from_teacher

    report = init_from_teacher(student, teacher.model)
    from dfkd import dist as D

    if D.is_main():
        log.info(describe(report))
    return {k: report[k] for k in ("copied_parameters", "student_parameters", "blocks")}


def MODELS_REGISTRY():
    from dfkd.models import MODELS

    return MODELS


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
                     per_class: int = 8, min_side: int = 32, max_classes: int = 20, max_side: int = 96) -> None:
    """A PNG with one row of up to ``per_class`` images per class (the first ``max_classes`` classes
    present, for teachers with many classes); images larger than ``max_side`` are shown downscaled."""
    from torchvision.utils import save_image

    labels = labels.cpu()
    present = [k for k in range(num_classes) if bool((labels == k).any())][:max_classes]
    c, h, w = images.shape[1:]
    scale_down = max(h, w) > max_side
    oh, ow = (max(1, h * max_side // max(h, w)), max(1, w * max_side // max(h, w))) if scale_down else (h, w)
    rows = []
    for k in present:
        sel = images[labels == k][:per_class].float().cpu()
        if scale_down:
            sel = torch.nn.functional.interpolate(sel, size=(oh, ow), mode="bilinear", antialias=True,
                                                  align_corners=False)
        pad = torch.ones(per_class - len(sel), c, oh, ow)
        rows.append(torch.cat([sel, pad]))
    if not rows:
        return
    grid = torch.cat(rows)
    scale = max(1, min_side // max(oh, ow))
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
    if hasattr(os, "getloadavg"):  # other work on the machine changes wall-clock figures: say how much
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
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
    needs_real = bool(getattr(syn_cls, "needs_real_data", False))
    trains_teacher = bool(tc.get("train_if_missing") and not tc.get("checkpoint") and not tc.get("_target_"))
    # a stored dataset distilled with its stored logits needs no teacher
    stored_only = (_plain(cfg["synthesizer"]).get("name") == "stored"
                   and str(_plain(cfg["distill"]).get("teacher_logits")) == "stored")
    raw = load_data(cfg["data"], train=needs_real or trains_teacher)  # paths are checked here, before the teacher
    if needs_real and raw.train is None:
        raise DfkdError(f"synthesizer {syn_name!r} needs real train images; data {raw.name!r} has no train split "
                        "(data=npz data.train_path=... or a built-in dataset)")
    student_loss = build_loss_from_cfg(cfg["loss"])
    settings = DistillSettings(**_plain(cfg["distill"]))
    settings.validate()
    check_synthesizer_settings(cfg["synthesizer"])
    if student_init(cfg["student"]) == "teacher" and stored_only:
        raise DfkdError("student.init=teacher needs the teacher's weights; distill.teacher_logits=stored runs "
                        "without the teacher (use live)")
    if not D.is_main():
        D.barrier()  # rank 0 trains (or finds) the cached teacher first
    if stored_only:
        teacher = None
        spec = stored_spec(cfg["synthesizer"])
    else:
        if trains_teacher:  # the student's settings are checked before the teacher trains
            with torch.random.fork_rng(devices=[]):  # without drawing from the run's random numbers
                build_student(cfg["student"], _spec_of(raw, tc.get("mean"), tc.get("std")))
        teacher = build_teacher(cfg["teacher"], raw if trains_teacher else None, device, seed=seed,
                                progress=progress and D.is_main())
        spec = teacher.spec
    if D.is_main():
        D.barrier()
    data = fit_to_teacher(raw, spec)
    t_teacher = time.perf_counter() - t_start
    teacher_params = count_parameters(teacher.model) if teacher is not None else None
    # the student's initial weights (and every random number after them) depend on the seed only, not on
    # how the teacher was found (loaded, trained, or absent for a stored dataset)
    torch.manual_seed(seed)
    student, build = build_student(cfg["student"], spec, teacher_params=teacher_params)
    init_report = start_student(cfg["student"], student, teacher)
    aug = build_augment(spec.input_size, **_plain(cfg["augment"]))
    teacher_eval = evaluate(teacher, data.test, device=device) if teacher is not None and data.test is not None \
        else {"top1": None}
    # each rank synthesizes its own samples: a seed of its own
    synth = build_synthesizer_from_cfg(cfg["synthesizer"], teacher, data, seed + 1000 * D.rank(), device)
    if tuple(synth.input_size) != tuple(spec.input_size) or synth.num_classes != spec.num_classes:
        raise DfkdError(f"the synthesizer's images ({synth.num_classes} classes, {tuple(synth.input_size)}) do not "
                        f"fit the teacher ({spec.num_classes} classes, {tuple(spec.input_size)})")
    if D.is_main():
        atomic_write_json(run_dir / "config.json", _plain(cfg))
        atomic_write_json(run_dir / "teacher_spec.json", {**spec.to_json(), "sources": spec.sources})
    distiller = Distiller(teacher, student, synth, settings, data.test, augment=aug, run_dir=run_dir,
                          device=device, seed=seed + 1000 * D.rank(), progress=progress, loss=student_loss)
    result = distiller.fit(resume=bool(cfg.get("resume", True)))
    if not D.is_main():
        return {"rank": D.rank(), **result}
    # the weight average when distill.ema > 0 (what was evaluated), else the student as trained
    save_model(distiller.eval_model.model, run_dir / "student.safetensors", build=build)
    if distiller.memory.size:
        save_sample_grid(distiller.memory.as_float(),
                         distiller.memory.labels[: distiller.memory.size].cpu(), run_dir / "samples.png",
                         spec.num_classes)
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
        "student_init": init_report,
        "synth_images_per_second": result["synth_images_per_second"],
        "student_model": build["model"],
        "student_params": count_parameters(student.model),
        "teacher_params": teacher_params,
        "compression": (teacher_params / count_parameters(student.model)) if teacher_params else None,
        "test_set": None if data.test is None else {
            "name": data.name, "images": teacher_eval.get("n", len(data.test)),
            "unreadable_skipped": int(getattr(data.test, "skipped", 0))},
        "teacher_spec": {**spec.to_json(), "sources": spec.sources},
        "synthesis": synthesis_stats(distiller.history),
        "device": str(device),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_host_memory_mb": peak_memory_mb(torch.device("cpu")),
        "checkpoint_mb": (distiller.checkpoint_path.stat().st_size / 2**20
                          if distiller.checkpoint_path is not None and distiller.checkpoint_path.is_file() else None),
        "seed": seed,
        "hardware": hardware(),
        "dfkd_version": dfkd.__version__,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def synthesis_stats(history: list[dict]) -> dict[str, float]:
    """The mean of every synthesis statistic the rounds logged (``syn/...`` and friends)."""
    skip = {"round", "wall", "lr", "kd_loss"}
    acc: dict[str, list[float]] = {}
    for rec in history:
        for k, v in rec.items():
            if k not in skip and not k.startswith("test/") and isinstance(v, (int, float)):
                acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def stored_spec(syn_cfg: Mapping[str, Any]):
    """The teacher's spec as a stored dataset's manifest recorded it (a run that needs no teacher)."""
    from dfkd.data.store import SyntheticStore
    from dfkd.spec import resolve_spec

    path = _plain(syn_cfg).get("path")
    if not path:
        raise DfkdError("synthesizer=stored needs synthesizer.path=DATASET")
    store = SyntheticStore(path, verify=False)
    t = store.teacher
    layer = {"input_size": list(store.input_size), "num_classes": store.num_classes, "mean": t.get("mean"),
             "std": t.get("std"), "class_names": store.class_names}
    return resolve_spec([("stored dataset manifest", layer)])


def check_synthesizer_settings(syn_cfg: Mapping[str, Any]) -> None:
    """Cheap range checks on the common synthesizer settings, before any long work."""
    kw = _plain(syn_cfg)
    for k in ("batch_size",):
        if k in kw and (not isinstance(kw[k], int) or kw[k] <= 0):
            raise DfkdError(f"synthesizer.{k} must be a positive integer, got {kw[k]!r}")
    for k in ("iterations", "steps", "g_steps", "max_rounds"):
        if k in kw and kw[k] is not None and (not isinstance(kw[k], int) or kw[k] < 0):
            raise DfkdError(f"synthesizer.{k} must be a non-negative integer, got {kw[k]!r}")
    for k in ("lr",):
        if k in kw and kw[k] is not None and float(kw[k]) <= 0:
            raise DfkdError(f"synthesizer.{k} must be positive, got {kw[k]!r}")
    if kw.get("name") in ("stored", "diffusion") and kw.get("path"):
        p = Path(str(kw["path"])).expanduser()
        if not p.exists():
            raise DfkdError(f"synthesizer.path not found: {p}")
    cls, _, settings = check_synthesizer_cfg(syn_cfg)
    if hasattr(cls, "check_settings"):  # e.g. a missing synthesizer.path, before the teacher is built
        cls.check_settings(settings)


def format_summary(summary: Mapping[str, Any], run_dir: Path) -> str:
    if summary.get("task") == "detection":
        from dfkd.detection.run import format_detection_summary

        return format_detection_summary(summary, run_dir)
    no_data = summary.get("test_set") is None and "test_set" in summary
    dash = "- (no test data)" if no_data else "-"
    tp, sp = summary.get("teacher_params"), summary.get("student_params")
    rows = [
        ("teacher top-1", f"{summary['teacher_top1']:.4f}" if summary.get("teacher_top1") is not None else dash),
        ("student top-1", f"{summary['student_top1']:.4f}" if summary.get("student_top1") is not None else dash),
        ("teacher params", f"{tp:,}" if tp else "-"),
        ("student params", f"{sp:,}" if sp else "-"),
        ("compression", f"{tp / sp:.1f}x fewer parameters" if tp and sp else "-"),
        ("synthesizer", str(summary.get("synthesizer"))),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
        ("run folder", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
