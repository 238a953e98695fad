"""Shared helpers of the fault-tolerance suite (issue 4)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import orchestra_nb as orchestra


@pytest.fixture
def make_pool() -> Iterator[object]:
    """``make_pool(**options)``: started pools, shut down (cancelling) after the test."""
    pools: list[orchestra.Pool] = []

    def make(**options: object) -> orchestra.Pool:
        options.setdefault("workers", 2)
        p = orchestra.Pool(**options)  # type: ignore[arg-type]
        pools.append(p)
        p.wait_started(timeout=30)
        return p

    yield make
    for p in pools:
        p.shutdown(cancel_pending=True)
