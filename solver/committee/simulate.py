"""Finite-size simulation of the committee machine: GD, SGF (Euler-Maruyama), SGD, online SGD.

THEORY.md sections 1-2 with ``theta in R^{d x k}``, fields ``h = theta^T x`` and
``l'_a(h, y) = (yhat - y) v_a sigma'(h_a) / k``, ``yhat = (1/k) sum_a v_a sigma(h_a)``.
Per seed ``s`` (``rng = default_rng(exp.seed + s)``, independent data sets) the draw order is:
teacher rows ``theta*_i ~ N(0, rho)``, student rows ``theta_i(0) | theta*_i`` (conditional Gaussian
with ``E[theta0 theta0^T] = Q(0)``, ``E[theta0 theta*^T] = M(0)``), inputs ``X`` (``n x d``,
entries ``N(0, 1/d)``), label noise ``eps``; the dynamics then draws from the same generator.

* ``gd``:  ``theta <- (1 - lam dt) theta - (dt/delta) X^T L'``.
* ``sgf``: ``theta <- (1 - lam dt) theta - X^T (w * L')``,
  ``w_mu = dt/delta + sqrt(tau/delta) dW_mu``,
  ``dW_mu ~ N(0, dt)``: one Brownian increment per sample, shared by its k fields.
* ``sgd``: ``theta <- theta - eta [(1/B) sum_{mu in S_j} x_mu l'_mu^T + (lam/d) theta]``,
  ``eta = tau B``; batches of B distinct samples drawn afresh each step (``fresh``) or epochs of
  random reshuffling (``reshuffle``; the last incomplete batch of an epoch is dropped).
* online SGD (:func:`online_stream`, engine ``sim-online``): a fresh Gaussian input every sample
  (infinite data), the setting of the online ODEs.

Time ``t = steps*eta/d`` (``gd``/``sgf``: ``t = steps*dt``). Recording every ``exp.record_every``
grid steps of ``dt``; SGD records after ``floor(t_grid d/eta)`` steps and reports that step's
own time (grid times on the same step give one snapshot), as :mod:`solver.simulate` does.
Overlaps per seed: ``Q = theta^T theta/d``, ``M = theta^T theta*/d``, ``rho = theta*^T theta*/d``
(the realised teacher), from which test_loss/test_error follow exactly (Gaussian formula,
:mod:`.observables`). Values: mean over seeds; se: standard error (0 for one seed).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ..snapshot import Result, Snapshot, SolverError, collect
from .activations import code_of, sigma, sigma_d1
from .observables import metrics

#: work (multiply-adds) per kernel call between cancel checks
_CHUNK_WORK = 2e7
_HIST_BINS = 60
_HIST_SIGMAS = 5.0
#: |Q| beyond this counts as diverged (no sensible run gets near it)
BLOWUP = 1e30
_HIST2D_BINS = 40


# --------------------------------------------------------------------------------------------
# numba kernels
# --------------------------------------------------------------------------------------------
_FM = {"reassoc", "contract"}  # lets the dot products vectorise; keeps inf/nan semantics


@njit(cache=True, nogil=True, fastmath=_FM)
def _dot(X, mu, thT, a):
    s = 0.0
    for i in range(X.shape[1]):
        s += X[mu, i] * thT[a, i]
    return s


@njit(cache=True, nogil=True, fastmath=_FM)
def full_batch_steps(X, y, thT, v, code, lam, dt, delta, sq, dW, noisy, GT):
    """``dW.shape[0]`` GD (``noisy=False``) or Euler-Maruyama SGF steps, in place on the
    transposed parameters ``thT = theta^T`` (k x d).

    ``sq = sqrt(tau/delta)``; ``dW[s, mu] ~ N(0, dt)``; ``GT`` is a (k, d) work array.
    One pass over ``X`` per step. Returns the number of steps done (fewer if the residuals
    became non-finite)."""
    n, d = X.shape
    k = thT.shape[0]
    g = np.empty(k)
    h = np.empty(k)
    w0 = dt / delta
    decay = 1.0 - lam * dt
    for s in range(dW.shape[0]):
        GT[:, :] = 0.0
        rsum = 0.0
        for mu in range(n):
            yhat = 0.0
            for a in range(k):
                h[a] = _dot(X, mu, thT, a)
                yhat += v[a] * sigma(code, h[a])
            r = yhat / k - y[mu]
            rsum += abs(r)
            w = w0 + sq * dW[s, mu] if noisy else w0
            for a in range(k):
                g[a] = w * r * v[a] * sigma_d1(code, h[a]) / k
            for a in range(k):
                ga = g[a]
                for i in range(d):
                    GT[a, i] += ga * X[mu, i]
        for a in range(k):
            for i in range(d):
                thT[a, i] = decay * thT[a, i] - GT[a, i]
        if not math.isfinite(rsum):
            return s + 1
    return dW.shape[0]


@njit(cache=True, nogil=True, fastmath=_FM)
def sgd_steps(X, y, thT, v, code, lam, eta, idx):
    """SGD steps in place on ``thT = theta^T`` (k x d), batch ``idx[s]`` (B sample indices) at
    step s: ``theta <- (1 - eta lam/d) theta - (eta/B) sum_b x_b l'_b^T``. Returns steps done."""
    n, d = X.shape
    k = thT.shape[0]
    S, B = idx.shape
    h = np.empty(k)
    gb = np.empty((B, k))
    decay = 1.0 - eta * lam / d
    for s in range(S):
        rsum = 0.0
        for b in range(B):
            mu = idx[s, b]
            yhat = 0.0
            for a in range(k):
                h[a] = _dot(X, mu, thT, a)
                yhat += v[a] * sigma(code, h[a])
            r = yhat / k - y[mu]
            rsum += abs(r)
            for a in range(k):
                gb[b, a] = eta / B * r * v[a] * sigma_d1(code, h[a]) / k
        if decay != 1.0:
            for a in range(k):
                for i in range(d):
                    thT[a, i] *= decay
        for b in range(B):
            mu = idx[s, b]
            for a in range(k):
                ga = gb[b, a]
                for i in range(d):
                    thT[a, i] -= ga * X[mu, i]
        if not math.isfinite(rsum):
            return s + 1
    return S


