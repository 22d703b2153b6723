"""Online (delta -> infinity) ODEs of the committee machine: THEORY.md section 5.3 in matrix form.

With ``X = (omega, h*) ~ N(0, Sigma)``, ``Sigma = [[Q, M], [M^T, rho]]`` and
``l'_a = (yhat - y) v_a sigma'(omega_a) / k``:

    dM/dt = -lam M - E[l' h*^T],
    dQ/dt = -2 lam Q - E[l' omega^T] - E[omega l'^T] + tau E[l' l'^T].

These are the online-SGD equations of Saad & Solla (1995) with learning rate ``tau`` in SGF time
``t = steps*eta/d`` (Saad-Solla time ``alpha = steps/d = t/tau`` for batch 1).

Gaussian averages (derivations in docs/committee.md):

* ``E[l' X^T]`` (drift): Stein's lemma on the linear factor reduces every term to pair moments,
  ``E[X_l sigma'(X_a) sigma(X_j)] = Sigma_la A_aj + Sigma_lj B_aj``
  (:func:`.observables.pair_moments`):
  closed form for erf and relu, 2-D trapezoid rule for tanh. For erf this is Saad & Solla's I3.
* ``E[l' l'^T]`` (noise, needs ``E[sigma'(u) sigma'(v) sigma(w) sigma(z)]``): closed form for erf
  (Saad & Solla's I4, :func:`i4_erf`); for relu and tanh a randomised quasi-Monte Carlo average
  (scrambled Sobol points, fixed for the whole run, 2^qmc_log2 of them) over the (k+k*)-dim
  Gaussian; for relu the average along one random direction is done exactly
  (:func:`_noise_relu_line`), which keeps the right-hand side continuous. Measured error of
  that term (relative 3e-4..1e-3 at 2^14 points; < 1e-5 on trajectories): docs/committee.md. Label noise adds
  ``noise^2 E[sigma'(omega_a) sigma'(omega_b)]``, exactly.

Integrators: ``'euler'`` on the grid ``dt`` of the DMFT scheme; ``'rk4'`` on the same grid
(O(dt^4)); ``'ivp'`` (adaptive DOP853, ``rtol``/``atol``) read off at the recording times. The
last two approximate the continuous-time limit.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit

from ..snapshot import Result, Snapshot, SolverError, collect
from .activations import ERF, RELU, code_of, sigma, sigma_d1
from .observables import coefficients, joint_cov, metrics, pair_matrices

ENGINE = "dmft-online"
QMC_LOG2 = 14
#: |Q| beyond this counts as diverged
BLOWUP = 1e30


@njit(cache=True, nogil=True)
def i3_erf(C11, C12, C13, C23, C33):
    """Saad-Solla I3 = E[g'(u) v g(w)] for g = erf(x/sqrt 2); C = Cov(u, v, w)."""
    lam3 = (1.0 + C11) * (1.0 + C33) - C13 * C13
    return (2.0 / math.pi) / math.sqrt(lam3) * (C23 * (1.0 + C11) - C12 * C13) / (1.0 + C11)


@njit(cache=True, nogil=True)
def i4_erf(C11, C12, C13, C14, C22, C23, C24, C33, C34, C44):
    """Saad-Solla I4 = E[g'(u) g'(v) g(w) g(z)] for g = erf(x/sqrt 2); C = Cov(u, v, w, z)."""
    lam4 = (1.0 + C11) * (1.0 + C22) - C12 * C12
    lam0 = (lam4 * C34 - C23 * C24 * (1.0 + C11) - C13 * C14 * (1.0 + C22)
            + C12 * C13 * C24 + C12 * C14 * C23)
    lam1 = (lam4 * (1.0 + C33) - C23 * C23 * (1.0 + C11) - C13 * C13 * (1.0 + C22)
            + 2.0 * C12 * C13 * C23)
    lam2 = (lam4 * (1.0 + C44) - C24 * C24 * (1.0 + C11) - C14 * C14 * (1.0 + C22)
            + 2.0 * C12 * C14 * C24)
    r = lam0 / math.sqrt(lam1 * lam2)
    r = min(1.0, max(-1.0, r))
    return (4.0 / (math.pi * math.pi)) / math.sqrt(lam4) * math.asin(r)


@njit(cache=True, nogil=True)
def _drift(code, S, k, cvec, v):
    """G = E[l' X^T] (k x D) and the pair matrices F, B of S."""
    D = S.shape[0]
    F, A, B = pair_matrices(code, S)
    G = np.zeros((k, D))
    for a in range(k):
        P = 0.0
        for j in range(D):
            P += cvec[j] * A[a, j]
        for l in range(D):
            s = P * S[a, l]
            for j in range(D):
                s += cvec[j] * B[a, j] * S[j, l]
            G[a, l] = v[a] / k * s
    return G, F, B


@njit(cache=True, nogil=True)
def _noise_erf(S, k, cvec, v, B, noise):
    """E[l' l'^T] for erf from I4 (closed form)."""
    D = S.shape[0]
    E = np.zeros((k, k))
    for a in range(k):
        for b in range(a, k):
            s = 0.0
            for j in range(D):
                for jp in range(j, D):
                    t = i4_erf(S[a, a], S[a, b], S[a, j], S[a, jp], S[b, b], S[b, j], S[b, jp],
                               S[j, j], S[j, jp], S[jp, jp])
                    s += (1.0 if j == jp else 2.0) * cvec[j] * cvec[jp] * t
            E[a, b] = v[a] * v[b] / (k * k) * (s + noise * noise * B[a, b])
            E[b, a] = E[a, b]
    return E


@njit(cache=True, nogil=True)
def _sqrtm_psd(S):
    """L with L L^T = S for a positive semi-definite S (eigen-decomposition; tolerant of zero
    eigenvalues, e.g. Q = 0 at t = 0)."""
    w, V = np.linalg.eigh(S)
    D = S.shape[0]
    L = np.empty((D, D))
    for j in range(D):
        r = math.sqrt(max(w[j], 0.0))
        for i in range(D):
            L[i, j] = V[i, j] * r
    return L


@njit(cache=True, nogil=True)
def _noise_qmc(code, S, k, cvec, v, B, noise, Z):
    """E[l' l'^T] by quasi-Monte Carlo: X = L z over the fixed points Z (N x D)."""
    D = S.shape[0]
    L = _sqrtm_psd(S)
    N = Z.shape[0]
    acc = np.zeros((k, k))
    x = np.empty(D)
    d1 = np.empty(k)
    for n in range(N):
        for i in range(D):
            s = 0.0
            for j in range(D):
                s += L[i, j] * Z[n, j]
            x[i] = s
        e = 0.0
        for j in range(D):
            e += cvec[j] * sigma(code, x[j])
        e2 = e * e
        for a in range(k):
            d1[a] = sigma_d1(code, x[a])
        for a in range(k):
            for b in range(a, k):
                acc[a, b] += d1[a] * d1[b] * e2
    E = np.zeros((k, k))
    for a in range(k):
        for b in range(a, k):
            E[a, b] = v[a] * v[b] / (k * k) * (acc[a, b] / N + noise * noise * B[a, b])
            E[b, a] = E[a, b]
    return E


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, nogil=True)
def _noise_relu_line(S, k, cvec, v, B, noise, Z, Rot):
    """E[l' l'^T] for relu: quasi-Monte Carlo over D-1 Gaussian directions, exact integral along
    the remaining one.

    With ``X = L Rot z`` split as ``X = p + q z_1`` (``q = (L Rot)[:, 0]``, ``p`` from the QMC
    point),
    the integrand ``1(X_a > 0) 1(X_b > 0) (sum_j c_j relu(X_j))^2`` is, between the break points
    ``z_1 = -p_j/q_j``, a quadratic in ``z_1`` times fixed indicators; its integral against the
    normal density is closed form. The estimate is continuous in ``Sigma`` (plain QMC of the
    indicators is not), which adaptive integrators need, and far less noisy."""
    D = S.shape[0]
    LR = _sqrtm_psd(S) @ Rot
    N = Z.shape[0]
    q = LR[:, 0].copy()
    p = np.empty(D)
    tb = np.empty(D + 2)
    act = np.zeros(D, dtype=np.bool_)
    acc = np.zeros((k, k))
    for n in range(N):
        for i in range(D):
            s = 0.0
            for j in range(1, D):
                s += LR[i, j] * Z[n, j - 1]
            p[i] = s
        # break points, sorted (insertion sort; D is small)
        nb = 0
        for i in range(D):
            if q[i] != 0.0:
                t = -p[i] / q[i]
                m = nb
                while m > 0 and tb[m - 1] > t:
                    tb[m] = tb[m - 1]
                    m -= 1
                tb[m] = t
                nb += 1
        lo = -np.inf
        for seg in range(nb + 1):
            hi = tb[seg] if seg < nb else np.inf
            if hi <= lo:
                continue
            if lo == -np.inf and hi == np.inf:
                mid = 0.0
            elif lo == -np.inf:
                mid = hi - 1.0
            elif hi == np.inf:
                mid = lo + 1.0
            else:
                mid = 0.5 * (lo + hi)
            al = 0.0
            be = 0.0
            for j in range(D):
                act[j] = p[j] + q[j] * mid > 0.0
                if act[j]:
                    al += cvec[j] * p[j]
                    be += cvec[j] * q[j]
            # int_lo^hi z^m phi(z) dz, m = 0, 1, 2
            Plo = 0.0 if lo == -np.inf else 0.5 * math.erfc(-lo / math.sqrt(2.0))
            Phi = 1.0 if hi == np.inf else 0.5 * math.erfc(-hi / math.sqrt(2.0))
            plo = 0.0 if lo == -np.inf else _INV_SQRT_2PI * math.exp(-0.5 * lo * lo)
            phi = 0.0 if hi == np.inf else _INV_SQRT_2PI * math.exp(-0.5 * hi * hi)
            lplo = 0.0 if lo == -np.inf else lo * plo
            hphi = 0.0 if hi == np.inf else hi * phi
            I0 = Phi - Plo
            I1 = plo - phi
            I2 = I0 + lplo - hphi
            val = al * al * I0 + 2.0 * al * be * I1 + be * be * I2
            for a in range(k):
                if act[a]:
                    for b in range(a, k):
                        if act[b]:
                            acc[a, b] += val
            lo = hi
    E = np.zeros((k, k))
    for a in range(k):
        for b in range(a, k):
            E[a, b] = v[a] * v[b] / (k * k) * (acc[a, b] / N + noise * noise * B[a, b])
            E[b, a] = E[a, b]
    return E


