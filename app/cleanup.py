"""What a closed browser session leaves behind in the server process, and how it is freed.

:class:`~app.dashboard.Dashboard.close` (run by the session-destroyed hook) calls
:func:`release` on its views and :func:`collect_soon`. No numerics here.
"""
from __future__ import annotations

import gc
import os
import threading


def count_live(cls) -> int:
    """Objects of ``cls`` the garbage collector tracks (a dead ``weakref.proxy`` among them
    raises ReferenceError on ``isinstance``: it is not a live object, so it is skipped)."""
    n = 0
    for o in gc.get_objects():
        try:
            n += isinstance(o, cls)
        except ReferenceError:
            pass
    return n


def release(*views) -> int:
    """Drop what Panel's process-wide link registry keeps of a closed session's widgets.

    ``panel.links.Callback.registry`` is a WeakKeyDictionary keyed by the source widget, but
    its values (the ``jscallback`` of every editable slider) reference the source's parent
    widget, so the keys never die: without this every session's whole Dashboard (widgets,
    plots, HoloViews option trees; about 10 MiB) stayed in memory after the session closed.
    Returns the number of registry entries dropped.
    """
    from panel.links import Callback
    from panel.viewable import Viewable

    n = 0
    for v in views:
        for obj in v.select(Viewable):
            if Callback.registry.pop(obj, None) is not None:
                n += 1
    return n


_gc_timer = None
_gc_lock = threading.Lock()


def collect_soon(delay: float = 5.0) -> None:
    """One full garbage collection ``delay`` s from now (calls within the delay share it).

    A closed session's Dashboard, widgets and plots form reference cycles, which only the
    cyclic collector frees; its full collections are rare in a server that allocates little
    between sessions, so without this the memory of closed sessions was returned late or not at
    all. Runs in a timer thread (a pause of a few 0.1 s holding the GIL, once per burst of
    closed sessions).
    """
    global _gc_timer

    def run():
        global _gc_timer
        with _gc_lock:
            _gc_timer = None
        gc.collect()
        trim()
        log_path = os.environ.get("SGF_DMFT_LATENCY_LOG")
        if log_path:  # load tests: live sessions' objects after the collection
            import json
            import time

            from app.dashboard import Dashboard

            live = count_live(Dashboard)
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"kind": "live", "t": round(time.time(), 3),
                                     "dashboards": live}) + "\n")
            trace_growth(log_path + ".tracemalloc")

    with _gc_lock:
        if _gc_timer is None:
            _gc_timer = threading.Timer(delay, run)
            _gc_timer.daemon = True
            _gc_timer.start()


_first_snapshot = None


def trace_growth(path: str, top: int = 15) -> bool:
    """Load tests run with ``PYTHONTRACEMALLOC=N``: append to ``path`` the Python allocations that
    grew most since the first call (after the first collection), by traceback. False (nothing
    written) without tracing."""
    import tracemalloc

    global _first_snapshot
    if not tracemalloc.is_tracing():
        return False
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    if _first_snapshot is None:
        _first_snapshot = snap
        return True
    stats = snap.compare_to(_first_snapshot, "traceback")
    total = sum(st.size_diff for st in stats)
    with open(path, "a") as fh:
        fh.write(f"=== traced growth since the first collection: {total / 2**20:.2f} MiB\n")
        for st in stats[:top]:
            fh.write(f"{st.size_diff / 2**20:+.3f} MiB in {st.count_diff:+d} blocks\n")
            for line in st.traceback.format()[-8:]:
                fh.write(f"    {line}\n")
    return True


def trim() -> bool:
    """Return freed heap memory to the system now: jemalloc's or mimalloc's unused pages where
    one is preloaded (``LD_PRELOAD``, as in the Docker image; docs/deploy.md, "Session 5:
    memory"), and glibc's ``malloc_trim``. False where none of them is available."""
    try:
        import ctypes
    except ImportError:
        return False
    done = False
    try:
        proc = ctypes.CDLL(None)  # the symbols the process resolves, a preloaded malloc first
    except OSError:
        proc = None
    mallctl = getattr(proc, "mallctl", None)
    if mallctl is not None:  # jemalloc: purge every arena (4096 = MALLCTL_ARENAS_ALL)
        done = mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0)) == 0
    mi_collect = getattr(proc, "mi_collect", None)
    if mi_collect is not None:  # mimalloc: collect and return freed segments
        mi_collect(ctypes.c_bool(True))
        done = True
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        done = True
    except (OSError, AttributeError):
        pass
    return done
