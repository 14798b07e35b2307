"""dfkd: data-free knowledge distillation for vision models."""

__version__ = "0.1.0"

from dfkd.errors import DfkdError  # noqa: E402


def load_model(path, device: str = "cpu"):
    """A model dfkd saved (``x.safetensors`` + ``x.json``), ready to run on [0, 1] pixels."""
    from dfkd.load import load_model as _load

    return _load(path, device=device)


def load_student(run_dir, device: str = "cpu"):
    """The student of a ``dfkd-distill`` run folder."""
    from dfkd.load import load_student as _load

    return _load(run_dir, device=device)


__all__ = ["DfkdError", "__version__", "load_model", "load_student"]
