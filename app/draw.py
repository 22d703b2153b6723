"""Direct updates of the curve plots' Bokeh data sources, and write backpressure.

HoloViews *builds* the curve plots (:class:`app.plots.CurveGrid`: glyphs, styles, hover tools,
axes). While the engines stream, :func:`send_curves` writes the new points straight into the
Bokeh ``ColumnDataSource`` of every rendered element instead of sending the data through the
DynamicMaps' ``Pipe``, which re-clones about 13 elements per plot and runs HoloViews' update
pipeline for 6 plots (~0.4 s of server CPU per redraw) and sends every array in full.

* Series only grow (theory and simulation curves, their markers and error bars): the new rows
  are ``stream``-ed, so only they travel to the browser. Where a source's rows are not a
  prefix of the new data (the store's stride doubled, the marker stride changed, a new Run)
  its data is replaced. The Monte Carlo band is one polygon (forward, then backward): replaced.
* The axis ranges follow the data as HoloViews' framewise ranges do: data bounds (NaN ignored,
  band and error bars included) padded by 10 % of the span on y, none on x; in log10 space on a
  log axis (non-positive values ignored); a single value gets a span of 2.
* The ``Pipe`` is updated silently (no event) so that any later HoloViews render of the
  layout (a new root, a fallback update) starts from the same data.

Where the rendered plots are not found (no Bokeh document, e.g. headless tests; a pane that
has not rendered the current grid yet; a call from another thread than the session's) or do
not have the expected columns, :func:`send_curves` returns False and the caller sends the
data through the Pipe exactly as before.

:func:`backlogged` tells whether a session's previous patches are still being written to its
websocket(s) (Panel's pending writes, Bokeh's per-connection write lock, tornado's write
buffer): the session then skips a redraw (stays dirty) instead of queueing more behind it.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import time
import weakref

import numpy as np

log = logging.getLogger(__name__)

#: Fraction of the data span added on each side of the y axis (HoloViews' default (0, 0.1)).
YPAD = 0.1
#: A single value gets this half-span (HoloViews' ``default_span`` / 2).
HALF_SPAN = 1.0
#: Longest time a session skips redraws because its socket is still writing (then draws).
MAX_BACKLOG_WAIT = 2.0


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1").strip() not in ("0", "false", "no")


#: ``SGF_DMFT_DIRECT_DRAW=0`` turns the direct path off (every redraw through HoloViews, as
#: before; for comparisons).
ENABLED = _env_on("SGF_DMFT_DIRECT_DRAW")
#: ``SGF_DMFT_BACKPRESSURE=0`` turns the backpressure off (for comparisons).
BACKPRESSURE = _env_on("SGF_DMFT_BACKPRESSURE")


_ROLE_PLOTS = {"band": "SpreadPlot", "line": "CurvePlot", "thin": "CurvePlot",
               "bars": "ErrorPlot", "marks": "PointPlot"}


def send_curves(grid, pane, data: dict) -> bool:
    """Draw ``data`` (see :func:`app.plots.curve_data`) into the plots that ``pane`` (a
    Panel ``HoloViews`` pane showing ``grid.layout``) rendered. False: nothing was drawn,
    send through ``grid.pipe``."""
    if grid is None or pane is None or not ENABLED:
        return False
    d = getattr(grid, "_direct", None)
    if d is None:  # kept on the grid: dropped with it
        d = grid._direct = DirectCurves(grid)
    return d.send(pane, data)


def stats(grid) -> dict:
    """Counts of direct draws, fallbacks, streamed and replaced sources (for benchmarks)."""
    d = getattr(grid, "_direct", None)
    return dict(d.counts) if d else {}


def _rendered(pane) -> list:
    """The distinct HoloViews plots ``pane`` rendered (one per Bokeh root)."""
    out, seen = [], set()
    for v in list((getattr(pane, "_plots", None) or {}).values()):
        plot = v[0] if isinstance(v, tuple) else v
        if plot is not None and id(plot) not in seen:
            seen.add(id(plot))
            out.append(plot)
    return out


def _finite(a: np.ndarray, log: bool) -> np.ndarray:
    a = np.asarray(a, float)
    ok = np.isfinite(a)
    if log:
        ok &= a > 0
    return a[ok]


def _bounds(arrays, log: bool):
    lo, hi = math.inf, -math.inf
    for a in arrays:
        a = _finite(a, log)
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else None


def axis_range(bounds, pad: float, log: bool):
    """(start, end) of an axis for data ``bounds`` (lo, hi) as HoloViews' framewise ranges:
    minimum span, ``pad`` of the span on each side (in log10 space on a log axis)."""
    lo, hi = bounds
    if lo == hi:
        lo, hi = lo - HALF_SPAN, hi + HALF_SPAN
    if log and lo > 0 and hi > 0:
        a, b = math.log10(lo), math.log10(hi)
        c, span = (a + b) / 2, (b - a) * (1 + 2 * pad)
        lo, hi = 10 ** (c - span / 2), 10 ** (c + span / 2)
    else:
        span = hi - lo
        lo, hi = lo - pad * span, hi + pad * span
    if log and lo <= 0:  # what HoloViews does with a non-positive start on a log axis
        lo = 0.01 if hi > 0.01 else 10 ** (math.log10(hi) - 2)
    return lo, hi


def _same(a, b) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return a == b or (math.isnan(a) and math.isnan(b))


class _Target:
    """The Bokeh handles of one rendered grid: per observable, (spec, role, source) of each
    element in template order, the x and y ranges."""

    def __init__(self, plot, grid):
        from holoviews.plotting.bokeh.element import OverlayPlot

        self.plot = plot
        self.doc = None
        self.obs: dict = {}
        for op in plot.traverse(lambda p: p, [OverlayPlot]):
            if not any(s is grid.pipe for s in (getattr(op, "streams", None) or ())):
                continue
            frame = op.current_frame
            els = list(frame) if frame is not None else []
            if not els or not els[0].vdims:
                continue
            obs = els[0].vdims[0].name
            if obs not in grid._templates or obs in self.obs:
                continue
            tmpls = grid._templates[obs][0]
            subs = list(op.subplots.values())
            if len(subs) != len(tmpls):
                raise LookupError(f"{obs}: {len(subs)} subplots for {len(tmpls)} elements")
            items = []
            for (sp, role, _), sub in zip(tmpls, subs):
                if sp is None:
                    continue
                src = sub.handles.get("source")
                if src is None or type(sub).__name__ != _ROLE_PLOTS[role]:
                    raise LookupError(f"{obs}: no source for {role} of {sp.sid}")
                items.append((sp, role, src))
                self.doc = self.doc or src.document
            xr, yr = op.handles.get("x_range"), op.handles.get("y_range")
            if xr is None or yr is None:
                raise LookupError(f"{obs}: no ranges")
            self.obs[obs] = (items, xr, yr)
        if set(self.obs) != set(grid.observables):
            raise LookupError(f"plots found for {sorted(self.obs)}, not {grid.observables}")


class DirectCurves:
    """Direct updates of one :class:`~app.plots.CurveGrid`'s rendered plots."""

    def __init__(self, grid):
        self.grid = grid
        self._targets: dict = {}  # id(plot) -> _Target
        self.counts = collections.Counter(direct=0, fallback=0, streamed=0, replaced=0,
                                          unchanged=0)
        self.times: collections.deque = collections.deque(maxlen=100)  # perf_counter of draws

    def targets(self, pane) -> list | None:
        pipe = self.grid.pipe  # the plots of this grid (not of one the pane showed before)
        plots = [p for p in _rendered(pane)
                 if any(s is pipe for s in (getattr(p, "streams", None) or ()))]
        if not plots:
            return None
        out = []
        for p in plots:
            t = self._targets.get(id(p))
            if t is None or t.plot is not p:
                try:
                    t = _Target(p, self.grid)
                except LookupError as e:
                    log.debug("direct curve updates not possible: %s", e)
                    return None
                self._targets[id(p)] = t
            out.append(t)
        return out

    def send(self, pane, data: dict) -> bool:
        targets = self.targets(pane)
        if not targets or not all(_writable(t.doc) for t in targets):
            self.counts["fallback"] += 1
            self.counts["fallback_not_rendered" if not targets else "fallback_thread"] += 1
            return False
        cols = self.columns(data)
        try:
            for t in targets:
                with _hold(t.doc):
                    self._apply(t, cols)
        except LookupError as e:  # unexpected columns: HoloViews redraws everything
            log.debug("direct curve update failed: %s", e)
            self._targets.clear()
            self.counts["fallback"] += 1
            self.counts["fallback_columns"] += 1
            return False
        self.grid.pipe.update(data=data)  # silently: a later HoloViews render starts here
        self.counts["direct"] += 1
        self.times.append(time.perf_counter())
        return True

    def columns(self, data: dict) -> dict:
        """obs -> [Bokeh column dict per element (template order)], and '_x'/obs+'_y' data
        bounds for the ranges."""
        g = self.grid
        xname = g.axis
        out = {}
        xs = []
        for obs in g.observables:
            per, ys = [], []
            se = f"{obs}_se"
            for sp, role, c in g.element_columns(obs, data):
                if sp is None:
                    continue
                if role == "band":
                    x, v, neg, pos = c
                    lo, hi = v - neg, v + pos
                    d = {"x": np.concatenate([x, x[::-1]]),
                         "y": np.concatenate([lo, hi[::-1]])}
                    ys += [lo, hi]
                elif role == "thin":
                    x, v = c
                    d = {xname: x, obs: v}
                    ys.append(v)
                elif role == "bars":
                    x, v, s = c
                    d = {"base": x, "lower": v - s, "upper": v + s}
                    ys += [v - s, v + s]
                else:  # line, marks
                    x, v, s = c[:3]
                    d = {xname: x, obs: v, se: s}
                    if len(c) > 3:
                        d["t"] = c[3]
                    ys.append(v)
                xs.append(x)
                per.append((role, d))
            out[obs] = (per, _bounds(ys, g.logy))
        out["_x"] = _bounds(xs, g.logx)
        return out

    def _apply(self, t: _Target, cols: dict) -> None:
        g = self.grid
        xb = cols["_x"]
        xranges = []
        for obs, (items, xr, yr) in t.obs.items():
            per, yb = cols[obs]
            for (sp, role, src), (_, new) in zip(items, per):
                self._update_source(src, role, new)
            if yb is not None:
                _set_range(yr, axis_range(yb, YPAD, g.logy))
            if xr not in xranges:
                xranges.append(xr)
        if xb is not None:
            for xr in xranges:
                _set_range(xr, axis_range(xb, 0.0, g.logx))

    def _update_source(self, src, role: str, new: dict) -> None:
        old = src.data
        if set(old) != set(new):  # columns HoloViews did not make: let it draw them
            raise LookupError(f"columns {sorted(old)} != {sorted(new)}")
        key = next(iter(new))
        n, m = len(old[key]), len(new[key])
        if role != "band" and 0 < n <= m and all(
                _same(old[k][0], c[0]) and _same(old[k][n - 1], c[n - 1])
                for k, c in new.items()):
            if m > n:
                src.stream({k: np.asarray(c[n:]) for k, c in new.items()})
                self.counts["streamed"] += 1
            else:
                self.counts["unchanged"] += 1
            return
        if n == 0 and m == 0:
            self.counts["unchanged"] += 1
            return
        src.data = {k: np.asarray(c) for k, c in new.items()}
        self.counts["replaced"] += 1


