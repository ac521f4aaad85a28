"""Fixtures of the browser test: a JupyterLab server on a free port (isolated settings, killed at the end) and
headless Chromium driven by Selenium (Debian's chromium and chromedriver; CHROMIUM, CHROMEDRIVER override)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

WAIT = 120  # seconds per step: the CPU may be shared with training runs
ARTIFACTS = pytest.StashKey[Path]()

# JupyterLab settings for a test: every cell in the DOM (no windowing), no news or update prompts.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False,
                                                                       "doNotDisturbMode": True},
}


@dataclass
class Lab:
    root: Path  # the folder JupyterLab serves
    url: str
    token: str

    def open(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


@pytest.fixture(scope="session")
def artifacts(request):
    """A temporary folder for the screenshots, the JupyterLab log and the chromedriver log (named at the end)."""
    folder = Path(tempfile.mkdtemp(prefix="deepen-browser-"))
    request.config.stash[ARTIFACTS] = folder
    print(f"browser test: screenshots and logs in {folder}")
    return folder


def pytest_terminal_summary(terminalreporter, config):
    folder = config.stash.get(ARTIFACTS, None)
    if folder is not None:
        terminalreporter.write_line(f"browser test: screenshots and logs in {folder}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lab(artifacts, tmp_path_factory):
    """JupyterLab serving an empty temporary folder, with its own config, data, runtime, settings and workspace
    folders (nothing of the user's); shut down with its kernels at the end, whatever the outcome."""
    root, home = tmp_path_factory.mktemp("lab"), tmp_path_factory.mktemp("jupyter")
    for name, values in SETTINGS.items():
        (home / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (home / "settings" / name).write_text(json.dumps(values))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    port, token = free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
               f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1", "--allow-root", f"--notebook-dir={root}"]
    with open(artifacts / "jupyterlab.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_server(server, f"http://127.0.0.1:{port}/api/status?token={token}", artifacts)
            yield Lab(root, f"http://127.0.0.1:{port}", token)
        finally:
            stop(server)


def wait_for_server(server: subprocess.Popen, url: str, artifacts: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}; see {artifacts / 'jupyterlab.log'}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {WAIT} s; see {artifacts / 'jupyterlab.log'}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to JupyterLab's process group (it shuts its kernels down), SIGKILL after 30 s; then any of its
    children still alive (kernels run in sessions of their own)."""
    try:
        children = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


@pytest.fixture(scope="session")
def browser(artifacts):
    """Headless Chromium (root needs --no-sandbox); a screenshot of the last page is saved at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    chromedriver = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
    missing = [path for path in (chromium, chromedriver) if not Path(path).is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: run `make test-browser` (it installs Debian's chromium and "
                    f"chromium-driver), or set CHROMIUM and CHROMEDRIVER", pytrace=False)
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver, log_output=str(artifacts / "chromedriver.log")),
                              options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(artifacts / "last.png"))
        driver.quit()
