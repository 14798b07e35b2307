"""The one training loop: every job in dfkd — distilling a classifier or a detector from synthetic
images, training a teacher, a detector or a diffusion model on real data — is an :class:`Engine`
running a :class:`Task`.

A *round* is the task's unit of work between bookkeeping: for distillation one source step (the
synthesizer makes a batch, the batch joins the replay memory) followed by ``k`` student steps; for
supervised training a fixed number of optimizer steps on real batches. The engine owns what every
job shares:

- the optimizer step (zero-grad, backward, fp16 loss scaling, gradient clipping) and the one
  learning-rate schedule (:func:`dfkd.optim.lr_factor`: linear warm-up, then cosine or constant),
  over rounds or optimizer steps (``Schedule.unit``) or the wall-clock budget, whichever is further;
- AMP (``autocast()``), ``torch.compile`` and DistributedDataParallel for the trained model;
- the budget (wall time summed over resumes; every rank stops at the same round);
- metrics: the round record the task returns may hold device tensors — they are synced once,
  here, at the end of the round (the log interval), written to ``metrics.jsonl`` and TensorBoard;
- evaluation every ``eval_every`` units, every ``eval_every_seconds``, and at the end;
- checkpoints every ``checkpoint_every`` rounds and at the end, and resume: the state holds the
  counters, history, the model, optimizer, scaler, the task's own state and the random states;
- progress bar; modes and hooks restored on every exit path (``kept_modes`` and ``Task.end``).

Resume contract. Without a wall-clock budget a run killed at any point and started again from its
last checkpoint ends exactly as the uninterrupted run (same weights, memory and metrics): every
random draw comes from state that the checkpoint holds. With a budget the schedule follows the wall
time, so a resumed run continues the same curve from the time already spent but is not bitwise
equal (the time a round takes varies). Extending a finished run (a larger ``rounds``/``steps`` or
budget) continues from where it stopped with the schedule recomputed for the new total: the
learning rate jumps back up to the value the longer run would have had at that point, and the new
rounds anneal it to zero again. Ctrl-C saves the state on the way out, as it stands after the last whole optimizer
step (a task that can undo the random draws of the step cut short does so, :meth:`Task.rewind`,
and then the resumed run is exact); an interrupt inside an optimizer update keeps the last
checkpoint instead (the weights could be half-updated).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from dfkd import dist as D
from dfkd.errors import DfkdError

log = logging.getLogger("dfkd")


def _clock() -> float:
    """Wall time (a function, so tests can substitute a fake clock)."""
    return time.perf_counter()


@contextmanager
def kept_modes(*modules: Optional[nn.Module]) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (normal or not)."""
    modes = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, none on the CPU; or ``bf16`` / ``fp16`` / ``none``."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in table:
        raise DfkdError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    return table[amp]


@dataclass
class Schedule:
    """Learning rate ``lr * lr_factor(progress)``; progress is ``done / total`` in ``unit``s (rounds or
    optimizer steps), or the fraction of the wall-clock budget spent, whichever is further."""

    lr: float
    total: int
    unit: str = "round"             # round: the rate is set once per round; step: before every step
    warmup: float = 0.0             # fraction of the run
    kind: str = "cosine"            # cosine | constant
    budget_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        if self.unit not in ("round", "step"):
            raise DfkdError(f"schedule unit must be 'round' or 'step', got {self.unit!r}")
        if self.kind not in ("cosine", "constant"):
            raise DfkdError(f"schedule must be cosine or constant, got {self.kind!r}")

    def progress(self, done: int, wall: float) -> float:
        p = done / max(1, self.total)
        if self.budget_seconds is not None:
            p = max(p, wall / self.budget_seconds) if self.budget_seconds > 0 else 1.0
        return min(p, 1.0)

    def lr_at(self, done: int, wall: float) -> float:
        from dfkd.optim import lr_factor

        return self.lr * lr_factor(self.progress(done, wall), self.warmup, self.kind)


