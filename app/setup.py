"""Process-wide start-up for the dashboard server: warm the numba kernels in the background.

Used as ``panel serve --setup app/setup.py`` by ``sgf-dmft serve`` and called (idempotently)
by ``app/main.py``. Set ``SGF_DMFT_NO_WARMUP=1`` to skip it (tests with fake engines).

``SGF_DMFT_LATENCY_LOG=path`` (load tests) also appends server-side latencies to ``path``, one
JSON object a line: ``{"kind": "lag", "ms": ...}`` every 0.25 s, the delay of a callback
scheduled on the server's event loop (the least time any browser event waits before the server
looks at it), and ``{"kind": "ws", "ms": ...}``, from the arrival of a browser's websocket
message to the server sending the patch that shows the new "n = δd" line (the dependent
update the load test waits for; caught both in Bokeh's ``WSHandler.send_message`` and in
Panel's own writes, ``panel.io.document.dispatch_tornado``). ``SGF_DMFT_LATENCY_TRACE=1``
adds the stages of each such change, Panel's thread-pool tasks, slow writes and a sampling
profile of every thread (:func:`_install_stage_trace`, :func:`_start_stack_sampler`).
The warm-up runs at the compute threads' lower CPU priority (``app.pool.lower_priority``).
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
            from app.pool import lower_priority

            lower_priority()  # compute threads (numba's pool too, created here) below the loop
            warmup_in_background().join()
        except Exception:  # noqa: BLE001 - engines not there yet: the first Run compiles
            pass

    threading.Thread(target=run, name="sgf-dmft-warmup-start", daemon=True).start()
    return True


_probe = threading.Event()
_SENT_HOOKS: list = []  # called with the WSHandler when the "n = δd" update is written


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

    def write(kind, ms, **extra):
        with lock, open(path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "t": round(time.time(), 3),
                                 "ms": round(ms, 2), **extra}) + "\n")

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

    def probe_sent(sock, message):
        """A message is being written to ``sock`` (a WSHandler)."""
        if message.msgtype != "PATCH-DOC":
            return
        try:
            content = str(message.content)
            hit = "δd" in content
        except Exception:  # noqa: BLE001
            hit = False
        if not hit:
            return
        t_in = getattr(sock, "_sgf_t_in", None)
        if t_in is not None:
            import re

            m = re.search(r"n = δd = ([\d,]+) samples", content)  # which edit (the load test
            write("ws", 1000 * (time.perf_counter() - t_in),  # types a distinct δ each time)
                  n=int(m.group(1).replace(",", "")) if m else None)
            sock._sgf_t_in = None
        for hook in _SENT_HOOKS:
            hook(sock)

    async def send_message_probe(self, message):
        probe_sent(self, message)
        return await send_message(self, message)

    from panel.io import document as pdoc

    dispatch = pdoc.dispatch_tornado

    def dispatch_probe(conn, events=None, msg=None):
        # Panel writes the patches made inside ``unlocked()`` (a callback on the event loop)
        # itself, not through WSHandler.send_message
        if msg is None and events:
            try:
                msg = conn.protocol.create("PATCH-DOC", events)
            except Exception:  # noqa: BLE001 - let Panel handle (and report) it
                return dispatch(conn, events)
        if msg is not None:
            probe_sent(conn._socket, msg)
        return dispatch(conn, msg=msg)

    WSHandler._handle = handle_probe
    WSHandler.send_message = send_message_probe
    pdoc.dispatch_tornado = dispatch_probe
    if os.environ.get("SGF_DMFT_LATENCY_TRACE"):
        _install_stage_trace(write)
        _start_stack_sampler(path + ".prof.json")
    return True


def _start_stack_sampler(out: str, period: float = 0.02) -> None:
    """Sample every thread's Python stack every ``period`` s (with the latency trace); each
    second's counts, per thread group (the event loop = main thread, Panel's pool, the solver
    workers, ...), go to ``out`` (JSON, rewritten every 5 s): samples, thread CPU seconds, the
    functions on the stack (inclusive) and at its top (self)."""
    import collections
    import json
    import sys
    import time

    main_id = threading.main_thread().ident
    buckets: dict = {}
    cpu_clocks: dict = {}

    def group(th) -> str:
        if th is None:
            return "?"
        if th.ident == main_id:
            return "loop"
        name = th.name
        if name.startswith("ThreadPoolExecutor"):
            return "panel-pool"
        return name.rstrip("0123456789-_") or name

    def label(code) -> str:
        f = code.co_filename
        for key in ("site-packages/", "/work/main/"):
            if key in f:
                f = f.split(key, 1)[1]
                break
        return f"{f}:{code.co_name}"

    def run():
        last_dump = time.time()
        last_cpu: dict = {}
        while True:
            time.sleep(period)
            now = time.time()
            sec = int(now)
            b = buckets.setdefault(sec, {})
            threads = {t.ident: t for t in threading.enumerate()}
            me = threading.get_ident()
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                g = group(threads.get(ident))
                rec = b.setdefault(g, {"n": 0, "incl": collections.Counter(),
                                       "self": collections.Counter(), "cpu_s": 0.0})
                rec["n"] += 1
                rec["self"][label(frame.f_code)] += 1
                seen = set()
                f = frame
                while f is not None:
                    lab = label(f.f_code)
                    if lab not in seen:
                        seen.add(lab)
                        rec["incl"][lab] += 1
                    f = f.f_back
                try:
                    clk = cpu_clocks.get(ident)
                    if clk is None:
                        clk = cpu_clocks[ident] = time.pthread_getcpuclockid(ident)
                    c = time.clock_gettime(clk)
                    rec["cpu_s"] += c - last_cpu.get(ident, c)
                    last_cpu[ident] = c
                except (OSError, OverflowError, ValueError):
                    pass
                del th
            frame = f = None  # no frame kept alive between samples
            if now - last_dump > 5.0:
                last_dump = now
                snap = {str(k): {g: {"n": r["n"], "cpu_s": round(r["cpu_s"], 4),
                                      "incl": r["incl"].most_common(60),
                                      "self": r["self"].most_common(30)}
                                  for g, r in v.items()} for k, v in list(buckets.items())}
                with open(out + ".tmp", "w") as fh:
                    json.dump(snap, fh)
                os.replace(out + ".tmp", out)

    threading.Thread(target=run, name="sgf-dmft-stack-sampler", daemon=True).start()


def _install_stage_trace(write) -> None:
    """``SGF_DMFT_LATENCY_TRACE=1`` (with the latency log): where a widget change's time goes.

    Adds ``{"kind": "stage", ...}`` rows, one per logged "ws" latency, with the times (ms after
    the websocket message arrived) at which Panel saw the change (``server_change``, after the
    document lock), started its debounced handler on the loop (``coroutine``), ran it in the
    ``--num-threads`` pool (``pool_start``, ``pool_end``, ``pool_cpu``: thread CPU of the
    handler, i.e. the param watchers), and applied the dependent model update on the loop
    (``update``); and ``{"kind": "pool", ...}`` rows for every task of Panel's thread pool
    (``fn``, ``wait_ms`` in its queue, ``run_ms``, ``cpu_ms``).
    """
    import functools
    import time

    from bokeh.server.views.ws import WSHandler
    from panel.io.state import state
    from panel.reactive import Syncable

    stages: dict = {}  # id(document) -> {stage: perf_counter}

    def mark(doc, stage, value=None):
        rec = stages.get(id(doc))
        if rec is not None and stage not in rec:
            rec[stage] = time.perf_counter() if value is None else value

    def fn_name(fn):
        while isinstance(fn, functools.partial):
            fn = fn.func
        return getattr(fn, "__qualname__", repr(fn))[:80]

    def wrap_pool(pool):
        if getattr(pool, "_sgf_traced", False):
            return
        submit = pool.submit

        def traced_submit(fn, *a, **kw):
            t_sub = time.perf_counter()

            def run(*a2, **kw2):
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    return fn(*a2, **kw2)
                finally:
                    t1 = time.perf_counter()
                    write("pool", 1000 * (t1 - t0), fn=fn_name(fn),
                          wait_ms=round(1000 * (t0 - t_sub), 2),
                          cpu_ms=round(1000 * (time.thread_time() - c0), 2))

            return submit(run, *a, **kw)

        pool.submit = traced_submit
        pool._sgf_traced = True

    handle, send = WSHandler._handle, WSHandler.send_message

    async def handle_trace(self, message):
        if state._thread_pool is not None:
            wrap_pool(state._thread_pool)
        if message.msgtype == "PATCH-DOC" and '"value"' in str(message.content).replace(
                "'", '"'):
            try:
                doc = self.connection.session.document
            except Exception:  # noqa: BLE001
                doc = None
            if doc is not None and id(doc) not in stages:
                stages[id(doc)] = {"in": time.perf_counter()}
        return await handle(self, message)

    async def send_trace(self, message):
        t_send = time.perf_counter()
        try:
            return await send(self, message)
        finally:
            ms = 1000 * (time.perf_counter() - t_send)
            if ms >= 5.0:  # a slow write: the socket's buffer is full (the browser lags)
                try:
                    kib = round((len(message.content_json) + sum(
                        len(b.to_bytes()) for b in message.buffers)) / 1024, 1)
                except Exception:  # noqa: BLE001
                    kib = None
                write("send", ms, msgtype=message.msgtype, kib=kib)

    def stage_sent(sock):  # the "n = δd" update is written (_SENT_HOOKS)
        try:
            doc = sock.connection.session.document
        except Exception:  # noqa: BLE001
            return
        rec = stages.pop(id(doc), None)
        if rec is None:
            return
        t_in = rec.pop("in")
        cpu = rec.pop("pool_cpu", None)
        row = {k: round(1000 * (v - t_in), 2) for k, v in rec.items()}
        if cpu is not None:
            row["pool_cpu"] = round(1000 * cpu, 2)
        write("stage", 1000 * (time.perf_counter() - t_in), **row)

    _SENT_HOOKS.append(stage_sent)

    server_change = Syncable._server_change
    change_coroutine = Syncable._change_coroutine
    change_event = Syncable._change_event
    scheduled = Syncable._scheduled_update_model

    def server_change_trace(self, doc, ref, subpath, attr, old, new):
        # bokeh checks the signature of what is left after partial(doc, ref, subpath)
        mark(doc, "server_change")
        return server_change(self, doc, ref, subpath, attr, old, new)

    async def change_coroutine_trace(self, doc, *a, **kw):
        mark(doc, "coroutine")
        return await change_coroutine(self, doc, *a, **kw)

    def change_event_trace(self, doc):
        mark(doc, "pool_start")
        c0 = time.thread_time()
        try:
            return change_event(self, doc)
        finally:
            mark(doc, "pool_end")
            mark(doc, "pool_cpu", time.thread_time() - c0)

    def scheduled_trace(self, events, msg, root, model, doc, *a, **kw):
        if "δd" in str(msg):
            mark(doc, "update")
        return scheduled(self, events, msg, root, model, doc, *a, **kw)

    WSHandler._handle = handle_trace
    WSHandler.send_message = send_trace
    Syncable._server_change = server_change_trace
    Syncable._change_coroutine = change_coroutine_trace
    Syncable._change_event = change_event_trace
    Syncable._scheduled_update_model = scheduled_trace


if __name__ != "app.setup":  # run as a script (panel serve --setup app/setup.py)
    from app.setup import start_warmup as _start  # the importable module holds the flag

    _start()
    from app.setup import install_latency_probe as _probe_start

    _probe_start()
