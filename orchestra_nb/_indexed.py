"""A call that returns its item's index with its value (layer 0).

The cached map sends only the items the store lacks, and records each result the moment
it arrives, in completion order; the index travelling with the value says which item it
is. (Importable in a worker: it needs nothing but the standard library.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["IndexedCall"]


class IndexedCall:
    """``IndexedCall(fn)((j, args, kwargs))`` is ``(j, fn(*args, **kwargs))``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: tuple[int, tuple[Any, ...], dict[str, Any] | None]) -> tuple[int, Any]:
        index, args, kwargs = call
        return index, (self.fn(*args, **kwargs) if kwargs else self.fn(*args))

    def __reduce__(self) -> tuple[Any, ...]:
        return IndexedCall, (self.fn,)
