"""The dashboard's Sweep tab, headless: value parsing and validation, a tiny real DMFT sweep whose
heatmap equals ``solver.sweep``'s table, the cache on a second launch, failed points, Stop and
session end, and opening a cell in the main view.

Budget on 2 cores: about 10 s headless (one 2 x 2 DMFT sweep with T = 0.5, 64 trajectories; the
rest uses fake solve functions) plus 15-20 s for the browser test (``pytest.mark.ui``: serves the
app, launches a 4 x 4 sweep from the page and clicks a cell). No wall-clock assertions; waits
have generous timeouts.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

import holoviews as hv  # noqa: E402

from solver import sweep as sw  # noqa: E402
from solver.config import ConfigError, Experiment  # noqa: E402
from solver.snapshot import Result, Snapshot  # noqa: E402

from app import sweep_tab as st  # noqa: E402
from app.dashboard import Dashboard  # noqa: E402
from app.store import THEORY  # noqa: E402

SMALL = dict(T=0.5, dt=0.1, samples=64)


def fake_solve(exp, cancel=None):
    """Closed-form curves; raises for lam = 0.5 (a crash the tab must show per point)."""
    if exp.lam == 0.5:
        raise RuntimeError("boom")
    res = Result(config=exp.to_dict(), engine="fake")
    for k in range(3):
        t = k * exp.T / 2
        m = (1 - math.exp(-exp.delta * t)) / (1 + exp.lam)
        vals = dict(train_loss=0.1 + m, test_loss=0.2 + m + exp.lam, test_error=0.3, m=m,
                    Q=m * m + 0.01, cosine=0.5)
        res.append(Snapshot(t, k, t, vals, {n: 0.0 for n in vals}, {}, "fake", k / 2))
    return res


def blocking_solve(exp, cancel=None):
    """Runs until cancelled."""
    while not cancel.is_set():
        time.sleep(0.005)
    res = Result(config=exp.to_dict(), engine="fake")
    res.status, res.message = "cancelled", "cancelled"
    return res


def fake_stream(exp, cancel=None):
    for k in range(3):
        vals = dict(train_loss=1.0, test_loss=1.0, test_error=0.5, m=0.1 * k, Q=0.1, cosine=0.1)
        yield Snapshot(k * exp.dt, k, k * exp.dt, vals, {}, {}, "fake", k / 2)


@pytest.fixture
def dash(tmp_path):
    d = Dashboard(experiment=Experiment(**SMALL), period_ms=0, sync_url=False,
                  engines={"theory": fake_stream, "sim": fake_stream})
    d.sims = []
    d.sweep_tab.cache_dir = str(tmp_path / "cache")
    yield d
    d.close()


def setup(tab, x, xv, y, yv, solve=None):
    tab.x, tab.y = x, y
    tab.x_values, tab.y_values = xv, yv
    tab.solve = solve


# --- parsing and validation ----------------------------------------------------------------
def test_parse_values_lists_ranges_and_errors_naming_the_parameter():
    assert st.parse_values("tau", "0, 0.5,1,2") == [0.0, 0.5, 1.0, 2.0]
    assert st.parse_values("delta", "1:3:3") == [1.0, 2.0, 3.0]
    assert st.parse_values("samples", "100,200") == [100, 200]
    for name, text, words in [("tau", "-1", ["tau", "outside", "[0.0, 100.0]"]),
                              ("tau", "a,b", ["tau", "must be a number"]),
                              ("delta", "", ["delta", "no values"]),
                              ("delta", "1,1", ["delta", "given twice"]),
                              ("samples", "1.5", ["samples", "integer"]),
                              ("eta", "1,2", ["eta", "cannot be swept"]),
                              ("tau", "0;delta=1", ["tau"])]:
        with pytest.raises(ConfigError) as e:
            st.parse_values(name, text)
        assert e.value.param == name, (name, text, str(e.value))
        for w in words:
            assert w in str(e.value), (name, text, str(e.value))
    assert "eta" not in st.sweepable() and {"tau", "delta", "lam"} <= set(st.sweepable())
    for n in st.sweepable():  # the suggested range of every parameter is valid
        assert st.parse_values(n, st.suggested_values(n))


def test_launch_refuses_invalid_input_with_an_alert(dash, monkeypatch):
    tab = dash.sweep_tab
    setup(tab, "tau", "0,1", "tau", "1,2")
    assert not tab.launch() and tab.alert.visible and "two different" in tab.alert.object
    setup(tab, "tau", "0,-1", "delta", "1,2")
    assert not tab.launch() and "tau" in tab.alert.object and "[0.0, 100.0]" in tab.alert.object
    monkeypatch.setenv(st.MAX_POINTS_ENV, "3")
    setup(tab, "tau", "0,1", "delta", "1,2")
    assert not tab.launch() and "4 points" in tab.alert.object and st.MAX_POINTS_ENV in \
        tab.alert.object
    monkeypatch.delenv(st.MAX_POINTS_ENV)
    monkeypatch.setenv("SGF_DMFT_MAX_SAMPLES", "100")  # the session caps of app.pool
    setup(tab, "tau", "0,1", "samples", "64,128")
    assert not tab.launch() and "samples" in tab.alert.object
    assert tab.sweep is None
    setup(tab, "tau", "0,1", "samples", "64,100")
    assert tab.launch()  # within the cap: accepted
    tab.stop()


# --- a real sweep ---------------------------------------------------------------------------
def test_real_sweep_heatmap_equals_solver_sweep_table_then_cache_then_open(dash):
    tab = dash.sweep_tab
    setup(tab, "tau", "0,1", "delta", "1,2")
    assert tab.launch()
    assert tab.wait(300), tab.progress_text()
    assert tab.progress_text() == "4/4 points, 0 from cache"
    grid = {"tau": [0.0, 1.0], "delta": [1.0, 2.0]}
    ref = sw.sweep(grid, tab.fixed, cache=False, backend="serial")
    assert set(ref.table.status) == {"ok"}
    for col in ("test_loss_final", "Q_final", "t_test_loss_min"):
        tab.summary = col
        np.testing.assert_array_equal(tab.values, ref.table[col].to_numpy().reshape(2, 2))
        # what the heatmap was sent: (j, i) arrays, the exact value as text for the hover
        tab._send()
        np.testing.assert_array_equal(tab.last_data["value"], tab.values.T)
        assert tab.last_data["exact"][1, 0] == repr(float(tab.values[0, 1]))
    sw.compare_tables(ref.table, tab.table())  # the tab's rows are solver.sweep's table
    fig = hv.render(tab.dmap)  # the Bokeh figure builds, and sends clicks to the Tap stream
    assert "tap" in fig.subscribed_events

    # a second launch is served from the cache, with the same numbers
    first = tab.values
    assert tab.launch() and tab.wait(60)
    assert tab.progress_text() == "4/4 points, 4 from cache"
    np.testing.assert_array_equal(tab.values, first)
    assert tab.table().cache_hit.all()
    sw.compare_tables(ref.table, tab.table())
    assert tab._csv_file().getvalue().startswith("point,tau,delta,")

    # a click on cell (tau=1, delta=2) opens that run in the main view, without computing
    dash.tabs.active = 4
    tab.tap.event(x=1.0, y=1.0)
    assert (dash.experiment.tau, dash.experiment.delta) == (1.0, 2.0)
    assert dash.experiment.samples == SMALL["samples"] and dash.tabs.active == 0
    run = dash.store.current
    s = run.series[THEORY]
    assert s.status == "done" and not dash.runner.busy()
    res = ref.result(3)
    np.testing.assert_array_equal(s.values["test_loss"], res.test_loss)
    x, v, _ = dash.plotted(THEORY, "test_loss")
    np.testing.assert_array_equal(v, res.test_loss)


# --- failures, stop, session end, opening uncomputed points ------------------------------
def test_failed_points_are_shown_and_the_others_complete(dash):
    tab = dash.sweep_tab
    dash.experiment.q0 = 0.0
    # lam = 0.5 crashes the solver; m0 = 0.5 with q0 = 0 is an invalid configuration
    setup(tab, "lam", "0,0.5,1", "m0", "0,0.5", solve=fake_solve)
    assert tab.launch() and tab.wait(60)
    state = tab.state
    assert list(state[:, 1]) == ["error"] * 3        # m0 = 0.5: invalid everywhere
    assert list(state[:, 0]) == ["ok", "error", "ok"]
    assert "boom" in tab.rows[2]["message"] and "m0" in tab.rows[1]["message"]
    assert tab.progress_text() == "6/6 points, 0 from cache, 4 failed"
    v = tab.values
    assert np.isfinite(v[[0, 2], 0]).all() and np.isnan(v[1, 0]) and np.isnan(v[:, 1]).all()
    mi, mj, mt = tab.last_data["marks"]
    assert sorted(zip(mi, mj)) == [(0, 1), (1, 0), (1, 1), (2, 1)] and set(mt) == {"✕"}
    assert tab.last_data["message"][0, 1] == "RuntimeError: boom"
    assert "boom" in tab.failures.object and "lam=0.5, m0=0" in tab.failures.object
    # an invalid point cannot be opened; the experiment is unchanged
    assert not tab.open_point(1) and dash.experiment.m0 == 0.0 and tab.alert.visible


def test_stop_and_session_end_cancel_and_opening_an_uncomputed_point_runs_it(dash):
    tab = dash.sweep_tab
    setup(tab, "tau", "0,1", "delta", "1,2,4", solve=blocking_solve)
    assert tab.launch()
    deadline = time.monotonic() + 30
    while tab.group.running == 0 and time.monotonic() < deadline:  # some points started
        time.sleep(0.01)
    tab.tick()
    assert not tab.finished and "0/6 points" in tab.progress_text()
    tab.stop()
    assert tab.wait(30)
    assert set(tab.state.flat) == {"cancelled"} and tab.progress_text().endswith("6 stopped")
    assert not tab.running and tab.stop_button.disabled
    # a stopped point is run by the main view (here with the dashboard's fake engines)
    assert tab.open_point(5)
    assert (dash.experiment.tau, dash.experiment.delta) == (1.0, 4.0)
    assert dash.wait(30) and dash.store.current.series[THEORY].status == "done"

    # session end cancels a running sweep
    assert tab.launch()
    cancel = tab._cancel
    dash.close()
    assert cancel.is_set()
    deadline = time.monotonic() + 30
    while tab.group.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tab.group.running == 0


def test_cell_coordinates_and_a_new_launch_drops_the_old_sweeps_results(dash):
    tab = dash.sweep_tab
    setup(tab, "delta", "1,2,4", "lam", "0,1", solve=fake_solve)
    assert tab.launch() and tab.wait(60)
    assert tab.sweep.shape == (3, 2)
    assert tab.cell_at(2, 1) == 5 and tab.cell_at(0.4, 0.6) == 1
    assert tab.cell_at(3, 0) is None and tab.cell_at(-1, 0) is None
    # stale events of an earlier sweep never reach the new one
    tab._queue.put((tab._sid - 1, 0, {"status": "ok", "test_loss_final": 99.0}, None))
    setup(tab, "delta", "1,2", "lam", "0", solve=fake_solve)
    assert tab.launch() and tab.wait(60)
    assert tab.values.shape == (2, 1) and 99.0 not in tab.values
    want = [fake_solve(Experiment(**SMALL, delta=d, lam=0.0)).test_loss[-1] for d in (1, 2)]
    np.testing.assert_array_equal(tab.values[:, 0], want)


# --- in the browser (optional; pytest -m ui) ---------------------------------------------------
@pytest.mark.ui
def test_sweep_tab_in_the_browser(page, tmp_path, monkeypatch):
    """Serve the app, launch the default 4 x 4 (tau, delta) sweep of a tiny configuration from
    the page, see the cells reach the browser, click a cell: the Curves tab opens that point."""
    import socket

    import panel as pn

    from app import dashboard
    from app.main import create, extensions

    monkeypatch.setenv("SGF_DMFT_CACHE", str(tmp_path / "cache"))
    extensions()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = set(dashboard.SESSIONS)
    server = pn.serve({"/": create}, port=port, address="127.0.0.1", threaded=True,
                      show=False, websocket_origin=[f"127.0.0.1:{port}"])

    def wait(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def listening():
        with socket.socket() as c:
            return c.connect_ex(("127.0.0.1", port)) == 0

    wait(listening, 30, "the server")
    if True:  # the server is stopped by conftest's _kill_panel_servers
        page.goto(f"http://127.0.0.1:{port}/?T=0.5&dt=0.1&samples=64")
        page.get_by_role("button", name="▶ Run").wait_for(timeout=90_000)
        dash = wait(lambda: [d for d in dashboard.SESSIONS if d not in before], 30,
                    "the session")[-1]
        page.get_by_text("Sweep", exact=True).first.click()
        page.get_by_role("button", name="▶ Launch sweep").click()
        page.get_by_text("Done: 16/16 points").first.wait_for(timeout=120_000)
        tab = dash.sweep_tab
        want = sorted(tab.last_data["exact"].ravel())
        assert all(want)

        def shown():  # every 'exact' column of the page's data sources
            return page.evaluate("""() => { const out = [];
                for (const doc of window.Bokeh.documents)
                  for (const m of doc._all_models.values()) {
                  const d = m.data; const v = d && (d.get ? d.get('exact') : d.exact);
                  if (v && v.length) out.push(Array.from(v)); }
                return out; }""")
        wait(lambda: any(sorted(v) == want for v in shown()), 30, "the cells in the browser")
        box = page.locator("canvas").last.bounding_box()
        page.mouse.click(box["x"] + 0.45 * box["width"], box["y"] + 0.5 * box["height"])
        wait(lambda: dash.tabs.active == 0, 30, "the Curves tab after a click on a cell")
        assert dash.experiment.tau in tab.sweep.axes["tau"]
        assert dash.experiment.delta in tab.sweep.axes["delta"]
        assert dash.store.current.series["theory"].status == "done"
        i, j = tab.cell_at(tab.tap.x, tab.tap.y) // 4, tab.cell_at(tab.tap.x, tab.tap.y) % 4
        assert (dash.experiment.tau, dash.experiment.delta) == \
            (tab.sweep.axes["tau"][i], tab.sweep.axes["delta"][j])
    assert server is not None
