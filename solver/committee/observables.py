"""Gaussian averages and observables of the committee machine (THEORY.md sections 1 and 3).

A fresh input gives jointly Gaussian fields ``X = (omega_1..omega_k, h*_1..h*_k*)`` with
covariance ``Sigma = [[Q, M], [M^T, rho]]``. With ``c = (v/k, -1/k*, ..., -1/k*)`` the error of
the student is ``yhat - y_teacher = sum_j c_j sigma(X_j)``, so the generalisation error

    eg = E[(yhat - y_teacher)^2] / 2 = (1/2) sum_{i,j} c_i c_j F(Sigma_ii, Sigma_jj, Sigma_ij)

needs only the pair moment ``F(a, b, c) = E[sigma(u) sigma(w)]`` of a 2-D Gaussian
``(u, w) ~ N(0, [[a, c], [c, b]])``. :func:`pair_moments` also returns
``A = E[sigma''(u) sigma(w)]`` and ``B = E[sigma'(u) sigma'(w)]``, which by Stein's lemma give the
three-field averages of the online ODEs: ``E[x sigma'(u) sigma(w)] = C_xu A + C_xw B``.

Closed forms (derivations in docs/committee.md):

* erf(x/sqrt 2): ``F = (2/pi) arcsin(c / sqrt((1+a)(1+b)))``,
  ``B = (2/pi) / sqrt((1+a)(1+b) - c^2)``,
  ``A = -c B / (1+a)``.
* relu: with ``cos(th) = c / sqrt(ab)``: ``F = sqrt(ab) (sin th + (pi - th) cos th) / (2 pi)``
  (arc-cosine kernel), ``B = (pi - th) / (2 pi)``, ``A = sqrt(ab - c^2) / (2 pi a)`` (the delta
  mass of relu'' at 0). Zero where a or b is 0.
* tanh: 2-D trapezoid rule on the Cholesky factor, step scaled with the standard deviations.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .activations import ERF, RELU, code_of, sigma, sigma_d1, sigma_d2

#: Trapezoid rule for tanh pair moments: half-width (in standard deviations) and step per unit
#: scale. Measured error <= 1e-11 for variances 0.01..100 (docs/committee.md); Gauss-Hermite
#: with 64 nodes was 1e-3 off at variance 10.
TRAP_L = 8.5
TRAP_H = 0.3
_TINY = 1e-300


@njit(cache=True, nogil=True)
def pair_moments(code, a, b, c):
    """(F, A, B) = (E[s(u)s(w)], E[s''(u)s(w)], E[s'(u)s'(w)]) for (u, w) ~ N(0, [[a, c], [c, b]]).

    """
    if code == ERF:
        p = (1.0 + a) * (1.0 + b)
        r = c / math.sqrt(p)
        r = min(1.0, max(-1.0, r))
        F = (2.0 / math.pi) * math.asin(r)
        lam = max(p - c * c, 1.0)  # >= 1 + a + b for a PSD matrix
        B = (2.0 / math.pi) / math.sqrt(lam)
        A = -c * B / (1.0 + a)
        return F, A, B
    if code == RELU:
        if a <= _TINY or b <= _TINY:
            return 0.0, 0.0, 0.0
        sab = math.sqrt(a * b)
        cs = min(1.0, max(-1.0, c / sab))
        th = math.acos(cs)
        F = sab * (math.sin(th) + (math.pi - th) * cs) / (2.0 * math.pi)
        B = (math.pi - th) / (2.0 * math.pi)
        A = math.sqrt(max(a * b - c * c, 0.0)) / (2.0 * math.pi * a)
        return F, A, B
    # tanh (any smooth activation): trapezoid rule in (z1, z2), u = sa z1, w = r z1 + s z2. For an
    # integrand analytic in a strip of half-width ~ pi/(2 scale) the error falls like
    # exp(-2 pi^2 / (2 scale h)): a step h = TRAP_H / max(1, scale) per axis gives ~1e-11.
    sa = math.sqrt(max(a, 0.0))
    if sa > 0.0:
        r = c / sa
        s = math.sqrt(max(b - r * r, 0.0))
    else:
        r = 0.0
        s = math.sqrt(max(b, 0.0))
    n1 = int(math.ceil(TRAP_L * max(1.0, sa, abs(r)) / TRAP_H))
    n2 = int(math.ceil(TRAP_L * max(1.0, s) / TRAP_H))
    h1 = TRAP_L / n1
    h2 = TRAP_L / n2
    c1 = h1 / math.sqrt(2.0 * math.pi)
    c2 = h2 / math.sqrt(2.0 * math.pi)
    F = 0.0
    A = 0.0
    B = 0.0
    for i in range(-n1, n1 + 1):
        z1 = i * h1
        w1 = c1 * math.exp(-0.5 * z1 * z1)
        u = sa * z1
        f0 = 0.0
        f1 = 0.0
        for j in range(-n2, n2 + 1):
            z2 = j * h2
            w2 = c2 * math.exp(-0.5 * z2 * z2)
            w = r * z1 + s * z2
            f0 += w2 * sigma(code, w)
            f1 += w2 * sigma_d1(code, w)
        F += w1 * sigma(code, u) * f0
        A += w1 * sigma_d2(code, u) * f0
        B += w1 * sigma_d1(code, u) * f1
    return F, A, B


@njit(cache=True, nogil=True)
def pair_moments_many(code, a, b, c):
    """:func:`pair_moments` over flat arrays; returns (F, A, B) arrays."""
    n = a.shape[0]
    F = np.empty(n)
    A = np.empty(n)
    B = np.empty(n)
    for i in range(n):
        F[i], A[i], B[i] = pair_moments(code, a[i], b[i], c[i])
    return F, A, B


@njit(cache=True, nogil=True)
def pair_matrices(code, S):
    """Pair moments for all pairs of one covariance ``S`` (D x D): F, B symmetric, A[i, j] =
    E[sigma''(X_i) sigma(X_j)]."""
    D = S.shape[0]
    F = np.empty((D, D))
    A = np.empty((D, D))
    B = np.empty((D, D))
    for i in range(D):
        for j in range(D):
            if j < i:
                F[i, j] = F[j, i]
                B[i, j] = B[j, i]
                # A is not symmetric
                _, A[i, j], _ = pair_moments(code, S[i, i], S[j, j], S[i, j])
            else:
                F[i, j], A[i, j], B[i, j] = pair_moments(code, S[i, i], S[j, j], S[i, j])
    return F, A, B


def joint_cov(Q, M, rho):
    """Sigma = [[Q, M], [M^T, rho]] with broadcasting over leading (time) axes."""
    Q = np.asarray(Q, float)
    M = np.asarray(M, float)
    rho = np.asarray(rho, float)
    lead = np.broadcast_shapes(Q.shape[:-2], M.shape[:-2], rho.shape[:-2])
    k, ks = M.shape[-2], M.shape[-1]
    Q = np.broadcast_to(Q, lead + (k, k))
    M = np.broadcast_to(M, lead + (k, ks))
    rho = np.broadcast_to(rho, lead + (ks, ks))
    top = np.concatenate([Q, M], axis=-1)
    bot = np.concatenate([np.swapaxes(M, -1, -2), rho], axis=-1)
    return np.concatenate([top, bot], axis=-2)


def coefficients(v, kstar: int):
    """c = (v/k, -1/k*, ...): yhat - y_teacher = sum_j c_j sigma(X_j)."""
    v = np.asarray(v, float)
    return np.concatenate([v / v.size, -np.ones(kstar) / kstar])


def pair_F(Sigma, activation):
    """F[..., i, j] = E[sigma(X_i) sigma(X_j)] for covariances Sigma (..., D, D)."""
    code = code_of(activation)
    Sigma = np.asarray(Sigma, float)
    D = Sigma.shape[-1]
    flat = Sigma.reshape(-1, D, D)
    iu, ju = np.triu_indices(D)
    a = np.ascontiguousarray(flat[:, iu, iu].ravel())
    b = np.ascontiguousarray(flat[:, ju, ju].ravel())
    c = np.ascontiguousarray(flat[:, iu, ju].ravel())
    F, _, _ = pair_moments_many(code, a, b, c)
    out = np.empty(flat.shape)
    F = F.reshape(flat.shape[0], -1)
    out[:, iu, ju] = F
    out[:, ju, iu] = F
    return out.reshape(Sigma.shape)


def gen_error(Q, M, rho, v, activation):
    """eg = E[(yhat(omega) - y_teacher(h*))^2]/2 (no label noise), vectorised over leading axes.

    ``Q`` (..., k, k), ``M`` (..., k, k*), ``rho`` (..., k*, k*), ``v`` length k.
    """
    Sigma = joint_cov(Q, M, rho)
    ks = np.shape(M)[-1]
    cvec = coefficients(v, ks)
    F = pair_F(Sigma, activation)
    return 0.5 * np.einsum("i,...ij,j->...", cvec, F, cvec)


def overlap_values(Q, M, rho) -> dict:
    """m = tr(M)/k, Q = tr(Q)/k, cosine = tr(M)/sqrt(tr(Q) tr(rho)) (tr(M) sums M_aa for
    a < min(k, k*)), and every entry Q_a_b, M_a_b. Vectorised over leading axes."""
    Q = np.asarray(Q, float)
    M = np.asarray(M, float)
    rho = np.asarray(rho, float)
    k, ks = M.shape[-2], M.shape[-1]
    trQ = np.trace(Q, axis1=-2, axis2=-1)
    trM = np.trace(M, axis1=-2, axis2=-1)
    trR = np.trace(rho, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(trQ > 0, trM / np.sqrt(np.maximum(trQ, _TINY) * trR), 0.0)
    out = {"m": trM / k, "Q": trQ / k, "cosine": cos}
    for a in range(k):
        for b in range(k):
            out[f"Q_{a}_{b}"] = Q[..., a, b]
    for a in range(k):
        for b in range(ks):
            out[f"M_{a}_{b}"] = M[..., a, b]
    return out


def metrics(Q, M, rho, v, activation, noise: float = 0.0) -> dict:
    """Every committee observable from overlaps: test_error = eg, test_loss = eg + noise^2/2,
    m, Q, cosine, Q_a_b, M_a_b (see :func:`overlap_values`)."""
    eg = gen_error(Q, M, rho, v, activation)
    out = {"test_loss": eg + 0.5 * noise ** 2, "test_error": eg}
    out.update(overlap_values(Q, M, rho))
    return out