class Task:
    """What one kind of job does in a round; the engine does the rest.

    ``round(engine)`` does the round's work — calling ``engine.optimizer_step(loss)`` for each
    update — and returns the round's record (numbers or device tensors). ``evaluate()`` returns
    metrics (``{}`` for none). ``state_dict()``/``load_state_dict()`` hold what the task owns beyond
    the engine's model and optimizer (synthesizer, memory, random generators). ``begin``/``end``
    attach and remove hooks; ``end`` runs on every exit path. ``modules()`` lists the modules whose
    train/eval modes the engine restores on exit.
    """

    name = "task"

    def modules(self) -> list[nn.Module]:
        return []

    def begin(self, engine: "Engine") -> None:
        pass

    def end(self, engine: "Engine") -> None:
        pass

    def round(self, engine: "Engine") -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, engine: "Engine") -> dict[str, float]:
        return {}

    def report(self, engine: "Engine", record: dict[str, Any], metrics: dict[str, float]) -> None:
        """Called after an evaluation round (e.g. a log line)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def snapshot(self) -> Any:
        """Cheap state taken at the start of every round, for :meth:`rewind`."""
        return None

    def rewind(self, snapshot: Any) -> None:
        """After Ctrl-C outside an update, before the state is saved: undo what the step that was cut
        short already drew (e.g. put a random generator back to that step's start), so the resumed
        run redoes that step exactly. ``snapshot`` is what :meth:`snapshot` took at the round's start."""


def _sync(record: dict[str, Any]) -> dict[str, Any]:
    """Device tensors in a record become Python numbers: one host transfer for all of them."""
    keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return record
    values = torch.stack([record[k].detach().float().reshape(()) for k in keys]).tolist()
    return {**record, **dict(zip(keys, values))}


class Engine:
    """Runs a :class:`Task` to the end of its schedule (or budget), resumably. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        device: torch.device | str = "cpu",
        amp: Optional[torch.dtype] = None,
        grad_clip: float = 0.0,
        distributed: bool = False,
        compile: bool = False,
        checkpoint_every: int = 0,
        save_fn: Optional[Callable[[dict[str, Any]], None]] = None,
        eval_every: int = 0,
        eval_every_seconds: Optional[float] = None,
        metrics_path: Optional[str | Path] = None,
        tensorboard_dir: Optional[str | Path] = None,
        progress: Optional[str] = None,
        on_record: Optional[Callable[[dict], None]] = None,
    ):
        self.model = model
        self.train_model: nn.Module = model  # what the task calls: DDP/compiled wrapper when asked
        self.optimizer = optimizer
        self.schedule = schedule
        self.device = torch.device(device)
        self.amp = amp
        from dfkd.optim import grad_scaler

        self.scaler = grad_scaler(amp, self.device)
        self.grad_clip = float(grad_clip)
        self.distributed = distributed
        self.compile = compile
        self.checkpoint_every = int(checkpoint_every or 0)
        self.save_fn = save_fn
        self.eval_every = int(eval_every or 0)
        self.eval_every_seconds = eval_every_seconds
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.tensorboard_dir = tensorboard_dir
        self.progress = progress
        self.on_record = on_record
        self.main = D.is_main()
        self.round = 0
        self.step = 0
        self.elapsed = 0.0          # wall seconds spent in earlier sessions of this run (resume)
        self.history: list[dict] = []
        self.evals: list[dict] = []  # {"round", "step", "wall", **metrics}: time to accuracy
        self.stopped_by_budget = False
        self.last_eval: dict[str, float] = {}
        self.lr = 0.0  # set at the first round (or step)
        self.task: Optional[Task] = None
        self._start = _clock()
        self._updating = False
        self.writer = None

    # -- pieces a task calls ----------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.step if self.schedule.unit == "step" else self.round

    def wall(self) -> float:
        return _clock() - self._start

    def finished(self) -> bool:
        return self.done >= self.schedule.total

    def budget_reached(self) -> bool:
        b = self.schedule.budget_seconds  # None: no budget; 0: stop before the first round
        flag = b is not None and self.wall() >= b
        return D.any_flag(flag, self.device) if self.distributed else flag

    def set_lr(self) -> float:
        wall = self.wall()
        if self.distributed and self.schedule.budget_seconds is not None:
            wall = D.max_value(wall, self.device)  # every rank must set the same rate, or the replicas drift
        self.lr = self.schedule.lr_at(self.done, wall)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr * g.get("lr_scale", 1.0)
        return self.lr

    def autocast(self):
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def optimizer_step(self, loss: torch.Tensor, params: Optional[list] = None,
                       after: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """One update of the trained model from ``loss``; counts a step. ``after`` (e.g. an EMA update)
        belongs to the update: Ctrl-C inside either keeps the last checkpoint. Returns the detached loss."""
        if self.schedule.unit == "step":
            self.set_lr()
        params = list(self.model.parameters()) if params is None else params
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scaled loss, unscaled before clipping, steps skipped on overflow
            self.scaler.scale(loss).backward()
            self._updating = True
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._updating = True
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizer.step()
        self.step += 1
        if after is not None:
            after()
        self._updating = False
        return loss.detach()

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.task is not None
        return {
            "round": self.round,
            "step": self.step,
            "elapsed": self.wall(),
            "history": json.dumps(self.history),
            "evals": json.dumps(self.evals),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "task": self.task.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, st: dict[str, Any], task: Task) -> None:
        self.round, self.step = int(st["round"]), int(st["step"])
        self.elapsed = float(st["elapsed"])
        self.history = json.loads(st["history"])
        self.evals = json.loads(st.get("evals", "[]"))
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        task.load_state_dict(st["task"])
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        for r in reversed(self.history):
            tests = {k[5:]: v for k, v in r.items() if k.startswith("test/")}
            if tests:
                self.last_eval = tests
                break

    def save(self) -> None:
        if self.save_fn is not None:
            self.save_fn(self.state_dict())

    # -- logging -----------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.metrics_path is not None and self.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("round", "step"):
                    self.writer.add_scalar(k, v, record.get("step", record["round"])
                                           if self.schedule.unit == "step" else record["round"])
        if self.on_record is not None:
            self.on_record(record)

    def rewrite_metrics(self) -> None:
        """metrics.jsonl as the checkpoint's history: lines of rounds lost with a killed process go."""
        if self.metrics_path is not None and self.main:
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, self.metrics_path)

    def _eval_due(self, before: int, final: bool, wall: float, last_report: float) -> bool:
        if final:
            return True
        if self.eval_every and self.done // self.eval_every > before // self.eval_every:
            return True
        return bool(self.eval_every_seconds and wall - last_report >= self.eval_every_seconds)

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation with the model's modes and requires-grad flags kept, under no_grad."""
        assert self.task is not None
        if not self.main:
            return {}
        flags = [p.requires_grad for p in self.model.parameters()]
        with kept_modes(self.model), torch.no_grad():
            metrics = self.task.evaluate(self)
        for p, f in zip(self.model.parameters(), flags):
            p.requires_grad_(f)
        if metrics:
            self.last_eval = dict(metrics)
            self.evals.append({"round": self.round, "step": self.step, "wall": round(self.wall(), 3), **metrics})
        return metrics

    # -- the loop ----------------------------------------------------------------------------
    def run(self, task: Task, state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Run ``task`` from ``state`` (a :meth:`state_dict`, to resume) or from the start."""
        self.task = task
        if state is not None:
            self.load_state_dict(state, task)
            self.rewrite_metrics()
        elif self.metrics_path is not None and self.main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("")
        if self.tensorboard_dir is not None and self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.tensorboard_dir))
            except Exception:  # tensorboard is optional
                self.writer = None
        if self.distributed and D.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if self.compile and not isinstance(self.train_model, torch._dynamo.eval_frame.OptimizedModule):
            self.train_model = torch.compile(self.train_model)
        self._start = _clock() - self.elapsed
        bar = None
        if self.progress and self.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.schedule.total, initial=min(self.done, self.schedule.total), desc=self.progress,
                       unit=self.schedule.unit, dynamic_ncols=True)
        last_report = self.wall()
        try:
            with kept_modes(*task.modules()):
                task.begin(self)
                try:
                    while not self.finished():
                        if self.budget_reached():
                            self.stopped_by_budget = True
                            break
                        before = self.done
                        snap = task.snapshot()
                        if self.schedule.unit == "round":
                            self.set_lr()
                        try:
                            out = task.round(self)
                        except KeyboardInterrupt:
                            if self._updating:
                                log.warning("interrupted during an update: the last checkpoint is kept")
                            else:
                                task.rewind(snap)
                                self.save()
                            raise
                        self.round += 1
                        wall = self.wall()
                        record: dict[str, Any] = {"round": self.round}
                        if self.schedule.unit == "step":
                            record["step"] = self.step
                        record.update({"wall": round(wall, 3), "lr": self.lr, **_sync(out)})
                        final = self.finished() or self.budget_reached()
                        if final and not self.finished():
                            self.stopped_by_budget = True
                        if self._eval_due(before, final, wall, last_report):
                            metrics = self.evaluate()
                            record.update({f"test/{k}": v for k, v in metrics.items()})
                            last_report = wall
                            if self.main:
                                task.report(self, record, metrics)
                        self.log(record)
                        if self.checkpoint_every and self.round % self.checkpoint_every == 0:
                            self.save()
                        if bar is not None:
                            bar.update(min(self.done, self.schedule.total) - min(before, self.schedule.total))
                            post = {k: f"{v:.3f}" for k, v in record.items()
                                    if k in ("loss", "kd_loss", "kd/loss") and isinstance(v, float)}
                            if "top1" in self.last_eval:
                                post["top1"] = f"{self.last_eval['top1']:.3f}"
                            bar.set_postfix(post)
                finally:
                    task.end(self)
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        if not self.history or not any(k.startswith("test/") for k in self.history[-1]):
            if not self.evals or self.evals[-1]["step"] != self.step or self.evals[-1]["round"] != self.round:
                self.evaluate()
        self.save()
        return {"rounds": self.round, "steps": self.step, "wall_seconds": self.wall(),
                "stopped_by_budget": self.stopped_by_budget, "last_eval": dict(self.last_eval)}


def budget_seconds(minutes: Optional[float]) -> Optional[float]:
    return 60.0 * float(minutes) if minutes else None
