"""dfkd: data-free knowledge distillation for vision models."""

__version__ = "0.1.0"

from dfkd.errors import DfkdError  # noqa: E402

__all__ = ["DfkdError", "__version__"]
