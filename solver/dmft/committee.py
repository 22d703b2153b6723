"""Monte Carlo DMFT of the SGF for two-layer committee machines: THEORY.md sections 3-4 in
matrix form (width ``k >= 1``, teacher width ``k*``), engine ``'dmft-mc'``.

Same causal forward sweep as the GLM solver (:mod:`solver.dmft.glm`), with every kernel a
matrix: ``R[s, i]``, ``G[s, m]``, ``C[s, l]``, ``MM[j, j'] = E[dA_j dA_j'^T]`` are ``k x k``,
``b[s]``, ``kappa[s]``, ``m[s] = M(t_s)`` are ``k x k*``. At grid step ``s``:

1. ``R[s, i] = (1 - lam dt) R[s-1, i] - dt sum_{i<=j<=s-1} G[s-1, j] R[j, i]``, ``R[s, s] = I``;
   ``b[s] = (1 - lam dt) b[s-1] - dt (sum_{j<=s-1} G[s-1, j] b[j] + kappa[s-1])``;
2. ``m[s] = R[s, 0] M0 + b[s] rho`` and
   ``C[s, l] = R[s,0] Q0 R[l,0]^T + R[s,0] M0 b[l]^T + b[s] M0^T R[l,0]^T + b[s] rho b[l]^T
   + delta sum_{j<s, j'<l} R[s, j+1] MM[j, j'] R[l, j'+1]^T``;
3. ``k`` more rows of the Cholesky factor of the covariance of
   ``x = (h*_1..h*_k*, omega_0, omega_1, ...)`` (each ``omega_s`` contributes its k components,
   :func:`solver.dmft.gaussian.chol_append` row by row, zero-pivot guard);
4. per trajectory: ``omega_s`` (conditional draw), ``h_s = omega_s - sum_{j<s} R[s, j+1] dA_j``,
   ``l'_a = (yhat - y) v_a sigma'(h_a)/k``,
   ``l''_ab = v_a v_b sigma'(h_a) sigma'(h_b)/k^2 + delta_ab (yhat - y) v_a sigma''(h_a)/k``,
   ``w_s = dt/delta + sqrt(tau/delta) dW_s`` (one scalar per sample, shared by its k fields),
   ``dA_s = l'_s w_s``, ``u_s = l''_s w_s`` and the tangent row ``chi[s, m] = dh_s/d eps_m``
   by the adjoint recursion (``k x k`` blocks):
   ``v_s = I``, ``v_m = -(sum_{m < s' <= s} v_s' R[s', m+1]) u_m``;
5. averages: ``G[s, m] = E[l''_s chi[s, m]]``,
   ``kappa_s = (E[l'_s h*^T] - sum_{m<=s} G[s, m] m[m]) rho^{-1}`` (section 4, "stein" form),
   ``MM[s, j] = E[dA_s dA_j^T]`` (``j <= s``), by default the raw sample mean over the
   realised ``dW`` (section 4). The alternative ``mm_estimator='dw_average'`` averages ``dW_s``
   analytically given the past (``E[l'_s dA_j^T] dt/delta`` for ``j < s``,
   ``E[l'_s l'_s^T] (dt^2/delta^2 + tau dt/delta)`` for ``j = s``): same expectation, lower
   variance, but not a Gram matrix, so the covariance of ``(h*, omega)`` can lose positive
   definiteness; populations of 500-1000 then drifted away (docs/committee.md).

Standard errors: ``replicas`` independent populations of ``n_rep`` trajectories next to the
main one; se = their sample standard deviation times ``sqrt(n_rep / N)`` (as the GLM solver).

Activations: erf and tanh (smooth). relu is refused: its ``sigma''`` has a delta mass at 0 that
the pathwise tangent cannot see (the response ``G`` would miss a term).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..committee.activations import RELU, code_of, sigma, sigma_d1, sigma_d2
from .gaussian import chol_append

ENGINE = "dmft-mc"
#: Trajectories per block (the unit of parallel work and of the deterministic partial sums).
BLOCK = 32
#: Independent replica populations for the standard errors, and their size
#: ``min(N, max(N // REPLICA_DIVISOR, MIN_REPLICA))``. Populations of 500 went unstable at
#: delta = 1 with a large second layer where those of 1000 and more did not (docs/committee.md).
REPLICAS = 5
REPLICA_DIVISOR = 4
MIN_REPLICA = 1000
#: kappa variants: 'full' (THEORY section 4), 'no_past' (drop the terms m < s of the memory
#: sum: a deliberate error for the checks), 'none' (drop the whole sum).
KAPPA_MODES = ("full", "no_past", "none")
#: Estimators of MM[s, j] = E[dA_s dA_j^T]: 'raw' (the sample mean of dA_s dA_j^T, a Gram
#: matrix, so the covariance of (h*, omega_0..omega_s) stays positive semi-definite) or
#: 'dw_average' (dW_s averaged analytically: lower variance, same expectation, but not a Gram
#: matrix; small populations then hit negative pivots and drift away, docs/committee.md).
MM_ESTIMATORS = ("raw", "dw_average")
#: Multiply-adds per kernel call between cancel checks (about 0.05-0.1 s).
CHUNK_WORK = 1e8


class Cancelled(Exception):
    """Raised inside :meth:`Population.step` when the cancel event is set."""


# --------------------------------------------------------------------------------------------
# deterministic part (one population; O(s^2 k^3) per step)
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _advance(s, dt, lam, R, b, G, kappa):
    """Step 1: R[s, :s+1] and b[s] from step s-1 (explicit Euler of the parameter process)."""
    k = R.shape[2]
    ks = b.shape[2]
    if s == 0:
        R[0, 0] = 0.0
        for a in range(k):
            R[0, 0, a, a] = 1.0
        b[0] = 0.0
        return
    p = s - 1
    for i in range(s):
        for a in range(k):
            for c in range(k):
                acc = 0.0
                for j in range(i, s):
                    for e in range(k):
                        acc += G[p, j, a, e] * R[j, i, e, c]
                R[s, i, a, c] = (1.0 - lam * dt) * R[p, i, a, c] - dt * acc
    R[s, s] = 0.0
    for a in range(k):
        R[s, s, a, a] = 1.0
    for a in range(k):
        for c in range(ks):
            acc = 0.0
            for j in range(s):
                for e in range(k):
                    acc += G[p, j, a, e] * b[j, e, c]
            b[s, a, c] = (1.0 - lam * dt) * b[p, a, c] - dt * (acc + kappa[p, a, c])


@njit(cache=True, nogil=True)
def _correlate(s, delta, Q0, M0, rho, R, b, MM, m, C, P):
    """Step 2: m[s] and C[s, :s+1] (mirrored: C[l, s] = C[s, l]^T)."""
    k = R.shape[2]
    ks = b.shape[2]
    # m[s] = R[s,0] M0 + b[s] rho
    for a in range(k):
        for c in range(ks):
            acc = 0.0
            for e in range(k):
                acc += R[s, 0, a, e] * M0[e, c]
            for e in range(ks):
                acc += b[s, a, e] * rho[e, c]
            m[s, a, c] = acc
    # P[jp] = sum_{j<s} R[s, j+1] MM[j, jp]   (jp < s)
    for jp in range(s):
        for a in range(k):
            for c in range(k):
                acc = 0.0
                for j in range(s):
                    for e in range(k):
                        acc += R[s, j + 1, a, e] * MM[j, jp, e, c]
                P[jp, a, c] = acc
    # X = R[s,0] Q0 + b[s] M0^T ; Y = R[s,0] M0 + b[s] rho (= m[s])   (k x k, k x ks)
    X = np.zeros((k, k))
    for a in range(k):
        for c in range(k):
            acc = 0.0
            for e in range(k):
                acc += R[s, 0, a, e] * Q0[e, c]
            for e in range(ks):
                acc += b[s, a, e] * M0[c, e]
            X[a, c] = acc
    for l in range(s + 1):
        for a in range(k):
            for c in range(k):
                # X R[l,0]^T + m[s] b[l]^T + delta sum_{jp<l} P[jp] R[l, jp+1]^T
                acc = 0.0
                for e in range(k):
                    acc += X[a, e] * R[l, 0, c, e]
                for e in range(ks):
                    acc += m[s, a, e] * b[l, c, e]
                mem = 0.0
                for jp in range(l):
                    for e in range(k):
                        mem += P[jp, a, e] * R[l, jp + 1, c, e]
                C[s, l, a, c] = acc + delta * mem
        for a in range(k):
            for c in range(k):
                C[l, s, c, a] = C[s, l, a, c]
    # symmetrise the diagonal block against roundoff
    for a in range(k):
        for c in range(a):
            x = 0.5 * (C[s, s, a, c] + C[s, s, c, a])
            C[s, s, a, c] = x
            C[s, s, c, a] = x


@njit(cache=True, nogil=True)
def _chol_rows(s, ks, m, C, L, srow):
    """Step 3: the k rows of omega_s in the Cholesky factor of Cov(h*, omega_0, ..., omega_s).
    Returns the number of zero pivots."""
    k = C.shape[2]
    nz = 0
    for a in range(k):
        r = ks + s * k + a
        for c in range(ks):
            srow[c] = m[s, a, c]
        for l in range(s):
            for e in range(k):
                srow[ks + l * k + e] = C[s, l, a, e]
        for e in range(a):
            srow[ks + s * k + e] = C[s, s, a, e]
        piv = chol_append(L, r, srow, C[s, s, a, a])
        if piv == 0.0:
            nz += 1
    return nz


# --------------------------------------------------------------------------------------------
# population part (O(N s^2 k^3) per step, parallel over blocks of trajectories)
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, parallel=True)
def _population_step(blk0, blk1, s, ks, code, vvec, dt, delta, tau, L, R, z, hstar, y, dW, dA,
                     u, h, pG, pM, pE, pS, raw):
    """Step 4 for the trajectories of blocks ``blk0 .. blk1-1``; per-block partial sums: ``pG[ib, m] = sum l''_s chi[s, m]``,
    ``pM[ib, j] = sum l'_s dA_j^T`` (j < s), ``pM[ib, s] = sum l'_s l'_s^T``,
    ``pE[ib] = sum l'_s h*^T``, ``pS[ib] = (sum loss, #non-finite)``."""
    n = z.shape[0]
    k = R.shape[2]
    w0 = dt / delta
    sq = math.sqrt(tau / delta)
    r0 = ks + s * k
    for ib in prange(blk0, blk1):
        i0 = ib * BLOCK
        i1 = min(n, i0 + BLOCK)
        for mm in range(s + 1):
            for a in range(k):
                for c in range(k):
                    pG[ib, mm, a, c] = 0.0
                    pM[ib, mm, a, c] = 0.0
        for a in range(k):
            for c in range(ks):
                pE[ib, a, c] = 0.0
        pS[ib, 0] = 0.0
        pS[ib, 1] = 0.0
        v = np.empty((s + 1, k, k))
        acc = np.empty((s + 1, k, k))
        hk = np.empty(k)
        s1 = np.empty(k)
        s2 = np.empty(k)
        lp = np.empty(k)
        app = np.empty((k, k))
        for i in range(i0, i1):
            # fields
            for a in range(k):
                r = r0 + a
                om = 0.0
                for q in range(r + 1):
                    om += L[r, q] * z[i, q]
                hk[a] = om
            for j in range(s):
                for a in range(k):
                    x = 0.0
                    for e in range(k):
                        x += R[s, j + 1, a, e] * dA[i, j, e]
                    hk[a] -= x
            # loss and its derivatives
            yhat = 0.0
            for a in range(k):
                yhat += vvec[a] * sigma(code, hk[a])
                s1[a] = sigma_d1(code, hk[a])
                s2[a] = sigma_d2(code, hk[a])
            yhat /= k
            res = yhat - y[i]
            lo = 0.5 * res * res
            for a in range(k):
                lp[a] = res * vvec[a] * s1[a] / k
                for c in range(k):
                    app[a, c] = vvec[a] * vvec[c] * s1[a] * s1[c] / (k * k)
                app[a, a] += res * vvec[a] * s2[a] / k
            w = w0 + sq * dW[i]
            bad = not math.isfinite(lo)
            for a in range(k):
                h[i, a] = hk[a]
                dA[i, s, a] = lp[a] * w
                for c in range(k):
                    u[i, s, a, c] = app[a, c] * w
                bad = bad or not math.isfinite(lp[a])
            if bad:
                pS[ib, 1] += 1.0
                continue
            pS[ib, 0] += lo
            for a in range(k):
                for c in range(ks):
                    pE[ib, a, c] += lp[a] * hstar[i, c]
            # raw: dA_s dA_j^T (j <= s); else l'_s dA_j^T (j < s) and l'_s l'_s^T
            fs = w if raw else 1.0
            for j in range(s):
                for a in range(k):
                    for c in range(k):
                        pM[ib, j, a, c] += fs * lp[a] * dA[i, j, c]
            for a in range(k):
                for c in range(k):
                    pM[ib, s, a, c] += fs * fs * lp[a] * lp[c]
            # tangent row chi[s, :] by the adjoint recursion
            for a in range(k):
                for c in range(k):
                    v[s, a, c] = 1.0 if a == c else 0.0
            for mm in range(s):
                for a in range(k):
                    for c in range(k):
                        acc[mm, a, c] = 0.0
            for kp in range(s, 0, -1):
                # acc[mm] += v[kp] R[kp, mm+1]  for mm < kp
                for mm in range(kp):
                    for a in range(k):
                        for c in range(k):
                            x = 0.0
                            for e in range(k):
                                x += v[kp, a, e] * R[kp, mm + 1, e, c]
                            acc[mm, a, c] += x
                # v[kp-1] = -acc[kp-1] u[kp-1]
                for a in range(k):
                    for c in range(k):
                        x = 0.0
                        for e in range(k):
                            x += acc[kp - 1, a, e] * u[i, kp - 1, e, c]
                        v[kp - 1, a, c] = -x
            # G samples: l''_s chi[s, m]
            for mm in range(s + 1):
                for a in range(k):
                    for c in range(k):
                        x = 0.0
                        for e in range(k):
                            x += app[a, e] * v[mm, e, c]
                        pG[ib, mm, a, c] += x


