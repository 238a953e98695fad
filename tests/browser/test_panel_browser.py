"""The Orchestra side panel (labextension/) in real JupyterLab, and Notebook 7, in headless
chromium: a background job appears with a rising count, Cancel in the panel cancels it (the
cell's widget agrees), Resize changes the workers, Pause stops a job's count (while another job
runs to its end) and Resume lets it finish, a second pool gets its own section (its workers, its
job, its Resize) and drops out once shut down, and the panel's comm carries < 20 messages/s
while 10 jobs run. Setup: .ci/browser-setup.sh; the extension comes with `pip install -e .`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "panel.js"
# Screenshots kept after the run (CI uploads this directory); `build/` is git-ignored.
ARTIFACTS = Path(os.environ.get("ORCHESTRA_ARTIFACTS", REPO / "build" / "browser-artifacts"))

CELLS = [
    "import orchestra_nb\norchestra_nb.configure(workers=2)\n%load_ext orchestra_nb\n"
    "orchestra.default_pool().wait_started(60)",
    "import time\n\ndef slow(i, dt):\n    time.sleep(dt)\n    return i\n\n"
    "bg = orchestra.map(slow, range(2000), [0.05] * 2000, chunksize=1)",
    "bg2 = orchestra.map(slow, range(400), [0.05] * 400, chunksize=1)",
    "check = orchestra.map(slow, range(30), [0.01] * 30, chunksize=1)\ncheck.wait_finished(60)",
    "side = orchestra.Pool(1, name='side')\nside.wait_started(60)\n"
    "side_job = side.map(slow, range(400), [0.05] * 400, chunksize=1)",
    "jobs = [orchestra.map(slow, range(40), [0.03] * 40, chunksize=1) for _ in range(10)]",
    "side.shutdown(cancel_pending=True)",
    "import json\nfor h in jobs:\n    h.wait_finished(60)\n"
    "print(json.dumps({'bg_cancelled': bg.cancelled(), 'bg_finished': bg.finished(),\n"
    "                  'bg2_ok': bg2.result(60) == list(range(400)) and not bg2.paused,\n"
    "                  'check_ok': check.result(60) == list(range(30)),\n"
    "                  'jobs_ok': [h.done() and not h.cancelled() for h in jobs],\n"
    "                  'workers': orchestra.default_pool().workers, 'side': side.state,\n"
    "                  'pools': [p.name for p in orchestra.pools()]}))",
]


def _notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def _run_panel(lab: Any, shutdown_session: Callable[[str], None], ui: str, screenshot: Path,
               docs_screenshot: Path | None = None) -> dict[str, Any]:
    notebook = _notebook(lab.root_dir / f"panel-{ui}.ipynb")
    rel = notebook.relative_to(lab.root_dir).as_posix()
    config = {"url": lab.url, "token": lab.token, "notebook": rel, "ui": ui, "screenshot": str(screenshot),
              "docs_screenshot": str(docs_screenshot) if docs_screenshot else None}
    try:
        proc = subprocess.run(["node", str(DRIVER), json.dumps(config)], capture_output=True, text=True,
                              timeout=240, cwd=HERE)
    finally:
        shutdown_session(rel)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(f"panel.js printed no result (rc {proc.returncode}):\n{proc.stderr}", pytrace=False)
    result: dict[str, Any] = json.loads(lines[-1])
    if proc.returncode != 0 or not result["ok"]:
        pytest.fail(f"panel.js failed: {result['message']}\nconsole errors: {result['console_errors']}\n"
                    f"screenshot: {screenshot}\n--- server log ---\n{lab.log_tail(20)}", pytrace=False)
    return result


def _check(result: dict[str, Any], screenshot: Path) -> None:
    done = [int(re.match(r"(\d+)/2000", text).group(1)) for text in result["counts_seen"]]  # type: ignore[union-attr]
    assert done == sorted(done) and len(set(done)) == len(done), result["counts_seen"]
    assert result["cancelled_status"] == "cancelled"
    assert "cancelled in" in result["cell_label"], result["cell_label"]
    assert (result["workers_before"], result["workers_after"]) == (2, 3)
    # Pause: the button was enabled, the job's state showed it paused, and its count did not
    # move while another job ran to its end on the same workers; Resume let it finish.
    paused = result["paused"]
    assert paused["label_before"] == "Pause" and paused["title_before"].startswith("Pause this job"), paused
    assert (paused["status"], paused["label"]) == ("paused", "Resume"), paused
    assert re.fullmatch(r"\d+/400", paused["count"]) and paused["count"] != "400/400", paused
    assert paused["count_after_other_job"] == paused["count"], paused
    assert paused["status_after_other_job"] == "paused", paused
    assert result["resumed"] == {"count": "400/400", "paused": "false"}, result["resumed"]
    # Every open pool in its own section; Resize applied to the pool chosen only.
    assert result["pools_seen"] == ["default", "side"], result["pools_seen"]
    assert result["side"] == {"job_in_side": 1, "job_in_default": 0, "side_workers": 2, "default_workers": 3}
    assert result["pools_after_shutdown"] == ["default"]
    assert result["jobs_seen"] >= 13  # the ten jobs, the cancelled one, the paused one, the check
    assert result["final"] == {
        "bg_cancelled": True, "bg_finished": True, "bg2_ok": True, "check_ok": True,
        "jobs_ok": [True] * 10, "workers": 3, "side": "closed", "pools": ["default"]}
    print(f"panel ({result['ui']}): {result['frames']} comm frames in {result['window_s']:.2f} s "
          f"with 10 jobs running = {result['rate']:.1f}/s")
    assert result["frames"] >= 2, "no panel traffic seen while the jobs ran"
    assert result["rate"] < 20, result
    assert screenshot.is_file() and screenshot.stat().st_size > 0
    assert not [e for e in result["console_errors"] if "orchestra" in e.lower()], result["console_errors"]


def test_the_extension_is_installed_and_enabled() -> None:
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                         text=True, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert re.search(r"orchestra-nb v0\.1\.0 enabled\s+OK", text), (
        f"orchestra-nb is not installed: pip install -e . builds and installs it\n{text}")


def test_panel_in_jupyterlab(lab: Any, shutdown_session: Callable[[str], None]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "panel-jupyterlab.png"
    result = _run_panel(lab, shutdown_session, "lab", shot, docs_screenshot=ARTIFACTS / "panel-ten-jobs.png")
    _check(result, shot)


def test_panel_in_notebook7(lab: Any, shutdown_session: Callable[[str], None]) -> None:
    pytest.importorskip("notebook", minversion="7")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "panel-notebook7.png"
    result = _run_panel(lab, shutdown_session, "notebook", shot)
    _check(result, shot)
