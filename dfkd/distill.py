"""The one distillation loop every method shares.

Each round: the synthesizer makes a batch (learning synthesizers update themselves against
the current student), the batch joins a memory of past batches, and the student takes
``kd_steps`` optimizer steps on augmented batches drawn from that memory, matching the
teacher's softened outputs on the same augmented images. Evaluation on real test data,
logging, checkpointing and the wall-clock budget happen between rounds.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
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


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


class Distiller:
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
        self.teacher, self.student, self.synth = teacher, student, synthesizer
        self.train_model: nn.Module = student  # the DistributedDataParallel wrapper under torchrun
        self.main = D.is_main()
        self.s = settings
        if settings.mix not in ("none", "mixup", "cutmix", "both"):
            from dfkd.errors import DfkdError

            raise DfkdError(f"distill.mix must be none, mixup, cutmix or both, got {settings.mix!r}")
        if settings.teacher_logits not in ("live", "stored"):
            from dfkd.errors import DfkdError

            raise DfkdError(f"distill.teacher_logits must be 'live' or 'stored', got {settings.teacher_logits!r}")
        self.loss = loss if loss is not None else LogitKD()
        self.test_set = test_set
        self.augment = augment if augment is not None else nn.Identity()
        self.run_dir = Path(run_dir) if run_dir else None
        self.device = torch.device(device)
        self.progress = progress
        self.on_round = on_round
        self.memory = Memory(settings.pool_size, self.device, storage=settings.memory,
                             checkpoint_mb=settings.checkpoint_pool_mb)
        self.rng = torch.Generator().manual_seed(seed + 17)
        self._mix_toggle = False
        self.optimizer = self._build_optimizer()
        self.round = 0
        self.elapsed = 0.0  # wall seconds spent in earlier runs of this job (resume)
        self.history: list[dict] = []
        self.amp_dtype = _amp_dtype(settings.amp, self.device)
        from dfkd.optim import grad_scaler

        self.scaler = grad_scaler(self.amp_dtype, self.device)
        self.writer = None

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

    def _lr_factor(self, progress: float) -> float:
        from dfkd.optim import lr_factor

        return lr_factor(progress, self.s.warmup, self.s.schedule)

    def _progress(self, wall: float) -> float:
        p = self.round / max(1, self.s.rounds)
        if self.s.budget_minutes:
            p = max(p, wall / (60.0 * self.s.budget_minutes))
        return min(p, 1.0)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        """One file per rank: ranks share the student but each has its own synthesizer and memory."""
        if not self.run_dir:
            return None
        return self.run_dir / ("checkpoint.pt" if D.world_size() == 1 else f"checkpoint.rank{D.rank()}.pt")

    def state_dict(self, wall: float) -> dict[str, Any]:
        return {
            "round": self.round,
            "elapsed": wall,
            "student": self.student.state_dict(),
            "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else {},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "synthesizer": self.synth.state_dict(),
            "memory": self.memory.state_dict(),
            "rng": self.rng.get_state(),
            "mix_toggle": self._mix_toggle,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
        }

    def save_checkpoint(self, wall: float) -> None:
        if self.checkpoint_path is not None:
            atomic_torch_save(self.state_dict(wall), self.checkpoint_path)

    def load_checkpoint(self, path: str | Path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=True)
        self.round = int(st["round"])
        self.elapsed = float(st["elapsed"])
        self.student.load_state_dict(st["student"])
        if isinstance(self.loss, nn.Module) and st.get("loss"):
            self.loss.load_state_dict(st["loss"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.synth.load_state_dict(st["synthesizer"])
        self.memory.load_state_dict(st["memory"])
        self.rng.set_state(st["rng"])
        self._mix_toggle = bool(st.get("mix_toggle", False))
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.history = json.loads(st["history"])

    # -- logging -------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir is not None and self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("round",):
                    self.writer.add_scalar(k, v, record["round"])
        if self.on_round is not None:
            self.on_round(record)

    def _rewrite_metrics(self) -> None:
        if self.run_dir is not None and self.main:
            tmp = self.run_dir / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, self.run_dir / "metrics.jsonl")

    # -- the loop ------------------------------------------------------------------------
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
        with self._autocast():
            loss, _ = self.loss(self.train_model, self.teacher, xa, t)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scaled loss, unscaled before clipping, steps skipped on overflow
            self.scaler.scale(loss).backward()
            if self.s.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return loss.detach()
        loss.backward()
        if self.s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.s.grad_clip)
        self.optimizer.step()
        return loss.detach()

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
        return evaluate(self.student, self.test_set, device=self.device)

    def fit(self, resume: bool = True) -> dict[str, Any]:
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume and self.checkpoint_path.is_file():
                self.load_checkpoint(self.checkpoint_path)
                self._rewrite_metrics()
            elif (self.run_dir / "metrics.jsonl").exists() and self.main:
                (self.run_dir / "metrics.jsonl").unlink()
            if D.world_size() > 1:
                rounds = D.gather_objects(self.round)
                if len(set(rounds)) > 1:
                    from dfkd.errors import DfkdError

                    raise DfkdError(f"the ranks' checkpoints are at different rounds {rounds}; "
                                    "delete the newer ones or start a new run folder")
            try:
                if self.main:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:  # tensorboard is optional
                self.writer = None
        self.student.to(self.device).train()
        if D.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.student, device_ids=ids)
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.s.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        if self.s.compile and not isinstance(self.train_model, torch._dynamo.eval_frame.OptimizedModule):
            self.train_model = torch.compile(self.train_model)
        start = time.perf_counter() - self.elapsed
        synth_seconds = 0.0
        synth_images = 0
        bar = None
        if self.progress and self.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.s.rounds, initial=self.round, desc="distill", unit="round", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        last_report = time.perf_counter() - start
        try:
            while self.round < self.s.rounds:
                wall = time.perf_counter() - start
                if self.s.budget_minutes and D.any_flag(wall >= 60.0 * self.s.budget_minutes, self.device):
                    break
                t0 = time.perf_counter()
                batch = self.synth.step(self.student if self.synth.uses_student else None)
                synth_seconds += time.perf_counter() - t0
                synth_images += len(batch)
                self.memory.add(batch)
                self.student.train()
                lr = self.s.lr * self._lr_factor(self._progress(wall))
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                losses = [self.train_student_step(*self.memory.sample(self.s.batch_size, self.rng))
                          for _ in range(self.s.kd_steps)]
                self.round += 1
                wall = time.perf_counter() - start
                record: dict[str, Any] = {"round": self.round, "wall": round(wall, 3), "lr": lr,
                                          "kd_loss": float(torch.stack(losses).mean()) if losses else 0.0,
                                          **batch.stats}
                final = self.round >= self.s.rounds or bool(
                    self.s.budget_minutes and D.any_flag(wall >= 60.0 * self.s.budget_minutes, self.device))
                due = bool(self.s.eval_every_seconds and wall - last_report >= self.s.eval_every_seconds)
                if (self.s.eval_every and self.round % self.s.eval_every == 0) or final or due:
                    last_eval = self.evaluate()
                    record.update({f"test/{k}": v for k, v in last_eval.items()})
                    last_report = wall
                    if self.main:
                        ips = synth_images / synth_seconds if synth_seconds > 0 else 0.0
                        parts = [f"round {self.round}/{self.s.rounds}", f"{wall:.0f} s", f"kd {record['kd_loss']:.4f}"]
                        if "top1" in last_eval:
                            parts.append(f"top-1 {last_eval['top1']:.4f}")
                        parts.append(f"synth {ips:.1f} img/s")
                        if "syn/teacher_acc" in record:
                            parts.append(f"teacher agreement {record['syn/teacher_acc']:.3f}")
                        log.info("%s", "  ".join(parts))
                self._log(record)
                if self.s.checkpoint_every and self.round % self.s.checkpoint_every == 0:
                    self.save_checkpoint(time.perf_counter() - start)
                if bar is not None:
                    bar.update(1)
                    post = {"kd": f"{record['kd_loss']:.3f}"}
                    if last_eval:
                        post["top1"] = f"{last_eval['top1']:.3f}"
                    bar.set_postfix(post)
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        wall = time.perf_counter() - start
        if not last_eval or self.history and "test/top1" not in self.history[-1]:
            last_eval = self.evaluate()
        self.save_checkpoint(wall)
        ranks = D.gather_objects({
            "rank": D.rank(),
            "student_digest": D.tensor_digest(self.student.state_dict().values()),
            "memory_digest": D.tensor_digest([self.memory.images[: self.memory.size]])
            if self.memory.size else None,
        })
        return {
            "world_size": D.world_size(),
            "ranks": ranks,
            "rounds": self.round,
            "wall_seconds": wall,
            "student_top1": last_eval.get("top1"),
            "student_top5": last_eval.get("top5"),
            "synth_seconds_this_session": synth_seconds,
            "synth_images_per_second": synth_images / synth_seconds if synth_seconds > 0 else None,
        }
