"""Notebook 04 in a real browser: JupyterLab + headless Chromium (Debian's, driven by Playwright).

Runs every cell against a tiny local model, moves the budget slider with the keyboard and checks
that the rendered plan figure and footprint label change. Screenshot: ``<tmp_path>/layer_selector.png``,
and ``docs/layer_selector.png`` when ``DQ_UPDATE_SCREENSHOT=1``. Needs ``/usr/bin/chromium``
(``scripts/install_browser.sh``); skipped, saying why, only where Chromium is missing or cannot start.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_notebook_04 import TINY_SAMPLES, notebook_for_tests

CHROMIUM = "/usr/bin/chromium"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "layer_selector.png"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PANEL = ".dq-layer-selector"
ANNOUNCEMENTS = "@jupyterlab/apputils-extension:announcements"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, tiny_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 04; yields its base URL and token."""
    root = tmp_path / "lab"
    root.mkdir()
    nbformat.write(notebook_for_tests(), root / "04_layer_selection.ipynb")
    labconfig = tmp_path / "jupyter-config" / "labconfig"
    labconfig.mkdir(parents=True)  # no "get Jupyter news?" toast over the panel
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {ANNOUNCEMENTS: True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "DQ_NOTEBOOK_MODEL": str(tiny_path("qwen2_vl")), "DQ_NOTEBOOK_SAMPLES": TINY_SAMPLES,
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; log:\n{(tmp_path / 'jupyterlab.log').read_text()}") from None
                time.sleep(0.3)
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser_page(tmp_path):
    """A Playwright page in Debian's headless Chromium (fresh profile)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing and could not be installed: run scripts/install_browser.sh (needs root/apt).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    with sync_api.sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 2400},
            )
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} cannot be launched here: {exc}")
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def test_layer_selector_in_jupyterlab(jupyterlab, browser_page, tmp_path):
    url, token, root = jupyterlab
    page = browser_page
    page.set_default_timeout(90_000)
    page.goto(f"{url}/lab/tree/04_layer_selection.ipynb?token={token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.evaluate("""async () => {
        const app = window.jupyterapp;
        if (!app.shell.leftCollapsed) { await app.commands.execute('application:toggle-left-area'); }  // full-width notebook
        await app.commands.execute('notebook:run-all-cells');
    }""")

    panel = page.locator(PANEL)
    panel.wait_for(state="visible")
    figure = panel.locator(".widget-image").first
    size = panel.locator(".dq-plan-size")
    page.wait_for_function(f"() => document.querySelector('{PANEL} .widget-image')?.naturalWidth > 0")
    size.wait_for(state="visible")
    panel.scroll_into_view_if_needed()
    before_src, before_size, before_png = figure.get_attribute("src"), size.inner_text(), figure.screenshot()

    handle = panel.locator(".widget-slider .noUi-handle").first  # the budget slider (the threshold one is second)
    handle.focus()
    for _ in range(20):  # +10 points of budget, 0.5 point per key press
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "([selector, before]) => { const el = document.querySelector(selector); return el && el.innerText !== before; }",
        arg=[f"{PANEL} .dq-plan-size", before_size],
    )
    page.wait_for_function(
        "([selector, before]) => document.querySelector(selector)?.getAttribute('src') !== before",
        arg=[f"{PANEL} .widget-image", before_src],
    )
    page.wait_for_function(f"() => document.querySelector('{PANEL} .widget-image')?.naturalWidth > 0")
    readout = panel.locator(".widget-readout").first.inner_text()
    assert readout.strip() == "20.0%", readout
    assert size.inner_text() != before_size
    assert figure.screenshot() != before_png

    # Every cell ran: the comparison view at the end of the notebook is there too.
    page.locator(".dq-compare-view").wait_for(state="attached")
    assert (root / "dq_plan.json").is_file()

    shot = tmp_path / "layer_selector.png"
    panel.screenshot(path=str(shot))
    if os.environ.get("DQ_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
