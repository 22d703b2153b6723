"""Session state of the dashboard: runs, their series, and what the plots and exports read.

A *run* is one press of Run: the theory plus the chosen simulations, each a *series* (one engine
call on an :class:`~solver.config.Experiment` copy). Series collect the snapshots that the
runner's events carry, in bounded memory. No Panel here; the app's physics-free bookkeeping
only (x-axis conversions use the Experiment's own ``epochs``/``sgd_steps``).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from solver.config import ConfigError, Experiment
from solver.snapshot import OBSERVABLES, Snapshot

from .runner import Event, Job

#: Simulations the user can tick: key -> (label, Experiment overrides).
SIMS: "OrderedDict[str, tuple[str, dict]]" = OrderedDict([
    ("gd", ("GD", dict(algo="gd"))),
    ("sgf", ("SGF", dict(algo="sgf"))),
    ("sgd-fresh", ("SGD fresh", dict(algo="sgd", sampling="fresh"))),
    ("sgd-reshuffle", ("SGD reshuffle", dict(algo="sgd", sampling="reshuffle"))),
])
THEORY = "theory"
THEORY_GD = "theory-gd"
SERIES_LABELS = {THEORY: "DMFT", THEORY_GD: "DMFT τ=0 (GD)",
                 **{k: v[0] for k, v in SIMS.items()}}
#: Scalar observables drawn as curves, in plot order.
CURVES = ("train_loss", "test_loss", "test_error", "m", "Q", "cosine")
#: Snapshot extras kept per recording time (distributions).
DIST_KEYS = ("theta_hist", "theta_density", "field_hist")

MAX_POINTS = 20000      # per series; beyond, every other point is dropped (stride doubles)
MAX_DIST_TIMES = 400    # distributions kept per series
MAX_KEPT_RUNS = 8       # runs kept for comparison (oldest dropped)
MAX_RECORDS = 50000     # recording times a run may ask for (steps / record_every)


def plan_jobs(exp: Experiment, sims, gd_theory: bool = True) -> list[Job]:
    """Jobs for one Run: theory first, then the simulations (each an Experiment copy).

    Validates every configuration (raises :class:`ConfigError` naming the parameter).
    ``gd_theory``: when GD is simulated at tau > 0, also run the DMFT at tau = 0, which is the
    theory of gradient descent with step dt.
    """
    exp.validate()
    records = exp.steps // exp.record_every + 1
    if records > MAX_RECORDS:
        raise ConfigError("record_every", f"T/dt/record_every = {records} recording times is "
                                          f"more than the dashboard keeps ({MAX_RECORDS}); "
                                          f"raise record_every or dt")
    sims = [s for s in SIMS if s in set(sims or ())]
    theory_exp = exp.copy(algo="sgf", sampling="fresh")
    jobs = [Job(THEORY, "theory", theory_exp, SERIES_LABELS[THEORY])]
    for key in sims:
        copy = exp.copy(**SIMS[key][1])
        try:
            copy.validate()
        except ConfigError as e:
            raise ConfigError(e.param, f"{e} (for the {SIMS[key][0]} simulation)") from None
        jobs.append(Job(key, "sim", copy, SIMS[key][0]))
    # the tau = 0 theory last: the simulations (cheaper) show up first
    if "gd" in sims and gd_theory and exp.tau > 0:
        jobs.append(Job(THEORY_GD, "theory", exp.copy(tau=0.0, algo="gd"),
                        SERIES_LABELS[THEORY_GD]))
    return jobs


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Series:
    """One engine's curve within a run."""

    key: str
    kind: str
    exp: Experiment
    label: str
    status: str = "queued"   # queued | running | done | error | stopped
    message: str = ""
    engine: str = ""
    progress: float = 0.0
    t_first: float | None = None   # seconds from Run to the first snapshot
    t_end: float | None = None     # seconds from Run to the end
    t: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    values: dict = field(default_factory=dict)
    se: dict = field(default_factory=dict)
    dists: "OrderedDict[float, dict]" = field(default_factory=OrderedDict)
    kernels: dict | None = None
    kernels_t: float | None = None
    _stride: int = 1
    _seen: int = 0
    _dist_stride: int = 1
    _dist_seen: int = 0

    @property
    def theory(self) -> bool:
        return self.kind == "theory"

    def __len__(self) -> int:
        return len(self.t)

    def add(self, snap: Snapshot) -> None:
        self.engine = snap.engine or self.engine
        self.progress = max(self.progress, _float(snap.progress))
        self._add_extras(snap)
        self._seen += 1
        if (self._seen - 1) % self._stride:
            return
        n = len(self.t)
        self.t.append(_float(snap.t))
        self.epochs.append(_float(snap.epochs))
        keys = set(self.values) | set(snap.values)
        for k in keys:
            v = snap.values.get(k, math.nan)
            if np.ndim(v) != 0:  # matrices (committee overlaps) are not drawn as curves
                continue
            self.values.setdefault(k, [math.nan] * n).append(_float(v))
            self.se.setdefault(k, [math.nan] * n).append(_float(snap.se.get(k, math.nan)))
        if len(self.t) > MAX_POINTS:
            self._stride *= 2
            for lst in (self.t, self.epochs, *self.values.values(), *self.se.values()):
                del lst[1::2]

    def _add_extras(self, snap: Snapshot) -> None:
        ex = snap.extras or {}
        if "kernels" in ex and ex["kernels"] is not None:
            self.kernels = ex["kernels"]
            self.kernels_t = _float(snap.t)
        dist = {k: ex[k] for k in DIST_KEYS if ex.get(k) is not None}
        if not dist:
            return
        self._dist_seen += 1
        if (self._dist_seen - 1) % self._dist_stride:
            return
        self.dists[_float(snap.t)] = dist
        if len(self.dists) > MAX_DIST_TIMES:
            self._dist_stride *= 2
            for i, k in enumerate(list(self.dists)):
                if i % 2 and i != len(self.dists) - 1:
                    del self.dists[k]

    # --- what the plots read ------------------------------------------------------------
    def x(self, axis: str) -> np.ndarray:
        t = np.asarray(self.t, float)
        if axis == "epochs":
            return np.asarray(self.epochs, float)
        if axis == "sgd_steps":
            return self.steps(t)
        return t

    def steps(self, t: np.ndarray) -> np.ndarray:
        """Optimiser steps at time t: SGD t*d/eta; GD (and tau = 0) one step per dt."""
        e = self.exp
        if e.algo == "gd" or e.eta <= 0:
            return t / e.dt
        return t * e.d / e.eta

    def arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.t)
        v = np.asarray(self.values.get(name, [math.nan] * n), float)
        s = np.asarray(self.se.get(name, [math.nan] * n), float)
        return v, s

    def rows(self) -> list[dict]:
        """One dict per recorded time: t, epochs, steps, every value and its SE."""
        keys = list(OBSERVABLES) + [k for k in self.values if k not in OBSERVABLES]
        steps = self.steps(np.asarray(self.t, float))
        out = []
        for i, t in enumerate(self.t):
            r = {"t": t, "epochs": self.epochs[i], "steps": float(steps[i])}
            for k in keys:
                r[k] = self.values[k][i] if k in self.values else math.nan
            for k in keys:
                r[f"{k}_se"] = self.se[k][i] if k in self.se else math.nan
            out.append(r)
        return out

    def overlaps_at(self, t: float) -> tuple[float, np.ndarray, np.ndarray] | None:
        """Committee overlap matrices (t, Q (k x k), M (k x k*)) at the recorded time nearest
        to t, from the snapshot entries ``Q_a_b``, ``M_a_b`` (NaN where an entry is missing);
        None for the GLM or before the first snapshot."""
        if self.exp.model != "committee" or not self.t:
            return None
        ts = np.asarray(self.t, float)
        i = int(np.argmin(np.abs(ts - t)))
        k, ks = self.exp.k, self.exp.kstar

        def matrix(prefix, rows, cols):
            A = np.full((rows, cols), np.nan)
            for a in range(rows):
                for b in range(cols):
                    col = self.values.get(f"{prefix}_{a}_{b}")
                    if col is not None and i < len(col):
                        A[a, b] = col[i]
            return A

        return float(ts[i]), matrix("Q", k, k), matrix("M", k, ks)

    def dist_at(self, t: float) -> tuple[float, dict] | None:
        """Distributions at the recorded time nearest to t."""
        if not self.dists:
            return None
        ts = np.fromiter(self.dists.keys(), float)
        i = int(np.argmin(np.abs(ts - t)))
        return float(ts[i]), self.dists[float(ts[i])]


