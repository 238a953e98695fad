"""Backends (layer 2): where jobs run. See :mod:`orchestra_nb.backends._base` for the contract.

:func:`create_backend` picks one by name (or by the object given) and imports it only then:
``import orchestra_nb`` never imports dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._bus import EventBus
    from ._base import Backend

__all__ = ["create_backend"]


def create_backend(spec: Any, events: EventBus, **options: Any) -> Backend:
    """The backend for ``Pool(backend=spec)``: ``"dask"``, or a ``distributed.Client``."""
    if spec == "dask" or _is_dask_client(spec):
        try:
            module = importlib.import_module(".dask", __name__)
        except ImportError as exc:
            raise ImportError(
                f'backend="dask" needs dask.distributed ({exc}): pip install "orchestra_nb[dask]"'
            ) from exc
        client = None if spec == "dask" else spec
        backend: Backend = module.create_dask_backend(events, client=client, **options)
        return backend
    raise ValueError(f"unknown backend {spec!r}; known: 'dask' or a distributed.Client")


def _is_dask_client(obj: object) -> bool:
    return any(t.__module__.startswith("distributed") and t.__name__ == "Client" for t in type(obj).__mro__)
