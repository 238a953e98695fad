"""Backends: where a pool's work runs (see ``_base.py`` for the interface).

``create(spec, events, **options)`` is the one way the API makes a backend; each
implementation is imported only when it is asked for (``dask`` needs the extra).

* ``"local"``: worker processes on this machine (``local.py``);
* ``"inline"``: one task at a time in this process, for debugging (``inline.py``);
* ``"dask"`` or a ``distributed.Client``: a Dask cluster (``dask.py``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._bus import EventBus
    from ._base import Backend

__all__ = ["NAMES", "available_cpus", "create"]

NAMES = ("local", "inline", "dask")


def create(spec: Any, events: EventBus, workers: int | None, **options: Any) -> Backend:
    """A backend for ``spec`` (a name, or a ``distributed.Client``), with ``options``."""
    if spec == "local":
        # The workers of a plain pool start first: their start-up overlaps the engine's
        # import and start here (see _prespawn).
        from .. import _prespawn

        if not options.keys() & {"env", "python", "threads_per_worker"} and (
            workers is None or (isinstance(workers, int) and 0 < workers <= available_cpus())
        ):
            _prespawn.prespawn(available_cpus() if workers is None else workers)
        try:
            from .local import create_local_backend

            return create_local_backend(events, workers, **options)
        finally:
            _prespawn.discard()
    if spec == "inline":
        from .inline import InlineBackend

        return InlineBackend(events, workers, **options)
    if spec == "dask" or _is_dask_client(spec):
        if importlib.util.find_spec("distributed") is None:
            raise ImportError(
                "the dask backend needs dask.distributed: pip install \"orchestra_nb[dask]\""
            )
        if importlib.util.find_spec(f"{__name__}.dask") is None:
            raise NotImplementedError("this version of orchestra_nb has no dask backend")
        from .dask import create_dask_backend  # type: ignore[import-not-found,unused-ignore]

        client = None if spec == "dask" else spec
        backend: Backend = create_dask_backend(events, workers=workers, client=client, **options)
        return backend
    raise ValueError(f"unknown backend {spec!r}: choose one of {', '.join(map(repr, NAMES))} "
                     "or pass a distributed.Client")


def available_cpus() -> int:
    """CPUs this process may run on: the local pool's default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _is_dask_client(spec: Any) -> bool:
    cls = type(spec)
    return cls.__name__ == "Client" and cls.__module__.split(".")[0] == "distributed"