@njit(cache=True, nogil=True)
def _teacher_labels(code, hstar, eps, noise, y):
    n, ks = hstar.shape
    for i in range(n):
        acc = 0.0
        for c in range(ks):
            acc += sigma(code, hstar[i, c])
        y[i] = acc / ks + noise * eps[i]


# --------------------------------------------------------------------------------------------
# one population
# --------------------------------------------------------------------------------------------
class Population:
    """One DMFT solve with ``n`` trajectories (all kernels and per-trajectory histories)."""

    def __init__(self, exp, n, seed_seq, kappa_mode="full", mm_estimator="raw"):
        if kappa_mode not in KAPPA_MODES:
            raise ValueError(f"kappa_mode must be one of {KAPPA_MODES}")
        if mm_estimator not in MM_ESTIMATORS:
            raise ValueError(f"mm_estimator must be one of {MM_ESTIMATORS}")
        self.kappa_mode = kappa_mode
        self.mm_estimator = mm_estimator
        self.n = n = int(n)
        self.k = k = int(exp.k)
        self.ks = ks = int(exp.kstar)
        self.K = K = int(exp.steps)
        self.code = code_of(exp.activation)
        self.v = np.ascontiguousarray(exp.second_layer(), dtype=float)
        Q0, M0, rho = exp.overlaps0()
        self.Q0 = np.ascontiguousarray(Q0, float)
        self.M0 = np.ascontiguousarray(M0, float)
        self.rho = np.ascontiguousarray(rho, float)
        self.rho_inv = np.linalg.inv(self.rho)
        self.dt, self.lam, self.delta, self.tau = float(exp.dt), float(exp.lam), float(exp.delta), float(exp.tau)
        Kp = K + 1
        self.R = np.zeros((Kp, Kp, k, k))
        self.G = np.zeros((Kp, Kp, k, k))
        self.C = np.zeros((Kp, Kp, k, k))
        self.MM = np.zeros((Kp, Kp, k, k))
        self.b = np.zeros((Kp, k, ks))
        self.m = np.zeros((Kp, k, ks))
        self.kappa = np.zeros((Kp, k, ks))
        self.Elh = np.zeros((Kp, k, ks))
        self.train = np.full(Kp, np.nan)
        self._P = np.zeros((Kp, k, k))
        D = ks + Kp * k
        self.L = np.zeros((D, D))
        self._srow = np.zeros(D)
        self.zero_pivots = 0
        for c in range(ks):
            self._srow[:c] = self.rho[c, :c]
            chol_append(self.L, c, self._srow, self.rho[c, c])
        self.rng = np.random.Generator(np.random.PCG64(seed_seq))
        self.z = np.zeros((n, D))
        self.z[:, :ks] = self.rng.standard_normal((n, ks))
        self.hstar = np.ascontiguousarray(self.z[:, :ks] @ self.L[:ks, :ks].T)
        eps = self.rng.standard_normal(n)
        self.y = np.empty(n)
        _teacher_labels(self.code, self.hstar, eps, float(exp.noise), self.y)
        self.dA = np.zeros((n, Kp, k))
        self.u = np.zeros((n, Kp, k, k))
        self.h = np.zeros((n, k))
        self.dW = np.zeros(n)
        nb = -(-n // BLOCK)
        self.pG = np.zeros((nb, Kp, k, k))
        self.pM = np.zeros((nb, Kp, k, k))
        self.pE = np.zeros((nb, k, ks))
        self.pS = np.zeros((nb, 2))
        self.s = -1

    def step(self, s, cancel=None):
        """Solve grid step s (in order 0, 1, ..., K); raises :class:`Cancelled` (state then
        unusable) when ``cancel`` is set between chunks of trajectories."""
        assert s == self.s + 1
        k, ks, n = self.k, self.ks, self.n
        _advance(s, self.dt, self.lam, self.R, self.b, self.G, self.kappa)
        _correlate(s, self.delta, self.Q0, self.M0, self.rho, self.R, self.b, self.MM, self.m,
                   self.C, self._P)
        self.zero_pivots += _chol_rows(s, ks, self.m, self.C, self.L, self._srow)
        r0 = ks + s * k
        self.z[:, r0:r0 + k] = self.rng.standard_normal((n, k))
        if self.tau > 0:
            self.dW[:] = math.sqrt(self.dt) * self.rng.standard_normal(n)
        nb = self.pG.shape[0]
        per_block = BLOCK * (s * s * k ** 3 + 8.0 * s * k * k + 64.0)
        chunk = max(1, int(CHUNK_WORK / per_block))
        for b0 in range(0, nb, chunk):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            _population_step(b0, min(nb, b0 + chunk), s, ks, self.code, self.v, self.dt,
                             self.delta, self.tau, self.L, self.R, self.z, self.hstar, self.y,
                             self.dW, self.dA, self.u, self.h, self.pG, self.pM, self.pE,
                             self.pS, self.mm_estimator == "raw")
        Grow = self.pG[:, : s + 1].sum(axis=0) / n
        Mrow = self.pM[:, : s + 1].sum(axis=0) / n
        if self.mm_estimator != "raw":
            Mrow[:s] *= self.dt / self.delta
            Mrow[s] *= (self.dt / self.delta) ** 2 + self.tau * self.dt / self.delta
        tot = self.pS.sum(axis=0)
        self.train[s] = tot[0] / n if tot[1] == 0 else np.nan
        self.G[s, : s + 1] = Grow
        self.MM[s, : s + 1] = Mrow
        self.MM[: s + 1, s] = np.swapaxes(Mrow, 1, 2)
        self.Elh[s] = self.pE.sum(axis=0) / n
        if self.kappa_mode == "full":
            mem = np.einsum("mab,mbc->ac", Grow, self.m[: s + 1])
        elif self.kappa_mode == "no_past":
            mem = Grow[s] @ self.m[s]
        else:
            mem = 0.0
        self.kappa[s] = (self.Elh[s] - mem) @ self.rho_inv
        self.s = s

    def overlaps(self, s):
        """(Q, M) at step s."""
        Q = self.C[s, s]
        return 0.5 * (Q + Q.T), self.m[s].copy()

    def finite(self, s, bound=1e10):
        Q, M = self.overlaps(s)
        ok = (math.isfinite(self.train[s]) and np.all(np.isfinite(Q)) and np.all(np.isfinite(M))
              and np.all(np.isfinite(self.kappa[s])))
        return bool(ok and np.abs(Q).max() < bound * max(1.0, np.abs(self.Q0).max(),
                                                         np.abs(self.rho).max()))

    def kernels(self, s=None):
        """Kernel blocks up to step s: t, C (s+1, s+1, k, k), R (lower blocks; NaN above),
        Gamma = G/dt below the diagonal (NaN on and above), Gamma_inst = G[s, s], kappa, b, m."""
        s = self.s if s is None else s
        sl = slice(0, s + 1)
        lower = np.tril(np.ones((s + 1, s + 1), dtype=bool))[:, :, None, None]
        strict = np.tril(np.ones((s + 1, s + 1), dtype=bool), -1)[:, :, None, None]
        idx = np.arange(s + 1)
        return dict(t=idx * self.dt, C=self.C[sl, sl].copy(),
                    R=np.where(lower, self.R[sl, sl], np.nan),
                    Gamma=np.where(strict, self.G[sl, sl] / self.dt, np.nan),
                    Gamma_inst=self.G[idx, idx].copy(), kappa=self.kappa[sl].copy(),
                    b=self.b[sl].copy(), m=self.m[sl].copy())


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------
def replica_plan(N, replicas=REPLICAS, divisor=REPLICA_DIVISOR, min_size=MIN_REPLICA):
    """Population sizes ``[N] + [n_rep] * replicas``; just ``[N]`` if ``replicas < 2``."""
    if replicas < 2:
        return [int(N)]
    n_rep = min(int(N), max(int(N) // divisor, min_size))
    return [int(N)] + [n_rep] * replicas


def check(exp):
    """ConfigError unless the experiment is a committee with a smooth activation."""
    from ..config import ConfigError

    exp.validate()
    if exp.model != "committee":
        raise ConfigError("model", "solver.dmft.committee needs model='committee'")
    if code_of(exp.activation) == RELU:
        raise ConfigError("activation", "the Monte Carlo DMFT needs a smooth activation (erf, "
                                        "tanh): relu'' has a delta mass the pathwise tangent "
                                        "cannot see; use method='online' or the simulator")


def _observables(exp, pops, s):
    from ..committee.observables import metrics

    Q = np.stack([p.overlaps(s)[0] for p in pops])
    M = np.stack([p.overlaps(s)[1] for p in pops])
    _, _, rho = exp.overlaps0()
    with np.errstate(all="ignore"):
        out = metrics(Q, M, rho, exp.second_layer(), exp.activation, exp.noise)
    out = {"train_loss": np.array([p.train[s] for p in pops]), **out}
    return out


def stream(exp, cancel=None, replicas: int = REPLICAS, divisor: int = REPLICA_DIVISOR,
           min_replica: int = MIN_REPLICA, kappa_mode: str = "full", mm_estimator: str = "raw",
           kernels: bool = True):
    """Monte Carlo DMFT of the committee (engine 'dmft-mc'): one Snapshot per recording step
    (every ``exp.record_every`` grid steps, and the last), yielded as soon as it is solved.

    Values (train_loss, test_loss = eg + noise^2/2, test_error = eg, m = tr(M)/k, Q = tr(Q)/k,
    cosine, Q_a_b, M_a_b; :func:`solver.committee.observables.metrics`) come from the population
    of ``exp.samples`` trajectories, standard errors from ``replicas`` smaller independent
    populations (:func:`replica_plan`). ``extras['kernels']`` (last snapshot, if ``kernels``):
    :meth:`Population.kernels`. Raises SolverError (after yielding what was computed) when the
    main population diverges; ConfigError for relu or a non-committee model."""
    from ..snapshot import Snapshot, SolverError

    check(exp)
    K = exp.steps
    sizes = replica_plan(exp.samples, replicas, divisor, min_replica)
    seqs = np.random.SeedSequence(exp.seed).spawn(len(sizes))
    pops = [Population(exp, n, sq, kappa_mode, mm_estimator) for n, sq in zip(sizes, seqs)]
    alive = np.ones(len(pops), dtype=bool)
    scale = math.sqrt(sizes[-1] / sizes[0]) if len(sizes) > 1 else math.nan
    for s in range(K + 1):
        for g, p in enumerate(pops):
            if cancel is not None and cancel.is_set():
                return
            if alive[g]:
                try:
                    p.step(s, cancel)
                except Cancelled:
                    return
                alive[g] = p.finite(s)
        if not alive[0]:
            raise SolverError(f"diverged at t={s * exp.dt:.4g} (grid step {s}): "
                              + ("lower tau or dt" if exp.tau > 0 else "lower dt"),
                              parameter="tau" if exp.tau > 0 else "dt")
        if not (s % exp.record_every == 0 or s == K):
            continue
        obs = _observables(exp, pops, s)
        values = {key: float(x[0]) for key, x in obs.items()}
        reps = np.flatnonzero(alive[1:]) + 1
        se = {}
        for key, x in obs.items():
            if len(reps) >= 2 and math.isfinite(values[key]):
                se[key] = float(np.std(x[reps], ddof=1) * scale)
            else:
                se[key] = math.nan
        t = s * exp.dt
        extras = {}
        if kernels and s == K:
            extras["kernels"] = pops[0].kernels(s)
        yield Snapshot(t=t, step=s, epochs=float(exp.epochs(t)), values=values, se=se,
                       extras=extras, engine=ENGINE, progress=s / K)


def solve(exp, cancel=None, callback=None, **kw):
    """Collect :func:`stream` into a Result (see :func:`solver.dmft.solve`)."""
    from ..snapshot import collect

    return collect(stream(exp, cancel, **kw), exp.to_dict(), ENGINE, cancel, callback)


run = solve
