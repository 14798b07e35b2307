"""Teacher-distilled diffusion models: train a small class-conditional ``UNet2DModel`` on a
synthetic dataset dfkd wrote, so new, varied images come at sampling speed instead of
inversion speed.

    dfkd-synthesize output=synthetic/digits_di num_images=4096          # slow: DeepInversion
    dfkd-train-diffusion dataset=synthetic/digits_di output=models/digits_ddpm
    dfkd-distill synthesizer=diffusion synthesizer.path=models/digits_ddpm   # fast: guided sampling

The output folder is a plain diffusers layout (``unet/`` and ``scheduler/`` written with
``save_pretrained``) plus ``dfkd_diffusion.json``; ``UNet2DModel.from_pretrained(out / "unet")``
loads it without dfkd. The model is trained with ε-prediction on images in [−1, 1], with the
class dropped to a null class (index ``num_classes``) with probability ``p_uncond`` so that
classifier-free guidance works. Weights saved are the exponential moving average.
Training resumes from ``train_state.pt`` when the same command is run again.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.engine import Engine, Schedule, Task
from dfkd.errors import DfkdError
from dfkd.models.checkpoint import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
STATE_FORMAT = "dfkd-engine-1"
META_FILE = "dfkd_diffusion.json"


def unet_config(input_size: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 64),
                layers_per_block: int = 1, attention: bool = False) -> dict[str, Any]:
    """A small class-conditional ``UNet2DModel`` configuration for ``input_size`` = (C, H, W)."""
    c, h, w = (int(v) for v in input_size)
    widths = tuple(int(v) for v in widths)
    if not widths:
        raise DfkdError("widths must name at least one level")
    down = 2 ** (len(widths) - 1)
    if h % down or w % down:
        raise DfkdError(f"{len(widths)} UNet levels halve the image {len(widths) - 1} times; {h}x{w} is not "
                        f"divisible by {down}")
    groups = min(8, *widths)
    if any(v % groups for v in widths):
        raise DfkdError(f"widths {list(widths)} must all be divisible by {groups} (group norm)")
    last_attn = attention and len(widths) > 1
    down_types = ["DownBlock2D"] * len(widths)
    up_types = ["UpBlock2D"] * len(widths)
    if last_attn:
        down_types[-1] = "AttnDownBlock2D"
        up_types[0] = "AttnUpBlock2D"
    return {
        "sample_size": [h, w] if h != w else h,
        "in_channels": c,
        "out_channels": c,
        "block_out_channels": list(widths),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "layers_per_block": int(layers_per_block),
        "norm_num_groups": groups,
        "num_class_embeds": int(num_classes) + 1,  # + the null class for classifier-free guidance
        "attention_head_dim": max(8, widths[-1] // 4),
    }


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


class DiffusionTraining(Task):
    """Class-conditional DDPM training (epsilon prediction, classifier-free-guidance label dropout,
    EMA weights) as an engine task. A round is the steps up to the next multiple of
    ``round_steps`` (the gcd of 50, the loss-curve interval, and the checkpoint interval), so rounds,
    checkpoints and the loss curve stay aligned across resumes."""

    name = "train diffusion"
    CURVE_EVERY = 50

    def __init__(self, unet, ema, images, labels, acp, num_classes: int, batch_size: int, flip: bool,
                 p_uncond: float, train_timesteps: int, ema_decay: float, steps: int, checkpoint_every: int,
                 seed: int, device: torch.device):
        self.unet, self.ema, self.x_all, self.y_all, self.acp = unet, ema, images, labels, acp
        self.null, self.batch_size, self.flip, self.p_uncond = int(num_classes), batch_size, flip, p_uncond
        self.train_timesteps, self.ema_decay, self.steps, self.device = train_timesteps, ema_decay, steps, device
        self.round_steps = math.gcd(self.CURVE_EVERY, checkpoint_every) if checkpoint_every else self.CURVE_EVERY
        self.checkpoint_rounds = max(1, checkpoint_every // self.round_steps) if checkpoint_every else 0
        self.gen = torch.Generator().manual_seed(int(seed))
        self.running: Optional[torch.Tensor] = None  # smoothed loss, on the device
        self.losses: list[list] = []
        self._rng_at_step = self.gen.get_state()

    def modules(self) -> list[nn.Module]:
        return [self.unet]

    def begin(self, engine: Engine) -> None:
        self.unet.train()

    def running_value(self) -> Optional[float]:
        return None if self.running is None else float(self.running)

    def _ema_update(self, step: int) -> None:
        with torch.no_grad():
            d = min(self.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p, 1 - d)
            for be, b in zip(self.ema.buffers(), self.unet.buffers()):
                be.copy_(b)

    def round(self, engine: Engine) -> dict[str, Any]:
        dev, gen = self.device, self.gen
        while not engine.finished():
            self._rng_at_step = gen.get_state()
            idx = torch.randint(len(self.x_all), (self.batch_size,), generator=gen)
            x0 = _to_unit(self.x_all[idx]).to(dev) * 2 - 1
            y = self.y_all[idx].to(dev)
            if self.flip:
                fl = torch.rand(len(x0), generator=gen).to(dev) < 0.5
                x0 = torch.where(fl[:, None, None, None], x0.flip(3), x0)
            drop = torch.rand(len(y), generator=gen).to(dev) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null), y)
            t = torch.randint(self.train_timesteps, (len(x0),), generator=gen).to(dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            a = self.acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = self.unet(xt, t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), noise)
            step = engine.step
            lv = engine.optimizer_step(loss, after=lambda: self._ema_update(step))
            self.running = lv if self.running is None else 0.98 * self.running + 0.02 * lv
            if engine.step % self.CURVE_EVERY == 0 or engine.step == self.steps:
                self.losses.append([engine.step, float(self.running)])
            if engine.step % self.round_steps == 0:
                break
        return {"loss": self.running if self.running is not None else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict(), "rng": self.gen.get_state(), "losses": self.losses,
                "running": self.running_value()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.ema.load_state_dict(st["ema"])
        self.gen.set_state(st["rng"])
        self.losses = [list(x) for x in st["losses"]]
        r = st.get("running")
        self.running = None if r is None else torch.tensor(float(r), device=self.device)

    def rewind(self, snapshot: Any) -> None:
        self.gen.set_state(self._rng_at_step)  # the cut-short step's draws are made again on resume


def train_diffusion(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    output: str | Path,
    *,
    class_names: Optional[Sequence[str]] = None,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup: int = 100,
    widths: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    p_uncond: float = 0.1,
    train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    ema_decay: float = 0.995,
    flip: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpoint_every: int = 250,
    budget_seconds: Optional[float] = None,
    progress: bool = True,
    meta: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Train (or resume training) a class-conditional DDPM on ``images`` and save it to ``output``.

    ``images``: (N, C, H, W), uint8 or float in [0, 1]; ``labels``: (N,) class ids. Returns a
    summary (steps done, final loss, wall seconds, whether the run finished).
    """
    from diffusers import DDPMScheduler, UNet2DModel

    if images.dim() != 4 or len(images) != len(labels) or len(images) == 0:
        raise DfkdError("train_diffusion needs images (N, C, H, W) and N labels, N > 0")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DfkdError(f"labels must lie in [0, {num_classes})")
    device = torch.device(device)
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "input_size": list(images.shape[1:]), "num_classes": int(num_classes), "steps": int(steps),
        "batch_size": int(batch_size), "lr": float(lr), "warmup": int(warmup), "widths": [int(v) for v in widths],
        "layers_per_block": int(layers_per_block), "attention": bool(attention), "p_uncond": float(p_uncond),
        "train_timesteps": int(train_timesteps), "beta_schedule": beta_schedule, "ema_decay": float(ema_decay),
        "flip": bool(flip), "seed": int(seed), "num_images": int(len(images)),
    }
    config = unet_config(images.shape[1:], num_classes, widths, layers_per_block, attention)
    torch.manual_seed(int(seed))
    unet = UNet2DModel(**config).to(device)
    ema = UNet2DModel(**config).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=int(train_timesteps), beta_schedule=beta_schedule,
                          prediction_type="epsilon", clip_sample=False)
    from dfkd.optim import build_optimizer

    opt = build_optimizer(unet, "adamw", lr=float(lr), weight_decay=0.0)
    task = DiffusionTraining(unet, ema, images, labels.long(), sched.alphas_cumprod.to(device), int(num_classes),
                             int(batch_size), bool(flip), float(p_uncond), int(train_timesteps), float(ema_decay),
                             int(steps), int(checkpoint_every or 0), int(seed), device)
    state_path = out / STATE_FILE
    state = None
    if state_path.is_file():
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable checkpoint
            raise DfkdError(f"cannot read {state_path} ({type(e).__name__}); delete it to start over") from None
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise DfkdError(f"{state_path} was saved by another version of dfkd; delete it to start over")
        if saved.get("settings") != settings:
            raise DfkdError(f"{out} holds a training run with other settings or data; choose another output "
                            "folder or delete it")
        state = saved
        log.info("resuming diffusion training at step %d of %d", int(saved["step"]), steps)

    def save_state(run_state: dict) -> None:
        atomic_torch_save({"format": STATE_FORMAT, "settings": settings, **run_state}, state_path)

    engine = Engine(unet, opt, Schedule(float(lr), int(steps), "step", min(0.5, int(warmup) / max(1, int(steps))),
                                        "constant", budget_seconds),
                    device=device, grad_clip=1.0, checkpoint_every=task.checkpoint_rounds, save_fn=save_state,
                    progress="train diffusion" if progress else None)
    res = engine.run(task, state)
    step, wall, running, losses = res["steps"], res["wall_seconds"], task.running_value(), task.losses
    stopped_by_budget = res["stopped_by_budget"]
    ema.save_pretrained(str(out / "unet"))
    sched.save_pretrained(str(out / "scheduler"))
    finished = step >= steps
    info = {
        "format": 1, "kind": "class-conditional-ddpm", "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else [str(k) for k in range(num_classes)],
        "null_class": int(num_classes), "input_size": list(images.shape[1:]), "settings": settings,
        "steps_done": step, "finished": finished, "final_loss": running, "loss_curve": losses,
        "train_seconds": wall, **dict(meta or {}),
    }
    atomic_write_json(out / META_FILE, info)
    return {"output": str(out), "steps_done": step, "finished": finished, "final_loss": running,
            "wall_seconds": wall, "stopped_by_budget": stopped_by_budget}


