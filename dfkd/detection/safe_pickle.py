"""Read pickled full-model checkpoints (YOLO ``.pt`` files) without running any of their code.

A YOLOv5/YOLOv8 release checkpoint is a pickle of the whole ``nn.Module`` tree: it names classes
of the package that wrote it (``models.common.Conv``, ``ultralytics.nn.tasks.DetectionModel``,
...). ``torch.load(weights_only=True)`` refuses such names. :func:`load_inert` reads the file with
that same restricted unpickler, and allow-lists only **inert stand-ins** registered under the
names the caller accepts: every named class becomes a :class:`Stub` subclass that stores the
pickled attributes (tensors, numbers, strings, lists, dicts) and has no behaviour. Nothing named
in the file is imported or called; a name outside the allow-list (``os.system``,
``builtins.eval``, an unknown package's class) stops the load with one
:class:`~dfkd.errors.DfkdError` line. ``weights_only=False`` is never used.

:func:`stub_state_dict` walks a stand-in module tree (its pickled ``_parameters``,
``_buffers`` and ``_modules``) into a flat state dict, in the order ``nn.Module.state_dict``
would give, so a model rebuilt from the checkpoint's description can load it strictly.
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from dfkd.errors import DfkdError


class Stub:
    """An inert stand-in for a class named in a pickle: it only keeps the pickled state.

    ``origin`` is the dotted name the pickle used. Construction arguments (from ``NEWOBJ`` or
    ``REDUCE``) are kept in ``_stub_args``; ``BUILD`` state updates ``__dict__``.
    """

    origin = ""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the "class" itself
        pass

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_stub_state"] = state
        if isinstance(slots, dict):
            self.__dict__.update(slots)

    def __repr__(self) -> str:
        return f"<inert {self.origin}>"


def stub_class(full_name: str) -> type:
    """A fresh :class:`Stub` subclass standing in for ``full_name`` (``module.Class``)."""
    return type(full_name.rsplit(".", 1)[-1], (Stub,), {"origin": full_name, "__module__": __name__})


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(e: BaseException) -> str:
    """The informative line of a torch loading error (its weights-only advice left out)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_BOILERPLATE)] or lines
    return lines[0] if lines else type(e).__name__


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
MAX_NAMES = 256


def checkpoint_globals(path: str | Path) -> list[str]:
    """The non-torch globals a torch checkpoint names (empty for a legacy, non-zip file: those
    are checked while loading). Reading the list imports and runs nothing."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:  # truncated archive, broken pickle stream
        raise DfkdError(f"cannot read checkpoint {path}: {_first_line(e)}") from None


def load_inert(path: str | Path, allowed: Callable[[str], bool], what: str = "checkpoint") -> Any:
    """Unpickle the torch file ``path`` with every global accepted by ``allowed(name)`` replaced by
    an inert :class:`Stub` subclass; tensors come back as CPU tensors.

    Raises a one-line :class:`DfkdError` for a missing, truncated or corrupt file and for any name
    ``allowed`` refuses (nothing of the file's code is imported or run in any case).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DfkdError(f"{what} not found: {path}")
    names = checkpoint_globals(path)
    refused = [n for n in names if not allowed(n)]
    if refused:
        raise DfkdError(f"refusing {what} {path}: it names {_list(refused)}, not on the allow-list of inert "
                        "classes (nothing was imported or run)")
    stubs = {n: stub_class(n) for n in names}
    # a legacy (non-zip) file cannot be listed beforehand: each refused name that the allow-list
    # accepts gets its stand-in and the load starts again (the refusal happens before anything of
    # the name is looked up, so nothing runs in between)
    for _ in range(MAX_NAMES):
        try:
            with torch.serialization.safe_globals([(c, n) for n, c in stubs.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except DfkdError:
            raise
        except Exception as e:  # UnpicklingError for a name found only while loading, EOFError, zip errors
            m = _GLOBAL_RE.search(str(e))
            if m is None:
                raise DfkdError(f"cannot read {what} {path}: {_reason(e)}") from None
            name = m.group(1)
            if name in stubs or not allowed(name):
                raise DfkdError(f"refusing {what} {path}: it names {name}, not on the allow-list of inert "
                                "classes (nothing was imported or run)") from None
            stubs[name] = stub_class(name)
    raise DfkdError(f"refusing {what} {path}: it names more than {MAX_NAMES} classes")


def _list(names: Iterable[str], n: int = 4) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def is_stub(obj: Any, suffix: Optional[str] = None) -> bool:
    """Whether ``obj`` is an inert stand-in (whose pickled name ends with ``suffix``, if given)."""
    return isinstance(obj, Stub) and (suffix is None or type(obj).origin.endswith(suffix))


def stub_children(obj: Any) -> "OrderedDict[str, Any]":
    mods = getattr(obj, "__dict__", {}).get("_modules")
    return OrderedDict((k, v) for k, v in (mods or {}).items() if v is not None)


def stub_state_dict(obj: Any, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """The flat state dict of a stand-in module tree: parameters, then persistent buffers, then
    the children's, recursively (``nn.Module.state_dict`` order)."""
    d = getattr(obj, "__dict__", {})
    if not isinstance(d.get("_parameters"), dict) and not isinstance(d.get("_modules"), dict):
        raise DfkdError(f"{obj!r} is not a pickled nn.Module (no _parameters/_modules)")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in (d.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach()
    skip = d.get("_non_persistent_buffers_set") or set()
    for k, v in (d.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v
    for k, child in stub_children(obj).items():
        out.update(stub_state_dict(child, prefix + k + "."))
    return out
