"""Sessions opened and closed leave nothing behind in the server process.

The page (the script ``app/main.py``, as ``panel serve app/main.py`` runs it) is served in-process
with Bokeh's unused-session lifetime lowered to 0.5 s; each HTTP GET of the page builds one
session (Dashboard, template, Bokeh document) that is destroyed once unused. After the
sessions are destroyed and a ``gc.collect()``, the number of live session-owned objects must be
back at the baseline: Dashboards, Panel's link registry (the editable sliders' jscallbacks,
which kept every Dashboard alive before ``app.cleanup.release``), HoloViews' stream registry and
custom option trees. Counts of objects, not an RSS threshold.

Budget: about 15 s on a quiet 2-core machine (3 page builds; 30 s at load 4).
"""
from __future__ import annotations

import gc
import os
import socket
import time
import urllib.request

import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

pn = pytest.importorskip("panel")
hv = pytest.importorskip("holoviews")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_counts() -> dict:
    from holoviews.core.options import Store
    from panel.links import Callback

    from app.cleanup import count_live
    from app.dashboard import Dashboard

    gc.collect()
    return {"dashboards": count_live(Dashboard),
            "links": len(Callback.registry),
            "streams": len(hv.streams.Stream.registry),
            "option_trees": len(Store._custom_options.get("bokeh", {}))}


def test_closed_sessions_release_everything():
    import app.main as main

    main.extensions()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/app"
    # the script, not a function: a served script's module globals are cleared after each
    # session (a destroy hook that looked ``release`` up there silently failed)
    server = pn.serve({"app": main.__file__}, port=port, address="127.0.0.1", threaded=True,
                      show=False, start=True, websocket_origin=f"127.0.0.1:{port}",
                      unused_session_lifetime_milliseconds=500,
                      check_unused_sessions_milliseconds=200, liveness=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

        def open_pages(n):
            for _ in range(n):
                with urllib.request.urlopen(url, timeout=120) as r:
                    assert r.status == 200 and b"bokeh" in r.read().lower()

        def settled(target=None, timeout=20.0):
            """Counts once the sessions are destroyed (every count stops changing)."""
            t_end = time.monotonic() + timeout
            prev = None
            while True:
                time.sleep(1.0)
                c = live_counts()
                if (c == prev and (target is None or c["dashboards"] <= target)) \
                        or time.monotonic() > t_end:
                    return c
                prev = c

        # Dashboards built outside a server (other tests) are not released: count from here
        pre = live_counts()
        open_pages(1)  # imports, class-level caches and first-use state
        base = settled(target=pre["dashboards"])
        assert base["dashboards"] == pre["dashboards"], (pre, base)
        open_pages(2)
        after = settled(target=pre["dashboards"])
        assert after == base, f"sessions left objects behind: {base} -> {after}"
    finally:
        server.stop()


def test_trace_growth_reports_python_allocations(tmp_path):
    """The load test's memory probe (``PYTHONTRACEMALLOC``): after a first snapshot, growth is
    reported by traceback, and what this test allocates in between shows up in it."""
    import tracemalloc

    from app import cleanup

    path = str(tmp_path / "growth.txt")
    assert not cleanup.trace_growth(path) or tracemalloc.is_tracing()
    tracemalloc.start(4)
    try:
        cleanup._first_snapshot = None
        assert cleanup.trace_growth(path)  # the reference snapshot
        kept = [bytearray(1000) for _ in range(2000)]  # 2 MB that stay alive
        assert cleanup.trace_growth(path)
    finally:
        tracemalloc.stop()
        cleanup._first_snapshot = None
    text = open(path).read()
    head = float(text.split("traced growth since the first collection: ")[1].split()[0])
    assert head >= 1.9 and "test_leak.py" in text, text[:500]
    del kept