_run_counter = 0


@dataclass
class Run:
    """One press of Run."""

    id: int
    label: str
    config: dict
    sims: list
    series: "OrderedDict[str, Series]"
    t_start: float = field(default_factory=time.perf_counter)
    kept: bool = False
    visible: bool = True
    style: int = 0          # index into the dash/marker styles of kept runs
    classification: bool = True
    committee: bool = False

    @classmethod
    def from_jobs(cls, jobs: list[Job], exp: Experiment, sims, run_id: int, t_start=None):
        series = OrderedDict((j.key, Series(j.key, j.kind, j.exp, j.label)) for j in jobs)
        return cls(id=run_id, label=f"run {run_id}", config=exp.to_dict(), sims=list(sims),
                   series=series, t_start=t_start or time.perf_counter(),
                   classification=exp.is_classification, committee=exp.model == "committee")

    def apply(self, ev: Event) -> bool:
        """Apply a runner event; True if curves changed."""
        s = self.series.get(ev.key)
        if s is None:
            return False
        since = ev.time - self.t_start
        if ev.kind == "start":
            s.status = "running"
        elif ev.kind == "snap":
            if s.t_first is None:
                s.t_first = since
            s.status = "running"
            s.add(ev.payload)
            return True
        elif ev.kind == "done":
            s.status, s.progress, s.t_end = "done", 1.0, since
        elif ev.kind == "error":
            s.status, s.message, s.t_end = "error", str(ev.payload), since
        elif ev.kind == "cancelled":
            if s.status not in ("done", "error"):
                s.status, s.t_end = "stopped", since
        return False

    def stop(self) -> None:
        for s in self.series.values():
            if s.status in ("queued", "running"):
                s.status = "stopped"
                s.t_end = time.perf_counter() - self.t_start

    @property
    def finished(self) -> bool:
        return all(s.status in ("done", "error", "stopped") for s in self.series.values())

    @property
    def progress(self) -> float:
        if not self.series:
            return 1.0
        return float(np.mean([1.0 if s.status in ("done", "error", "stopped") else s.progress
                              for s in self.series.values()]))

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Time left, extrapolated linearly from the elapsed time and the progress."""
        p = self.progress
        el = (now or time.perf_counter()) - self.t_start
        if p <= 0.01 or el <= 0:
            return None
        return el * (1.0 - p) / p

    @property
    def t_first_theory(self) -> float | None:
        s = self.series.get(THEORY)
        return s.t_first if s else None

    @property
    def t_all(self) -> float | None:
        """Seconds until every series had ended (None while running)."""
        if not self.finished:
            return None
        ends = [s.t_end for s in self.series.values() if s.t_end is not None]
        return max(ends) if ends else 0.0

    def errors(self) -> list[str]:
        return [f"{s.label}: {s.message}" for s in self.series.values() if s.status == "error"]

    def summary(self) -> str:
        c = self.config
        parts = [f"{c.get('loss')}/{c.get('teacher')}", f"δ={c.get('delta'):g}",
                 f"τ={c.get('tau'):g}", f"B={c.get('batch')}", f"λ={c.get('lam'):g}",
                 f"T={c.get('T'):g}", f"d={c.get('d')}"]
        if c.get("model") == "committee":
            v = ",".join(f"{float(x):g}" for x in c.get("v") or [])
            parts.insert(0, f"committee k={c.get('k')}, k*={c.get('kstar')}, "
                            f"{c.get('activation')}, v={v}")
        return ", ".join(parts)


class Store:
    """The current run and the kept ones, in order (oldest first)."""

    def __init__(self):
        self.runs: list[Run] = []
        self.counter = 0

    @property
    def current(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    def new_run(self, jobs, exp, sims, run_id=None) -> Run:
        """Replace the current run unless it was kept; bound the number of kept runs."""
        self.counter += 1
        kept = [r for r in self.runs if r.kept]
        while len(kept) >= MAX_KEPT_RUNS:
            kept.pop(0)
        run = Run.from_jobs(jobs, exp, sims, run_id if run_id is not None else self.counter)
        run.label = f"run {self.counter}"
        self.runs = kept + [run]
        return run

    def style_of(self, run: Run) -> int:
        """0 (solid) for the latest run; kept older runs their own dash/marker style."""
        return 0 if run is self.current else run.style

    def keep_current(self) -> bool:
        """Keep the current run's curves when the next run starts."""
        run = self.current
        if run is None or run.kept:
            return False
        run.kept = True
        used = {r.style for r in self.runs if r.kept and r is not run}
        run.style = next(i for i in range(1, MAX_KEPT_RUNS + 2) if i not in used)
        return True

    def clear_kept(self) -> None:
        self.runs = [r for r in self.runs if not r.kept]

    def visible_runs(self) -> list[Run]:
        return [r for r in self.runs if r.visible]

    def by_label(self, label: str) -> Run | None:
        return next((r for r in self.runs if r.label == label), None)
