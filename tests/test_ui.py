"""End-to-end browser test of the dashboard (Playwright + Debian chromium, headless).

The app is served in-process (``pn.serve(..., threaded=True)`` on a free port of 127.0.0.1),
so the test can read the session's server-side :class:`app.dashboard.Dashboard` and compare
what is plotted with a direct solver call. Skipped explicitly where chromium is missing
(fixtures in conftest.py). Budget: about 1-2 minutes on 2 cores.
"""
from __future__ import annotations

import csv
import io
import json
import socket
import time
from urllib.parse import urlparse

import numpy as np
import pytest

pytestmark = pytest.mark.ui

LOCAL = ("127.0.0.1", "localhost")
#: The Fast template asks Google Fonts for a web font; offline this fails harmlessly.
ALLOWED_EXTERNAL = ("fonts.googleapis.com", "fonts.gstatic.com")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout, what, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _accepts(port) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def served():
    """The dashboard with the real engines, served in-process with a thread pool of 2 (as the
    Docker image's ``--num-threads 2``); yields (url, sessions)."""
    import panel as pn

    from app import dashboard
    from app.main import create, extensions

    extensions()
    pn.config.nthreads = 2
    port = free_port()
    before = set(dashboard.SESSIONS)
    server = pn.serve({"/": create}, port=port, address="127.0.0.1", threaded=True, show=False,
                      websocket_origin=[f"127.0.0.1:{port}"])
    _wait(lambda: getattr(server, "is_alive", lambda: True)(), 10, "the server")
    # the thread starts before its socket listens (a page opened at once was refused)
    _wait(lambda: _accepts(port), 30, "the server's port")

    def sessions():
        return [d for d in dashboard.SESSIONS if d not in before]

    try:
        yield f"http://127.0.0.1:{port}", sessions
    finally:
        server.stop()
        pn.config.nthreads = None


def _bokeh_columns(page, column):
    """Every array named ``column`` in the browser's ColumnDataSources (what Bokeh draws)."""
    return page.evaluate("""(col) => {
        const out = [];
        for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
          for (const m of doc._all_models.values()) {
            const d = m.data;
            if (!d) continue;
            const v = d.get ? d.get(col) : d[col];
            if (v && v.length) out.push(Array.from(v));
          }
        }
        return out;
    }""", column)


def _shown(page, column, want):
    """Whether the browser holds ``want`` (all of it) as a column of some data source."""
    for arr in _bokeh_columns(page, column):
        if len(arr) == len(want) and np.allclose(np.asarray(arr, float), want, rtol=1e-9):
            return True
    return False


