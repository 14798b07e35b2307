"""Convert a ViT built on ``nn.MultiheadAttention`` into timm's ``VisionTransformer`` layout.

Most ViTs people train themselves are a patch ``Conv2d``, a class token, a learned position
embedding, pre-norm blocks ``x + MHA(LN1(x))`` / ``x + MLP(LN2(x))`` with a packed ``in_proj``
(q, k, v in that order, as timm's ``qkv``), and a head ``Linear(LN(cls))``. That is exactly a timm
``VisionTransformer`` with ``global_pool="token"``: its final norm on all tokens followed by the class
token equals a norm on the class token. :func:`convert_mha_vit` renames the keys and infers the timm
keyword arguments from the tensors' shapes.

What the weights cannot tell, and so is an argument:

* ``num_heads``: any divisor of the width fits the same tensors, and a wrong guess gives a different
  function. It is required; nothing is guessed.
* the activation (``act_layer``, default ``"gelu"``, exact; ``nn.TransformerEncoderLayer`` defaults to
  ``"relu"``) and the LayerNorm ``eps`` (default 1e-5, PyTorch's). timm's ViT uses eps 1e-6 and takes
  no eps keyword, so the eps goes into the build JSON as ``norm_eps`` and :func:`apply_norm_eps` sets it
  on a built model (:func:`build_converted` does both).
* the norm placement: only pre-norm blocks map onto timm's ``Block``; ``norm_first=False`` (post-norm,
  ``nn.TransformerEncoderLayer``'s default) is refused with a clear error.

Key names accepted (each block ``<blocks>.<i>.`` where ``<blocks>`` is any prefix, ``<i>`` an index
optionally written ``encoder_layer_<i>``):

* attention: ``attention`` / ``attn`` / ``self_attn`` / ``self_attention`` / ``mha`` / ``msa``, holding
  ``in_proj_weight``, optional ``in_proj_bias``, ``out_proj.weight`` and optional ``out_proj.bias``;
* norms: ``norm1``/``norm2``, ``ln_1``/``ln_2``, ``ln1``/``ln2``, ``layer_norm1``/``layer_norm2``,
  ``layernorm1``/``layernorm2``, ``attn_norm``/``mlp_norm``;
* MLP: the two ``Linear``s under ``mlp.`` / ``ffn.`` / ``feed_forward.`` (any names or indices, in index
  order: ``mlp.0``/``mlp.2``, ``mlp.fc1``/``mlp.fc2``, ``mlp.linear_1``/``mlp.linear_2``) or
  ``linear1``/``linear2`` (``nn.TransformerEncoderLayer``);
* outside the blocks: the only 4-D tensor is the patch convolution; the class token ends in
  ``cls_token`` / ``class_token`` / ``cls``; the position embedding in ``pos_embed`` / ``pos_embedding`` /
  ``position_embedding(s)``; what remains must be one norm (weight, bias of the width) and one Linear
  (the head), e.g. ``out_head.0`` + ``out_head.1``, ``mlp_head.0`` + ``mlp_head.1``, ``norm`` + ``head``.

Command line::

    python -m dfkd.models.convert vit_model.pth teacher.safetensors --num-heads 4 --mean 0 0 0 --std 1 1 1

writes the timm-layout weights and ``teacher.json`` (model, kwargs, mean, std, input_size, num_classes,
interpolation, crop_pct, norm_eps) beside them.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from dfkd.errors import DfkdError

TIMM_NAME = "vit_tiny_patch16_224"  # the timm entry point; every architecture keyword is overridden

_ATTN = ("attention", "attn", "self_attn", "self_attention", "mha", "msa")
_NORMS = (("norm1", "norm2"), ("ln_1", "ln_2"), ("ln1", "ln2"), ("layer_norm1", "layer_norm2"),
          ("layernorm1", "layernorm2"), ("attn_norm", "mlp_norm"))
_MLP = ("mlp", "ffn", "feed_forward")
_CLS = ("cls_token", "class_token", "cls")
_POS = ("pos_embed", "pos_embedding", "position_embedding", "position_embeddings")
_BLOCK_RE = re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?:encoder_layer_)?(?P<i>\d+)\.(?P<attn>"
                       + "|".join(_ATTN) + r")\.in_proj_weight$")


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _one(state: Mapping[str, Tensor], names: Sequence[str], what: str, rest: set[str]) -> str:
    hits = [k for k in rest if k.split(".")[-1] in names or k in names]
    if len(hits) != 1:
        found = "none" if not hits else ", ".join(sorted(hits))
        raise DfkdError(f"not an nn.MultiheadAttention ViT: expected one {what} key ending in "
                        f"{'/'.join(names)}, found {found}")
    return hits[0]


def convert_mha_vit(state: Mapping[str, Tensor], num_heads: Optional[int] = None, act_layer: str = "gelu",
                    norm_eps: float = 1e-5, norm_first: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(timm_kwargs, timm_state_dict)`` for a class-token ViT built on ``nn.MultiheadAttention``.

    ``timm_kwargs`` (img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
    proj_bias, class_token, global_pool, no_embed_class, final_norm, num_classes, act_layer) build the
    same function with ``timm.create_model("vit_tiny_patch16_224", **kwargs)`` once every LayerNorm's eps
    is set to ``norm_eps`` (:func:`apply_norm_eps`). A layout that does not match raises :class:`DfkdError`
    with one line naming what does not fit. See the module docstring for the accepted key names.
    """
    if not norm_first:
        raise DfkdError("a post-norm transformer (norm_first=False) cannot be converted: timm's "
                        "VisionTransformer blocks are pre-norm")
    if num_heads is None:
        raise DfkdError("the number of attention heads cannot be read from the weights (every divisor of the "
                        "width fits them): give num_heads (--num-heads)")
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    rest = set(state)
    # -- blocks -------------------------------------------------------------------------------------
    found: dict[str, dict[int, str]] = defaultdict(dict)
    for k in state:
        m = _BLOCK_RE.match(k)
        if m:
            found[m.group("prefix")][int(m.group("i"))] = k[: -len("in_proj_weight")]  # '...attention.'
    if not found:
        raise DfkdError("not an nn.MultiheadAttention ViT: no '<blocks>.<i>.<attention>.in_proj_weight' key "
                        f"(attention named {'/'.join(_ATTN)})")
    if len(found) > 1:
        raise DfkdError(f"not a single ViT: attention blocks under several prefixes ({', '.join(sorted(found))})")
    attn_prefix = next(iter(found.values()))
    depth = len(attn_prefix)
    if sorted(attn_prefix) != list(range(depth)):
        raise DfkdError(f"block indices are not 0..{depth - 1}: {sorted(attn_prefix)}")
    out: dict[str, Tensor] = {}
    dim = None
    hidden = None
    qkv_bias = proj_bias = True
    for i in range(depth):
        a = attn_prefix[i]
        blk = a[: a.rstrip(".").rfind(".") + 1]  # '...transformer_layers.0.'
        mine = {k for k in rest if k.startswith(blk)}
        w = state[a + "in_proj_weight"]
        if w.dim() != 2 or w.shape[0] != 3 * w.shape[1]:
            raise DfkdError(f"{a}in_proj_weight has shape {tuple(w.shape)}, not (3·D, D): separate q/k/v "
                            "projections (kdim/vdim) are not supported")
        if dim is None:
            dim = w.shape[1]
        elif w.shape[1] != dim:
            raise DfkdError(f"block {i} has width {w.shape[1]}, block 0 has {dim}")
        t = f"blocks.{i}."
        out[t + "attn.qkv.weight"] = w
        if i == 0:
            qkv_bias, proj_bias = a + "in_proj_bias" in state, a + "out_proj.bias" in state
        for name, dst, flag in (("in_proj_bias", "attn.qkv.bias", qkv_bias), ("out_proj.bias", "attn.proj.bias", proj_bias)):
            if (a + name in state) != flag:
                raise DfkdError(f"{a}{name} is {'absent' if flag else 'present'} in block {i}, "
                                f"{'present' if flag else 'absent'} in block 0")
            if flag:
                out[t + dst] = state[a + name]
        if a + "out_proj.weight" not in state:
            raise DfkdError(f"block {i}: no {a}out_proj.weight")
        out[t + "attn.proj.weight"] = state[a + "out_proj.weight"]
        used = {a + n for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")}
        # norms
        for n1, n2 in _NORMS:
            if blk + n1 + ".weight" in state and blk + n2 + ".weight" in state:
                for src, dst in ((n1, "norm1"), (n2, "norm2")):
                    for p in ("weight", "bias"):
                        if blk + f"{src}.{p}" not in state:
                            raise DfkdError(f"block {i}: no {blk}{src}.{p}")
                        out[t + f"{dst}.{p}"] = state[blk + f"{src}.{p}"]
                        used.add(blk + f"{src}.{p}")
                break
        else:
            raise DfkdError(f"block {i}: no pair of LayerNorms named "
                            f"{' / '.join(a + '+' + b for a, b in _NORMS)} under {blk}")
        # MLP: the two Linear layers, in index order
        lin = [k[: -len(".weight")] for k in mine - used
               if k.endswith(".weight") and state[k].dim() == 2
               and (any(k.startswith(blk + m + ".") for m in _MLP) or k in (blk + "linear1.weight", blk + "linear2.weight"))]
        lin.sort(key=_natural)
        if len(lin) != 2:
            raise DfkdError(f"block {i}: expected two MLP Linear layers under {blk}{{{','.join(_MLP)}}}. or "
                            f"linear1/linear2, found {len(lin)}")
        for src, dst in zip(lin, ("mlp.fc1", "mlp.fc2")):
            out[t + f"{dst}.weight"] = state[src + ".weight"]
            used.add(src + ".weight")
            if src + ".bias" not in state:
                raise DfkdError(f"block {i}: MLP layer {src} has no bias (timm's Mlp has one)")
            out[t + f"{dst}.bias"] = state[src + ".bias"]
            used.add(src + ".bias")
        fc1, fc2 = out[t + "mlp.fc1.weight"], out[t + "mlp.fc2.weight"]
        if fc1.shape[1] != dim or fc2.shape != (dim, fc1.shape[0]):
            raise DfkdError(f"block {i}: MLP shapes {tuple(fc1.shape)} and {tuple(fc2.shape)} do not fit width {dim}")
        if hidden is None:
            hidden = fc1.shape[0]
        elif fc1.shape[0] != hidden:
            raise DfkdError(f"block {i}: MLP hidden width {fc1.shape[0]}, block 0 has {hidden}")
        left = mine - used
        if left:
            raise DfkdError(f"block {i}: unrecognised key(s) {', '.join(sorted(left))}")
        rest -= used
    if dim % int(num_heads) != 0:
        raise DfkdError(f"num_heads={num_heads} does not divide the width {dim}")
    # -- embeddings -------------------------------------------------------------------------------
    conv = [k for k in rest if state[k].dim() == 4]
    if len(conv) != 1:
        raise DfkdError(f"not an nn.MultiheadAttention ViT: expected one 4-D patch-convolution weight, found "
                        f"{len(conv)}{' (' + ', '.join(sorted(conv)) + ')' if conv else ''}")
    cw = state[conv[0]]
    if cw.shape[0] != dim or cw.shape[2] != cw.shape[3]:
        raise DfkdError(f"patch convolution {conv[0]} has shape {tuple(cw.shape)}: expected ({dim}, C, p, p)")
    patch, in_chans = int(cw.shape[2]), int(cw.shape[1])
    out["patch_embed.proj.weight"] = cw
    rest.discard(conv[0])
    cb = conv[0][: -len("weight")] + "bias"
    if cb not in state:
        raise DfkdError(f"patch convolution {conv[0]} has no bias (timm's PatchEmbed has one)")
    out["patch_embed.proj.bias"] = state[cb]
    rest.discard(cb)
    cls_key = _one(state, _CLS, "class-token", rest)
    cls = state[cls_key].reshape(-1)
    if cls.numel() != dim:
        raise DfkdError(f"class token {cls_key} has {cls.numel()} values, not the width {dim} "
                        "(only one class token is supported)")
    out["cls_token"] = cls.reshape(1, 1, dim)
    rest.discard(cls_key)
    pos_key = _one(state, _POS, "position-embedding", rest)
    pos = state[pos_key].reshape(-1, dim) if state[pos_key].shape[-1] == dim else None
    if pos is None:
        raise DfkdError(f"position embedding {pos_key} has shape {tuple(state[pos_key].shape)}: last size is not {dim}")
    rest.discard(pos_key)
    n = pos.shape[0]
    if math.isqrt(n - 1) ** 2 == n - 1:
        no_embed_class, grid = False, math.isqrt(n - 1)
    elif math.isqrt(n) ** 2 == n:
        no_embed_class, grid = True, math.isqrt(n)
    else:
        raise DfkdError(f"position embedding {pos_key} has {n} positions: neither a square grid nor a square "
                        "grid plus the class token")
    out["pos_embed"] = pos.reshape(1, n, dim)
    # -- head: one norm and one Linear remain ------------------------------------------------------
    mods: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for k in rest:
        mod, _, p = k.rpartition(".")
        mods[mod][p] = state[k]
    norms = [m for m, p in mods.items() if set(p) == {"weight", "bias"} and p["weight"].dim() == 1
             and p["weight"].shape[0] == dim]
    heads = [m for m, p in mods.items() if "weight" in p and p["weight"].dim() == 2 and p["weight"].shape[1] == dim]
    other = set(mods) - set(norms) - set(heads)
    if len(heads) != 1 or len(norms) > 1 or other:
        raise DfkdError(f"not a class-token ViT head: expected one LayerNorm and one Linear({dim}→K) outside the "
                        f"blocks, found norms {sorted(norms) or 'none'}, Linears {sorted(heads) or 'none'}"
                        f"{', other ' + ', '.join(sorted(other)) if other else ''}")
    head = mods[heads[0]]
    num_classes = int(head["weight"].shape[0])
    out["head.weight"] = head["weight"]
    out["head.bias"] = head["bias"] if "bias" in head else torch.zeros(num_classes, dtype=head["weight"].dtype)
    if norms:
        out["norm.weight"], out["norm.bias"] = mods[norms[0]]["weight"], mods[norms[0]]["bias"]
    kwargs = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
                  embed_dim=int(dim), depth=depth, num_heads=int(num_heads),
                  mlp_ratio=float(hidden) / float(dim), qkv_bias=qkv_bias, proj_bias=proj_bias,
                  class_token=True, global_pool="token", no_embed_class=no_embed_class,
                  final_norm=bool(norms), act_layer=str(act_layer))
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    return kwargs, out


