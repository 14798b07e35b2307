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
from dataclasses import dataclass
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


# -- model structure: transformer discovery for any layout -------------------------------------------
#: names of the second (pre-MLP) LayerNorm of a block, by layout: timm / custom, torchvision, HF ViT
_MID_NORMS = ("norm2", "ln_2", "ln2", "layernorm_after", "norm_mlp", "mlp_norm", "post_attention_layernorm")
_PREFIX_PARAMS = ("cls_token", "class_token", "dist_token", "distillation_token", "reg_token", "register_tokens")


@dataclass
class BlockSite:
    """One transformer block as seen from outside: the block (its input and output are the residual
    stream), its attention module (its output is the attention output, before the residual), the LayerNorm
    before the MLP (``None`` for post-norm blocks: there its input is not the MLP's input) and the token
    layout at the block's boundary (``batch_first`` False: (N, B, D))."""

    name: str
    block: nn.Module
    attn: nn.Module
    norm_mid: Optional[nn.Module]
    batch_first: bool
    pre_norm: bool


@dataclass
class TransformerLayout:
    kind: str  # timm, torch (nn.TransformerEncoderLayer), mha (custom nn.MultiheadAttention blocks), hf, other
    blocks: list[BlockSite]
    prefix: int  # class / distillation / register tokens before the patch tokens
    width: int

    def describe(self) -> str:
        bf = {b.batch_first for b in self.blocks}
        norm = {b.pre_norm for b in self.blocks}
        return (f"{self.kind} transformer: {len(self.blocks)} blocks ({self.blocks[0].name} ... "
                f"{self.blocks[-1].name}), width {self.width}, {self.prefix} prefix token(s), "
                f"{'pre' if norm == {True} else 'post' if norm == {False} else 'mixed'}-norm, "
                f"tokens {'(B, N, D)' if bf == {True} else '(N, B, D)'}")


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or (type(m).__name__.endswith("Attention")
                                                     and any(True for _ in m.parameters()))


def _width(attn: nn.Module) -> int:
    if isinstance(attn, nn.MultiheadAttention):
        return int(attn.embed_dim)
    for m in attn.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise DfkdError(f"cannot read the width of attention module {type(attn).__name__}")


def _layout_kind(model: nn.Module, blocks: Sequence[BlockSite]) -> str:
    mod = type(blocks[0].block).__module__
    if mod.startswith("timm."):
        return "timm"
    if isinstance(blocks[0].block, nn.TransformerEncoderLayer):
        return "torch"
    if mod.startswith("transformers."):
        return "hf"
    return "mha" if isinstance(blocks[0].attn, nn.MultiheadAttention) else "other"


def _prefix_tokens(model: nn.Module) -> int:
    for m in model.modules():  # timm (VisionTransformer, DeiT, ...): its own count
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int) and hasattr(m, "blocks"):
            return n
    count = 0
    for name, p in model.named_parameters():
        if name.split(".")[-1] in _PREFIX_PARAMS and p.dim() == 3:
            count += int(p.shape[1])
    return count


def find_transformer(model: nn.Module) -> Optional[TransformerLayout]:
    """The transformer blocks of any layout, or None when there are none: every outermost attention module
    (``nn.MultiheadAttention``, or a module class named ``*Attention`` with parameters: timm's ``Attention``,
    Hugging Face's ``ViTAttention``, ...) whose parent is then a block. Works for timm ViT/DeiT,
    ``nn.TransformerEncoderLayer`` (pre- and post-norm, ``batch_first`` either way), custom
    ``nn.MultiheadAttention`` blocks and Hugging Face ``transformers`` ViTs."""
    mods = dict(model.named_modules())
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if _is_attention(m) and name and not any(name.startswith(n + ".") for n, _ in found):
            found.append((name, m))
    blocks = []
    for name, attn in found:
        parent_name = name.rpartition(".")[0]
        if not parent_name:
            continue
        blk = mods[parent_name]
        pre = True
        if isinstance(blk, nn.TransformerEncoderLayer):
            pre = bool(blk.norm_first)
        mid = None
        if pre:
            for n in _MID_NORMS:
                if isinstance(getattr(blk, n, None), nn.Module):
                    mid = getattr(blk, n)
                    break
        bf = bool(attn.batch_first) if isinstance(attn, nn.MultiheadAttention) else True
        blocks.append(BlockSite(parent_name, blk, attn, mid, bf, pre))
    if not blocks:
        return None
    widths = {_width(b.attn) for b in blocks}
    if len(widths) != 1:  # e.g. a hierarchical transformer: read each stage? not supported
        return None
    return TransformerLayout(_layout_kind(model, blocks), blocks, _prefix_tokens(model), widths.pop())


