"""Draw one finite-size data set of THEORY.md section 1 (GLM, width k = 1).

Seed ``s`` of an experiment uses ``rng = np.random.default_rng(exp.seed + s)`` and draws, in this
order: the design ``X`` (n x d, entries N(0, 1/d)), the teacher ``theta_star`` (entries
N(0, rho)), the label noise (one N(0,1) and one U(0,1) per sample, fed to
:func:`solver.models.teacher_label`), and the initial student
``theta0 = (m0/rho) theta_star + sqrt(q0 - m0^2/rho) z`` with ``z`` ~ N(0, I_d), so that
``E[theta0_i^2] = q0`` and ``E[theta0_i theta_star_i] = m0``. The dynamics' own noise (SGF Brownian
increments, SGD batches) comes from separate streams, :func:`noise_rngs`, so the same data set
can be replayed under independent noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..models import TEACHER_CODES, teacher_label

#: Rows of X drawn per block (the draw checks ``cancel`` between blocks).
_BLOCK_ENTRIES = 1 << 20


@dataclass
class Dataset:
    """One data set: ``X`` (n, d) C-contiguous, ``theta_star`` (d,), ``hstar = X theta_star`` (n,),
    labels ``y`` (n,), initial student ``theta0`` (d,)."""

    X: np.ndarray
    theta_star: np.ndarray
    hstar: np.ndarray
    y: np.ndarray
    theta0: np.ndarray

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]


@njit(cache=True, nogil=True)
def _labels(code, hstar, gauss, unif, noise, flip, out):
    for mu in range(hstar.shape[0]):
        out[mu] = teacher_label(code, hstar[mu], gauss[mu], unif[mu], noise, flip)
    return out


def data_rng(exp, s: int) -> np.random.Generator:
    """The generator of seed ``s``'s data set."""
    return np.random.default_rng(exp.seed + s)


def noise_rngs(exp, s: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The two generators of seed ``s``'s dynamics noise (independent child streams of the same
    seed): SGF rows [0, n1) draw from the first, rows [n1, n) from the second (so that the two
    halves can run in two threads); SGD batches use the first."""
    ss = np.random.SeedSequence(exp.seed + s).spawn(2)
    return np.random.default_rng(ss[0]), np.random.default_rng(ss[1])


def draw(exp, s: int = 0, cancel=None) -> Dataset | None:
    """Data set of seed ``s`` for ``exp`` (n = exp.n, d = exp.d); ``None`` if ``cancel`` got set."""
    rng = data_rng(exp, s)
    n, d = exp.n, exp.d
    X = np.empty((n, d))
    rows = max(1, _BLOCK_ENTRIES // d)
    scale = 1.0 / math.sqrt(d)
    for r0 in range(0, n, rows):
        if cancel is not None and cancel.is_set():
            return None
        blk = X[r0:r0 + rows]
        rng.standard_normal(out=blk)  # filling in blocks draws the same stream as one call
        blk *= scale
    theta_star = rng.standard_normal(d) * math.sqrt(exp.rho)
    hstar = X @ theta_star
    gauss = rng.standard_normal(n)
    unif = rng.random(n)
    y = _labels(TEACHER_CODES[exp.teacher], hstar, gauss, unif, float(exp.noise), float(exp.flip),
                np.empty(n))
    z = rng.standard_normal(d)
    resid = max(exp.q0 - exp.m0 ** 2 / exp.rho, 0.0)
    theta0 = (exp.m0 / exp.rho) * theta_star + math.sqrt(resid) * z
    return Dataset(X=X, theta_star=theta_star, hstar=hstar, y=y, theta0=theta0)
