"""A joblib backend on the orchestra pool: ``with joblib.parallel_config(backend="orchestra"):``.

Importing this module imports joblib and registers the backend (``%load_ext orchestra_nb``
does too, when joblib is installed); :func:`register` registers it under another name.
Then every ``joblib.Parallel`` in the block, and every library that parallelises through
joblib (scikit-learn's ``n_jobs``, ``GridSearchCV``, ``cross_val_score``...), runs its
batches on the orchestra pool's warm workers instead of starting loky's processes::

    import orchestra_nb.joblib
    with joblib.parallel_config(backend="orchestra"):
        squares = Parallel(n_jobs=-1)(delayed(f)(i) for i in range(1000))

joblib's own semantics are kept, because joblib drives the call: results in order, or as
generators with ``return_as="generator"`` / ``"generator_unordered"``, ``batch_size="auto"``,
an error re-raised with its type (and the worker's traceback as ``__cause__``), the rest of
the work aborted on the first error, and ``timeout``. Where it differs from loky:

* Aborting (an error, a timeout, an interrupt of the cell, a generator dropped early)
  interrupts the running batches instead of killing the workers: the pool stays warm.
* Nested calls inside a task run sequentially in the worker (``n_jobs`` is 1 there, also
  for an explicit ``parallel_config(backend="orchestra")``): the pool's workers are already
  one per CPU. loky runs a first nested level on threads.
* ``n_jobs=-1`` (the default inside the block, as with dask's backend) means the pool's
  workers; a positive ``n_jobs`` is capped at that number. It bounds how many batches joblib
  keeps in flight (its ``pre_dispatch``), while the pool may run them on all its workers.
* Native thread pools (BLAS, OpenMP): the pool starts its workers with
  ``OMP_NUM_THREADS`` and friends set to ``cpu_count // workers`` (loky does the same with
  ``n_jobs``). ``parallel_config(..., inner_max_num_threads=k)`` limits them to ``k`` while a
  batch runs, through threadpoolctl (scikit-learn depends on it).
* ``parallel_config(backend="orchestra", pool=my_pool)`` runs on that pool; by default the
  default pool is shared with ``orchestra.run``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)
from joblib.parallel import BACKENDS

from . import _api
from .executor import Executor

__all__ = ["OrchestraBackend", "register"]

_registered: set[str] = set()


def register(name: str = "orchestra") -> None:
    """Register the backend with joblib as ``name``
    (``joblib.parallel_config(backend=name)``). Registering again is harmless."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a joblib backend name must be a non-empty str, got {name!r}")
    joblib.register_parallel_backend(name, OrchestraBackend)
    _registered.add(name)


def _in_worker() -> bool:
    """Whether this process is an orchestra worker (then nested joblib calls run inline)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == "orchestra_nb._worker"


class OrchestraBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's ``ParallelBackendBase`` on an orchestra pool (see the module docstring).

    Each joblib batch is one task of an :class:`orchestra_nb.Executor`; joblib's completion
    callbacks run on the executor's callback thread.
    """

    supports_retrieve_callback = True  # hence return_as generators and timeout
    supports_inner_max_num_threads = True
    supports_sharedmem = False  # require="sharedmem" makes joblib pick threads instead
    uses_threads = False
    default_n_jobs = -1

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        pool: _api.Pool | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs
        )
        if pool is not None and not isinstance(pool, _api.Pool):
            raise TypeError(f"pool must be an orchestra_nb.Pool, got {pool!r}")
        self._pool = pool
        self._executor: Executor | None = None
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._in_flight_lock = threading.Lock()
        self._inner_threads: int | None = None

    def _workers(self) -> int:
        return (self._pool or _api.default_pool()).workers

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or _in_worker():
            return 1  # nested in a worker: run inline, the workers already use every CPU
        workers = self._workers()
        if n_jobs < 0:
            return max(workers + 1 + n_jobs, 1)
        return min(n_jobs, workers)

    def configure(
        self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None, require: Any = None,
        **backend_kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        if self._executor is None:
            self._executor = Executor(pool=self._pool) if self._pool is not None else Executor()
        self._inner_threads = self.inner_max_num_threads
        return n_jobs

    def submit(self, func: Any, callback: Callable[[Any], object] | None = None) -> Any:
        assert self._executor is not None, "configure() first"
        try:
            with _no_progress_view():
                future = self._executor.submit(
                    _run_batch, func, tuple(sorted(_registered)), self._inner_threads
                )
        except Exception as exc:  # e.g. an unpicklable argument: fail this batch, as joblib expects
            future = concurrent.futures.Future()
            future.set_exception(exc)
        with self._in_flight_lock:
            self._in_flight.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._in_flight_lock:
            self._in_flight.discard(future)

    def retrieve_result_callback(self, future: concurrent.futures.Future[Any]) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """The first error, a timeout or an interrupt: stop the batches still in flight,
        running ones included (the workers stay up, so the backend stays ready)."""
        with self._in_flight_lock:
            in_flight = list(self._in_flight)
        if self._executor is not None:
            self._executor.interrupt(in_flight)

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        # What a batch's own joblib calls use in the worker: sequential, no oversubscription.
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def terminate(self) -> None:
        self.reset_batch_stats()


def _run_batch(batch: Callable[[], list[Any]], names: tuple[str, ...], inner_threads: int | None) -> list[Any]:
    """In the worker: run one joblib batch, with the backend registered there too and native
    thread pools limited to this worker's share of the CPUs."""
    for name in names:
        if name not in BACKENDS:
            register(name)
    with _thread_limit(inner_threads):
        return batch()


class _ThreadLimiter:
    """In a worker: limits BLAS/OpenMP threads to ``inner_max_num_threads`` while a batch
    runs, through threadpoolctl.

    Only once numpy is loaded (that is what brings those libraries). threadpoolctl's scan
    of the loaded libraries costs about a millisecond, so its controller is kept and made
    again only when modules were imported since (a new library may have come with them).
    """

    def __init__(self) -> None:
        self._module: Any = None  # threadpoolctl, once imported
        self._controller: Any = None
        self._modules_seen = -1

    @contextlib.contextmanager
    def limit(self, threads: int | None) -> Iterator[None]:
        if threads is None or "numpy" not in sys.modules:
            yield
            return
        if self._module is None:
            try:
                import threadpoolctl
            except ImportError as exc:
                raise ImportError("inner_max_num_threads needs threadpoolctl in the workers "
                                  "(pip install threadpoolctl)") from exc
            self._module = threadpoolctl
        if self._controller is None or len(sys.modules) != self._modules_seen:
            self._controller = self._module.ThreadpoolController()
            self._modules_seen = len(sys.modules)
        with self._controller.limit(limits=threads):
            yield


_thread_limit = _ThreadLimiter().limit


@contextlib.contextmanager
def _no_progress_view() -> Iterator[None]:
    """In a notebook, one live view per joblib batch would flood the cell: joblib's batches
    are made one at a time as earlier ones finish. (Only if the notebook layer is loaded.)"""
    progress = sys.modules.get("orchestra_nb.notebook._progress")
    if progress is None:
        yield
        return
    with progress.suppress_auto():
        yield


register()
