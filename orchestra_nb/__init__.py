"""orchestra_nb: every core from a Jupyter notebook.

``await orchestra.map(f, data)`` runs ``f`` (defined in a cell, a lambda, a closure...) in a
pool of worker processes, with live progress, interrupts that work and self-healing workers.
``%load_ext orchestra_nb`` adds the ``%%orchestra`` magics and the progress widgets.

This module only defines names: the API loads on first use (a worker process imports this
package too and needs none of it), and nothing here imports IPython, ipywidgets, dask or
joblib (the joblib backend, ``orchestra_nb.joblib``, loads only when imported).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._api import (
        Pool as Pool,
        cancel_scheduled as cancel_scheduled,
        configure as configure,
        default_pool as default_pool,
        map as map,
        options as options,
        pools as pools,
        run as run,
        run_on_all as run_on_all,
        shutdown as shutdown,
        status as status,
    )
    from ._callbacks import CallbackWarning as CallbackWarning, wait_callbacks as wait_callbacks
    from ._circuit import (
        CircuitBreaker as CircuitBreaker,
        CircuitGroup as CircuitGroup,
        CircuitState as CircuitState,
    )
    from ._driver import (
        CompositeHandle as CompositeHandle,
        StepFailed as StepFailed,
        StepStatus as StepStatus,
    )
    from ._events import (
        CircuitChanged as CircuitChanged,
        JobFinished as JobFinished,
        JobPaused as JobPaused,
        JobProgress as JobProgress,
        JobStarted as JobStarted,
        TaskOutput as TaskOutput,
        TasksCached as TasksCached,
        TaskStateChanged as TaskStateChanged,
        WorkerExited as WorkerExited,
        WorkerSpawnFailed as WorkerSpawnFailed,
        WorkerStalled as WorkerStalled,
        WorkerStarted as WorkerStarted,
    )
    from ._exceptions import (
        BrokenPoolError as BrokenPoolError,
        CircuitOpenError as CircuitOpenError,
        MemoryLimitError as MemoryLimitError,
        OrchestraError as OrchestraError,
        PoolClosedError as PoolClosedError,
        RemoteError as RemoteError,
        RemoteTraceback as RemoteTraceback,
        ResultTooLargeError as ResultTooLargeError,
        SerializationError as SerializationError,
        TaskExitError as TaskExitError,
        TaskTimeoutError as TaskTimeoutError,
        WorkerCrashedError as WorkerCrashedError,
        WorkerStartError as WorkerStartError,
    )
    from ._handles import MapHandle as MapHandle, TaskHandle as TaskHandle
    from ._outcomes import (
        MISSING as MISSING,
        Failure as Failure,
        Failures as Failures,
        JobCancelled as JobCancelled,
        JobInterrupted as JobInterrupted,
    )
    from ._pipeline import Map as Map, Parallel as Parallel, Sequence as Sequence, Task as Task
    from ._policy import RetryPolicy as RetryPolicy
    from ._schedule import (
        ScheduledHandle as ScheduledHandle,
        Scheduler as Scheduler,
        every as every,
        run_after as run_after,
        run_at as run_at,
    )
    from ._state import PoolState as PoolState, TaskState as TaskState, WorkerState as WorkerState
    from ._stats import (
        JobStatistics as JobStatistics,
        PoolStatistics as PoolStatistics,
        ScheduledStatistics as ScheduledStatistics,
        WorkerStatistics as WorkerStatistics,
    )
    from .executor import Executor as Executor
    from .store import cached as cached

_EXPORTS: dict[str, str] = {
    "BrokenPoolError": "_exceptions",
    "CallbackWarning": "_callbacks",
    "CircuitBreaker": "_circuit",
    "CircuitChanged": "_events",
    "CircuitGroup": "_circuit",
    "CircuitOpenError": "_exceptions",
    "CircuitState": "_circuit",
    "CompositeHandle": "_driver",
    "Executor": "executor",
    "Failure": "_outcomes",
    "Failures": "_outcomes",
    "JobCancelled": "_outcomes",
    "JobFinished": "_events",
    "JobInterrupted": "_outcomes",
    "JobPaused": "_events",
    "JobProgress": "_events",
    "JobStarted": "_events",
    "JobStatistics": "_stats",
    "Map": "_pipeline",
    "MISSING": "_outcomes",
    "MapHandle": "_handles",
    "MemoryLimitError": "_exceptions",
    "OrchestraError": "_exceptions",
    "Parallel": "_pipeline",
    "Pool": "_api",
    "PoolClosedError": "_exceptions",
    "PoolState": "_state",
    "PoolStatistics": "_stats",
    "RemoteError": "_exceptions",
    "RemoteTraceback": "_exceptions",
    "ResultTooLargeError": "_exceptions",
    "RetryPolicy": "_policy",
    "ScheduledHandle": "_schedule",
    "ScheduledStatistics": "_stats",
    "Scheduler": "_schedule",
    "SerializationError": "_exceptions",
    "Sequence": "_pipeline",
    "StepFailed": "_driver",
    "StepStatus": "_driver",
    "Task": "_pipeline",
    "TaskHandle": "_handles",
    "TaskOutput": "_events",
    "TaskState": "_state",
    "TaskStateChanged": "_events",
    "TasksCached": "_events",
    "TaskExitError": "_exceptions",
    "TaskTimeoutError": "_exceptions",
    "WorkerCrashedError": "_exceptions",
    "WorkerExited": "_events",
    "WorkerSpawnFailed": "_events",
    "WorkerStalled": "_events",
    "WorkerStartError": "_exceptions",
    "WorkerState": "_state",
    "WorkerStatistics": "_stats",
    "WorkerStarted": "_events",
    "cached": "store",
    "cancel_scheduled": "_api",
    "configure": "_api",
    "default_pool": "_api",
    "every": "_schedule",
    "map": "_api",
    "options": "_api",
    "pools": "_api",
    "run": "_api",
    "run_after": "_schedule",
    "run_at": "_schedule",
    "run_on_all": "_api",
    "shutdown": "_api",
    "status": "_api",
    "wait_callbacks": "_callbacks",
}

__all__ = sorted([*_EXPORTS, "load_ipython_extension", "unload_ipython_extension"])


def __getattr__(name: str) -> Any:
    if name == "store":  # the public submodule, loaded on first use
        return importlib.import_module(".store", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestra_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    # The public API only (what tab completion after ``orchestra.`` offers).
    return sorted([*__all__, "__version__", "store"])


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext orchestra_nb``: magics, widgets, and ``orchestra`` in the namespace."""
    from .notebook import _extension

    _extension.load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook import _extension

    _extension.unload(ipython)