@njit(cache=True, nogil=True)
def fresh_batches(perm, U, idx):
    """Batches of B distinct indices, uniformly at random, by a partial Fisher-Yates shuffle of
    the persistent permutation ``perm`` driven by uniforms ``U`` (S x B)."""
    n = perm.shape[0]
    S, B = U.shape
    for s in range(S):
        for i in range(B):
            j = i + int(U[s, i] * (n - i))
            if j >= n:
                j = n - 1
            t = perm[i]
            perm[i] = perm[j]
            perm[j] = t
            idx[s, i] = perm[i]


@njit(cache=True, nogil=True, fastmath=_FM)
def online_steps(thT, tsT, v, code, lam, eta, noise, B, nsteps, seed):
    """Online SGD on ``thT = theta^T`` (teacher ``tsT = theta*^T``): every sample a fresh
    x ~ N(0, I/d), y = (1/k*) sum_b sigma(h*_b) + noise eps. Uses numba's (thread-local)
    generator, seeded with ``seed`` at entry. Returns steps done."""
    np.random.seed(seed)
    k, d = thT.shape
    ks = tsT.shape[0]
    xs = np.empty((B, d))
    gb = np.empty((B, k))
    h = np.empty(k)
    sd = 1.0 / math.sqrt(d)
    decay = 1.0 - eta * lam / d
    for s in range(nsteps):
        rsum = 0.0
        for b in range(B):
            for i in range(d):
                xs[b, i] = np.random.standard_normal() * sd
            yt = 0.0
            for c in range(ks):
                yt += sigma(code, _dot(xs, b, tsT, c))
            yt = yt / ks + noise * np.random.standard_normal()
            yhat = 0.0
            for a in range(k):
                h[a] = _dot(xs, b, thT, a)
                yhat += v[a] * sigma(code, h[a])
            r = yhat / k - yt
            rsum += abs(r)
            for a in range(k):
                gb[b, a] = eta / B * r * v[a] * sigma_d1(code, h[a]) / k
        if decay != 1.0:
            for a in range(k):
                for i in range(d):
                    thT[a, i] *= decay
        for b in range(B):
            for a in range(k):
                ga = gb[b, a]
                for i in range(d):
                    thT[a, i] -= ga * xs[b, i]
        if not math.isfinite(rsum):
            return s + 1
    return nsteps


