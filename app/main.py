"""Entry point for ``panel serve app/main.py`` and ``sgf-dmft serve``.

Panel executes this file once per browser session; everything with state lives in importable
modules (``app.dashboard``), and the numba kernels live in ``solver`` (a kernel defined in a
served script breaks later sessions, see STACK_NOTES). The process-wide warm-up of the kernels
starts once, in a background thread (``sgf-dmft serve`` starts it before the first session via
``panel serve --setup app/setup.py``).
"""
from pathlib import Path

import panel as pn

CSS_FILE = Path(__file__).resolve().parents[1] / "assets" / "dashboard.css"


def extensions():
    """Panel/HoloViews extensions the page needs (MathJax is Bokeh's, served locally)."""
    import holoviews as hv

    pn.extension("mathjax", notifications=False, sizing_mode="stretch_width")
    if "bokeh" not in hv.Store.renderers:
        hv.extension("bokeh", logo=False)


def create(**kw):
    """One session's page: a :class:`~app.dashboard.Dashboard` in the Fast template (the
    Dashboard releases what process-wide registries keep of it when its session is destroyed,
    see :mod:`app.cleanup`)."""
    from app.dashboard import Dashboard

    return Dashboard(**kw).template()


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
