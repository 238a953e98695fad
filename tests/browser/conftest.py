"""Real-browser harness: JupyterLab on loopback, driven in Debian's chromium by run_notebook.js.

Setup: `.ci/browser-setup.sh` (installs /usr/bin/chromium and tests/browser/node_modules).
A test needs only the `run_in_browser` fixture: `result = run_in_browser(path, expect_text="...")`
(`run_notebook_in_browser` bound to the session-wide `lab` server).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "run_notebook.js"
CHROMIUM = Path("/usr/bin/chromium")
SETUP_HINT = "run .ci/browser-setup.sh (installs Debian's chromium and tests/browser/node_modules)"
PROGRESS_BAR = ".widget-hprogress .progress-bar"


@dataclass
class JupyterLab:
    url: str
    token: str
    root_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def api(self, method: str, path: str, timeout: float = 5.0) -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stray_processes(self) -> list[psutil.Process]:
        """Live processes other than the server that inherited its environment (kernels, and the
        workers those start): each carries the server's throwaway JUPYTER_RUNTIME_DIR. The node
        processes JupyterLab itself starts now and then (build and version checks) do not count."""
        runtime_dir = str(self.log_path.parent / "runtime")
        stray = []
        for proc in psutil.process_iter(["pid", "name"]):
            if proc.pid == self.proc.pid or proc.info["name"] in ("node", "npm"):
                continue
            try:
                if proc.environ().get("JUPYTER_RUNTIME_DIR") == runtime_dir:
                    stray.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return stray


def missing_browser_env() -> str | None:
    missing = [
        what
        for what, ok in (
            (str(CHROMIUM), CHROMIUM.exists()),
            ("node", shutil.which("node") is not None),
            (
                "tests/browser/node_modules/playwright-core",
                (HERE / "node_modules" / "playwright-core").is_dir(),
            ),
        )
        if not ok
    ]
    return f"missing {', '.join(missing)}: {SETUP_HINT}" if missing else None


def require_browser_env() -> None:
    """In CI a missing browser is a failure, locally a skip."""
    problem = missing_browser_env()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


def _write_kernelspec(data_dir: Path) -> None:
    """A `python3` kernel that runs this interpreter (the one with orchestra_nb installed), first on
    JUPYTER_PATH: a user- or system-wide `python3` pointing at another Python cannot shadow it."""
    kernel_dir = data_dir / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": True},
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(lab: JupyterLab, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if lab.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {lab.proc.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("GET", "/api/status", timeout=2.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(
        f"jupyter lab did not answer /api/status within {deadline_s}s:\n{lab.log_tail()}"
    )


def _stop(lab: JupyterLab, grace_s: float = 10.0) -> None:
    # Kernels run in their own sessions, so killpg on the server misses them: remember every
    # descendant now, ask the server to shut kernels down, and kill whatever is left at the end.
    descendants = _descendants(lab.proc.pid)
    if lab.proc.poll() is None:
        try:
            for kernel in lab.api("GET", "/api/kernels"):
                lab.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=grace_s)
        except (OSError, ValueError) as exc:  # URLError is an OSError
            print(f"browser harness: kernel shutdown via REST failed: {exc!r}", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(lab.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            lab.proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    lab.proc.wait(timeout=grace_s)
    _reap(descendants, grace_s)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    except psutil.NoSuchProcess:
        return []


def _reap(procs: list[psutil.Process], grace_s: float) -> None:
    """Wait for `procs` to exit, then SIGKILL (and name) the ones that did not."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            print(f"browser harness: killing leftover {proc.pid} {proc.cmdline()}", file=sys.stderr)
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def _shutdown_sessions(lab: JupyterLab, notebook: str) -> None:
    """Stop the notebook's kernel so that tests sharing the server don't pile up kernels."""
    # Children a kernel started in their own session outlive it as orphans: remember them first.
    before = _descendants(lab.proc.pid)
    try:
        for session in lab.api("GET", "/api/sessions"):
            if session.get("path") == notebook:
                lab.api("DELETE", f"/api/sessions/{session['id']}", timeout=30.0)
    except (OSError, ValueError) as exc:
        print(
            f"browser harness: could not shut down the session of {notebook}: {exc!r}",
            file=sys.stderr,
        )
    still_children = {p.pid for p in _descendants(lab.proc.pid)}
    _reap([p for p in before if p.pid not in still_children], grace_s=3.0)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLab]:
    """JupyterLab on 127.0.0.1 with a random token and throwaway config/settings/workspaces."""
    require_browser_env()
    base = tmp_path_factory.mktemp("jupyterlab")
    dirs = {
        name: base / name
        for name in ("root", "settings", "workspaces", "config", "runtime", "ipython", "data")
    }
    for d in dirs.values():
        d.mkdir()
    # The news/update toast would cover part of the page; --LabApp.news_url=None does not stop it.
    notif = (
        dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    )
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    _write_kernelspec(dirs["data"])

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PATH=os.pathsep.join(
            p for p in (str(dirs["data"]), os.environ.get("JUPYTER_PATH", "")) if p
        ),
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={dirs['root']}",
        f"--LabApp.workspaces_dir={dirs['workspaces']}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = base / "jupyterlab.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=dirs["root"],
            start_new_session=True,
        )
    server = JupyterLab(f"http://127.0.0.1:{port}", token, dirs["root"], log_path, proc)
    try:
        _wait_ready(server, deadline_s=60.0)
        yield server
    finally:
        _stop(server)