@njit(cache=True, nogil=True)
def _rhs(code, Q, M, rho, v, lam, tau, noise, Z, Rot, use_qmc):
    k = Q.shape[0]
    ks = rho.shape[0]
    D = k + ks
    S = np.empty((D, D))
    S[:k, :k] = Q
    S[:k, k:] = M
    S[k:, :k] = M.T
    S[k:, k:] = rho
    cvec = np.empty(D)
    for a in range(k):
        cvec[a] = v[a] / k
    for b in range(ks):
        cvec[k + b] = -1.0 / ks
    G, F, B = _drift(code, S, k, cvec, v)
    dM = -lam * M - G[:, k:]
    dQ = -2.0 * lam * Q - G[:, :k] - G[:, :k].T
    if tau != 0.0:
        if code == RELU:
            E = _noise_relu_line(S, k, cvec, v, B, noise, Z, Rot)
        elif use_qmc:
            E = _noise_qmc(code, S, k, cvec, v, B, noise, Z)
        else:
            E = _noise_erf(S, k, cvec, v, B, noise)
        dQ = dQ + tau * E
    return dQ, dM


def qmc_normals(D: int, log2: int = QMC_LOG2, seed: int = 0):
    """2^log2 scrambled-Sobol points mapped to N(0, I_D) (fixed for a run: common random
    numbers)."""
    from scipy.special import ndtri
    from scipy.stats import qmc

    U = qmc.Sobol(D, scramble=True, seed=seed).random_base2(log2)
    U = np.clip(U, 1e-16, 1.0 - 1e-16)
    return np.ascontiguousarray(ndtri(U))


