"""Deterministic DMFT of linear regression (square loss, linear teacher): THEORY.md section 5.2.

With ``l'(h, y) = h - y`` and ``l'' = 1`` the section-4 grid system closes on second moments.
Write ``u_k = omega_k - y`` (Gaussian) and ``r_k = h_k - y`` (the residual); the sample process
``r_k = u_k - sum_{j<k} R_{k,j+1} w_j r_j`` is linear in ``u`` with coefficients multilinear in
the independent weights ``w_j = dt/delta + sqrt(tau/delta) dW_j``. Because ``w_j`` is independent
of every ``r_i`` with ``i <= j`` and of ``u``, the moments obey (``wb = dt/delta``,
``w2 = wb^2 + tau dt/delta``)

    G_{k,m}   = -wb sum_{m<=j<k} R_{k,j+1} G_{j,m},  G_{k,k} = 1      (= E[chi_{k,m}])
    kappa_k   = -sum_{m<=k} G_{k,m}
    V_{k,l}   = E[u_k r_l]   = sum_{i<=l} G_{l,i} E[u_k u_i]                      (l <= k)
    P_{k,j}   = E[r_k r_j w_j] = wb V_{k,j} - sum_{i<k} R_{k,i+1} D_{i,j}          (j < k)
    S_{k,l}   = E[r_k r_l]   = V_{k,l} - sum_{i<k} R_{k,i+1} P~_{l,i}              (l <= k)
                P~_{l,i} = P_{l,i} (i < l),  wb S_{i,l} (i >= l)
    D_{k,j}   = E[dA_k dA_j] = wb P_{k,j} (j < k),   D_{k,k} = w2 S_{k,k}

and ``R``, ``b``, ``m``, ``C`` follow THEORY.md section 4 verbatim. This equals the expectation of
the Monte Carlo grid system at the same ``dt`` (at ``tau = 0``: the DMFT of full-batch GD with
step ``dt``). Cost ``O(K^3)`` flops, memory ``O(K^2)``. Derivation: docs/theory_deterministic.md.
"""
from __future__ import annotations

import math
import threading
from typing import Iterator

import numpy as np
from numba import njit

from ..config import ConfigError
from ..observables import metrics
from ..snapshot import Result, Snapshot, SolverError, collect
from .glm import _correlate

ENGINE = "dmft-exact"
#: Largest grid (number of steps K) accepted: memory is 7 (K+1)^2 float64.
MAX_STEPS = 2500


