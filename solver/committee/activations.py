"""Activations of the committee machine by integer code, as numba functions.

``ERF``: sigma(x) = erf(x/sqrt 2) (Saad & Solla's g), ``RELU``: max(x, 0), ``TANH``: tanh(x).
For each: ``sigma``, ``sigma_d1`` = sigma', ``sigma_d2`` = sigma''. For relu, sigma'(0) = 0 and
``sigma_d2`` is 0 pointwise: its delta mass at 0 is handled analytically in Gaussian averages
(:mod:`solver.committee.observables`).
"""
from __future__ import annotations

import math

from numba import njit

ERF, RELU, TANH = 0, 1, 2
ACTIVATION_CODES = {"erf": ERF, "relu": RELU, "tanh": TANH}

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def code_of(activation) -> int:
    """Integer code of an activation name (codes pass through)."""
    if isinstance(activation, str):
        try:
            return ACTIVATION_CODES[activation]
        except KeyError:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, "
                             f"got {activation!r}") from None
    return int(activation)


@njit(cache=True, nogil=True)
def sigma(code, x):
    """sigma(x)."""
    if code == ERF:
        return math.erf(x * _INV_SQRT2)
    if code == RELU:
        return x if x > 0.0 else 0.0
    return math.tanh(x)


@njit(cache=True, nogil=True)
def sigma_d1(code, x):
    """sigma'(x) (relu: 1 for x > 0, else 0)."""
    if code == ERF:
        return _SQRT_2_OVER_PI * math.exp(-0.5 * x * x)
    if code == RELU:
        return 1.0 if x > 0.0 else 0.0
    t = math.tanh(x)
    return 1.0 - t * t


@njit(cache=True, nogil=True)
def sigma_d2(code, x):
    """sigma''(x) pointwise (relu: 0; its delta at 0 is not representable pointwise)."""
    if code == ERF:
        return -x * _SQRT_2_OVER_PI * math.exp(-0.5 * x * x)
    if code == RELU:
        return 0.0
    t = math.tanh(x)
    return -2.0 * t * (1.0 - t * t)
