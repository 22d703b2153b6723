"""Sidebar widgets generated from :class:`solver.config.Experiment`.

Every widget is linked both ways to the Experiment instance (``Widget.from_param``): the
Experiment is the state, widgets only show and edit it. Ranges come from the parameters'
``softbounds`` (slider range) and ``bounds`` (hard limits, typed values may go up to them);
tooltips are the parameters' docs. Only presentation lives here (labels, slider steps, groups).
"""
from __future__ import annotations

import math

import numpy as np
import panel as pn
import param

from solver.config import Experiment

#: Sidebar groups: title -> Experiment parameters.
GROUPS = (
    # Model after the data: the browser test types into the first numeric input (delta)
    ("Data and teacher", ("delta", "teacher", "noise", "flip", "rho")),
    ("Model", ("model", "k", "kstar", "activation", "v", "Q0", "M0")),
    ("Loss and initialisation", ("loss", "lam", "q0", "m0")),
    ("Optimiser", ("tau", "batch", "eta")),
    ("Time", ("T", "dt", "record_every")),
    ("Theory accuracy", ("method", "samples")),
    ("Simulation", ("d", "seeds", "seed")),
)
#: Every Experiment parameter the dashboard edits (and the URL carries).
EDITED = tuple(n for _, names in GROUPS for n in names)
#: Parameters kept in the URL (eta is derived from tau and batch).
URL_PARAMS = tuple(n for n in EDITED if n != "eta")

#: Parameters that only the committee model uses (shown only when model = 'committee').
COMMITTEE_ONLY = ("k", "kstar", "activation", "v", "Q0", "M0")
#: Matrices typed as text (committee initial overlaps): empty text means None (q0*I, m0*I).
MATRIX_PLACEHOLDERS = {"Q0": "empty: q₀·I; e.g. 0.05,0.01;0.01,0.05",
                       "M0": "empty: m₀·I; e.g. 0.1,0;0,0.1"}

LABELS = {
    "model": "Student model", "k": "Student width k", "kstar": "Teacher width k*",
    "activation": "Activation σ", "v": "Second layer v (comma-separated)",
    "Q0": "Initial overlaps Q(0), k×k (rows separated by ;)",
    "M0": "Initial overlaps M(0), k×k* (rows separated by ;)",
    "delta": "δ = n/d", "teacher": "Teacher", "noise": "Label noise σ",
    "flip": "Flip probability p", "rho": "Teacher norm ρ", "loss": "Loss", "lam": "Ridge λ",
    "q0": "Initial q₀", "m0": "Initial m₀", "tau": "Temperature τ = η/B", "batch": "Batch B",
    "eta": "Learning rate η", "T": "Horizon T", "dt": "Grid step dt",
    "record_every": "Record every", "method": "DMFT method", "samples": "MC samples N",
    "d": "Dimension d", "seeds": "Seeds", "seed": "Base seed",
}
STEPS = {"delta": 0.1, "noise": 0.05, "flip": 0.01, "rho": 0.05, "lam": 0.01, "q0": 0.05,
         "m0": 0.05, "tau": 0.05, "eta": 0.1, "T": 0.5, "dt": 0.005}
INT_STEPS = {"batch": 1, "record_every": 1, "samples": 500, "d": 100, "seeds": 1, "seed": 1}


def widget_for(exp: Experiment, name: str):
    """A widget linked both ways to ``exp.<name>``."""
    p = exp.param[name]
    label = LABELS.get(name, name)
    if isinstance(p, param.Selector):
        opts = list(p.objects)
        cls = pn.widgets.RadioButtonGroup if len(opts) <= 4 else pn.widgets.Select
        style = dict(color="primary", button_style="outline") \
            if cls is pn.widgets.RadioButtonGroup else {}
        w = cls.from_param(p, label=label, sizing_mode="stretch_width", **style)
        if cls is pn.widgets.RadioButtonGroup:
            # a RadioButtonGroup shows no title of its own: put one above it
            return pn.Column(pn.pane.HTML(f'<span class="sgf-wlabel">{label}</span>',
                                          margin=(2, 10, 0, 10)), w, margin=0,
                             sizing_mode="stretch_width")
        return w
    if isinstance(p, param.Array):
        # a matrix edited as text ("0.05,0;0,0.05"); the dashboard parses it (_on_matrix_text)
        return pn.widgets.TextInput(label=label, value=matrix_text(getattr(exp, name)),
                                    placeholder=MATRIX_PLACEHOLDERS.get(name, ""),
                                    description=p.doc, sizing_mode="stretch_width")
    if isinstance(p, param.List):
        # edited as text ("1,0.5"); the dashboard parses it (see Dashboard._on_v_text)
        return pn.widgets.TextInput(label=label, value=list_text(getattr(exp, name)),
                                    description=p.doc, sizing_mode="stretch_width")
    if isinstance(p, param.Integer):
        return pn.widgets.EditableIntSlider.from_param(p, label=label, step=INT_STEPS.get(name, 1),
                                                       sizing_mode="stretch_width")
    step = STEPS.get(name, 0.01)
    lo, hi = p.get_soft_bounds()
    fmt = "0[.]000" if step < 0.01 else "0[.]00"
    kw = {}
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        kw = dict(start=lo, end=hi)
    return pn.widgets.EditableFloatSlider.from_param(p, label=label, step=step, format=fmt,
                                                     sizing_mode="stretch_width", **kw)


