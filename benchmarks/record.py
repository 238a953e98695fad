"""Raw results of one (system, workload) group, written to disk after every measurement
so that a group killed by its time limit still reports what it measured."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def short_reason(exc: BaseException, limit: int = 140) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "status": "ok",
            "metrics": {},
            "errors": {},
            "cases": {},
            "notes": [],
        }
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".part")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def add(self, metric: str, value: float) -> None:
        self.data["metrics"].setdefault(metric, []).append(value)
        self.flush()

    def fail(self, metric: str, exc: BaseException) -> None:
        self.data["errors"][metric] = short_reason(exc)
        self.data.setdefault("tracebacks", {})[metric] = traceback.format_exc(limit=8)
        self.flush()

    def failed(self, metric: str) -> bool:
        return metric in self.data["errors"]

    def measure(self, metrics: tuple[str, ...], fn: Callable[[], dict[str, float]]) -> None:
        """Run one repetition producing ``metrics``; a failure marks them all failed and
        later repetitions of them are skipped (a broken system stays broken)."""
        if any(self.failed(m) for m in metrics):
            return
        try:
            values = fn()
        except Exception as exc:
            for m in metrics:
                self.fail(m, exc)
            return
        for m in metrics:
            self.data["metrics"].setdefault(m, []).append(values[m])
        self.flush()

    def case(self, name: str, outcome: str) -> None:
        self.data["cases"][name] = outcome
        self.flush()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def set_status(self, status: str) -> None:
        self.data["status"] = status
        self.flush()
