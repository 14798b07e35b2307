"""User-facing errors: one clear line, exit code 2 at the command line."""

from __future__ import annotations

import difflib
from typing import Iterable


class DfkdError(Exception):
    """An error caused by the user's input (paths, names, config values).

    The command-line entry points print its message as a single line on stderr
    and exit with status 2; library callers can catch it like any exception.
    """


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ``" (did you mean: a, b?)"`` for the nearest ``choices``, or ``""``."""
    choices = list(choices)
    near = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not near:
        low = name.lower()
        near = [c for c in choices if low and low in c.lower()][:n]
    return f" (did you mean: {', '.join(near)}?)" if near else ""
