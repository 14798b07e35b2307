"""The one distillation loop every method shares.

Each round: the synthesizer makes a batch (learning synthesizers update themselves against
the current student), the batch joins a memory of past batches, and the student takes
``kd_steps`` optimizer steps on augmented batches drawn from that memory, matching the
teacher's softened outputs on the same augmented images. Evaluation on real test data,
logging, checkpointing and the wall-clock budget happen between rounds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import logging

from dfkd import dist as D
from dfkd.data import ArrayDataset
from dfkd.eval.classification import evaluate
from dfkd.losses.student import LogitKD, StudentLoss
from dfkd.engine import Engine, Schedule, Task, amp_dtype, budget_seconds
from dfkd.models.checkpoint import atomic_torch_save
from dfkd.teacher import Normalized, Teacher
from generators.base import Synthesizer, SyntheticBatch


log = logging.getLogger("dfkd")


@dataclass
class DistillSettings:
    rounds: int = 100               # synthesis rounds
    kd_steps: int = 10              # student optimizer steps per round
    batch_size: int = 128           # student batch size (drawn from the memory)
    optimizer: str = "adamw"        # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    schedule: str = "cosine"        # cosine | constant
    warmup: float = 0.0             # fraction of the run spent warming up the learning rate
    pool_size: int = 10000          # images kept in the memory (0: only the newest batch)
    memory: str = "auto"            # auto | device (float16 on the device) | host (uint8 in host memory)
    checkpoint_pool_mb: float = 256.0  # a checkpoint keeps the most recent pool images up to this size
    eval_every: int = 10            # rounds between evaluations (0: only at the end)
    eval_every_seconds: Optional[float] = None  # also evaluate (and log a line) after this much wall time
    checkpoint_every: int = 10      # rounds between checkpoints (0: never)
    budget_minutes: Optional[float] = None  # stop after this much wall time (resumes included)
    amp: str = "auto"               # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    grad_clip: float = 0.0
    mix: str = "none"               # none | mixup | cutmix | both (alternating): mix the student's inputs;
    mix_alpha: float = 1.0          # the teacher labels the mixed images (mixing ratio ~ Beta(alpha, alpha))
    teacher_logits: str = "live"    # live: query the teacher on each augmented batch | stored: use the
                                    # logits that came with the batch (no augmentation, no teacher needed)
    channels_last: bool = False     # student, teacher and the student's batches in channels-last memory format
    compile: bool = False           # torch.compile the student's training forward (the teacher keeps its hooks)
    ema: float = 0.0                # > 0: keep an exponential moving average of the student's weights with this
                                    # decay (e.g. 0.99); evaluation and the saved student use the average

    def validate(self) -> None:
        """One-line errors for settings that would run but make no sense."""
        from dfkd.errors import DfkdError

        positive = {"rounds": self.rounds, "batch_size": self.batch_size}
        for k, v in positive.items():
            if not isinstance(v, int) or v <= 0:
                raise DfkdError(f"distill.{k} must be a positive integer, got {v!r}")
        for k, v in {"kd_steps": self.kd_steps, "pool_size": self.pool_size, "eval_every": self.eval_every,
                     "checkpoint_every": self.checkpoint_every}.items():
            if not isinstance(v, int) or v < 0:
                raise DfkdError(f"distill.{k} must be a non-negative integer, got {v!r}")
        if not self.lr > 0:
            raise DfkdError(f"distill.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise DfkdError(f"distill.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup < 1:
            raise DfkdError(f"distill.warmup is a fraction of the run in [0, 1), got {self.warmup!r}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise DfkdError(f"distill.budget_minutes must be positive (or null), got {self.budget_minutes!r}")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise DfkdError(f"distill.ema is a decay in [0, 1) (0: off), got {self.ema!r}")


class Memory:
    """A ring buffer of synthetic images with the labels they aimed at and the teacher's logits.

    ``storage``: ``device`` keeps float16 images on the training device (small images: no copies);
    ``host`` keeps uint8 images in (pinned, with CUDA) host memory and copies each sampled batch to the
    device — 2× smaller than float16 and off the GPU, for large images; ``auto`` picks ``host`` when the
    float16 pool would exceed ``host_above_mb``. A checkpoint holds the most recent images up to
    ``checkpoint_mb`` (the whole pool when it fits, which keeps resume exact)."""

    def __init__(self, capacity: int, device: torch.device, storage: str = "auto", host_above_mb: float = 512.0,
                 checkpoint_mb: float = 256.0):
        if storage not in ("auto", "device", "host"):
            from dfkd.errors import DfkdError

            raise DfkdError(f"distill.memory must be auto, device or host, got {storage!r}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.storage = storage
        self.host_above_mb = float(host_above_mb)
        self.checkpoint_mb = float(checkpoint_mb)
        self.images: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None
        self.size = 0
        self.head = 0
        self.on_host = False

    def _choose(self, image_shape) -> None:
        per = 2 * math.prod(image_shape)
        big = max(self.capacity, 1) * per / 2**20 > self.host_above_mb
        self.on_host = self.storage == "host" or (self.storage == "auto" and big)

    @property
    def where(self) -> torch.device:
        return torch.device("cpu") if self.on_host else self.device

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_host:
            return x.detach().clamp(0, 1).mul(255).round_().to(torch.uint8).cpu()
        return x.detach().to(self.device, torch.float16)

    def _alloc(self, n: int, image_shape, k: int) -> None:
        pin = self.on_host and torch.cuda.is_available()
        dt = torch.uint8 if self.on_host else torch.float16
        # zeros, not empty: the whole pool is resident from the start, so peak memory shows at once
        self.images = torch.zeros((n, *image_shape), dtype=dt, device=self.where, pin_memory=pin)
        self.labels = torch.zeros(n, dtype=torch.long, device=self.where)
        self.logits = torch.zeros((n, k), dtype=torch.float16, device=self.where, pin_memory=pin)

    def add(self, batch: SyntheticBatch) -> None:
        if self.images is None and not self.size:
            self._choose(batch.images.shape[1:])
        x = self._encode(batch.images)
        y = batch.labels if batch.labels is not None else batch.teacher_logits.argmax(1)
        y = y.detach().to(self.where)
        t = batch.teacher_logits.detach().to(self.where, torch.float16)
        if self.capacity <= 0:
            self.images, self.labels, self.logits, self.size, self.head = x, y, t, len(x), 0
            return
        if self.images is None:
            self._alloc(self.capacity, x.shape[1:], t.shape[1])
        n = min(len(x), self.capacity)
        idx = (self.head + torch.arange(n, device=self.where)) % self.capacity
        self.images[idx], self.labels[idx], self.logits[idx] = x[-n:], y[-n:], t[-n:]
        self.head = int((self.head + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_host:
            return x.to(self.device, non_blocking=True).float().div_(255.0)
        return x.float()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random images (float32 on the device) and the teacher logits stored with them."""
        idx = torch.randint(self.size, (n,), generator=generator).to(self.where)
        return self._decode(self.images[idx]), self.logits[idx].to(self.device, non_blocking=True).float()

    def as_float(self, n: Optional[int] = None) -> torch.Tensor:
        """The first ``n`` stored images as float32 [0, 1] on the CPU (for sample grids)."""
        x = self.images[: self.size if n is None else min(n, self.size)]
        return x.float().div(255.0).cpu() if self.on_host else x.float().cpu()

    def state_dict(self) -> dict[str, Any]:
        if self.images is None:
            return {"size": 0, "head": 0}
        per = self.images[0].numel() * self.images.element_size()
        keep = min(self.size, max(1, int(self.checkpoint_mb * 2**20 // max(per, 1))))
        if keep >= self.size:
            sel = torch.arange(self.size)
            head = self.head
        else:  # the most recent images, oldest first
            sel = (self.head - keep + torch.arange(keep)) % max(self.capacity, self.size)
            head = keep % self.capacity if self.capacity > 0 else 0
        sel = sel.to(self.where)
        return {"images": self.images[sel].cpu(), "labels": self.labels[sel].cpu(),
                "logits": self.logits[sel].cpu(), "size": int(len(sel)), "head": int(head),
                "on_host": self.on_host, "dropped": int(self.size - len(sel))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("size"):
            return
        x, y, t = state["images"], state["labels"], state["logits"]
        self.on_host = bool(state.get("on_host", x.dtype == torch.uint8))
        x, y, t = x.to(self.where), y.to(self.where), t.to(self.where)
        if self.capacity > 0:
            self._alloc(self.capacity, x.shape[1:], t.shape[1])
            self.images[: len(x)], self.labels[: len(y)], self.logits[: len(t)] = x, y, t
        else:
            self.images, self.labels, self.logits = x, y, t
        self.size, self.head = int(state["size"]), int(state["head"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


CHECKPOINT_FORMAT = "dfkd-engine-1"


class ClassificationDistillation(Task):
    """Classification distillation as an engine task: each round one synthesizer step, the batch into
    the replay memory, ``kd_steps`` student steps on augmented (mixed) batches from the memory,
    matching the teacher's outputs on the same images."""

    name = "distill"

    def __init__(self, d: "Distiller"):
        self.d = d
        self.synth_seconds = 0.0
        self.synth_images = 0

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.d.teacher, self.d.student, self.d.ema) if m is not None]

    def begin(self, engine: Engine) -> None:
        self.d.student.train()

    def round(self, engine: Engine) -> dict[str, Any]:
        d = self.d
        t0 = time.perf_counter()
        batch = d.synth.step(d.student if d.synth.uses_student else None)
        self.synth_seconds += time.perf_counter() - t0
        self.synth_images += len(batch)
        d.memory.add(batch)
        d.student.train()
        losses = [d.train_student_step(*d.memory.sample(d.s.batch_size, d.rng)) for _ in range(d.s.kd_steps)]
        return {"kd_loss": torch.stack(losses).mean() if losses else 0.0, **batch.stats}

    def evaluate(self, engine: Engine) -> dict[str, float]:
        return self.d.evaluate()

    def report(self, engine: Engine, record: dict[str, Any], metrics: dict[str, float]) -> None:
        ips = self.synth_images / self.synth_seconds if self.synth_seconds > 0 else 0.0
        parts = [f"round {engine.round}/{engine.schedule.total}", f"{record['wall']:.0f} s",
                 f"kd {record['kd_loss']:.4f}"]
        if "top1" in metrics:
            parts.append(f"top-1 {metrics['top1']:.4f}")
        parts.append(f"synth {ips:.1f} img/s")
        if "syn/teacher_acc" in record:
            parts.append(f"teacher agreement {record['syn/teacher_acc']:.3f}")
        log.info("%s", "  ".join(parts))

    def state_dict(self) -> dict[str, Any]:
        d = self.d
        st = {"loss": d.loss.state_dict() if isinstance(d.loss, nn.Module) else {},
              "synthesizer": d.synth.state_dict(), "memory": d.memory.state_dict(),
              "rng": d.rng.get_state(), "mix_toggle": d._mix_toggle}
        if d.ema is not None:
            st["ema"] = d.ema.state_dict()
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        d = self.d
        if isinstance(d.loss, nn.Module) and st.get("loss"):
            d.loss.load_state_dict(st["loss"])
        d.synth.load_state_dict(st["synthesizer"])
        d.memory.load_state_dict(st["memory"])
        d.rng.set_state(st["rng"])
        d._mix_toggle = bool(st.get("mix_toggle", False))
        if d.ema is not None:  # a run saved without the average starts it from the restored student
            d.ema.load_state_dict(st["ema"] if "ema" in st else d.student.state_dict())


class Distiller:
    """Distil ``student`` from ``teacher`` on what ``synthesizer`` makes: a
    :class:`ClassificationDistillation` task on the one :class:`dfkd.engine.Engine`."""

    def __init__(
        self,
        teacher: Teacher,
        student: Normalized,
        synthesizer: Synthesizer,
        settings: DistillSettings,
        test_set: Optional[ArrayDataset] = None,
        augment: Optional[nn.Module] = None,
        run_dir: Optional[str | Path] = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        progress: bool = True,
        on_round: Optional[Callable[[dict], None]] = None,
        loss: Optional[StudentLoss] = None,
    ):
        from dfkd.errors import DfkdError

        self.teacher, self.student, self.synth = teacher, student, synthesizer
        self.main = D.is_main()
        self.s = settings
        if settings.mix not in ("none", "mixup", "cutmix", "both"):
            raise DfkdError(f"distill.mix must be none, mixup, cutmix or both, got {settings.mix!r}")
        if settings.teacher_logits not in ("live", "stored"):
            raise DfkdError(f"distill.teacher_logits must be 'live' or 'stored', got {settings.teacher_logits!r}")
        self.loss = loss if loss is not None else LogitKD()
        self.test_set = test_set
        self.augment = augment if augment is not None else nn.Identity()
        self.run_dir = Path(run_dir) if run_dir else None
        self.device = torch.device(device)
        self.memory = Memory(settings.pool_size, self.device, storage=settings.memory,
                             checkpoint_mb=settings.checkpoint_pool_mb)
        self.rng = torch.Generator().manual_seed(seed + 17)
        self._mix_toggle = False
        if not (isinstance(settings.ema, (int, float)) and 0 <= settings.ema < 1):
            raise DfkdError(f"distill.ema is a decay in [0, 1) (0: off), got {settings.ema!r}")
        self.optimizer = self._build_optimizer()
        # the moving average of the student's weights (distill.ema > 0), taken after the loss's setup (which may
        # copy the teacher's head into the student): evaluated and saved instead of the student
        self.ema: Optional[nn.Module] = None
        if settings.ema > 0:
            import copy

            self.ema = copy.deepcopy(student).requires_grad_(False).eval()
        self.task = ClassificationDistillation(self)
        self.engine = Engine(
            student, self.optimizer,
            Schedule(settings.lr, settings.rounds, "round", settings.warmup, settings.schedule,
                     budget_seconds(settings.budget_minutes)),
            device=self.device, amp=amp_dtype(settings.amp, self.device), grad_clip=settings.grad_clip,
            distributed=D.world_size() > 1, compile=settings.compile, checkpoint_every=settings.checkpoint_every,
            save_fn=self._save if self.run_dir else None, eval_every=settings.eval_every,
            eval_every_seconds=settings.eval_every_seconds,
            metrics_path=self.run_dir / "metrics.jsonl" if self.run_dir else None,
            tensorboard_dir=self.run_dir / "tb" if self.run_dir else None,
            progress="distill" if progress else None, on_record=on_round)
        self.scaler = self.engine.scaler

    # -- setup ---------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        from dfkd.optim import build_optimizer

        extra = []
        if isinstance(self.loss, nn.Module):  # a loss with learned parts (e.g. feature projections)
            if hasattr(self.loss, "setup"):
                self.loss.setup(self.student, self.teacher)
            extra = list(self.loss.to(self.device).parameters())
        return build_optimizer(self.student, self.s.optimizer, lr=self.s.lr, weight_decay=self.s.weight_decay,
                               momentum=self.s.momentum, extra=extra)

    @property
    def history(self) -> list[dict]:
        return self.engine.history

    @property
    def round(self) -> int:
        return self.engine.round

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        """One file per rank: ranks share the student but each has its own synthesizer and memory."""
        if not self.run_dir:
            return None
        return self.run_dir / ("checkpoint.pt" if D.world_size() == 1 else f"checkpoint.rank{D.rank()}.pt")

    def _save(self, state: dict[str, Any]) -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, self.checkpoint_path)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        from dfkd.errors import DfkdError

        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file
            raise DfkdError(f"cannot read the saved run {path} ({type(e).__name__}); use resume=false or "
                            "another hydra.run.dir") from None
        if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
            raise DfkdError(f"{path} was saved by another version of dfkd; use resume=false or another "
                            "hydra.run.dir")
        return st

    # -- one student step ----------------------------------------------------------------
    def train_student_step(self, images: torch.Tensor, stored_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.s.teacher_logits == "stored":
            xa, t = images, stored_logits  # the stored logits belong to these exact pixels: no augmentation
        else:
            with torch.no_grad():
                xa = self.augment(images)
                if self.s.mix != "none":
                    xa = self._mix(xa)
            t = None
        if self.s.channels_last:
            xa = xa.contiguous(memory_format=torch.channels_last)
        with self.engine.autocast():
            loss, _ = self.loss(self.engine.train_model, self.teacher, xa, t)
        return self.engine.optimizer_step(loss, list(self.student.parameters()),
                                          after=self._ema_update if self.ema is not None else None)

    def _ema_update(self) -> None:
        """One step of the weight average, after each optimizer step; the decay ramps up over the first steps
        (min(ema, (1 + n) / (10 + n)) at step n), so early weights do not dominate a short run."""
        n = self.engine.step - 1  # the update just made is step n (0-based)
        decay = min(float(self.s.ema), (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.student.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
            for be, b in zip(self.ema.buffers(), self.student.buffers()):
                be.copy_(b)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved: the weight average when ``distill.ema`` > 0, else the student."""
        return self.ema if self.ema is not None else self.student

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Mixup or CutMix of a batch with a shuffled copy of itself, per-sample ratios. The teacher is
        queried on the mixed images, so any mixture is a valid distillation input; ``both`` alternates."""
        mode = self.s.mix
        if mode == "both":
            mode = "mixup" if self._mix_toggle else "cutmix"
            self._mix_toggle = not self._mix_toggle
        n, h, w = len(x), x.shape[-2], x.shape[-1]
        a = torch.full((n,), float(self.s.mix_alpha))
        lam = torch.distributions.Beta(a, a).sample().to(x.device).view(n, 1, 1, 1)
        perm = torch.randperm(n, generator=self.rng).to(x.device)
        if mode == "mixup":
            return lam * x + (1 - lam) * x[perm]
        side = (1 - lam.view(n)).sqrt()  # the pasted box covers a (1 - lam) fraction of the image
        bh, bw = (side * h).round().long(), (side * w).round().long()
        cy = torch.randint(h, (n,), generator=self.rng).to(x.device)
        cx = torch.randint(w, (n,), generator=self.rng).to(x.device)
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        y0, x0 = cy - bh // 2, cx - bw // 2
        my = (ys[None] >= y0[:, None]) & (ys[None] < (y0 + bh)[:, None])
        mx = (xs[None] >= x0[:, None]) & (xs[None] < (x0 + bw)[:, None])
        box = (my[:, :, None] & mx[:, None, :])[:, None].to(x.dtype)
        return x * (1 - box) + x[perm] * box

    def evaluate(self) -> dict[str, float]:
        if self.test_set is None or not self.main:
            return {}
        return evaluate(self.eval_model, self.test_set, device=self.device)

    def fit(self, resume: bool = True) -> dict[str, Any]:
        state = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume and self.checkpoint_path.is_file():
                state = self._read_checkpoint(self.checkpoint_path)
            if D.world_size() > 1:
                rounds = D.gather_objects(int(state["round"]) if state else 0)
                if len(set(rounds)) > 1:
                    from dfkd.errors import DfkdError

                    raise DfkdError(f"the ranks' checkpoints are at different rounds {rounds}; "
                                    "delete the newer ones or start a new run folder")
        self.student.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.s.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        out = self.engine.run(self.task, state)
        last_eval = out["last_eval"]
        ranks = D.gather_objects({
            "rank": D.rank(),
            "student_digest": D.tensor_digest(self.student.state_dict().values()),
            **({"ema_digest": D.tensor_digest(self.ema.state_dict().values())} if self.ema is not None else {}),
            "memory_digest": D.tensor_digest([self.memory.images[: self.memory.size]])
            if self.memory.size else None,
        })
        t = self.task
        return {
            "world_size": D.world_size(),
            "ranks": ranks,
            "rounds": out["rounds"],
            "wall_seconds": out["wall_seconds"],
            "student_top1": last_eval.get("top1"),
            "student_top5": last_eval.get("top5"),
            "synth_seconds_this_session": t.synth_seconds,
            "synth_images_per_second": t.synth_images / t.synth_seconds if t.synth_seconds > 0 else None,
        }
