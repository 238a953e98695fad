"""The public namespace: ``__all__`` sorted, every name resolvable, and in step with the
lazy export table and the TYPE_CHECKING imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import orchestra_nb

HOOKS = {"load_ipython_extension", "unload_ipython_extension"}


def test_all_sorted_and_unique() -> None:
    assert orchestra_nb.__all__ == sorted(orchestra_nb.__all__)
    assert len(set(orchestra_nb.__all__)) == len(orchestra_nb.__all__)


def test_all_matches_export_table() -> None:
    assert set(orchestra_nb.__all__) == set(orchestra_nb._EXPORTS) | HOOKS


@pytest.mark.parametrize("name", sorted(orchestra_nb._EXPORTS))
def test_every_name_resolves_to_its_module(name: str) -> None:
    module = importlib.import_module(f"orchestra_nb.{orchestra_nb._EXPORTS[name]}")
    value = getattr(orchestra_nb, name)
    assert value is getattr(module, name)
    assert name in dir(orchestra_nb)


def test_hooks_resolve() -> None:
    for name in HOOKS:
        assert callable(getattr(orchestra_nb, name))


def test_unknown_name() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        orchestra_nb.nope  # noqa: B018


def test_type_checking_imports_match_export_table() -> None:
    tree = ast.parse(Path(orchestra_nb.__file__).read_text())
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    assert alias.asname == alias.name  # explicit re-export
                    imported[alias.name] = (stmt.module or "").lstrip(".")
    assert imported == orchestra_nb._EXPORTS


def test_exported_names_are_in_their_modules_all() -> None:
    for name, module_name in orchestra_nb._EXPORTS.items():
        module = importlib.import_module(f"orchestra_nb.{module_name}")
        assert name in getattr(module, "__all__", ()), f"{name} missing from {module_name}.__all__"
