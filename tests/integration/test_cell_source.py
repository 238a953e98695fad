"""Tracebacks of cell-defined functions show their source lines, whatever cloudpickle does.

A notebook cell's code names a file that exists only in the kernel's ``linecache``, and
cloudpickle 3.1.3+ renames every shipped code object's file to ``<dynamic-code>``. The
check runs in a fresh interpreter per cloudpickle version: the newest (installed) and the
oldest the project allows (pip-downloaded wheel on ``PYTHONPATH``), with real workers that
import the same cloudpickle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import orchestra_nb

ROOT = Path(orchestra_nb.__file__).resolve().parent.parent

# What a cell does: code compiled under a file name only linecache knows (ipykernel's
# naming), functions in __main__, a map whose item 3 fails two frames deep.
SCRIPT = r'''
import linecache, sys, cloudpickle, __main__
import orchestra_nb as orchestra
CELL = "/tmp/ipykernel_0/4242.py"
src = """def inner(x):
    scale = 10
    return scale / (x - 3)
def outer(x):
    return inner(x) + 1
"""
linecache.cache[CELL] = (len(src), None, src.splitlines(True), CELL)
exec(compile(src, CELL, "exec"), __main__.__dict__)
with orchestra.Pool(workers=1) as pool:
    print("worker cloudpickle", pool.run(lambda: __import__("cloudpickle").__version__).result(60))
    try:
        pool.map(outer, range(5)).result(60)
    except ZeroDivisionError as exc:
        import traceback
        print("".join(traceback.format_exception(exc)))
print("parent cloudpickle", cloudpickle.__version__)
'''


def _oldest_allowed() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"cloudpickle>=([0-9.]+),', pyproject)
    assert match, "pyproject.toml must pin a cloudpickle range (>=low,<high)"
    return match.group(1)


@pytest.fixture(scope="module")
def old_cloudpickle(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    version = _oldest_allowed()
    where = tmp_path_factory.mktemp("cloudpickle-old")
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(where),
            f"cloudpickle=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert download.returncode == 0, download.stdout + download.stderr
    (wheel,) = where.glob("cloudpickle-*.whl")
    site = where / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return version, site


def _run(old_site: Path | None) -> str:
    # An old cloudpickle comes first on the path, so that it shadows the installed one in
    # this interpreter and in the workers it starts (they inherit the environment).
    path = [str(old_site)] if old_site else []
    path += [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_source_shown(out: str) -> None:
    remote = out.split("The above exception")[0]
    assert 'File "/tmp/ipykernel_0/4242.py", line 5, in outer' in remote, out
    assert "return inner(x) + 1" in remote, out
    assert "return scale / (x - 3)" in remote, out
    assert "<dynamic-code>" not in out, out


def test_newest_cloudpickle_ships_cell_source() -> None:
    import cloudpickle

    out = _run(None)
    assert f"worker cloudpickle {cloudpickle.__version__}" in out
    _assert_source_shown(out)


def test_oldest_allowed_cloudpickle_ships_cell_source(old_cloudpickle: tuple[str, Path]) -> None:
    version, site = old_cloudpickle
    out = _run(site)
    assert f"worker cloudpickle {version}" in out and f"parent cloudpickle {version}" in out, out
    _assert_source_shown(out)
