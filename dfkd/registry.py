"""A name -> builder registry. Registration happens by explicit import of the module
that defines the builder; nothing is discovered by ``import *``."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from dfkd.errors import DfkdError, close_matches

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._items and self._items[key] is not fn:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = fn
            return fn

        return deco

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise DfkdError(
                f"unknown {self.kind} {name!r}{close_matches(name, self._items)}; "
                f"known: {', '.join(sorted(self._items))}"
            ) from None

    def build(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)
