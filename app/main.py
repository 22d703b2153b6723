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
    """One session's page: a :class:`~app.dashboard.Dashboard` in the Fast template."""
    from app.dashboard import Dashboard

    return Dashboard(**kw).template()


if __name__.startswith("bokeh_app") or __name__ == "__main__":
    from app.setup import start_warmup

    extensions()
    start_warmup()
    create().servable(title="sgf-dmft")
