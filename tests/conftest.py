"""Shared fixtures. Browser fixtures are generic: a headless Debian chromium through Playwright,
skipped explicitly (with the reason) where the browser or Playwright is missing."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SGF_DMFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
RESULTS = Path(__file__).resolve().parents[1] / "test-results"

os.environ.setdefault("NUMBA_NUM_THREADS", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _kill_panel_servers():
    """Stop every Panel server a test started (else pytest hangs at exit)."""
    yield
    pn = sys.modules.get("panel")  # only where a test used Panel
    if pn is not None:
        pn.state.kill_all_servers()


@pytest.fixture(scope="session")
def browser():
    """A headless chromium, or an explicit skip saying what is missing."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"browser tests need chromium at {CHROMIUM} "
                    "(apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright (pip install playwright)")
    pw = sync_playwright().start()
    try:
        br = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    except Exception as e:  # noqa: BLE001 - a browser that does not start is a skip, said loudly
        pw.stop()
        pytest.skip(f"chromium at {CHROMIUM} did not start: {e}")
    yield br
    br.close()
    pw.stop()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = ctx.new_page()
    yield pg
    ctx.close()


@pytest.fixture
def results_dir() -> Path:
    RESULTS.mkdir(exist_ok=True)
    return RESULTS
