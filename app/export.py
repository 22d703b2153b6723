"""Exports: CSV of every curve, the configuration as JSON, the URL query string, and a PNG
of the curve plots drawn server side (:func:`curves_png`, matplotlib's Agg canvas).

CSV (long format, one row per series and recording time): ``run, series, label, engine, algo,
sampling, status, t, epochs, steps`` (``label`` names a theory by its method, e.g.
"theory (DMFT mc)"; ``engine`` is the engine's own name), then the observables of
:data:`solver.snapshot.OBSERVABLES`, any further scalar values (``cosine``...), and their
standard errors (``*_se``). Empty cells where a value does not exist (test error in
regression). The numbers are those the plots show.
"""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from solver import __version__
from solver.snapshot import OBSERVABLES, _json_default

LEAD = ("run", "series", "label", "engine", "algo", "sampling", "status", "t", "epochs", "steps")


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else repr(float(v))
    return v


def curves_rows(runs) -> tuple[list[str], list[dict]]:
    rows, extra = [], []
    for run in runs:
        for key, s in run.series.items():
            for r in s.rows():
                r = {"run": run.label, "series": key, "label": s.label, "engine": s.engine,
                     "algo": s.exp.algo if s.kind == "sim" else "dmft",
                     "sampling": s.exp.sampling if s.exp.algo == "sgd" and s.kind == "sim" else "",
                     "status": s.status, **r}
                for k in r:
                    if k not in LEAD and k not in extra:
                        extra.append(k)
                rows.append(r)
    values = [k for k in OBSERVABLES] + [k for k in extra if not k.endswith("_se")
                                         and k not in OBSERVABLES]
    cols = list(LEAD) + values + [f"{k}_se" for k in values]
    return cols, rows


def curves_csv(runs) -> str:
    """Every curve of ``runs`` as CSV text."""
    cols, rows = curves_rows(runs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_fmt(r.get(c, "")) for c in cols])
    return buf.getvalue()



def config_json(exp, sims, gd_theory, runs=()) -> str:
    """The current configuration (loadable with ``Experiment.from_dict``) and the runs shown."""
    out = {"package": "sgf-dmft", "version": __version__, "experiment": exp.to_dict(),
           "sims": list(sims), "gd_theory": bool(gd_theory),
           "runs": [{"label": r.label, "sims": r.sims, "experiment": r.config,
                     "series": {k: {"engine": s.engine, "status": s.status,
                                    "message": s.message} for k, s in r.series.items()}}
                    for r in runs]}
    return json.dumps(out, indent=2, default=_json_default)


def query_string(exp, names, sims=None) -> str:
    """The query string that reproduces ``exp`` (what the URL carries), for links and tests."""
    from urllib.parse import urlencode

    q = {}
    for n in names:
        v = exp.param[n].serialize(getattr(exp, n))
        q[n] = v if isinstance(v, str) else json.dumps(v)
    if sims is not None:
        q["sims"] = json.dumps(list(sims))
    return "?" + urlencode(q)


# --- PNG of the curves (server side, headless) ----------------------------------------------
#: Bokeh line dashes (app.plots.DASHES) as matplotlib dash patterns.
_MPL_DASH = {"solid": "-", "dashed": (0, (6, 4)), "dotted": (0, (1.5, 2.5)),
             "dotdash": (0, (1.5, 2.5, 6, 2.5)), "dashdot": (0, (6, 3, 2, 3))}
_MPL_MARKER = {"circle": "o", "square": "s", "triangle": "^", "diamond": "D"}


def _mpl_dash(dash: str):
    if dash in _MPL_DASH:
        return _MPL_DASH[dash]
    try:
        return (0, tuple(float(x) for x in dash.split()))
    except ValueError:
        return "-"


def curves_png(grid, data: dict, dpi: int = 100, title: str | None = None) -> bytes:
    """PNG of the curve plots as the page shows them: ``grid`` an :class:`app.plots.CurveGrid`
    (series, observables, x axis, log scales, titles), ``data`` its pipe data
    (:func:`app.plots.curve_data`). Drawn server side with matplotlib's Agg canvas (no pyplot,
    no browser, no display), so it works headless and from any thread. Theory: line with its
    ±1 SE band; simulations: thin line with markers and ±1 SE error bars; kept runs dashed
    with hollow markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import XLABELS, YLABELS, _marker_index

    obs_list = list(grid.observables)
    ncols = 3 if len(obs_list) > 2 else len(obs_list)
    nrows = -(-len(obs_list) // ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles = {}
    for ax, obs in zip(axes, obs_list):
        for sp in grid.specs:
            d = data.get(sp.sid) or {}
            x, v, s, _ = grid._columns(sp, obs, d)
            if not len(x):
                continue
            ls = _mpl_dash(sp.dash)
            if sp.theory:
                lo = v - s
                if grid.logy:
                    lo = np.where(lo > 0, lo, v)
                ax.fill_between(x, lo, v + s, color=sp.color, alpha=0.18 if sp.style == 0
                                else 0.08, linewidth=0)
                h = ax.plot(x, v, color=sp.color, lw=2.0 if sp.style == 0 else 1.4,
                            linestyle=ls, label=sp.label)[0]
            else:
                ax.plot(x, v, color=sp.color, lw=0.9, alpha=0.55, linestyle=ls)
                idx = _marker_index(len(x), int(d.get("expected", 0)))
                hollow = sp.style != 0
                h = ax.errorbar(x[idx], v[idx], yerr=s[idx], color=sp.color, linestyle="none",
                                marker=_MPL_MARKER.get(sp.marker, "o"), markersize=5,
                                markerfacecolor="none" if hollow else sp.color,
                                elinewidth=1.0, capsize=0, label=sp.label)
            handles.setdefault(sp.label, h)
        ax.set_title(grid.titles.get(obs, obs), fontsize=11)
        ax.set_xlabel(XLABELS.get(grid.axis, grid.axis))
        ax.set_ylabel(grid.ylabels.get(obs) or YLABELS.get(obs, obs))
        if grid.logx:
            ax.set_xscale("log")
        if grid.logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(obs_list):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 5), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