def transformer_layout(model: nn.Module, what: str = "this prior") -> TransformerLayout:
    """:func:`find_transformer`, or a one-line :class:`DfkdError` naming the model when nothing is found."""
    layout = find_transformer(model)
    if layout is None:
        raise DfkdError(
            f"{what} needs a transformer (ViT) teacher, but {type(model).__name__} has no transformer blocks "
            "(no nn.MultiheadAttention or *Attention module inside a block); choose prior=auto")
    return layout


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` in order (any layout, see :func:`find_transformer`), or []."""
    layout = find_transformer(model)
    return [b.block for b in layout.blocks] if layout else []


def num_prefix_tokens(model: nn.Module) -> int:
    layout = find_transformer(model)
    return layout.prefix if layout else 0


def is_vit(model: nn.Module) -> bool:
    return find_transformer(model) is not None


def _batch_first(site: BlockSite, t) -> torch.Tensor:
    t = t[0] if isinstance(t, (tuple, list)) else getattr(t, "last_hidden_state", t)
    return t if site.batch_first else t.transpose(0, 1)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for k in ("hidden_states", "src", "x", "query"):
        if isinstance(kwargs.get(k), torch.Tensor):
            return kwargs[k]
    raise DfkdError("cannot find the token tensor among a transformer block's inputs")


def pre_hook(module: nn.Module, fn: Callable[[torch.Tensor], None]):
    """A forward pre-hook calling ``fn(tokens)`` with the module's first tensor input (positional or keyword)."""
    return module.register_forward_pre_hook(lambda m, a, kw: fn(_first_tensor(a, kw)), with_kwargs=True)


@contextmanager
def no_fast_path() -> Iterator[None]:
    """Turn off PyTorch's fused transformer fast path (eval-mode ``nn.TransformerEncoderLayer`` /
    ``nn.MultiheadAttention`` without gradients), which skips submodules' hooks; restored on exit.
    Fused scaled-dot-product attention inside the modules stays on."""
    mha = getattr(torch.backends, "mha", None)
    old = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(old)


@contextmanager
def capture_blocks(model: nn.Module, indices: Optional[Sequence[int]] = None,
                   what: str = "output") -> Iterator[dict[int, torch.Tensor]]:
    """Record the output (or input) tokens (B, N, D) of the chosen blocks while in the ``with`` block.

    ``what``: ``output`` (the block's output), ``input`` (its input) or ``attn`` (the attention
    module's output). Tokens are batch-first whatever the layout. Hooks are removed on exit.
    Indices may be negative.
    """
    layout = transformer_layout(model, "reading tokens")
    sites = layout.blocks
    idx = range(len(sites)) if indices is None else [i % len(sites) for i in indices]
    store: dict[int, torch.Tensor] = {}
    handles = []
    try:
        with no_fast_path():
            for i in idx:
                site = sites[i]
                if what == "input":
                    handles.append(pre_hook(site.block, lambda t, i=i, s=site: store.__setitem__(i, _batch_first(s, t))))
                else:
                    mod = site.attn if what == "attn" else site.block
                    handles.append(mod.register_forward_hook(
                        lambda m, inp, out, i=i, s=site: store.__setitem__(i, _batch_first(s, out))))
            yield store
    finally:
        for h in handles:
            h.remove()


_FAST = {"depth": 0, "old": None}


class TransformerPrior(StatisticsPrior):
    """Base of the transformer priors: finds the blocks (any layout) and keeps PyTorch's fused transformer
    fast path off while its hooks are in place (that path skips submodules' hooks)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layout = transformer_layout(model, f"the '{self.name}' prior")
        self.sites = self.layout.blocks
        self.blocks = [b.block for b in self.sites]
        self.prefix = self.layout.prefix
        self._fast_off = False

    def __enter__(self):
        mha = getattr(torch.backends, "mha", None)
        if mha is not None and not self._fast_off:
            if _FAST["depth"] == 0:
                _FAST["old"] = mha.get_fastpath_enabled()
                mha.set_fastpath_enabled(False)
            _FAST["depth"] += 1
            self._fast_off = True
        return super().__enter__()

    def remove(self) -> None:
        super().remove()
        if getattr(self, "_fast_off", False):
            self._fast_off = False
            _FAST["depth"] -= 1
            if _FAST["depth"] == 0:
                torch.backends.mha.set_fastpath_enabled(_FAST["old"])


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
        reach = grid - 1  # the widest kernel; the cut is a mask on the device (no host sync per call)
        lag = torch.arange(-reach, reach + 1, device=tokens.device, dtype=s.dtype)
        cut = torch.ceil(4.0 * h.max() / step)
        kern = torch.exp(-0.5 * (lag[None, :] * step / h) ** 2) * (lag.abs() <= cut)[None, :]  # (B, 2·reach + 1)
    dens = F.conv1d(hist[None], kern[:, None], padding=reach, groups=b)[0]  # (B, G): each image its own kernel
    p = dens / dens.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


class PatchEntropyPrior(TransformerPrior):
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
        if target not in ("max", "recorded"):
            raise DfkdError(f"patch-entropy target must be 'max' or 'recorded', got {target!r}")
        if target == "recorded" and not has_entropy_reference(model):
            raise DfkdError("patch-entropy target 'recorded' needs the teacher's recorded entropy "
                            "(record_token_statistics + attach_token_statistics); use target='max'")
        self.grid, self.bandwidth, self.max_pairs = int(grid), bandwidth, int(max_pairs)
        self.target = target
        self.indices = list(range(len(self.blocks))) if blocks is None else [int(i) % len(self.blocks) for i in blocks]

    def _hook(self, site: BlockSite) -> Callable:
        block = site.block

        def hook(module, inputs, output) -> None:
            out = _batch_first(site, output)
            ent = similarity_entropy(out[:, self.prefix:], self.grid, self.bandwidth, self.max_pairs)
            gap = math.log(self.grid) - ent.mean()
            if self.target == "recorded":
                gap = (gap - getattr(block, ENTROPY_BUFFER).reshape(())).abs()
            self._terms.append(gap)

        return hook

    def _attach(self) -> None:
        for i in self.indices:
            self._handles.append(self.sites[i].attn.register_forward_hook(self._hook(self.sites[i])))


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


def _site_hooks(blocks: Sequence[BlockSite], sites: Sequence[str], fn: Callable) -> list:
    """Hooks that call ``fn(block_index, site, tokens)`` (tokens batch-first) on every block's tokens at
    ``sites``; returns their handles (the caller removes them). ``mid`` only where the block is pre-norm."""
    handles = []
    for i, b in enumerate(blocks):
        if "in" in sites:
            handles.append(pre_hook(b.block, lambda t, i=i, b=b: fn(i, "in", _batch_first(b, t))))
        if "mid" in sites and b.norm_mid is not None:
            handles.append(pre_hook(b.norm_mid, lambda t, i=i, b=b: fn(i, "mid", _batch_first(b, t))))
        if "out" in sites and i == len(blocks) - 1:
            handles.append(b.block.register_forward_hook(
                lambda m, inp, out, i=i, b=b: fn(i, "out", _batch_first(b, out))))
    return handles


@contextmanager
def _capture_sites(blocks: Sequence[BlockSite], sites: Sequence[str], fn: Callable) -> Iterator[None]:
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
    layout = transformer_layout(model, "recording token statistics")
    blocks, prefix = layout.blocks, layout.prefix
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
    layout = transformer_layout(model, "attaching token statistics")
    blocks = [b.block for b in layout.blocks]
    for i, blk in enumerate(blocks):
        m, v = stats.get(f"block{i}.mean"), stats.get(f"block{i}.var")
        if m is None or v is None:
            raise DfkdError(f"token statistics lack block {i} (the teacher has {len(blocks)} blocks)")
        dim = layout.width
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


class TokenStatsPrior(TransformerPrior):
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
        self.where = sites
        self.position_var = bool(position_var) and all(
            getattr(b, _buffer(s, "pos_var"), None) is not None for b in self.blocks for s in sites
            if getattr(b, _buffer(s, "mean"), None) is not None)
        self.eps = float(eps)

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
        self._handles += _site_hooks(self.sites, self.where, lambda i, site, t: self._term(blocks[i], site, t))


class WeightedPriors(StatisticsPrior):
    """A weighted sum of other priors (``self.parts``: (weight, prior) pairs, filled by the subclass);
    attaching, removing, resetting and the loss go to every part."""

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


class ViTPrior(WeightedPriors):
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



# -- teacher-only priors: nothing but the teacher's weights ----------------------------------------
BOOT_COUNT = "dfkd_boot_count"


def _logits(output) -> Optional[torch.Tensor]:
    out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "logits", output)
    return out if isinstance(out, torch.Tensor) and out.dim() == 2 else None


class BootstrapTokenPrior(TransformerPrior):
    """Bootstrapped token statistics (no real image ever): the teacher's own token statistics on the
    synthetic images it is most confident about, refined as synthesis goes on, then matched like
    recorded ones.

    Every teacher forward inside the ``with`` block, the images whose top softmax probability is at least
    ``confidence`` add their per-block token mean (per position, channel) and variance (per channel)
    at each block's input, and the mean patch-similarity entropy gap of the block's attention output, to
    a running reference stored on the blocks (non-persistent buffers: it lasts as long as the teacher
    object, across synthesis batches). Each update moves the reference by
    ``max(n / (count + n), refresh)`` (an average over everything seen at first, then an exponential
    average that forgets the early, noisier images). Once ``min_count`` images have been seen, each block
    adds ``rms((μ − μ̂)/σ̂) + rms(log σ² − log σ̂²)`` and the entropy term becomes ``|gap − ĝap|``; before
    that, the entropy gap is maximised (PSAQ-ViT) so that the first confident images are diverse ones.
    ``entropy`` weighs the entropy part (0: statistics only)."""

    name = "vit_bootstrap"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return is_vit(model)

    def __init__(self, model: nn.Module, confidence: float = 0.8, min_count: int = 256, refresh: float = 0.05,
                 entropy: float = 1.0, eps: float = 1e-5, grid: int = ENTROPY_GRID, max_pairs: int = 4096):
        super().__init__(model)
        if not 0.0 < float(confidence) < 1.0:
            raise DfkdError(f"bootstrap confidence must be in (0, 1), got {confidence}")
        self.confidence, self.min_count, self.refresh = float(confidence), int(min_count), float(refresh)
        self.entropy, self.eps, self.grid, self.max_pairs = float(entropy), float(eps), int(grid), int(max_pairs)
        self._seen: dict[int, tuple[torch.Tensor, float]] = {}

    @staticmethod
    def reference_count(model: nn.Module) -> int:
        layout = find_transformer(model)
        buf = getattr(layout.blocks[0].block, BOOT_COUNT, None) if layout else None
        return int(buf.item()) if buf is not None else 0

    def _ready(self) -> bool:
        return self.reference_count(self.model) >= self.min_count

    def _in_hook(self, i: int, tokens: torch.Tensor) -> None:
        x = tokens[:, self.prefix:].float()
        blk = self.blocks[i]
        if self._ready():
            ref_mean, ref_var = getattr(blk, "dfkd_boot_mean"), getattr(blk, "dfkd_boot_var")
            mean = x.mean(dim=0)
            var = (x - mean).pow(2).mean(dim=(0, 1))
            d_mean = ((mean - ref_mean) / (ref_var + self.eps).sqrt()).pow(2).mean().add(1e-12).sqrt()
            d_var = (torch.log(var + self.eps) - torch.log(ref_var + self.eps)).pow(2).mean().add(1e-12).sqrt()
            self._terms.append(d_mean + d_var)
        self._seen.setdefault(i, [None, None])[0] = x.detach()

    def _attn_hook(self, i: int, out: torch.Tensor) -> None:
        ent = similarity_entropy(out[:, self.prefix:], self.grid, None, self.max_pairs)
        gap = math.log(self.grid) - ent  # (B,)
        if self.entropy > 0:
            ref = getattr(self.blocks[i], "dfkd_boot_gap", None)
            term = (gap.mean() - ref.reshape(())).abs() if (self._ready() and ref is not None) else gap.mean()
            self._terms.append(self.entropy * term)
        self._seen.setdefault(i, [None, None])[1] = gap.detach()

    def _out_hook(self, module, inputs, output) -> None:
        logits = _logits(output)
        seen, self._seen = self._seen, {}
        if logits is None:
            return
        with torch.no_grad():
            keep = logits.detach().float().softmax(1).amax(1) >= self.confidence
            n = int(keep.sum())
            if n < 2:
                return
            first = self.blocks[0]
            count = getattr(first, BOOT_COUNT, None)
            count = 0 if count is None else int(count.item())
            rate = max(n / (count + n), self.refresh)
            for i, (x, gap) in seen.items():
                if x is None or x.shape[0] != keep.shape[0]:
                    continue
                xs = x[keep]
                mean = xs.mean(0)
                var = (xs - mean).pow(2).mean(dim=(0, 1))
                new = {"dfkd_boot_mean": mean, "dfkd_boot_var": var}
                if gap is not None:
                    new["dfkd_boot_gap"] = gap[keep].mean().reshape(1)
                blk = self.blocks[i]
                for k, v in new.items():
                    old = getattr(blk, k, None)
                    blk.register_buffer(k, v if old is None or old.shape != v.shape else (1 - rate) * old + rate * v,
                                        persistent=False)
            first.register_buffer(BOOT_COUNT, torch.tensor(count + n), persistent=False)

    def _attach(self) -> None:
        self._handles += _site_hooks(self.sites, ("in",), lambda i, site, t: self._in_hook(i, t))
        for i, site in enumerate(self.sites):
            self._handles.append(site.attn.register_forward_hook(
                lambda m, inp, out, i=i, s=site: self._attn_hook(i, _batch_first(s, out))))
        self._handles.append(self.model.register_forward_hook(self._out_hook))

    def loss(self, reset: bool = True) -> torch.Tensor:
        if not self._terms:
            raise RuntimeError(f"{self.name} prior recorded nothing: run the teacher inside the 'with' block")
        return super().loss(reset)


def reset_bootstrap(model: nn.Module) -> None:
    """Forget the bootstrapped reference (e.g. before synthesising for another run)."""
    for b in vit_blocks(model):
        for k in ("dfkd_boot_mean", "dfkd_boot_var", "dfkd_boot_gap", BOOT_COUNT):
            if k in b._buffers:
                del b._buffers[k]


def _qk_weights(attn: nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor,
                                                   Optional[torch.Tensor], int]]:
    """(Wq, bq, Wk, bk, heads) of an attention module: nn.MultiheadAttention (packed in_proj), timm's
    Attention (packed qkv) or Hugging Face's ViTAttention (query / key Linears); None otherwise."""
    if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None:
        d = attn.embed_dim
        w, b = attn.in_proj_weight, attn.in_proj_bias
        return w[:d], None if b is None else b[:d], w[d:2 * d], None if b is None else b[d:2 * d], attn.num_heads
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear) and hasattr(attn, "num_heads"):
        d = qkv.in_features
        w, b = qkv.weight, qkv.bias
        return w[:d], None if b is None else b[:d], w[d:2 * d], None if b is None else b[d:2 * d], int(attn.num_heads)
    inner = getattr(attn, "attention", attn)  # Hugging Face: query / key (4.x) or q_proj / k_proj (5.x)
    q = getattr(inner, "query", None) or getattr(inner, "q_proj", None)
    k = getattr(inner, "key", None) or getattr(inner, "k_proj", None)
    heads = getattr(inner, "num_attention_heads", None) or getattr(inner, "num_heads", None)
    if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and heads:
        return q.weight, q.bias, k.weight, k.bias, int(heads)
    return None


def attention_maps(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-head attention probabilities (B, H, N, N) recomputed from the attention module's input tokens
    ``x`` (B, N, D) and its query / key weights (the module itself still runs its fused kernel)."""
    found = _qk_weights(attn)
    if found is None:
        raise DfkdError(f"cannot read query / key weights of {type(attn).__name__}")
    wq, bq, wk, bk, h = found
    b, n, d = x.shape
    q = F.linear(x, wq, bq).reshape(b, n, h, -1).transpose(1, 2)
    k = F.linear(x, wk, bk).reshape(b, n, h, -1).transpose(1, 2)
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if isinstance(qn, nn.Module) and isinstance(kn, nn.Module):
        q, k = qn(q), kn(k)
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


class HeadAgreementPrior(TransformerPrior):
    """Inter-head attention agreement (after MimiQ's observation that real images make a ViT's heads attend
    alike far more than synthetic ones do): per block, ``1 − mean cos(A_h, A_h')`` over pairs of heads of
    each image's attention maps (patch queries; maps recomputed from the attention's input, see
    :func:`attention_maps`)."""

    name = "vit_head_agreement"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return False  # never picked by prior=auto on its own

    def __init__(self, model: nn.Module, blocks: Optional[Sequence[int]] = None):
        super().__init__(model)
        for s in self.sites:
            if _qk_weights(s.attn) is None:
                raise DfkdError(f"the '{self.name}' prior cannot read the attention weights of {s.name}")
            if _qk_weights(s.attn)[4] < 2:
                raise DfkdError(f"the '{self.name}' prior needs at least two attention heads ({s.name} has one)")
        self.indices = list(range(len(self.sites))) if blocks is None else [int(i) % len(self.sites) for i in blocks]

    def _term(self, site: BlockSite, x: torch.Tensor) -> None:
        a = attention_maps(site.attn, x.float())[:, :, self.prefix:]  # (B, H, P, N)
        z = F.normalize(a.flatten(2), dim=-1)  # (B, H, P·N)
        sim = z @ z.transpose(1, 2)  # (B, H, H)
        h = sim.shape[1]
        off = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (h * (h - 1))
        self._terms.append(1.0 - off.mean())

    def _attach(self) -> None:
        for i in self.indices:
            s = self.sites[i]
            self._handles.append(pre_hook(s.attn, lambda t, s=s: self._term(s, _batch_first(s, t))))


class PatchContrastPrior(TransformerPrior):
    """Patch-level contrast (in the spirit of CLAMP-ViT's patch-level contrastive learning): at a block's
    output, each patch token should be more like its right / lower neighbour in the same image than like
    the token at that neighbour's position in the other images of the batch (InfoNCE, temperature
    ``temperature``). Real images are locally coherent and differ from one another; adversarial colour
    noise is neither. ``blocks`` default: the last one."""

    name = "vit_patch_contrast"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return False

    def __init__(self, model: nn.Module, temperature: float = 0.2, blocks: Optional[Sequence[int]] = (-1,)):
        super().__init__(model)
        self.tau = float(temperature)
        self.indices = [int(i) % len(self.sites) for i in (blocks if blocks is not None else range(len(self.sites)))]

    def _term(self, tokens: torch.Tensor) -> None:
        x = tokens[:, self.prefix:].float()
        b, p, d = x.shape
        g = math.isqrt(p)
        if g * g != p or b < 2:
            raise DfkdError(f"the '{self.name}' prior needs a square patch grid and at least two images "
                            f"(got {p} patch tokens, batch {b})")
        z = F.normalize(x, dim=-1).reshape(b, g, g, d)
        losses = []
        for a, c in ((z[:, :, :-1], z[:, :, 1:]), (z[:, :-1], z[:, 1:])):  # right, down neighbours
            a = a.reshape(b, -1, d).transpose(0, 1)  # (P', B, D)
            c = c.reshape(b, -1, d).transpose(0, 1)
            logits = a @ c.transpose(1, 2) / self.tau  # (P', B, B): image i's patch vs every image's neighbour
            target = torch.arange(b, device=x.device).expand(logits.shape[0], b)
            losses.append(F.cross_entropy(logits.reshape(-1, b), target.reshape(-1)))
        self._terms.append(torch.stack(losses).mean())

    def _attach(self) -> None:
        for i in self.indices:
            s = self.sites[i]
            self._handles.append(s.block.register_forward_hook(lambda m, inp, out, s=s: self._term(_batch_first(s, out))))


class TeacherOnlyPrior(WeightedPriors):
    """The teacher-only combination: ``entropy · vit_patch_entropy (maximised) + bootstrap · vit_bootstrap +
    heads · vit_head_agreement + contrast · vit_patch_contrast``, parts with weight 0 left out. Nothing
    recorded on real data is used. ``bootstrap_kwargs`` etc. go to the parts."""

    name = "vit_free"

    @staticmethod
    def fits(model: nn.Module) -> bool:
        return False

    def __init__(self, model: nn.Module, entropy: float = 0.0, bootstrap: float = 1.0, heads: float = 0.0,
                 contrast: float = 0.0, bootstrap_kwargs: Optional[dict] = None, heads_kwargs: Optional[dict] = None,
                 contrast_kwargs: Optional[dict] = None):
        super().__init__(model)
        transformer_layout(model, f"the '{self.name}' prior")
        self.parts: list[tuple[float, StatisticsPrior]] = []
        for w, cls, kw in ((entropy, PatchEntropyPrior, {"target": "max"}), (bootstrap, BootstrapTokenPrior, bootstrap_kwargs),
                           (heads, HeadAgreementPrior, heads_kwargs), (contrast, PatchContrastPrior, contrast_kwargs)):
            if float(w) > 0:
                self.parts.append((float(w), cls(model, **dict(kw or {}))))
        if not self.parts:
            raise DfkdError("the 'vit_free' prior has nothing to compute: every weight is 0")



PRIORS.register("vit_patch_entropy")(PatchEntropyPrior)
PRIORS.register("vit_token_stats")(TokenStatsPrior)
PRIORS.register("vit")(ViTPrior)
PRIORS.register("vit_bootstrap")(BootstrapTokenPrior)
PRIORS.register("vit_head_agreement")(HeadAgreementPrior)
PRIORS.register("vit_patch_contrast")(PatchContrastPrior)
PRIORS.register("vit_free")(TeacherOnlyPrior)


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
