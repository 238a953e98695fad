"""tests/integration/test_errors.py run on the Dask backend (this directory's ``pool`` and
``apool`` fixtures are Dask pools, conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_errors import (
    test_remote_exception_awaited,
    test_remote_exception_type_traceback_note,
    test_several_failures_noted,
    test_unpicklable_argument_in_map,
    test_unpicklable_argument_of_run,
    test_unpicklable_exception_becomes_remote_error,
    test_unpicklable_function_names_it,
    test_unpicklable_global_names_it,
    test_unpicklable_result,
)

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]

__all__ = [  # re-exported: pytest collects them here, with this directory's fixtures
    "test_remote_exception_awaited",
    "test_remote_exception_type_traceback_note",
    "test_several_failures_noted",
    "test_unpicklable_argument_in_map",
    "test_unpicklable_argument_of_run",
    "test_unpicklable_exception_becomes_remote_error",
    "test_unpicklable_function_names_it",
    "test_unpicklable_global_names_it",
    "test_unpicklable_result",
]
