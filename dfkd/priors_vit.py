"""Statistic priors for Vision Transformer teachers (no BatchNorm), as removable context managers.

Two priors and their sum, registered in :data:`dfkd.hooks.PRIORS`:

``vit_patch_entropy``
    PSAQ-ViT's patch-similarity prior (Li et al. 2022): for every block, the cosine similarities
    between the patch tokens of the attention (MHSA) output of one image form a distribution;
    real images give diverse (high-entropy) similarity distributions, noise gives peaked ones.
    The term is ``log G − H``, with H the entropy of a Gaussian kernel density estimate of the
    similarities evaluated on a grid of G points in [−1, 1] (≥ 0; minimising it maximises H).

``vit_token_stats``
    The ViT analogue of BatchNorm running statistics: per block, the mean of every (patch position,
    channel) and the variance of every channel of the block's input (the first LayerNorm's input),
    recorded from the teacher on reference images by whoever trained it
    (:func:`record_token_statistics`, shipped next to the checkpoint as safetensors) and attached to
    the model (:func:`attach_token_statistics`). The term is scale-free:
    ``rms((μ − μ̂)/σ̂) + rms(log σ² − log σ̂²)``.

``vit``
    ``entropy · patch_entropy + stats · token_stats`` (the token term only where statistics are
    attached). ``prior=auto`` picks it for a ViT teacher.

Everything is read at module boundaries (an ``Attention`` module's output, a ``Block``'s input), never
inside the attention kernel, so fused ``scaled_dot_product_attention`` is fine.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import PRIORS, StatisticsPrior, batchnorm_layers

MEAN_BUFFER, VAR_BUFFER = "dfkd_token_mean", "dfkd_token_var"


# -- model structure ----------------------------------------------------------------------------
def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm-style ViT (``model.blocks[i].attn``), or [] when there are none."""
    model = getattr(model, "model", model) if not hasattr(model, "blocks") else model
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return []
    out = [b for b in blocks if isinstance(getattr(b, "attn", None), nn.Module)]
    return out if len(out) == len(blocks) else []


def num_prefix_tokens(model: nn.Module) -> int:
    model = getattr(model, "model", model) if not hasattr(model, "blocks") else model
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def is_vit(model: nn.Module) -> bool:
    return bool(vit_blocks(model))


