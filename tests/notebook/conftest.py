"""Fixtures: a fresh real ipykernel per test (shut down before the leak check runs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kernel_harness import Kernel


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """A fresh kernel with ``%load_ext orchestra_nb`` and 2 workers."""
    k = Kernel()
    try:
        k.execute("import orchestra_nb; orchestra_nb.configure(workers=2)\n%load_ext orchestra_nb")
        yield k
    finally:
        k.shutdown()


@pytest.fixture
def bare_kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        yield k
    finally:
        k.shutdown()
