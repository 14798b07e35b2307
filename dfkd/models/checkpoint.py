"""Reading checkpoints of every common layout, and writing the project's own (safetensors + JSON)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from dfkd.errors import DfkdError

# nestings of a state dict inside a checkpoint, in order of preference: an EMA of the weights first (timm's
# training script writes ``state_dict_ema`` beside ``state_dict``: the EMA is what it evaluates best)
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict", "module", "net",
                "student", "teacher", "weights", "params")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# prefixes of training frameworks' wrappers (Lightning's ``self.model``, ...), stripped only when that makes
# the keys fit the model
_FRAMEWORK_PREFIXES = ("model.", "net.", "network.", "teacher.", "student.", "backbone.", "encoder.", "module.")


class Checkpoint(dict):
    """A state dict of tensors, with where it came from (``source``: the nesting used) and the plain values
    the file held beside it (``meta``: e.g. a timm checkpoint's ``args`` as a dict, ``arch``, ``epoch``)."""

    source: str = ""
    meta: dict


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint, or an older torch
        return []


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, also for files that hold an ``argparse.Namespace`` (timm's training
    checkpoints: ``args``). Nothing a checkpoint names is ever executed."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            names = [n for n in _unsafe_globals(path) if n != "argparse.Namespace"]
            if names:
                raise DfkdError(f"cannot read checkpoint {path} safely: it is a pickle that names code "
                                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); save its state_dict() "
                                "(or a safetensors file) instead") from None
            msg = str(e).strip()
            if "Weights only load failed" in msg or "Unsupported global" in msg or "invalid load key" in msg \
                    or "could not find MARK" in msg or "pickle" in msg.lower() or "zip" in msg.lower():
                raise DfkdError(f"cannot read checkpoint {path}: not a torch checkpoint of tensors "
                                "(a state dict, a timm or Lightning checkpoint, or safetensors)") from None
            first = msg.splitlines()[0] if msg else type(e).__name__
            raise DfkdError(f"cannot read checkpoint {path}: {first[:200]}") from None


def _plain_meta(state: Mapping[str, Any]) -> dict:
    import argparse

    meta: dict = {}
    for k, v in state.items():
        if isinstance(v, argparse.Namespace):
            meta[k] = dict(vars(v))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            meta[k] = v
        elif isinstance(v, Mapping) and k in ("hyper_parameters", "hparams", "args", "config", "cfg"):
            meta[k] = {kk: vv for kk, vv in v.items() if isinstance(vv, (str, int, float, bool, list, tuple))}
    return meta


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Accepts a plain state dict, timm training checkpoints (``state_dict_ema`` preferred over ``state_dict``),
    Lightning ``.ckpt`` files, ``{'state_dict': ...}`` and similar nestings, and strips ``module.`` /
    ``_orig_mod.`` prefixes left by DataParallel/DDP and ``torch.compile``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DfkdError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = _torch_load(path)
    except DfkdError:
        raise
    except Exception as e:  # corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DfkdError(f"cannot read checkpoint {path}: {first[:200]}") from None
    source, meta = "", {}
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        meta = _plain_meta(state)
        for key in _NESTED_KEYS:
            if key in state and isinstance(state[key], Mapping) and state[key] \
                    and all(isinstance(v, torch.Tensor) for v in state[key].values()):
                state, source = state[key], key
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DfkdError(f"checkpoint {path} does not hold a state dict of tensors")
    out = Checkpoint()
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    out.source, out.meta = source, meta
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` without the metadata."""
    return dict(read_checkpoint(path))


def _fit_prefix(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    """The state as it is, or with a framework prefix stripped (and keys outside it dropped) when that
    makes every model key present — e.g. a Lightning checkpoint of a module kept as ``self.model``."""
    own_keys = {k for k in own if not k.endswith("num_batches_tracked")}
    if own_keys <= set(state):
        return dict(state), ""
    for prefix in _FRAMEWORK_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and own_keys <= set(sub):
            return sub, prefix
    return dict(state), ""


def load_checkpoint_into(model: nn.Module, path: str | Path) -> Checkpoint:
    """Load ``path`` into ``model`` strictly; a mismatch is a one-line :class:`DfkdError`.

    Returns the checkpoint read (its ``source`` and ``meta`` say which weights were used)."""
    ckpt = read_checkpoint(path)
    own = model.state_dict()
    state, prefix = _fit_prefix(ckpt, own)
    # old checkpoints predate BatchNorm's num_batches_tracked counter: keep the model's own
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} "
                f"vs model {tuple(own[k].shape)}"
            )
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise DfkdError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    if prefix:
        ckpt.source = f"{ckpt.source or 'state dict'} (prefix {prefix!r} stripped)"
    return ckpt


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_model(model: nn.Module, path: str | Path, build: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` as safetensors (atomically) and, beside it, a JSON of how to build it."""
    from safetensors.torch import save

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))
    if build is not None:
        atomic_write_json(path.with_suffix(".json"), dict(build))
