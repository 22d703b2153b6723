"""The dashboard's *Sweep* tab: a phase diagram of one summary over two parameters, filling live.

The user picks two numeric :class:`~solver.config.Experiment` parameters (names, ranges and help
come from ``solver.config``), their values (``0,0.5,1,2`` or ``START:STOP:NUM``), and the summary
to colour by; every other parameter is the main configuration at Launch. Each grid point is one
DMFT solve of :mod:`solver.sweep` (same configuration, cache key and table row as
``sgf-dmft sweep``), so points computed by the command line or an earlier session come from the
disk cache at once.

Threads: points found in the cache are read by a short-lived reader thread; the others are
queued, one :class:`~app.pool.Ticket` per point, on the server's shared worker pool
(``SGF_DMFT_WORKERS`` threads), in the session's own :class:`~app.pool.Group`, so a sweep counts
against the same per-session limit of running jobs as the main Run, and waits its turn behind
other sessions. Workers only put ``(sweep id, point, row, result)`` on a queue;
:meth:`SweepTab.tick` (a periodic callback of the session, running only while a sweep does;
tests call it directly) drains it and sends the cells to the heatmap's ``hv.streams.Pipe``.
Stop, a new Launch and the end of the session cancel: queued points are dropped, running ones
stop at their next snapshot.

Clicking a cell (``hv.streams.Tap``) sets the main configuration to that point and shows its
DMFT curves in the Curves tab (from the sweep's result, else from the cache, else by running it).
"""
from __future__ import annotations

import contextlib
import html
import logging
import math
import os
import queue
import tempfile
import threading
import time

import holoviews as hv
import numpy as np
import panel as pn
import param

from solver.config import ConfigError, Experiment, parameter_help, valid_range
from solver.sweep import VOLATILE_COLUMNS as VOLATILE
from solver.sweep import GridError, Sweep, default_cache_dir, parse_grid, point_key, solver_tag

from .pool import CapError, Group, Ticket, check_caps, env_int, shared_pool
from .runner import parallel_guard

log = logging.getLogger(__name__)

#: Parameters the DMFT does not depend on (simulation-only or derived), not offered.
NOT_SWEPT = ("eta", "batch", "d", "seeds", "seed", "record_every")
#: Summary label -> column of the sweep table (solver.sweep.SUMMARY_COLUMNS).
SUMMARIES = {
    "final test loss": "test_loss_final",
    "minimum test loss": "test_loss_min",
    "time of the minimum test loss": "t_test_loss_min",
    "final test error": "test_error_final",
    "minimum test error": "test_error_min",
    "time of the minimum test error": "t_test_error_min",
    "final training loss": "train_loss_final",
    "final teacher overlap m": "m_final",
    "final self-overlap Q": "Q_final",
    "final cosine m/√(Qρ)": "cosine_final",
    "compute time (s)": "compute_s",
}
#: Cell marks: failed points are drawn with a symbol over a grey cell, their message on hover.
MARKS = {"error": "✕", "diverged": "∞", "cancelled": "–"}
MAX_POINTS_ENV = "SGF_DMFT_MAX_SWEEP_POINTS"
DEFAULT_MAX_POINTS = 144
CACHE_ENV = "SGF_DMFT_CACHE"


def sweepable() -> list[str]:
    """Numeric Experiment parameters that change the DMFT, in declaration order."""
    out = []
    for name, p in Experiment.param.objects("existing").items():
        if name == "name" or name in NOT_SWEPT or isinstance(p, param.Boolean):
            continue
        if isinstance(p, (param.Number, param.Integer)):
            out.append(name)
    return out


def max_points() -> int | None:
    """Largest sweep a session may launch ($SGF_DMFT_MAX_SWEEP_POINTS; 0/none: no limit)."""
    return env_int(MAX_POINTS_ENV, DEFAULT_MAX_POINTS)


