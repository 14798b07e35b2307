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
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.models.checkpoint import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
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
    opt = torch.optim.AdamW(unet.parameters(), lr=float(lr), weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed))
    step, losses, wall_before, running = 0, [], 0.0, None
    state_path = out / STATE_FILE
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable checkpoint
            raise DfkdError(f"cannot read {state_path} ({type(e).__name__}); delete it to start over") from None
        if state.get("settings") != settings:
            raise DfkdError(f"{out} holds a training run with other settings or data; choose another output "
                            "folder or delete it")
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step, losses, wall_before = int(state["step"]), list(state["losses"]), float(state["wall"])
        running = state.get("running")  # the smoothed loss, so a resumed run logs what an unbroken one does
        running = None if running is None else float(running)
        log.info("resuming diffusion training at step %d of %d", step, steps)

    x_all = images  # kept in its stored dtype; batches are converted on the fly
    y_all = labels.long()
    acp = sched.alphas_cumprod.to(device)
    null = int(num_classes)

    def save_state(wall: float, rng: Optional[torch.Tensor] = None) -> None:
        atomic_torch_save({"settings": settings, "unet": unet.state_dict(), "ema": ema.state_dict(),
                           "opt": opt.state_dict(), "rng": gen.get_state() if rng is None else rng,
                           "step": step, "losses": losses,
                           "running": running, "wall": wall}, state_path)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(steps), initial=step, desc="train diffusion", dynamic_ncols=True)
    t0 = time.perf_counter()
    stopped_by_budget = False
    unet.train()
    # An interrupt (Ctrl-C) before the step's update saves the state the step started from (the
    # random state included), so the resumed run redoes that step exactly; one during the update
    # keeps the last checkpoint, which is whole.
    rng_at_step, updating = gen.get_state(), False
    try:
        while step < steps:
            if budget_seconds is not None and wall_before + time.perf_counter() - t0 >= budget_seconds:
                stopped_by_budget = True
                break
            rng_at_step = gen.get_state()
            idx = torch.randint(len(x_all), (int(batch_size),), generator=gen)
            x0 = _to_unit(x_all[idx]).to(device) * 2 - 1
            y = y_all[idx].to(device)
            if flip:
                fl = torch.rand(len(x0), generator=gen).to(device) < 0.5
                x0 = torch.where(fl[:, None, None, None], x0.flip(3), x0)
            drop = torch.rand(len(y), generator=gen).to(device) < p_uncond
            y = torch.where(drop, torch.full_like(y, null), y)
            t = torch.randint(int(train_timesteps), (len(x0),), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(xt, t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), noise)
            for g in opt.param_groups:
                g["lr"] = float(lr) * min(1.0, (step + 1) / max(1, warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            updating = True
            opt.step()
            with torch.no_grad():
                d = min(float(ema_decay), (1 + step) / (10 + step))
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - d)
                for be, b in zip(ema.buffers(), unet.buffers()):
                    be.copy_(b)
            step += 1
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            if step % 50 == 0 or step == steps:
                losses.append([step, running])
            updating = False
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
            if checkpoint_every and step % int(checkpoint_every) == 0 and step < steps:
                save_state(wall_before + time.perf_counter() - t0)
    except KeyboardInterrupt:
        if not updating:
            save_state(wall_before + time.perf_counter() - t0, rng=rng_at_step)
        raise
    finally:
        if bar is not None:
            bar.close()
    wall = wall_before + time.perf_counter() - t0
    save_state(wall)
    ema.save_pretrained(str(out / "unet"))
    sched.save_pretrained(str(out / "scheduler"))
    finished = step >= steps
    info = {
        "format": 1, "kind": "class-conditional-ddpm", "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else [str(k) for k in range(num_classes)],
        "null_class": null, "input_size": list(images.shape[1:]), "settings": settings,
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