def test_dashboard_end_to_end(page, served, results_dir):
    from solver import dmft, simulate
    from solver.config import Experiment

    base, sessions = served
    external = []
    page.on("request", lambda r: external.append(r.url)
            if urlparse(r.url).hostname not in LOCAL and urlparse(r.url).scheme.startswith("http")
            else None)
    # a link with a (small) configuration: the URL sets the experiment
    page.goto(base + '/?T=2&d=300&seeds=2&samples=600&sims=["sgf","sgd-fresh"]&gd_theory=false')
    run_btn = page.get_by_role("button", name="▶ Run")
    run_btn.wait_for(timeout=90_000)
    dash = _wait(lambda: (sessions() or [None])[-1], 30, "the session")
    exp = dash.experiment
    assert (exp.T, exp.d, exp.seeds, exp.samples) == (2.0, 300, 2, 600)
    assert dash.sims == ["sgf", "sgd-fresh"]

    # change a parameter in the page: delta (first numeric input of the sidebar)
    delta_in = page.locator("input.bk-input").first
    assert delta_in.input_value() == "2"
    delta_in.fill("3")
    delta_in.press("Enter")
    _wait(lambda: exp.delta == 3.0, 20, "delta = 3 on the server")
    # ... and the URL follows the configuration
    _wait(lambda: "delta=3" in page.evaluate("() => window.location.search"), 20,
          "the query string to follow")

    run_btn.click()
    _wait(lambda: dash.store.current is not None and dash.store.current.finished, 120,
          "the run to finish")
    page.get_by_text("Done in").first.wait_for(timeout=30_000)
    run = dash.store.current
    assert {s.status for s in run.series.values()} == {"done"}, \
        {k: s.message for k, s in run.series.items()}

    # the plotted values are those of a direct solver call with the session's configuration
    th = dmft.solve(exp.copy(algo="sgf", sampling="fresh"))
    sim = simulate.run(exp.copy(algo="sgd", sampling="fresh"))
    for key, res in (("theory", th), ("sgd-fresh", sim)):
        for obs in ("train_loss", "test_loss", "m"):
            x, v, se = dash.plotted(key, obs)
            np.testing.assert_allclose(x, res.t)
            np.testing.assert_allclose(v, getattr(res, obs), rtol=1e-9, atol=1e-13)
    # ... and reached the browser (Bokeh's data sources hold the theory's training loss)
    _wait(lambda: _shown(page, "train_loss", th.train_loss), 30,
          "the theory's training loss in the browser's plot data")

    # Stop: a longer run, stopped while it streams
    exp.T = 40.0
    _wait(lambda: "T=40" in page.evaluate("() => window.location.search"), 20, "the URL")
    run_btn = page.get_by_role("button", name="▶ Run again")
    run_btn.click()
    _wait(lambda: dash.store.current is not run and len(dash.store.current.series["theory"]) > 2,
          60, "the second run to stream")
    page.get_by_role("button", name="■ Stop").click()
    _wait(lambda: not dash.runner.busy(), 10, "the engines to stop after Stop")
    page.get_by_text("Stopped").first.wait_for(timeout=20_000)
    stopped = dash.store.current
    assert {s.status for s in stopped.series.values()} <= {"stopped", "done"}
    assert len(stopped.series["theory"]) < Experiment(T=40.0, dt=exp.dt).steps + 1

    # export the CSV of every curve
    with page.expect_download(timeout=30_000) as dl:
        page.get_by_role("button", name="CSV of every curve").click()
    path = results_dir / "dashboard-curves.csv"
    dl.value.save_as(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows and {r["run"] for r in rows} == {stopped.label}
    theory_rows = [r for r in rows if r["series"] == "theory"]
    assert len(theory_rows) == len(stopped.series["theory"])
    x, v, _ = dash.plotted("theory", "train_loss")
    np.testing.assert_allclose([float(r["train_loss"]) for r in theory_rows], v, rtol=1e-12)
    with page.expect_download(timeout=30_000) as dl:
        page.get_by_role("button", name="Configuration (JSON)").click()
    cfg = json.loads(open(dl.value.path()).read())
    assert Experiment.from_dict(cfg["experiment"]).to_dict() == exp.to_dict()
    # ... and the PNG of the curves, drawn on the server (no browser there)
    with page.expect_download(timeout=60_000) as dl:
        page.get_by_role("button", name="PNG of the curves").click()
    png = (results_dir / "dashboard-curves.png")
    dl.value.save_as(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") >= 1000 and len(data) > 30_000

    # the About tab typesets its equations offline (MathJax from the Panel server)
    page.get_by_text("About", exact=True).first.click()
    page.get_by_text("The model and its DMFT").first.wait_for(timeout=30_000)
    _wait(lambda: page.locator("mjx-container").count() >= 5, 30, "typeset equations", poll=0.5)
    page.get_by_text("Curves", exact=True).first.click()
    # the tab is rebuilt in the browser when shown again: wait for the plots' canvases
    _wait(lambda: page.locator("canvas").count() >= 6, 30, "the curve plots", poll=0.5)
    time.sleep(1.0)
    page.screenshot(path=str(results_dir / "dashboard.png"), full_page=True)

    bad = [u for u in external if urlparse(u).hostname not in ALLOWED_EXTERNAL]
    assert not bad, f"the page asked the network for {bad}"


def test_invalid_input_shows_alert(page, served):
    base, sessions = served
    page.goto(base + "/?loss=logistic&teacher=linear")
    page.get_by_role("button", name="▶ Run").wait_for(timeout=90_000)
    page.get_by_role("button", name="▶ Run").click()
    page.get_by_text("Invalid configuration").first.wait_for(timeout=20_000)
    dash = sessions()[-1]
    assert dash.store.current is None and not dash.runner.busy()
