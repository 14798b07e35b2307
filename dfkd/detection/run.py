"""``dfkd-distill task=detection``: distil a smaller detector from a trained one, data-free.

    dfkd-distill task=detection teacher=detector teacher.checkpoint=DET.safetensors \\
        data=coco data.path=VAL synthesizer=box_inversion

The teacher is a detector dfkd saved (``save_detector``: ``DET.safetensors`` and ``DET.json``). No
training image is read: each round the synthesizer (``box_inversion``: DIODE-style inversion;
``box_noise``: the Gaussian floor; ``box_real``: real train images, the ceiling) makes a batch, and
the student takes ``kd_steps`` steps on a memory of those images against the teacher's pseudo-boxes
and its class distribution on its objects (:func:`dfkd.detection.train.distill_detector`).

The loop and student settings are ``detection.*`` (:class:`DetectionSettings`, the one place their
defaults live); the synthesizer's are ``synthesizer.*``. ``data`` (``coco``, ``yolo``, ``voc``,
``canvases`` with ``data.path``, or ``data.name=none``) is only the evaluation set: COCO mAP of the
student (and the teacher) at the end and every ``detection.eval_every`` steps. The student keeps the
teacher's detector type, input size, channels and normalisation.

The run folder holds ``student.safetensors`` + ``student.json`` (``load_detector`` reads them),
``metrics.jsonl`` (one line per round and per evaluation), ``summary.json``, ``config.json`` and
``checkpoint.pt`` — the whole run (student, optimizer, image memory, random generators, counters),
written every ``detection.checkpoint_every`` rounds: the same command with the same
``hydra.run.dir`` continues from it, and a larger ``detection.steps`` extends a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dfkd.errors import DfkdError, close_matches

log = logging.getLogger("dfkd")

DETECTION_DATA = ("coco", "yolo", "voc", "canvases")
CHECKPOINT_VERSION = 2  # 2: the engine's run state (dfkd.engine)


@dataclasses.dataclass
class DetectionSettings:
    """``detection.*``: the task=detection loop, student and evaluation settings."""

    steps: int = 3000                 # student optimizer steps
    kd_steps: Optional[int] = None    # student steps per synthesized batch (default: the synthesizer's)
    batch_size: int = 32
    lr: float = 5e-3                  # AdamW, cosine over the steps (or the budget, whichever ends first)
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    budget_minutes: Optional[float] = None  # also stop after this much wall time (resumes count it)
    score_thresh: float = 0.45        # teacher score for a pseudo-box
    class_kd: float = 2.0             # weight of the teacher's class distribution on its objects
    class_kd_temperature: float = 2.0
    feature_kd: float = 0.0           # YOLO student from the teacher: its neck features onto the teacher's kept channels
    freeze_bn: bool = False           # the student's BatchNorm keeps the running statistics it started with
    head_matching: bool = False       # also match every head output (same geometry)
    head_weight: float = 1.0
    memory_size: int = 4096           # synthetic images kept for the student
    flip: bool = True                 # the student's box-aware augmentation: flips,
    jitter: float = 0.1               # ± translation and
    scale: float = 0.1                # ± scale (fractions of the image)
    student_backbone: str = "small_cnn"  # small_cnn, resnet8_cifar..resnet110_cifar, vit_tiny, a timm ViT
    student_width: Optional[int] = None  # small CNN width (default: half the teacher's)
    student_fpn: Optional[int] = None    # pyramid/head channels (default: half the teacher's)
    student_head_convs: int = 1
    student_kwargs: dict = dataclasses.field(default_factory=dict)  # backbone arguments (ViT sizes)
    student_init: str = "scratch"     # scratch, or teacher: a YOLO student takes the teacher's channels
    compensate: str = "none"          # with student_init=teacher: none | dead_leaves | inversion: dropped channels
                                      # estimated from the kept ones under the teacher's statistics on such images
    compensate_images: int = 32       # how many (inversion: BatchNorm-matched dead leaves, no real data)
    compensate_iterations: int = 100  # inversion steps per image batch
    compensate_cache: Optional[str] = None  # a file keeping those images (reused by runs with the same settings)
    train_path: Optional[str] = None  # real train images (box_real only)
    train_split: Optional[str] = None
    val_split: Optional[str] = None   # YOLO split / COCO json name part of data.path
    max_val_images: Optional[int] = None
    eval_every: int = 0               # student steps between evaluations (0: at the end only)
    eval_every_seconds: Optional[float] = None  # or: at most one evaluation per this many seconds
    eval_images: Optional[int] = None  # images scored along the way (default: max_val_images)
    eval_score_thresh: float = 0.05   # detector score cut-off while scoring mAP
    eval_batch_size: int = 64
    score_teacher: bool = True        # also score the teacher at the end
    checkpoint_every: int = 5         # rounds between run-state saves

    # settings that may change between a run and its continuation
    RESUMABLE = ("steps", "budget_minutes", "val_split", "max_val_images", "eval_every", "eval_every_seconds",
                 "eval_images", "eval_score_thresh", "eval_batch_size", "score_teacher", "checkpoint_every")


def detection_settings(node: Mapping[str, Any] | None) -> DetectionSettings:
    """``cfg.detection`` → :class:`DetectionSettings`; an unknown key or a bad value is one line."""
    kw = dict(node or {})
    names = [f.name for f in dataclasses.fields(DetectionSettings)]
    for k in kw:
        if k not in names:
            raise DfkdError(f"unknown setting detection.{k}{close_matches(k, names)}; its settings: {', '.join(names)}")
    s = DetectionSettings(**kw)
    for k, lo in (("steps", 1), ("kd_steps", 1), ("batch_size", 1), ("memory_size", 1), ("student_width", 2),
                  ("student_fpn", 4), ("student_head_convs", 0), ("eval_every", 0), ("checkpoint_every", 1),
                  ("max_val_images", 1), ("eval_images", 1), ("eval_batch_size", 1),
                  ("compensate_images", 2), ("compensate_iterations", 1)):
        v = getattr(s, k)
        if v is not None and (not isinstance(v, int) or v < lo):
            raise DfkdError(f"detection.{k} must be an integer of at least {lo}, got {v!r}")
    for k in ("lr", "budget_minutes", "class_kd_temperature", "eval_every_seconds"):
        v = getattr(s, k)
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and v < float("inf")):
            raise DfkdError(f"detection.{k} must be a positive number, got {v!r}")
    for k in ("class_kd", "feature_kd", "weight_decay", "grad_clip", "head_weight", "jitter", "scale"):
        v = getattr(s, k)
        if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
            raise DfkdError(f"detection.{k} must be a number ≥ 0, got {v!r}")
    if s.student_init not in ("scratch", "teacher"):
        raise DfkdError(f"detection.student_init must be scratch or teacher, got {s.student_init!r}")
    from dfkd.detection.yolo_slim import COMPENSATE

    if s.compensate not in COMPENSATE:
        raise DfkdError(f"detection.compensate must be one of {', '.join(COMPENSATE)}, got {s.compensate!r}"
                        f"{close_matches(str(s.compensate), COMPENSATE)}")
    if s.compensate != "none" and s.student_init != "teacher":
        raise DfkdError("detection.compensate needs detection.student_init=teacher (it corrects the teacher's "
                        "weights a narrower student starts from)")
    if not isinstance(s.freeze_bn, bool):
        raise DfkdError(f"detection.freeze_bn must be true or false, got {s.freeze_bn!r}")
    if s.feature_kd > 0 and s.student_init != "teacher":
        raise DfkdError("detection.feature_kd needs detection.student_init=teacher (a YOLO student whose channels "
                        "are a subset of the teacher's)")
    if not 0 <= s.score_thresh < 1:
        raise DfkdError(f"detection.score_thresh must be in [0, 1), got {s.score_thresh}")
    return s


def _tasks(syn_cls: type) -> tuple[str, ...]:
    """The tasks a synthesizer makes data for: ``Synthesizer.task``, or ``tasks`` for a source of either kind."""
    return tuple(getattr(syn_cls, "tasks", (getattr(syn_cls, "task", "classification"),)))


def check_task(syn_cls: type, name: str, task: str) -> None:
    """A synthesizer makes data for one task (``Synthesizer.task``): say so in one line when it is not ``task``."""
    if task not in _tasks(syn_cls):
        from generators import SYNTHESIZERS

        fits = [n for n in SYNTHESIZERS if task in _tasks(SYNTHESIZERS.get(n))]
        raise DfkdError(f"synthesizer {name!r} makes {' or '.join(_tasks(syn_cls))} data, but task={task}; "
                        f"for {task} choose one of: {', '.join(fits)}")


def load_teacher_detector(teacher_cfg: Mapping[str, Any]):
    from dfkd.detection.models import load_detector
    from dfkd.detection.tv_detectors import is_tv_teacher, load_tv_teacher
    from dfkd.detection.yolo_task import is_yolo_teacher, load_yolo_teacher

    if is_tv_teacher(teacher_cfg):  # teacher=tv_detector: a torchvision builder name + a state dict
        return load_tv_teacher(teacher_cfg)
    if str(teacher_cfg.get("source") or "") == "hf_detector":  # a transformers save_pretrained folder
        from dfkd.detection.hf_detectors import load_hf_teacher

        return load_hf_teacher(teacher_cfg)
    if is_yolo_teacher(teacher_cfg):  # teacher=yolo, or a YOLO .pt/.yaml file
        return load_yolo_teacher(teacher_cfg)
    if teacher_cfg.get("model") is not None:
        raise DfkdError(f"task=detection reads the teacher's build from its checkpoint's JSON; teacher.model "
                        f"({teacher_cfg['model']!r}) must be unset: use teacher=detector teacher.checkpoint=DET")
    if not teacher_cfg.get("checkpoint"):
        raise DfkdError("task=detection needs a detector: teacher=detector teacher.checkpoint=DET.safetensors "
                        "(with DET.json beside it)")
    return load_detector(teacher_cfg["checkpoint"])


def _gray_transform(in_chans: int):
    if in_chans != 1:
        return None
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    # a one-channel detector is scored on the luminance of RGB images
    return lambda image, target: ((image * luma).sum(0, keepdim=True) if image.shape[0] == 3 else image[:1], target)


def load_eval_set(data_cfg: Mapping[str, Any], split: Optional[str], in_chans: int):
    """The evaluation set named by ``data`` (``None`` for ``data.name=none``)."""
    name = data_cfg.get("name")
    if name == "none":
        return None
    if name not in DETECTION_DATA:
        raise DfkdError(f"task=detection scores the student on data={'|'.join(DETECTION_DATA)} with data.path=PATH "
                        f"(or data.name=none for no evaluation), got data.name={name!r}")
    if not data_cfg.get("path"):
        raise DfkdError(f"data={name} needs data.path=PATH (the evaluation set)")
    return load_detection_set(data_cfg["path"], split, in_chans)


def load_detection_set(path, split: Optional[str], in_chans: int):
    """A COCO json / folder, a YOLO folder or a Pascal VOC folder; a one-channel detector reads its luminance."""
    from dfkd.data.detection import load_detection

    ds = load_detection(path, split=split)
    t = _gray_transform(in_chans)
    if t is not None:
        ds.transform = t
    return ds


def build_student_detector(tb: Mapping[str, Any], s: DetectionSettings):
    """The student: the teacher's detector type, size, channels and normalisation, a smaller backbone."""
    from dfkd.detection.models import build_detector

    if tb.get("arch") == "yolo":  # a narrower YOLO, or a dfkd FCOS for the YOLO's classes
        from dfkd.detection.yolo_task import build_yolo_task_student

        return build_yolo_task_student(tb, s)
    if tb.get("arch") == "torchvision":  # the teacher's builder with a smaller backbone, or a dfkd FCOS
        from dfkd.detection.tv_detectors import build_tv_student

        return build_tv_student(tb, s)
    if tb.get("arch") == "hf":  # a smaller transformers detector of the teacher's type, or a dfkd FCOS
        from dfkd.detection.hf_detectors import build_hf_student

        return build_hf_student(tb, s)
    small = s.student_backbone == "small_cnn"
    width = s.student_width or max(2, int(tb.get("width", 16)) // 2)
    fpn = s.student_fpn or max(4, int(tb.get("fpn_channels", 32)) // 2)
    return build_detector(tb["arch"], s.student_backbone, num_classes=tb["num_classes"],
                          image_size=tb["image_size"], in_chans=tb["in_chans"], mean=tb["mean"], std=tb["std"],
                          width=width if small else 16, fpn_channels=fpn, head_convs=s.student_head_convs,
                          score_thresh=tb.get("score_thresh", 0.2), nms_thresh=tb.get("nms_thresh", 0.5),
                          detections_per_img=tb.get("detections_per_img", 20),
                          backbone_kwargs=dict(s.student_kwargs or {}))


def _same_head_geometry(teacher_model, student, tb, device) -> bool:
    from dfkd.detection.models import head_outputs

    probe = torch.zeros(1, tb["in_chans"], tb["image_size"], tb["image_size"], device=device)
    try:
        with torch.no_grad():
            shapes = [tuple(head_outputs(m, probe)["cls_logits"].shape) for m in (teacher_model, student)]
    except DfkdError:  # a detector without a one-stage head (Faster R-CNN)
        return False
    return shapes[0] == shapes[1]


def build_detection_source(syn_cfg: Mapping[str, Any], teacher, student, tb, s: DetectionSettings, seed: int,
                           device: torch.device, dataset=None):
    """The synthesizer from ``synthesizer.*`` (checked against its constructor and the task); ``dataset``:
    the real train images already read (else read from ``detection.train_path`` when the source needs them)."""
    from dfkd.pipeline import check_synthesizer_cfg

    cls, name, kw = check_synthesizer_cfg(syn_cfg)
    check_task(cls, name, "detection")
    if getattr(cls, "needs_real_data", False):
        if dataset is None and not s.train_path:
            raise DfkdError(f"synthesizer {name!r} reads real train images: set detection.train_path=PATH")
        kw["dataset"] = dataset if dataset is not None else load_detection_set(s.train_path, s.train_split,
                                                                                tb["in_chans"])
    if float(kw.get("adi", 0) or 0) > 0 and not _same_head_geometry(teacher.model, student, tb, device):
        log.warning("synthesizer.adi needs a student head of the teacher's geometry; running without it")
        kw["adi"] = 0.0
    if isinstance(kw.get("size"), list):
        kw["size"] = tuple(kw["size"])
    try:
        return cls(teacher=teacher, seed=seed, device=device, **kw), name
    except (TypeError, ValueError) as e:
        raise DfkdError(f"synthesizer {name!r}: {e}") from None


def initial_student(teacher_model, tb: Mapping[str, Any], s: DetectionSettings, seed: int, device,
                    compensate: bool = True):
    """The student as distillation starts: built for the teacher ``tb`` describes (seeded), and with
    ``detection.student_init=teacher`` given the teacher's weights by channel selection (YOLO students),
    compensated for its dropped channels per ``detection.compensate`` (skipped with ``compensate=False``:
    a resumed run restores its student)."""
    torch.manual_seed(seed)
    student = build_student_detector(tb, s).to(device)
    if s.student_init == "teacher":  # dfkd.detection.yolo_slim
        from dfkd.detection.yolo_task import init_yolo_student

        init_yolo_student(student, teacher_model, tb, s, seed=seed, compensate=compensate)
    return student


def score_detector(model, dataset, s: DetectionSettings, device, max_images: Optional[int] = None) -> dict:
    """COCO mAP of ``model`` on ``dataset`` with the low-score tail mAP needs (the cut-off is restored)."""
    from dfkd.eval.detection import evaluate_detector

    old = model.score_thresh
    model.score_thresh = min(old, s.eval_score_thresh)
    try:
        return evaluate_detector(model, dataset, batch_size=s.eval_batch_size, device=device,
                                 max_images=max_images, progress=False)
    finally:
        model.score_thresh = old


def _fingerprint(cfg: Mapping[str, Any], s: DetectionSettings) -> dict:
    det = {k: v for k, v in dataclasses.asdict(s).items() if k not in DetectionSettings.RESUMABLE}
    return json.loads(json.dumps({"detection": det, "synthesizer": cfg.get("synthesizer"),
                                  "teacher": cfg.get("teacher"), "seed": cfg.get("seed")}, default=str))


def _load_checkpoint(path: Path, fingerprint: dict) -> Optional[dict]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say so, do not guess
        raise DfkdError(f"cannot read the saved run {path} ({type(e).__name__}); use resume=false or another "
                        "hydra.run.dir") from None
    if not isinstance(saved, dict) or saved.get("version") != CHECKPOINT_VERSION or saved.get("task") != "detection":
        raise DfkdError(f"{path} is not a task=detection run of this version; use resume=false or another hydra.run.dir")
    diff = _diff(saved["settings"], fingerprint)
    if diff:
        k, a, b = diff[0]
        raise DfkdError(f"{path.parent} holds a run with other settings ({k}: {a!r} there, {b!r} now"
                        f"{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); use the same settings to "
                        "resume, resume=false to start over, or another hydra.run.dir")
    return saved["run"]


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{'.' if prefix else ''}{k}")
        return out
    return [] if a == b else [(prefix, a, b)]


def run_detection(cfg: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Everything ``dfkd-distill task=detection`` does: build, distil, evaluate, write the run folder."""
    import dfkd
    from dfkd.detection.boxes import BoxAugment
    from dfkd.detection.models import DetectionTeacher, detector_metadata, save_detector
    from dfkd.detection.train import distill_detector
    from dfkd.models.checkpoint import atomic_torch_save, atomic_write_json
    from dfkd.pipeline import _plain, hardware, peak_memory_mb, setup_runtime

    t_start = time.perf_counter()
    cfg = _plain(cfg)
    s = detection_settings(cfg.get("detection"))
    device = setup_runtime(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    progress = bool(cfg.get("progress", True))

    from dfkd.pipeline import check_synthesizer_cfg  # cheap checks first: before any model is built

    syn_cls, syn_name, _ = check_synthesizer_cfg(cfg["synthesizer"])
    check_task(syn_cls, syn_name, "detection")
    teacher_model = load_teacher_detector(cfg["teacher"])
    tb = detector_metadata(teacher_model)
    val_set = load_eval_set(cfg["data"], s.val_split, tb["in_chans"])
    fingerprint = _fingerprint(cfg, s)
    ckpt_path = run_dir / "checkpoint.pt"
    state = None
    if ckpt_path.is_file() and cfg.get("resume", True):
        state = _load_checkpoint(ckpt_path, fingerprint)
        print(f"resuming {run_dir} at step {state['step']} ({state['elapsed']:.1f} s done)", file=sys.stderr, flush=True)

    teacher_model.to(device).eval()
    teacher = DetectionTeacher(teacher_model)
    t_init = time.perf_counter()
    student = initial_student(teacher_model, tb, s, seed, device, compensate=state is None)
    init_seconds = time.perf_counter() - t_init
    source, _ = build_detection_source(cfg["synthesizer"], teacher, student, tb, s, seed, device)
    kd_steps = s.kd_steps or int(getattr(syn_cls, "default_kd_steps", 4))
    feature_channels = None
    if s.feature_kd > 0:
        from dfkd.detection.yolo_slim import kept_channels

        feature_channels = kept_channels(teacher_model, student, str((s.student_kwargs or {}).get("importance", "bn")))
    atomic_write_json(run_dir / "config.json", cfg)

    def checkpoint(run_state: dict) -> None:
        atomic_torch_save({"version": CHECKPOINT_VERSION, "task": "detection", "settings": fingerprint,
                           "run": run_state}, ckpt_path)

    eval_fn = None
    if val_set is not None and (s.eval_every or s.eval_every_seconds):
        along = s.eval_images or s.max_val_images

        def eval_fn(model) -> dict:
            now = time.perf_counter()
            r = score_detector(model, val_set, s, device, along)
            return {"map": r["map"], "map50": r["map50"], "eval_seconds": round(time.perf_counter() - now, 3)}

    res = distill_detector(teacher, student, source, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                           weight_decay=s.weight_decay, score_thresh=s.score_thresh, head_matching=s.head_matching,
                           head_weight=s.head_weight, class_kd=s.class_kd,
                           class_kd_temperature=s.class_kd_temperature, feature_kd=s.feature_kd,
                           feature_channels=feature_channels, freeze_bn=s.freeze_bn, memory_size=s.memory_size,
                           kd_steps_per_round=kd_steps, augment=BoxAugment(flip=s.flip, jitter=s.jitter,
                                                                           scale=s.scale),
                           grad_clip=s.grad_clip,
                           budget_seconds=60 * s.budget_minutes if s.budget_minutes else None, device=device,
                           seed=seed, progress=progress, eval_fn=eval_fn, eval_every=s.eval_every,
                           eval_every_seconds=s.eval_every_seconds, metrics_path=str(run_dir / "metrics.jsonl"),
                           tensorboard_dir=str(run_dir / "tb"),
                           state=state, checkpoint_fn=checkpoint,
                           checkpoint_every=s.checkpoint_every)
    student.eval()
    save_detector(student, run_dir / "student.safetensors")
    summary: dict[str, Any] = {
        "task": "detection", "synthesizer": syn_name, "steps": res["steps"], "rounds": res["rounds"],
        "kd_steps": kd_steps, "distill_seconds": res["wall"], "images_synthesized": res["images_synthesized"],
        "synth_seconds": res["synth_seconds"],
        "synth_images_per_second": (res["images_synthesized"] / res["synth_seconds"]
                                    if res["synth_seconds"] > 0 else None),
        "head_matching": res["head_matching"], "class_kd": res["class_kd"], "adi": getattr(source, "w_adi", None),
        "time_to_map": [[e["wall"], e["step"], e["map"], e["map50"]] for e in res["evals"] if "map50" in e],
        "eval_seconds_in_budget": round(sum(e.get("eval_seconds", 0.0) for e in res["evals"]), 3),
        "student_init": s.student_init, "compensate": s.compensate,
        "student_init_seconds": round(init_seconds, 3),
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher_model.parameters()),
        "teacher": tb, "student": detector_metadata(student),
    }
    if val_set is not None:
        t0 = time.perf_counter()
        r = score_detector(student, val_set, s, device, s.max_val_images)
        summary.update({"student_map": r["map"], "student_map50": r["map50"], "student_map75": r["map75"],
                        "per_class_ap": r["per_class"], "num_detections": r.get("num_detections"),
                        "val_images": r["num_images"], "final_eval_seconds": round(time.perf_counter() - t0, 3)})
        if s.score_teacher:
            t = score_detector(teacher_model, val_set, s, device, s.max_val_images)
            summary.update({"teacher_map": t["map"], "teacher_map50": t["map50"], "teacher_map75": t["map75"],
                            "teacher_per_class_ap": t["per_class"]})
    summary.update({"wall_seconds": time.perf_counter() - t_start, "run_dir": str(run_dir), "device": str(device),
                    "peak_memory_mb": peak_memory_mb(device), "seed": seed, "hardware": hardware(),
                    "dfkd_version": dfkd.__version__})
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def format_detection_summary(summary: Mapping[str, Any], run_dir: Path) -> str:
    def m(key: str) -> str:
        v = summary.get(key)
        return "-" if v is None else f"{v:.4f}  (mAP@.5 {summary.get(key + '50', float('nan')):.4f})"

    rows = [("teacher mAP", m("teacher_map")), ("student mAP", m("student_map")),
            ("synthesizer", str(summary.get("synthesizer"))),
            ("steps", f"{summary['steps']} ({summary['images_synthesized']} images synthesized)"),
            ("student params", f"{summary['student_params']} (teacher {summary['teacher_params']})"),
            ("wall time", f"{summary['wall_seconds']:.1f} s"), ("run folder", str(run_dir))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
