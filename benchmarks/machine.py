"""What the numbers were measured on: date, machine, Python and package versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

PACKAGES = (
    "orchestra_nb",
    "numpy",
    "loky",
    "ipyparallel",
    "dask",
    "distributed",
    "pyzmq",
    "cloudpickle",
    "psutil",
    "tornado",
    "msgspec",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, Any]:
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    return {
        "date": date,
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": round(_ram_gib(), 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_build": f"{platform.python_implementation()} {sys.version}",
        "packages": {name: _version(name) for name in PACKAGES},
        "all_packages": sorted(
            f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
        ),
    }
