"""Workload names, sizes (full and quick) and the targets of performance.md."""

from __future__ import annotations

from dataclasses import dataclass

WORKLOADS = (
    "raw",
    "cold",
    "rtt",
    "map",
    "submit",
    "scaling",
    "transfer",
    "lag",
    "main",
    "scale",
    "joblib",
    "widget",
    "smallmaps",
    "broadcast",
    "montecarlo",
)
#: Systems that are joblib backends (the joblib workload skips the others).
JOBLIB_BACKENDS = {"orchestra": "orchestra", "loky": "loky"}
#: Workloads that push thousands of tasks through one system: slow systems run them once.
HEAVY = frozenset({"map", "submit", "lag", "smallmaps", "montecarlo"})
#: Workloads run for some systems only (others are not started for them). ``raw`` measures
#: the machine, once, in the first system's slot (the system is not used).
ONLY_SYSTEMS: dict[str, tuple[str, ...]] = {
    "widget": ("orchestra",),
    "broadcast": ("orchestra", "ppe_forkserver", "loky", "mp_pool", "dask"),
}
MACHINE_WORKLOADS = frozenset({"raw"})
#: The broadcast comparison of record (issue #17: against joblib's loky memmapping) runs
#: every repetition; the other systems, which pickle the array per chunk, run once.
BROADCAST_RECORD = frozenset({"orchestra", "loky"})
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
    scale_items: int = 10_000_000
    #: Slow systems (ipyparallel, dask) stream this many instead: 10M would take minutes.
    scale_items_slow: int = 200_000
    #: joblib workload: tiny ``delayed`` calls in one ``Parallel`` call.
    joblib_calls: int = 10_000
    #: Wait this long for one __main__ case before calling it a hang.
    main_timeout_s: float = 10.0
    #: Raw limits of the machine: ZeroMQ ipc round trips, and the size of the memcpy.
    raw_round_trips: int = 2000
    raw_copy_mb: int = 64
    #: Widget on: one awaited map of this many items in a real kernel, per mode and repetition.
    widget_items: int = 10_000
    widget_repeat: int = 5
    #: Many small maps: this many sequential maps of ``small_map_items`` each.
    small_maps: int = 200
    small_map_items: int = 50
    #: Broadcast argument: one array of this size used by every item of a map.
    broadcast_mb: int = 256
    broadcast_items: int = 100
    #: Realistic CPU work: numpy Monte Carlo tasks of this many samples each (a fixed
    #: amount of work: about 50 ms on the machine of the reference runs).
    mc_tasks: int = 64
    mc_samples: int = 5_000_000
    #: Wall-clock budget of one (system, workload) subprocess; slow systems get 3x.
    group_timeout_s: float = 240.0


FULL = Sizes()
QUICK = Sizes(
    map_items=5000,
    submit_items=5000,
    scaling_task_s=0.1,
    lag_items=5000,
    scale_items=200_000,
    scale_items_slow=50_000,
    joblib_calls=2_000,
    raw_round_trips=300,
    raw_copy_mb=16,
    widget_items=2_000,
    widget_repeat=2,
    small_maps=20,
    broadcast_mb=16,
    broadcast_items=20,
    mc_tasks=8,
    mc_samples=1_000_000,
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
    "raw": (
        Metric("zmq_rtt_med_us", "ZeroMQ ipc round trip median (us)", False, "us"),
        Metric("zmq_rtt_p99_us", "ZeroMQ ipc round trip p99 (us)", False, "us"),
        Metric("memcpy_mb_s", "memcpy MB/s", True),
    ),
    "widget": (
        Metric("widget_s", "awaited map, progress widget (s)", False, "s"),
        Metric("none_s", 'awaited map, progress="none" (s)', False, "s"),
        Metric("widget_ratio", "widget / none", False, "x"),
    ),
    "smallmaps": (
        Metric("per_map_ms", "per map (ms)", False, "ms"),
        Metric("total_s", "all maps (s)", False, "s"),
    ),
    "broadcast": (
        Metric("captured_s", "captured by the function (s)", False, "s"),
        Metric("captured_copies", "captured: copies read per worker", False, "x"),
        Metric("argument_s", "same argument to every item (s)", False, "s"),
        Metric("argument_copies", "argument: copies read per worker", False, "x"),
    ),
    "montecarlo": (
        Metric("speedup", "speedup", True, "x"),
        Metric("parallel_s", "parallel (s)", False, "s"),
        Metric("serial_s", "serial (s)", False, "s"),
    ),
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

#: Verdict of a row whose goal is to be ahead of the best peer (ratio >= 1).
AHEAD = "ahead"

#: Summary rows: (workload, metric, target text, verdict). The verdict is a predicate on
#: orchestra's median, AHEAD, or None (shown, not judged). A metric "a/b" is orchestra's
#: ``a`` over the machine's raw ``b`` measured in the same run (workload "raw"). Targets
#: are issue #17's goals where it set one.
TARGETS: tuple[tuple[str, str, str, object], ...] = (
    ("cold", "cold_s", "<= 0.05 s", lambda v: v <= 0.05),
    ("cold", "warm_first_call_s", "<= 0.02 s", lambda v: v <= 0.02),
    ("rtt", "await_med_us", "<= 150 us", lambda v: v <= 150),
    ("rtt", "await_med_us/zmq_rtt_med_us", "<= 1.5x raw ZeroMQ ipc", lambda v: v <= 1.5),
    ("rtt", "await_p99_us", "<= 400 us", lambda v: v <= 400),
    ("map", "default_items_s", "ahead of every peer", AHEAD),
    ("map", "chunk_items_s", "-", None),
    ("submit", "tasks_s", ">= 50,000 tasks/s", lambda v: v >= 50_000),
    ("scaling", "speedup", ">= 1.9x", lambda v: v >= 1.9),
    ("transfer", "send_mb_s", ">= 5,000 MB/s", lambda v: v >= 5000),
    ("transfer", "send_mb_s/memcpy_mb_s", "- (memcpy: one copy)", None),
    ("transfer", "return_mb_s", ">= 5,000 MB/s", lambda v: v >= 5000),
    ("lag", "lag_p99_ms", "<= 0.5 ms", lambda v: v <= 0.5),
    ("lag", "lag_max_ms", "<= 10 ms", lambda v: v <= 10),
    # A stream of 10,000,000 results consumed as they come grows the parent by what is
    # in flight only (the results kept in a list would take ~400 MB).
    ("scale", "rss_growth_mb", "<= 16 MB", lambda v: v <= 16),
    # The joblib backend against loky's, both warm: the goal is a ratio above 1.
    ("joblib", "tiny_calls_s", "ahead of loky", AHEAD),
    ("joblib", "gridsearch_s", "ahead of loky", AHEAD),
    ("joblib", "first_call_s", "-", None),
    ("widget", "widget_ratio", "<= 1.1x", lambda v: v <= 1.1),
    ("smallmaps", "per_map_ms", "ahead of every peer", AHEAD),
    ("broadcast", "captured_s", "ahead of joblib (loky memmapping)", AHEAD),
    ("broadcast", "captured_copies", "crosses once: <= 1.1 copies", lambda v: v <= 1.1),
    ("broadcast", "argument_s", "ahead of joblib (loky memmapping)", AHEAD),
    ("montecarlo", "speedup", ">= 1.94x (within 3% of 2)", lambda v: v >= 1.94),
    ("montecarlo", "parallel_s", "ahead of every peer", AHEAD),
)
