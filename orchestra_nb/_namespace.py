"""The worker's ``%%orchestra`` namespace, and shipped functions reading it (layer 1).

``%%orchestra`` cells run in one module-level namespace per worker process
(``__orchestra_main__``), so a ``%%orchestra --all`` setup cell can load a table once per
worker. A function defined in the notebook and shipped by ``map`` travels with the notebook
globals it uses (cloudpickle copies them); a name it uses that the notebook does not have
is looked up in this namespace instead.

The rule: **values shipped from the notebook win**; a name the notebook does not define
comes from the worker's ``%%orchestra`` namespace, read afresh before each chunk of work
(a setup cell run again is seen by the next chunk). A name defined in neither place raises
``NameError`` with a note saying where it was looked for.
"""

from __future__ import annotations

import builtins
import sys
import types
from typing import Any

__all__ = ["MODULE_NAME", "NamespaceLink", "link", "namespace"]

MODULE_NAME = "__orchestra_main__"

NOT_FOUND_NOTE = (
    "orchestra looked for {name!r} in the notebook's globals shipped with the function and "
    "in this worker's %%orchestra namespace ({module}); define it in the notebook, or in a "
    "%%orchestra --all cell that runs on every worker"
)


def namespace() -> dict[str, Any]:
    """The worker's persistent ``%%orchestra`` namespace (a module's ``__dict__``)."""
    module = sys.modules.get(MODULE_NAME)
    if module is None:
        module = types.ModuleType(MODULE_NAME, "namespace of %%orchestra cells in this worker")
        module.__dict__["__builtins__"] = builtins
        sys.modules[MODULE_NAME] = module  # classes defined in cells pickle by reference here
    return module.__dict__


class NamespaceLink:
    """The global names a loaded function uses but did not bring, filled from the
    namespace into its globals before each chunk."""

    __slots__ = ("globals", "names")

    def __init__(self, fn_globals: dict[str, Any], names: frozenset[str]) -> None:
        self.globals = fn_globals
        self.names = names

    def refresh(self) -> None:
        module = sys.modules.get(MODULE_NAME)
        if module is None:
            return
        ns = module.__dict__
        g = self.globals
        for name in self.names:
            if name in ns:
                g[name] = ns[name]
            else:
                g.pop(name, None)

    def explain(self, exc: BaseException) -> None:
        """Add where a missing name was looked for to a NameError about one of ours."""
        name = getattr(exc, "name", None)
        if isinstance(exc, NameError) and name in self.names:
            exc.add_note(NOT_FOUND_NOTE.format(name=name, module=MODULE_NAME))


def link(fn: object) -> NamespaceLink | None:
    """For a function shipped from a notebook (``__main__``): the link to the namespace of
    the names it uses and did not bring, or None when it brought them all."""
    func = getattr(fn, "__func__", fn)  # a bound method: its function
    if not isinstance(func, types.FunctionType) or func.__module__ != "__main__":
        return None
    g = func.__globals__
    names: set[str] = set()
    seen: set[int] = set()
    stack: list[types.FunctionType] = [func]
    while stack:
        f = stack.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        for name in _global_names(f.__code__):
            value = f.__globals__.get(name)
            if isinstance(value, types.FunctionType):
                if value.__globals__ is g:
                    stack.append(value)  # a helper from the same notebook: its names too
            elif f.__globals__ is g and name not in g and not hasattr(builtins, name):
                names.add(name)  # (attribute names are in co_names too: harmless extras)
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, types.FunctionType) and value.__globals__ is g:
                stack.append(value)
    return NamespaceLink(g, frozenset(names)) if names else None


def _global_names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _global_names(const)
    return out
