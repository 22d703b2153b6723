"""Server responsiveness under load: the sidebar's edits are handled on the server's event loop
(app.controls.handle_on_loop), not in Panel's ``--num-threads`` pool (one locked callback, no
pool hop, no 50 ms debounce for typed values); the compute threads run at a lower CPU priority
than the event loop (app.pool.lower_priority). No browser; budget about 5 s on 2 cores."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

import panel as pn  # noqa: E402
from bokeh.document import Document  # noqa: E402
from panel.io.state import state  # noqa: E402

from app import controls, pool as pool_mod  # noqa: E402
from app.dashboard import Dashboard  # noqa: E402


def run_coroutine(coro):
    """``asyncio.run`` in a thread of its own: Playwright's sync API (tests/test_ui.py) leaves
    an event loop running in the main thread, where ``asyncio.run`` refuses to start."""
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


class CountingPool(ThreadPoolExecutor):
    def __init__(self):
        super().__init__(max_workers=1)
        self.submitted = []

    def submit(self, fn, *a, **kw):
        self.submitted.append(fn)
        return super().submit(fn, *a, **kw)


@pytest.fixture
def pool(monkeypatch):
    p = CountingPool()
    monkeypatch.setattr(state, "_thread_pool", p)
    yield p
    p.shutdown(wait=True)


def test_typed_delta_is_processed_in_the_callback_without_the_pool(pool):
    dash = Dashboard(engines={}, period_ms=0)
    try:
        box = controls.inner_widget(dash.param_widgets["delta"])._value_edit
        assert box._debounce == 0
        old_n = dash.experiment.n
        box._events = {"value": 3.0}  # what Panel's _server_change queues for the browser's edit
        run_coroutine(box._change_coroutine(Document()))
        assert dash.experiment.delta == 3.0
        assert f"n = δd = {dash.experiment.n:,} samples" in dash.horizon.object
        assert dash.experiment.n != old_n
        assert changes_in(pool) == []  # handled in the callback itself
    finally:
        dash.close()


def changes_in(pool):
    return [f for f in pool.submitted if getattr(f, "__name__", "") == "_change_event"]


def test_without_it_panel_sends_the_change_to_its_pool(pool):
    w = pn.widgets.FloatInput(value=1.0)  # control: Panel's own path with --num-threads
    w._events = {"value": 2.0}
    run_coroutine(w._change_coroutine(Document()))
    pool.shutdown(wait=True)
    assert len(changes_in(pool)) == 1 and w.value == 2.0


def test_only_the_experiments_widgets_and_not_dragged_sliders(pool):
    dash = Dashboard(engines={}, period_ms=0)
    try:
        slider = controls.inner_widget(dash.param_widgets["delta"])._slider
        assert "_change_coroutine" in vars(slider)
        assert slider._debounce == type(slider)._debounce  # drags stay debounced
        # watchers that rebuild plots stay in the pool
        for w in (dash.sims_widget, dash.gd_theory_widget, dash.preset_select):
            assert "_change_coroutine" not in vars(w)
        for w in dash.param_widgets.values():
            for x in w.select(pn.widgets.Widget):
                assert "_change_coroutine" in vars(x)
    finally:
        dash.close()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(controls.WIDGETS_ON_LOOP_ENV, "0")
    w = pn.widgets.FloatInput(value=1.0)
    assert controls.handle_on_loop(w) == 0
    assert "_change_coroutine" not in vars(w)
    monkeypatch.delenv(controls.WIDGETS_ON_LOOP_ENV)
    assert controls.handle_on_loop(w) == 1 and controls.handle_on_loop(w) == 0


def _nice_of_thread(increment, out):
    out["raised"] = pool_mod.lower_priority(increment)
    out["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    child = {}
    th = threading.Thread(target=lambda: child.update(
        nice=os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    th.start()
    th.join()
    out["child"] = child["nice"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_compute_threads_run_below_the_event_loop():
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    out = {}
    th = threading.Thread(target=_nice_of_thread, args=(5, out))
    th.start()
    th.join()
    if base + 5 > 19:
        pytest.skip("already at the lowest priority")
    assert out == {"raised": True, "nice": base + 5, "child": base + 5}  # inherited (numba's)
    # this thread (the event loop's, in the server) keeps its priority
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    out = {}
    th = threading.Thread(target=_nice_of_thread, args=(0, out))
    th.start()
    th.join()
    assert out["raised"] is False and out["nice"] == base
