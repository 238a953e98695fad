"""Smoke check of the benchmark suite, for the test suite to call.

``run_smoke(tmp_path)`` runs a small quick benchmark in a subprocess and returns the path of
the markdown report (a ``.json`` with the raw numbers lies beside it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.workloads import REPO_ROOT, subprocess_env

#: The workloads issue #17 added, each of which must produce its rows in quick mode.
NEW_WORKLOADS = ("raw", "widget", "smallmaps", "broadcast", "montecarlo")

SMOKE_ARGS = (
    "--quick",
    "--systems",
    "orchestra,ppe_forkserver",
    "--workloads",
    "raw,rtt,map,main,scale,widget,smallmaps,broadcast,montecarlo",
    "--repeat",
    "1",
)


def run_smoke(tmp_path: Path, timeout: float = 300) -> Path:
    out = Path(tmp_path) / "r.md"
    subprocess.run(
        [sys.executable, "-m", "benchmarks", *SMOKE_ARGS, "--output", str(out)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    if not out.exists() or not out.with_suffix(".json").exists():
        raise RuntimeError(f"benchmark smoke run wrote no report at {out}")
    return out
