"""``%%orchestra`` (run a cell in a worker) and ``%orchestra`` (pool commands).

IPython does not await what a cell magic returns, so an input transformer rewrites::

    %%orchestra -o result
    <body>

into ``await __orchestra_cell__('-o result', '<body>')``, which IPython awaits like any
top-level ``await`` (docs/design.md, "`%%orchestra` cells can be awaited"): the cell runs in the foreground,
streams its prints, and "interrupt kernel" cancels it. Forms:

* ``%%orchestra [-o NAME ...]``: run the cell on one worker (always the same one while it
  lives, so names it defines stay available to the next ``%%orchestra`` cell); the value of
  a trailing expression is the cell's value; ``-o NAME`` copies ``NAME`` back into the
  notebook's namespace.
* ``%%orchestra --all [-o NAME]``: run it on every worker, and replay it on every worker
  started later (respawn after a crash, resize), before that worker takes other work.
  ``-o NAME`` gives a list, one value per worker.
* ``%%orchestra --bg NAME``: run it as a background job; ``NAME`` is bound to its handle
  (``await NAME`` gives the value of the cell's trailing expression).

The cell's code runs in the worker's persistent ``%%orchestra`` namespace (``_remote``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from .. import _handles
from .._outcomes import JobInterrupted
from .._state import WorkerState
from . import _progress
from ._remote import orchestra_cell, orchestra_cell_value

__all__ = ["CELL_FUNCTION", "OrchestraMagics", "run_cell", "transform"]

CELL_FUNCTION = "__orchestra_cell__"
_CELL_RE = re.compile(r"^%%orchestra(?:\s|$)")

_pinned: dict[int, int] = {}  # id(pool) -> worker id that runs foreground cells


def transform(lines: list[str]) -> list[str]:
    """IPython input transformer (cleanup stage): ``%%orchestra ...`` -> ``await ...``."""
    if not lines or not _CELL_RE.match(lines[0]):
        return lines
    args = lines[0][len("%%orchestra") :].strip()
    body = "".join(lines[1:])
    return [f"await {CELL_FUNCTION}({args!r}, {body!r})\n"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"%%orchestra: {message}\n{self.format_usage()}")


def _parser() -> _Parser:
    p = _Parser(prog="%%orchestra", add_help=False)
    p.add_argument(
        "-o",
        "--out",
        action="append",
        default=[],
        help="names to copy back into the notebook (comma separated or repeated)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--all", action="store_true", help="run on every worker, and on every later one")
    mode.add_argument("--bg", metavar="NAME", help="run in the background; NAME gets the handle")
    return p


def parse(args: str) -> argparse.Namespace:
    opts = _parser().parse_args(shlex.split(args))
    names: list[str] = []
    for item in opts.out:
        names += [n.strip() for n in item.split(",") if n.strip()]
    for name in names:
        if not name.isidentifier():
            raise UsageError(f"%%orchestra -o: {name!r} is not a valid name")
    if opts.bg is not None and not opts.bg.isidentifier():
        raise UsageError(f"%%orchestra --bg: {opts.bg!r} is not a valid name")
    if opts.bg is not None and names:
        raise UsageError("%%orchestra: -o cannot be used with --bg (read the names from the handle's result)")
    opts.names = tuple(names)
    return opts


def _shell() -> Any:
    from IPython import get_ipython

    return get_ipython()


def _filename(shell: Any) -> str:
    count = getattr(shell, "execution_count", 0) if shell is not None else 0
    return f"<orchestra-cell-{count}>"


def _run_pinned(pool: Any, *args: Any) -> Any:
    """Run ``orchestra_cell(*args)`` on the pool's foreground worker (a TaskHandle): the
    same worker every time while it lives, so state kept in its namespace carries over.
    Backends that cannot pin a call run it anywhere."""
    if not pool.capabilities.pinning:
        return pool.options(name="%%orchestra").run(orchestra_cell, *args)
    workers = [w for w in pool.statistics().workers if w.state in (WorkerState.STARTING, WorkerState.READY)]
    usable = {w.id: w for w in workers}
    wid = _pinned.get(id(pool))
    if wid is None or wid not in usable:
        ready = [w.id for w in workers if w.state is WorkerState.READY]
        candidates = ready or list(usable)
        if not candidates:  # no worker alive (respawning): any worker will do
            return pool.options(name="%%orchestra").run(orchestra_cell, *args)
        wid = _pinned[id(pool)] = min(candidates)
    return pool.options(name="%%orchestra", worker=wid).run(orchestra_cell, *args)


async def run_cell(args: str, body: str) -> Any:
    """What a ``%%orchestra`` cell becomes (awaited by IPython)."""
    import orchestra_nb

    opts = parse(args)
    shell = _shell()
    filename = _filename(shell)
    pool = orchestra_nb.default_pool()
    user_ns = shell.user_ns if shell is not None else {}
    if opts.all:
        on_all = pool.run_on_all(orchestra_cell, body, filename, opts.names, replay=True)
        _show(on_all, mark="worker")
        results = await on_all
        for name in opts.names:
            user_ns[name] = [out[name] for _, out in results]
        return None
    if opts.bg:
        with _progress.suppress_auto():
            handle = pool.options(name=f"%%orchestra --bg {opts.bg}").run(orchestra_cell_value, body, filename)
        _show(handle, mark=None)
        user_ns[opts.bg] = handle
        return None
    with _progress.suppress_auto():
        handle = _run_pinned(pool, body, filename, opts.names)
    _progress.adopt(handle, local_frames=False)  # the worker's traceback shows the cell
    view = _progress.start_view(handle, widgets=False, output="stream", mark=None)
    try:
        value, out = await handle
    except JobInterrupted as interrupted:  # "Interrupt kernel": the handle raised it
        interrupted.local_frames = False  # the cell ran in a worker: no kernel frame to show
        raise
    except asyncio.CancelledError:
        # Interrupted: reply at once (the output keeps arriving in the background), as a
        # KeyboardInterrupt when "Interrupt kernel" did it, like any interrupted cell.
        task = asyncio.current_task()
        hook = _handles.interrupt_hook
        if task is not None and task.cancelling() and hook is not None and hook():
            task.uncancel()
            stopped = JobInterrupted(handle)
            stopped.local_frames = False
            raise stopped from None
        raise
    except BaseException:
        await view.drain_output()  # what the cell printed before its error comes first
        raise
    await view.drain_output()
    user_ns.update(out)
    return value


def _show(handle: Any, mark: str | None) -> None:
    _progress.adopt(handle, local_frames=False)
    mode = _progress.resolve_mode()
    if mode == "widget":
        try:
            view = _progress.start_view(handle, mark=mark)
        except Exception:
            mode = "text"
        else:
            _progress._display(view.widget)
            return
    _progress.start_view(handle, widgets=False, output="stream", mark=mark)


_LINE_HELP = """\
%orchestra status      live view of the default pool (workers, CPU, memory, queue, jobs,
                       scheduled tasks)
