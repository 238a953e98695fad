"""Registry of benchmarked systems (adapters with one common interface, see base.py)."""

from __future__ import annotations

from benchmarks.systems.base import System
from benchmarks.systems.dask_ import Dask
from benchmarks.systems.ipp import IPyParallel
from benchmarks.systems.loky_ import Loky
from benchmarks.systems.orchestra import Orchestra
from benchmarks.systems.stdlib import MPPoolFork, MPPoolForkserver, PPEFork, PPEForkserver

#: Display order of the rows.
SYSTEMS: dict[str, type[System]] = {
    cls.key: cls
    for cls in (
        Orchestra,
        PPEForkserver,
        Loky,
        MPPoolForkserver,
        IPyParallel,
        Dask,
        PPEFork,
        MPPoolFork,
    )
}

__all__ = ["SYSTEMS", "System"]
