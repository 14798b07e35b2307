"""Load what dfkd saves, with one call: ``save_model`` writes ``x.safetensors`` + ``x.json``;
``load_model("x.safetensors")`` builds the network from the JSON, loads the weights and returns a model
that takes [0, 1] pixels and normalises itself, with its spec (input size, classes, resize rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dfkd.errors import DfkdError


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """``x.safetensors`` (or any checkpoint) with dfkd's ``x.json`` beside it → a
    :class:`dfkd.teacher.Normalized` model in eval mode; ``.spec`` is its :class:`dfkd.spec.TeacherSpec`."""
    from dfkd.models import build_model
    from dfkd.spec import json_beside, resolve_spec
    from dfkd.teacher import Normalized

    path = Path(path).expanduser()
    if path.is_dir():
        return load_student(path, device=device)
    if not path.is_file():
        raise DfkdError(f"model file not found: {path}")
    build: dict[str, Any] = json_beside(path)
    if not build.get("model"):
        raise DfkdError(f"{path.with_suffix('.json')} is missing or names no model: load_model needs the JSON dfkd "
                        "writes beside a model (or build the model yourself and use load_checkpoint_into)")
    model = build_model(build["model"], checkpoint=path, source=str(build.get("source") or "auto"),
                        **(build.get("kwargs") or {}))
    if build.get("norm_eps") is not None:
        from dfkd.models.convert import apply_norm_eps

        apply_norm_eps(model, build["norm_eps"])
    spec = resolve_spec([("model JSON", build)])
    net = Normalized(model, spec.mean, spec.std, spec.input_size, spec.num_classes)
    net.spec = spec
    return net.to(device).eval()


def load_student(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """The student a ``dfkd-distill`` run folder holds (``student.safetensors`` + ``student.json``)."""
    run_dir = Path(run_dir).expanduser()
    f = run_dir / "student.safetensors"
    if not f.is_file():
        raise DfkdError(f"no student.safetensors in {run_dir}: not a finished dfkd-distill run folder")
    return load_model(f, device=device)
