"""Snapshot and Result: the one kind of thing that every engine streams and every consumer reads.

A :class:`Snapshot` holds the observables of THEORY.md section 3 at one recording time, with
their standard errors (Monte Carlo over the DMFT population, or over simulation seeds; zero for
deterministic methods) and optional extras (distributions, kernels). A :class:`Result` collects
them into named arrays, in the spirit of ``scipy.integrate.solve_ivp``.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

#: Scalar observables every engine reports, in the CSV's column order.
OBSERVABLES = ("train_loss", "test_loss", "test_error", "m", "Q")
#: The CSV columns shared by ``sgf-dmft simulate`` and ``sgf-dmft theory``.
CSV_COLUMNS = ("t", "epochs") + OBSERVABLES + tuple(f"{k}_se" for k in OBSERVABLES)


@dataclass
class Snapshot:
    """Observables at one recording time.

    Attributes
    ----------
    t : float        SGF time t (= steps*eta/d).
    step : int       grid step index k (t = k*dt).
    epochs : float   passes over the data at t.
    values : dict    observable name -> value (keys include OBSERVABLES; NaN where undefined,
                     e.g. test_error for regression). May hold more (cosine, Q_a_b ...).
    se : dict        observable name -> standard error (0 for deterministic engines).
    extras : dict    optional heavy data: ``theta_hist``/``field_hist`` = (edges, density);
                     ``theta_density`` = (x, p); ``kernels`` = dict(t=..., C=..., R=..., Gamma=...).
    engine : str     'dmft-mc', 'dmft-exact', 'dmft-online', 'sim-sgf', 'sim-gd', 'sim-sgd' ...
    progress : float fraction of the run done, in [0, 1].
    """

    t: float
    step: int
    epochs: float
    values: dict
    se: dict
    extras: dict = field(default_factory=dict)
    engine: str = ""
    progress: float = 0.0

    def row(self) -> dict:
        """Flat CSV row (CSV_COLUMNS first, then any further values and their errors)."""
        r = {"t": self.t, "epochs": self.epochs}
        for k in OBSERVABLES:
            r[k] = self.values.get(k, math.nan)
        for k in OBSERVABLES:
            r[f"{k}_se"] = self.se.get(k, math.nan)
        for k, v in self.values.items():
            if k not in r:
                r[k] = v
        for k, v in self.se.items():
            if f"{k}_se" not in r:
                r[f"{k}_se"] = v
        return r


class SolverError(RuntimeError):
    """A run that could not continue (e.g. diverged); ``result`` keeps what was computed."""

    def __init__(self, message: str, result: "Result | None" = None, parameter: str | None = None):
        super().__init__(message)
        self.result = result
        self.parameter = parameter


class Result:
    """Snapshots collected into named arrays: ``res.t``, ``res.train_loss``, ``res.se['m']`` ..."""

    def __init__(self, snapshots: Iterable[Snapshot] = (), config: dict | None = None,
                 engine: str = "", message: str = "", status: str = "ok"):
        self.snapshots = list(snapshots)
        self.config = dict(config or {})
        self.engine = engine or (self.snapshots[0].engine if self.snapshots else "")
        self.message = message
        self.status = status

    def append(self, snap: Snapshot) -> None:
        self.snapshots.append(snap)

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def t(self) -> np.ndarray:
        return np.array([s.t for s in self.snapshots])

    @property
    def epochs(self) -> np.ndarray:
        return np.array([s.epochs for s in self.snapshots])

    def keys(self) -> list[str]:
        keys: list[str] = []
        for s in self.snapshots:
            for k in s.values:
                if k not in keys:
                    keys.append(k)
        return keys

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_") or name in ("snapshots", "config", "engine", "message", "status"):
            raise AttributeError(name)
        if name in self.keys():
            return np.array([s.values.get(name, math.nan) for s in self.snapshots])
        raise AttributeError(name)

    @property
    def se(self) -> dict:
        return {k: np.array([s.se.get(k, math.nan) for s in self.snapshots]) for k in self.keys()}

    @property
    def extras(self) -> dict:
        """Extras of the last snapshot that carries each key."""
        out: dict = {}
        for s in self.snapshots:
            out.update(s.extras)
        return out

    def rows(self) -> list[dict]:
        return [s.row() for s in self.snapshots]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=self.columns())

    def columns(self) -> list[str]:
        cols = list(CSV_COLUMNS)
        for r in self.rows():
            for k in r:
                if k not in cols:
                    cols.append(k)
        return cols

    def to_csv(self, path, blank_nan=("test_error", "test_error_se")) -> None:
        """Write the CSV; columns in CSV_COLUMNS order; NaN test_error left empty (regression)."""
        cols = self.columns()
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in self.rows():
                w.writerow(["" if (k in blank_nan and _isnan(r.get(k))) else _fmt(r.get(k, ""))
                            for k in cols])

    def sidecar(self, extra: dict | None = None) -> dict:
        from . import __version__

        out = {"package": "sgf-dmft", "version": __version__, "engine": self.engine,
               "status": self.status, "message": self.message, "config": self.config}
        out.update(extra or {})
        return out

    def write(self, csv_path, extra: dict | None = None) -> str:
        """CSV plus JSON sidecar next to it (FILE.csv -> FILE.json); returns the JSON path."""
        import os

        self.to_csv(csv_path)
        root, _ = os.path.splitext(str(csv_path))
        jpath = root + ".json"
        with open(jpath, "w") as fh:
            json.dump(self.sidecar(extra), fh, indent=2, default=_json_default)
        return jpath


def collect(snapshots, config: dict, engine: str = "", cancel=None, callback=None,
            error_status: str = "diverged") -> Result:
    """Collect a snapshot stream into a :class:`Result` (the one ``solve``/``run`` of every engine).

    ``callback(snapshot)`` is called on each. On a :class:`SolverError` the error is re-raised
    with ``err.result`` holding what was computed (``status=error_status``); a run stopped by
    ``cancel`` before its last step returns the partial Result with ``status='cancelled'``.
    """
    res = Result(config=config, engine=engine)
    try:
        for snap in snapshots:
            res.append(snap)
            if callback is not None:
                callback(snap)
    except SolverError as err:
        res.status, res.message = error_status, str(err)
        if res.snapshots and not res.engine:
            res.engine = res.snapshots[0].engine
        err.result = res
        raise
    if res.snapshots and not res.engine:
        res.engine = res.snapshots[0].engine
    if cancel is not None and cancel.is_set() and (not res.snapshots
                                                   or res.snapshots[-1].progress < 1.0):
        res.status, res.message = "cancelled", "cancelled"
    return res


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