def _clean_copy(src: Path, root_dir: Path) -> Path:
    """Copy `src` into the server root without outputs: stale widget views and execution
    counts would satisfy the wait conditions (and the driver's "started" check) too early."""
    nb = json.loads(src.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    dst = src if src.is_relative_to(root_dir) else root_dir / src.name
    dst.write_text(json.dumps(nb, indent=1))
    return dst


def run_notebook_in_browser(
    lab: JupyterLab,
    notebook_path: Path,
    *,
    wait_selector: str = PROGRESS_BAR,
    expect_width: str | None = "100%",
    text_selector: str = ".widget-html-content, .widget-label",
    expect_text: str | None = None,
    timeout: float = 60.0,
    screenshot: Path | None = None,
    fail_on_traceback: bool = True,
    settle: float = 5.0,
    scroll_to: str | None = None,
    click_when: str | None = None,
    click_selector: str | None = None,
    save: bool = False,
    probe: str | None = None,
    probe_after: float = 0.0,
) -> dict[str, Any]:
    """Open `notebook_path` in chromium, Run All Cells, wait until every `wait_selector` element has
    style.width == `expect_width` and some `text_selector` element contains `expect_text`, then
    wait up to `settle` seconds (non-fatal: result["settled"]) for the remaining cells to finish;
    `errors` (stderr outputs, tracebacks included) is read after that wait. `scroll_to` (a selector
    inside the notebook) is scrolled into view before the screenshot; otherwise it shows the end.
    `click_when` + `click_selector`: click the latter once, when the former first matches.
    `save`: File > Save Notebook at the end (result["saved"]); the saved file is the copy.
    `probe`: a JS expression evaluated in the page `probe_after` s after the run (result["probe"]).

    The notebook is copied into `lab.root_dir` with its outputs cleared; the screenshot and the
    result (.json) default to files beside that copy. Returns run_notebook.js's JSON result
    (ok, widths_over_time, label_texts, errors, console_errors, elapsed_s, kernel_ready_s, run_s,
    screenshot); fails the test with the driver's message if the condition is not met in time.
    """
    notebook_path = _clean_copy(Path(notebook_path).resolve(), lab.root_dir)
    screenshot = screenshot or notebook_path.with_suffix(".png")
    rel_path = notebook_path.relative_to(lab.root_dir).as_posix()
    config = {
        "url": lab.url,
        "token": lab.token,
        "notebook": rel_path,
        "wait_selector": wait_selector,
        "expect_width": expect_width,
        "text_selector": text_selector,
        "expect_text": expect_text,
        "fail_on_traceback": fail_on_traceback,
        "kernel_timeout_ms": int(timeout * 1000),
        "run_timeout_ms": int(timeout * 1000),
        "screenshot": str(screenshot),
        "settle_ms": int(settle * 1000),
        "scroll_to": scroll_to,
        "click_when": click_when,
        "click_selector": click_selector,
        "save": save,
        "probe": probe,
        "probe_after_ms": int(probe_after * 1000),
    }
    # Own session so that a hung driver can be killed together with its chromium.
    proc = subprocess.Popen(
        ["node", str(DRIVER), json.dumps(config)],
        cwd=HERE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=2 * timeout + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"run_notebook.js hung past {2 * timeout + 60}s; stderr:\n{err[-2000:]}", pytrace=False
        )
    finally:
        _shutdown_sessions(lab, rel_path)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(
            f"run_notebook.js exited {proc.returncode} without a result; stderr:\n{err[-2000:]}",
            pytrace=False,
        )
    result: dict[str, Any] = json.loads(lines[-1])
    result["notebook_copy"] = str(notebook_path)
    screenshot.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if proc.returncode != 0 or not result.get("ok"):
        pytest.fail(
            f"browser run of {notebook_path.name} failed: {result.get('message')}\n"
            f"cell errors: {result.get('errors')}\nconsole errors: {result.get('console_errors')}\n"
            f"screenshot: {screenshot}\n--- jupyterlab log tail ---\n{lab.log_tail(20)}",
            pytrace=False,
        )
    return result


@pytest.fixture
def run_in_browser(lab: JupyterLab) -> Callable[..., dict[str, Any]]:
    """`run_notebook_in_browser` bound to the session's server; tests need not import conftest."""
    return partial(run_notebook_in_browser, lab)


@pytest.fixture
def shutdown_session(lab: JupyterLab) -> Callable[[str], None]:
    """``shutdown_session(notebook)``: stop that notebook's kernel (path relative to the server
    root) and reap the workers it leaves, for tests that drive the browser themselves."""
    return partial(_shutdown_sessions, lab)