#: ``SGF_DMFT_WIDGETS_ON_LOOP=0`` sends the sidebar's edits through Panel's thread pool again.
WIDGETS_ON_LOOP_ENV = "SGF_DMFT_WIDGETS_ON_LOOP"


def handle_on_loop(*roots, debounce_ms: int | None = 0) -> int:
    """Process the browser's edits of every widget under ``roots`` on the server's event loop,
    within the callback that received them, instead of in Panel's ``--num-threads`` pool.

    With a thread pool, Panel handles a widget edit in four hops: a debounced (50 ms) callback
    on the loop that waits for the session's document lock, a pool thread that runs the param
    watchers, a next-tick callback that waits for the lock again to change the dependent
    models, then the write. Under load every hop waits behind the other sessions' callbacks
    and the GIL (10 browser sessions: 0.5-3 s server side for ~10 ms of watcher CPU,
    docs/deploy.md "Load test"). For cheap watchers (the Experiment's parameters: a text
    readout, the URL, widget visibility) this runs them as Panel does without a pool: one
    locked callback, the dependent update written at once. Widgets whose watchers are slow
    (rebuilding plots) must not be passed. ``debounce_ms`` replaces Panel's 50 ms debounce of
    the change (None keeps it; typed values arrive once, on Enter or blur). Returns the number
    of widgets changed; none with ``SGF_DMFT_WIDGETS_ON_LOOP=0``.
    """
    import os
    import types

    if os.environ.get(WIDGETS_ON_LOOP_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    n = 0
    for root in roots:
        for w in root.select(pn.widgets.Widget):
            if "_change_coroutine" in vars(w):
                continue
            w._change_coroutine = types.MethodType(_loop_change_coroutine, w)
            if debounce_ms is not None and not isinstance(
                    w, (pn.widgets.FloatSlider, pn.widgets.IntSlider)):  # dragged: debounced
                w._debounce = debounce_ms
            n += 1
    return n


async def _loop_change_coroutine(self, doc, event_id=None):
    """Panel 1.9's ``Syncable._change_coroutine`` without the thread pool."""
    from panel.io.state import set_curdoc, state

    if event_id is not None:  # the change may have been processed already (Panel's check)
        callbacks = state._change_callbacks.get(doc, {})
        if event_id not in callbacks:
            return
        del callbacks[event_id]
        if not callbacks and doc in state._change_callbacks:
            del state._change_callbacks[doc]
    # the document is held while the watchers run, so that the updates are written by Bokeh
    # at the end of this (locked) callback, in the socket's write order; without the hold
    # Panel's ``unlocked()`` writes them itself, or, while the socket is busy, polls every
    # 10 ms for a free moment, which under load took up to 0.65 s more
    held = doc.callbacks.hold_value is not None
    with set_curdoc(doc):
        if not held:
            doc.hold("combine")
        try:
            self._change_event(doc)
        except Exception as e:  # noqa: BLE001 - reported as Panel reports them
            state._handle_exception(e)
        finally:
            if not held:
                doc.unhold()


def list_text(values) -> str:
    """A list of numbers as the text a TextInput shows: [1.0, 0.5] -> '1,0.5'."""
    return ",".join(f"{float(x):g}" for x in values)


def matrix_text(A) -> str:
    """A matrix as the text a TextInput shows: rows separated by ';', entries by ','
    ('' for None)."""
    if A is None:
        return ""
    A = np.atleast_2d(np.asarray(A, float))
    return ";".join(",".join(f"{float(x):g}" for x in row) for row in A)


def parse_matrix(text: str):
    """'0.05,0;0,0.05' -> 2x2 array; '' -> None. ValueError for text that is not a
    rectangular matrix of finite numbers."""
    text = (text or "").strip().strip("[]")
    if not text:
        return None
    rows = [r for r in text.replace("],[", ";").split(";") if r.strip()]
    A = [[float(x) for x in r.replace("[", "").replace("]", "").split(",") if x.strip()]
         for r in rows]
    if not A or len({len(r) for r in A}) != 1 or not A[0]:
        raise ValueError("rows must have the same number of entries, e.g. 0.05,0;0,0.05")
    A = np.array(A, float)
    if not np.all(np.isfinite(A)):
        raise ValueError("entries must be finite")
    return A


def inner_widget(w):
    """The linked widget inside what :func:`widget_for` returned."""
    if isinstance(w, pn.Column):
        return w[-1]
    return w


def horizon_text(exp: Experiment) -> str:
    """Live readout of what the horizon T means in epochs and SGD steps."""
    epochs = exp.T / (exp.tau * exp.delta) if exp.tau > 0 else math.inf
    steps = exp.T * exp.d / exp.eta if exp.eta > 0 else math.inf
    ep = f"{epochs:,.3g}" if math.isfinite(epochs) else "∞ (τ = 0: gradient flow)"
    st = f"{steps:,.0f}" if math.isfinite(steps) else "∞"
    return (f'<div class="sgf-derived">Horizon T = {exp.T:g} means <b>{ep}</b> epochs '
            f'(T/(τδ)) and <b>{st}</b> SGD steps (T·d/η) of batch {exp.batch}; '
            f'n = δd = {exp.n:,} samples; {exp.steps:,} grid steps.</div>')
