"""tests/integration/test_centre.py run on the Dask backend (this directory's ``pool`` and
``apool`` fixtures are Dask pools, conftest.py). Left out: a map fed by a map streaming
(it needs the second worker free for the outer map while the inner one's last item blocks;
which worker a task goes to is the dask scheduler's choice, which may queue both on one), and
the journal of a map whose worker crashed (its task kills the worker each time: dask re-runs
it on the next worker, as test_dask_backend's KilledWorker test checks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from test_centre import (
    test_a_blocked_generator_delays_only_its_own_job,
    test_a_chained_map_gives_the_right_results,
    test_a_generator_that_raises_fails_its_job_and_keeps_what_was_read,
    test_an_async_iterator_is_an_input,
    test_an_async_iterator_outside_a_loop_is_refused_by_name,
    test_an_endless_input_is_read_only_a_little_ahead,
    test_an_error_note_names_the_item_and_its_input,
    test_statistics_count_a_running_job_like_its_handle,
    test_the_events_are_a_journal_of_a_map_cancelled_part_way,
    test_the_events_are_a_journal_of_a_map_with_failures_and_retries,
    test_the_events_are_a_journal_of_a_successful_map,
)

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]

__all__ = [  # re-exported: pytest collects them here, with this directory's fixtures
    "test_a_blocked_generator_delays_only_its_own_job",
    "test_a_chained_map_gives_the_right_results",
    "test_a_generator_that_raises_fails_its_job_and_keeps_what_was_read",
    "test_an_async_iterator_is_an_input",
    "test_an_async_iterator_outside_a_loop_is_refused_by_name",
    "test_an_endless_input_is_read_only_a_little_ahead",
    "test_an_error_note_names_the_item_and_its_input",
    "test_statistics_count_a_running_job_like_its_handle",
    "test_the_events_are_a_journal_of_a_map_cancelled_part_way",
    "test_the_events_are_a_journal_of_a_map_with_failures_and_retries",
    "test_the_events_are_a_journal_of_a_successful_map",
]
