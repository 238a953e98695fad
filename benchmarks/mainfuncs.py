"""Workload 8: functions that live in ``__main__``, as in a notebook.

The group subprocess is started with ``python -c`` (see __main__.py), so its ``__main__``
has no file that a worker could re-import, exactly like a kernel's namespace. The test
functions are exec'd into that module at the moment each case describes.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks import tasks
from benchmarks.config import MAIN_CASES, Sizes
from benchmarks.record import Recorder, short_reason
from benchmarks.systems.base import System
from benchmarks.workloads import do_call

#: case -> (source exec'd into __main__, name of the function it defines)
SOURCES: dict[str, tuple[str, str]] = {
    "def_before_start": ("def bench_before(x):\n    return x + 1\n", "bench_before"),
    "def_after_start": ("def bench_after(x):\n    return x + 1\n", "bench_after"),
    "lambda": ("bench_lambda = lambda x: x + 1\n", "bench_lambda"),
    "closure": (
        "def _bench_make(k):\n"
        "    def bench_inner(x):\n        return x + k\n"
        "    return bench_inner\n"
        "bench_closure = _bench_make(1)\n",
        "bench_closure",
    ),
    "lru_cache": (
        "import functools\n@functools.lru_cache(maxsize=None)\ndef bench_cached(x):\n    return x + 1\n",
        "bench_cached",
    ),
}


def _is_timeout(exc: BaseException) -> bool:
    # concurrent.futures, multiprocessing, ipyparallel and asyncio each have their own.
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


def _try(s: System, fn: Any, timeout: float) -> tuple[str, bool]:
    """(outcome, pool still usable)."""
    try:
        value = do_call(s, fn, 1, timeout=timeout)
        outcome = "ok" if value == 2 else f"failed: wrong result {value!r}"
    except Exception as exc:
        if _is_timeout(exc):
            return f"failed: hang (no result in {timeout:.0f} s)", False
        outcome = "failed: " + short_reason(exc, 90)
    try:
        healthy = do_call(s, tasks.inc, 1, timeout=timeout) == 2
    except Exception:
        healthy = False
    if not healthy:
        outcome += " (pool broken afterwards)"
    return outcome, healthy


def _judge_lru(outcome: str) -> str:
    if outcome == "ok":
        return "ran without error (target: a clear error)"
    if "hang" in outcome:
        return outcome
    lowered = outcome.lower()
    clear = "lru_cache" in lowered or "functools" in lowered or "cache" in lowered
    return ("clear error: " if clear else "unclear error: ") + outcome.removeprefix("failed: ")


def run_main_cases(cls: type[System], rec: Recorder, sizes: Sizes) -> None:
    namespace = sys.modules["__main__"].__dict__
    if "__file__" in namespace:
        rec.note("warning: __main__ has a file here, workers may re-import it")
    exec(SOURCES["def_before_start"][0], namespace)
    cases = [*MAIN_CASES] + (["lru_cache"] if cls.key == "orchestra" else [])
    system: System | None = None
    try:
        for case in cases:
            if system is None:  # first case, or the previous one broke the pool
                system = cls()
                system.start()
            source, name = SOURCES[case]
            if case != "def_before_start":
                exec(source, namespace)
            fn = namespace[name]
            assert fn.__module__ == "__main__"
            outcome, healthy = _try(system, fn, sizes.main_timeout_s)
            rec.case(case, _judge_lru(outcome) if case == "lru_cache" else outcome)
            if not healthy:
                system.hung = True
                system.dispose()
                system = None
    finally:
        if system is not None:
            system.dispose()
