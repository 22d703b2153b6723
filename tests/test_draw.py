"""The direct update path of the curve plots (app/draw.py), without a browser: the plots are
rendered by HoloViews into a Bokeh document as a served session would, then updated directly.

Reference: HoloViews' own update (the Pipe) of the same plots with the same data; the direct
path must leave the same columns in every Bokeh source and the same axis ranges, send only new
rows when a series grows, replace a source whose rows are not a prefix of the new data, and
fall back to the Pipe where no rendered plots exist. Budget: about 15 s on 2 cores.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

import bokeh.document  # noqa: E402
import holoviews as hv  # noqa: E402
import panel as pn  # noqa: E402
from bokeh.document.events import ColumnDataChangedEvent, ColumnsStreamedEvent  # noqa: E402

from app import draw, plots  # noqa: E402
from app.store import CURVES  # noqa: E402

if "bokeh" not in hv.Store.renderers:
    hv.extension("bokeh", logo=False)

SPECS = [plots.SeriesSpec("0:theory", "theory", "theory (DMFT mc)", True),
         plots.SeriesSpec("0:gd", "gd", "GD", False),
         plots.SeriesSpec("0:sgf", "sgf", "SGF", False),
         plots.SeriesSpec("1:theory", "theory", "theory (DMFT mc) (run 1)", True, 1)]


def fake_data(n: int, expected: int = 60, stride: int = 1) -> dict:
    """Curve data as app.plots.curve_data makes it: ``n`` recorded points (every ``stride``-th
    of a dense grid), an SE of 0 for some points, a NaN test error, values reaching below 0
    (dropped on a log axis)."""
    out = {}
    for j, sp in enumerate(SPECS):
        t = np.arange(n) * 0.1 * stride
        vals = {}
        for i, obs in enumerate(CURVES):
            v = np.exp(-t * (1 + 0.1 * i)) + 0.05 * j - (0.02 if obs == "m" else 0.0)
            s = np.full(n, 0.01 if not sp.theory else 0.002)
            s[::7] = np.nan
            if obs == "test_error":
                v = np.full(n, np.nan)
            vals[obs] = (v, s)
        out[sp.sid] = {"x": 2 * t if j == 2 else t, "t": t, "values": vals, "expected": expected}
    return out


def rendered(axis="t", logy=False, obs=("train_loss", "m")):
    grid = plots.CurveGrid(SPECS, axis, logy=logy, observables=obs)
    pane = pn.pane.HoloViews(grid.layout, linked_axes=False)
    doc = bokeh.document.Document()
    root = pane.get_root(doc)
    doc.add_root(root)
    return grid, pane, doc


def snapshot(grid, pane) -> dict:
    """obs -> ([columns of each source], (x0, x1), (y0, y1)) of the rendered plots."""
    (t,) = draw.DirectCurves(grid).targets(pane)
    out = {}
    for obs, (items, xr, yr) in t.obs.items():
        out[obs] = ([{k: np.asarray(v, float).copy() for k, v in src.data.items()}
                     for _, _, src in items], (xr.start, xr.end), (yr.start, yr.end))
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for obs in a:
        for i, (ca, cb) in enumerate(zip(a[obs][0], b[obs][0])):
            assert ca.keys() == cb.keys(), (obs, i)
            for k in ca:
                np.testing.assert_allclose(ca[k], cb[k], rtol=1e-12, equal_nan=True,
                                           err_msg=f"{obs} element {i} column {k}")
        np.testing.assert_allclose(a[obs][1], b[obs][1], rtol=1e-9, err_msg=f"{obs} x range")
        np.testing.assert_allclose(a[obs][2], b[obs][2], rtol=1e-9, err_msg=f"{obs} y range")


@pytest.mark.parametrize("axis, logy", [("t", False), ("epochs", True)])
def test_direct_update_matches_holoviews(axis, logy):
    grid, pane, doc = rendered(axis, logy)
    for n in (1, 9, 40):
        data = fake_data(n)
        grid.pipe.send(data)  # HoloViews draws the reference
        ref = snapshot(grid, pane)
        grid.pipe.send(fake_data(max(0, n - 5)))  # older state, drawn by HoloViews
        assert draw.send_curves(grid, pane, data)
        assert_same(snapshot(grid, pane), ref)
        assert grid.pipe.data is data  # the Pipe follows (silently)
    assert draw.stats(grid)["direct"] == 3


def test_growing_series_are_streamed_and_hold_exactly_the_data():
    grid, pane, doc = rendered()
    events = []
    doc.on_change(events.append)
    sizes = (3, 10, 25)
    prev = None
    for n in sizes:
        events.clear()
        data = fake_data(n)
        assert draw.send_curves(grid, pane, data)
        if prev is not None:
            streamed = [e for e in events if isinstance(e, ColumnsStreamedEvent)]
            replaced = [e for e in events if isinstance(e, ColumnDataChangedEvent)]
            assert streamed
            # only the bands (one polygon each: 2 theory series x 2 plots) are replaced
            assert len(replaced) == 4
            assert all(set(e.cols or e.model.data) == {"x", "y"} for e in replaced)
            # each theory line (all points) got exactly the new rows
            lines = {src.id for sp, role, src in draw.DirectCurves(grid).targets(pane)[0]
                     .obs["train_loss"][0] if role == "line"}
            got = [len(e.data["t"]) for e in streamed if e.model.id in lines]
            assert got == [n - prev] * 2
        prev = n
    # the sources hold the data of the last update, the ranges cover it
    (t,) = draw.DirectCurves(grid).targets(pane)
    items, xr, yr = t.obs["train_loss"]
    d = fake_data(sizes[-1])
    for sp, role, src in items:
        if role == "line":
            v, s = d[sp.sid]["values"]["train_loss"]
            np.testing.assert_array_equal(src.data["t"], d[sp.sid]["x"])
            np.testing.assert_array_equal(src.data["train_loss"], v)
            np.testing.assert_array_equal(src.data["train_loss_se"], np.nan_to_num(s))
    xs = np.concatenate([d[sp.sid]["x"] for sp in SPECS])
    assert xr.start <= xs.min() and xr.end >= xs.max()
    for sp in SPECS:
        v, s = d[sp.sid]["values"]["train_loss"]
        assert yr.start < np.nanmin(v - np.nan_to_num(s)) and yr.end > np.nanmax(v + s)


def test_rows_that_change_replace_the_source():
    """When the store's stride doubles (every other point dropped) the rows are no prefix of
    the new data: the source is replaced, and holds exactly the new data."""
    grid, pane, doc = rendered()
    assert draw.send_curves(grid, pane, fake_data(30))
    events = []
    doc.on_change(events.append)
    new = fake_data(16, stride=2)
    assert draw.send_curves(grid, pane, new)
    assert not [e for e in events if isinstance(e, ColumnsStreamedEvent)]
    grid.pipe.send(new)
    ref = snapshot(grid, pane)
    assert draw.send_curves(grid, pane, new)  # unchanged data: nothing sent
    assert_same(snapshot(grid, pane), ref)


def test_falls_back_without_rendered_plots():
    grid = plots.CurveGrid(SPECS, "t", observables=("train_loss",))
    pane = pn.pane.HoloViews(grid.layout)
    assert not draw.send_curves(grid, pane, fake_data(5))  # never rendered
    other = plots.CurveGrid(SPECS, "t", observables=("train_loss",))
    g2, pane2, _ = rendered(obs=("train_loss",))
    assert not draw.send_curves(other, pane2, fake_data(5))  # the pane shows another grid
    assert draw.send_curves(g2, pane2, fake_data(5))


def test_axis_range_like_holoviews():
    assert draw.axis_range((1.0, 3.0), 0.1, False) == pytest.approx((0.8, 3.2))
    assert draw.axis_range((2.0, 2.0), 0.0, False) == (1.0, 3.0)
    lo, hi = draw.axis_range((1e-3, 1e-1), 0.1, True)
    assert math.log10(lo) == pytest.approx(-3.2) and math.log10(hi) == pytest.approx(-0.8)
    assert draw.axis_range((0.5, 0.5), 0.0, True)[0] == 0.01  # 0.5 - 1 <= 0 on a log axis


def test_backpressure_skips_while_writing_but_not_forever(monkeypatch):
    _, pane, _ = rendered(obs=("train_loss",))
    pending = [3]
    monkeypatch.setattr(draw, "pending_writes", lambda doc: pending[0])
    clock = [100.0]
    monkeypatch.setattr(draw.time, "perf_counter", lambda: clock[0])
    bp = draw.Backpressure(max_wait=2.0)
    assert bp.busy(pane)
    clock[0] += 1.5
    assert bp.busy(pane)
    clock[0] += 1.0  # stuck for longer than max_wait: draw anyway
    assert not bp.busy(pane)
    pending[0] = 0
    assert not bp.busy(pane)
    assert bp.skipped == 2
    assert draw.pending_writes(bokeh.document.Document()) == 0  # no server session


def test_dashboard_draws_directly_into_a_rendered_page():
    """A Dashboard rendered into a document: the live run draws directly, and the Bokeh
    sources end up holding what the store holds (fake engines)."""
    from test_app import dashboard

    d = dashboard()
    doc = bokeh.document.Document()
    d.template().server_doc(doc)
    assert d.run()
    assert d.wait(30)
    st = draw.stats(d.grid)
    assert st["direct"] >= 1
    x, v, _ = d.plotted("theory", "train_loss")
    assert len(x) == 11
    (t,) = draw.DirectCurves(d.grid).targets(d.curves_pane)
    items, xr, yr = t.obs["train_loss"]
    line = [src for sp, role, src in items if sp.key == "theory" and role == "line"][0]
    np.testing.assert_array_equal(line.data["t"], x)
    np.testing.assert_array_equal(line.data["train_loss"], v)
    assert xr.start <= x.min() and xr.end >= x.max()
    d.close()


def test_draw_pacer_bounds_the_redraw_rate_of_cheap_redraws():
    """Cheap (direct) redraws still cost the browsers: the sessions together redraw at most
    1 / interval times a second."""
    from app.runner import DrawPacer

    p = DrawPacer(share=0.25, window=60.0, interval=0.1)
    sessions = [object() for _ in range(10)]
    waits = [p.delay(s, 0.005, 0.15) for s in sessions]
    assert waits[0] == pytest.approx(0.15)  # alone: the period
    assert waits[-1] == pytest.approx(1.0)  # ten: 10 x 0.1 s
    assert p.delay(sessions[0], 0.05, 0.15) == pytest.approx(0.05 * (10 / 0.25 - 1))
