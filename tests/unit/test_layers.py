"""The layer rule: a module imports only from its own layer or below, and importing the
package (or the worker) loads no IPython, ipywidgets or dask.

    L0  pure: exceptions, states, events, wire protocol, pickling, policies
    L1  the worker process
    L2  the pool: I/O thread, event bus, task tables, supervisor
    L3  the public API and handles; ``executor`` (a concurrent.futures Executor on the API)
    L4  the notebook layer (magics, widgets); ``testing`` (fault-injection tools) and
        ``joblib`` (a joblib backend) sit on top of the public API too

Imports under ``if TYPE_CHECKING:`` do not count (they never run).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import orchestra_nb

PACKAGE = Path(orchestra_nb.__file__).resolve().parent

LAYERS = {
    "_exceptions": 0, "_state": 0, "_events": 0, "_protocol": 0, "_serialize": 0, "_shared": 0,
    "_policy": 0, "_circuit": 0, "_spin": 0, "_stats": 0, "_fingerprint": 0, "_indexed": 0,
    "_outcomes": 0, "_waiting": 0,
    "_worker": 1, "_namespace": 1,
    "_ioloop": 2, "_bus": 2, "_jobs": 2, "_procs": 2, "_prespawn": 2, "_pool": 2, "_pool_wire": 2,
    "_pool_workers": 2, "_pool_dispatch": 2, "_pool_results": 2, "_pool_recovery": 2,
    "_feed": 2, "_table": 2, "backends": 2, "backends._base": 2, "backends._caller": 2,
    "backends.local": 2, "backends.inline": 2, "backends.dask": 2, "backends._dask_worker": 2,
    "_api": 3, "_handles": 3, "_callbacks": 3, "_driver": 3, "_pipeline": 3, "_schedule": 3,
    "executor": 3, "_store": 2, "_cache": 3, "store": 3, "joblib": 4,
}
NOTEBOOK_LAYER = 4


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    if name.split(".")[0] in ("notebook", "testing"):
        return NOTEBOOK_LAYER
    return LAYERS.get(name)


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported orchestra_nb module) for every import that can run."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package_parts = here[:-1] if path.name != "__init__.py" else here
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if node.module:
                    out.append((node.lineno, ".".join(target)))
                else:  # from . import _protocol
                    out.extend((node.lineno, ".".join([*target, a.name])) for a in node.names)
            elif node.module and node.module.split(".")[0] == "orchestra_nb":
                rest = node.module.split(".")[1:]
                if rest:
                    out.append((node.lineno, ".".join(rest)))
                else:
                    out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "orchestra_nb" and len(parts) > 1:
                    out.append((node.lineno, ".".join(parts[1:])))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def test_every_module_has_a_layer() -> None:
    unplaced = [module_name(p) for p in modules() if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules without a layer (add them to the map): {unplaced}"


@pytest.mark.parametrize("path", modules(), ids=module_name)
def test_no_upward_imports(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    if mine is None:
        pytest.skip(f"{me} has no layer (see test_every_module_has_a_layer)")
    bad = []
    for line, target in runtime_imports(path):
        theirs = layer_of(target.split(".")[0]) if target.split(".")[0] in LAYERS else layer_of(target)
        if theirs is not None and theirs > mine:
            bad.append(f"line {line}: {me} (L{mine}) imports {target} (L{theirs})")
    assert not bad, "\n".join(bad)


# What the layers above the backends may import from layer 2: the interface, the backend
# registry, the task table, the event bus and the input feeder; never an implementation.
BACKEND_NEUTRAL = {"_bus", "_jobs", "_feed", "_store", "backends", "backends._base"}


@pytest.mark.parametrize("path", [p for p in modules() if (layer_of(module_name(p)) or 0) >= 3],
                         ids=module_name)
def test_upper_layers_see_the_backend_interface_only(path: Path) -> None:
    me = module_name(path)
    bad = [f"line {line}: {me} imports {target}" for line, target in runtime_imports(path)
           if layer_of(target) == 2 and target not in BACKEND_NEUTRAL]
    assert not bad, "\n".join(bad)


# The local pool's engine: its core and parts, and the caller fast path. Only the local
# backend imports them (and they each other); of the tests, only tests/local/.
LOCAL_ENGINE = {"_pool", "_pool_wire", "_pool_workers", "_pool_dispatch", "_pool_results",
                "_pool_recovery", "backends._caller"}
TESTS = PACKAGE.parent / "tests"


@pytest.mark.parametrize("path", modules(), ids=module_name)
def test_only_the_local_backend_imports_its_engine(path: Path) -> None:
    me = module_name(path)
    if me in LOCAL_ENGINE or me == "backends.local":
        return
    bad = [f"line {line}: {me} imports {target}" for line, target in runtime_imports(path)
           if target in LOCAL_ENGINE]
    assert not bad, "\n".join(bad)


def engine_imports_in(path: Path) -> list[str]:
    """Imports of the local engine in a test file (any import, TYPE_CHECKING ones too)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestra_nb"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("orchestra_nb.") and name.removeprefix("orchestra_nb.") in LOCAL_ENGINE:
                bad.append(f"{path}:{node.lineno} imports {name}")
                break
    return bad


