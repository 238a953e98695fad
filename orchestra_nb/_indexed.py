"""A call that returns its item's index with its value (layer 0).

The cached map sends only the items the store lacks, and records each result the moment
it arrives, in completion order; the index travelling with the value says which item it
is. (Importable in a worker: it needs nothing but the standard library.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["IndexedCall", "Unkeyed", "unwrap_unkeyed"]


class Unkeyed:
    """An argument passed to the function but left out of the cache key
    (``orchestra.store.unkeyed(value)``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return Unkeyed, (self.value,)

    def __repr__(self) -> str:
        return f"unkeyed({self.value!r})"


def unwrap_unkeyed(
    args: tuple[Any, ...], kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """The arguments the function gets: every :class:`Unkeyed` replaced by its value."""
    if any(type(a) is Unkeyed for a in args):
        args = tuple(a.value if type(a) is Unkeyed else a for a in args)
    if kwargs and any(type(v) is Unkeyed for v in kwargs.values()):
        kwargs = {k: v.value if type(v) is Unkeyed else v for k, v in kwargs.items()}
    return args, kwargs


class IndexedCall:
    """``IndexedCall(fn)((j, args, kwargs))`` is ``(j, fn(*args, **kwargs))``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: tuple[int, tuple[Any, ...], dict[str, Any] | None]) -> tuple[int, Any]:
        index, args, kwargs = call
        args, kwargs = unwrap_unkeyed(args, kwargs)
        return index, (self.fn(*args, **kwargs) if kwargs else self.fn(*args))

    def __reduce__(self) -> tuple[Any, ...]:
        return IndexedCall, (self.fn,)
