"""Workload names, sizes (full and quick) and the targets of performance.md."""

from __future__ import annotations

from dataclasses import dataclass

WORKLOADS = ("cold", "rtt", "map", "submit", "scaling", "transfer", "lag", "main", "scale", "joblib")
#: Systems that are joblib backends (the joblib workload skips the others).
JOBLIB_BACKENDS = {"orchestra": "orchestra", "loky": "loky"}
#: Workloads that push thousands of tasks through one system: slow systems run them once.
HEAVY = frozenset({"map", "submit", "lag"})
QUICK_SYSTEMS = ("orchestra", "ppe_forkserver", "loky", "mp_pool")


@dataclass(frozen=True)
class Sizes:
    rtt_calls: int = 500
    map_items: int = 20_000
    map_chunksize: int = 2500
    submit_items: int = 20_000
    scaling_tasks: int = 8
    scaling_task_s: float = 0.25
    transfer_mb: int = 64
    lag_items: int = 20_000
    lag_tick_s: float = 0.001
    scale_items: int = 1_000_000
    #: joblib workload: tiny ``delayed`` calls in one ``Parallel`` call.
    joblib_calls: int = 10_000
    #: Wait this long for one __main__ case before calling it a hang.
    main_timeout_s: float = 10.0
    #: Wall-clock budget of one (system, workload) subprocess; slow systems get 3x.
    group_timeout_s: float = 240.0


FULL = Sizes()
QUICK = Sizes(
    map_items=5000,
    submit_items=5000,
    scaling_task_s=0.1,
    lag_items=5000,
    scale_items=200_000,
    joblib_calls=2_000,
    main_timeout_s=3.0,
    group_timeout_s=60.0,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    unit: str = ""


#: Columns of each workload's table, in order.
METRICS: dict[str, tuple[Metric, ...]] = {
    "cold": (
        Metric("cold_s", "cold start (s)", False, "s"),
        Metric("warm_first_call_s", "first call on a warmed pool (s)", False, "s"),
    ),
    "rtt": (
        Metric("await_med_us", "await median (us)", False, "us"),
        Metric("await_p99_us", "await p99 (us)", False, "us"),
        Metric("sync_med_us", "sync median (us)", False, "us"),
        Metric("sync_p99_us", "sync p99 (us)", False, "us"),
    ),
    "map": (
        Metric("default_items_s", "items/s default", True),
        Metric("chunk_items_s", "items/s chunksize=2500", True),
    ),
    "submit": (Metric("tasks_s", "tasks/s", True),),
    "scaling": (
        Metric("speedup", "speedup", True, "x"),
        Metric("parallel_s", "parallel (s)", False, "s"),
        Metric("serial_s", "serial (s)", False, "s"),
    ),
    "transfer": (
        Metric("send_mb_s", "send MB/s", True),
        Metric("return_mb_s", "return MB/s", True),
    ),
    "lag": (
        Metric("lag_p99_ms", "lag p99 (ms)", False, "ms"),
        Metric("lag_max_ms", "lag max (ms)", False, "ms"),
        Metric("map_s", "map wall (s)", False, "s"),
    ),
    "main": (),
    "joblib": (
        Metric("tiny_calls_s", "Parallel of tiny calls (s)", False, "s"),
        Metric("gridsearch_s", "GridSearchCV, 20 candidates (s)", False, "s"),
        Metric("first_call_s", "first Parallel call of the session (s)", False, "s"),
    ),
    "scale": (
        Metric("wall_s", "wall (s)", False, "s"),
        Metric("items_s", "items/s", True),
        Metric("rss_growth_mb", "peak RSS growth (MB)", False, "MB"),
    ),
}

MAIN_CASES = ("def_after_start", "def_before_start", "lambda", "closure")

#: Summary rows: (workload, metric, target text, predicate on orchestra's median).
TARGETS: tuple[tuple[str, str, str, object], ...] = (
    ("cold", "cold_s", "<= 0.15 s", lambda v: v <= 0.15),
    ("cold", "warm_first_call_s", "<= 0.02 s", lambda v: v <= 0.02),
    ("rtt", "await_med_us", "<= 150 us", lambda v: v <= 150),
    ("rtt", "await_p99_us", "<= 400 us", lambda v: v <= 400),
    ("map", "default_items_s", ">= 1,000,000 items/s", lambda v: v >= 1_000_000),
    ("map", "chunk_items_s", "-", None),
    ("submit", "tasks_s", ">= 50,000 tasks/s", lambda v: v >= 50_000),
    ("scaling", "speedup", ">= 1.9x", lambda v: v >= 1.9),
    ("transfer", "send_mb_s", ">= 3,000 MB/s", lambda v: v >= 3000),
    ("transfer", "return_mb_s", ">= 3,000 MB/s", lambda v: v >= 3000),
    ("lag", "lag_p99_ms", "<= 2 ms", lambda v: v <= 2),
    ("lag", "lag_max_ms", "<= 10 ms", lambda v: v <= 10),
    # Growth bound: 1,000,000 int results held in a list take about 36 MB; streamed
    # consumption must stay well under that.
    ("scale", "rss_growth_mb", "completes; growth <= 64 MB", lambda v: v <= 64),
    # The joblib backend against loky's, both warm: the goal is a ratio above 1.
    ("joblib", "tiny_calls_s", "ahead of loky", None),
    ("joblib", "gridsearch_s", "ahead of loky", None),
    ("joblib", "first_call_s", "-", None),
)
