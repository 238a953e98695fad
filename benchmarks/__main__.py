"""``python -m benchmarks``: run the workloads for orchestra_nb and its peers in one run.

Every (workload, system) pair runs in its own subprocess (benchmarks.runner) with a time
limit; a hung or crashed peer costs its own cell only, and everything it started is killed
by pid. See ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import machine, report, workloads
from benchmarks.config import FULL, MACHINE_WORKLOADS, ONLY_SYSTEMS, QUICK, QUICK_SYSTEMS, WORKLOADS
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import REPO_ROOT, kill_tree, subprocess_env

RUNNER = "from benchmarks.runner import cli; cli()"
DEFAULT_OUTPUT = Path("benchmarks/results/latest.md")


def csv_list(valid: tuple[str, ...] | list[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in valid]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(valid)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, smaller sizes (~1 min); without --systems it skips"
        " ipyparallel, dask and the fork reference rows",
    )
    ap.add_argument("--workloads", type=csv_list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument(
        "--systems",
        type=csv_list(list(SYSTEMS)),
        default=None,
        help=f"default: all of {','.join(SYSTEMS)}",
    )
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per workload (default 3, quick 1)")
    ap.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="markdown report; a .json with the raw numbers is written beside it",
    )
    args = ap.parse_args(argv)
    if args.systems is None:
        args.systems = list(QUICK_SYSTEMS) if args.quick else list(SYSTEMS)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


def run_group(system: str, workload: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one group in a subprocess; never raises."""
    out = tmp / f"{workload}-{system}.json"
    sizes = QUICK if args.quick else FULL
    limit = sizes.group_timeout_s * (3 if SYSTEMS[system].slow else 1) * max(1, args.repeat / 3)
    cmd = [
        sys.executable,
        "-c",
        RUNNER,
        "--system",
        system,
        "--workload",
        workload,
        "--repeat",
        str(args.repeat),
        "--out",
        str(out),
    ] + (["--quick"] if args.quick else [])
    log = tmp / f"{workload}-{system}.log"
    with log.open("w") as log_f:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=log_f, stderr=subprocess.STDOUT
        )
        try:
            proc.wait(timeout=limit)
            status = None if proc.returncode == 0 else f"failed: runner exited with {proc.returncode}"
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # the runner and every pool process it started
            proc.wait()
            status = f"failed: timeout after {limit:.0f} s"
    try:
        cell: dict[str, Any] = json.loads(out.read_text())
    except (OSError, ValueError):
        cell = {"status": "ok", "metrics": {}, "errors": {}, "cases": {}, "notes": []}
        if status is None:
            status = "failed: runner wrote no result"
    if status is not None:
        if cell["metrics"] or cell["cases"]:
            cell["notes"].append(status.removeprefix("failed: ") + "; partial results kept")
        else:
            cell["status"] = status
        tail = log.read_text().strip().splitlines()[-3:]
        cell["log_tail"] = tail
    return cell


def systems_for(workload: str, systems: list[str]) -> list[str]:
    """The systems a workload runs for: the machine's own figures once (in the first
    system's slot, reported as the machine's), some workloads for a few systems only."""
    if workload in MACHINE_WORKLOADS:
        return systems[:1]
    only = ONLY_SYSTEMS.get(workload)
    return [s for s in systems if only is None or s in only]


def leftover_children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    meta = machine.describe()
    workloads.precompile()
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orchestra-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for workload in args.workloads:
            results[workload] = {}
            for system in systems_for(workload, args.systems):
                t0 = time.perf_counter()
                cell = run_group(system, workload, args, tmp)
                results[workload]["machine" if workload in MACHINE_WORKLOADS else system] = cell
                print(
                    f"[{time.perf_counter() - t_start:6.1f}s] {workload:9s} {system:15s} "
                    f"{time.perf_counter() - t0:5.1f}s  {cell['status']}",
                    file=sys.stderr,
                    flush=True,
                )
    leaked = leftover_children()
    for p in leaked:
        kill_tree(p.pid)
    config = {
        "command": command.strip(),
        "quick": args.quick,
        "repeat": args.repeat,
        "systems": args.systems,
        "workloads": args.workloads,
        "elapsed_s": time.perf_counter() - t_start,
        "leaked_processes": len(leaked),
    }
    report.write(args.output, meta, config, results)
    print(
        f"wrote {args.output} and {args.output.with_suffix('.json')} ({config['elapsed_s']:.0f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
