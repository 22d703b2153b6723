"""Seed loop of the finite-size simulator: lockstep over seeds, streaming aggregated Snapshots.

Every seed owns an independent data set (:mod:`.data`) and noise stream. All seeds advance to
the next recording time, then one :class:`~solver.snapshot.Snapshot` with the mean and standard
error over seeds is yielded, so curves stream with error bars from the first point. Between
recording times the steps are cut into chunks of about ``CHUNK_SECONDS`` so that a set
``cancel`` event stops the run promptly; chunking never changes the numbers (each kernel
consumes its seed's random stream step by step, whatever the chunk boundaries).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import ConfigError
from ..models import LOSS_CODES
from ..observables import metrics
from ..snapshot import Snapshot, SolverError
from . import kernels as K
from .data import Dataset, draw, noise_rngs

#: Target wall time of one chunk of steps (all seeds); cancel is checked between chunks.
CHUNK_SECONDS = 0.1
#: Bins of the extras' histograms: ``NBINS`` equal bins over pooled mean +- ``HIST_SIGMAS`` std
#: (half-width 1 where the pooled std is 0, e.g. theta(0) = 0).
NBINS = 60
HIST_SIGMAS = 5.0


PARALLEL = ("auto", "seeds", "rows", "serial")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def choose_parallel(exp, parallel="auto") -> str:
    """How the seeds use the cores (kernels are serial and nogil); all modes give identical
    numbers:

    * 'seeds': one thread per seed (up to the cores); each advances a whole chunk of steps
      between synchronisations (robust on a loaded machine). 'auto' for two seeds or more.
    * 'rows': seeds one after the other, the rows of every SGF/GD step split over two threads
      (one synchronisation per step). 'auto' for a single seed (SGF/GD).
    * 'serial': one thread.

    Measured (docs/benchmarks.md): at (d, n) = (1000, 2000) with 4 seeds, 'seeds' takes half
    the time of 'serial' and 'rows' two thirds; a single seed gains about 1.5x from 'rows'.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: one of {PARALLEL}, got {parallel!r}")
    if parallel != "auto":
        return parallel
    if cores() < 2:
        return "serial"
    if exp.seeds > 1:
        return "seeds"
    return "rows" if exp.algo != "sgd" and exp.n >= 4 * K.RB else "serial"


class _Seed:
    """State of one seed: data, noise generators, parameters and work buffers."""

    def __init__(self, exp, data: Dataset, rngs):
        self.data = data
        self.rng0, self.rng1 = rngs
        n, d = data.n, data.d
        self.code = LOSS_CODES[exp.loss]
        self.theta = np.ascontiguousarray(data.theta0, dtype=float).copy()
        self.h = np.zeros(n)
        self.out = np.zeros(1)
        self.loss_sum = math.nan
        if exp.algo == "sgd":
            self.v = self.theta.copy()
            self.scale = np.ones(1)
            self.perm = np.arange(n, dtype=np.int64)
            self.pos = np.array([n], dtype=np.int64)  # forces a shuffle at the first step
            self.lp = np.empty(exp.batch)
        else:
            self.n1 = K.split_row(n)
            self.g0, self.g1 = np.empty(d), np.empty(d)
            self.u0, self.u1 = np.empty(K.RB), np.empty(K.RB)

    # --- SGF / GD -------------------------------------------------------------------------------
    def grid_steps(self, nsteps, a, c0, c1, record):
        """nsteps steps in this thread; returns the steps completed with a finite state."""
        done = K.sgf_steps(self.data.X, self.data.y, self.theta, self.g0, self.g1, self.h,
                           self.u0, nsteps, a, c0, c1, self.code, self.rng0, self.rng1, self.n1,
                           record, self.out)
        if record:
            self.loss_sum = self.out[0]
        return done

    def grid_steps_split(self, ex, nsteps, a, c0, c1, record):
        """Same numbers as :meth:`grid_steps`, rows [n1, n) of every step in ``ex``'s thread."""
        X, y, th, h, code = self.data.X, self.data.y, self.theta, self.h, self.code
        n1, n = self.n1, self.data.n
        for step in range(nsteps):
            rec = record and step == 0
            fut = ex.submit(K.sgf_part, X, y, th, self.g1, h, self.u1, n1, n, c0, c1, code,
                            self.rng1, rec)
            t0 = K.sgf_part(X, y, th, self.g0, h, self.u0, 0, n1, c0, c1, code, self.rng0, rec)
            t1 = fut.result()
            if rec:
                self.loss_sum = t0 + t1
            if not K.sgf_update(th, self.g0, self.g1, a):
                return step
        return nsteps

    # --- SGD -----------------------------------------------------------------------------------
    def sgd_steps(self, nsteps, eta, lam, batch, fresh):
        return K.sgd_steps(self.data.X, self.data.y, self.v, self.scale, self.perm, self.pos,
                           self.lp, nsteps, eta, lam, batch, self.code, fresh, self.rng0)

    def materialise(self):
        """theta = scale * v (SGD stores theta in scaled form)."""
        np.multiply(self.v, self.scale[0], out=self.theta)

    # --- fields of the current theta -------------------------------------------------------------
    def record_fields(self):
        self.loss_sum = K.fields(self.data.X, self.theta, self.data.y, self.code, self.h)
        return 0


