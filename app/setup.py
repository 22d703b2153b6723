"""Process-wide start-up for the dashboard server: warm the numba kernels in the background.

Used as ``panel serve --setup app/setup.py`` by ``sgf-dmft serve`` and called (idempotently)
by ``app/main.py``. Set ``SGF_DMFT_NO_WARMUP=1`` to skip it (tests with fake engines).

``SGF_DMFT_LATENCY_LOG=path`` (load tests) also appends server-side latencies to ``path``, one
JSON object a line: ``{"kind": "lag", "ms": ...}`` every 0.25 s, the delay of a callback
scheduled on the server's event loop (the least time any browser event waits before the server
looks at it), and ``{"kind": "ws", "ms": ...}``, from the arrival of a browser's websocket
message to the server sending the patch that shows the new "n = δd" line (the dependent
update the load test waits for).
"""
from __future__ import annotations

import os
import threading

_started = threading.Event()


def start_warmup() -> bool:
    """Start solver.warmup in a daemon thread once per process; False if skipped."""
    if _started.is_set() or os.environ.get("SGF_DMFT_NO_WARMUP"):
        return False
    _started.set()
    try:
        from solver.warmup import warmup_in_background
    except ImportError:
        return False

    def run():
        try:
            warmup_in_background().join()
        except Exception:  # noqa: BLE001 - engines not there yet: the first Run compiles
            pass

    threading.Thread(target=run, name="sgf-dmft-warmup-start", daemon=True).start()
    return True


_probe = threading.Event()


def install_latency_probe(path: str | None = None) -> bool:
    """Log server-side latencies to ``path`` (default ``$SGF_DMFT_LATENCY_LOG``); see the
    module docstring. Idempotent; False if not enabled."""
    path = path or os.environ.get("SGF_DMFT_LATENCY_LOG")
    if not path or _probe.is_set():
        return False
    _probe.set()
    import json
    import time

    from bokeh.server.views.ws import WSHandler

    lock = threading.Lock()

    def write(kind, ms):
        with lock, open(path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "t": round(time.time(), 3),
                                 "ms": round(ms, 2)}) + "\n")

    def lag_thread(loop):
        while True:
            t0 = time.perf_counter()
            done = threading.Event()
            loop.add_callback(done.set)
            if not done.wait(120):
                write("lag", 120000.0)
                continue
            write("lag", 1000 * (time.perf_counter() - t0))
            time.sleep(0.25)

    handle, send_message = WSHandler._handle, WSHandler.send_message

    async def handle_probe(self, message):
        if not getattr(WSHandler, "_sgf_lag_started", False):
            from tornado.ioloop import IOLoop

            WSHandler._sgf_lag_started = True
            threading.Thread(target=lag_thread, args=(IOLoop.current(),), daemon=True,
                             name="sgf-dmft-lag-probe").start()
        if (getattr(self, "_sgf_t_in", None) is None and message.msgtype == "PATCH-DOC"
                and '"value"' in str(message.content).replace("'", '"')):
            self._sgf_t_in = time.perf_counter()  # a widget's new value arrived
        return await handle(self, message)

    async def send_message_probe(self, message):
        t_in = getattr(self, "_sgf_t_in", None)
        if t_in is not None and message.msgtype == "PATCH-DOC":
            try:
                hit = "δd" in str(message.content)
            except Exception:  # noqa: BLE001
                hit = False
            if hit:
                write("ws", 1000 * (time.perf_counter() - t_in))
                self._sgf_t_in = None
        return await send_message(self, message)

    WSHandler._handle = handle_probe
    WSHandler.send_message = send_message_probe
    return True


if __name__ != "app.setup":  # run as a script (panel serve --setup app/setup.py)
    from app.setup import start_warmup as _start  # the importable module holds the flag

    _start()
    from app.setup import install_latency_probe as _probe_start

    _probe_start()