def suggested_values(name: str, num: int = 4) -> str:
    """A starting range for a parameter, from its soft bounds (else bounds): 'LO:HI:NUM'."""
    p = Experiment.param[name]
    lo, hi = p.softbounds or p.bounds or (None, None)
    blo, bhi = p.bounds or (None, None)
    lo = lo if lo is not None else (blo if blo is not None else 0.0)
    hi = hi if hi is not None else (bhi if bhi is not None else lo + 1.0)
    if blo is not None and lo < blo:
        lo = blo
    if isinstance(p, param.Integer):
        lo, hi = int(math.ceil(lo)), int(math.floor(hi))
        num = max(1, min(num, hi - lo + 1))
        vals = [int(v) for v in np.round(np.linspace(lo, hi, num))]
        vals = [int(float(f"{v:.2g}")) if v >= 100 else v for v in vals]  # 13667 -> 14000
        vals = [min(max(v, lo), hi) for v in vals]
        return ",".join(str(v) for v in dict.fromkeys(vals))
    return f"{lo:g}:{hi:g}:{num}"


def parse_values(name: str, text: str) -> list:
    """Values of one axis: '0,0.5,1' or 'START:STOP:NUM'; :class:`ConfigError` naming the
    parameter and its range for anything else (also for repeated values)."""
    if name not in sweepable():
        raise ConfigError(name, f"cannot be swept here; choose one of {', '.join(sweepable())}")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(name, f"no values; type e.g. 0,0.5,1 or START:STOP:NUM, within "
                                f"{valid_range(name)}")
    if ";" in text or "=" in text:
        raise ConfigError(name, f"values are comma-separated numbers or START:STOP:NUM, "
                                f"got {text!r}")
    vals = parse_grid(f"{name}={text}")[name]
    seen = set()
    for v in vals:
        if v in seen:
            raise ConfigError(name, f"value {v:g} is given twice")
        seen.add(v)
    return vals