@njit(cache=True, nogil=True, fastmath=_FM)
def train_loss_fields(X, y, thT, v, code, H):
    """Mean training loss (1/n) sum_mu (yhat_mu - y_mu)^2/2; fills H = X theta (n x k)."""
    n, d = X.shape
    k = thT.shape[0]
    tot = 0.0
    for mu in range(n):
        yhat = 0.0
        for a in range(k):
            H[mu, a] = _dot(X, mu, thT, a)
            yhat += v[a] * sigma(code, H[mu, a])
        r = yhat / k - y[mu]
        tot += 0.5 * r * r
    return tot / n


# --------------------------------------------------------------------------------------------
# one seed
# --------------------------------------------------------------------------------------------
def psd_sqrt(S):
    """L with L L^T = S for symmetric positive semi-definite S (tolerates singular S)."""
    w, V = np.linalg.eigh(np.asarray(S, float))
    return V * np.sqrt(np.clip(w, 0.0, None))


def draw_teacher_student(exp, rng, d=None, exact=False):
    """theta* (d x k*, rows N(0, rho)) and theta(0) (d x k, rows | theta*_i Gaussian with the
    moments Q(0), M(0)).

    ``exact=True``: instead, whiten one Gaussian draw so that the empirical overlaps equal
    ``[[Q0, M0], [M0^T, rho]]`` exactly (rows no longer i.i.d.; removes the O(d^-1/2) spread of
    the initial overlaps, e.g. to compare many seeds with one ODE solution)."""
    d = exp.d if d is None else d
    Q0, M0, rho = exp.overlaps0()
    k, ks = exp.k, exp.kstar
    if exact:
        Sigma0 = np.block([[Q0, M0], [M0.T, rho]])
        G = rng.standard_normal((d, k + ks))
        w, V = np.linalg.eigh(G.T @ G / d)
        G = G @ (V / np.sqrt(w)) @ V.T                  # G^T G / d = I
        Y = G @ psd_sqrt(Sigma0).T                      # Y^T Y / d = Sigma0
        return np.ascontiguousarray(Y[:, k:]), np.ascontiguousarray(Y[:, :k])
    theta_star = rng.standard_normal((d, ks)) @ psd_sqrt(rho).T
    A = np.linalg.solve(rho, M0.T).T          # E[theta0 | theta*] = A theta*
    Sc = Q0 - A @ M0.T                        # conditional covariance
    theta0 = theta_star @ A.T + rng.standard_normal((d, k)) @ psd_sqrt(0.5 * (Sc + Sc.T)).T
    return np.ascontiguousarray(theta_star), np.ascontiguousarray(theta0)


def draw_problem(exp, s):
    """Data set of seed s: dict(X, y, theta_star, theta0, rng); rng continues for the dynamics."""
    rng = np.random.default_rng(exp.seed + s)
    code = code_of(exp.activation)
    theta_star, theta0 = draw_teacher_student(exp, rng)
    n, d = exp.n, exp.d
    X = rng.standard_normal((n, d))
    X /= math.sqrt(d)
    eps = rng.standard_normal(n)
    Hs = X @ theta_star
    y = _mean_sigma(code, Hs) + exp.noise * eps
    return dict(X=X, y=np.ascontiguousarray(y), theta_star=theta_star, theta0=theta0, rng=rng)


