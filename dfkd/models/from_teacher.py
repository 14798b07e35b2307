"""Start a student from the teacher's weights: a shallower network of the teacher's family.

A ResNet-20 and a ResNet-56 for CIFAR have the same stem, the same three stages of the same widths and the
same classifier; the ResNet-56 has nine blocks per stage where the ResNet-20 has three. A ViT with fewer
blocks of the teacher's width is the same. :func:`init_from_teacher` copies every student tensor whose
counterpart in the teacher has the same name and shape, and where a block sequence (an ``nn.Sequential`` or
``nn.ModuleList``) is shorter in the student it takes evenly spaced teacher blocks, first and last
included (DistilBERT takes every other layer of its teacher the same way). Residual networks keep much of
their function when blocks are left out (Veit et al., 2016). A BatchNorm student's copied running statistics
belong to other blocks, so it may score near chance until training re-estimates them (the ResNet-20 cut from
the shared ResNet-56: 0.111 before any step), yet it trains far faster than from scratch. It needs the
teacher's weights only: no image, no statistic of one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError


def _inner(model: nn.Module) -> nn.Module:
    """The network inside dfkd's wrappers (``Normalized``, ``Teacher``: ``.model``) and DDP (``.module``)."""
    while True:
        nxt = getattr(model, "module", None) or getattr(model, "model", None)
        if not isinstance(nxt, nn.Module):
            return model
        model = nxt


def _spaced(n: int, m: int) -> list[int]:
    """``n`` of ``m`` indices, evenly spaced, the first and the last included."""
    if n == 1:
        return [0]
    return [round(i * (m - 1) / (n - 1)) for i in range(n)]


def block_map(student: nn.Module, teacher: nn.Module) -> dict[str, list[int]]:
    """For each block sequence of the student with a longer counterpart in the teacher (same path):
    the teacher blocks its blocks start from."""
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    out: dict[str, list[int]] = {}
    for path, sm in s_mods.items():
        if not isinstance(sm, (nn.Sequential, nn.ModuleList)) or not len(sm):
            continue
        # the teacher's path: indices inside mapped sequences above this one are translated first
        tpath = _translate(path, out)
        tm = t_mods.get(tpath)
        if isinstance(tm, (nn.Sequential, nn.ModuleList)) and len(tm) > len(sm):
            out[path] = _spaced(len(sm), len(tm))
    return out


def _translate(name: str, mapping: dict[str, list[int]]) -> str:
    parts = name.split(".") if name else []
    out: list[str] = []
    for i, p in enumerate(parts):
        prefix = ".".join(parts[:i])
        if prefix in mapping and p.isdigit() and int(p) < len(mapping[prefix]):
            p = str(mapping[prefix][int(p)])
        out.append(p)
    return ".".join(out)


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Copy the teacher's matching weights into ``student`` in place; returns what was copied.

    Raises :class:`DfkdError` when less than half of the student's parameters find a counterpart (the
    networks are not of one family: distil from scratch instead)."""
    s, t = _inner(student), _inner(teacher)
    mapping = block_map(s, t)
    t_state = t.state_dict()
    s_state = s.state_dict()
    copied, total, missing = 0, 0, []
    params = {n for n, _ in s.named_parameters()}
    for name, value in s_state.items():
        if name in params:
            total += value.numel()
        src = t_state.get(_translate(name, mapping))
        if src is not None and src.shape == value.shape and src.dtype == value.dtype:
            value.copy_(src)
            if name in params:
                copied += value.numel()
        elif name in params:
            missing.append(name)
    if total == 0 or copied < 0.5 * total:
        raise DfkdError(f"student.init=teacher: only {copied:,} of the student's {total:,} parameters have a "
                        f"counterpart of the same name and shape in the teacher ({type(t).__name__}); it needs a "
                        f"shallower network of the teacher's family (e.g. resnet20_cifar from resnet56_cifar), "
                        f"or student.init=scratch")
    return {"copied_parameters": copied, "student_parameters": total, "not_copied": missing,
            "blocks": {k: v for k, v in mapping.items()}}


def describe(report: dict[str, Any]) -> str:
    """One line for the log."""
    blocks = "; ".join(f"{k or 'blocks'}: teacher blocks {','.join(map(str, v))}" for k, v in report["blocks"].items())
    return (f"student started from the teacher: {report['copied_parameters']:,} of "
            f"{report['student_parameters']:,} parameters copied" + (f" ({blocks})" if blocks else ""))