%orchestra status --once   a snapshot instead of a live view
%orchestra workers N   resize the default pool to N workers
%orchestra shutdown    shut the default pool down (the next call starts a new one)
%orchestra unschedule ID|NAME   cancel a scheduled task listed by %orchestra status
%orchestra store       the result store: where, how big, its named runs (orchestra.store)
%%orchestra [-o NAME] | --all [-o NAME] | --bg NAME   run the cell in the pool's workers"""


@magics_class
class OrchestraMagics(Magics):
    @line_cell_magic
    def orchestra(self, line: str, cell: str | None = None) -> Any:
        """%orchestra status | workers N | shutdown | unschedule ID|NAME ;
        %%orchestra [-o NAME] [--all | --bg NAME]"""
        if cell is not None:
            return self._cell(line, cell)
        words = line.split()
        cmd = words[0] if words else "status"
        import orchestra_nb

        from .. import _api

        if cmd == "status":
            _progress.show_status(lambda: _api._default, live="--once" not in words)
            return None
        if cmd == "workers" and len(words) == 2 and words[1].isdigit():
            settings = _progress.settings
            if settings is not None:
                settings.workers = int(words[1])  # resizes the pool (see _config)
            else:
                orchestra_nb.default_pool().resize(int(words[1]))
            return None
        if cmd == "unschedule" and len(words) >= 2:
            given = line.split(None, 1)[1].strip()
            key: int | str = int(given) if given.isdigit() else given  # a number is an id
            try:
                cancelled = orchestra_nb.cancel_scheduled(key)
            except ValueError as exc:  # a name shared by several: they are listed
                raise UsageError(f"%orchestra unschedule: {exc}") from None
            if cancelled:
                print(f"orchestra: scheduled task {given} cancelled")
            else:
                print(f"orchestra: no scheduled task {given!r} pending on the default pool")
            return None
        if cmd == "store":
            print(orchestra_nb.store.report())
            return None
        if cmd == "shutdown":
            orchestra_nb.shutdown(cancel_pending=True)
            print("orchestra: the default pool is shut down")
            return None
        print(_LINE_HELP)
        return None

    def _cell(self, line: str, cell: str) -> Any:
        """Reached only without the input transformer (e.g. ``run_cell_magic``): blocking."""
        coro = run_cell(line, cell)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        # Inside a running loop (a kernel): run on a private loop in a thread.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()