def qmc_setup(code: int, D: int, log2: int = QMC_LOG2, seed: int = 0):
    """(Z, Rot) for the noise term: relu uses D-1 QMC directions plus an exact line integral
    along the first column of the random rotation ``Rot``; tanh uses D QMC directions."""
    rng = np.random.default_rng([seed, 7])
    Rot, r = np.linalg.qr(rng.standard_normal((D, D)))
    Rot = np.ascontiguousarray(Rot * np.sign(np.diag(r)))
    if code == ERF:
        return np.zeros((1, D)), Rot
    if code == RELU:
        return qmc_normals(D - 1, log2, seed), Rot
    return qmc_normals(D, log2, seed), Rot


class _Problem:
    """Everything the right-hand side needs, fixed for one run."""

    def __init__(self, exp, qmc_log2=QMC_LOG2, qmc_seed=None):
        self.code = code_of(exp.activation)
        _, _, rho = exp.overlaps0()
        self.rho = np.ascontiguousarray(rho, dtype=float)
        self.v = np.ascontiguousarray(exp.second_layer(), dtype=float)
        self.lam, self.tau, self.noise = float(exp.lam), float(exp.tau), float(exp.noise)
        self.k, self.ks = exp.k, exp.kstar
        self.use_qmc = self.code != ERF
        D = self.k + self.ks
        self.Z, self.Rot = qmc_setup(self.code, D, qmc_log2,
                                     exp.seed if qmc_seed is None else qmc_seed)

    def rhs(self, Q, M):
        return _rhs(self.code, np.ascontiguousarray(Q), np.ascontiguousarray(M), self.rho, self.v,
                    self.lam, self.tau, self.noise, self.Z, self.Rot, self.use_qmc)

    def flat_rhs(self, t, y):
        k, ks = self.k, self.ks
        Q = y[:k * k].reshape(k, k)
        M = y[k * k:].reshape(k, ks)
        dQ, dM = self.rhs(Q, M)
        return np.concatenate([dQ.ravel(), dM.ravel()])