class _Pool:
    """Runs a method on every seed: in threads (mode 'seeds') or in turn ('rows', 'serial');
    mode 'rows' keeps one helper thread for the second half of every step's rows."""

    def __init__(self, mode, seeds):
        self.mode = mode
        self.threads = min(seeds, cores()) if mode == "seeds" else (2 if mode == "rows" else 1)
        nthreads = self.threads if mode == "seeds" else (1 if mode == "rows" else 0)
        self.ex = (ThreadPoolExecutor(nthreads, thread_name_prefix="sgf-sim")
                   if nthreads > 0 and not (mode == "seeds" and self.threads < 2) else None)

    def map(self, fn, items):
        if self.mode == "seeds" and self.ex is not None:
            return list(self.ex.map(fn, items))
        return [fn(x) for x in items]

    def close(self):
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)


class _Chunker:
    """Chunk sizes (in steps) that take about CHUNK_SECONDS, learnt from measured step times."""

    def __init__(self, guess_seconds_per_step):
        self.sps = max(guess_seconds_per_step, 1e-9)

    def size(self, remaining):
        return int(max(1, min(remaining, CHUNK_SECONDS / self.sps)))

    def measured(self, steps, seconds):
        if steps > 0 and seconds > 0:
            self.sps = 0.5 * self.sps + 0.5 * seconds / steps


def _se(x):
    x = np.asarray(x, float)
    if x.size < 2:
        return 0.0 if np.all(np.isfinite(x)) else math.nan
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


def _hist(arrays):
    """(edges, density) of the values pooled over ``arrays``; see NBINS / HIST_SIGMAS."""
    tot = sum(a.size for a in arrays)
    s1 = sum(float(np.sum(a)) for a in arrays)
    s2 = sum(float(np.dot(a, a)) for a in arrays)
    mean = s1 / tot
    std = math.sqrt(max(s2 / tot - mean * mean, 0.0))
    half = HIST_SIGMAS * std if std > 1e-12 * max(1.0, abs(mean)) else 1.0
    lo, hi = mean - half, mean + half
    counts = np.zeros(NBINS)
    for a in arrays:
        K.histogram(a, lo, hi, NBINS, counts)
    edges = np.linspace(lo, hi, NBINS + 1)
    return edges, counts / (tot * (hi - lo) / NBINS)


