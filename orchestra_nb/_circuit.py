"""Circuit breaker: stop calling something that keeps failing, then probe it (layer 0, pure).

::

              fail_max failures within `window` s
    CLOSED ────────────────────────────────────────▶ OPEN ◀──────────────┐
      ▲                                              │                   │
      │ trial succeeds        first call after       │                   │ trial fails
      │                       `reset_timeout` s      ▼                   │ (fresh timer)
      └──────────────────────────────────────── HALF_OPEN ───────────────┘
                                          (admits exactly one trial call)

Time comes from an injected ``clock`` (default :func:`time.monotonic`), so tests drive it with a
fake clock. Transitions happen only inside :meth:`CircuitBreaker.before_call`,
:meth:`~CircuitBreaker.record_success` and :meth:`~CircuitBreaker.record_failure`; reading
:attr:`~CircuitBreaker.state` never changes anything.

A breaker holds no lock and does no I/O: it is meant for one thread (an event loop, or a worker),
and it pickles (with cloudpickle) so it can travel inside a function; each process then has its
own copy with its own history.
"""

from __future__ import annotations

import enum
import functools
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from ._exceptions import CircuitOpenError

__all__ = [
    "CircuitBreaker",
    "CircuitChange",
    "CircuitGroup",
    "CircuitState",
    "CircuitStatistics",
]

P = ParamSpec("P")
R = TypeVar("R")


class CircuitState(enum.Enum):
    """Where a breaker is in its cycle."""

    CLOSED = "closed"  # calls run; failures are counted
    OPEN = "open"  # calls fail fast with CircuitOpenError
    HALF_OPEN = "half_open"  # one trial call runs; the others fail fast


@dataclass(frozen=True, slots=True)
class CircuitChange:
    """One state transition, as passed to ``on_change``.

    ``at`` is the breaker's clock reading; ``failures`` counts the failures inside the window
    just after the change (0 after closing, since closing clears the history).
    """

    name: str
    old: CircuitState
    new: CircuitState
    at: float
    failures: int


@dataclass(frozen=True, slots=True)
class CircuitStatistics:
    """A snapshot of a breaker (``CircuitBreaker.statistics()``).

    ``failures`` counts failures inside the window now; ``retry_in`` is the seconds until an
    open breaker admits a trial (0.0 when one is due, ``None`` unless OPEN).
    """

    name: str
    state: CircuitState
    failures: int
    fail_max: int
    retry_in: float | None
    trial_in_flight: bool
    calls_admitted: int
    calls_rejected: int
    successes: int
    total_failures: int


def _number(field: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"CircuitBreaker.{field} must be a number, got {value!r}")
    return value


def _check_settings(
    fail_max: object, window: object, reset_timeout: object, exclude: object
) -> None:
    if not isinstance(fail_max, int) or isinstance(fail_max, bool):
        raise TypeError(f"CircuitBreaker.fail_max must be an int, got {fail_max!r}")
    if fail_max < 1:
        raise ValueError(f"CircuitBreaker.fail_max must be >= 1, got {fail_max}")
    if not _number("window", window) > 0:  # written so that NaN fails too
        raise ValueError(f"CircuitBreaker.window must be > 0, got {window}")
    if not _number("reset_timeout", reset_timeout) >= 0:
        raise ValueError(f"CircuitBreaker.reset_timeout must be >= 0, got {reset_timeout}")
    if not isinstance(exclude, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in exclude
    ):
        raise TypeError(
            f"CircuitBreaker.exclude must be a tuple of exception classes, got {exclude!r}"
        )


