"""tests/integration/test_data.py run on the Dask backend (this directory's ``pool`` and
``apool`` fixtures are Dask pools, conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_data import (
    test_million_item_generator_map,
)

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]

__all__ = [  # re-exported: pytest collects them here, with this directory's fixtures
    "test_million_item_generator_map",
]
