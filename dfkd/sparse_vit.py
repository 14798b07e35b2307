"""Sparse model inversion for ViT teachers (after SMI, Hu et al., ICML 2024): as inversion goes on, the
patches the teacher attends to least are dropped from its input tokens, so later iterations run the
transformer on fewer tokens (faster), and the dropped (background) patches stop changing.

How it works here, for timm ``VisionTransformer`` teachers (the layout ``dfkd.models.convert`` produces):

- a per-image keep mask lives in pixel space, one value per patch (1 kept, 0 dropped). It is augmented
  together with the image (it rides along as an extra channel through jitter, flip and random resized
  crop), so the tokens kept in an augmented view are the ones that cover kept pixels;
- at the drop iterations the teacher scores the kept patches of the un-augmented images by the attention
  they receive (from the class token where there is one, else from all tokens; the last block, heads
  averaged, recomputed from the block's input and query / key weights) and the lowest are dropped, so the
  kept fraction falls geometrically to ``keep`` at the last drop;
- the teacher's ``patch_drop`` module (identity in eval) is swapped for one that gathers the kept tokens
  of each image (prefix tokens always kept) while the teacher runs on the view.

Priors that compare tokens position by position (bootstrapped / recorded token statistics, patch
contrast on the grid) do not fit a varying set of tokens; PSAQ's patch-similarity entropy and the
head-agreement prior do.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError

#: priors that work on any subset of tokens
SPARSE_PRIORS = ("vit_patch_entropy", "vit_head_agreement")


class _Gather(nn.Module):
    """Keeps the prefix tokens and, per image, the patch tokens at ``idx`` (B, K)."""

    def __init__(self, idx: torch.Tensor, prefix: int):
        super().__init__()
        self.idx, self.prefix = idx, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, patches = x[:, : self.prefix], x[:, self.prefix:]
        idx = self.idx.to(x.device)
        kept = patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([pre, kept], dim=1)


def _vit_parts(model: nn.Module) -> Optional[nn.Module]:
    """The timm VisionTransformer inside ``model`` (or None)."""
    for m in model.modules():
        if all(hasattr(m, a) for a in ("patch_embed", "patch_drop", "blocks", "num_prefix_tokens")):
            return m
    return None


class SparseInversion:
    """Patch dropping for :class:`generators.inversion.DeepInversion` (see the module doc).

    ``keep``: fraction of patch tokens kept after the last drop; ``at``: fractions of the iterations at
    which to drop (the kept fraction falls geometrically); ``iterations``: the inversion's iterations."""

    def __init__(self, model: nn.Module, keep: float, at: Sequence[float], iterations: int, prior: Optional[str]):
        self.vit = _vit_parts(model)
        if self.vit is None:
            raise DfkdError(f"sparse inversion needs a timm VisionTransformer teacher; {type(model).__name__} is not "
                            "one (convert it with dfkd.models.convert, or set sparse_keep=1)")
        if not 0.0 < float(keep) <= 1.0:
            raise DfkdError(f"sparse_keep must be in (0, 1], got {keep!r}")
        name = None if prior is None else str(prior).split("(")[0].strip()
        if name is not None and name not in SPARSE_PRIORS:
            raise DfkdError(f"sparse inversion works with the priors {', '.join(SPARSE_PRIORS)} (or bn=0), not "
                            f"{prior!r}: it compares tokens position by position")
        ps = self.vit.patch_embed.patch_size
        self.patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.prefix = int(self.vit.num_prefix_tokens)
        self.has_cls = bool(getattr(self.vit, "cls_token", None) is not None)
        steps = sorted({min(max(int(round(float(a) * iterations)), 1), max(iterations - 1, 1)) for a in at})
        self.drops = {it: float(keep) ** ((j + 1) / len(steps)) for j, it in enumerate(steps)} if keep < 1 else {}

    def new_mask(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(images.shape[0], 1, *images.shape[-2:], device=images.device, dtype=images.dtype)

    def grid(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch coverage (B, P) of a pixel-space mask."""
        return F.avg_pool2d(mask, self.patch).flatten(1)

    @torch.no_grad()
    def scores(self, teacher, images: torch.Tensor) -> torch.Tensor:
        """(B, P) attention each patch receives in the teacher's last block on full images."""
        from dfkd.priors_vit import attention_maps, capture_blocks

        with capture_blocks(self.vit, [-1], what="input") as got:
            teacher(images)
        last = self.vit.blocks[-1]
        x = last.norm1(got[len(self.vit.blocks) - 1]) if hasattr(last, "norm1") else got[len(self.vit.blocks) - 1]
        a = attention_maps(last.attn, x.float()).mean(1)  # (B, N, N)
        a = a[:, 0, self.prefix:] if self.has_cls else a[:, :, self.prefix:].mean(1)
        return a

    @torch.no_grad()
    def drop(self, teacher, images: torch.Tensor, mask: torch.Tensor, it: int) -> torch.Tensor:
        """The mask after the drop scheduled at iteration ``it`` (unchanged when none is)."""
        if it not in self.drops:
            return mask
        cover = self.grid(mask)  # (B, P) in {0, 1}
        p = cover.shape[1]
        k = max(1, int(round(self.drops[it] * p)))
        s = self.scores(teacher, images).masked_fill(cover < 0.5, float("-inf"))
        keep = torch.zeros_like(cover)
        keep.scatter_(1, s.topk(k, dim=1).indices, 1.0)
        g = images.shape[-1] // self.patch
        return keep.reshape(-1, 1, images.shape[-2] // self.patch, g).repeat_interleave(
            self.patch, 2).repeat_interleave(self.patch, 3)

    def kept(self, mask: torch.Tensor) -> int:
        return max(1, int(round(float(self.grid(mask[:1]).sum()))))

    @contextmanager
    def tokens(self, view_mask: torch.Tensor, k: int) -> Iterator[None]:
        """While inside, the teacher sees only the ``k`` patch tokens of each image that an (augmented)
        mask covers most."""
        idx = self.grid(view_mask.detach()).topk(k, dim=1).indices.sort(dim=1).values
        old = self.vit.patch_drop
        self.vit.patch_drop = _Gather(idx, self.prefix)
        try:
            yield
        finally:
            self.vit.patch_drop = old
