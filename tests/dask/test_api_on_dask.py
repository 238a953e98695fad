"""The local pool's API tests (tests/integration/test_api.py, and the failure table's of
test_failures.py) run on the Dask backend: the
``pool`` and ``apool`` fixtures of this directory are Dask pools (conftest.py). Left out:
``test_resize`` (a cluster orchestra did not start is scaled by its own manager),
``test_status`` (it reads the counts as soon as the task's marker file exists; on Dask, RUNNING
comes from the worker through the scheduler, a few ms after the task started: the Dask tests
check it by waiting for the event) and the tests that make their own local pools."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_api import (
    test_await_does_not_block_the_loop,
    test_map_chunksize,
    test_map_handle_while_running,
    test_map_ordered,
    test_map_return_exceptions,
    test_map_star,
    test_map_unordered,
    test_options_run,
    test_partial_results_fill_failed_and_cancelled,
    test_run_await_and_result,
    test_run_error,
    test_run_handle_states,
    test_stream_async_for,
    test_stream_raises_task_error,
    test_stream_sync_for,
    test_stream_sync_for_ordered_waits_for_slow_item,
    test_stream_sync_for_unordered_yields_as_completed,
    test_worker_pids_and_run_on_all,
)
from test_failures import test_a_failure_row_says_how_long_its_failing_attempt_ran

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]

__all__ = [  # re-exported: pytest collects them here, with this directory's fixtures
    "test_a_failure_row_says_how_long_its_failing_attempt_ran",
    "test_await_does_not_block_the_loop",
    "test_map_chunksize",
    "test_map_handle_while_running",
    "test_map_ordered",
    "test_map_return_exceptions",
    "test_map_star",
    "test_map_unordered",
    "test_options_run",
    "test_partial_results_fill_failed_and_cancelled",
    "test_run_await_and_result",
    "test_run_error",
    "test_run_handle_states",
    "test_stream_async_for",
    "test_stream_raises_task_error",
    "test_stream_sync_for",
    "test_stream_sync_for_ordered_waits_for_slow_item",
    "test_stream_sync_for_unordered_yields_as_completed",
    "test_worker_pids_and_run_on_all",
]
