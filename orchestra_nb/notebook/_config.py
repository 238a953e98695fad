"""``%config Orchestra.workers = 4``: the extension's options, the IPython way (traitlets).

Also read from an IPython profile (``c.Orchestra.workers = 4`` in ``ipython_config.py``)
and settable in code (``orchestra.configure(workers=4)`` for the pool options).
Pool options left at ``None`` use the pool's defaults (``workers``: every available CPU).
"""

from __future__ import annotations

from typing import Any

from traitlets import Bool, CaselessStrEnum, Float, Int, Unicode, observe
from traitlets.config import Configurable

__all__ = ["POOL_OPTIONS", "Orchestra"]

POOL_OPTIONS = (
    "backend",
    "dask_address",
    "workers",
    "memory_limit",
    "memory_soft_limit",
    "cancel_grace",
    "max_tasks_per_worker",
    "start_timeout",
)


class Orchestra(Configurable):
    """Options of orchestra_nb in IPython / Jupyter."""

    backend = CaselessStrEnum(
        ["local", "inline", "dask"],
        default_value=None,
        allow_none=True,
        help="Where the default pool runs tasks: 'local' worker processes (the default), "
        "'inline' (one at a time in the kernel, for breakpoint() and %debug), or 'dask'.",
    ).tag(config=True)
    dask_address = Unicode(
        None, allow_none=True,
        help="Scheduler of the dask backend, e.g. 'tcp://10.0.0.5:8786' (default: the current "
        "distributed.Client, else a LocalCluster on this machine).",
    ).tag(config=True)
    workers = Int(
        None, allow_none=True, help="Workers of the default pool (default: all CPUs)."
    ).tag(config=True)
    memory_limit = Unicode(
        None, allow_none=True, help="Kill a worker above this memory use, e.g. '2GB'."
    ).tag(config=True)
    memory_soft_limit = Unicode(
        None, allow_none=True, help="Recycle a worker above this memory use after its task."
    ).tag(config=True)
    cancel_grace = Float(
        None,
        allow_none=True,
        help="Seconds a cancelled task may take to stop before its worker is killed.",
    ).tag(config=True)
    max_tasks_per_worker = Int(
        None, allow_none=True, help="Recycle workers after this many tasks."
    ).tag(config=True)
    start_timeout = Float(None, allow_none=True, help="Seconds a worker may take to start.").tag(
        config=True
    )

    warm = Bool(True, help="Start the default pool's workers when the extension loads.").tag(
        config=True
    )
    progress = CaselessStrEnum(
        ["auto", "widget", "text", "none"],
        default_value="auto",
        help="Progress display: 'auto' (widgets in a kernel with a front end, text elsewhere), "
        "'widget', 'text' or 'none'.",
    ).tag(config=True)
    update_interval = Float(
        0.1, help="Seconds between two updates of one progress widget (at least 0.1)."
    ).tag(config=True)
    output_max_lines = Int(
        200, help="Lines of task output shown per job; the rest is counted, not shown."
    ).tag(config=True)
    output_max_line_length = Int(2000, help="Characters kept of one line of task output.").tag(
        config=True
    )

    def pool_options(self) -> dict[str, Any]:
        """The pool options that were set (not None), as ``Pool`` takes them."""
        options = {
            name: getattr(self, name) for name in POOL_OPTIONS if getattr(self, name) is not None
        }
        if "dask_address" in options:
            options["address"] = options.pop("dask_address")
        return options

    @observe(*POOL_OPTIONS)
    def _pool_option_changed(self, change: dict[str, Any]) -> None:
        from . import _extension

        _extension.apply_pool_options(self, changed=change["name"])
