"""orchestra_nb: every core from a Jupyter notebook.

``await orchestra.map(f, data)`` runs ``f`` (defined in a cell, a lambda, a closure...) in a
pool of worker processes, with live progress, interrupts that work and self-healing workers.
``%load_ext orchestra_nb`` adds the ``%%orchestra`` magics and the progress widgets.

This module only defines names: the API loads on first use (a worker process imports this
package too and needs none of it), and nothing here imports IPython, ipywidgets or dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._api import (
        Pool as Pool,
        configure as configure,
        default_pool as default_pool,
        map as map,
        options as options,
        run as run,
        run_on_all as run_on_all,
        shutdown as shutdown,
        status as status,
    )
    from ._circuit import (
        CircuitBreaker as CircuitBreaker,
        CircuitGroup as CircuitGroup,
        CircuitState as CircuitState,
    )
    from ._events import (
        CircuitChanged as CircuitChanged,
        JobFinished as JobFinished,
        JobProgress as JobProgress,
        JobStarted as JobStarted,
        TaskOutput as TaskOutput,
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
    from ._policy import RetryPolicy as RetryPolicy
    from ._state import PoolState as PoolState, TaskState as TaskState, WorkerState as WorkerState
    from ._stats import (
        JobStatistics as JobStatistics,
        PoolStatistics as PoolStatistics,
        WorkerStatistics as WorkerStatistics,
    )

_EXPORTS: dict[str, str] = {
    "BrokenPoolError": "_exceptions",
    "CircuitBreaker": "_circuit",
    "CircuitChanged": "_events",
    "CircuitGroup": "_circuit",
    "CircuitOpenError": "_exceptions",
    "CircuitState": "_circuit",
    "JobFinished": "_events",
    "JobProgress": "_events",
    "JobStarted": "_events",
    "JobStatistics": "_stats",
    "MapHandle": "_handles",
    "MemoryLimitError": "_exceptions",
    "OrchestraError": "_exceptions",
    "Pool": "_api",
    "PoolClosedError": "_exceptions",
    "PoolState": "_state",
    "PoolStatistics": "_stats",
    "RemoteError": "_exceptions",
    "RemoteTraceback": "_exceptions",
    "ResultTooLargeError": "_exceptions",
    "RetryPolicy": "_policy",
    "SerializationError": "_exceptions",
    "TaskHandle": "_handles",
    "TaskOutput": "_events",
    "TaskState": "_state",
    "TaskStateChanged": "_events",
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
    "configure": "_api",
    "default_pool": "_api",
    "map": "_api",
    "options": "_api",
    "run": "_api",
    "run_on_all": "_api",
    "shutdown": "_api",
    "status": "_api",
}

__all__ = sorted([*_EXPORTS, "load_ipython_extension", "unload_ipython_extension"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestra_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext orchestra_nb``: magics, widgets, and ``orchestra`` in the namespace."""
    from .notebook import _extension

    _extension.load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook import _extension

    _extension.unload(ipython)
