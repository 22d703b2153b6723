"""Exports: CSV of every curve, the configuration as JSON, and the URL query string.

CSV (long format, one row per series and recording time): ``run, series, engine, algo,
sampling, t, epochs, steps``, then the observables of :data:`solver.snapshot.OBSERVABLES`,
any further scalar values (``cosine``...), and their standard errors (``*_se``). Empty cells
where a value does not exist (test error in regression). The numbers are those the plots show.
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
