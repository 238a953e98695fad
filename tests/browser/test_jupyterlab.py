"""JupyterLab in headless chromium: widgets render and update live. Setup: .ci/browser-setup.sh."""

from __future__ import annotations

import json
import re
import sys
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


QUICKSTART = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_quickstart_progress_reaches_100_percent(
    lab: Any,
    run_in_browser: Callable[..., dict[str, Any]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Run All on the quickstart: its first map's widget reaches 100 % with "square: 100/100",
    every later cell finishes without a traceback, and no kernel or worker outlives the session."""
    # The kernel is this interpreter (conftest's throwaway kernelspec), so orchestra_nb imports.
    spec = lab.api("GET", "/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    assert spec["argv"][0] == sys.executable, spec["argv"]

    cells = json.loads(QUICKSTART.read_text())["cells"]
    first_map = next(
        i
        for i, cell in enumerate(cells)
        if cell["cell_type"] == "code" and "orchestra.map(" in "".join(cell["source"])
    )
    # Later cells show more bars (a failing map, a cancelled background job), so scope the
    # conditions to the first map's cell; JupyterLab numbers the rendered cells in this attribute.
    cell = f'.jp-Cell[data-windowed-list-index="{first_map}"]'
    result = run_in_browser(
        QUICKSTART,
        wait_selector=f"{cell} .widget-hprogress .progress-bar",
        text_selector=f"{cell} .widget-html-content",
        expect_text="square: 100/100",
        timeout=90,
        settle=30,
        scroll_to=cell,
    )

    assert result["widths_over_time"][-1]["widths"] == ["100%"], result["widths_over_time"]
    label = next((t for t in result["label_texts"] if "square: 100/100" in t), None)
    assert label is not None, result["label_texts"]
    assert re.search(r"failed 0 · retrying 0 · cancelled 0 · done in ", label), label
    # Every cell finished (the error section's traceback is caught and printed to stdout, which
    # the driver does not count), and no cell wrote a traceback or anything else to stderr.
    assert result["settled"], "some cells were still running after 30 s; see the screenshot"
    assert not result["errors"], result["errors"]
    assert Path(result["screenshot"]).stat().st_size > 0

    # The session is shut down: the kernel and its workers are gone, without the harness having
    # to kill any of them (it names the ones it kills on stderr).
    assert not lab.stray_processes(), [(p.pid, p.cmdline()) for p in lab.stray_processes()]
    assert "killing leftover" not in capfd.readouterr().err