def _set_range(r, lohi) -> None:
    lo, hi = lohi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return
    upd = {}
    if not _same(r.start, lo):
        upd["start"] = upd["reset_start"] = lo
    if not _same(r.end, hi):
        upd["end"] = upd["reset_end"] = hi
    if upd:
        r.update(**upd)


def _writable(doc) -> bool:
    """Bokeh models of ``doc`` may be changed here: no document, a document without a
    server session, or the session's own thread and document (Panel's rule)."""
    if doc is None or doc.session_context is None:
        return True
    from panel.io.state import state

    return state._unblocked(doc)


class _hold:
    """Collect the changes into one message (Panel's ``unlocked`` on a served document)."""

    def __init__(self, doc):
        self.doc = doc
        self.cm = None

    def __enter__(self):
        if self.doc is not None and self.doc.session_context is not None:
            from panel.io.document import unlocked

            self.cm = unlocked()
            self.cm.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cm is not None:
            return self.cm.__exit__(*exc)
        return False


# --- backpressure -------------------------------------------------------------------------
def pending_writes(doc) -> int:
    """Patches of ``doc`` not yet written to its websocket(s): a positive count (Panel's
    queued messages and unfinished write futures, a held Bokeh write lock, bytes in tornado's
    write buffer); 0 when everything was handed to the OS (or no server session)."""
    if doc is None or getattr(doc, "session_context", None) is None:
        return 0
    n = 0
    try:
        from panel.io import document as pdoc

        if doc in pdoc._WRITE_MSGS or doc in pdoc._WRITE_BLOCK:
            n += 1
        n += sum(1 for f in pdoc._WRITE_FUTURES.get(doc, ())
                 if hasattr(f, "done") and not f.done())
    except (ImportError, AttributeError, TypeError):
        pass
    session = getattr(doc.session_context, "_session", None)
    for conn in list(getattr(session, "_subscribed_connections", ()) or ()):
        sock = getattr(conn, "_socket", None)
        lock = getattr(sock, "write_lock", None)
        block = getattr(lock, "_block", None)
        if block is not None and getattr(block, "_value", 1) == 0:
            n += 1
        stream = getattr(getattr(sock, "ws_connection", None), "stream", None)
        buf = getattr(stream, "_write_buffer", None)
        try:
            n += len(buf) if buf is not None else 0
        except TypeError:
            pass
    return n


