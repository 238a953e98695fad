"""Frozen retry and memory policies: pure decisions, no I/O (layer 0).

:class:`RetryPolicy` decides *whether* a failed task runs again and *how long* to wait first;
randomness is injected (``rand``) so that a schedule is exact under test. :class:`MemoryPolicy`
turns a worker's resident set size into a verdict (keep, recycle after the task, kill now);
:func:`parse_size` reads the sizes users write (``"2GB"``, ``"512MiB"``, ``0.5`` of RAM).

The pool passes these objects in explicitly; nothing here reads global configuration or the
system (total RAM is an argument, not a lookup).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ._exceptions import SerializationError

__all__ = [
    "NEVER_RETRY",
    "MemoryPolicy",
    "MemoryVerdict",
    "RetryPolicy",
    "parse_size",
]

#: Never retried, whatever ``retry_on`` says: cancellation and interpreter exits must win, and a
#: pickling failure fails the same way every time (``ResultTooLargeError`` is a subclass).
NEVER_RETRY: tuple[type[BaseException], ...] = (
    asyncio.CancelledError,
    KeyboardInterrupt,
    SystemExit,
    SerializationError,
)

MemoryVerdict = Literal["ok", "recycle", "kill"]


def _is_real(value: object) -> bool:
    # bool is an int subclass; ``retries=True`` is a mistake, not a count.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_exception_types(owner: str, field: str, value: object) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise TypeError(f"{owner}.{field} must be a tuple of exception classes, got {value!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failed task is retried, and the exponential backoff between attempts.

    The wait before retry ``n`` (1-based) is ``min(max_backoff, backoff * factor**(n-1))``,
    multiplied by a jitter factor drawn uniformly from ``[1 - jitter, 1 + jitter]``.
    Jitter is applied after the cap, so a delay may exceed ``max_backoff`` by ``jitter``.

    ``RetryPolicy()`` (``retries=0``) never retries.
    """

    retries: int = 0
    backoff: float = 0.1
    factor: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or isinstance(self.retries, bool):
            raise TypeError(f"RetryPolicy.retries must be an int, got {self.retries!r}")
        if self.retries < 0:
            raise ValueError(f"RetryPolicy.retries must be >= 0, got {self.retries}")
        for field in ("backoff", "factor", "max_backoff", "jitter"):
            value = getattr(self, field)
            if not _is_real(value):
                raise TypeError(f"RetryPolicy.{field} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"RetryPolicy.{field} must be finite, got {value}")
        if self.backoff < 0:
            raise ValueError(f"RetryPolicy.backoff must be >= 0, got {self.backoff}")
        if self.factor < 1:
            raise ValueError(f"RetryPolicy.factor must be >= 1, got {self.factor}")
        if self.max_backoff < 0:
            raise ValueError(f"RetryPolicy.max_backoff must be >= 0, got {self.max_backoff}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be within [0, 1], got {self.jitter}")
        _check_exception_types("RetryPolicy", "retry_on", self.retry_on)

    @classmethod
    def coerce(cls, value: RetryPolicy | int | None) -> RetryPolicy:
        """Accept what a ``retries=`` option may hold: ``None`` (no retries), a count, a policy."""
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(retries=value)
        raise TypeError(f"retries must be None, an int or a RetryPolicy, got {value!r}")

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether to run again after failure number ``attempt`` (1-based) raised ``exc``."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        if attempt > self.retries or isinstance(exc, NEVER_RETRY):
            return False
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """Seconds to wait after failure number ``attempt`` (1-based); ``rand()`` is in [0, 1)."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        try:
            base = min(self.max_backoff, self.backoff * self.factor ** (attempt - 1))
        except OverflowError:  # factor**n beyond float range: the cap is the answer anyway
            base = self.max_backoff
        r = rand()
        if not 0 <= r < 1:
            raise ValueError(f"rand() must return a value in [0, 1), got {r!r}")
        return base * (1 - self.jitter + 2 * self.jitter * r)

    def schedule(self, rand: Callable[[], float]) -> list[float]:
        """The delays before each of the ``retries`` retries, in order."""
        return [self.delay(attempt, rand) for attempt in range(1, self.retries + 1)]


_UNITS: dict[str, int] = {
    # Decimal for the SI names and bare letters, binary for the IEC ``*iB`` names (as dask).
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z%]*)\s*$", re.IGNORECASE)


def parse_size(value: int | float | str, *, total_memory: int | None = None) -> int:
    """A memory size in bytes, from what a user writes.

    - ``int``: bytes (``1_000_000``);
    - ``float`` in ``(0, 1]``: a fraction of ``total_memory`` (``0.5`` is half the RAM);
    - ``str``: a number with an optional unit, case-insensitive: ``B``, ``kB``/``MB``/``GB``/``TB``
      (powers of 1000, also as bare ``k``/``m``/``g``/``t``), ``KiB``/``MiB``/``GiB``/``TiB``
      (powers of 1024) or ``%`` of ``total_memory``; a bare number reads like the number itself.

    ``total_memory`` (bytes) is needed only for fractions; the caller looks it up.
    The result is rounded down and must be at least one byte.
    """
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"cannot parse memory size {value!r} (try '2GB', '512MiB', '50%')")
        number, unit = match.group(1), match.group(2).lower()
        if unit == "":
            return parse_size(
                float(number) if "." in number else int(number), total_memory=total_memory
            )
        if unit == "%":
            return _fraction(float(number) / 100, value, total_memory)
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {match.group(2)!r} in memory size {value!r}")
        # Integers stay exact: float would round sizes past 2**53 bytes.
        return _positive(
            int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit],
            value,
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a memory size must be an int, float or str, got {value!r}")
    if isinstance(value, float):
        return _fraction(value, value, total_memory)
    return _positive(value, value)


def _fraction(fraction: float, original: object, total_memory: int | None) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"a memory fraction must be within (0, 1], got {original!r}")
    if total_memory is None:
        raise ValueError(
            f"memory size {original!r} is a fraction of RAM but total_memory is unknown"
        )
    return _positive(int(fraction * total_memory), original)


def _positive(size: int, original: object) -> int:
    if size < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {original!r}")
    return size


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """Per-worker memory limits in bytes; ``None`` means no limit.

    Above ``soft_limit`` the worker is recycled once its current task ends; above ``hard_limit``
    it is killed at once (the task then fails with ``MemoryLimitError``).
    """

    soft_limit: int | None = None
    hard_limit: int | None = None

    def __post_init__(self) -> None:
        for field in ("soft_limit", "hard_limit"):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(
                    f"MemoryPolicy.{field} must be an int (bytes) or None, "
                    f"got {value!r}; use MemoryPolicy.parse for '2GB'-style sizes"
                )
            if value < 1:
                raise ValueError(f"MemoryPolicy.{field} must be >= 1 byte, got {value}")
        if (
            self.soft_limit is not None
            and self.hard_limit is not None
            and self.soft_limit > self.hard_limit
        ):
            raise ValueError(
                f"MemoryPolicy.soft_limit ({self.soft_limit}) must not exceed "
                f"hard_limit ({self.hard_limit})"
            )

    @classmethod
    def parse(
        cls,
        soft_limit: int | float | str | None = None,
        hard_limit: int | float | str | None = None,
        *,
        total_memory: int | None = None,
    ) -> MemoryPolicy:
        """Build from user-written sizes; see :func:`parse_size` for the accepted forms."""
        return cls(
            soft_limit=None
            if soft_limit is None
            else parse_size(soft_limit, total_memory=total_memory),
            hard_limit=None
            if hard_limit is None
            else parse_size(hard_limit, total_memory=total_memory),
        )

    def verdict(self, rss: int) -> MemoryVerdict:
        """``"kill"`` above the hard limit, ``"recycle"`` above the soft limit, else ``"ok"``."""
        if self.hard_limit is not None and rss > self.hard_limit:
            return "kill"
        if self.soft_limit is not None and rss > self.soft_limit:
            return "recycle"
        return "ok"