def _mean_sigma(code, H):
    from scipy.special import erf

    if code == 0:
        S = erf(H / math.sqrt(2.0))
    elif code == 1:
        S = np.maximum(H, 0.0)
    else:
        S = np.tanh(H)
    return S.mean(axis=1)


class _Seed:
    """State of one seed: data, parameters, generator, steps done."""

    def __init__(self, exp, s, online=False, exact_init=False):
        self.exp = exp
        self.code = code_of(exp.activation)
        self.v = np.ascontiguousarray(exp.second_layer(), dtype=float)
        self.online = online
        if online:
            self.rng = np.random.default_rng(exp.seed + s)
            self.theta_star, theta0 = draw_teacher_student(exp, self.rng, exact=exact_init)
            self.X = None
        else:
            p = draw_problem(exp, s)
            self.X, self.y, self.theta_star, theta0, self.rng = (
                p["X"], p["y"], p["theta_star"], p["theta0"], p["rng"])
            self.H = np.empty((exp.n, exp.k))
        self.thT = np.ascontiguousarray(theta0.T)          # k x d
        self.tsT = np.ascontiguousarray(self.theta_star.T)  # k* x d
        self.j = 0
        self.ok = True
        self.GT = np.empty_like(self.thT)
        if exp.algo == "sgd" and not online:
            self.perm = np.arange(exp.n, dtype=np.int64)
            self.pos = exp.n  # reshuffle at first use

    # -- dynamics ------------------------------------------------------------------------------
    def advance(self, target, cancel):
        exp = self.exp
        d, k = exp.d, exp.k
        while self.ok and self.j < target:
            if cancel is not None and cancel.is_set():
                return
            if self.online:
                per_step = exp.batch * d * (k + exp.kstar + 2)
            elif exp.algo == "sgd":
                per_step = exp.batch * d * k * 2
            else:
                per_step = exp.n * d * k * 2
            S = int(max(1, min(target - self.j, _CHUNK_WORK // max(per_step, 1))))
            if self.online:
                seed = int(self.rng.integers(0, 2**31 - 1))
                done = online_steps(self.thT, self.tsT, self.v, self.code, exp.lam,
                                    exp.eta, exp.noise, exp.batch, S, seed)
            elif exp.algo == "sgd":
                idx = self._batches(S)
                done = sgd_steps(self.X, self.y, self.thT, self.v, self.code, exp.lam,
                                 exp.eta, idx)
            else:
                noisy = exp.algo == "sgf" and exp.tau > 0
                if noisy:
                    dW = self.rng.standard_normal((S, exp.n)) * math.sqrt(exp.dt)
                else:
                    dW = np.zeros((S, 1))
                done = full_batch_steps(self.X, self.y, self.thT, self.v, self.code, exp.lam,
                                        exp.dt, exp.delta, math.sqrt(exp.tau / exp.delta), dW,
                                        noisy, self.GT)
            self.j += done
            if done < S:
                self.ok = False

    def _batches(self, S):
        exp = self.exp
        n, B = exp.n, exp.batch
        idx = np.empty((S, B), dtype=np.int64)
        if exp.sampling == "fresh":
            fresh_batches(self.perm, self.rng.random((S, B)), idx)
            return idx
        for s in range(S):
            if self.pos + B > n:
                self.perm = self.rng.permutation(n)
                self.pos = 0
            idx[s] = self.perm[self.pos:self.pos + B]
            self.pos += B
        return idx

    # -- observation ---------------------------------------------------------------------------
    def observe(self):
        d = self.exp.d
        th, ts = self.thT, self.tsT
        out = dict(Q=th @ th.T / d, M=th @ ts.T / d, rho=ts @ ts.T / d)
        if self.online:
            out["train_loss"] = math.nan  # filled with the test loss
        else:
            out["train_loss"] = train_loss_fields(self.X, self.y, th, self.v, self.code, self.H)
        return out


# --------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------
def _record_steps(exp):
    K = exp.steps
    rec = list(range(0, K + 1, exp.record_every))
    if rec[-1] != K:
        rec.append(K)
    return K, rec


def _n_threads(seeds):
    try:
        import numba

        nt = numba.config.NUMBA_NUM_THREADS
    except Exception:  # pragma: no cover
        nt = os.cpu_count() or 1
    return max(1, min(seeds, nt, os.cpu_count() or 1))


def _mean_se(x):
    """Mean and standard error over seeds (se 0 for one seed, as solver.simulate)."""
    x = np.asarray(x, float)
    with np.errstate(all="ignore"):
        m = float(np.mean(x))
        se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0 * m
    return m, se


def _hist(x, bins):
    """(edges, density) over mean +- 5 std (as solver.simulate); density counts / (n bin width),
    n including values outside the range."""
    x = np.asarray(x, float).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.linspace(-1, 1, bins + 1), np.zeros(bins)
    mean, std = float(x.mean()), float(x.std())
    half = _HIST_SIGMAS * std if std > 1e-12 * max(1.0, abs(mean)) else 1.0
    counts, edges = np.histogram(x, bins=bins, range=(mean - half, mean + half))
    return edges, counts / (x.size * (2 * half / bins))


def _extras(exp, states):
    th = np.concatenate([s.thT.T for s in states], axis=0)
    ex = {"theta_hist": _hist(th, _HIST_BINS)}
    if exp.k == 2:
        x, y = th[:, 0], th[:, 1]
        good = np.isfinite(x) & np.isfinite(y)
        if good.any():
            rng = [(float(c.mean()) - _HIST_SIGMAS * float(c.std()) - 1e-12,
                    float(c.mean()) + _HIST_SIGMAS * float(c.std()) + 1e-12)
                   for c in (x[good], y[good])]
            counts, xe, ye = np.histogram2d(x[good], y[good], bins=_HIST2D_BINS, range=rng)
            area = (xe[1] - xe[0]) * (ye[1] - ye[0])
            ex["theta2d_hist"] = (xe, ye, counts / (good.sum() * area))
    if not states[0].online:
        ex["field_hist"] = _hist(np.concatenate([s.H for s in states], axis=0), _HIST_BINS)
    return ex


def _snapshot(exp, states, obs, step, K, t, engine):
    Q = np.stack([o["Q"] for o in obs])
    M = np.stack([o["M"] for o in obs])
    rho = np.stack([o["rho"] for o in obs])
    per_seed = metrics(Q, M, rho, exp.second_layer(), exp.activation, exp.noise)
    tl = np.array([o["train_loss"] for o in obs])
    if states[0].online:
        tl = per_seed["test_loss"]
    per_seed = {"train_loss": tl, **per_seed}
    values, se = {}, {}
    for key, x in per_seed.items():
        values[key], se[key] = _mean_se(x)
    extras = _extras(exp, states)
    extras["seeds"] = {key: np.asarray(x, float) for key, x in per_seed.items()}
    # SGD: passes actually made, j B / n; else exp.epochs(t)
    epochs = (t * exp.d / exp.eta * exp.batch / exp.n
              if (exp.algo == "sgd" and not states[0].online) else exp.epochs(t))
    return Snapshot(t=float(t), step=int(step), epochs=float(epochs), values=values, se=se,
                    extras=extras, engine=engine, progress=step / K)


def _check_model(exp):
    if exp.model != "committee":
        raise ValueError("solver.committee needs exp.model == 'committee'")


def _targets(exp, rec, online):
    """(grid step, dynamics steps, time) per recording. SGD and online SGD record after
    ``floor(t_grid d/eta)`` steps at that step's own time ``j eta/d``; grid times falling on the
    same step give one snapshot, labelled with the last of them (as solver.simulate does)."""
    if not (online or exp.algo == "sgd"):
        return [(r, r, r * exp.dt) for r in rec]
    js = [int(math.floor(r * exp.dt * exp.d / exp.eta + 1e-9)) for r in rec]
    return [(r, j, j * exp.eta / exp.d) for i, (r, j) in enumerate(zip(rec, js))
            if i + 1 == len(js) or js[i + 1] != j]


def _divergence(exp, online, t):
    if online or exp.algo == "sgd":
        return SolverError(f"diverged at t={t:.4g}: lower tau (eta = tau*batch = {exp.eta:g})",
                           parameter="tau")
    if exp.algo == "gd" or exp.tau == 0:
        return SolverError(f"diverged at t={t:.4g}: lower dt", parameter="dt")
    return SolverError(f"diverged at t={t:.4g}: lower tau or dt", parameter="tau")


def _stream(exp, cancel, online, exact_init=False):
    _check_model(exp)
    exp.validate()
    if online and exp.tau <= 0:
        raise SolverError("online SGD needs tau > 0", parameter="tau")
    engine = "sim-online" if online else "sim-" + exp.algo
    if not online:
        need = exp.seeds * exp.n * exp.d * 8
        if need > 8e9:
            raise SolverError(f"the data sets need {need / 1e9:.1f} GB: lower d, delta or seeds",
                              parameter="d")
    K, rec = _record_steps(exp)
    nt = _n_threads(exp.seeds)
    pool = ThreadPoolExecutor(max_workers=nt) if nt > 1 else None
    pmap = pool.map if pool is not None else map
    try:
        states = []
        for s in range(exp.seeds):  # drawing is cheap next to the dynamics; keep it cancellable
            if cancel is not None and cancel.is_set():
                return
            states.append(_Seed(exp, s, online, exact_init))
        for r, j, t in _targets(exp, rec, online):
            list(pmap(lambda st: st.advance(j, cancel), states))
            if cancel is not None and cancel.is_set():
                return
            obs = list(pmap(lambda st: st.observe(), states))
            snap = _snapshot(exp, states, obs, r, K, t, engine)
            bad = (not all(st.ok for st in states)
                   or not all(math.isfinite(x) for x in snap.values.values())
                   or abs(snap.values["Q"]) > BLOWUP)
            if bad:
                per_step = exp.eta / exp.d if (online or exp.algo == "sgd") else exp.dt
                t_bad = min(st.j for st in states) * per_step
                raise _divergence(exp, online, t_bad)
            yield snap
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def stream(exp, cancel: threading.Event | None = None):
    """Yield one Snapshot (engine 'sim-' + exp.algo) per recording time: mean and standard error
    over ``exp.seeds`` independent data sets of train_loss, test_loss (= eg + noise^2/2),
    test_error (= eg), m = tr(M)/k, Q = tr(Q)/k, cosine, Q_a_b, M_a_b; extras theta_hist,
    theta2d_hist (k = 2), field_hist. Raises SolverError on divergence."""
    return _stream(exp, cancel, online=False)


def online_stream(exp, cancel: threading.Event | None = None, exact_init: bool = False):
    """Online SGD (fresh input every sample, batch exp.batch, eta = tau*batch): engine
    'sim-online', the finite-d counterpart of :func:`solver.committee.online.stream`.
    train_loss = test_loss (every sample is new). ``exact_init``: initial overlaps exactly
    (Q0, M0, rho) in every seed (:func:`draw_teacher_student`)."""
    return _stream(exp, cancel, online=True, exact_init=exact_init)


def run(exp, cancel=None, callback=None, online=False, exact_init=False) -> Result:
    """Collect a stream into a Result (callback(snapshot) after each)."""
    engine = "sim-online" if online else "sim-" + exp.algo
    return collect(_stream(exp, cancel, online, exact_init and online), exp.to_dict(), engine,
                   cancel, callback)