@contextmanager
def capture_blocks(model: nn.Module, indices: Optional[Sequence[int]] = None,
                   what: str = "output") -> Iterator[dict[int, torch.Tensor]]:
    """Record the output (or input) tokens (B, N, D) of the chosen blocks while in the ``with`` block.

    ``what``: ``output`` (the block's output), ``input`` (its input) or ``attn`` (the attention
    module's output). Hooks are removed on exit. Indices may be negative.
    """
    blocks = vit_blocks(model)
    if not blocks:
        raise DfkdError(f"{type(model).__name__} has no ViT blocks (model.blocks[i].attn) to read tokens from")
    idx = range(len(blocks)) if indices is None else [i % len(blocks) for i in indices]
    store: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for i in idx:
            if what == "input":
                handles.append(blocks[i].register_forward_pre_hook(
                    lambda m, inp, i=i: store.__setitem__(i, inp[0])))
            else:
                mod = blocks[i].attn if what == "attn" else blocks[i]
                handles.append(mod.register_forward_hook(
                    lambda m, inp, out, i=i: store.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
        yield store
    finally:
        for h in handles:
            h.remove()


# -- patch-similarity entropy (PSAQ-ViT) -----------------------------------------------------------
def similarity_entropy(tokens: torch.Tensor, grid: int = 64, bandwidth: Optional[float] = None,
                       max_pairs: int = 4096, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-image entropy (B,) of the KDE of patch-to-patch cosine similarities of ``tokens`` (B, N, D).

    Uses the N(N−1)/2 distinct pairs (a random subset of ``max_pairs`` when there are more).
    ``bandwidth`` None: Scott's rule per image (1.06 · std · n^(−1/5), detached, at least 0.01).
    """
    b, n, _ = tokens.shape
    if n < 2:
        raise DfkdError("patch-similarity entropy needs at least two patch tokens")
    z = F.normalize(tokens.float(), dim=-1)
    sim = z @ z.transpose(1, 2)  # (B, N, N)
    iu = torch.triu_indices(n, n, offset=1, device=tokens.device)
    s = sim[:, iu[0], iu[1]]  # (B, P)
    if s.shape[1] > max_pairs:
        pick = torch.randperm(s.shape[1], generator=generator)[:max_pairs].to(tokens.device)
        s = s[:, pick]
    if bandwidth is None:
        h = (1.06 * s.detach().std(dim=1, keepdim=True) * s.shape[1] ** -0.2).clamp_min(0.01)  # (B, 1)
    else:
        h = torch.full((b, 1), float(bandwidth), device=tokens.device)
    g = torch.linspace(-1.0, 1.0, grid, device=tokens.device)
    dens = torch.exp(-0.5 * ((g[None, :, None] - s[:, None, :]) / h[:, :, None]) ** 2).mean(-1)  # (B, G)
    p = dens / dens.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


class PatchEntropyPrior(StatisticsPrior):
    """Maximise the entropy of each block's patch-similarity distribution (PSAQ-ViT); see the module doc."""

    name = "vit_patch_entropy"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return is_vit(model)

    def __init__(self, model: nn.Module, grid: int = 64, bandwidth: Optional[float] = None,
                 max_pairs: int = 4096, blocks: Optional[Sequence[int]] = None):
        super().__init__(model)
        self.blocks = vit_blocks(model)
        if not self.blocks:
            raise DfkdError(
                f"the '{self.name}' prior needs a ViT teacher (model.blocks[i].attn, as in timm's "
                f"VisionTransformer); {type(model).__name__} has none; choose prior=auto"
            )
        self.grid, self.bandwidth, self.max_pairs = int(grid), bandwidth, int(max_pairs)
        self.indices = list(range(len(self.blocks))) if blocks is None else [int(i) % len(self.blocks) for i in blocks]
        self.prefix = num_prefix_tokens(model)

    def _hook(self) -> Callable:
        def hook(module, inputs, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            ent = similarity_entropy(out[:, self.prefix:], self.grid, self.bandwidth, self.max_pairs)
            self._terms.append(math.log(self.grid) - ent.mean())

        return hook

    def _attach(self) -> None:
        for i in self.indices:
            self._handles.append(self.blocks[i].attn.register_forward_hook(self._hook()))


# -- token statistics (the BatchNorm-statistics analogue) ------------------------------------------
def _token_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) → mean per (position, channel) (N, D), variance per channel (D,) around those means."""
    xf = x.float()
    mean = xf.mean(dim=0)
    var = (xf - mean).pow(2).mean(dim=(0, 1))
    return mean, var


@torch.no_grad()
def record_token_statistics(net: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor,
                            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-block token statistics of ``net`` (a Teacher/Normalized wrapper or a bare ViT) on reference
    images in [0, 1] (a tensor, or an iterable of batches): ``{"block{i}.mean": (N, D), "block{i}.var": (D,)}``.
    Run it where the training data lives (e.g. right after training the teacher) and ship the result."""
    model = getattr(net, "model", net)
    blocks = vit_blocks(model)
    if not blocks:
        raise DfkdError(f"{type(model).__name__} is not a ViT: no token statistics to record")
    prefix = num_prefix_tokens(model)
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    sums: dict[int, list] = {}
    count = 0
    with capture_blocks(model, what="input") as store:
        for x in images:
            net(x.to(dev))
            for i, t in store.items():
                t = t[:, prefix:].double()
                s = sums.setdefault(i, [0.0, 0.0])
                s[0] = s[0] + t.sum(0)
                s[1] = s[1] + (t * t).sum(0)
            count += len(x)
    net.train(was_training)
    stats = {}
    for i, (s1, s2) in sorted(sums.items()):
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0).mean(0)  # within-position variance, pooled
        stats[f"block{i}.mean"] = mean.float().cpu()
        stats[f"block{i}.var"] = var.float().cpu()
    return stats


def attach_token_statistics(model: nn.Module, stats: dict[str, torch.Tensor] | str | Path) -> None:
    """Store recorded statistics on the ViT's blocks as non-persistent buffers (they follow ``.to()``,
    stay out of the state dict) so that ``teacher.statistics('vit_token_stats')`` finds them."""
    if not isinstance(stats, dict):
        stats = load_token_statistics(stats)
    model = getattr(model, "model", model) if not hasattr(model, "blocks") else model
    blocks = vit_blocks(model)
    if not blocks:
        raise DfkdError(f"{type(model).__name__} is not a ViT: cannot attach token statistics")
    for i, blk in enumerate(blocks):
        m, v = stats.get(f"block{i}.mean"), stats.get(f"block{i}.var")
        if m is None or v is None:
            raise DfkdError(f"token statistics lack block {i} (the teacher has {len(blocks)} blocks)")
        dim = blk.norm1.normalized_shape[0] if hasattr(blk, "norm1") and hasattr(blk.norm1, "normalized_shape") \
            else m.shape[-1]
        if m.shape[-1] != dim or v.shape != (dim,):
            raise DfkdError(f"token statistics of block {i} have width {m.shape[-1]}, the teacher's is {dim}")
        dev = next(blk.parameters()).device
        blk.register_buffer(MEAN_BUFFER, m.to(dev, torch.float32), persistent=False)
        blk.register_buffer(VAR_BUFFER, v.to(dev, torch.float32), persistent=False)


def has_token_statistics(model: nn.Module) -> bool:
    blocks = vit_blocks(model)
    return bool(blocks) and all(getattr(b, MEAN_BUFFER, None) is not None for b in blocks)


def save_token_statistics(stats: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save

    from dfkd.models.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in stats.items()}))


