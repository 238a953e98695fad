"""Helpers of the local backend's own tests: the only tests that may reach into its
engine, to check the fast path's internals (busy polling, loops that read their own
results, the socket hand-back) and the engine's defaults."""

from __future__ import annotations

from typing import Any

import orchestra_nb as orchestra


def local_core(pool: orchestra.Pool) -> Any:
    """The engine (``_pool.PoolCore``) behind a local pool."""
    assert pool.backend == "local"
    return pool._backend._core  # type: ignore[attr-defined]


def local_io(pool: orchestra.Pool) -> Any:
    """The I/O thread behind a local pool."""
    return pool._backend._io  # type: ignore[attr-defined]
