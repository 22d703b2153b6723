"""Entry point for ``panel serve app/main.py`` and ``sgf-dmft serve``.

Panel executes this file once per browser session; everything with state lives in importable
modules (``app.dashboard``), and the numba kernels live in ``solver`` (a kernel defined in a
served script breaks later sessions, see STACK_NOTES). The process-wide warm-up of the kernels
starts once, in a background thread (``sgf-dmft serve`` starts it before the first session via
``panel serve --setup app/setup.py``).
"""
import os
import threading
from functools import partial
from pathlib import Path

import panel as pn

CSS_FILE = Path(__file__).resolve().parents[1] / "assets" / "dashboard.css"


def extensions():
    """Panel/HoloViews extensions the page needs (MathJax is Bokeh's, served locally)."""
    import holoviews as hv

    pn.extension("mathjax", notifications=False, sizing_mode="stretch_width")
    if "bokeh" not in hv.Store.renderers:
        hv.extension("bokeh", logo=False)


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
    import gc

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

            live = sum(isinstance(o, Dashboard) for o in gc.get_objects())
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"kind": "live", "t": round(time.time(), 3),
                                     "dashboards": live}) + "\n")

    with _gc_lock:
        if _gc_timer is None:
            _gc_timer = threading.Timer(delay, run)
            _gc_timer.daemon = True
            _gc_timer.start()


def trim() -> bool:
    """Return freed heap memory to the system (glibc ``malloc_trim``; False elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _on_destroyed(views, session_context) -> None:
    release(*views)
    collect_soon()


def create(**kw):
    """One session's page: a :class:`~app.dashboard.Dashboard` in the Fast template.

    In a server session, a session-destroyed hook releases what process-wide registries keep
    of the page (:func:`release`) and schedules a garbage collection (:func:`collect_soon`)."""
    from app.dashboard import Dashboard

    dash = Dashboard(**kw)
    tmpl = dash.template()
    doc = pn.state.curdoc
    if doc is not None and doc.session_context is not None:
        # bound now: when served as a script, this module's globals are gone by then
        views = (dash.sidebar, dash.main)
        pn.state.on_session_destroyed(partial(_on_destroyed, views))
    return tmpl


def serve_page():
    """Build the page into the current document with model recomputation frozen.

    Every ``jscallback`` (19 editable sliders) added to a model that is already in the
    document made Bokeh recompute the document's whole model graph (about 1300 models): 28
    recomputations per page, 40% of the server's CPU time per page load. Frozen, it is done
    once at the end. Also usable as ``pn.serve({"app": serve_page})`` (in-process tests).
    """
    doc = pn.state.curdoc
    if doc is None:
        create().servable(title="sgf-dmft")
        return None
    with doc.models.freeze():
        create().servable(title="sgf-dmft")
    return None  # so that ``pn.serve(serve_page)`` (tests) adds nothing more


if __name__.startswith("bokeh_app") or __name__ == "__main__":
    # the importable module's functions: this throw-away module is cleared after the session
    from app.main import extensions as _extensions, serve_page as _serve_page
    from app.setup import start_warmup

    _extensions()
    start_warmup()
    _serve_page()
