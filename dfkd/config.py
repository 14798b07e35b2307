"""Typed configuration schemas, registered in Hydra's ConfigStore.

The YAML files under ``configs/`` fill these; a key that does not exist, a value of the wrong
type or an enum value outside its choices fails when the config is composed, before any work.
Synthesizer settings are checked against the chosen synthesizer's own keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class Schedule(str, Enum):
    cosine = "cosine"
    constant = "constant"


class Mix(str, Enum):
    none = "none"
    mixup = "mixup"
    cutmix = "cutmix"
    both = "both"      # alternate mixup and CutMix


class TeacherLogits(str, Enum):
    live = "live"      # query the teacher on every augmented batch
    stored = "stored"  # use the logits stored with the images (no augmentation)


class Task(str, Enum):
    classification = "classification"
    detection = "detection"


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


@dataclass
class DataConfig:
    name: str = "digits"                # digits | cifar10 | npz | image_folder | none | (detection) coco, yolo, voc
    root: Optional[str] = None          # folder of the dataset files (CIFAR-10 .npz, ...)
    path: Optional[str] = None          # a test folder or file (image_folder, npz, detection sets)
    train_path: Optional[str] = None    # npz: train file(s) (a path or glob) — only the real-data ceiling uses them
    workers: int = 2                    # DataLoader workers for streamed test sets (image_folder)
    batch_size: int = 256               # evaluation batch size
    seed: int = 0                       # split seed (digits) / subset seed
    test_fraction: float = 0.3          # digits only
    train_limit: Optional[int] = None   # use a random subset of the train split
    test_limit: Optional[int] = None    # use a random subset of the test split


@dataclass
class TeacherTrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    crop_padding: int = 1
    flip: bool = False
    optimizer: str = "sgd"              # sgd (Nesterov) | adamw (ViT teachers)


@dataclass
class TeacherConfig:
    model: Optional[str] = None         # a dfkd/timm/torchvision name; none: from the checkpoint's JSON
    source: str = "auto"                # auto | dfkd | timm | torchvision
    _target_: Optional[str] = None      # a user's builder, package.module:function (called with kwargs)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None    # local file; none: train on the data's train split and cache
    train_if_missing: bool = False      # train (and cache) when no checkpoint is given
    # the teacher's spec: each unset field comes from the checkpoint's JSON or metadata, or the model (dfkd.spec)
    input_size: Optional[List[int]] = None   # [C, H, W]
    num_classes: Optional[int] = None
    mean: Optional[List[float]] = None  # input normalisation of [0, 1] pixels
    std: Optional[List[float]] = None
    interpolation: Optional[str] = None # bilinear | bicubic | nearest: how test images are resized
    crop_pct: Optional[float] = None    # resize to size / crop_pct, then centre-crop (timm's eval transform)
    class_names: Optional[List[str]] = None
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class StudentConfig:
    model: Optional[str] = None         # none: a ViT chosen for the teacher (about half its parameters or fewer)
    source: str = "auto"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None    # initialise from a local file
    init: str = "scratch"               # scratch | teacher: a shallower network of the teacher's family starts
                                        # from the teacher's weights (evenly spaced blocks; dfkd.models.from_teacher)


@dataclass
class AugmentConfig:
    crop_padding: Optional[int] = None  # default: an eighth of the image side
    flip: bool = True
    translate: float = 0.0
    color: bool = False


@dataclass
class DistillConfig:
    rounds: int = 100
    kd_steps: int = 10
    batch_size: int = 128
    optimizer: Optimizer = Optimizer.adamw
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: Schedule = Schedule.cosine
    warmup: float = 0.0
    pool_size: int = 10000
    memory: str = "auto"                # auto | device (float16 on the device) | host (uint8 in host memory)
    checkpoint_pool_mb: float = 256.0   # a checkpoint keeps the most recent pool images up to this size
    eval_every: int = 10
    eval_every_seconds: Optional[float] = None  # also evaluate (and log one line) after this much wall time
    checkpoint_every: int = 10
    budget_minutes: Optional[float] = None
    amp: Amp = Amp.auto
    grad_clip: float = 0.0
    mix: Mix = Mix.none
    mix_alpha: float = 1.0
    teacher_logits: TeacherLogits = TeacherLogits.live
    channels_last: bool = False
    compile: bool = False
    ema: float = 0.0                    # > 0: evaluate and save a moving average of the student's weights (decay)


@dataclass
class DistillAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    synthesizer: Dict[str, Any] = field(default_factory=dict)  # {name: ..., <its settings>}
    loss: Dict[str, Any] = field(default_factory=dict)         # {name: ..., <its settings>}
    task: Task = Task.classification     # classification | detection
    detection: Dict[str, Any] = field(default_factory=dict)    # task=detection settings (dfkd.detection)
    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    resume: bool = True                 # continue from run_dir/checkpoint.pt when present
    progress: bool = True
    threads: Optional[int] = None       # CPU threads for torch (default: torch's choice)


@dataclass
class TrainTeacherAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    output: Optional[str] = None        # where the checkpoint goes; default: the run folder
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    threads: Optional[int] = None


@dataclass
class SynthesizeAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    synthesizer: Dict[str, Any] = field(default_factory=dict)  # {name: ..., <its settings>}
    task: Task = Task.classification     # classification | detection (teacher=detector: boxes in the shards)
    detection: Dict[str, Any] = field(default_factory=dict)    # task=detection: detection.score_thresh (kept boxes),
                                                               # detection.train_path (box_real)
    output: str = MISSING               # the dataset folder (re-run the same command to resume)
    num_images: int = 1024
    shard_size: int = 256               # images per shard (one synthesizer seed per shard)
    image_dtype: str = "uint8"          # uint8 | float16
    budget_minutes: Optional[float] = None  # stop early after this much wall time (resumable)
    import_folder: Optional[str] = None # import an image folder (class/xxx.png) instead of synthesizing
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    threads: Optional[int] = None


@dataclass
class EvalAppConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: Optional[str] = None         # a run folder or a model file with its JSON; none: the teacher config
    output: Optional[str] = None
    batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    threads: Optional[int] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="distill_schema", node=DistillAppConfig)
    cs.store(name="train_teacher_schema", node=TrainTeacherAppConfig)
    cs.store(name="synthesize_schema", node=SynthesizeAppConfig)
    cs.store(name="eval_schema", node=EvalAppConfig)
