"""What a ``%%orchestra`` cell runs inside a worker (importable without IPython).

The cell's code travels as a string and is executed in one module-level namespace per
worker process, so that names defined by a ``%%orchestra --all`` setup cell stay available
to every later ``%%orchestra`` cell on that worker (and are replayed on workers started
later). The code is registered in ``linecache`` so that a traceback from the worker shows
the cell's source lines.
"""

from __future__ import annotations

import ast
import linecache
from typing import Any

from .._namespace import MODULE_NAME, namespace

__all__ = ["MODULE_NAME", "namespace", "orchestra_cell", "orchestra_cell_value"]

def orchestra_cell(
    code: str, filename: str, names: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Any]]:
    """Run ``code`` in the namespace; return (value of a trailing expression, {name: value}).

    Like a notebook cell: if the last statement is an expression, its value is returned
    (``None`` otherwise). ``names`` are read from the namespace afterwards; a missing one
    raises ``NameError`` naming it.
    """
    ns = namespace()
    lines = code.splitlines(keepends=True)
    linecache.cache[filename] = (len(code), None, lines, filename)
    tree = ast.parse(code, filename, "exec")
    last: ast.expr | None = None
    if tree.body and isinstance(final := tree.body[-1], ast.Expr):
        tree.body.pop()
        last = final.value
    exec(compile(tree, filename, "exec"), ns)
    value = None
    if last is not None:
        value = eval(compile(ast.Expression(last), filename, "eval"), ns)
    out: dict[str, Any] = {}
    for name in names:
        if name not in ns:
            raise NameError(
                f"%%orchestra -o {name}: the cell did not define {name!r} in the worker"
            )
        out[name] = ns[name]
    return value, out


def orchestra_cell_value(code: str, filename: str) -> Any:
    """``%%orchestra --bg``: the value of the cell's trailing expression (or None)."""
    return orchestra_cell(code, filename)[0]