def load_token_statistics(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"no token-statistics file at {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # corrupt / not safetensors
        raise DfkdError(f"cannot read token statistics {path}: {e}") from None


class TokenStatsPrior(StatisticsPrior):
    """Match each block's input token statistics to those recorded from the teacher (module doc)."""

    name = "vit_token_stats"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return has_token_statistics(model)

    def __init__(self, model: nn.Module, eps: float = 1e-5):
        super().__init__(model)
        self.blocks = vit_blocks(model)
        if not self.blocks:
            raise DfkdError(f"the '{self.name}' prior needs a ViT teacher; {type(model).__name__} has no ViT blocks")
        if not has_token_statistics(model):
            raise DfkdError(
                f"the '{self.name}' prior needs token statistics recorded from the teacher "
                "(dfkd.priors_vit.record_token_statistics + attach_token_statistics, or the "
                "*.token_stats.safetensors file written by scripts/train_vit_teacher.py); "
                "use prior=vit_patch_entropy without them"
            )
        self.eps = float(eps)
        self.prefix = num_prefix_tokens(model)

    def _hook(self) -> Callable:
        def hook(module, inputs) -> None:
            x = inputs[0][:, self.prefix:]
            mean, var = _token_moments(x)
            ref_mean, ref_var = getattr(module, MEAN_BUFFER), getattr(module, VAR_BUFFER)
            if mean.shape != ref_mean.shape:
                raise DfkdError(f"token statistics were recorded for {tuple(ref_mean.shape)} tokens, "
                                f"the input gives {tuple(mean.shape)} (another image size?)")
            d_mean = ((mean - ref_mean) / (ref_var + self.eps).sqrt()).pow(2).mean().sqrt()
            d_var = (torch.log(var + self.eps) - torch.log(ref_var + self.eps)).pow(2).mean().sqrt()
            self._terms.append(d_mean + d_var)

        return hook

    def _attach(self) -> None:
        for blk in self.blocks:
            self._handles.append(blk.register_forward_pre_hook(self._hook()))


class ViTPrior(StatisticsPrior):
    """``entropy · vit_patch_entropy + stats · vit_token_stats`` (the latter only where statistics are
    attached to the teacher). What ``prior=auto`` picks for a ViT teacher."""

    name = "vit"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return is_vit(model) and not batchnorm_layers(model)

    def __init__(self, model: nn.Module, entropy: float = 1.0, stats: float = 1.0, **entropy_kwargs):
        super().__init__(model)
        self.parts: list[tuple[float, StatisticsPrior]] = []
        if float(entropy) > 0:
            self.parts.append((float(entropy), PatchEntropyPrior(model, **entropy_kwargs)))
        if float(stats) > 0 and has_token_statistics(model):
            self.parts.append((float(stats), TokenStatsPrior(model)))
        if not is_vit(model):
            raise DfkdError(f"the 'vit' prior needs a ViT teacher; {type(model).__name__} has no ViT blocks")
        if not self.parts:
            raise DfkdError("the 'vit' prior has nothing to compute: entropy=0 and no token statistics attached")

    def _attach(self) -> None:
        for _, p in self.parts:
            p.__enter__()

    def remove(self) -> None:
        for _, p in getattr(self, "parts", []):
            p.remove()

    def reset(self) -> None:
        for _, p in self.parts:
            p.reset()

    @property
    def terms(self) -> list[torch.Tensor]:
        return [w * t for w, p in self.parts for t in p.terms]

    def loss(self, reset: bool = True) -> torch.Tensor:
        return torch.stack([w * p.loss(reset=reset) for w, p in self.parts]).sum()

    def components(self) -> dict[str, float]:
        """The current value of each part (without resetting), for logging."""
        return {p.name: float(torch.stack(p.terms).detach().sum()) for _, p in self.parts if p.terms}


PRIORS.register("vit_patch_entropy")(PatchEntropyPrior)
PRIORS.register("vit_token_stats")(TokenStatsPrior)
PRIORS.register("vit")(ViTPrior)


# -- token statistics beside a teacher checkpoint ---------------------------------------------------
def token_statistics_path(checkpoint: str | Path) -> Path:
    """``teacher.safetensors`` → ``teacher.token_stats.safetensors`` (same folder)."""
    p = Path(checkpoint)
    return p.with_name(p.name.split(".")[0] + ".token_stats.safetensors")


def save_teacher_token_statistics(net: nn.Module, dataset, checkpoint: str | Path, limit: int = 10000,
                                  seed: int = 0) -> Optional[Path]:
    """For a ViT teacher just trained on ``dataset`` (an ArrayDataset): record its token statistics on up
    to ``limit`` train images and write them beside ``checkpoint``. Does nothing for other models."""
    if not is_vit(getattr(net, "model", net)):
        return None
    g = torch.Generator().manual_seed(seed)
    images = dataset.take(torch.randperm(len(dataset), generator=g)[:limit])[0]
    dev = next(net.parameters()).device
    path = token_statistics_path(checkpoint)
    save_token_statistics(record_token_statistics(net, images.to(dev)), path)
    return path


def attach_saved_token_statistics(model: nn.Module, checkpoint: str | Path | None) -> bool:
    """Attach the token statistics stored beside ``checkpoint``, if the model is a ViT and they exist."""
    if checkpoint is None or not is_vit(model):
        return False
    path = token_statistics_path(checkpoint)
    if not path.is_file():
        return False
    attach_token_statistics(model, path)
    return True