class _Run:
    """One streamed simulation (shared by the grid runner and the SGD runner)."""

    def __init__(self, exp, cancel, data, parallel):
        exp.validate()
        if getattr(exp, "model", "glm") != "glm":
            raise ConfigError("model", "this engine covers model='glm' (width k = 1) only")
        self.exp = exp
        self.cancel = cancel
        self.S = exp.seeds
        self.pool = _Pool(choose_parallel(exp, parallel), self.S)
        self.engine = "sim-" + exp.algo
        self.K = exp.steps
        r = exp.record_every
        ks = list(range(0, self.K + 1, r))
        if ks[-1] != self.K:
            ks.append(self.K)  # the horizon T is always reported
        self.rec_ks = ks
        self.data = data
        self.seeds: list[_Seed] = []

    def cancelled(self):
        return self.cancel is not None and self.cancel.is_set()

    def setup(self) -> bool:
        exp = self.exp
        data = self.data
        if data is None:
            if self.pool.ex is not None:  # numpy's generators release the GIL while filling
                data = list(self.pool.ex.map(lambda s: draw(exp, s, self.cancel), range(self.S)))
            else:
                data = [draw(exp, s, self.cancel) for s in range(self.S)]
            if self.cancelled() or any(x is None for x in data):
                return False
        else:
            if isinstance(data, Dataset):
                data = [data] * self.S
            if len(data) != self.S:
                raise ValueError(f"data: need {self.S} data sets (one per seed), got {len(data)}")
            for ds in data:
                if ds.X.shape != (exp.n, exp.d):
                    raise ValueError(f"data: X has shape {ds.X.shape}, exp needs {(exp.n, exp.d)}")
        self.seeds = [_Seed(exp, data[s], noise_rngs(exp, s)) for s in range(self.S)]
        return True

    # --- aggregation ---------------------------------------------------------------------------
    def theta_part(self):
        d = self.exp.d
        m = np.array([float(np.dot(sd.theta, sd.data.theta_star)) / d for sd in self.seeds])
        Q = np.array([float(np.dot(sd.theta, sd.theta)) / d for sd in self.seeds])
        if np.all(np.isfinite(Q)) and np.all(Q <= K.QMAX):
            hist = _hist([sd.theta for sd in self.seeds])
        else:
            hist = None
        return m, Q, hist

    def snapshot(self, k, t, epochs, part):
        exp = self.exp
        m, Q, theta_hist = part
        train = np.array([sd.loss_sum / sd.data.n for sd in self.seeds])
        if not (np.all(np.isfinite(train)) and np.all(np.isfinite(m)) and np.all(np.isfinite(Q))
                and np.all(Q <= K.QMAX)):
            return None
        met = metrics(m, Q, exp)
        per_seed = {"train_loss": train, "test_loss": np.asarray(met["test_loss"], float),
                    "test_error": np.asarray(met["test_error"], float), "m": m, "Q": Q,
                    "cosine": np.asarray(met["cosine"], float)}
        values = {k_: float(np.mean(v)) for k_, v in per_seed.items()}
        se = {k_: _se(v) for k_, v in per_seed.items()}
        extras = {"theta_hist": theta_hist, "field_hist": _hist([sd.h for sd in self.seeds]),
                  "seeds": per_seed}
        return Snapshot(t=float(t), step=int(k), epochs=float(epochs), values=values, se=se,
                        extras=extras, engine=self.engine, progress=k / self.K)

    def diverged(self, t):
        exp = self.exp
        if exp.algo == "gd" or exp.tau == 0:
            what, name = "lower dt", "dt"
        elif exp.algo == "sgf":
            what, name = "lower tau or dt", "tau"
        else:
            what, name = f"lower tau (eta = tau*batch = {exp.eta:g})", "tau"
        if exp.lam * (exp.dt if exp.algo != "sgd" else exp.eta / exp.d) > 2:
            what += " or lam"
        return SolverError(f"diverged at t={t:.4g}: {what}", parameter=name)

    def timed(self, fn, steps, chunker):
        t0 = time.perf_counter()
        done = min(self.pool.map(fn, self.seeds))
        chunker.measured(steps, time.perf_counter() - t0)
        return done

    # --- SGF and GD on the grid ----------------------------------------------------------------
    def run_grid(self):
        exp = self.exp
        dt = exp.dt
        a = 1.0 - dt * exp.lam
        c0 = dt / exp.delta
        c1 = math.sqrt(exp.tau * dt / exp.delta) if exp.algo == "sgf" else 0.0
        n, d = exp.n, exp.d
        chunker = _Chunker(4e-10 * n * d * self.S / self.pool.threads)
        if self.pool.mode == "rows":
            ex = self.pool.ex

            def steps(sd, c, rec):
                return sd.grid_steps_split(ex, c, a, c0, c1, rec)
        else:
            def steps(sd, c, rec):
                return sd.grid_steps(c, a, c0, c1, rec)
        ks = self.rec_ks
        for idx, k in enumerate(ks):
            if self.cancelled():
                return
            part = self.theta_part()
            if k == self.K:
                self.pool.map(lambda sd: sd.record_fields(), self.seeds)
                nxt, first, done = k, 0, 0
            else:
                nxt = ks[idx + 1]
                first = chunker.size(nxt - k)
                done = self.timed(lambda sd: steps(sd, first, True), first, chunker)
            t = k * dt
            snap = self.snapshot(k, t, exp.epochs(t), part)
            if snap is None:
                raise self.diverged(t)
            yield snap
            if done < first:
                raise self.diverged((k + done + 1) * dt)
            j = k + first
            while j < nxt:
                if self.cancelled():
                    return
                c = chunker.size(nxt - j)
                done = self.timed(lambda sd: steps(sd, c, False), c, chunker)
                if done < c:
                    raise self.diverged((j + done + 1) * dt)
                j += c

    # --- minibatch SGD ---------------------------------------------------------------------------
    def run_sgd(self):
        exp = self.exp
        eta, B, n, d = exp.eta, exp.batch, exp.n, exp.d
        fresh = exp.sampling == "fresh"
        chunker = _Chunker(3e-9 * B * d * self.S / self.pool.threads)
        targets = [int(math.floor(k * exp.dt * d / eta + 1e-9)) for k in self.rec_ks]
        # grid times falling on the same SGD step (eta/d > dt*record_every) give one snapshot,
        # labelled with the last of them (so progress reaches 1)
        recs = [(k, tg) for i, (k, tg) in enumerate(zip(self.rec_ks, targets))
                if i + 1 == len(targets) or targets[i + 1] != tg]
        j = 0
        for k, target in recs:
            while j < target:
                if self.cancelled():
                    return
                c = chunker.size(target - j)
                done = self.timed(lambda sd: sd.sgd_steps(c, eta, exp.lam, B, fresh), c, chunker)
                if done < c:
                    raise self.diverged((j + done + 1) * eta / d)
                j += c
            if self.cancelled():
                return

            def rec(sd):
                sd.materialise()
                return sd.record_fields()

            self.pool.map(rec, self.seeds)
            t = j * eta / d
            snap = self.snapshot(k, t, j * B / n, self.theta_part())
            if snap is None:
                raise self.diverged(t)
            yield snap


