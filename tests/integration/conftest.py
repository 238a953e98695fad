"""The API, handle, error, cancellation and streaming tests run against every backend that
can run them: the ``pool`` and ``apool`` fixtures are parametrised over the local process
pool and the in-process (inline) backend. That is what proves the backend interface.

``@pytest.mark.local_only("why")`` keeps a test on the local pool: it needs tasks running
concurrently with the test's own thread (the inline backend runs a task only in the thread
that waits for it), a running task interrupted, or worker processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import orchestra_nb as orchestra

BACKENDS = ["local", "inline"]
CANCEL_GRACE = 60.0  # s: a hang guard, see _options


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    backend = request.param
    marker = request.node.get_closest_marker("local_only")
    if backend != "local" and marker is not None:
        pytest.skip(f"local pool only: {marker.args[0] if marker.args else 'needs workers'}")
    extra = request.node.get_closest_marker("pool_options")
    options: dict[str, Any] = {"workers": 2, "backend": backend}
    if backend == "local":
        # A cancelled task stops on the interrupt (what these tests check), however long a
        # loaded machine takes to deliver it: the kill after cancel_grace, which would race
        # that, is tested with pools of its own (test_cancel's stubborn tasks).
        options["cancel_grace"] = CANCEL_GRACE
        if extra is not None:
            options.update(extra.kwargs)
    return options


@pytest.fixture(params=BACKENDS)
def pool(request: pytest.FixtureRequest) -> Iterator[orchestra.Pool]:
    p = orchestra.Pool(**_options(request))
    p.wait_started(timeout=30)
    try:
        yield p
    finally:
        p.shutdown(cancel_pending=True)


@pytest.fixture(params=BACKENDS)
async def apool(request: pytest.FixtureRequest) -> AsyncIterator[orchestra.Pool]:
    p = orchestra.Pool(**_options(request))
    await asyncio.wait_for(p.started(), 30)
    try:
        yield p
    finally:
        await p.aclose(cancel_pending=True)
