"""Markdown and JSON reports from the raw results of one run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.config import AHEAD, FULL, MAIN_CASES, METRICS, QUICK, TARGETS, Metric, Sizes
from benchmarks.systems import SYSTEMS

#: For these orchestra metrics the peers are compared on whichever of their modes is best
#: (orchestra's await path against the peers' fastest path).
PEER_ALTERNATIVES = {
    "await_med_us": ("await_med_us", "sync_med_us"),
    "await_p99_us": ("await_p99_us", "sync_p99_us"),
    # broadcast: against the peer's better form (joblib memmaps arguments, not closures)
    "captured_s": ("captured_s", "argument_s"),
    "argument_s": ("captured_s", "argument_s"),
}
ALL_METRICS: dict[str, Metric] = {m.key: m for ms in METRICS.values() for m in ms}

METHOD = """\
How to read this: every figure is the median over the repetitions, with (min-max) when there
was more than one. 2 workers per pool. Each (system, workload) pair runs in its own fresh
interpreter started with `python -c`, so `__main__` has no file, as in a notebook kernel.
orchestra_nb is measured through its public `await` API on an asyncio loop; the peers through
their fastest synchronous path, except where a workload is about asyncio (event-loop lag and
the await columns of the round trip: concurrent.futures via `asyncio.wrap_future`,
multiprocessing.Pool via callbacks, loky like concurrent.futures, ipyparallel via
`wrap_future(AsyncResult)`, dask via a thread waiting on the synchronous Client). dask has no
chunksize: "chunksize=2500" is one task per 2,500-item chunk. Rows marked "reference" use fork,
which a notebook tool cannot use (performance.md); they never count as best peer.
"""


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def clean(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def median_of(cell: dict[str, Any] | None, key: str) -> float | None:
    if not cell or not cell.get("status", "").startswith("ok"):
        return None
    values = cell.get("metrics", {}).get(key)
    return statistics.median(values) if values else None


def cell_text(cell: dict[str, Any], key: str) -> str:
    if key in cell.get("errors", {}):
        return "failed: " + clean(cell["errors"][key])
    values = cell.get("metrics", {}).get(key)
    if not values:
        return "-"
    text = fmt(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt(min(values))}-{fmt(max(values))})"
    return text


def label(key: str) -> str:
    return "the machine (raw)" if key == "machine" else SYSTEMS[key].label


def raw_figure(results: dict[str, dict[str, Any]], key: str) -> float | None:
    """A raw limit of the machine measured in this run (workload ``raw``)."""
    return median_of(results.get("raw", {}).get("machine"), key)


def workload_table(name: str, cells: dict[str, dict[str, Any]]) -> list[str]:
    if name == "main":
        cols = [*MAIN_CASES, "lru_cache (orchestra only)"]
        lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for sys_key, cell in cells.items():
            if not cell["status"].startswith("ok"):
                row = [clean(cell["status"])] + ["-"] * (len(cols) - 1)
            else:
                cases = cell.get("cases", {})
                row = [clean(cases.get(c.split()[0], "-")) for c in cols]
            lines.append(f"| {label(sys_key)} | " + " | ".join(row) + " |")
        return lines
    metrics = [
        m
        for m in METRICS[name]
        if any(m.key in c.get("metrics", {}) or m.key in c.get("errors", {}) for c in cells.values())
    ]
    metrics = metrics or list(METRICS[name][:1])
    lines = [
        "| system | " + " | ".join(m.label for m in metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for sys_key, cell in cells.items():
        if not cell["status"].startswith("ok"):
            row = [clean(cell["status"])] + ["-"] * (len(metrics) - 1)
        else:
            row = [cell_text(cell, m.key) for m in metrics]
        lines.append(f"| {label(sys_key)} | " + " | ".join(row) + " |")
    return lines


def best_peer(results: dict[str, dict[str, Any]], workload: str, key: str) -> tuple[str, float, str] | None:
    """(system, median, metric used) of the best non-reference peer."""
    metric = ALL_METRICS[key]
    best: tuple[str, float, str] | None = None
    for sys_key, cell in results.get(workload, {}).items():
        if sys_key == "orchestra" or SYSTEMS[sys_key].reference:
            continue
        for alt in PEER_ALTERNATIVES.get(key, (key,)):
            v = median_of(cell, alt)
            if v is None:
                continue
            better = best is None or (v > best[1] if metric.higher_is_better else v < best[1])
            if better:
                best = (sys_key, v, alt)
    return best


def failure_text(cell: dict[str, Any] | None, key: str) -> str | None:
    """Why a cell has no figure: the group's status or the metric's own error."""
    if cell is None:
        return None
    if not cell["status"].startswith("ok"):
        return clean(cell["status"])
    return cell_text(cell, key)


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for workload, key, target, ok in TARGETS:
        if workload not in results:
            continue
        key, _, raw_key = key.partition("/")
        metric = ALL_METRICS[key]
        orch_cell = results[workload].get("orchestra")
        orch = median_of(orch_cell, key)
        peer = best_peer(results, workload, key)
        ratio = None
        if orch is not None and peer is not None:
            # Memory growth can be ~0 for either side; a 1 MB floor keeps the ratio meaningful.
            floor = 1.0 if metric.unit == "MB" else 1e-12
            o, p = max(orch, floor), max(peer[1], floor)
            ratio = o / p if metric.higher_is_better else p / o
        row_label = metric.label
        peer_value = peer[1] if peer else None
        if raw_key:  # orchestra's figure over the machine's raw one, both from this run
            raw = raw_figure(results, raw_key)
            if raw is None:
                continue
            row_label = f"{metric.label} / {ALL_METRICS[raw_key].label}"
            orch = None if orch is None else orch / raw
            peer_value = None if peer_value is None else peer_value / raw
        if orch_cell is None:
            verdict = "not run"
        elif orch is None:
            verdict = "missed (failed)" if ok is not None else "-"
        elif ok is None:
            verdict = "-"
        elif ok == AHEAD:
            verdict = "-" if ratio is None else "met" if ratio >= 1 else "missed"
        else:
            verdict = "met" if ok(orch) else "missed"  # type: ignore[operator]
        rows.append(
            {
                "workload": workload,
                "metric": f"{key}/{raw_key}" if raw_key else key,
                "label": row_label,
                "orchestra": orch,
                "orchestra_text": failure_text(orch_cell, key) if orch is None else None,
                "best_peer": peer[0] if peer else None,
                "best_peer_metric": peer[2] if peer else None,
                "peer_value": peer_value,
                "ratio": ratio,
                "target": target,
                "verdict": verdict,
            }
        )
    if "main" in results:
        rows.append(main_summary(results["main"]))
    return rows


def main_summary(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def score(cell: dict[str, Any]) -> int:
        return sum(cell.get("cases", {}).get(c) == "ok" for c in MAIN_CASES)

    orch = cells.get("orchestra")
    peers = [
        (k, score(c))
        for k, c in cells.items()
        if k != "orchestra" and not SYSTEMS[k].reference and c["status"].startswith("ok")
    ]
    best = max(peers, key=lambda kv: kv[1], default=None)
    if orch is None:
        verdict, text = "not run", None
    elif not orch["status"].startswith("ok"):
        verdict, text = "missed (failed)", clean(orch["status"])
    else:
        lru = orch.get("cases", {}).get("lru_cache", "-")
        text = f"{score(orch)}/4 ok; lru_cache: {clean(lru)}"
        verdict = "met" if score(orch) == 4 and lru.startswith("clear error") else "missed"
    return {
        "workload": "main",
        "metric": "cases_ok",
        "label": "__main__ functions",
        "orchestra": score(orch) if orch and orch["status"].startswith("ok") else None,
        "orchestra_text": text,
        "best_peer": best[0] if best else None,
        "best_peer_metric": "cases_ok",
        "peer_value": best[1] if best else None,
        "ratio": None,
        "target": "all four ok; lru_cache gives a clear error",
        "verdict": verdict,
    }


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | metric | orchestra_nb | best peer | peer figure "
        "| ratio (>1: orchestra better) | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["metric"] == "cases_ok":
            orch = r["orchestra_text"] or "-"
            peer_fig = f"{r['peer_value']}/4 ok" if r["peer_value"] is not None else "-"
        else:
            orch = fmt(r["orchestra"]) if r["orchestra"] is not None else (r["orchestra_text"] or "-")
            peer_fig = fmt(r["peer_value"]) if r["peer_value"] is not None else "-"
            if r["best_peer_metric"] and r["best_peer_metric"] != r["metric"].split("/")[0]:
                peer_fig += f" ({r['best_peer_metric'].split('_')[0]})"
        peer = label(r["best_peer"]) if r["best_peer"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['label']} | {orch} | {peer} | {peer_fig} | {ratio} "
            f"| {r['target']} | {r['verdict']} |"
        )
    return lines


def header(meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
    pk = meta["packages"]
    lines = [
        "# orchestra_nb benchmarks",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cores']} cores, {meta['cpu']}, {meta['ram_gib']} GiB RAM ({meta['platform']})",
        f"- Python: {meta['python_build']}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in pk.items()),
        f"- run: `{config['command']}` ({'quick' if config['quick'] else 'full'}, "
        f"repeat {config['repeat']}, {config['elapsed_s']:.0f} s in total)",
        "",
        METHOD,
    ]
    return lines


def machine_limits(results: dict[str, dict[str, Any]], z: Sizes) -> list[str]:
    """The machine's raw limits from this run, for the header."""
    cell = results.get("raw", {}).get("machine")
    if cell is None:
        return []
    if not cell["status"].startswith("ok"):
        return [f"- machine's raw limits: {clean(cell['status'])}", ""]
    rtt = cell_text(cell, "zmq_rtt_med_us")
    p99 = cell_text(cell, "zmq_rtt_p99_us")
    copy = cell_text(cell, "memcpy_mb_s")
    return [
        "Raw limits of this machine, measured in the same run (the ratios below compare with them):",
        f"a ZeroMQ ipc ping-pong between two processes (PAIR, blocking recv, 1 byte) takes {rtt} us"
        f" median, {p99} us p99 ({z.raw_round_trips:,} round trips); a {z.raw_copy_mb} MB"
        f" `numpy.copyto` runs at {copy} MB/s.",
        "",
    ]