def cache_directory() -> str | None:
    """Where sweep results are cached: $SGF_DMFT_CACHE (``off``: no cache), else the user cache
    directory (``~/.cache/sgf-dmft``, shared with ``sgf-dmft sweep``), else, when that is not
    writable, ``<tmp>/sgf-dmft-cache``."""
    env = os.environ.get(CACHE_ENV, "")
    if env.strip().lower() in ("off", "none", "0"):
        return None
    for d in (default_cache_dir(), os.path.join(tempfile.gettempdir(), "sgf-dmft-cache")):
        try:
            os.makedirs(d, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return None


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _exact(v) -> str:
    """The exact value for the hover (shortest round-trip repr); '' for NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None or math.isnan(v) else repr(v)
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v)


class SweepTab(pn.viewable.Viewer):
    """The Sweep tab of one session; see the module docstring.

    ``dashboard`` provides ``experiment`` (the main configuration), ``runner`` (its pool and
    per-session group), ``open_result(config, result, label)`` and ``tabs``. ``solve`` (a
    ``solve(exp, cancel) -> Result`` function, default the DMFT) and ``cache_dir`` (a directory;
    True, the default: :func:`cache_directory` at each Launch; None: no cache) may be set before
    :meth:`launch`.
    """

    x = param.Selector(default="tau", objects=sweepable(), doc="Parameter along the x axis.")
    x_values = param.String(default="0,0.5,1,2", doc="Its values: 0,0.5,1 or START:STOP:NUM.")
    y = param.Selector(default="delta", objects=sweepable(), doc="Parameter along the y axis.")
    y_values = param.String(default="0.5,1,2,4", doc="Its values: 0,0.5,1 or START:STOP:NUM.")
    summary = param.Selector(default="test_loss_final", objects=list(SUMMARIES.values()),
                             doc="What the colour shows.")
    logz = param.Boolean(default=False, doc="Logarithmic colour scale.")
    running = param.Boolean(default=False, doc="A sweep is in progress.")

    def __init__(self, dashboard=None, solve=None, cache_dir: str | None | bool = True,
                 period_ms: int = 250, **params):
        super().__init__(**params)
        self.dashboard = dashboard
        self.solve = solve
        self.cache_dir = cache_dir  # True: cache_directory(), resolved at each Launch
        self.period_ms = period_ms
        pool = dashboard.runner.pool if dashboard is not None else shared_pool()
        self.pool = pool
        group = getattr(getattr(dashboard, "runner", None), "group", None)
        self.group = group if isinstance(group, Group) else Group(pool.workers)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._sid = 0
        self._pc = None
        self._closed = False
        self.sweep: Sweep | None = None
        self.fixed: dict = {}
        self.rows: dict[int, dict] = {}
        self.results: dict[int, object] = {}
        self.state: np.ndarray = np.empty((0, 0), dtype=object)
        self.t_launch = 0.0
        self.t_done: float | None = None
        self.last_data: dict = {}
        self._dirty = False
        self._in_session = bool(pn.state.curdoc and pn.state.curdoc.session_context)
        self._build()

    # --- widgets and layout -------------------------------------------------------------------
    def _build(self):
        opts = {f"{n}  {valid_range(n)}": n for n in sweepable()}
        self.x_widget = pn.widgets.Select.from_param(self.param.x, label="x axis", options=opts,
                                                     width=200)
        self.y_widget = pn.widgets.Select.from_param(self.param.y, label="y axis", options=opts,
                                                     width=200)
        self.x_text = pn.widgets.TextInput.from_param(self.param.x_values, label="x values",
                                                      width=220)
        self.y_text = pn.widgets.TextInput.from_param(self.param.y_values, label="y values",
                                                      width=220)
        self.summary_widget = pn.widgets.Select.from_param(
            self.param.summary, label="colour", options=SUMMARIES, width=230)
        self.logz_widget = pn.widgets.Checkbox.from_param(self.param.logz,
                                                          label="log colour scale")
        self.launch_button = pn.widgets.Button(label="▶ Launch sweep", color="primary",
                                               width=140)
        self.stop_button = pn.widgets.Button(label="■ Stop", width=90, disabled=True)
        self.launch_button.on_click(lambda e: self.launch())
        self.stop_button.on_click(lambda e: self.stop())
        self.progress = pn.indicators.Progress(value=0, max=1000, width=300, height=14,
                                               bar_color="primary", margin=(12, 10))
        self.status = pn.pane.HTML('<div class="sgf-status">Choose two parameters and their '
                                   'values, then Launch.</div>', sizing_mode="stretch_width")
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False,
                                   sizing_mode="stretch_width")
        self.help = pn.pane.HTML(pn.bind(self._help_html, self.param.x, self.param.y),
                                 sizing_mode="stretch_width")
        self.failures = pn.pane.HTML("", sizing_mode="stretch_width")
        self.download = pn.widgets.FileDownload(callback=self._csv_file,
                                                filename="sgf-dmft-sweep.csv",
                                                label="CSV of the sweep", width=160)
        self.plot = pn.pane.HoloViews(None, sizing_mode="stretch_width", min_height=460)
        self._new_plot()

    def _help_html(self, x, y) -> str:
        def one(n):
            return f"<b>{n}</b>: {html.escape(parameter_help(n))}"

        return (f'<div class="sgf-note">{one(x)}<br>{one(y)}<br>Every other parameter is the '
                'main configuration (sidebar) at Launch; each point is one DMFT solve. Values: '
                '<code>0,0.5,1,2</code> or <code>START:STOP:NUM</code>. Click a cell to open '
                'that run in the Curves tab.</div>')

    def __panel__(self):
        return pn.Column(
            pn.Row(self.x_widget, self.x_text, self.y_widget, self.y_text),
            pn.Row(self.summary_widget, self.logz_widget, self.launch_button, self.stop_button,
                   self.progress, self.download),
            self.help, self.alert, self.status, self.plot, self.failures,
            sizing_mode="stretch_width")

    @param.depends("x", watch=True)
    def _on_x(self):
        self.x_values = suggested_values(self.x)

    @param.depends("y", watch=True)
    def _on_y(self):
        self.y_values = suggested_values(self.y)

    @param.depends("summary", "logz", watch=True)
    def _on_summary(self):
        with self._lock:
            self._new_plot()

    # --- the plot -------------------------------------------------------------------------------
    def _axes(self) -> dict:
        if self.sweep is not None:
            return self.sweep.axes
        out = {}
        for n, text in ((self.x, self.x_values), (self.y, self.y_values)):
            try:
                out[n] = parse_values(n, text)
            except ConfigError:
                out[n] = []
        return out if len(out) == 2 else {self.x: [], self.y: [0]}

    def _label(self) -> str:
        return next(k for k, v in SUMMARIES.items() if v == self.summary)

    def _element(self, data: dict):
        """Heatmap on index coordinates (cell i, j = the i-th x value and j-th y value: equal
        cells for any spacing), ticks showing the values (marks on failed cells: _marks)."""
        (xn, xv), (yn, yv) = self._axes().items()
        label = self._label()
        kd = ["i", "j"]  # (a labelled key dimension breaks gridded HeatMaps: xlabel instead)
        # labels must differ from every other dimension's name and label (looked up by both)
        vd = [hv.Dimension("value", label=label), hv.Dimension("exact", label="exact value"),
              hv.Dimension("px", label=f"{xn} value"), hv.Dimension("py", label=f"{yn} value"),
              hv.Dimension("status"), hv.Dimension("message")]
        tips = [(xn, "@{px}"), (yn, "@{py}"), (label, "@{exact}"), ("status", "@{status}"),
                ("message", "@{message}")]
        heat = hv.HeatMap({k: data[k] for k in ["i", "j"] + [d.name for d in vd]},
                          kdims=kd, vdims=vd).opts(
            cmap="viridis", colorbar=True, logz=self.logz, tools=["tap"], hover_tooltips=tips,
            optimize_gridded=False,  # rectangles, so that the hover shows each cell's values
            clipping_colors={"NaN": "#e4e4e4"}, responsive=True, min_height=420,
            xticks=[(i, _fmt(v)) for i, v in enumerate(xv)],
            yticks=[(j, _fmt(v)) for j, v in enumerate(yv)],
            xlabel=xn, ylabel=yn, title=f"{label} over ({xn}, {yn})", toolbar="above",
            line_color="white", line_width=1, default_tools=["reset", "save"])
        return heat

    def _marks(self, data: dict):
        mi, mj, mt = data["marks"]
        return hv.Labels((mi, mj, mt), kdims=["i", "j"], vdims=["mark"]).opts(
            text_color="#c0392b", text_font_size="14pt")

    def _new_plot(self):
        """A new DynamicMap (axes or colour scale changed) fed by ``self.pipe``, and its Tap."""
        self.pipe = hv.streams.Pipe(data=self._cells())
        # the Tap's source is a DynamicMap of the HeatMap alone (one that returns an Overlay is
        # not linked to the plot's tap events)
        self.heat = hv.DynamicMap(lambda data: self._element(data), streams=[self.pipe])
        marks = hv.DynamicMap(lambda data: self._marks(data), streams=[self.pipe])
        self.dmap = self.heat * marks
        self.tap = hv.streams.Tap(source=self.heat, x=None, y=None)
        self.tap.add_subscriber(self._on_tap)
        self.plot.object = self.dmap

    def _cells(self) -> dict:
        """Gridded data for the heatmap: 1-D ``i``, ``j`` and 2-D (j, i) arrays of the chosen
        summary (NaN unless ok), its exact text, the parameter values, status and message;
        ``marks`` = (i, j, symbol) of the failed cells."""
        (xn, xv), (yn, yv) = self._axes().items()
        nx, ny = len(xv), len(yv)
        out = {"i": np.arange(nx, dtype=float), "j": np.arange(ny, dtype=float),
               "value": np.full((ny, nx), np.nan),
               "px": np.tile(np.asarray(xv, float), (ny, 1)),
               "py": np.tile(np.asarray(yv, float)[:, None], (1, nx))}
        for k in ("exact", "status", "message"):
            out[k] = np.full((ny, nx), "", dtype=object)
        marks = ([], [], [])
        if self.sweep is not None:
            for p in self.sweep.points:
                i, j = self.sweep.coords(p.index)
                st = self.state.flat[p.index]
                row = self.rows.get(p.index) or {}
                v = float(row.get(self.summary, math.nan)) if st == "ok" else math.nan
                out["value"][j, i] = v
                out["exact"][j, i] = _exact(v) if st == "ok" else ""
                out["status"][j, i] = "waiting" if st == "pending" else st
                out["message"][j, i] = str(row.get("message") or "")
                if st in MARKS:
                    marks[0].append(float(i))
                    marks[1].append(float(j))
                    marks[2].append(MARKS[st])
        out["marks"] = (np.asarray(marks[0], float), np.asarray(marks[1], float),
                        np.asarray(marks[2], dtype=object))
        return out

    def _send(self):
        self.last_data = self._cells()
        self.pipe.send(self.last_data)
        self._dirty = False

    @property
    def values(self) -> np.ndarray:
        """The chosen summary on the grid, shape (len(x values), len(y values)); NaN where a
        point is not (yet) computed or did not end ok."""
        out = np.full(self.state.shape, np.nan)
        for i, row in self.rows.items():
            if self.state.flat[i] == "ok":
                out.flat[i] = row.get(self.summary, math.nan)
        return out

    # --- launch -------------------------------------------------------------------------------
    def validate(self) -> tuple[dict, dict]:
        """The grid ``{x: [...], y: [...]}`` and fixed options, or :class:`ConfigError`."""
        if self.x == self.y:
            raise ConfigError(self.y, "the two axes need two different parameters")
        grid = {self.x: parse_values(self.x, self.x_values),
                self.y: parse_values(self.y, self.y_values)}
        n = len(grid[self.x]) * len(grid[self.y])
        cap = max_points()
        if cap is not None and n > cap:
            raise CapError("points", f"{len(grid[self.x])} x {len(grid[self.y])} = {n} points is "
                                     f"above this server's limit of {cap} per sweep "
                                     f"({MAX_POINTS_ENV}); use fewer values")
        exp = self.dashboard.experiment if self.dashboard is not None else Experiment()
        fixed = {k: v for k, v in exp.to_dict().items() if k not in grid and k != "eta"}
        return grid, fixed

    def launch(self) -> bool:
        """Validate, cancel a sweep in progress, queue the points; False (and an alert) if the
        input is invalid."""
        with self._lock:
            self.hide_alert()
            try:
                grid, fixed = self.validate()
                cache = cache_directory() if self.cache_dir is True else self.cache_dir
                sw = Sweep(grid, fixed, solve=self.solve, cache=cache or False)
                for p in sw.points:
                    if p.config is not None:
                        check_caps(Experiment.from_dict(p.config), sims=())
            except CapError as e:
                self.show_alert(f"<b>Over this server's limit — {e.param}</b>: "
                                f"{html.escape(str(e))}")
                return False
            except (ConfigError, GridError) as e:
                self.show_alert(f"<b>Invalid sweep — {e.param}</b>: {html.escape(str(e))}")
                return False
            self._cancel_current()
            self._sid += 1
            sid, cancel = self._sid, threading.Event()
            self._cancel = cancel
            self.sweep, self.fixed = sw, fixed
            self.rows, self.results = {}, {}
            self.state = np.full(sw.shape, "pending", dtype=object)
            self.t_launch, self.t_done = time.perf_counter(), None
            tag = solver_tag(self.solve)
            cached, todo = [], []
            for p in sw.points:
                if p.config is None:  # invalid combination (e.g. m0^2 > q0*rho): no solve
                    self._apply(p.index, {"status": "error", "message": p.error,
                                          "cache_hit": False}, None)
                    continue
                key = point_key("theory", p.config, tag)
                (cached if sw.cache is not None and key in sw.cache else todo).append(p)
            tickets = [Ticket(self._job(sid, p, cancel), self.group, cancel,
                              self._dropper(sid, p.index)) for p in todo]
            if cached:
                th = threading.Thread(target=self._read_cached, args=(sid, cached, cancel),
                                      name="sgf-sweep-cache", daemon=True)
                th.start()
            if tickets:
                self.pool.submit(tickets)
            self.running = True
            self.launch_button.label = "▶ Launch again"
            self.stop_button.disabled = False
            self._new_plot()
            self._update_status()
            if self._in_session and self.period_ms and self._pc is None:
                self._start_periodic()
            return True

    def _point_sweep(self, p) -> Sweep:
        """A one-point Sweep with the same configuration (hence cache key and row) as point p."""
        return Sweep([p.params], self.fixed, solve=self.solve,
                     cache=self.sweep.cache if self.sweep.cache is not None else False)

    def _solve_point(self, sid, p, cancel):
        try:
            for pr in self._point_sweep(p).iter(backend="serial", cancel=cancel):
                pr.row["point"] = p.index
                self._queue.put((sid, p.index, pr.row, pr.result))
                return
            self._queue.put((sid, p.index, None, None))  # cancelled before it started
        except Exception as e:  # noqa: BLE001 - shown on the cell, never raised
            log.exception("sweep point %s failed", p.index)
            self._queue.put((sid, p.index, {"status": "error", "cache_hit": False,
                                            "message": f"{type(e).__name__}: {e}"}, None))

    def _job(self, sid, p, cancel):
        def run():
            if cancel.is_set():
                self._queue.put((sid, p.index, None, None))
                return
            with parallel_guard():
                self._solve_point(sid, p, cancel)
        return run

    def _dropper(self, sid, index):
        return lambda: self._queue.put((sid, index, None, None))

    def _read_cached(self, sid, points, cancel):
        for p in points:  # cache reads only (a file that vanished meanwhile is solved here)
            if cancel.is_set():
                self._queue.put((sid, p.index, None, None))
                continue
            self._solve_point(sid, p, cancel)

    # --- stop / close ---------------------------------------------------------------------------
    def _cancel_current(self):
        self._cancel.set()
        self.pool.purge()

    def stop(self):
        """Cancel the sweep: queued points are dropped, running ones stop at their next
        snapshot; what was computed stays on the map."""
        with self._lock:
            self._cancel_current()
            self.stop_button.disabled = True
            self._update_status()

    def close(self):
        """Session end: cancel and stop the periodic callback."""
        self._closed = True
        self._cancel_current()
        self._stop_periodic()

    # --- the periodic callback ------------------------------------------------------------------
    def _start_periodic(self):
        from panel.io.callbacks import PeriodicCallback

        async def tick():  # on the server's event loop, with the document lock
            self.tick()

        self._pc = PeriodicCallback(callback=tick, period=self.period_ms, background=True,
                                    log=False)
        self._pc.start()

    def _stop_periodic(self):
        if self._pc is not None:
            with contextlib.suppress(Exception):
                self._pc.stop()
            self._pc = None

    def _apply(self, index, row, result):
        if row is None:
            st = "cancelled"
            row = {"status": "cancelled", "message": "stopped before it ran", "cache_hit": False}
        else:
            st = row.get("status") or "error"
        self.rows[index] = row
        if result is not None:
            self.results[index] = result
        self.state.flat[index] = st
        self._dirty = True

    def tick(self) -> int:
        """Drain the workers' queue into the cells and the heatmap; returns points handled."""
        if self._closed:
            return 0
        with self._lock:
            n = 0
            while True:
                try:
                    sid, index, row, result = self._queue.get_nowait()
                except queue.Empty:
                    break
                if sid != self._sid or self.state.flat[index] != "pending":
                    continue
                self._apply(index, row, result)
                n += 1
            if self.sweep is None:
                return n
            finished = self.finished
            if self._dirty:
                self._send()
            if n or finished or self._cancel.is_set():
                if finished and self.running:
                    self.running = False
                    self.t_done = time.perf_counter() - self.t_launch
                    self.stop_button.disabled = True
                    self._stop_periodic()
                self._update_status()
            elif self.running:
                self._update_status(queue_only=True)
            return n

    def table(self):
        """The rows received so far as a DataFrame in point order, with the columns of
        ``solver.sweep``'s table (the same numbers as ``sgf-dmft sweep`` for the same grid)."""
        import pandas as pd

        from solver.sweep import SUMMARY_COLUMNS
        from solver.config import names

        if self.sweep is None:
            return pd.DataFrame()
        g = list(self.sweep.axes)
        cols = ["point"] + g + [k for k in names() if k not in g] + list(SUMMARY_COLUMNS)
        rows = [self.rows[i] for i in sorted(self.rows) if "point" in self.rows[i]]
        return pd.DataFrame(rows, columns=cols)

    def _csv_file(self):
        import io

        return io.StringIO(self.table().to_csv(index=False))

    @property
    def finished(self) -> bool:
        return self.sweep is not None and not np.any(self.state == "pending")

    def counts(self) -> dict:
        st = list(self.state.flat)
        return {"points": len(st), "done": sum(s != "pending" for s in st),
                "cached": sum(bool(r.get("cache_hit")) for r in self.rows.values()),
                "ok": st.count("ok"), "failed": st.count("error") + st.count("diverged"),
                "stopped": st.count("cancelled")}

    def progress_text(self) -> str:
        """E.g. '12/36 points, 3 from cache, 1 failed'."""
        c = self.counts()
        text = f"{c['done']}/{c['points']} points, {c['cached']} from cache"
        if c["failed"]:
            text += f", {c['failed']} failed"
        if c["stopped"]:
            text += f", {c['stopped']} stopped"
        return text

    def _update_status(self, queue_only: bool = False):
        if self.sweep is None:
            return
        c = self.counts()
        self.progress.value = int(round(1000 * c["done"] / max(1, c["points"])))
        head = self.progress_text()
        if self.finished:
            head = ("Stopped: " if c["stopped"] else "Done: ") + head
            if self.t_done is not None:
                head += f" in {self.t_done:.1f} s"
        elif self._cancel.is_set():
            head = "Stopping: " + head
        else:
            el = time.perf_counter() - self.t_launch
            head = "Running: " + head + f" ({el:.0f} s)"
            pos = self.pool.position(self.group)
            if pos is not None and pos > 0:
                head += (f" — place in the server's queue: {pos + 1} ({pos} job"
                         f"{'s' if pos != 1 else ''} of other sessions ahead)")
        self.status.object = f'<div class="sgf-status"><b>{head}</b></div>'
        if queue_only:
            return
        fails = [(i, r) for i, r in sorted(self.rows.items())
                 if self.state.flat[i] in ("error", "diverged")]
        if fails:
            items = "".join(
                f"<li>{html.escape(self._where(i))}: <b>{self.state.flat[i]}</b> — "
                f"{html.escape(str(r.get('message', '')))}</li>" for i, r in fails[:20])
            more = f"<li>... and {len(fails) - 20} more</li>" if len(fails) > 20 else ""
            self.failures.object = (f'<div class="sgf-note">Points that did not end ok '
                                    f'({MARKS["error"]} error, {MARKS["diverged"]} diverged; '
                                    f'hover a cell for its message):<ul>{items}{more}</ul></div>')
        else:
            self.failures.object = ""

    def _where(self, index: int) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.sweep.points[index].params.items())

    # --- opening a point ------------------------------------------------------------------------
    def _on_tap(self, x=None, y=None, **kw):
        if x is None or y is None or self.sweep is None:
            return
        idx = self.cell_at(x, y)
        if idx is not None:
            self.open_point(idx)

    def cell_at(self, x, y) -> int | None:
        """Point index of the cell at plot coordinates (x, y) (cell centres are the integer
        indices of the x and y values); None outside the grid."""
        ij = []
        for v, n in zip((x, y), self.sweep.shape):
            try:
                i = int(round(float(v)))
            except (TypeError, ValueError):
                return None
            if not 0 <= i < n:
                return None
            ij.append(i)
        return int(np.ravel_multi_index(tuple(ij), self.sweep.shape))

    def open_point(self, index: int) -> bool:
        """Set the main configuration to point ``index`` and show its DMFT curves in the Curves
        tab: the sweep's result, else the cache's, else a new Run. False for an invalid point."""
        with self._lock:
            p = self.sweep.points[index]
            if p.config is None:
                self.show_alert(f"<b>{html.escape(self._where(index))}</b> is not a valid "
                                f"configuration: {html.escape(p.error)}", kind="warning")
                return False
            st = self.state.flat[index]
            result = self.results.get(index) if st in ("ok", "diverged") else None
            if result is None and st != "cancelled" and self.sweep.cache is not None:
                try:
                    result = self.sweep.result(index, compute_if_missing=False)
                except Exception:  # noqa: BLE001 - unreadable: run it instead
                    result = None
            if result is not None and not result.snapshots:
                result = None
        d = self.dashboard
        if d is None:
            return False
        ok = d.open_result(p.config, result, f"sweep point {self._where(index)}")
        with contextlib.suppress(Exception):
            d.tabs.active = 0
        return ok

    # --- alerts ---------------------------------------------------------------------------------
    def show_alert(self, text: str, kind: str = "danger"):
        self.alert.alert_type = kind
        self.alert.object = text
        self.alert.visible = True

    def hide_alert(self):
        self.alert.visible = False
        self.alert.object = ""

    # --- headless use ---------------------------------------------------------------------------
    def wait(self, timeout: float = 120.0, poll: float = 0.02) -> bool:
        """Tick until the sweep has finished (tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            if self.finished:
                self.tick()
                return True
            time.sleep(poll)
        return False


__all__ = ["SweepTab", "SUMMARIES", "parse_values", "sweepable", "cache_directory"]


def _bench(argv=None) -> int:
    """``python -m app.sweep_tab``: the issue's done-when case through the tab object.

    A 6 x 6 sweep (tau x delta) of the default logistic case, launched and drained like the
    dashboard does (pool workers, ``tick``), once cold (a fresh cache directory) and once from
    the cache; prints wall and CPU time and the load average.
    """
    import argparse
    import resource
    import shutil

    ap = argparse.ArgumentParser(prog="python -m app.sweep_tab", description=_bench.__doc__)
    ap.add_argument("--x", default="tau=0,0.25,0.5,1,1.5,2")
    ap.add_argument("--y", default="delta=0.5,1,2,3,4,6")
    ap.add_argument("--cache-dir", default=None, help="default: a new temporary directory")
    ap.add_argument("--main", choices=["cli", "dashboard"], default="cli",
                    help="main configuration: Experiment() defaults as `sgf-dmft sweep` "
                         "(dt = 0.05, default) or the dashboard's start-up preset")
    ap.add_argument("--compare", default=None, metavar="TABLE",
                    help="a table written by `sgf-dmft sweep --out TABLE` for the same grid: "
                         "check that the tab's rows are identical")
    args = ap.parse_args(argv)
    os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")
    from .dashboard import Dashboard

    d = Dashboard(experiment=Experiment() if args.main == "cli" else None, period_ms=0,
                  sync_url=False)
    tab = d.sweep_tab
    tmp = None
    if args.cache_dir is None:
        tmp = tab.cache_dir = tempfile.mkdtemp(prefix="sgf-sweep-bench-")
    else:
        tab.cache_dir = args.cache_dir
    (tab.x, tab.x_values), (tab.y, tab.y_values) = (s.split("=", 1) for s in (args.x, args.y))
    diff = {k: v for k, v in d.experiment.to_dict().items() if Experiment().to_dict()[k] != v}
    print(f"grid {args.x}; {args.y}; main configuration: defaults{diff or ''}; "
          f"cache {tab.cache_dir if tab.cache_dir is not True else cache_directory()}; "
          f"pool workers {tab.pool.workers}, session limit {tab.group.limit}; "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}")
    try:
        for what in ("cold", "cached"):
            load0 = os.getloadavg()[0]
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            if not tab.launch():
                print(tab.alert.object)
                return 2
            tab.wait(3600, poll=0.05)
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            print(f"{what:6s}: {tab.progress_text()}; wall {wall:.2f} s, CPU {cpu:.2f} s, "
                  f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
        if args.compare:
            import pandas as pd

            from solver.sweep import compare_tables

            ref = pd.read_parquet(args.compare) if args.compare.endswith(("parquet", "pq")) \
                else pd.read_csv(args.compare)
            compare_tables(ref, tab.table())
            print(f"identical to {args.compare} (apart from {', '.join(VOLATILE)})")
    finally:
        d.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench())
