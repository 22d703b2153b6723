"""Test loss and test error from the overlaps (THEORY.md section 3, "Observables").

A fresh sample has ``(omega, h*) ~ N(0, [[Q, m], [m, rho]])`` with no memory term, so the test
loss ``E[l(omega, phi(h*, eps))]`` and the classification error ``P(sign(omega) != y)`` are
functions of ``(m, Q)`` alone. Closed forms where they exist, Gauss quadrature otherwise.
Vectorised over arrays of (m, Q).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import roots_hermitenorm, roots_legendre

from .models import LINEAR, LOGISTIC, LOSS_CODES, SIGN, SQUARE, TEACHER_CODES


@lru_cache(maxsize=8)
def gauss_hermite(n: int = 64):
    """Nodes and weights with sum(w*f(x)) ~= E[f(z)], z ~ N(0, 1)."""
    x, w = roots_hermitenorm(n)
    return x, w / w.sum()


@lru_cache(maxsize=8)
def half_normal(n: int = 96, upper: float = 9.0):
    """Nodes and weights with sum(w*f(x)) ~= E[f(|z|)], z ~ N(0, 1): Gauss-Legendre on
    [0, upper] against the half-normal density (Hermite nodes would straddle the kink of |z|)."""
    x, w = roots_legendre(n)
    x = 0.5 * upper * (x + 1.0)
    w = 0.5 * upper * w * np.sqrt(2.0 / np.pi) * np.exp(-0.5 * x * x)
    return x, w / w.sum()


def _split(m, Q, rho):
    """h* = sqrt(rho) z1, omega = a z1 + b z2 with a = m/sqrt(rho), b = sqrt(Q - m^2/rho)."""
    a = m / np.sqrt(rho)
    b = np.sqrt(np.maximum(Q - a * a, 0.0))
    return a, b


def test_error(m, Q, rho, flip=0.0):
    """P(sign(omega) != y) for the sign teacher with flips p: p + (1-2p) arccos(cos)/pi."""
    m = np.asarray(m, float)
    Q = np.asarray(Q, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(Q > 0, m / np.sqrt(np.maximum(Q, 1e-300) * rho), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    return flip + (1.0 - 2.0 * flip) * np.arccos(cos) / np.pi


def test_loss(m, Q, *, loss, teacher, rho=1.0, noise=0.0, flip=0.0):
    """E[l(omega, y)] for a fresh sample; ``loss``/``teacher`` are names or codes."""
    lc = LOSS_CODES.get(loss, loss)
    tc = TEACHER_CODES.get(teacher, teacher)
    m = np.asarray(m, float)
    Q = np.asarray(Q, float)
    if lc == SQUARE and tc == LINEAR:
        return 0.5 * (Q - 2.0 * m + rho + noise ** 2)
    if lc == SQUARE and tc == SIGN:
        # E[omega y] = (1-2p) E[omega sign h*] = (1-2p) sqrt(2/pi) m / sqrt(rho)
        return 0.5 * (Q - 2.0 * (1 - 2 * flip) * np.sqrt(2 / np.pi) * m / np.sqrt(rho) + 1.0)
    if lc == LOGISTIC and tc == SIGN:
        # y omega = s (a|z1| + b z2') with s = -1 w.p. p, z2' = sign(z1) z2 ~ N(0,1) indep. of |z1|
        a, b = _split(m, Q, rho)
        u, wu = half_normal()
        z, wz = gauss_hermite()
        arg = a[..., None, None] * u[:, None] + b[..., None, None] * z[None, :]
        W = wu[:, None] * wz[None, :]
        right = np.sum(W * np.logaddexp(0.0, -arg), axis=(-2, -1))
        if flip == 0:  # the flipped-label term has weight 0 (and costs as much as the other)
            return right
        wrong = np.sum(W * np.logaddexp(0.0, arg), axis=(-2, -1))
        return (1 - flip) * right + flip * wrong
    raise ValueError(f"loss={loss!r} with teacher={teacher!r} is not supported")


def metrics(m, Q, exp) -> dict:
    """Test loss, test error (NaN for regression) and cosine m/sqrt(Q rho) for an Experiment."""
    m = np.asarray(m, float)
    Q = np.asarray(Q, float)
    out = {"test_loss": test_loss(m, Q, loss=exp.loss, teacher=exp.teacher, rho=exp.rho,
                                  noise=exp.noise, flip=exp.flip)}
    if exp.teacher == "sign":
        out["test_error"] = test_error(m, Q, exp.rho, exp.flip)
    else:
        out["test_error"] = np.full(np.shape(m), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["cosine"] = np.where(Q > 0, m / np.sqrt(np.maximum(Q, 1e-300) * exp.rho), 0.0)
    return out