def workload_titles(z: Sizes) -> dict[str, str]:
    return {
        "cold": "1. Cold start (fresh interpreter: import + 2-worker pool + first result)",
        "rtt": f"2. Round trip ({z.rtt_calls} sequential `x + 1` calls on a warm pool)",
        "map": f"3. Tiny-task map ({z.map_items:,} items, ordered)",
        "submit": f"4. Per-task submissions ({z.submit_items:,} calls at once, then all awaited)",
        "scaling": f"5. CPU scaling ({z.scaling_tasks} pure-Python tasks of ~{z.scaling_task_s} s)",
        "transfer": f"6. Data transfer ({z.transfer_mb} MB float64 array)",
        "lag": f"7. Event-loop lag while awaiting a {z.lag_items:,}-item map (1 ms ticker)",
        "main": "8. Functions from `__main__`",
        "scale": (
            f"9. Scale ({z.scale_items:,}-item map over a generator, consumed as a stream;"
            f" slow systems {z.scale_items_slow:,})"
        ),
        "joblib": (
            f"10. joblib backends ({z.joblib_calls:,} tiny `delayed` calls; `GridSearchCV(SVC())`, "
            "20 candidates x 5 folds on iris; n_jobs=2, warm pools)"
        ),
        "widget": (
            f"11. Widget on (a {z.widget_items:,}-item awaited map of tiny tasks in a real ipykernel,"
            ' progress widget against progress="none"; orchestra only)'
        ),
        "smallmaps": (
            f"12. Many small maps ({z.small_maps} sequential maps of {z.small_map_items} items, each"
            " awaited; the peers' own map with default settings)"
        ),
        "broadcast": (
            f"13. Broadcast argument (one {z.broadcast_mb} MB float64 array used by each of"
            f" {z.broadcast_items} items)"
        ),
        "montecarlo": (
            f"14. Realistic CPU work ({z.mc_tasks} numpy Monte Carlo tasks of {z.mc_samples:,} samples;"
            " ideal speedup 2.0)"
        ),
    }