def train_diffusion_from_store(dataset: str | Path, output: str | Path, label_from: str = "teacher",
                               **kwargs: Any) -> dict[str, Any]:
    """:func:`train_diffusion` on a stored synthetic dataset (``dfkd-synthesize`` output).

    ``label_from``: ``teacher`` conditions on the teacher's argmax over the stored logits (what
    the teacher sees in each image); ``target`` on the class each image was synthesized for.
    """
    from dfkd.data.store import SyntheticStore

    if label_from not in ("teacher", "target"):
        raise DfkdError(f"label_from must be 'teacher' or 'target', got {label_from!r}")
    store = SyntheticStore(dataset)
    t = store.load_all()
    labels = t["logits"].float().argmax(1) if label_from == "teacher" else t["labels"]
    meta = {"source_dataset": {"path": str(Path(str(dataset)).name), "count": len(store),
                               "synthesizer": (store.manifest.get("synthesizer") or {}).get("name")},
            "teacher": store.teacher, "label_from": label_from}
    return train_diffusion(t["images"], labels, store.num_classes, output, class_names=store.class_names,
                           meta=meta, **kwargs)


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser() / META_FILE
    if not p.is_file():
        raise DfkdError(f"{p.parent} has no {META_FILE}: not a model dfkd-train-diffusion wrote")
    return json.loads(p.read_text())
