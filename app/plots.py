"""HoloViews drawing: DynamicMaps fed by ``hv.streams.Pipe`` objects that the session's periodic
callback fills from the :class:`~app.store.Store`.

The *structure* of every overlay (which series, which glyphs) is fixed when the plots are built
(at Run, keep/hide/clear, axis or log switch), so that while the engines stream only data
changes: Bokeh updates its data sources in place, without re-rendering the figures. In a served
page the curves' sources are then updated directly (app/draw.py: new points streamed, ranges
set), without the Pipe; :meth:`CurveGrid.element_columns` is the data both paths draw.

Style: colour = engine (theory black line with its Monte Carlo band; GD blue, SGF orange,
SGD fresh green, SGD reshuffle red markers with error bars of one standard error); line dash
and hollow markers = an older run kept for comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import holoviews as hv
import numpy as np

from .store import CURVES, THEORY, THEORY_GD

COLORS = {THEORY: "#1b1b1b", THEORY_GD: "#1f77b4", "gd": "#1f77b4", "sgf": "#e8750a",
          "sgd-fresh": "#2a9d3a", "sgd-reshuffle": "#d1342f"}
MARKERS = {"gd": "circle", "sgf": "square", "sgd-fresh": "triangle",
           "sgd-reshuffle": "diamond"}
DASHES = ["solid", "dashed", "dotted", "dotdash", "dashdot", "4 2 1 2", "8 3", "2 4", "6 2 2 2"]
YLABELS = {"train_loss": "training loss", "test_loss": "test loss",
           "test_error": "test error", "m": "overlap m", "Q": "self-overlap Q",
           "cosine": "cosine m/√(Qρ)"}
TITLES = {"train_loss": "Training loss", "test_loss": "Test loss",
          "test_error": "Test (classification) error", "m": "Teacher overlap m(t)",
          "Q": "Self-overlap Q(t) = C(t,t)", "cosine": "Cosine similarity m/√(Qρ)"}
#: Titles and axis labels that differ for the committee machine (model = 'committee').
COMMITTEE_TITLES = {"test_error": "Generalisation error ε_g",
                    "m": "Mean teacher overlap tr M / k", "Q": "Mean self-overlap tr Q / k",
                    "cosine": "Cosine tr M / √(tr Q tr ρ)"}
COMMITTEE_YLABELS = {"test_error": "generalisation error", "m": "tr M / k", "Q": "tr Q / k",
                     "cosine": "cosine"}
XLABELS = {"t": "time t (= steps·η/d)", "epochs": "epochs (passes over the data)",
           "sgd_steps": "optimiser steps (SGD t·d/η, GD t/dt)"}
MAX_MARKERS = 24
MAX_KERNEL = 160
#: Theory series are labelled by the method actually used (legends, hover, status, CSV).
METHOD_LABELS = {"mc": "DMFT mc", "exact": "DMFT exact", "online": "online ODEs"}


def theory_label(exp, gd: bool = False) -> str:
    """'theory (DMFT mc)', 'theory (DMFT exact)', 'theory (online ODEs)'; for the tau = 0
    theory of GD 'GD theory τ=0 (DMFT mc)'."""
    method = exp.resolved_method()
    m = METHOD_LABELS.get(method, method)
    return f"GD theory τ=0 ({m})" if gd else f"theory ({m})"


def label_jobs(jobs):
    """Set the label of every theory job from its method (in place; returns ``jobs``)."""
    for j in jobs:
        if j.kind == "theory":
            j.label = theory_label(j.exp, gd=j.key == THEORY_GD)
    return jobs


@dataclass(frozen=True)
class SeriesSpec:
    """One drawn series: ``sid`` indexes the data dict sent through the pipes."""

    sid: str
    key: str
    label: str
    theory: bool
    style: int = 0

    @property
    def color(self) -> str:
        return COLORS.get(self.key, "#7f7f7f")

    @property
    def dash(self) -> str:
        return DASHES[self.style % len(DASHES)]

    @property
    def marker(self) -> str:
        return MARKERS.get(self.key, "circle")


def xdim(axis: str) -> hv.Dimension:
    return hv.Dimension(axis, label=XLABELS.get(axis, axis))


def _ydim(obs: str, labels=None) -> hv.Dimension:
    return hv.Dimension(obs, label=(labels or {}).get(obs) or YLABELS.get(obs, obs))


def _sedim(obs: str) -> hv.Dimension:
    return hv.Dimension(f"{obs}_se", label="± SE")


def _clean(x, v, s, logx, logy):
    x = np.asarray(x, float)
    v = np.asarray(v, float)
    s = np.nan_to_num(np.asarray(s, float), nan=0.0)
    ok = np.isfinite(x) & np.isfinite(v)
    if logx:
        ok &= x > 0
    if logy:
        ok &= v > 0
    return ok


def _marker_index(n: int, expected: int) -> np.ndarray:
    """Marker positions that do not move while the series grows."""
    stride = max(1, int(math.ceil(max(expected, n) / MAX_MARKERS)))
    return np.arange(0, n, stride)


class CurveGrid:
    """A grid of DynamicMaps, one per observable, all fed by one ``hv.streams.Pipe``.

    The elements are built once, with their options, as templates; the DynamicMap callbacks
    only ``clone`` them with new data (the clone keeps the options), which is several times
    cheaper than building and styling elements on every update. ``key`` identifies the
    structure: a new Run with the same series reuses the grid and only sends new data.
    """

    def __init__(self, specs: list[SeriesSpec], axis: str, logx=False, logy=False,
                 observables=CURVES, height=270, committee: bool = False):
        self.specs = list(specs)
        self.axis, self.logx, self.logy = axis, logx, logy
        self.observables = tuple(observables)
        self.committee = committee
        self.titles = {**TITLES, **(COMMITTEE_TITLES if committee else {})}
        self.ylabels = COMMITTEE_YLABELS if committee else {}
        self.key = (tuple(self.specs), axis, logx, logy, self.observables, committee)
        self.pipe = hv.streams.Pipe(data={})
        self._templates = {obs: self._build(obs, height) for obs in self.observables}
        self.layout = hv.Layout([
            hv.DynamicMap(lambda data, obs=obs: self.frame(obs, data), streams=[self.pipe])
            for obs in self.observables]).cols(3)  # shared_axes, merge_tools: the defaults

    def _build(self, obs, height):
        X, Y, S = xdim(self.axis), _ydim(obs, self.ylabels), _sedim(obs)
        T = hv.Dimension("t", label="t")
        vd = [Y, S] if self.axis == "t" else [Y, S, T]
        common = dict(responsive=True, min_height=height, height=height, framewise=True,
                      logx=self.logx, logy=self.logy, show_legend=False)
        tools = dict(default_tools=["pan", "wheel_zoom", "box_zoom", "reset", "save"],
                     active_tools=["wheel_zoom"], show_grid=True)
        empty2, empty3 = (np.empty(0),) * 2, (np.empty(0),) * (len(vd) + 1)
        # hover: which series (its label names the theory's method), then the exact values
        hover = [("series", "$label"), (X.label, f"@{{{self.axis}}}"), (Y.label, f"@{{{obs}}}"),
                 ("± SE", f"@{{{obs}_se}}")] + ([] if self.axis == "t" else [("t", "@{t}")])
        els = []
        for sp in self.specs:
            if sp.theory:
                els.append((sp, "band", hv.Spread((np.empty(0),) * 4, X,
                                                  [Y, S, hv.Dimension("se_hi")],
                                                  label=sp.label).opts(
                    color=sp.color, fill_alpha=0.18 if sp.style == 0 else 0.08, line_alpha=0,
                    **common)))
                els.append((sp, "line", hv.Curve(empty3, X, vd, label=sp.label).opts(
                    color=sp.color, line_width=2.2 if sp.style == 0 else 1.6,
                    line_dash=sp.dash, tools=["hover"], hover_tooltips=hover, **common,
                    **tools)))
            else:
                hollow = sp.style != 0
                els.append((sp, "thin", hv.Curve(empty2, X, Y, label=sp.label).opts(
                    color=sp.color, line_width=1.0, alpha=0.55, line_dash=sp.dash, **common,
                    **tools)))
                els.append((sp, "bars", hv.ErrorBars((np.empty(0),) * 3, X, [Y, S],
                                                     label=sp.label).opts(
                    color=sp.color, line_width=1.2, **common)))
                els.append((sp, "marks", hv.Scatter(empty3, X, vd, label=sp.label).opts(
                    color=sp.color, marker=sp.marker, size=6 if hollow else 7,
                    fill_alpha=0.0 if hollow else 1.0, line_width=1.4, tools=["hover"],
                    hover_tooltips=hover, **common)))
        if not els:
            els.append((None, "none", hv.Curve(empty2, X, Y).opts(**common, **tools)))
        ov = hv.Overlay([e for _, _, e in els]).opts(title=self.titles.get(obs, obs), **common)
        return els, ov

    def frame(self, obs: str, data: dict) -> hv.Overlay:
        """The overlay of ``obs`` for one data dict (see :func:`curve_data`)."""
        els, ov = self._templates[obs]
        out = [tmpl if cols is None else tmpl.clone(cols)
               for (_, _, tmpl), (_, _, cols) in zip(els, self.element_columns(obs, data))]
        return ov.clone(out)

    def element_columns(self, obs: str, data: dict):
        """(spec, role, columns) of every element of the ``obs`` overlay, in template order:
        the columns each element is cloned with (None for the placeholder of an empty grid).
        Roles: 'band' (x, v, v - lower, se), 'line' and 'marks' (x, v, se[, t]), 'thin'
        (x, v), 'bars' (x, v, se). The direct update path (app/draw.py) reads the same."""
        els, _ = self._templates[obs]
        data = data or {}
        cache = {}
        for sp, role, _tmpl in els:
            if sp is None:
                yield sp, role, None
                continue
            if sp.sid not in cache:
                cache[sp.sid] = self._columns(sp, obs, data.get(sp.sid) or {})
            x, v, s, t = cache[sp.sid]
            cols = (x, v, s) if self.axis == "t" else (x, v, s, t)
            if role == "band":
                lo = v - s
                if self.logy:  # a band reaching below 0 is cut on a log axis
                    lo = np.where(lo > 0, lo, v)
                yield sp, role, (x, v, v - lo, s)
            elif role == "line":
                yield sp, role, cols
            elif role == "thin":
                yield sp, role, (x, v)
            else:
                idx = _marker_index(len(x), int((data.get(sp.sid) or {}).get("expected", 0)))
                sub = tuple(c[idx] for c in cols)
                yield sp, role, (sub[:3] if role == "bars" else sub)

    def _columns(self, sp, obs, d):
        x = np.asarray(d.get("x", np.empty(0)), float)
        if not len(x):
            e = np.empty(0)
            return e, e, e, e
        t = np.asarray(d.get("t", x), float)
        v, s = d.get("values", {}).get(obs, (np.full(len(x), np.nan), np.full(len(x), np.nan)))
        v = np.asarray(v, float)
        ok = _clean(x, v, s, self.logx, self.logy)
        s = np.nan_to_num(np.asarray(s, float), nan=0.0)
        return x[ok], v[ok], s[ok], t[ok]


def curve_overlay(obs: str, specs: list[SeriesSpec], axis: str, data: dict, logx=False,
                  logy=False) -> hv.Overlay:
    """One overlay, built from scratch (for tests and one-off use)."""
    return CurveGrid(specs, axis, logx, logy, (obs,)).frame(obs, data)


# --- distributions ----------------------------------------------------------------------
def _hist(dist, key):
    v = dist.get(key) if dist else None
    if v is None:
        return np.array([0.0, 1.0]), np.array([np.nan])
    edges, dens = (np.asarray(a, float) for a in v)
    if len(edges) == len(dens):  # (centres, density) given: turn centres into edges
        c = edges
        w = np.diff(c).mean() if len(c) > 1 else 1.0
        edges = np.concatenate([c - w / 2, [c[-1] + w / 2]])
    return edges, dens


def _line(dist, key):
    v = dist.get(key) if dist else None
    if v is None:
        return np.empty(0), np.empty(0)
    return tuple(np.asarray(a, float) for a in v)


def dist_overlay(which: str, specs: list[SeriesSpec], data: dict) -> hv.Overlay:
    """Distribution of a parameter entry (which='theta') or of the training fields ('field').

    Theory: 'theta_density' as a line (or its histogram), simulations: filled histograms.
    """
    xlab = ("parameter entry θᵢ(t)" if which == "theta" else "training field h_μ(t)")
    X = hv.Dimension(which, label=xlab)
    P = hv.Dimension(f"density_{which}", label="density")
    els = []
    for sp in specs:
        d = (data.get(sp.sid) or {}).get("dist") or {}
        if which == "theta":
            if sp.theory:
                x, p = _line(d, "theta_density")
                els.append(hv.Curve((x, p), X, P, label=sp.label).opts(
                    color=sp.color, line_width=2.2, tools=["hover"]))
            edges, dens = _hist(d, "theta_hist")
        else:
            if sp.theory:
                x, p = _line(d, "field_density")
                els.append(hv.Curve((x, p), X, P, label=sp.label).opts(
                    color=sp.color, line_width=2.2, tools=["hover"]))
            edges, dens = _hist(d, "field_hist")
        if sp.theory:
            els.append(hv.Histogram((edges, dens), kdims=[X], vdims=[P], label=sp.label).opts(
                fill_alpha=0.0, line_color=sp.color, line_width=2.0, tools=["hover"]))
        else:
            els.append(hv.Histogram((edges, dens), kdims=[X], vdims=[P], label=sp.label).opts(
                fill_color=sp.color, fill_alpha=0.35, line_color=sp.color, line_alpha=0.6,
                tools=["hover"]))
    if not els:
        els = [hv.Curve(([], []), X, P)]
    title = ("Distribution of a parameter entry θᵢ" if which == "theta"
             else "Distribution of the training fields h")
    t = data.get("_t")
    if t is not None:
        title += f" at t = {t:.3g}"
    return hv.Overlay(els).opts(title=title, framewise=True, show_legend=False)


def dists_layout(pipe, specs, height=320):
    out = []
    for which in ("theta", "field"):
        def cb(data, which=which):
            return dist_overlay(which, specs, data or {})
        out.append(hv.DynamicMap(cb, streams=[pipe]).opts(
            hv.opts.Histogram(responsive=True, min_height=height, height=height,
                              show_grid=True, framewise=True),
            hv.opts.Curve(responsive=True, min_height=height, height=height, framewise=True)))
    # shared_axes=True: with False, HoloViews 1.23 does not update the ranges of streamed
    # overlays inside a Layout (the dimensions differ, so nothing is actually shared)
    return hv.Layout(out).cols(2).opts(shared_axes=True)


# --- kernels ----------------------------------------------------------------------------
def _kernel(data, name):
    k = data.get("kernels") if data else None
    if not k or k.get(name) is None:
        return np.arange(2.0), np.arange(2.0), np.full((2, 2), np.nan)
    t = np.asarray(k["t"], float)
    M = np.asarray(k[name], float)
    n = min(len(t), M.shape[0], M.shape[1])
    t, M = t[:n], M[:n, :n]
    step = max(1, int(math.ceil(n / MAX_KERNEL)))
    t, M = t[::step], M[::step, ::step]
    if name in ("R", "Gamma"):  # causal kernels: only s <= t is defined
        M = np.where(np.tril(np.ones_like(M, bool)), M, np.nan)
    return t, t, M


KERNEL_TITLES = {"C": "Correlation C(t, s)", "R": "Response R(t, s)",
                 "Gamma": "Memory kernel Γ(t, s), s < t"}


def kernel_plot(name: str, data: dict) -> hv.QuadMesh:
    s, t, M = _kernel(data, name)
    title = KERNEL_TITLES.get(name, name)
    return hv.QuadMesh((s, t, M), [hv.Dimension("s", label="time s"),
                                   hv.Dimension("t", label="time t")],
                       hv.Dimension(name, label=name)).opts(
        title=title, cmap={"C": "viridis", "R": "magma"}.get(name, "RdBu_r"), colorbar=True,
        symmetric=name == "Gamma", tools=["hover"], framewise=True, responsive=True,
        min_height=340, height=340,
        invert_yaxis=False)


def kernels_layout(pipe, names=("C", "R", "Gamma")):
    dms = []
    for name in names:
        def cb(data, name=name):
            return kernel_plot(name, data or {})
        dms.append(hv.DynamicMap(cb, streams=[pipe]))
    return hv.Layout(dms).cols(len(names)).opts(shared_axes=True)


# --- committee overlaps -------------------------------------------------------------------
OVERLAP_TITLES = {"Q": "Q = θᵀθ/d (student-student)", "M": "M = θᵀθ*/d (student-teacher)"}


def overlap_heatmap(which: str, label: str, entry: dict | None, k: int, kstar: int):
    """Heatmap of one overlap matrix (which = 'Q', k x k, or 'M', k x k*) with its values
    written in the cells; rows: student unit a, columns: unit b (student for Q, teacher for
    M). ``entry``: {'t', 'Q', 'M'} or None (empty matrix)."""
    rows, cols = (k, k) if which == "Q" else (k, kstar)
    A = np.full((rows, cols), np.nan)
    t = None
    if entry and entry.get(which) is not None:
        B = np.asarray(entry[which], float)
        A[:min(rows, B.shape[0]), :min(cols, B.shape[1])] = B[:rows, :cols]
        t = entry.get("t")
    col_name = "student unit b" if which == "Q" else "teacher unit b"
    bs, as_ = np.meshgrid(np.arange(cols), np.arange(rows))
    data = {"b": bs.ravel().astype(str), "a": as_.ravel().astype(str), "value": A.ravel()}
    kd = [hv.Dimension("b", label=col_name), hv.Dimension("a", label="student unit a")]
    vd = [hv.Dimension(which, label=which)]
    vals = A[np.isfinite(A)]
    lim = float(np.abs(vals).max()) if vals.size else 1.0
    # a wider colour range than the data keeps the cells mid-tone, so the black values in them
    # stay readable
    lim = 1.5 * lim if lim > 0 else 1.0
    title = f"{label}: {OVERLAP_TITLES[which]}"
    if t is not None:
        title += f" at t = {t:.3g}"
    hm = hv.HeatMap((data["b"], data["a"], data["value"]), kd, vd).opts(
        cmap="RdBu_r", clim=(-lim, lim), colorbar=True, tools=["hover"], title=title,
        framewise=True, responsive=True, min_height=260, height=260, invert_yaxis=True,
        xlabel=col_name, ylabel="student unit a")
    text = np.array([f"{x:.3g}" if np.isfinite(x) else "" for x in data["value"]])
    labels = hv.Labels((data["b"], data["a"], text), kd, hv.Dimension("text")).opts(
        text_font_size="11pt", text_color="black")
    return hm * labels


def overlaps_layout(pipe, specs: list[SeriesSpec], k: int, kstar: int):
    """Q and M heatmaps (columns), one row per series (theory first), fed by ``pipe``."""
    dms = []
    for sp in specs:
        for which in ("Q", "M"):
            def cb(data, sp=sp, which=which):
                return overlap_heatmap(which, sp.label, (data or {}).get(sp.sid), k, kstar)
            dms.append(hv.DynamicMap(cb, streams=[pipe]))
    if not dms:
        dms = [hv.DynamicMap(lambda data: overlap_heatmap("Q", "—", None, k, kstar),
                             streams=[pipe])]
    return hv.Layout(dms).cols(2).opts(shared_axes=False)


# --- data the pipes carry -------------------------------------------------------------
def sid(style: int, key: str) -> str:
    """Series id in the pipes' data: positional (the live run is style 0), so that a new Run
    with the same series reuses the plots."""
    return f"{style}:{key}"


def curve_data(runs_and_styles, axis: str) -> dict:
    """sid -> {'x', 't', 'values': {obs: (value, se)}} for the visible runs' series."""
    out = {}
    for run, style in runs_and_styles:
        for key, s in run.series.items():
            vals = {obs: s.arrays(obs) for obs in CURVES}
            out[sid(style, key)] = {"x": s.x(axis), "t": np.asarray(s.t, float),
                                    "values": vals,
                                    "expected": s.exp.steps // s.exp.record_every + 1}
    return out


def specs_for(runs_and_styles) -> list[SeriesSpec]:
    specs = []
    for run, style in runs_and_styles:
        for key, s in run.series.items():
            label = s.label if style == 0 else f"{s.label} ({run.label})"
            specs.append(SeriesSpec(sid(style, key), key, label, s.theory, style))
    return specs


def legend_html(specs: list[SeriesSpec], run_labels: dict[int, str] | None = None) -> str:
    """A compact HTML legend (one legend for the whole grid of plots)."""
    seen = []
    items = []
    for sp in specs:
        if sp.style != 0 or sp.key in seen:
            continue
        seen.append(sp.key)
        if sp.theory:
            sw = (f'<svg width="34" height="12"><rect x="0" y="2" width="34" height="8" '
                  f'fill="{sp.color}" fill-opacity="0.18"/><line x1="0" y1="6" x2="34" y2="6" '
                  f'stroke="{sp.color}" stroke-width="2.2"/></svg>')
            # a band only where the theory has Monte Carlo errors
            text = sp.label + (" (band ±1 SE)" if METHOD_LABELS["mc"] in sp.label else "")
        else:
            shape = {"circle": f'<circle cx="17" cy="6" r="4" fill="{sp.color}"/>',
                     "square": f'<rect x="13" y="2" width="8" height="8" fill="{sp.color}"/>',
                     "triangle": f'<polygon points="17,1 22,10 12,10" fill="{sp.color}"/>',
                     "diamond": f'<polygon points="17,1 22,6 17,11 12,6" fill="{sp.color}"/>'
                     }[sp.marker]
            sw = (f'<svg width="34" height="12"><line x1="0" y1="6" x2="34" y2="6" '
                  f'stroke="{sp.color}" stroke-opacity="0.55"/>{shape}</svg>')
            text = sp.label + " (mean ± SE)"
            if sp.key == "sgd-reshuffle":
                text += " — outside the theory"
        items.append(f'<span class="lg-item">{sw}&nbsp;{text}</span>')
    return '<div class="sgf-legend">' + "".join(items) + "</div>"


def dist_legend_html(specs: list[SeriesSpec]) -> str:
    """Legend of the distribution plots: theory lines, simulation histograms."""
    items = []
    for sp in specs:
        if sp.style != 0:
            continue
        if sp.theory:
            sw = (f'<svg width="34" height="12"><line x1="0" y1="6" x2="34" y2="6" '
                  f'stroke="{sp.color}" stroke-width="2.2"/></svg>')
            text = f"{sp.label} (density: line; histogram: outline)"
        else:
            sw = (f'<svg width="20" height="12"><rect x="2" y="1" width="16" height="10" '
                  f'fill="{sp.color}" fill-opacity="0.35" stroke="{sp.color}"/></svg>')
            text = f"{sp.label} (histogram)"
        items.append(f'<span class="lg-item">{sw}&nbsp;{text}</span>')
    return '<div class="sgf-legend">' + "".join(items) + "</div>"


def dash_svg(style: int, color="#444") -> str:
    dash = DASHES[style % len(DASHES)]
    arr = {"solid": "", "dashed": "6 4", "dotted": "2 3", "dotdash": "2 3 6 3",
           "dashdot": "6 3 2 3"}.get(dash, dash)
    return (f'<svg width="40" height="10"><line x1="0" y1="5" x2="40" y2="5" stroke="{color}" '
            f'stroke-width="2" stroke-dasharray="{arr}"/></svg>')


__all__ = ["SeriesSpec", "CurveGrid", "curve_overlay", "dist_overlay", "dists_layout",
           "kernel_plot", "kernels_layout", "overlap_heatmap", "overlaps_layout", "curve_data", "specs_for", "legend_html",
           "dash_svg", "COLORS"]