class Backpressure:
    """Whether a session should skip a redraw because its socket is still busy; never skips
    for longer than ``max_wait`` seconds in a row (a stuck write must not freeze the plots)."""

    def __init__(self, max_wait: float = MAX_BACKLOG_WAIT):
        self.max_wait = max_wait
        self._since: float | None = None
        self.skipped = 0

    def busy(self, pane) -> bool:
        docs = {id(p.document): p.document for p in _rendered(pane)
                if getattr(p, "document", None) is not None}
        pending = sum(pending_writes(d) for d in docs.values())
        now = time.perf_counter()
        if not pending:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        if now - self._since > self.max_wait:
            self._since = None
            return False
        self.skipped += 1
        return True


__all__ = ["send_curves", "stats", "axis_range", "pending_writes", "Backpressure",
           "DirectCurves"]


#: pane -> its session's Backpressure (dropped with the pane).
_BACKPRESSURE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def backlogged(pane) -> bool:
    """Whether the session showing ``pane`` should skip this redraw (see
    :class:`Backpressure`); False without a served document."""
    if pane is None or not BACKPRESSURE:
        return False
    bp = _BACKPRESSURE.get(pane)
    if bp is None:
        bp = _BACKPRESSURE[pane] = Backpressure()
    return bp.busy(pane)