@pytest.mark.skipif(not TESTS.is_dir(), reason="the tests are not next to the package")
def test_only_the_local_backends_tests_import_its_engine() -> None:
    files = [p for p in TESTS.rglob("*.py") if TESTS / "local" not in p.parents]
    bad = [line for p in files for line in engine_imports_in(p)]
    assert not bad, "\n".join(bad)


def test_the_test_checker_sees_engine_imports(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("from orchestra_nb._pool_dispatch import MAX_CHUNK\n"
                      "import orchestra_nb.backends._caller\nfrom orchestra_nb import _jobs\n")
    assert len(engine_imports_in(sample)) == 2


def test_the_checker_sees_imports() -> None:
    """Guard against a checker that silently finds nothing."""
    found = dict(runtime_imports(PACKAGE / "_pool.py"))
    assert "_protocol" in found.values() and "_jobs" in found.values()
    assert "_pool" not in dict(runtime_imports(PACKAGE / "_handles.py")).values()  # TYPE_CHECKING
    assert "_pool" in dict(runtime_imports(PACKAGE / "backends" / "local.py")).values()


HEAVY = ("IPython", "ipywidgets", "ipykernel", "dask", "distributed", "joblib", "sklearn")


def loaded_modules(code: str, wanted: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the loaded modules that ``wanted`` (an
    expression over ``m``, a module name) selects."""
    script = f"import json, sys\n{code}print(json.dumps(sorted(m for m in sys.modules if {wanted})))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_loads_no_notebook_stack() -> None:
    code = (
        "import orchestra_nb\n"
        "orchestra_nb.Pool, orchestra_nb.map, orchestra_nb.TaskState, orchestra_nb.RetryPolicy\n"
        "orchestra_nb.Executor\n"
        "import orchestra_nb._worker\n"
    )
    assert loaded_modules(code, f"m.split('.')[0] in {HEAVY!r}") == []


def test_using_a_pool_loads_no_notebook_stack() -> None:
    code = (
        "import orchestra_nb as orchestra\n"
        "with orchestra.Pool(workers=1) as p:\n"
        "    assert p.map(abs, [-1, -2]).result(60) == [1, 2]\n"
        "    with orchestra.Executor(pool=p) as ex:\n"
        "        assert ex.submit(abs, -3).result(60) == 3\n"
    )
    assert loaded_modules(code, f"m.split('.')[0] in {HEAVY!r}") == []


def test_an_uncached_pool_loads_no_result_store() -> None:
    # The store's sqlite3 and importlib.metadata cost tens of ms of every cold start; only a
    # call that asks for the cache may pay for them.
    code = (
        "import orchestra_nb as orchestra\n"
        "orchestra.configure(workers=1)\n"
        "with orchestra.Pool(workers=1) as p:\n"
        "    assert p.map(abs, [-1, -2]).result(60) == [1, 2]\n"
        "    assert p.run(abs, -3).result(60) == 3\n"
        "orchestra.shutdown()\n"
    )
    store = ("sqlite3", "importlib.metadata", "orchestra_nb._cache", "orchestra_nb._store")
    assert loaded_modules(code, f"m in {store!r}") == []
