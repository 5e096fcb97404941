"""Real-browser harness: JupyterLab / Notebook 7 on 127.0.0.1, headless Debian Chromium via Playwright.

Fixtures (reusable by any browser test):
    jupyter_server(root, env=None) -> Server      start a server on a folder (stopped after the module);
                                                  it serves both frontends: server.url(path, "lab" | "notebook7")
    browser                                        a headless Chromium (session)
    page                                           a fresh tab (1280x900) that records console errors
    jl                                             the helpers below as attributes (jl.run_all(page), ...)
Helpers (plain functions; reach them through the `jl` fixture):
    open_notebook(page, url)                       load it and wait until its kernel is idle
    run_all(page, timeout_s)                       run every cell and wait until all ran and the kernel is idle;
                                                   returns the error outputs (list of "ename: evalue")
    kernel_exec(page, code) -> str                 run code in the notebook's kernel, return its stdout
    shot(page, name, locator=None) -> Path         screenshot into artifacts/ (gitignored)

Example:
    def test_quickstart(jupyter_server, page, jl):
        server = jupyter_server(jl.REPO / "notebooks")
        jl.open_notebook(page, server.url("01_quickstart.ipynb", "lab"))
        assert jl.run_all(page, 240) == []
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
PATHS = {"lab": "lab/tree", "notebook7": "notebooks"}


@dataclass
class Server:
    base: str
    token: str
    root: pathlib.Path
    proc: subprocess.Popen
    log: pathlib.Path

    def url(self, path: str, frontend: str = "lab") -> str:
        """URL of a notebook (path relative to root) in JupyterLab ("lab") or Notebook 7 ("notebook7")."""
        return f"{self.base}/{PATHS[frontend]}/{path}?token={self.token}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_settings(settings: pathlib.Path) -> None:
    def put(plugin: str, data: dict) -> None:
        p = settings / f"{plugin}.jupyterlab-settings"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data))
    put("@jupyterlab/apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})
    put("@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"})   # every cell in the DOM


def start_server(root: pathlib.Path, scratch: pathlib.Path, env: dict | None = None, timeout_s: float = 90) -> Server:
    """Start JupyterLab (with the Notebook 7 frontend enabled beside it) serving `root`."""
    settings, workspaces = scratch / "settings", scratch / "workspaces"
    workspaces.mkdir(parents=True, exist_ok=True)
    _quiet_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    full_env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
                    JUPYTER_PLATFORM_DIRS="1", PYTHONPATH=os.pathsep.join(
                        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {}))
    log = scratch / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
         "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True"],
        env=full_env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return Server(base, token, root, proc, log)
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"jupyter server did not start; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory):
    """Factory: jupyter_server(root, env=None) -> Server; every server is stopped when the module ends."""
    servers: list[Server] = []

    def start(root: pathlib.Path, env: dict | None = None) -> Server:
        server = start_server(pathlib.Path(root), tmp_path_factory.mktemp("jupyter"), env)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    yield pg
    pg.close()


_KERNEL = "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"


def open_notebook(page, url: str, timeout_s: float = 90) -> None:
    """Load a notebook URL and wait until the notebook's kernel is started and idle."""
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
    page.wait_for_function(
        """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                   const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                   return !!k && k.status === 'idle'; }""", timeout=timeout_s * 1000)


def run_all(page, timeout_s: float = 180) -> list[str]:
    """Run all cells; wait until every code cell has run and the kernel is idle. Returns error outputs."""
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        f"""() => {{ const w = window.jupyterapp.shell.currentWidget;
                    const cells = w.content.widgets.filter(c => c.model.type === 'code');
                    const ran = cells.every(c => c.model.executionCount !== null && !c.hasClass('jp-mod-pending')
                                                 && c.promptNode.textContent.indexOf('*') < 0);
                    return ran && {_KERNEL}.status === 'idle'; }}""", timeout=timeout_s * 1000, polling=250)
    return page.evaluate(
        """() => window.jupyterapp.shell.currentWidget.content.widgets
              .filter(c => c.model.type === 'code')
              .flatMap(c => c.model.outputs.toJSON())
              .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""")


def kernel_exec(page, code: str, timeout_s: float = 60) -> str:
    """Run code in the open notebook's kernel (not as a cell); return stdout. Raises on a Python error."""
    res = page.evaluate(
        f"""async (code) => {{
              const fut = {_KERNEL}.requestExecute({{ code, store_history: false }});
              let out = '', err = null;
              fut.onIOPub = (msg) => {{
                const t = msg.header.msg_type;
                if (t === 'stream') out += msg.content.text;
                else if (t === 'error') err = msg.content.ename + ': ' + msg.content.evalue;
              }};
              await fut.done;
              return {{ out, err }};
            }}""", code)
    if res["err"]:
        raise AssertionError(f"kernel raised {res['err']} running:\n{code}")
    return res["out"]


def wait_kernel(page, code: str, predicate, timeout_s: float = 20):
    """Poll kernel_exec(code) (its stdout parsed as JSON) until predicate(value) holds; returns the value."""
    deadline, value = time.time() + timeout_s, None
    while time.time() < deadline:
        value = json.loads(kernel_exec(page, code))
        if predicate(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"kernel never satisfied the check; last value of {code!r}: {value!r}")


def shot(page, name: str, locator=None) -> pathlib.Path:
    """Save a screenshot (of the page or one element) to artifacts/<name>.png."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    (locator or page).screenshot(path=str(path))
    return path


@pytest.fixture(scope="session")
def jl():
    """The helpers above as one object, so tests need no import: jl.open_notebook(page, url), jl.run_all(page), ..."""
    import types

    return types.SimpleNamespace(open_notebook=open_notebook, run_all=run_all, kernel_exec=kernel_exec,
                                 wait_kernel=wait_kernel, shot=shot, REPO=REPO, ARTIFACTS=ARTIFACTS)