# --- first updates of the page's text panes ---------------------------------------------
def settle_styles(dash) -> bool:
    """Do the first update of every rendered text pane of ``dash`` (a Dashboard) now, in one
    Bokeh model recomputation. Returns True once done (or when there is nothing to do).

    With Panel 1.9 the first update of a rendered HTML/Markdown pane re-sets its stylesheets
    (the design's theme sheet is added), which makes Bokeh recompute the model graph of the
    whole document: ~0.1-0.2 s of CPU each with the ~1400 models of the page, over 1 s of wall
    time on a loaded machine. During the first Run that hit the status line and the runs table
    just when the theory's first point was due. Done here once, when the page has loaded,
    under one ``doc.models.freeze()``; later updates keep the same stylesheets."""
    import contextlib

    from panel.pane.markup import HTMLBasePane

    panes = [v for v in vars(dash).values() if isinstance(v, HTMLBasePane)]
    docs = {}
    for p in panes:
        for model, _parent in list(getattr(p, "_models", {}).values()):
            doc = getattr(model, "document", None)
            if doc is not None:
                docs[id(doc)] = doc
    if not docs:
        return not getattr(dash, "_in_session", False)
    if not all(_writable(d) for d in docs.values()):
        return False
    with contextlib.ExitStack() as stack:
        for doc in docs.values():
            stack.enter_context(doc.models.freeze())
        for p in panes:
            p.param.trigger("object")
    return True
