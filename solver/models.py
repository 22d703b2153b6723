"""Losses and teachers of THEORY.md section 1 as numba-friendly functions of integer codes.

Loss codes: ``SQUARE`` l = (h-y)^2/2, ``LOGISTIC`` l = log(1+exp(-y h)). For each: ``l``, its
derivatives ``l'``, ``l''``, ``l'''`` in h (the DMFT needs up to ``l''``; the low-variance
response estimator of THEORY.md section 4 needs ``l'''``).
Teacher codes: ``LINEAR`` y = h* + sigma*eps, ``SIGN`` y = sign(h*) flipped with probability p.
"""
from __future__ import annotations

import math

from numba import njit

SQUARE, LOGISTIC = 0, 1
LINEAR, SIGN = 0, 1

LOSS_CODES = {"square": SQUARE, "logistic": LOGISTIC}
TEACHER_CODES = {"linear": LINEAR, "sign": SIGN}


@njit(cache=True, nogil=True, inline="always")
def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@njit(cache=True, nogil=True, inline="always")
def _softplus(x):
    """log(1 + exp(x)) without overflow."""
    if x > 0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


@njit(cache=True, nogil=True)
def loss_value(code, h, y):
    """Per-sample loss l(h, y)."""
    if code == SQUARE:
        return 0.5 * (h - y) * (h - y)
    return _softplus(-y * h)


@njit(cache=True, nogil=True)
def loss_d1(code, h, y):
    """l'(h, y) = dl/dh."""
    if code == SQUARE:
        return h - y
    return -y * _sigmoid(-y * h)


@njit(cache=True, nogil=True)
def loss_d2(code, h, y):
    """l''(h, y) (labels +-1 for the logistic loss)."""
    if code == SQUARE:
        return 1.0
    s = _sigmoid(y * h)
    return y * y * s * (1.0 - s)


@njit(cache=True, nogil=True)
def loss_d3(code, h, y):
    """l'''(h, y)."""
    if code == SQUARE:
        return 0.0
    s = _sigmoid(y * h)
    return y * y * y * s * (1.0 - s) * (1.0 - 2.0 * s)


@njit(cache=True, nogil=True)
def teacher_label(code, hstar, gauss, unif, noise, flip):
    """y = phi(h*, eps). ``gauss`` ~ N(0,1) drives the linear teacher's noise, ``unif`` ~ U(0,1)
    the sign teacher's flips; sign(0) = +1."""
    if code == LINEAR:
        return hstar + noise * gauss
    y = 1.0 if hstar >= 0 else -1.0
    if unif < flip:
        y = -y
    return y
