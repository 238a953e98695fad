"""A joblib backend on the orchestra pool: ``with joblib.parallel_config(backend="orchestra"):``.

Importing this module imports joblib and registers the backend (``%load_ext orchestra_nb``
does too, when joblib is installed); :func:`register` registers it under another name.
Then every ``joblib.Parallel`` in the block, and every library that parallelises through
joblib (scikit-learn's ``n_jobs``, ``GridSearchCV``, ``cross_val_score``...), runs its
batches on the orchestra pool's warm workers instead of starting loky's processes::

    import orchestra_nb.joblib
    with joblib.parallel_config(backend="orchestra"):
        squares = Parallel(n_jobs=-1)(delayed(f)(i) for i in range(1000))

How a call runs: one ``Parallel`` call is one orchestra job, and its tasks are the calls.
joblib still makes the batches (as it goes, a few in flight); the backend adds each batch's
calls to the job, the pool chunks them and spreads them over all its workers, and a batch
goes back to joblib once all its calls are done. So a notebook shows one progress widget
per ``Parallel`` call, counting calls, with its Cancel button; and a large batch no longer
waits on one worker.

joblib's own semantics are kept, because joblib drives the call: results in order, or as
generators with ``return_as="generator"`` / ``"generator_unordered"``, ``batch_size="auto"``,
an error re-raised with its type (and the worker's traceback as ``__cause__``), the rest of
the work aborted on the first error, and ``timeout``. Where it differs from loky:

* Aborting (an error, a timeout, an interrupt of the cell, a generator dropped early)
  interrupts the running calls instead of killing the workers: the pool stays warm.
  Cancelling the call's job (its widget's Cancel button, the side panel, or
  ``pool.cancel_job``) does the same, and the ``Parallel`` call raises
  :class:`~orchestra_nb.JobCancelled`.
* A batch fails as soon as one of its calls fails; the batch's other calls have run or are
  running then (``BatchedCalls`` would stop at the first error; joblib aborts the rest).
* ``batch_size="auto"`` grows batches of short calls up to 8 times per step (joblib: 2), see
  :meth:`OrchestraBackend.compute_batch_size`.
* Nested calls inside a task run sequentially in the worker (``n_jobs`` is 1 there, also
  for an explicit ``parallel_config(backend="orchestra")``): the pool's workers are already
  one per CPU. loky runs a first nested level on threads.
* ``n_jobs=-1`` (the default inside the block, as with dask's backend) means the pool's
  workers; a positive ``n_jobs`` is capped at that number. It bounds how many batches joblib
  keeps in flight (its ``pre_dispatch``), while the pool may run them on all its workers.
* Native thread pools (BLAS, OpenMP): the pool starts its workers with
  ``OMP_NUM_THREADS`` and friends set to ``cpu_count // workers`` (loky does the same with
  ``n_jobs``). ``parallel_config(..., inner_max_num_threads=k)`` limits them to ``k`` while a
  call runs, through threadpoolctl (scikit-learn depends on it).
* ``parallel_config(backend="orchestra", pool=my_pool)`` runs on that pool; by default the
  default pool is shared with ``orchestra.run``. On the inline pool joblib runs the calls
  itself, sequentially (that pool runs everything in this process anyway).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import joblib
from joblib import parallel as _joblib_parallel
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)
from joblib.parallel import BACKENDS, BatchedCalls

from . import _api
from ._feed import FeedBuffer
from ._handles import MapHandle
from ._jobs import Job
from ._outcomes import JobCancelled
from ._serialize import callable_name
from ._state import TaskState
from .backends._base import ThreadAttachment

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

    One ``Parallel`` call is one orchestra job, fed as joblib dispatches its batches: the
    job's tasks are the individual calls (so the progress view counts calls, and the pool
    chunks and spreads a large batch over all its workers), and each batch is handed back
    to joblib once all its calls are final: on joblib's own thread for a call that returns
    a list (:meth:`retrieval_context`), else on a thread of the call's own.
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
        self._call: _ParallelCall | None = None

    def _current_pool(self) -> _api.Pool:
        return self._pool or _api.default_pool()

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or _in_worker():
            return 1  # nested in a worker: run inline, the workers already use every CPU
        pool = self._current_pool()
        if pool.capabilities.in_process:
            return 1  # the inline backend runs everything in this process anyway
        workers = pool.workers
        if n_jobs < 0:
            return max(workers + 1 + n_jobs, 1)
        return min(n_jobs, workers)

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: Any = None,
        require: Any = None,
        **backend_kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        return n_jobs

    def start_call(self) -> None:
        parallel = getattr(self, "parallel", None)
        # joblib's thread serves a call that returns a list and has no timeout (it would
        # only poll meanwhile); generators and timeouts need joblib's own polling loop.
        threaded = (
            parallel is None
            or bool(getattr(parallel, "return_generator", True))
            or getattr(parallel, "timeout", None) is not None
        )
        self._call = _ParallelCall(
            self._current_pool(),
            _CallInWorker(
                (self.nesting_level or 0) + 1, tuple(sorted(_registered)), self.inner_max_num_threads
            ),
            threaded=threaded,
        )

    @contextlib.contextmanager
    def retrieval_context(self) -> Iterator[None]:
        """joblib's thread is about to poll for the results (every 10 ms): for a call
        served on that thread, it runs the callbacks here until the last batch is in, and
        then joblib finds all the results at once."""
        call = self._call
        if call is not None and not call.threaded:
            call.serve_until_done()
        yield

    def stop_call(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.end_input()

    def submit(self, func: Any, callback: Callable[[Any], object] | None = None) -> Any:
        if self._call is None:  # a caller that drives the backend without start_call()
            self.start_call()
        assert self._call is not None
        return self._call.submit(func, callback)

    def retrieve_result_callback(self, batch: _Batch) -> Any:
        return batch.outcome()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """The first error, a timeout or an interrupt: stop the calls still to run,
        running ones included (the workers stay up, so the backend stays ready)."""
        if self._call is not None:
            self._call.abort()

    _effective_batch_size: int  # AutoBatchingMixin's state
    _smoothed_batch_duration: float

    def compute_batch_size(self) -> int:
        """joblib's automatic batch size, growing up to ``_BATCH_GROWTH`` times per step
        instead of twice: joblib's cap keeps one large batch from starving the other
        workers, but here the pool spreads a batch's calls over all of its workers. So
        tiny calls reach large batches (few round trips through joblib) in a few steps."""
        old = int(self._effective_batch_size)
        duration = float(self._smoothed_batch_duration)
        if 0 < duration < self.MIN_IDEAL_BATCH_DURATION:
            # As joblib computes it: twice the size that would take MIN_IDEAL_BATCH_DURATION.
            size = max(2 * int(old * self.MIN_IDEAL_BATCH_DURATION / duration), 1)
            size = min(size, _BATCH_GROWTH * old)
            if size != old:
                self._effective_batch_size = size
                self._smoothed_batch_duration = self._DEFAULT_SMOOTHED_BATCH_DURATION
            return size
        return int(super().compute_batch_size())

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        # What a batch's own joblib calls use in the worker: sequential, no oversubscription.
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def terminate(self) -> None:
        self.reset_batch_stats()


# How much a batch may grow per step (joblib: 2): enough to reach large batches of tiny
# calls in a few steps, not so much that joblib reads a whole long input in one go while
# the workers wait (it reads two batches' worth of calls at a time).
_BATCH_GROWTH = 8
_FINAL_MASK = bytes(
    1 if state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED) else 0 for state in range(256)
)
_FAILED = int(TaskState.FAILED)
_CANCELLED = int(TaskState.CANCELLED)
_call_ids = itertools.count(1)


class _Batch:
    """One joblib batch: calls ``start..end-1`` of its Parallel call's job. What
    ``submit`` returns, and what joblib's callback gets back."""

    __slots__ = ("callback", "cursor", "end", "error", "start", "value", "whole")

    def __init__(self, start: int, end: int, callback: Callable[[Any], object] | None, whole: bool) -> None:
        self.whole = whole  # one task that returns the batch's list (not a BatchedCalls)
        self.start = start
        self.end = end
        self.cursor = start  # calls before it are final
        self.callback = callback
        self.value: list[Any] | None = None
        self.error: BaseException | None = None

    def outcome(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value[0] if self.whole else self.value


class _ParallelCall:
    """One ``Parallel`` call on the pool: one job, fed batch by batch.

    The job's task table says when a batch is complete; the engine only signals that
    something changed (``watch``), and whoever serves the call finds the complete batches
    and runs joblib's callbacks, which dispatch the next batches. For a call that returns a
    list, without ``timeout``, that is joblib's own thread, inside ``retrieval_context``
    (:meth:`serve_until_done`): it would only poll for the results meanwhile, and it
    returns as soon as the last batch is in. Otherwise (generators, timeouts) a thread of
    the call's own (``orchestra-joblib``) does it while batches are open, and joblib polls.
    """

    def __init__(self, pool: _api.Pool, fn: _CallInWorker, *, threaded: bool) -> None:
        self._pool = pool
        self._fn = fn
        self._threaded = threaded
        self._lock = threading.Lock()
        self._open: list[_Batch] = []
        self._fed = 0
        self._aborted = False
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._handle: MapHandle[Any] | None = None
        self._job: Job | None = None
        self._inlet: FeedBuffer | None = None

    def _open_job(self, first: Any) -> None:
        """The job, at the first batch (named after its function), in the thread that
        dispatches it: joblib's caller, so that a notebook shows the view in its cell."""
        self._handle, self._job, self._inlet = self._pool._open_map(
            self._fn, name=f"joblib: {callable_name(first)}"
        )
        # On the engine's thread, whenever calls became final: only a signal.
        self._handle._watch(lambda start, count: self._signals.put(start))

    def submit(self, batch: Any, callback: Callable[[Any], object] | None) -> _Batch:
        calls, whole = _calls_of(batch)
        with self._lock:
            if self._job is None:
                self._open_job(calls[0][0] if calls and not whole else batch)
            assert self._inlet is not None
            start = self._fed
            self._fed += len(calls)
            out = _Batch(start, self._fed, callback, whole)
            if not self._inlet.put_many(calls):  # the job ended (cancelled): fail the batch
                out.end = out.start
                out.error = self._stopped_error()
            self._open.append(out)
            if self._threaded and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="orchestra-joblib", daemon=True)
                self._thread.start()
        self._signals.put(start)
        if self._job is not None:
            self._pool._input_added(self._job)  # sent from this thread: no hand-over
        return out

    def end_input(self) -> None:
        with self._lock:
            if self._inlet is not None:
                self._inlet.end(None)
        self._signals.put(-1)

    @property
    def threaded(self) -> bool:
        return self._threaded

    def abort(self) -> None:
        self._aborted = True
        if self._handle is not None:
            self._handle.cancel()

    def _stopped_error(self) -> BaseException:
        assert self._handle is not None
        if self._aborted:
            return JobCancelled(self._handle, "joblib, aborting the call")
        return JobCancelled(self._handle, self._handle._cancelled_by)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:
                self._thread = None

    def serve_until_done(self) -> None:
        """On joblib's thread: run the callbacks until no batch is open (joblib dispatches
        the next ones from them), or until one failed (joblib raises its error then)."""
        self._serve()

    def _serve(self) -> None:
        # This thread reads the results itself while it serves (the local pool).
        drain = self._pool._attach_thread()
        try:
            while self._serve_once(drain):
                pass
        finally:
            if drain is not None:
                drain.close()

    def _serve_once(self, drain: ThreadAttachment | None) -> bool:
        """Wait for a change, run the callbacks of the batches it completed; False once no
        batch is open or one failed."""
        signals = self._signals

        def changed() -> bool:
            return not signals.empty()

        while drain is not None and not changed() and drain.wait(changed):
            pass
        if not changed():  # the engine's thread signals: the local pool reads them for a moment
            self._pool._assist(changed)
        signals.get()
        while changed():  # one scan serves many signals
            signals.get_nowait()
        failed = False
        for batch in self._complete():
            failed = failed or batch.error is not None
            if batch.callback is not None:
                batch.callback(batch)
        with self._lock:  # (joblib's thread leaves at the first error: joblib raises it)
            return bool(self._open) and not (failed and not self._threaded)

    def _complete(self) -> list[_Batch]:
        """Take the batches whose calls are all final (or one of which failed) off the
        open list, with their outcomes; their results are dropped from the task table
        (joblib holds them now: a long ``return_as="generator"`` stays small)."""
        job = self._job
        if job is None:
            return []
        over = job.finished.is_set()  # before reading the table: then it is all there
        states = job.states
        done: list[_Batch] = []
        with self._lock:
            still: list[_Batch] = []
            for batch in self._open:
                if batch.error is None and batch.value is None and batch.start < batch.end:
                    upto = min(batch.end, len(states))
                    if batch.cursor < upto:
                        first_open = states[batch.cursor : upto].translate(_FINAL_MASK).find(0)
                        batch.cursor = upto if first_open < 0 else batch.cursor + first_open
                    failed = states.find(_FAILED, batch.start, upto)
                    if failed >= 0:
                        batch.error = job.errors[failed]
                    elif states.find(_CANCELLED, batch.start, upto) >= 0:
                        batch.error = self._stopped_error()
                    elif batch.cursor == batch.end:
                        batch.value = job.results[batch.start : batch.end]
                    elif over:  # calls the job never took (added as it was cancelled)
                        batch.error = self._stopped_error()
                elif batch.start == batch.end and batch.error is None:
                    batch.value = []
                if batch.error is None and batch.value is None:
                    still.append(batch)
                    continue
                if batch.start < batch.end:
                    job.results[batch.start : batch.end] = [None] * (batch.end - batch.start)
                done.append(batch)
            self._open = still
        return done


_Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _calls_of(batch: Any) -> tuple[list[_Call], bool]:
    """The ``(func, args, kwargs)`` calls of a joblib batch (``BatchedCalls.items``), and
    False; anything else joblib may send is one call that returns the batch's results (True)."""
    if type(batch) is BatchedCalls:
        return batch.items, False
    return [(_run_whole, (batch,), {})], True


def _run_whole(batch: Callable[[], list[Any]]) -> list[Any]:
    return batch()


# joblib keeps the active config in a thread-local, which ``parallel_config`` sets and
# restores; a joblib that does not is driven through ``parallel_config`` for every call.
_CONFIG_LOCAL = getattr(_joblib_parallel, "_backend", None)
_DEFAULT_CONFIG = getattr(_joblib_parallel, "default_parallel_config", None)


class _CallInWorker:
    """The job's function, in the worker: one joblib call with the nested joblib calls of
    the task set to run sequentially (as ``BatchedCalls`` sets them), the backend
    registered there too, and native thread pools limited to ``inner_max_num_threads``.

    ``call_id`` makes each ``Parallel`` call a function of its own for the pool, so that
    its chunk sizes are learned from this call's tasks only.
    """

    def __init__(self, nesting_level: int, names: tuple[str, ...], inner_threads: int | None) -> None:
        self.nesting_level = nesting_level
        self.names = names
        self.inner_threads = inner_threads
        self.call_id = (os.getpid(), next(_call_ids))
        self._registered = False  # the backend's names, in the worker
        self._config: dict[str, Any] | None = None  # the nested config, made in the worker
        self._config_base: Any = None  # ... from this parent config

    def __getstate__(self) -> dict[str, Any]:
        return {
            "nesting_level": self.nesting_level,
            "names": self.names,
            "inner_threads": self.inner_threads,
            "call_id": self.call_id,
            "_registered": False,
            "_config": None,
            "_config_base": None,
        }

    def __call__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self._registered:
            for name in self.names:
                if name not in BACKENDS:
                    register(name)
            self._registered = True
        local = _CONFIG_LOCAL
        if local is None or _DEFAULT_CONFIG is None:  # another joblib: its public API
            with self._nested(), _thread_limit(self.inner_threads):
                return func(*args, **kwargs)
        old = getattr(local, "config", _DEFAULT_CONFIG)
        if self._config is None or self._config_base is not old:
            with self._nested() as config:
                self._config, self._config_base = config, old
        # What ``parallel_config(...)`` does on entry and exit, without building the config
        # again for every call (microseconds each, for calls that may take less).
        local.config = self._config
        try:
            if self.inner_threads is None:
                return func(*args, **kwargs)
            with _thread_limit(self.inner_threads):
                return func(*args, **kwargs)
        finally:
            local.config = old

    def _nested(self) -> Any:
        return joblib.parallel_config(backend=SequentialBackend(nesting_level=self.nesting_level), n_jobs=None)


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
                raise ImportError(
                    "inner_max_num_threads needs threadpoolctl in the workers (pip install threadpoolctl)"
                ) from exc
            self._module = threadpoolctl
        if self._controller is None or len(sys.modules) != self._modules_seen:
            self._controller = self._module.ThreadpoolController()
            self._modules_seen = len(sys.modules)
        with self._controller.limit(limits=threads):
            yield


_thread_limit = _ThreadLimiter().limit


register()