def apply_norm_eps(model: nn.Module, eps: float) -> nn.Module:
    """Set ``eps`` on every LayerNorm of ``model`` (timm's ViT builds them with 1e-6 and no keyword)."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = float(eps)
    return model


def build_converted(kwargs: Mapping[str, Any], state: Mapping[str, Tensor] | None = None,
                    norm_eps: float = 1e-5) -> nn.Module:
    """The timm ViT for ``kwargs`` (from :func:`convert_mha_vit`), with ``state`` loaded strictly."""
    import timm

    try:
        model = timm.create_model(TIMM_NAME, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise DfkdError(f"cannot build a timm ViT from {dict(kwargs)}: {e}") from None
    apply_norm_eps(model, norm_eps)
    if state is not None:
        missing, unexpected = model.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise DfkdError(f"converted weights do not fit the timm ViT: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# -- a reference nn.MultiheadAttention ViT (the layout most self-trained ViTs use) -------------------
class _PatchEmbedding(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x).flatten(2).transpose(1, 2)


class MHABlock(nn.Module):
    """``x + MHA(LN1(x))``, ``x + MLP(LN2(x))`` (pre-norm) or the post-norm order; tokens (B, N, D)
    when ``batch_first`` else (N, B, D)."""

    def __init__(self, dim: int, heads: int, hidden: int, norm_first: bool = True, batch_first: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.norm_first, self.batch_first = norm_first, batch_first
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def _attn(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self._attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self._attn(x))
        return self.norm2(x + self.mlp(x))


class MHAViT(nn.Module):
    """A class-token ViT on ``nn.MultiheadAttention``: the key layout of a common self-trained ViT
    (``cls_token``, ``pos_embed``, ``patch_embedding.embed``, ``transformer_layers.{i}.{norm1,attention,
    norm2,mlp.0,mlp.2}``, ``out_head.{0,1}``). Used as the reference in tests and for discovery."""

    def __init__(self, img_size: int = 32, patch: int = 4, in_chans: int = 3, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10, norm_first: bool = True,
                 batch_first: bool = True, eps: float = 1e-5):
        super().__init__()
        self.batch_first = batch_first
        self.patch_embedding = _PatchEmbedding(in_chans, dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.transformer_layers = nn.ModuleList(
            MHABlock(dim, heads, int(dim * mlp_ratio), norm_first, batch_first, eps) for _ in range(depth))
        self.out_head = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch_embedding(x)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        if not self.batch_first:
            t = t.transpose(0, 1)
        for blk in self.transformer_layers:
            t = blk(t)
        cls = t[:, 0] if self.batch_first else t[0]
        return self.out_head(cls)


class EncoderViT(nn.Module):
    """A class-token ViT on ``nn.TransformerEncoder`` (pre- or post-norm, ``batch_first`` either way):
    keys ``cls_token``, ``pos_embedding``, ``conv_proj``, ``encoder.layers.{i}.{self_attn,linear1,linear2,
    norm1,norm2}``, ``norm``, ``head``. Used as a reference in tests and for discovery."""

    def __init__(self, img_size: int = 8, patch: int = 2, in_chans: int = 3, dim: int = 16, depth: int = 2,
                 heads: int = 2, mlp_ratio: float = 2.0, num_classes: int = 4, norm_first: bool = True,
                 batch_first: bool = True, activation: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.batch_first = batch_first
        self.conv_proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation=activation,
                                           layer_norm_eps=eps, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.conv_proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embedding
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        cls = t[:, 0] if self.batch_first else t[0]
        return self.head(self.norm(cls))


# -- command line ----------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dfkd.models.convert",
        description="Convert an nn.MultiheadAttention ViT checkpoint to timm's VisionTransformer layout "
                    "(safetensors + a JSON of how to build it and its input normalisation).")
    ap.add_argument("input", help="state dict (.pth/.pt/.safetensors)")
    ap.add_argument("output", help="OUT.safetensors (OUT.json is written beside it)")
    ap.add_argument("--num-heads", type=int, required=True, help="attention heads (not readable from weights)")
    ap.add_argument("--mean", type=float, nargs="+", required=True, help="input normalisation mean per channel")
    ap.add_argument("--std", type=float, nargs="+", required=True, help="input normalisation std per channel")
    ap.add_argument("--act", default="gelu", help="MLP activation (timm name: gelu, relu, gelu_tanh, ...)")
    ap.add_argument("--norm-eps", type=float, default=1e-5, help="LayerNorm eps of the original model")
    ap.add_argument("--class-names", nargs="+", default=None)
    ap.add_argument("--interpolation", default="bilinear")
    args = ap.parse_args(argv)
    from dfkd.models.checkpoint import read_state_dict, save_model

    try:
        out = Path(args.output)
        if out.suffix != ".safetensors":
            raise DfkdError(f"output must end in .safetensors, got {out.name}")
        kwargs, state = convert_mha_vit(read_state_dict(args.input), num_heads=args.num_heads,
                                        act_layer=args.act, norm_eps=args.norm_eps)
        c = kwargs["in_chans"]
        for name, v in (("mean", args.mean), ("std", args.std)):
            if len(v) != c:
                raise DfkdError(f"--{name} has {len(v)} values; the model takes {c} channels")
        if any(s <= 0 for s in args.std):
            raise DfkdError("--std values must be positive")
        if args.class_names is not None and len(args.class_names) != kwargs["num_classes"]:
            raise DfkdError(f"--class-names has {len(args.class_names)} names; the head has "
                            f"{kwargs['num_classes']} classes")
        model = build_converted(kwargs, state, args.norm_eps)
        size = kwargs["img_size"]
        build = {"model": TIMM_NAME, "kwargs": kwargs, "mean": list(args.mean), "std": list(args.std),
                 "input_size": [c, size, size], "num_classes": kwargs["num_classes"],
                 "interpolation": args.interpolation, "crop_pct": 1.0, "norm_eps": args.norm_eps}
        if args.class_names is not None:
            build["class_names"] = list(args.class_names)
        save_model(model, out, build=build)
    except DfkdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    print(f"converted: depth {kwargs['depth']}, width {kwargs['embed_dim']}, {kwargs['num_heads']} heads, "
          f"patch {kwargs['patch_size']}, image {size}, {kwargs['num_classes']} classes, {n:,} parameters "
          f"-> {out} (+ {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