def stream(exp, cancel=None, *, data=None, parallel="auto"):
    """Simulate ``exp`` (algo 'gd', 'sgf' or 'sgd'), yielding one aggregated Snapshot per
    recording time (grid steps 0, record_every, ..., and the horizon), mean and SE over seeds.

    ``cancel``: a ``threading.Event``; when set, the stream ends within about CHUNK_SECONDS.
    ``data``: optional Dataset (shared by all seeds, which then differ only by their dynamics
    noise) or list of one Dataset per seed; by default seed s draws its own (:func:`.data.draw`).
    ``parallel``: 'auto', 'seeds', 'rows' or 'serial' (:func:`choose_parallel`); same numbers.
    ``model='committee'`` is delegated to :func:`solver.committee.simulate.stream`.
    Raises SolverError (after yielding what was computed) when the state stops being finite.
    """
    if getattr(exp, "model", "glm") == "committee":  # width k > 1: solver.committee.simulate
        if data is not None:
            raise ValueError("data: not supported for model='committee'")
        from ..committee.simulate import stream as committee_stream

        yield from committee_stream(exp, cancel)
        return
    run_ = _Run(exp, cancel, data, parallel)
    try:
        if not run_.setup():
            return
        if exp.algo == "sgd":
            yield from run_.run_sgd()
        else:
            yield from run_.run_grid()
    finally:
        run_.pool.close()
