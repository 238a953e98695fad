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
    """Run All on the quickstart: its first map's widget ends with "100,000/100,000 done",
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
        wait_selector=f'{cell} .orchestra-job[data-state="done"]',
        expect_width=None,
        text_selector=f"{cell} .widget-html-content",
        expect_text="collatz_steps 100,000/100,000 done · done in",
        timeout=90,
        settle=30,
        scroll_to=cell,
    )

    label = next((t for t in result["label_texts"] if "100,000/100,000 done" in t), None)
    assert label is not None, result["label_texts"]
    assert "failed" not in label and "cancelled" not in label, label  # zero counters hidden
    # Every cell finished (the error section's traceback is caught and printed to stdout, which
    # the driver does not count), and no cell wrote a traceback or anything else to stderr.
    assert result["settled"], "some cells were still running after 30 s; see the screenshot"
    assert not result["errors"], result["errors"]
    assert Path(result["screenshot"]).stat().st_size > 0

    # The session is shut down: the kernel and its workers are gone, without the harness having
    # to kill any of them (it names the ones it kills on stderr).
    assert not lab.stray_processes(), [(p.pid, p.cmdline()) for p in lab.stray_processes()]
    assert "killing leftover" not in capfd.readouterr().err


# A notebook as a user writes it: a job shown as the cell's value, a map with one failure, a
# map cancelled part-way with the button, and a failing map whose traceback must show the
# cell's source line. The driver clicks Cancel once the slow job has successes.
TRUTH_CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb",
    "def square(x):\n    return x * x\n\nsquares_job = orchestra.map(square, range(50), name='squares')\n"
    "squares_job",
    "squares = await squares_job\nprint('squares ok', squares[7])",
    "def picky(x):\n    if x == 7:\n        raise ValueError('seven')\n    return x\n\n"
    "picked = await orchestra.map(picky, range(20), return_exceptions=True, name='picky')",
    "import time\ndef slow(x):\n    time.sleep(0.05)\n    return x\n\ntry:\n"
    "    await orchestra.map(slow, range(400), chunksize=1, name='slow')\n"
    "except orchestra.JobCancelled as exc:\n"
    "    kept = [r for r in exc.handle.partial_results() if r is not orchestra.MISSING]\n"
    "    done = exc.handle.counts()[orchestra.TaskState.SUCCEEDED]\n"
    "    print(f'kept {len(kept)} results, {done} done; {exc}')",
    "def boom(x):\n    return 10 / (x - 3)\n\nawait orchestra.map(boom, range(5), name='boom')",
]
SLOW_CELL = '.jp-Cell[data-windowed-list-index="4"]'


def _widget_texts(saved: dict[str, Any]) -> list[list[str]]:
    """Per cell, the text/plain of its widget displays: what the saved file shows."""
    return [
        [
            "".join(o["data"]["text/plain"])
            for o in cell.get("outputs", [])
            if o.get("output_type") == "display_data"
            and "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        ]
        for cell in saved["cells"]
    ]


def test_the_widget_tells_the_truth(
    run_in_browser: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    nb = write_notebook(tmp_path / "truth.ipynb", *TRUTH_CELLS)
    result = run_in_browser(
        nb,
        wait_selector='.orchestra-job[data-state="failed"][data-total="5"]',
        expect_width=None,
        text_selector=".widget-html-content, .jp-OutputArea-output",
        expect_text="kept ",
        timeout=120,
        settle=20,
        fail_on_traceback=False,
        click_when=f'{SLOW_CELL} .orchestra-job[data-state="running"] .orchestra-succeeded',
        click_selector=f"{SLOW_CELL} button",
        save=True,
    )
    assert result["clicked"] is not None and result["saved"], result
    texts = result["label_texts"]
    # The job views' labels (an output area's text holds a view's label and its button's).
    views = [t for t in texts if t.split(" ")[0] in ("squares", "picky", "slow", "boom")
             and "/" in t.split(" ")[1] and "\n" not in t]
    # One widget per job, also for the handle shown as its cell's value.
    assert sorted(v.split()[0] for v in views) == ["boom", "picky", "slow", "squares"], views
    by_job = {v.split()[0]: v for v in views}
    assert by_job["squares"].startswith("squares 50/50 done · done in"), by_job
    assert by_job["picky"].startswith("picky 19/20 done · 1 failed · finished with errors"), by_job
    # Cancelled part-way: done counts the successes, the rest is cancelled.
    kept = next(t for t in texts if t.startswith("kept "))
    done = int(kept.split()[1])
    assert f"{done} done;" in kept and "was cancelled (the Cancel button)" in kept, kept
    assert 0 < done < 400
    # Tasks already running when the cancel came may still finish: never fewer than `done`.
    final = re.match(r"slow (\d+)/400 done · (\d+) cancelled · cancelled in", by_job["slow"])
    assert final is not None, by_job
    assert int(final[1]) >= done and int(final[1]) + int(final[2]) == 400, by_job
    # The failing map's traceback shows the cell's source line, and no orchestra frame.
    (traceback,) = [e for e in result["errors"] if "ZeroDivisionError" in e]
    assert "return 10 / (x - 3)" in traceback, traceback
    assert "_handles.py" not in traceback and "_jobs.py" not in traceback, traceback

    # The saved file: each widget's text form is its job's final state, in one line.
    saved = json.loads(Path(result["notebook_copy"]).read_text())
    forms = _widget_texts(saved)
    assert [len(f) for f in forms] == [0, 1, 0, 1, 1, 1], forms
    lines = [f[0] for f in forms if f]
    assert all("\n" not in line and line.startswith("[") for line in lines), lines
    assert "squares: 50/50 done · done in" in lines[0]
    assert "picky: 19/20 done · 1 failed · finished with errors in" in lines[1]
    assert f"slow: {done}/400 done · {400 - done} cancelled · cancelled in" in lines[2]
    assert "boom: 4/5 done · 1 failed · finished with errors in" in lines[3]


ORPHAN_CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb",
    "import time\ndef slow(x):\n    time.sleep(0.2)\n    return x\n\n"
    "h = orchestra.map(slow, range(2000), chunksize=1, name='orphan')",
    "import os, signal\ntime.sleep(1)\nos.kill(os.getpid(), signal.SIGKILL)  # the kernel dies",
]

# In the page: how the orphaned view looks (its veil's and its label's computed opacity).
ORPHAN_PROBE = """(() => {
  const cover = document.querySelector('.orchestra-stale-cover');
  const note = document.querySelector('.orchestra-stale-note');
  const job = document.querySelector('.orchestra-job');
  return {cover: cover && getComputedStyle(cover).opacity, note: note && getComputedStyle(note).opacity,
          job: job && getComputedStyle(job).opacity, text: job && job.innerText};
})()"""


def test_an_orphaned_widget_does_not_look_live(
    run_in_browser: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    nb = write_notebook(tmp_path / "orphan.ipynb", *ORPHAN_CELLS)
    result = run_in_browser(
        nb,
        wait_selector='.orchestra-job[data-state="running"] .orchestra-succeeded',
        expect_width=None,
        timeout=90,
        settle=5,
        fail_on_traceback=False,
        probe=ORPHAN_PROBE,
        probe_after=9.0,  # the kernel died about 1 s in; a view greys out after 6 s without updates
    )
    probe = result["probe"]
    assert probe["cover"] == "1" and probe["note"] == "1", probe
    assert float(probe["job"]) < 0.6, probe
    assert "no update from the kernel" in probe["text"], probe


# A background map whose tasks print only after their cell ended (they wait for a gate file
# the next cell creates); the next cell awaits it.
LATE_CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb",
    "import os, time\ndef talk(i, gate):\n    while not os.path.exists(gate):\n        time.sleep(0.005)\n"
    "    print(f'late line {i}')\n    return i\n\n"
    "h = orchestra.map(talk, range(6), [{gate!r}] * 6, chunksize=1, name='talk')",
    "open({gate!r}, 'w').close()\nr = await h\nprint('awaited', r)",
]

# In the page: the text of each code cell's output area.
OUTPUT_TEXTS = """[...document.querySelectorAll('.jp-CodeCell')].map(
  c => (c.querySelector('.jp-OutputArea') || {innerText: ''}).innerText)"""


def test_output_printed_after_its_cell_ended_shows_under_that_cell(
    run_in_browser: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    gate = repr(str(tmp_path / "gate"))
    nb = write_notebook(tmp_path / "late.ipynb", *(c.replace("{gate!r}", gate) for c in LATE_CELLS))
    result = run_in_browser(
        nb,
        wait_selector='.orchestra-job[data-state="done"]',
        expect_width=None,
        text_selector=".jp-OutputArea-output",
        expect_text="awaited [0, 1, 2, 3, 4, 5]",
        timeout=90,
        settle=10,
        probe=OUTPUT_TEXTS,
        save=True,
    )
    launching, later = result["probe"][1], result["probe"][2]
    for i in range(6):  # live, under the launching cell, once each
        assert launching.count(f"] late line {i}\n") == 1, launching
    assert "late line" not in later and "awaited [0, 1, 2, 3, 4, 5]" in later, later
    # The saved file: the lines in the launching cell's display for later output.
    saved = json.loads(Path(result["notebook_copy"]).read_text())
    outputs = saved["cells"][1]["outputs"]
    texts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert sum(t.count("late line") for t in texts) == 6, outputs
