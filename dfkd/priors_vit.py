"""Statistic priors for Vision Transformer teachers (no BatchNorm), as removable context managers.

Two priors and their sum, registered in :data:`dfkd.hooks.PRIORS`:

``vit_patch_entropy``
    PSAQ-ViT's patch-similarity prior (Li et al. 2022): for every block, the cosine similarities
    between the patch tokens of the attention (MHSA) output of one image form a distribution;
    real images give diverse (high-entropy) similarity distributions, noise gives peaked ones.
    The term is ``log G − H``, with H the entropy of a Gaussian kernel density estimate of the
    similarities evaluated on a grid of G points in [−1, 1] (≥ 0; minimising it maximises H).
    With ``target="recorded"`` it is instead ``|log G − H − r|``, r the value recorded from the
    teacher on real images: real images are diverse, but not maximally so.

``vit_token_stats``
    The ViT analogue of BatchNorm running statistics: per block, the mean of every (patch position,
    channel) and the variance of every channel of the block's input (the first LayerNorm's input),
    recorded from the teacher on reference images by whoever trained it
    (:func:`record_token_statistics`, shipped next to the checkpoint as safetensors) and attached to
    the model (:func:`attach_token_statistics`). The term is scale-free:
    ``rms((μ − μ̂)/σ̂) + rms(log σ² − log σ̂²)``. Optionally also at each MLP's input and the last
    block's output (``sites``), and with the variance per position (``position_var``).

``vit``
    ``entropy · patch_entropy + stats · token_stats`` (the token term only where statistics are
    attached; the entropy matched to the recorded value where there is one, else maximised).
    ``prior=auto`` picks it for a ViT teacher.

Everything is read at module boundaries (an ``Attention`` module's output, a ``Block``'s input, a
LayerNorm's input), never inside the attention kernel, so fused ``scaled_dot_product_attention`` is fine.
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
ENTROPY_BUFFER = "dfkd_entropy_gap"  # on a block: the mean ``log G − H`` of its attention output on real images
ENTROPY_GRID = 64


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
    The KDE is binned (the standard fast KDE): each similarity is split linearly between its two
    neighbouring grid points (differentiable in the similarity) and the per-image histogram is
    smoothed with the image's Gaussian kernel (a convolution over the grid, cut at 4 bandwidths) instead
    of evaluating a Gaussian per (grid point, pair): a fraction of the cost, the same values to a few per cent.
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
    # linear binning: weight (1 − f) on grid point k, f on k + 1
    pos = (s.clamp(-1.0, 1.0) + 1.0) * ((grid - 1) / 2.0)
    k = pos.detach().floor().clamp_(0, grid - 2)
    f = pos - k
    k = k.long()
    hist = torch.zeros(b, grid, device=tokens.device, dtype=s.dtype)
    hist = hist.scatter_add(1, k, 1.0 - f).scatter_add(1, k + 1, f) / s.shape[1]  # (B, G)
    with torch.no_grad():  # per-image Gaussian on grid lags, cut at 4 bandwidths (weight < 4e-4 beyond)
        step = 2.0 / (grid - 1)
        reach = int(min(grid - 1, math.ceil(4.0 * float(h.max()) / step)))
        lag = torch.arange(-reach, reach + 1, device=tokens.device, dtype=s.dtype)
        kern = torch.exp(-0.5 * (lag[None, :] * step / h) ** 2)  # (B, 2·reach + 1)
    dens = F.conv1d(hist[None], kern[:, None], padding=reach, groups=b)[0]  # (B, G): each image its own kernel
    p = dens / dens.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


class PatchEntropyPrior(StatisticsPrior):
    """Maximise the entropy of each block's patch-similarity distribution (PSAQ-ViT); see the module doc.

    ``target="recorded"`` instead matches each block's batch-mean ``log G − H`` to the value recorded
    from the teacher on real images (:func:`record_token_statistics`): real images are not maximally
    diverse, and pushing past them makes images the student learns less from."""

    name = "vit_patch_entropy"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return is_vit(model)

    def __init__(self, model: nn.Module, grid: int = ENTROPY_GRID, bandwidth: Optional[float] = None,
                 max_pairs: int = 4096, blocks: Optional[Sequence[int]] = None, target: str = "max"):
        super().__init__(model)
        self.blocks = vit_blocks(model)
        if not self.blocks:
            raise DfkdError(
                f"the '{self.name}' prior needs a ViT teacher (model.blocks[i].attn, as in timm's "
                f"VisionTransformer); {type(model).__name__} has none; choose prior=auto"
            )
        if target not in ("max", "recorded"):
            raise DfkdError(f"patch-entropy target must be 'max' or 'recorded', got {target!r}")
        if target == "recorded" and not has_entropy_reference(model):
            raise DfkdError("patch-entropy target 'recorded' needs the teacher's recorded entropy "
                            "(record_token_statistics + attach_token_statistics); use target='max'")
        self.grid, self.bandwidth, self.max_pairs = int(grid), bandwidth, int(max_pairs)
        self.target = target
        self.indices = list(range(len(self.blocks))) if blocks is None else [int(i) % len(self.blocks) for i in blocks]
        self.prefix = num_prefix_tokens(model)

    def _hook(self, block: nn.Module) -> Callable:
        def hook(module, inputs, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            ent = similarity_entropy(out[:, self.prefix:], self.grid, self.bandwidth, self.max_pairs)
            gap = math.log(self.grid) - ent.mean()
            if self.target == "recorded":
                gap = (gap - getattr(block, ENTROPY_BUFFER).reshape(())).abs()
            self._terms.append(gap)

        return hook

    def _attach(self) -> None:
        for i in self.indices:
            self._handles.append(self.blocks[i].attn.register_forward_hook(self._hook(self.blocks[i])))


# -- token statistics (the BatchNorm-statistics analogue) ------------------------------------------
#: where token statistics are read: a block's input (``in``, the first LayerNorm's input), the input of its
#: MLP (``mid``, the second LayerNorm's input: after the attention residual) and, for the last block only,
#: its output (``out``, the final norm's input). Buffers and file keys per site (``in`` keeps its
#: original names): block{i}.mean / .var / .pos_var, block{i}.mid_mean / ..., block{L-1}.out_mean / ...
SITES = ("in", "mid", "out")


def _key(i: int, site: str, stat: str) -> str:
    return f"block{i}.{stat}" if site == "in" else f"block{i}.{site}_{stat}"


def _buffer(site: str, stat: str) -> str:
    if site == "in" and stat in ("mean", "var"):
        return MEAN_BUFFER if stat == "mean" else VAR_BUFFER
    return f"dfkd_token_{site}_{stat}"


def _site_hooks(blocks: Sequence[nn.Module], sites: Sequence[str], fn: Callable) -> list:
    """Hooks that call ``fn(block_index, site, tokens)`` on every block's tokens at ``sites``; returns
    their handles (the caller removes them)."""
    handles = []
    for i, blk in enumerate(blocks):
        if "in" in sites:
            handles.append(blk.register_forward_pre_hook(lambda m, inp, i=i: fn(i, "in", inp[0])))
        if "mid" in sites and isinstance(getattr(blk, "norm2", None), nn.Module):
            handles.append(blk.norm2.register_forward_pre_hook(lambda m, inp, i=i: fn(i, "mid", inp[0])))
        if "out" in sites and i == len(blocks) - 1:
            handles.append(blk.register_forward_hook(
                lambda m, inp, out, i=i: fn(i, "out", out[0] if isinstance(out, tuple) else out)))
    return handles


@contextmanager
def _capture_sites(blocks: Sequence[nn.Module], sites: Sequence[str], fn: Callable) -> Iterator[None]:
    handles = []
    try:
        handles = _site_hooks(blocks, sites, fn)
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_token_statistics(net: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor,
                            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-block token statistics of ``net`` (a Teacher/Normalized wrapper or a bare ViT) on reference
    images in [0, 1] (a tensor, or an iterable of batches): ``{"block{i}.mean": (N, D), "block{i}.var": (D,),
    "block{i}.pos_var": (N, D), "block{i}.entropy_gap": (1,)}`` for each block's input, the same with a
    ``mid_`` prefix for its MLP's input and ``out_`` for the last block's output (see :data:`SITES`).
    ``var`` is the within-position variance pooled over positions, ``pos_var`` per position;
    ``entropy_gap`` the mean ``log G − H`` of the block's patch-similarity KDE (G = 64) on these images.
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
    sums: dict[tuple[int, str], list] = {}
    gaps: dict[int, float] = {}
    count = 0
    g = torch.Generator().manual_seed(0)

    def add(i: int, site: str, t: torch.Tensor) -> None:
        t = t[:, prefix:].double()
        s = sums.setdefault((i, site), [0.0, 0.0])
        s[0] = s[0] + t.sum(0)
        s[1] = s[1] + (t * t).sum(0)

    with _capture_sites(blocks, SITES, add), capture_blocks(model, what="attn") as attn:
        for x in images:
            net(x.to(dev))
            for i, a in attn.items():
                if a.shape[1] - prefix >= 2:
                    ent = similarity_entropy(a[:, prefix:], ENTROPY_GRID, generator=g)
                    gaps[i] = gaps.get(i, 0.0) + float((math.log(ENTROPY_GRID) - ent).double().sum())
            count += len(x)
    net.train(was_training)
    stats = {}
    for (i, site), (s1, s2) in sorted(sums.items(), key=lambda kv: (kv[0][0], SITES.index(kv[0][1]))):
        mean = s1 / count
        pos_var = (s2 / count - mean * mean).clamp_min(0)  # within-position variance
        stats[_key(i, site, "mean")] = mean.float().cpu()
        stats[_key(i, site, "var")] = pos_var.mean(0).float().cpu()  # pooled over positions
        stats[_key(i, site, "pos_var")] = pos_var.float().cpu()
        if site == "in" and i in gaps:
            stats[f"block{i}.entropy_gap"] = torch.tensor([gaps[i] / count], dtype=torch.float32)
    return stats


def attach_token_statistics(model: nn.Module, stats: dict[str, torch.Tensor] | str | Path) -> None:
    """Store recorded statistics on the ViT's blocks as non-persistent buffers (they follow ``.to()``,
    stay out of the state dict) so that ``teacher.statistics('vit_token_stats')`` finds them.
    Block inputs' ``mean``/``var`` are required; everything else (other sites, per-position variance,
    the entropy reference: absent in files recorded by older versions) is attached where present."""
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
        for site in SITES:
            for stat in ("mean", "var", "pos_var"):
                t = stats.get(_key(i, site, stat))
                if t is not None:
                    blk.register_buffer(_buffer(site, stat), t.to(dev, torch.float32), persistent=False)
        e = stats.get(f"block{i}.entropy_gap")
        if e is not None:
            blk.register_buffer(ENTROPY_BUFFER, e.reshape(1).to(dev, torch.float32), persistent=False)


def has_token_statistics(model: nn.Module) -> bool:
    blocks = vit_blocks(model)
    return bool(blocks) and all(getattr(b, MEAN_BUFFER, None) is not None for b in blocks)


def has_entropy_reference(model: nn.Module) -> bool:
    blocks = vit_blocks(model)
    return bool(blocks) and all(getattr(b, ENTROPY_BUFFER, None) is not None for b in blocks)


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
    """Match token statistics to those recorded from the teacher (module doc): at each block's input
    (``sites`` ``in``), optionally also its MLP's input (``mid``) and the last block's output (``out``);
    ``position_var`` compares the variance per (position, channel) instead of pooled per channel.
    ``sites="auto"``: every site whose statistics are attached. Each site gives one term per block."""

    name = "vit_token_stats"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return has_token_statistics(model)

    def __init__(self, model: nn.Module, eps: float = 1e-5, sites: str | Sequence[str] = ("in",),
                 position_var: bool = False):
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
        recorded = [s for s in SITES if any(getattr(b, _buffer(s, "mean"), None) is not None for b in self.blocks)]
        if sites == "auto":
            sites = recorded
        sites = [sites] if isinstance(sites, str) else list(sites)
        for site in sites:
            if site not in SITES:
                raise DfkdError(f"unknown token-statistics site {site!r}; known: {', '.join(SITES)}")
            if site not in recorded:
                raise DfkdError(f"no token statistics recorded at site {site!r} (recorded: {', '.join(recorded)}); "
                                "record them again with dfkd.priors_vit.record_token_statistics")
        self.sites = sites
        self.position_var = bool(position_var) and all(
            getattr(b, _buffer(s, "pos_var"), None) is not None for b in self.blocks for s in sites
            if getattr(b, _buffer(s, "mean"), None) is not None)
        self.eps = float(eps)
        self.prefix = num_prefix_tokens(model)

    def _term(self, block: nn.Module, site: str, tokens: torch.Tensor) -> None:
        x = tokens[:, self.prefix:].float()
        ref_mean, ref_var = getattr(block, _buffer(site, "mean"), None), getattr(block, _buffer(site, "var"), None)
        if ref_mean is None:
            return
        mean = x.mean(dim=0)
        if mean.shape != ref_mean.shape:
            raise DfkdError(f"token statistics were recorded for {tuple(ref_mean.shape)} tokens, "
                            f"the input gives {tuple(mean.shape)} (another image size?)")
        d_mean = ((mean - ref_mean) / (ref_var + self.eps).sqrt()).pow(2).mean().sqrt()
        if self.position_var:
            var, ref_var = (x - mean).pow(2).mean(dim=0), getattr(block, _buffer(site, "pos_var"))
        else:
            var = (x - mean).pow(2).mean(dim=(0, 1))
        d_var = (torch.log(var + self.eps) - torch.log(ref_var + self.eps)).pow(2).mean().sqrt()
        self._terms.append(d_mean + d_var)

    def _attach(self) -> None:
        blocks = self.blocks
        self._handles += _site_hooks(blocks, self.sites, lambda i, site, t: self._term(blocks[i], site, t))


class ViTPrior(StatisticsPrior):
    """``entropy · vit_patch_entropy + stats · vit_token_stats`` (the latter only where statistics are
    attached to the teacher). What ``prior=auto`` picks for a ViT teacher.

    ``entropy_target``: ``auto`` matches the entropy recorded with the token statistics where there is
    one (``recorded``) and maximises it otherwise (``max``, PSAQ-ViT). ``token_kwargs`` go to
    :class:`TokenStatsPrior` (``sites``, ``position_var``), the rest to :class:`PatchEntropyPrior`."""

    name = "vit"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return is_vit(model) and not batchnorm_layers(model)

    def __init__(self, model: nn.Module, entropy: float = 1.0, stats: float = 1.0, entropy_target: str = "auto",
                 token_kwargs: Optional[dict] = None, **entropy_kwargs):
        super().__init__(model)
        self.parts: list[tuple[float, StatisticsPrior]] = []
        if entropy_target == "auto":
            entropy_target = "recorded" if has_entropy_reference(model) else "max"
        if float(entropy) > 0:
            self.parts.append((float(entropy), PatchEntropyPrior(model, target=entropy_target, **entropy_kwargs)))
        if float(stats) > 0 and has_token_statistics(model):
            self.parts.append((float(stats), TokenStatsPrior(model, **(token_kwargs or {}))))
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
