"""``%load_ext orchestra_nb`` / ``%unload_ext`` / ``%reload_ext``.

Loading registers the magics, the ``%%orchestra`` input transformer and the side panel's
comm target (``_panel``), puts ``orchestra``
(the ``orchestra_nb`` module) into the notebook's namespace, installs the progress hooks,
registers the joblib backend ``"orchestra"`` when joblib is installed,
reads the ``Orchestra`` configuration and starts the default pool's workers in the
background (they start while you write the next cell), then prints one line.

Unloading undoes all of it and shuts the default pool down (cancelling its work); a kernel
shutdown or restart stops the workers too (the pool's exit hook, and PDEATHSIG in each worker
for a killed kernel).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from typing import Any

from ._config import Orchestra
from ._interrupt import CellInterrupts, SecondInterrupt

__all__ = ["apply_pool_options", "load", "unload"]

_state: dict[str, Any] = {}


def load(ip: Any) -> None:
    import orchestra_nb

    from .. import _api, _driver, _handles, _outcomes
    from . import _composite, _magics, _output, _panel, _progress

    if _state.get("shell") is ip:
        return
    config = Orchestra(parent=ip)
    ip.configurables.append(config)
    _progress.settings = config
    ip.register_magics(_magics.OrchestraMagics)
    ip.input_transformers_cleanup.insert(0, _magics.transform)
    ip.user_ns["orchestra"] = orchestra_nb
    ip.user_ns[_magics.CELL_FUNCTION] = _magics.run_cell
    ip.user_ns_hidden[_magics.CELL_FUNCTION] = _magics.run_cell
    _handles.create_hook = _progress.on_create
    _handles.display_hook = _progress.on_display
    _driver.display_hook = _composite.on_display
    _panel.register(ip)  # the side panel's comm target (after the create hook it wraps)
    interrupt = SecondInterrupt(ip)
    interrupt.register()
    cell_interrupts = CellInterrupts(ip)
    cell_interrupts.register()
    ip.events.register("post_run_cell", _progress.finish_cell)
    _handles.interrupt_hook = cell_interrupts.interrupted
    _outcomes.render_hook = _output.render_trimmed
    _state.update(shell=ip, config=config, interrupt=interrupt, cell_interrupts=cell_interrupts)
    if importlib.util.find_spec("joblib") is not None:  # backend="orchestra" for joblib/sklearn
        importlib.import_module("orchestra_nb.joblib")

    options = config.pool_options()
    if options and options != _api._default_options:
        orchestra_nb.configure(**options)
    if config.warm:
        pool = orchestra_nb.default_pool()  # spawns the workers now; they get ready in the background
        n = pool.workers
        _show_worker_count(config, n)
        how = "configured" if "workers" in _api._default_options else "one per CPU"
        print(
            f"orchestra_nb {orchestra_nb.__version__}: {n} worker(s) starting in the background "
            f"({how}); change with %config Orchestra.workers = N"
        )
    else:
        print(
            f"orchestra_nb {orchestra_nb.__version__} loaded; the pool starts on first use "
            "(%config Orchestra.workers = N to size it)"
        )


def unload(ip: Any) -> None:
    import orchestra_nb

    from .. import _driver, _handles, _outcomes
    from . import _magics, _panel, _progress

    if "shell" not in _state or _state["shell"] is not ip:
        return
    config = _state.pop("config", None)
    interrupt = _state.pop("interrupt", None)
    cell_interrupts = _state.pop("cell_interrupts", None)
    _state.clear()
    if interrupt is not None:
        interrupt.unregister()
    if cell_interrupts is not None:
        cell_interrupts.unregister()
    with contextlib.suppress(ValueError):
        ip.events.unregister("post_run_cell", _progress.finish_cell)
    _handles.interrupt_hook = None
    _outcomes.render_hook = None
    _panel.unregister(ip)
    _handles.create_hook = None
    _handles.display_hook = None
    _driver.display_hook = None
    with contextlib.suppress(ValueError):
        ip.input_transformers_cleanup.remove(_magics.transform)
    for kind in ("line", "cell"):
        table = ip.magics_manager.magics[kind]
        if getattr(table.get("orchestra"), "__self__", None).__class__ is _magics.OrchestraMagics:
            del table["orchestra"]
    if ip.user_ns.get("orchestra") is orchestra_nb:
        del ip.user_ns["orchestra"]
    ip.user_ns.pop(_magics.CELL_FUNCTION, None)
    ip.user_ns_hidden.pop(_magics.CELL_FUNCTION, None)
    if config is not None:
        with contextlib.suppress(ValueError):
            ip.configurables.remove(config)
    _progress.settings = None
    _progress.close_all()
    _magics._pinned.clear()
    orchestra_nb.shutdown(cancel_pending=True)


def apply_pool_options(config: Orchestra, changed: str) -> None:
    """A pool option changed (``%config Orchestra.workers = 4``): resize or restart the pool."""
    import orchestra_nb

    from .. import _api, backends

    if _state.get("config") is not config or _state.get("syncing"):
        return  # not the loaded extension's (e.g. a profile being read), or our own echo
    options = config.pool_options()
    with _api._default_lock:
        current = dict(_api._default_options)
        pool = _api._default
    if options == current:
        return

    def without_workers(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k != "workers"}

    if (
        changed == "workers"
        and pool is not None
        and pool.state == "running"
        and pool.capabilities.resize
        and without_workers(options) == without_workers(current)
    ):
        with _api._default_lock:
            _api._default_options.clear()
            _api._default_options.update(options)
        n = options.get("workers") or backends.available_cpus()
        pool.resize(n)
        print(f"orchestra: the default pool now has {n} worker(s)")
        return
    orchestra_nb.configure(**options)
    if config.warm:
        pool = orchestra_nb.default_pool()
        _show_worker_count(config, pool.workers)
        print(f"orchestra: the default pool restarts with {options} ({pool.workers} worker(s))")


def _show_worker_count(config: Orchestra, workers: int) -> None:
    """``%config Orchestra`` shows the pool's real worker count, not ``None``."""
    if config.workers == workers:
        return
    _state["syncing"] = True
    try:
        config.workers = workers
    finally:
        _state.pop("syncing", None)