def render(
    meta: dict[str, Any], config: dict[str, Any], results: dict[str, dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    rows = summary_rows(results)
    out = header(meta, config)
    out += machine_limits(results, QUICK if config["quick"] else FULL)
    out += [
        "## Summary",
        "",
        "Ratio: orchestra / best peer for throughput and speedup, best peer / orchestra for times "
        "and latencies, so > 1 always means orchestra_nb is better. The round trip compares "
        "orchestra's await path with each peer's better mode (sync or await).",
        "",
        *summary_table(rows),
        "",
    ]
    sizes = QUICK if config["quick"] else FULL
    titles = workload_titles(sizes)
    for name, cells in results.items():
        if name == "raw":
            continue  # the machine's figures are in the header
        out += [f"## {titles.get(name, name)}", "", *workload_table(name, cells), ""]
        notes = [f"- {label(k)}: {clean(n)}" for k, c in cells.items() for n in c.get("notes", [])]
        if notes:
            out += [*notes, ""]
    out += [
        "<details><summary>All installed packages</summary>",
        "",
        ", ".join(meta["all_packages"]),
        "",
        "</details>",
        "",
    ]
    return "\n".join(out), rows


def write(path: Path, meta: dict[str, Any], config: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    text, rows = render(meta, config, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    raw = {"meta": meta, "config": config, "summary": rows, "results": results}
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
