"""The dashboard of one browser session: controls, runner, store, plots, exports.

State lives in two Parameterized objects: the :class:`~solver.config.Experiment` (every
physical parameter; the widgets are linked to it) and :class:`Dashboard` itself (which
simulations to run, plot axes). Worker threads (``app.runner``) compute; one periodic callback
per session (every ``period_ms``) drains their queue into the store and sends the data to the
plots' ``hv.streams.Pipe`` objects. ``Dashboard.tick`` is that callback; tests call it directly.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
import weakref

import holoviews as hv
import numpy as np
import panel as pn
import param

from solver.config import ConfigError, Experiment

from . import cleanup, draw, export, plots, presets
from .about import about_panel
from .controls import (COMMITTEE_ONLY, GROUPS, URL_PARAMS, handle_on_loop, horizon_text,
                       inner_widget, list_text, matrix_text, parse_matrix, widget_for)
from .pool import CapError, check_caps
from .runner import Runner, draw_pacer, interaction_quiet
from .store import SIMS, THEORY, Store, plan_jobs

log = logging.getLogger(__name__)

if "bokeh" not in hv.Store.renderers:  # the plots need the Bokeh backend (idempotent)
    hv.extension("bokeh", logo=False)
# Canvas, not WebGL (HoloViews' default): the curves hold at most a few thousand points, and
# every WebGL repaint is blitted onto the canvas (emulated where the browser has no GPU).
# SGF_DMFT_WEBGL=1 restores WebGL.
type(hv.Store.renderers["bokeh"]).webgl = os.environ.get("SGF_DMFT_WEBGL", "0") == "1"

#: Live dashboards of this process (the browser tests read the plotted data from here).
SESSIONS: "weakref.WeakSet[Dashboard]" = weakref.WeakSet()

XAXES = {"time t": "t", "epochs": "epochs", "steps": "sgd_steps"}
#: At Run, the old curves are cleared together with the theory's first point, or after this
#: many seconds if it takes longer (one redraw instead of two: each also re-renders the plots
#: in the browser).
FIRST_DRAW_WAIT = 0.3


def _same_matrix(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _url_error(values):
    log.warning("URL parameters not applied: %s", values)


class Dashboard(pn.viewable.Viewer):
    """Theory and simulation streaming live; see the module docstring."""

    sims = param.ListSelector(default=["gd", "sgf", "sgd-fresh"], objects=list(SIMS),
                              doc="Simulations run next to the theory.")
    gd_theory = param.Boolean(default=True, doc="When GD is simulated (and tau > 0), also run "
                                                "the DMFT at tau = 0, the theory of GD.")
    xaxis = param.Selector(default="t", objects=list(XAXES.values()))
    logx = param.Boolean(default=False)
    logy = param.Boolean(default=False)
    follow = param.Boolean(default=True, doc="Distributions follow the latest time.")

    def __init__(self, experiment: Experiment | None = None, engines=None, period_ms: int = 150,
                 max_workers: int | None = None, sync_url: bool = True, **params):
        super().__init__(**params)
        if experiment is None:  # a new page starts on the default preset (what the menu shows)
            default = presets.presets()[presets.default_name()]
            experiment = presets.build(default)
            if "sims" not in params:
                self.sims = [s for s in SIMS if s in default.get("sims", [])]
            if "gd_theory" not in params:
                self.gd_theory = bool(default.get("gd_theory", True))
        self.experiment = experiment
        self.runner = Runner(engines, max_workers=max_workers)
        self.store = Store()
        self.period_ms = period_ms
        self._lock = threading.RLock()
        self._pc = None
        self._closed = False
        self._queue_pos = None
        self._states = None  # (finished, job statuses) the status line last showed
        self._dist_dirty = False
        self._kernel_dirty = False
        self._setting_time = False
        self.grid: plots.CurveGrid | None = None
        self.curve_pipe = hv.streams.Pipe(data={})
        self.dist_pipe = hv.streams.Pipe(data={})
        self.kernel_pipe = hv.streams.Pipe(data={})
        self.overlap_pipe = hv.streams.Pipe(data={})
        self._overlap_key = None
        self.last_overlap_data: dict = {}
        self._dist_specs = None
        self._dists_built = None  # the series the Distributions plots were built for
        self.last_curve_data: dict = {}
        self._curves_dirty = False
        self._dists_dirty = False
        self._next_draw = 0.0
        self._next_dist_draw = 0.0
        self._quiet_until = 0.0  # redraws wait until then after an edit (interaction_quiet)
        self._status_due = False  # snapshots came since the status line last changed
        self.plot_cost = 0.0
        self._styles_settled = False  # first updates of the text panes done (draw.settle_styles)
        self._build_widgets()
        self._build_layout()
        SESSIONS.add(self)
        doc = pn.state.curdoc
        self._in_session = bool(doc and doc.session_context)
        self._doc = doc if self._in_session else None
        if self._in_session:
            pn.state.on_session_destroyed(self._on_destroyed)
            self.runner.on_first_snapshot = self._wake
            if sync_url and pn.state.location is not None:
                self.sync_location(pn.state.location)
        self._rebuild_plots()
        if self._in_session and period_ms:
            self._start_periodic()

    # --- widgets ----------------------------------------------------------------------
    def _build_widgets(self):
        exp = self.experiment
        names = presets.presets()
        self.preset_select = pn.widgets.Select(label="Preset", options=list(names),
                                               value=presets.default_name(),
                                               sizing_mode="stretch_width")
        self.preset_text = pn.pane.Markdown(names[self.preset_select.value]["description"],
                                            css_classes=["sgf-preset-text"],
                                            sizing_mode="stretch_width")
        self.preset_select.param.watch(self._on_preset, "value")
        self.run_button = pn.widgets.Button(label="▶ Run", color="primary",
                                            sizing_mode="stretch_width")
        self.stop_button = pn.widgets.Button(label="■ Stop", color="default",
                                             sizing_mode="stretch_width", disabled=True)
        self.run_button.on_click(lambda e: self.run())
        self.stop_button.on_click(lambda e: self.stop())
        self.progress = pn.indicators.Progress(value=0, max=1000, sizing_mode="stretch_width",
                                               bar_color="primary", height=14, margin=(4, 10))
        self.status = pn.pane.HTML('<div class="sgf-status">Ready. Press Run.</div>',
                                   sizing_mode="stretch_width", margin=(0, 10))
        self.param_widgets = {}
        self.groups = []
        for title, names_ in GROUPS:
            ws = []
            for n in names_:
                w = widget_for(exp, n)
                self.param_widgets[n] = w
                ws.append(w)
            if title == "Model":
                self.model_note = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10),
                                               visible=False)
                ws.append(self.model_note)
                self.param_widgets["v"].param.watch(self._on_v_text, "value")
                for name in ("Q0", "M0"):
                    self.param_widgets[name].param.watch(
                        lambda e, name=name: self._on_matrix_text(name, e), "value")
            if title == "Optimiser":
                self.horizon = pn.pane.HTML(horizon_text(exp), sizing_mode="stretch_width",
                                            margin=(0, 10))
                ws.append(self.horizon)
            if title == "Simulation":
                self.sims_widget = pn.widgets.CheckBoxGroup.from_param(
                    self.param.sims, label="Simulations", inline=False,
                    options={SIMS[k][0] + ("  (outside the theory)" if k == "sgd-reshuffle"
                                           else ""): k for k in SIMS})
                self.gd_theory_widget = pn.widgets.Checkbox.from_param(
                    self.param.gd_theory, label="DMFT at τ = 0 for GD")
                ws = [pn.pane.HTML('<span class="sgf-wlabel">Simulate</span>',
                                   margin=(2, 10, 0, 10)),
                      self.sims_widget, self.gd_theory_widget] + ws
            self.groups.append(pn.Card(*ws, title=title, collapsed=False,
                                       sizing_mode="stretch_width", margin=(4, 4)))
        exp.param.watch(self._on_exp_change, list(exp.param))
        self._update_relevance()
        # edits of the Experiment's widgets (cheap watchers) are handled on the event loop
        handle_on_loop(*self.param_widgets.values())

        # plot controls
        self.xaxis_widget = pn.widgets.RadioButtonGroup(
            label="x axis", options=XAXES, value=self.xaxis, color="primary",
            button_style="outline", width=270)
        self.xaxis_widget.link(self, value="xaxis")
        self.logx_widget = pn.widgets.Toggle.from_param(self.param.logx, label="log x",
                                                        width=70)
        self.logy_widget = pn.widgets.Toggle.from_param(self.param.logy, label="log y",
                                                        width=70)
        self.param.watch(lambda *e: self._rebuild_plots(), ["xaxis", "logx", "logy"])
        # before the first run, the empty plots show what Run will draw
        self.param.watch(lambda *e: self._rebuild_plots() if not self.store.runs else None,
                         ["sims", "gd_theory"])

        # runs
        self.keep_button = pn.widgets.Button(label="Keep this run", color="default",
                                             width=120)
        self.clear_button = pn.widgets.Button(label="Clear kept runs", color="default",
                                              width=130)
        self.keep_button.on_click(lambda e: self.keep())
        self.clear_button.on_click(lambda e: self.clear_kept())
        self.visible_widget = pn.widgets.CheckButtonGroup(label="Show", options=[], value=[],
                                                          color="primary",
                                                          button_style="outline",
                                                          sizing_mode="fixed", width=90,
                                                          height=32)
        self.visible_widget.param.watch(self._on_visible, "value")
        self.runs_table = pn.pane.HTML("", sizing_mode="stretch_width")

        # export
        self.csv_download = pn.widgets.FileDownload(
            callback=self._csv_file, filename="sgf-dmft-curves.csv", label="CSV of every curve",
            color="default", width=170)
        self.json_download = pn.widgets.FileDownload(
            callback=self._json_file, filename="sgf-dmft-config.json",
            label="Configuration (JSON)", color="default", width=170)
        self.png_download = pn.widgets.FileDownload(
            callback=self._png_file, filename="sgf-dmft-curves.png", label="PNG of the curves",
            color="default", width=160)

        # distributions
        self.time_player = pn.widgets.DiscretePlayer(label="time t", options=[0.0], value=0.0,
                                                     interval=200, loop_policy="once",
                                                     show_loop_controls=False, width=420)
        self.time_player.param.watch(self._on_time, "value")
        self.follow_widget = pn.widgets.Checkbox.from_param(self.param.follow,
                                                            label="follow the latest time")

        self.alert = pn.pane.Alert("", alert_type="danger", visible=False,
                                   sizing_mode="stretch_width", margin=(0, 10))

    def _on_exp_change(self, *events):
        exp = self.experiment
        self._hold_draws()
        self.horizon.object = horizon_text(exp)
        names = {e.name for e in events}
        if "model" in names and exp.model == "committee" and (
                exp.loss != "square" or exp.teacher != "linear"):
            # the committee is defined for square loss and its own (linear + noise) teacher
            exp.param.update(loss="square", teacher="linear")
        if "v" in names:
            w = self.param_widgets["v"]
            if w.value != list_text(exp.v):
                w.value = list_text(exp.v)
        for name in names & {"Q0", "M0"}:
            w = self.param_widgets[name]
            text = matrix_text(getattr(exp, name))
            try:
                same = _same_matrix(parse_matrix(w.value), getattr(exp, name))
            except ValueError:
                same = False
            if not same:
                w.value = text
        if names & {"teacher", "loss", "model"}:
            self._update_relevance()

    def _on_v_text(self, event):
        """Parse the second layer typed as '1,0.5' into exp.v (invalid text: an alert)."""
        try:
            v = Experiment.checked(v=event.new).v if event.new.strip() else None
        except ConfigError as e:
            v, msg = None, str(e)
        else:
            msg = "v: must be one number or k comma-separated numbers, e.g. 1,0.5"
        if v is None:
            self.show_alert(f"<b>Second layer v not applied</b>: {msg}", kind="warning")
            return
        if list(v) != list(self.experiment.v):
            self.experiment.v = list(v)
        if self.alert.visible and "Second layer v" in str(self.alert.object):
            self.hide_alert()

    def _on_matrix_text(self, name: str, event):
        """Parse an initial overlap matrix typed as '0.05,0;0,0.05' into exp.Q0 / exp.M0
        (empty text: None, i.e. q0*I / m0*I; invalid text: an alert; the shape is checked at
        Run by Experiment.validate)."""
        try:
            A = parse_matrix(event.new)
        except ValueError as e:
            self.show_alert(f"<b>Initial overlaps {name} not applied</b>: {e}", kind="warning")
            return
        if not _same_matrix(A, getattr(self.experiment, name)):
            setattr(self.experiment, name, A)
        if self.alert.visible and f"Initial overlaps {name}" in str(self.alert.object):
            self.hide_alert()

    def _update_relevance(self):
        """Show or disable the widgets that the current model and teacher use."""
        exp = self.experiment
        committee = exp.model == "committee"
        for n in COMMITTEE_ONLY:
            self.param_widgets[n].visible = committee
        # the committee fixes the loss (square) and the teacher (linear + label noise)
        inner_widget(self.param_widgets["loss"]).disabled = committee
        inner_widget(self.param_widgets["teacher"]).disabled = committee
        inner_widget(self.param_widgets["noise"]).disabled = exp.teacher != "linear"
        inner_widget(self.param_widgets["flip"]).disabled = exp.teacher != "sign"
        self.model_note.visible = committee
        if committee:
            self.model_note.object = (
                '<div class="sgf-note">Two-layer committee ŷ = (1/k) Σₐ vₐ σ(hₐ) with a fixed '
                'second layer, trained with the <b>square loss</b> on the <b>teacher</b> '
                'y = (1/k*) Σ_b σ(h*_b) + σ ε: loss and teacher are set to square / linear '
                '(and locked) while this model is selected. ρ sets ρ·I; q₀, m₀ set Q(0) = q₀·I, '
                'M(0) = m₀·I unless full matrices are typed above (rows separated by ;).</div>')

    def _on_preset(self, event):
        self.apply_preset(event.new)

    def apply_preset(self, name: str):
        p = presets.presets()[name]
        presets.apply(p, self.experiment)
        self.sims = [s for s in SIMS if s in p.get("sims", [])]
        self.gd_theory = bool(p.get("gd_theory", True))
        self.preset_text.object = p["description"]
        if self.preset_select.value != name:
            self.preset_select.value = name

    # --- layout -----------------------------------------------------------------------
    def _build_layout(self):
        self.curves_pane = pn.pane.HoloViews(None, sizing_mode="stretch_width",
                                             min_height=600, linked_axes=False)
        self.legend = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10))
        self.dists_pane = pn.pane.HoloViews(None, sizing_mode="stretch_width", min_height=340)
        self.kernels_pane = pn.pane.HoloViews(None, sizing_mode="stretch_width", min_height=360)
        self.kernel_note = pn.pane.HTML("", sizing_mode="stretch_width")
        plot_controls = pn.Row(
            pn.pane.HTML('<span class="sgf-wlabel">x&nbsp;axis</span>', width=50,
                         margin=(14, 0, 0, 10)),
            self.xaxis_widget, self.logx_widget, self.logy_widget, pn.HSpacer(),
            self.keep_button, self.clear_button, sizing_mode="stretch_width")
        runs_box = pn.Column(
            pn.Row(pn.pane.HTML('<span class="sgf-wlabel">Runs shown</span>', width=90,
                                margin=(14, 0, 0, 10)),
                   self.visible_widget, pn.HSpacer(), self.csv_download, self.json_download,
                   self.png_download, sizing_mode="stretch_width"),
            self.runs_table,
            pn.pane.HTML('<div class="sgf-note">PNG of the curves: drawn on the server as '
                         'shown (axes, log scales, runs shown); the save tool (⤓) of the '
                         'plots\' toolbar saves the live plots from the browser. Link: the '
                         'address bar holds the whole configuration.</div>',
                         sizing_mode="stretch_width"),
            sizing_mode="stretch_width")
        curves_tab = pn.Column(plot_controls, self.legend, self.curves_pane, runs_box,
                               sizing_mode="stretch_width")
        self.dist_legend = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10))
        dist_tab = pn.Column(pn.Row(self.time_player, self.follow_widget), self.dist_legend,
                             self.dists_pane,
                             pn.pane.HTML(
                                 '<div class="sgf-note">Theory: density of a parameter '
                                 'entry (line) and histogram of the training fields of the '
                                 'DMFT sample process; simulations: histograms over entries '
                                 '/ samples of the first seed, at the recorded time nearest '
                                 'to the chosen one.</div>', sizing_mode="stretch_width"),
                             sizing_mode="stretch_width")
        kern_tab = pn.Column(self.kernel_note, self.kernels_pane, sizing_mode="stretch_width")
        self.overlaps_pane = pn.pane.HoloViews(None, sizing_mode="stretch_width", min_height=300)
        self.overlap_note = pn.pane.HTML("", sizing_mode="stretch_width")
        overlaps_tab = pn.Column(
            pn.Row(self.time_player, self.follow_widget), self.overlap_note, self.overlaps_pane,
            pn.pane.HTML('<div class="sgf-note">Overlap matrices of the committee machine at '
                         'the time chosen with the player (the same as in the '
                         '<i>Distributions</i> tab; it follows the latest time while a run '
                         'streams unless you move it): left the '
                         'student-student overlaps Q, right the student-teacher overlaps M; '
                         'theory (DMFT, or the online ODEs) and each simulation (mean over '
                         'seeds) at the recorded time nearest to the chosen one.</div>',
                         sizing_mode="stretch_width"),
            sizing_mode="stretch_width")
        from .sweep_tab import SweepTab  # the Sweep tab (phase diagrams), app/sweep_tab.py

        self.sweep_tab = SweepTab(self)
        self.tabs = pn.Tabs(("Curves", curves_tab), ("Distributions", dist_tab),
                            ("Kernels", kern_tab), ("Overlaps", overlaps_tab),
                            ("Sweep", self.sweep_tab), ("About", about_panel()),
                            sizing_mode="stretch_width", dynamic=True)
        self._dist_tab = dist_tab
        self.tabs.param.watch(self._build_dists, "active")
        self.main = pn.Column(self.alert, self.tabs, sizing_mode="stretch_width")
        self.sidebar = pn.Column(
            self.preset_select, self.preset_text,
            pn.Row(self.run_button, self.stop_button, sizing_mode="stretch_width"),
            self.progress, self.status, *self.groups, sizing_mode="stretch_width")

    def __panel__(self):
        return pn.Row(pn.Column(self.sidebar, width=340), self.main, sizing_mode="stretch_width")

    def template(self) -> pn.template.FastListTemplate:
        from .main import CSS_FILE

        raw = CSS_FILE.read_text() if CSS_FILE.exists() else ""
        return pn.template.FastListTemplate(
            title="sgf-dmft · SGD, SGF and their DMFT, live",
            sidebar=[self.sidebar], main=[self.main], sidebar_width=360,
            accent_base_color="#2c5d8a", header_background="#1f3b57", raw_css=[raw],
            main_layout=None)

    # --- plots ------------------------------------------------------------------------
    def _runs_and_styles(self):
        return [(r, self.store.style_of(r)) for r in self.store.visible_runs()]

    def _rebuild_plots(self, force: bool = False):
        """Plots for the current set of series; new DynamicMaps only if the structure changed
        (series, axis, log scales), else just new data."""
        with self._lock:
            rs = self._runs_and_styles()
            specs = plots.specs_for(rs) if self.store.runs else self._planned_specs()
            classification = (any(r.classification for r, _ in rs) if rs
                              else self.experiment.is_classification)
            committee = (any(r.committee for r, _ in rs) if rs
                         else self.experiment.model == "committee")
            obs = tuple(o for o in plots.CURVES
                        if o != "test_error" or classification or committee)
            key = (tuple(specs), self.xaxis, self.logx, self.logy, obs, committee)
            if force or self.grid is None or self.grid.key != key:
                self.grid = plots.CurveGrid(specs, self.xaxis, self.logx, self.logy, obs,
                                            committee=committee)
                self.curve_pipe = self.grid.pipe
                self.curves_pane.object = self.grid.layout
                self.legend.object = plots.legend_html(specs)
                self._send_curves()
            else:  # same plots: the next tick draws the new data
                self._curves_dirty = True
                self._next_draw = 0.0
            cur = self.store.current
            dspecs = tuple(plots.specs_for([(cur, 0)])) if cur else ()
            if force or dspecs != self._dist_specs:
                self._dist_specs = dspecs
                self._dists_built = None  # built when the Distributions tab is shown
                self._build_dists()
            else:
                self._send_dists()
            self._rebuild_overlaps(force)
            if self.kernels_pane.object is None:
                self.kernels_pane.object = plots.kernels_layout(self.kernel_pipe)
            self.kernel_pipe.send(self._kernel_data())
            self._update_runs_view()

    def _rebuild_overlaps(self, force: bool = False):
        """Overlap heatmaps of the current run (committee only): one row per series."""
        cur = self.store.current
        if cur is None or not cur.committee:
            self._overlap_key = None
            self.overlaps_pane.object = None
            self.overlaps_pane.visible = False
            self.overlap_note.object = (
                '<div class="sgf-note">The overlap matrices Q (k×k) and M (k×k*) appear here '
                'for runs of the committee model (sidebar: Model → committee).</div>')
            return
        specs = tuple(sp for sp in plots.specs_for([(cur, 0)]))
        e = next(iter(cur.series.values())).exp
        key = (specs, e.k, e.kstar)
        self.overlap_note.object = ""
        self.overlaps_pane.visible = True
        if force or key != self._overlap_key:
            self._overlap_key = key
            self.overlap_pipe = hv.streams.Pipe(data=self._overlap_data())
            self.overlaps_pane.object = plots.overlaps_layout(self.overlap_pipe, list(specs),
                                                              e.k, e.kstar)
        else:
            self._send_overlaps()

    def _overlap_data(self) -> dict:
        """sid -> {'t', 'Q', 'M'} of the current run at the chosen time."""
        cur = self.store.current
        if not cur or not cur.committee:
            return {}
        t = self.time_player.value if hasattr(self, "time_player") else 0.0
        out = {}
        for key, s in cur.series.items():
            hit = s.overlaps_at(t if t is not None else 0.0)
            if hit:
                out[plots.sid(0, key)] = {"t": hit[0], "Q": hit[1], "M": hit[2]}
        self.last_overlap_data = out
        return out

    def _send_overlaps(self):
        if self._overlap_key is not None:
            self.overlap_pipe.send(self._overlap_data())

    def _planned_specs(self) -> list:
        """The series the next Run will draw (so that the first Run needs no new plots)."""
        try:
            jobs = plots.label_jobs(plan_jobs(self.experiment, self.sims, self.gd_theory))
        except ConfigError:
            return []
        return [plots.SeriesSpec(plots.sid(0, j.key), j.key, j.label, j.kind == "theory", 0)
                for j in jobs]

    def _send_curves(self):
        t0 = time.perf_counter()
        self.last_curve_data = plots.curve_data(self._runs_and_styles(), self.xaxis)
        # straight into the rendered plots' Bokeh sources (new points streamed), else
        # through HoloViews (no rendered plots: headless; see app/draw.py)
        if not draw.send_curves(self.grid, self.curves_pane, self.last_curve_data):
            self.curve_pipe.send(self.last_curve_data)
        self._curves_dirty = False
        cost = time.perf_counter() - t0
        self.plot_cost = cost
        # adaptive rate: all sessions together draw at most a quarter of the server's time
        self._next_draw = time.perf_counter() + draw_pacer().delay(self, cost,
                                                                   self.period_ms / 1000.0)

    def _hold_draws(self):
        """An edit during a run: the next redraws (and status line) of this session wait
        ``interaction_quiet()`` s, so that the page shows the edit's response before it
        repaints its plots (app/runner.py); the snapshots are drawn afterwards."""
        quiet = interaction_quiet()
        if quiet and self.runner.busy():
            self._quiet_until = max(self._quiet_until, time.perf_counter() + quiet)

    def _dist_times(self):
        cur = self.store.current
        if not cur:
            return []
        ts = set()
        for s in cur.series.values():  # engines may report the same time with rounding noise
            ts.update(round(t, 9) for t in s.dists.keys())
            if cur.committee:  # the overlap heatmaps exist at every recorded time
                ts.update(round(t, 9) for t in s.t)
        return sorted(ts)

    def _dist_data(self):
        cur = self.store.current
        if not cur:
            return {}
        t = self.time_player.value if hasattr(self, "time_player") else 0.0
        out = {"_t": None}
        for key, s in cur.series.items():
            hit = s.dist_at(t if t is not None else 0.0)
            if hit:
                out[plots.sid(0, key)] = {"dist": hit[1], "t": hit[0]}
                out["_t"] = hit[0]
        return out

    def _kernel_data(self):
        cur = self.store.current
        s = cur.series.get(THEORY) if cur else None
        if not s or not s.kernels:
            self.kernel_note.object = (
                '<div class="sgf-note">The kernels C(t,s) and R(t,s) of the DMFT appear here '
                'when the theory engine reports them (Monte Carlo and exact methods).</div>')
            return {}
        self.kernel_note.object = (f'<div class="sgf-note">DMFT kernels of {cur.label} up to '
                                   f't = {s.kernels_t:.3g}.</div>')
        return {"kernels": s.kernels, "label": cur.label}

    def _on_time(self, event):
        if not self._setting_time:
            self.follow = False
        self._send_dists()

    def _build_dists(self, *events):
        """The Distributions tab's plots for the current series, once that tab is shown: a
        page's first Run click then does not build them (HoloViews objects: 8 of the 13 ms
        of a headless click, docs/deploy.md "Session 6") for a tab that is usually hidden
        (the tabs are rendered only when shown, ``dynamic=True``)."""
        if self._dists_built == self._dist_specs or (
                self.tabs.objects[self.tabs.active] is not self._dist_tab):
            return
        dspecs = self._dists_built = self._dist_specs
        self.dist_pipe = hv.streams.Pipe(data=self._dist_data())
        self.dists_pane.object = plots.dists_layout(self.dist_pipe, list(dspecs))
        self.dist_legend.object = plots.dist_legend_html(list(dspecs))

    def _send_dists(self):
        t0 = time.perf_counter()
        if self._dists_built == self._dist_specs:  # else built with the data when shown
            self.dist_pipe.send(self._dist_data())
        self._send_overlaps()
        self._dists_dirty = False
        cost = time.perf_counter() - t0
        self._next_dist_draw = time.perf_counter() + draw_pacer().delay(
            self, cost, self.period_ms / 1000.0)

    def _update_times(self):
        ts = self._dist_times()
        if not ts:
            return
        self._setting_time = True
        try:
            self.time_player.options = ts
            if self.follow or self.time_player.value not in ts:
                self.time_player.value = ts[-1]
        finally:
            self._setting_time = False

    # --- runs -------------------------------------------------------------------------
    def run(self) -> bool:
        """Validate, cancel any run in progress, start the engines. False if invalid."""
        with self._lock:
            self.hide_alert()
            try:
                jobs = plots.label_jobs(plan_jobs(self.experiment, self.sims, self.gd_theory))
                check_caps(self.experiment, self.sims)
            except CapError as e:
                self.show_alert(f"<b>Over this server's limit — {e.param}</b>: {e}")
                return False
            except ConfigError as e:
                self.show_alert(f"<b>Invalid configuration — {e.param}</b>: {e}")
                return False
            try:
                run_id = self.runner.start(jobs)
            except Exception as e:  # noqa: BLE001 - e.g. an engine that cannot be imported
                log.exception("cannot start the engines")
                self.show_alert(f"<b>Cannot start the engines</b>: {type(e).__name__}: {e}")
                return False
            run = self.store.new_run(jobs, self.experiment, self.sims, run_id)
            run.t_start = self.runner.t_start
            self.follow = True
            self._reported = False
            self.run_button.label = "▶ Run again"
            self.stop_button.disabled = False
            self._rebuild_plots()
            if self._curves_dirty:
                # same plots: clear the old curves with the theory's first point (usually
                # < 0.2 s away; one redraw instead of two), or after FIRST_DRAW_WAIT
                self._next_draw = time.perf_counter() + FIRST_DRAW_WAIT
            self._update_status()
            return True

    def stop(self):
        with self._lock:
            self.runner.stop()
            if self.store.current:
                self.store.current.stop()
            self.stop_button.disabled = True
            self._update_status()

    def keep(self):
        with self._lock:
            if self.store.keep_current():
                self._rebuild_plots()

    def clear_kept(self):
        with self._lock:
            self.store.clear_kept()
            self._rebuild_plots()

    def open_result(self, config: dict, result=None, label: str = "") -> bool:
        """Open a run from elsewhere (the Sweep tab): set the configuration to ``config`` and
        show ``result`` (a finished DMFT :class:`~solver.snapshot.Result`) as the current run's
        theory curve, without computing; without a result, Run the configuration."""
        import html

        from solver.config import names as param_names

        from .runner import Job

        with self._lock:
            new = Experiment.from_dict(config)
            old, cfg = self.experiment.to_dict(), new.to_dict()
            changed = {k: getattr(new, k) for k in param_names()
                       if k != "eta" and old.get(k) != cfg.get(k)}
            if changed:
                self.experiment.param.update(**changed)
            if result is None or not result.snapshots:
                return self.run()
            self.hide_alert()
            self.stop()  # a run in progress stops (its events would not match the new id)
            self._opened = getattr(self, "_opened", 0) - 1
            theory_exp = self.experiment.copy(algo="sgf", sampling="fresh")
            job = Job(THEORY, "theory", theory_exp, plots.theory_label(theory_exp))
            run = self.store.new_run([job], self.experiment, [], self._opened)
            s = run.series[THEORY]
            for snap in result.snapshots:
                s.add(snap)
            ok = result.status in ("ok", "")
            s.status, s.message = ("done", "") if ok else ("error", result.message)
            s.progress, s.t_first, s.t_end = 1.0, 0.0, 0.0
            self.follow = True
            self._reported = False
            self.stop_button.disabled = True
            self._rebuild_plots()
            if self._curves_dirty:  # same plots as planned: draw the opened run now
                self._send_curves()
            self._update_times()
            self._update_status()
            self.status.object = (f'<div class="sgf-status"><b>{html.escape(label or "Opened")}'
                                  '</b>: DMFT curves from the sweep, not recomputed; Run adds '
                                  'the simulations.</div>')
            return True

    def _on_visible(self, event):
        with self._lock:
            shown = set(event.new)
            changed = False
            for r in self.store.runs:
                v = r.label in shown
                changed |= v != r.visible
                r.visible = v
            if changed:
                self._rebuild_plots()

    def _update_runs_view(self):
        labels = [r.label for r in self.store.runs]
        vis = [r.label for r in self.store.runs if r.visible]
        if list(self.visible_widget.options) != labels or list(self.visible_widget.value) != vis:
            self.visible_widget.param.update(options=labels, value=vis,
                                             width=max(90, 80 * len(labels)))
        rows = []
        for r in reversed(self.store.runs):
            style = self.store.style_of(r)
            st = ", ".join(f"{s.label} {s.status}" for s in r.series.values())
            tf, ta = r.t_first_theory, r.t_all
            timing = ""
            if tf is not None:
                timing += f"first theory point {tf:.2f} s"
            if ta is not None:
                timing += f"; all curves {ta:.1f} s"
            rows.append(f"<tr><td>{plots.dash_svg(style)}</td><td><b>{r.label}</b>"
                        f"{' (kept)' if r.kept else ''}</td><td>{r.summary()}</td>"
                        f"<td>{st}</td><td>{timing}</td></tr>")
        self.runs_table.object = ('<table class="sgf-runs"><tr><th></th><th>run</th>'
                                  '<th>configuration</th><th>series</th><th>timing</th></tr>'
                                  + "".join(rows) + "</table>") if rows else ""

    # --- the periodic callback ------------------------------------------------------------
    def _start_periodic(self):
        from panel.io.callbacks import PeriodicCallback

        async def tick():
            # a coroutine runs on the server's event loop, with the document lock, even when
            # Panel has a thread pool (--num-threads): the plots then update in place and the
            # measured drawing cost paces the redraws (see _send_curves)
            self.tick()

        self._pc = PeriodicCallback(callback=tick, period=self.period_ms, background=True,
                                    log=False)
        self._pc.start()

    def _wake(self, key: str) -> None:
        """Worker thread: a job's first snapshot is queued. The theory's is drawn at once (a
        callback on the server's event loop) instead of at the next periodic tick."""
        doc = self._doc
        if key != THEORY or doc is None or self._closed:
            return

        async def now():
            from panel.io.state import set_curdoc

            with set_curdoc(doc):  # Panel's current document: plots may then be changed here
                self.tick()

        doc.add_next_tick_callback(now)

    def tick(self) -> int:
        """Drain the workers' queue into the store and the plots; returns events handled."""
        if self._closed:
            return 0
        with self._lock:
            if not self._styles_settled:  # once the page has loaded
                self._styles_settled = draw.settle_styles(self)
            events = self.runner.drain()
            run = self.store.current
            if run is None:
                return len(events)
            dists = kern = False
            for ev in events:
                if ev.run_id != run.id:
                    continue
                s = run.series.get(ev.key)
                nd = len(s.dists) if s else 0
                kt = s.kernels_t if s else None
                if run.apply(ev):
                    self._curves_dirty = True
                    if ev.key == THEORY and len(s) == 1:
                        self._next_draw = 0.0  # the theory's first point is drawn at once
                    dists |= len(s.dists) != nd or run.committee
                    kern |= s.kernels_t != kt
            now = time.perf_counter()
            # backpressure: no new plot patch while the last one is still being written
            wait = draw.backlogged(self.curves_pane)
            drew = False
            # an edit during the run: the page shows its response first (_hold_draws)
            wait = wait or now < self._quiet_until
            if self._curves_dirty and not wait and (now >= self._next_draw
                                                    or not self.runner.busy()):
                self._send_curves()
                drew = True
            if dists:
                self._update_times()
                self._dists_dirty = self._dists_dirty or self.follow
            if self._dists_dirty and not wait and (now >= self._next_dist_draw
                                                   or not self.runner.busy()):
                self._send_dists()
            if kern:
                self.kernel_pipe.send(self._kernel_data())
            pos = self.runner.queue_position() if not run.finished else None
            # The status line and the progress bar follow the redraws (paced process-wide) and
            # change at once when a job starts, ends or moves in the queue: every change makes
            # the browser lay the page out again (about 20 ms), and at every tick (150 ms) that
            # took more of a page's CPU than its plots.
            states = (run.finished, tuple(s.status for s in run.series.values()))
            # (snapshots that came during an edit's pause show with the redraw after it)
            self._status_due = self._status_due or bool(events)
            if now >= self._quiet_until and (
                    self._status_due and (drew or states != self._states)
                    or pos != self._queue_pos):
                self._queue_pos, self._states, self._status_due = pos, states, False
                self._update_status()
            return len(events)

    def _update_status(self):
        run = self.store.current
        if run is None:
            return
        p = run.progress
        self.progress.value = int(round(1000 * p))
        parts = []
        for s in run.series.values():
            if s.status == "running":
                parts.append(f"{s.label} {100 * s.progress:.0f}%")
            elif s.status == "queued":
                parts.append(f"{s.label} queued")
            elif s.status == "error":
                parts.append(f'<span class="sgf-err">{s.label} stopped with an error</span>')
            elif s.status == "stopped":
                parts.append(f"{s.label} stopped")
            else:
                parts.append(f"{s.label} ✓")
        if run.finished:
            self.stop_button.disabled = True
            ta, tf = run.t_all, run.t_first_theory
            head = "Stopped" if any(s.status == "stopped" for s in run.series.values()) else "Done"
            head += f" in {ta:.1f} s" if ta is not None else ""
            if tf is not None:
                head += f" (first theory point after {tf:.2f} s)"
            errs = run.errors()
            if errs and not getattr(self, "_reported", False):
                self._reported = True
                self.show_alert("<b>A run stopped early</b> (the curves computed so far are "
                                "kept): " + "; ".join(errs), kind="warning")
        else:
            eta = run.eta_seconds()
            head = "Running" + (f", about {eta:.0f} s left" if eta is not None else "")
            pos = self.runner.queue_position()
            self._queue_pos = pos
            if pos is not None:  # some of this run's jobs wait for a worker of the server
                st = self.runner.pool.stats()
                if all(s.status == "queued" for s in run.series.values()):
                    head = "Waiting for a free worker"
                head += (f" — place in the server's queue: {pos + 1} ({pos} job"
                         f"{'s' if pos != 1 else ''} of other sessions ahead; {st['running']} "
                         f"running on {st['workers']} workers)")
        self.status.object = (f'<div class="sgf-status"><b>{head}</b><br>'
                              + " · ".join(parts) + "</div>")
        self._update_runs_view()

    # --- alerts -------------------------------------------------------------------------
    def show_alert(self, html: str, kind: str = "danger"):
        self.alert.alert_type = kind
        self.alert.object = html
        self.alert.visible = True

    def hide_alert(self):
        self.alert.visible = False
        self.alert.object = ""

    # --- export -------------------------------------------------------------------------
    def curves_csv(self) -> str:
        with self._lock:
            return export.curves_csv(self.store.runs)

    def config_json(self) -> str:
        with self._lock:
            return export.config_json(self.experiment, self.sims, self.gd_theory,
                                      self.store.runs)

    def _csv_file(self):
        return io.StringIO(self.curves_csv())

    def _json_file(self):
        return io.StringIO(self.config_json())

    def curves_png(self, dpi: int = 100) -> bytes:
        """PNG of the curve plots as shown (server side, matplotlib; see export.curves_png)."""
        with self._lock:
            if self.grid is None:
                self._rebuild_plots()
            data = plots.curve_data(self._runs_and_styles(), self.xaxis)
            run = self.store.current
            title = f"sgf-dmft · {run.label}: {run.summary()}" if run else None
            return export.curves_png(self.grid, data, dpi=dpi, title=title)

    def _png_file(self):
        try:
            return io.BytesIO(self.curves_png())
        except Exception as e:  # noqa: BLE001 - e.g. matplotlib missing: say so, do not crash
            log.exception("PNG export failed")
            self.show_alert(f"<b>PNG export failed</b>: {type(e).__name__}: {e}",
                            kind="warning")
            return None

    # --- URL ----------------------------------------------------------------------------
    def sync_location(self, location):
        """The URL's query string follows the configuration (and sets it on load)."""
        location.sync(self.experiment, {n: n for n in URL_PARAMS}, on_error=self._url_rejected)
        location.sync(self, {"sims": "sims", "gd_theory": "gd_theory"},
                      on_error=self._url_rejected)

    def _url_rejected(self, values):
        _url_error(values)
        self.show_alert(f"<b>Some URL parameters were not applied</b>: {values}", kind="warning")

    # --- session end --------------------------------------------------------------------
    def _on_destroyed(self, session_context):
        self.close()

    def close(self):
        """Stop the workers and drop references (session closed)."""
        self._closed = True
        self.runner.on_first_snapshot = None
        self._doc = None
        if self._pc is not None:
            try:
                self._pc.stop()
            except Exception:  # noqa: BLE001
                pass
            self._pc = None
        self.runner.shutdown()
        self.sweep_tab.close()
        self.store = Store()
        SESSIONS.discard(self)
        if self._in_session:
            # Panel's link registry would keep this whole session alive (app.cleanup.release);
            # its reference cycles are freed by one collection shortly after
            cleanup.release(self.sidebar, self.main)
            cleanup.collect_soon()

    # --- for tests and the latency measurement -----------------------------------------------
    def wait(self, timeout: float = 60.0, poll: float = 0.05) -> bool:
        """Tick until the current run has finished (headless use only)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            run = self.store.current
            if run is not None and run.finished and not self.runner.busy():
                self.tick()
                return True
            time.sleep(poll)
        return False

    def plotted(self, key: str = THEORY, obs: str = "train_loss"):
        """(x, value, se) of a series of the current run, as last sent to the plots."""
        run = self.store.current
        d = self.last_curve_data.get(plots.sid(0, key)) if run else None
        if not d:
            return np.empty(0), np.empty(0), np.empty(0)
        v, s = d["values"][obs]
        return d["x"], v, s


__all__ = ["Dashboard", "SESSIONS"]