class CircuitBreaker:
    """Fail fast after ``fail_max`` failures within ``window`` s; probe after ``reset_timeout`` s.

    Use it as ``with breaker.guard(): ...``, as a decorator (``@breaker`` on a sync or an
    ``async def`` function), or by hand: call :meth:`before_call` first, then exactly one of
    :meth:`record_success` / :meth:`record_failure` for every call it admitted.

    Results are not tied to calls: while HALF_OPEN, any reported success closes the breaker and
    any reported failure reopens it, even one from a call admitted before the breaker opened.

    ``on_change`` is called after every transition, once the breaker's state is fully updated.
    Its exceptions propagate to whoever caused the transition (they are bugs, not something
    to hide), and the breaker stays consistent: if it raises while a trial would be admitted,
    that call is not admitted and the next call becomes the trial.
    """

    def __init__(
        self,
        name: str,
        fail_max: int = 5,
        window: float = 60.0,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitChange], None] | None = None,
        exclude: tuple[type[BaseException], ...] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"CircuitBreaker.name must be a non-empty str, got {name!r}")
        _check_settings(fail_max, window, reset_timeout, exclude)
        self.name = name
        self.fail_max = fail_max
        self.window = window
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.on_change = on_change
        self.exclude = exclude
        self._state = CircuitState.CLOSED
        self._failures: deque[float] = deque()  # clock readings of recent failures, oldest first
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._calls_admitted = 0
        self._calls_rejected = 0
        self._successes = 0
        self._total_failures = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._state.value}>"

    @property
    def state(self) -> CircuitState:
        """The recorded state; a read never moves it.

        An OPEN breaker whose ``reset_timeout`` has passed still reads OPEN: it becomes
        HALF_OPEN when the next call arrives (``statistics().retry_in == 0.0`` shows it is due).
        That keeps every transition, and its ``on_change``, tied to a call.
        """
        return self._state

    def before_call(self) -> None:
        """Admit a call, or raise :class:`CircuitOpenError` without running it."""
        now = self.clock()
        if self._state is CircuitState.OPEN:
            remaining = self._opened_at + self.reset_timeout - now
            if remaining > 0:
                self._calls_rejected += 1
                raise CircuitOpenError(
                    f"circuit breaker {self.name!r} is open after {self._recent(now)} failures "
                    f"within {self.window:g}s; next trial call in {remaining:.1f}s"
                )
            self._transition(CircuitState.HALF_OPEN, now)
        if self._state is CircuitState.HALF_OPEN:
            if self._trial_in_flight:
                self._calls_rejected += 1
                raise CircuitOpenError(
                    f"circuit breaker {self.name!r} is half-open after {self._recent(now)} "
                    f"failures and its trial call is still running; next trial when it ends"
                )
            # Claimed only after on_change returned, so a raising callback leaves the slot free.
            self._trial_in_flight = True
        self._calls_admitted += 1

    def record_success(self) -> None:
        """Report that an admitted call succeeded; a successful trial closes the breaker."""
        self._successes += 1
        if self._state is CircuitState.HALF_OPEN:
            self._trial_in_flight = False
            self._failures.clear()
            self._transition(CircuitState.CLOSED, self.clock())

    def record_failure(self, exc: BaseException) -> None:
        """Report that an admitted call raised ``exc``.

        - an instance of one of ``exclude`` counts as a **success** (the callee answered; the
          error is the caller's, e.g. bad input), so it also closes a half-open breaker;
        - a ``BaseException`` that is not an ``Exception`` (cancellation, ``KeyboardInterrupt``,
          ``SystemExit``) is **neutral**: not counted, and a half-open trial is released so that
          the next call becomes the trial;
        - anything else is a failure: it reopens a half-open breaker with a fresh timer, and
          opens a closed one once ``fail_max`` failures fall within ``window`` seconds.
        """
        if isinstance(exc, self.exclude):
            self.record_success()
            return
        if not isinstance(exc, Exception):
            if self._state is CircuitState.HALF_OPEN:
                self._trial_in_flight = False
            return
        now = self.clock()
        self._total_failures += 1
        self._failures.append(now)
        if self._state is CircuitState.HALF_OPEN:
            self._trial_in_flight = False
            self._open(now)
        elif self._state is CircuitState.CLOSED and self._recent(now) >= self.fail_max:
            self._open(now)
        # Already OPEN: a late report from a call admitted before opening; the timer stands.

    def statistics(self) -> CircuitStatistics:
        """A snapshot of the state and counters (reading it changes nothing)."""
        now = self.clock()
        retry_in = None
        if self._state is CircuitState.OPEN:
            retry_in = max(0.0, self._opened_at + self.reset_timeout - now)
        return CircuitStatistics(
            name=self.name,
            state=self._state,
            failures=self._recent(now),
            fail_max=self.fail_max,
            retry_in=retry_in,
            trial_in_flight=self._trial_in_flight,
            calls_admitted=self._calls_admitted,
            calls_rejected=self._calls_rejected,
            successes=self._successes,
            total_failures=self._total_failures,
        )

    def guard(self) -> _Guard:
        """A context manager around one call: ``with breaker.guard(): do_it()``.

        Raises :class:`CircuitOpenError` on entry when the breaker rejects the call; never
        suppresses the body's exception. Also works around an ``await`` inside ``async def``.
        """
        return _Guard(self)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate a sync or ``async def`` function so every call goes through :meth:`guard`."""
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # Guarding would cover only the creation of the generator, not its iteration.
            raise TypeError(f"CircuitBreaker cannot wrap generator function {fn!r}")
        if inspect.iscoroutinefunction(fn):
            afn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with self.guard():
                    return await afn(*args, **kwargs)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.guard():
                return fn(*args, **kwargs)

        return wrapper

    def _recent(self, now: float) -> int:
        """Drop failures older than the window; return how many remain."""
        while self._failures and self._failures[0] <= now - self.window:
            self._failures.popleft()
        return len(self._failures)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._transition(CircuitState.OPEN, now)

    def _transition(self, new: CircuitState, now: float) -> None:
        old, self._state = self._state, new
        if self.on_change is not None:
            self.on_change(CircuitChange(self.name, old, new, now, self._recent(now)))


class _Guard:
    """The context manager returned by :meth:`CircuitBreaker.guard`."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        self._breaker.before_call()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._breaker.record_success()
        else:
            self._breaker.record_failure(exc)


class CircuitGroup:
    """Named breakers sharing defaults: ``group.breaker("db")`` is always the same breaker."""

    def __init__(
        self,
        fail_max: int = 5,
        window: float = 60.0,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitChange], None] | None = None,
        exclude: tuple[type[BaseException], ...] = (),
    ) -> None:
        _check_settings(fail_max, window, reset_timeout, exclude)  # fail here, not on first use
        self.fail_max = fail_max
        self.window = window
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.on_change = on_change
        self.exclude = exclude
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker called ``name``, created with the group's defaults on first use."""
        found = self._breakers.get(name)
        if found is None:
            found = self._breakers[name] = CircuitBreaker(
                name,
                fail_max=self.fail_max,
                window=self.window,
                reset_timeout=self.reset_timeout,
                clock=self.clock,
                on_change=self.on_change,
                exclude=self.exclude,
            )
        return found

    def states(self) -> dict[str, CircuitState]:
        """Each breaker's recorded state, by name, in creation order."""
        return {name: b.state for name, b in self._breakers.items()}
