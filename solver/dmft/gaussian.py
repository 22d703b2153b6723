"""Incremental conditional Gaussian sampling: a Cholesky factor grown one row at a time.

The Monte Carlo DMFT (THEORY.md section 4) draws, at step ``k``, the Gaussian field ``omega_k``
of every trajectory conditionally on what that trajectory already holds, ``(h*, omega_0 ..
omega_{k-1})``. With the joint covariance ``S`` of ``x = (h*, omega_0, omega_1, ...)`` and its
lower Cholesky factor ``S = L L^T``, each trajectory carries i.i.d. standard normals ``z`` with
``x = L z``. Appending a variable appends a row to ``L``:

    L[r, :r] = solve(L[:r, :r], S[r, :r]),   pivot = S[r, r] - |L[r, :r]|^2,
    L[r, r]  = sqrt(pivot)

and the new variable of a trajectory is ``x_r = L[r, :r] . z[:r] + L[r, r] z_r``: exactly its
conditional law given the earlier ones (conditional mean ``L[r, :r] . z[:r]``, conditional
variance ``pivot``).

Zero-pivot guard. ``S`` is often singular or nearly so: ``q0 = 0`` makes ``omega_0 = 0``, and at
``tau = 0`` the ``omega`` process lives in a space of small dimension (only a handful of pivots
stay positive). A pivot below ``rel_tol * S[r, r]`` (or below ``abs_tol``) is set to exactly zero:
the new variable is then a deterministic linear function of the earlier ones, its column of
``L`` is zero, and later forward substitutions skip it (``x`` component set to 0). Dropping a
conditional variance of relative size ``< rel_tol`` changes the law by less than that; keeping
it would divide later rows by roundoff.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Relative pivot threshold: a conditional variance below REL_TOL * (marginal variance) is zero.
REL_TOL = 1e-10
#: Absolute pivot threshold (variances are O(1) in this project).
ABS_TOL = 1e-280


@njit(cache=True, nogil=True)
def chol_append(L, r, s_row, s_diag, rel_tol=REL_TOL, abs_tol=ABS_TOL):
    """Fill row ``r`` of the lower factor ``L`` (rows ``< r`` already filled) for a new variable
    with covariances ``s_row[:r]`` with the earlier ones and variance ``s_diag``.

    Returns the (guarded) pivot, the conditional variance of the new variable; ``L[r, r+1:]``
    is left untouched (keep it zero). Zero-pivot columns of earlier rows are skipped."""
    for i in range(r):
        d = L[i, i]
        if d > 0.0:
            acc = s_row[i]
            for j in range(i):
                acc -= L[r, j] * L[i, j]
            L[r, i] = acc / d
        else:
            L[r, i] = 0.0
    piv = s_diag
    for j in range(r):
        piv -= L[r, j] * L[r, j]
    if not (piv > rel_tol * abs(s_diag)) or piv <= abs_tol:
        piv = 0.0
        L[r, r] = 0.0
    else:
        L[r, r] = math.sqrt(piv)
    return piv


class IncrementalGaussian:
    """A Gaussian vector revealed one coordinate at a time (Python handle on :func:`chol_append`).

    >>> g = IncrementalGaussian(capacity=3)
    >>> g.append([], 2.0)            # x0 ~ N(0, 2)
    2.0
    >>> g.append([2.0], 2.0)         # x1 = x0 exactly: zero pivot
    0.0
    """

    def __init__(self, capacity: int, rel_tol: float = REL_TOL):
        self.L = np.zeros((capacity, capacity))
        self.size = 0
        self.rel_tol = rel_tol

    def append(self, cov_with_previous, var) -> float:
        """Append a variable (covariances with the earlier ones, variance); returns the pivot."""
        r = self.size
        if r >= self.L.shape[0]:
            raise IndexError("IncrementalGaussian is full")
        s = np.zeros(max(r, 1))
        s[:r] = np.asarray(cov_with_previous, float)[:r]
        piv = chol_append(self.L, r, s, float(var), self.rel_tol, ABS_TOL)
        self.size += 1
        return piv

    def row(self, r: int) -> np.ndarray:
        return self.L[r, : r + 1]

    def sample(self, z: np.ndarray) -> np.ndarray:
        """x = L z for standard normals ``z`` of shape (..., size)."""
        n = self.size
        return z[..., :n] @ self.L[:n, :n].T