@njit(cache=True, nogil=True)
def _advance(k0, k1, R, G, C, P, S, V, D, b, kappa, m, U, Y,
             dt, lam, delta, tau, rho, sig2, q0, m0):
    """Solve grid steps k0 <= k < k1 in place (all quantities of step k; see module doc).
    Loops run along rows (C order) so that the O(K^3) sweep stays cache friendly."""
    wb = dt / delta
    w2 = wb * wb + tau * dt / delta
    for k in range(k0, k1):
        # 1. response R_{k,.} and teacher coefficient b_k from step k-1
        if k > 0:
            for i in range(k):
                U[i] = 0.0
            for j in range(k):
                g = G[k - 1, j]
                for i in range(j + 1):
                    U[i] += g * R[j, i]
            for i in range(k):
                R[k, i] = R[k - 1, i] - dt * (lam * R[k - 1, i] + U[i])
            acc = 0.0
            for j in range(k):
                acc += G[k - 1, j] * b[j]
            b[k] = b[k - 1] - dt * (lam * b[k - 1] + acc + kappa[k - 1])
        else:
            b[0] = 0.0
        R[k, k] = 1.0
        # 2. overlaps m_k, C_{k,l} (l <= k): the same closure as the Monte Carlo sweep, D = E[dA dA]
        _correlate(k, delta, q0, m0, rho, R, b, D, m, C, Y)
        # 3. mean tangent G_{k,.} and kappa_k
        for mm in range(k):
            G[k, mm] = 0.0
        for j in range(k):
            r = -wb * R[k, j + 1]
            for mm in range(j + 1):
                G[k, mm] += r * G[j, mm]
        G[k, k] = 1.0
        acc = 0.0
        for mm in range(k + 1):
            acc += G[k, mm]
        kappa[k] = -acc
        # 4. U_i = E[u_k u_i], V_{k,l} = E[u_k r_l]
        for i in range(k + 1):
            U[i] = C[k, i] - m[k] - m[i] + rho + sig2
        for l in range(k + 1):
            acc = 0.0
            for i in range(l + 1):
                acc += G[l, i] * U[i]
            V[k, l] = acc
        # 5. P_{k,j} = E[r_k r_j w_j] = wb V_{k,j} - Y_j, j < k
        for j in range(k):
            P[k, j] = wb * V[k, j] - Y[j]
        # 6. S_{k,l} = E[r_k r_l], l <= k
        for l in range(k + 1):
            acc = 0.0
            for i in range(min(l, k)):
                acc += R[k, i + 1] * P[l, i]
            for i in range(l, k):
                acc += R[k, i + 1] * wb * S[l, i]
            s = V[k, l] - acc
            S[k, l] = s
            S[l, k] = s
        # 7. D_{k,j} = E[dA_k dA_j]
        for j in range(k):
            D[k, j] = wb * P[k, j]
            D[j, k] = D[k, j]
        D[k, k] = w2 * S[k, k]


class _State:
    """Arrays of the grid system, grown in place by :func:`_advance`."""

    def __init__(self, K):
        shape = (K + 1, K + 1)
        self.R, self.G, self.C, self.P, self.S, self.V, self.D = (np.zeros(shape) for _ in range(7))
        self.b, self.kappa, self.m, self.U, self.Y = (np.zeros(K + 1) for _ in range(5))

    def advance(self, k0, k1, exp):
        _advance(k0, k1, self.R, self.G, self.C, self.P, self.S, self.V, self.D, self.b,
                 self.kappa, self.m, self.U, self.Y, exp.dt, exp.lam, exp.delta, exp.tau,
                 exp.rho, exp.noise ** 2, exp.q0, exp.m0)


def _check(exp):
    if exp.loss != "square" or exp.teacher != "linear":
        raise ConfigError("method", "'exact' applies to square loss with a linear teacher; "
                                    "use 'mc' or 'online'")
    if exp.steps > MAX_STEPS:
        raise ConfigError("dt", f"the exact method keeps O(K^2) memory and allows at most "
                                f"{MAX_STEPS} grid steps, got T/dt = {exp.steps}: raise dt or lower T")


def _gauss_density(var, npts=201, width=5.0):
    sd = math.sqrt(var)
    x = np.linspace(-width * sd, width * sd, npts)
    return x, np.exp(-0.5 * x * x / var) / math.sqrt(2 * math.pi * var)


def field_variance(st, k, exp):
    """E[h_k^2] = S_kk + 2 E[r_k y] + rho + sigma^2, E[r_k y] = sum_i G_{k,i} (m_i - rho - sigma^2)."""
    sig2 = exp.noise ** 2
    ry = float(np.dot(st.G[k, :k + 1], st.m[:k + 1] - exp.rho - sig2))
    return st.S[k, k] + 2 * ry + exp.rho + sig2


def epochs(exp, t):
    """SGF convention (as the Monte Carlo solver): t/(tau delta) passes; at tau = 0 t/dt."""
    return t / (exp.tau * exp.delta) if exp.tau > 0 else t / exp.dt