def expectations(Q, M, rho, v, activation, noise=0.0, qmc_log2=QMC_LOG2, qmc_seed=0,
                 closed_form=True):
    """The three Gaussian averages of the ODEs: ``E[l' h*^T]`` (k x k*), ``E[l' omega^T]`` (k x k),
    ``E[l' l'^T]`` (k x k) for (omega, h*) ~ N(0, [[Q, M], [M^T, rho]]).

    ``closed_form=False`` forces the quasi-Monte Carlo path for ``E[l' l'^T]`` also for erf (to
    cross-check the I4 closed form)."""
    code = code_of(activation)
    Q, M, rho = (np.ascontiguousarray(np.atleast_2d(np.asarray(A, float))) for A in (Q, M, rho))
    v = np.ascontiguousarray(v, dtype=float)
    k, ks = M.shape
    S = joint_cov(Q, M, rho)
    cvec = coefficients(v, ks)
    G, F, B = _drift(code, S, k, cvec, v)
    if code == ERF and closed_form:
        E = _noise_erf(S, k, cvec, v, B, float(noise))
    elif code == RELU:
        Z, Rot = qmc_setup(code, k + ks, qmc_log2, qmc_seed)
        E = _noise_relu_line(S, k, cvec, v, B, float(noise), Z, Rot)
    else:
        Z = qmc_normals(k + ks, qmc_log2, qmc_seed)
        E = _noise_qmc(code, S, k, cvec, v, B, float(noise), Z)
    return {"lh": G[:, k:], "lw": G[:, :k], "ll": E}


def _record_steps(exp):
    K = exp.steps
    rec = list(range(0, K + 1, exp.record_every))
    if rec[-1] != K:
        rec.append(K)
    return K, rec


def _snapshot(exp, prob, Q, M, step, K, t):
    vals = metrics(Q, M, prob.rho, prob.v, prob.code, prob.noise)
    vals = {k: float(x) for k, x in vals.items()}
    vals = {"train_loss": vals["test_loss"], **vals}
    return Snapshot(t=float(t), step=int(step), epochs=float(exp.epochs(t)), values=vals,
                    se={k: 0.0 for k in vals}, engine=ENGINE, progress=step / K)


def _grid_step(prob, Q, M, dt, method):
    """One step of explicit Euler or classical Runge-Kutta 4 on the grid."""
    dQ, dM = prob.rhs(Q, M)
    if method == "euler":
        Q, M = Q + dt * dQ, M + dt * dM
    else:
        dQ2, dM2 = prob.rhs(Q + 0.5 * dt * dQ, M + 0.5 * dt * dM)
        dQ3, dM3 = prob.rhs(Q + 0.5 * dt * dQ2, M + 0.5 * dt * dM2)
        dQ4, dM4 = prob.rhs(Q + dt * dQ3, M + dt * dM3)
        Q = Q + dt / 6.0 * (dQ + 2.0 * dQ2 + 2.0 * dQ3 + dQ4)
        M = M + dt / 6.0 * (dM + 2.0 * dM2 + 2.0 * dM3 + dM4)
    return 0.5 * (Q + Q.T), M


