"""JupyterLab in headless chromium: widgets render and update live. Setup: .ci/browser-setup.sh."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

SETUP_CELL = """\
import asyncio
import ipywidgets as W

bar = W.IntProgress(value=0, min=0, max=50, description="work")
label = W.HTML("waiting")
display(W.HBox([bar, label]))
"""

# ~50 updates/s per widget: far below jupyter_server's 1000 msg/s iopub limit.
ADVANCE_CELL = """\
async def advance(n: int = 50) -> None:
    for i in range(1, n + 1):
        bar.value = i
        label.value = f"step {i}/{n}"
        await asyncio.sleep(0.02)
    label.value = f"done {n}/{n}"

await advance()
"""


def write_notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def test_widget_progress_reaches_100_percent(
    run_in_browser: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    nb = write_notebook(tmp_path / "progress.ipynb", SETUP_CELL, ADVANCE_CELL)
    result = run_in_browser(nb, expect_text="done 50/50", timeout=90)

    assert result["widths_over_time"][-1]["widths"] == ["100%"]
    assert any("done 50/50" in text for text in result["label_texts"]), result["label_texts"]
    assert not result["errors"], result["errors"]
    shot = Path(result["screenshot"])
    assert shot.is_file()
    assert shot.stat().st_size > 0