def kernels(st, k, dt):
    """Kernel matrices up to step k, in the Monte Carlo solver's layout: t, C, R (NaN above the
    diagonal), Gamma = G/dt below the diagonal (regular part as a density; NaN on and above),
    Gamma_inst = G_{k,k} = E[l''] = 1, kappa, b."""
    s = slice(0, k + 1)
    lower = np.tril(np.ones((k + 1, k + 1), dtype=bool))
    strict = np.tril(lower, -1)
    return dict(t=np.arange(k + 1) * dt, C=st.C[s, s].copy(), R=np.where(lower, st.R[s, s], np.nan),
                Gamma=np.where(strict, st.G[s, s] / dt, np.nan), Gamma_inst=np.diag(st.G[s, s]).copy(),
                kappa=st.kappa[s].copy(), b=st.b[s].copy())


def _diverged(exp, k):
    return SolverError(f"diverged at t={k * exp.dt:.4g} (grid step {k}): "
                       + ("lower tau or dt" if exp.tau > 0 else "lower dt"),
                       parameter="tau" if exp.tau > 0 else "dt")


def _snapshot(st, k, K, exp, with_kernels):
    t = k * exp.dt
    m, Q = float(st.m[k]), float(st.C[k, k])
    train = 0.5 * float(st.S[k, k])
    if not (math.isfinite(m) and math.isfinite(Q) and math.isfinite(train)) \
            or abs(Q) > 1e10 * max(1.0, exp.q0, exp.rho):
        return None
    met = metrics(m, Q, exp)
    vals = {"train_loss": train, "test_loss": float(met["test_loss"]),
            "test_error": math.nan, "m": m, "Q": Q, "cosine": float(met["cosine"])}
    se = {key: (math.nan if math.isnan(v) else 0.0) for key, v in vals.items()}
    extras = {}
    if Q > 0:
        extras["theta_density"] = _gauss_density(Q)
    if exp.tau == 0:  # h_k is a linear functional of Gaussians: Gaussian, mean 0
        var = field_variance(st, k, exp)
        if 0 < var < 1e100:
            extras["field_density"] = _gauss_density(var)
    if with_kernels:
        extras["kernels"] = kernels(st, k, exp.dt)
    return Snapshot(t=t, step=k, epochs=float(epochs(exp, t)), values=vals, se=se, extras=extras,
                    engine=ENGINE, progress=k / K)


def stream(exp, cancel: threading.Event | None = None) -> Iterator[Snapshot]:
    """Yield a :class:`Snapshot` every ``exp.record_every`` grid steps (and at ``T``).

    ``extras['kernels']`` (see :func:`kernels`) every tenth of the run and at the end, as the Monte
    Carlo solver does; ``extras['field_density']`` at ``tau = 0`` (the field is Gaussian there).
    """
    _check(exp)
    K = exp.steps
    st = _State(K)
    rec = sorted(set(range(0, K + 1, exp.record_every)) | {K})
    kernel_every = max(1, int(round(0.1 * K)))
    next_kernels = kernel_every
    done = 0  # steps < done are solved
    chunk = max(1, 4_000_000 // max(1, K * K))  # about 10^7 flops per kernel call
    for k in rec:
        while done <= k:
            if cancel is not None and cancel.is_set():
                return
            k1 = min(k + 1, done + chunk)
            st.advance(done, k1, exp)
            done = k1
            q = st.C[done - 1, done - 1]
            if not math.isfinite(q) or abs(q) > 1e10 * max(1.0, exp.q0, exp.rho):
                raise _diverged(exp, done - 1)
        with_kernels = k >= next_kernels or k == K
        snap = _snapshot(st, k, K, exp, with_kernels)
        if snap is None:
            raise _diverged(exp, k)
        if with_kernels:
            while next_kernels <= k:
                next_kernels += kernel_every
        yield snap


def solve(exp, cancel: threading.Event | None = None, callback=None) -> Result:
    """Collect :func:`stream` into a :class:`Result` (``callback(snapshot)`` after each)."""
    return collect(stream(exp, cancel), exp.to_dict(), ENGINE, cancel, callback)


run = solve