def _bad(Q, M):
    return not (np.all(np.isfinite(Q)) and np.all(np.isfinite(M))) or np.abs(Q).max() > BLOWUP


def stream(exp, cancel: threading.Event | None = None, integrator: str = "euler",
           qmc_log2: int = QMC_LOG2, rtol: float = 1e-7, atol: float = 1e-10):
    """Yield one Snapshot (engine 'dmft-online', se 0) per recording time of the online ODEs.

    ``integrator='euler'``: explicit Euler on the grid ``exp.dt`` (as the DMFT scheme);
    ``'rk4'``: classical Runge-Kutta on the same grid (4 right-hand sides per step, error
    O(dt^4)); ``'ivp'``: adaptive DOP853 (``rtol``, ``atol``) read off at the same times (fine for
    erf and tanh; for relu the quasi-Monte Carlo right-hand side has tiny kinks that make it
    crawl at tight tolerances: use 'rk4'). ``train_loss`` equals ``test_loss`` (online limit),
    ``test_error`` is the generalisation error eg. Raises SolverError on divergence.
    """
    if exp.model != "committee":
        raise ValueError("solver.committee.online needs exp.model == 'committee'")
    exp.validate()
    prob = _Problem(exp, qmc_log2)
    Q0, M0, _ = exp.overlaps0()
    Q = np.array(Q0, float)
    M = np.array(M0, float)
    K, rec = _record_steps(exp)
    dt = exp.dt
    yield _snapshot(exp, prob, Q, M, 0, K, 0.0)
    if integrator in ("euler", "rk4"):
        j = 0
        for r in rec[1:]:
            while j < r:
                if cancel is not None and cancel.is_set():
                    return
                Q, M = _grid_step(prob, Q, M, dt, integrator)
                j += 1
                if _bad(Q, M):
                    raise SolverError(f"diverged at t={j * dt:.4g}: lower tau or dt",
                                      parameter="tau")
            yield _snapshot(exp, prob, Q, M, r, K, r * dt)
    elif integrator == "ivp":
        from scipy.integrate import DOP853

        k = exp.k
        y0 = np.concatenate([Q.ravel(), M.ravel()])
        T_end = K * dt
        sol = DOP853(prob.flat_rhs, 0.0, y0, T_end, rtol=rtol, atol=atol)
        i = 1
        while i < len(rec):
            if cancel is not None and cancel.is_set():
                return
            msg = sol.step()
            if sol.status == "failed" or not np.all(np.isfinite(sol.y)):
                raise SolverError(f"diverged at t={sol.t:.4g}: lower tau ({msg})", parameter="tau")
            dense = sol.dense_output()
            while i < len(rec) and rec[i] * dt <= sol.t + 1e-12 * max(1.0, T_end):
                t = min(rec[i] * dt, sol.t)
                y = dense(t)
                Qi = y[:k * k].reshape(k, k)
                Mi = y[k * k:].reshape(k, exp.kstar)
                if _bad(Qi, Mi):
                    raise SolverError(f"diverged at t={t:.4g}: lower tau", parameter="tau")
                yield _snapshot(exp, prob, 0.5 * (Qi + Qi.T), Mi, rec[i], K, rec[i] * dt)
                i += 1
            if sol.status == "finished" and i < len(rec):
                y = sol.y
                Qi = y[:k * k].reshape(k, k)
                Mi = y[k * k:].reshape(k, exp.kstar)
                for r in rec[i:]:
                    yield _snapshot(exp, prob, 0.5 * (Qi + Qi.T), Mi, r, K, r * dt)
                break
    else:
        raise ValueError(f"integrator must be 'euler', 'rk4' or 'ivp', got {integrator!r}")


def run(exp, cancel=None, callback=None, **kw) -> Result:
    """Collect :func:`stream` into a Result (callback(snapshot) after each)."""
    return collect(stream(exp, cancel, **kw), exp.to_dict(), ENGINE, cancel, callback)


solve = run
