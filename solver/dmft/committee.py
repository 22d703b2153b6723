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
   ``v_s = I``, ``v_m = -(sum_{m < s' <= s} v_s' R[s', m+1]) u_m``, run over ``BLOCK``
   trajectories at once (lanes on the contiguous axis, four rows of ``R`` retired per pass),
   and only on a subset of the trajectories (:func:`tangent_fraction_for`);
5. averages: ``G[s, m] = E[l''_s chi[s, m]]``,
   ``kappa_s = (E[l'_s h*^T] - sum_{m<=s} G[s, m] m[m]) rho^{-1}`` (section 4, "stein" form),
   ``MM[s, j] = E[dA_s dA_j^T]`` (``j <= s``), by default the raw sample mean over the
   realised ``dW`` (section 4). The alternative ``mm_estimator='dw_average'`` averages ``dW_s``
   analytically given the past (``E[l'_s dA_j^T] dt/delta`` for ``j < s``,
   ``E[l'_s l'_s^T] (dt^2/delta^2 + tau dt/delta)`` for ``j = s``): same expectation, lower
   variance, but not a Gram matrix, so the covariance of ``(h*, omega)`` can lose positive
   definiteness; populations of 500-1000 then drifted away (docs/committee.md).

Variance reduction (engine defaults :data:`KAPPA_ESTIMATOR`, :data:`SAMPLING`;
docs/committee.md, "Variance reduction"): optionally ``kappa_s`` as the mean of the pathwise
derivative ``dl'_s/dh*`` (omega held fixed; forward tangent ``J_s = dh_s/dh* = -sum_{j<s} R[s, j+1] w_j D_j``,
``D_j = l''_j J_j - (v sigma'(h_j)/k) sigma'(h*)^T/k*``) instead of the score form, and the
normals from scrambled Sobol sets: the ones every step reuses (h*, omega_0, label noise) and,
per step, the new ones (omega_s, dW_s), each set randomly permuted over the trajectories.
Every trajectory's draws stay exactly i.i.d. N(0, I), so every average keeps its expectation.

Standard errors (:data:`ERRORS`): ``replicas`` independent populations of ``n_rep``
trajectories next to the main one; se = their sample standard deviation times
``sqrt(n_rep / N)`` (as the GLM solver). Or batch means (large N): ``r`` independent
populations of ``N / r``, values = their mean, se = their sd / sqrt(r).

Activations: erf, tanh, relu. relu's ``sigma''`` is a delta mass at 0, which the pathwise
tangent cannot see (its derivative is 0 almost surely; the response ``G`` would miss a term
worth 12-16 standard errors at T = 2): in ``l''`` (hence in ``u`` and in ``G``) it is replaced
by a Gaussian kernel of width ``eps_a = w sqrt(C[s,s,a,a])``, ``w`` from
:func:`relu_width_for` (a kernel-density estimate of ``E[g(h) delta(h_a)]``; docs/committee.md).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
from numba import njit, parallel_chunksize, prange

from ..committee.activations import RELU, code_of, sigma, sigma_d1, sigma_d2
from .gaussian import chol_append

ENGINE = "dmft-mc"
#: Trajectories per block (the unit of parallel work and of the deterministic partial sums).
#: 64: with float32 histories the lane loops are 8 AVX2 vectors; a population of 16000 with the
#: tangent on a quarter ran 1.15-1.28x faster than with 32 (CPU time, 3 alternating runs).
BLOCK = 64
#: Independent replica populations for the standard errors: ``r = min(MAX_REPLICAS,
#: max(REPLICAS, N // REPLICA_STEP))`` of ``min(N, max(N // (REPLICA_DIVISOR r), MIN_REPLICA))``
#: trajectories (together about N: 5 of N/5 below N = 24000, 16 of N/16 from N = 64000). The se
#: from r replicas is itself uncertain by about 1/sqrt(2 (r - 1)): 35% for 5, 18% for 16 (five
#: replicas of N/4 reported 0.30% at N = 64000 where 12 sweeps spread by 0.49%, 2026-11-26).
#: Populations of 500 went unstable at delta = 1 with a large second layer where those of 1000
#: and more did not (docs/committee.md).
REPLICAS = 5
MAX_REPLICAS = 16
REPLICA_STEP = 4000
REPLICA_DIVISOR = 1
MIN_REPLICA = 1000
#: kappa variants: 'full' (THEORY section 4), 'no_past' (drop the terms m < s of the memory
#: sum: a deliberate error for the checks), 'none' (drop the whole sum).
KAPPA_MODES = ("full", "no_past", "none")
#: Estimators of kappa_s = E[dl'_s/dh*] (omega held fixed): 'stein' (THEORY section 4:
#: (E[l'_s h*^T] - sum_m G[s, m] m[m]) rho^{-1}, the score-function form; its E[l' h*^T]
#: carried most of the Monte Carlo error of eg) or 'pathwise' (the mean of
#: D_s = dl'_s/dh* by a forward tangent J_s = dh_s/dh*, O(N K^2 k^2 k*); docs/committee.md).
KAPPA_ESTIMATORS = ("stein", "pathwise")
#: Sampling of the draws that every step reuses (h*, omega_0, label noise): 'mc' (i.i.d.
#: normals) or 'qmc' (randomised quasi-Monte Carlo: a scrambled Sobol sequence in k* + k + 1
#: dimensions through the normal quantile; each point is exactly N(0, I), so every estimate
#: keeps its expectation, and the replicas use independent scramblings; docs/committee.md).
#: 'qmc_steps': besides, the draws of every step (omega_s, dW_s: k + 1 normals per trajectory)
#: from a freshly scrambled Sobol set, randomly permuted over the trajectories (Latin
#: supercube sampling: each trajectory's draws stay i.i.d. N(0, I) over steps).
INIT_SAMPLINGS = ("mc", "qmc", "qmc_steps")
#: The engine's defaults (:func:`stream`; :class:`Population` defaults to the plain 'stein',
#: 'mc'). Measured (k = k* = 2, erf, tau = 0.5, delta = 2, T = 10, N = 2000, 16-20 independent
#: solves each): sd(eg) sqrt(N) / eg = 1.32 plain, 0.63 with 'qmc_steps', 0.71 with
#: 'qmc_steps' and 'pathwise'; for m 0.33 / 0.16 / 0.05, for Q 0.63 / 0.34 / 0.14. 'pathwise'
#: is not the default: it does not help eg (the target), costs N K k k* doubles, and exposes
#: G's sampling noise, which the stein form largely cancels (its -sum G m against b's -sum G b).
KAPPA_ESTIMATOR = "stein"
#: 'auto': 'qmc_steps' from QMC_MIN_SAMPLES trajectories on, plain 'mc' below. Small QMC
#: populations carried a larger O(1/N) bias (not in the replica se): relu, k = k* = 2, tau = 0,
#: cosine at t = 0.8, mean of 8 solves at N = 2000: 0.7142 +- 0.0009 ('qmc_steps') and
#: 0.7111 +- 0.0014 ('mc'); 4 solves at N = 16000: 0.7108 +- 0.0007 and 0.7098 +- 0.0007.
#: ... and up to QMC_MAX_SAMPLES: above N = 16000 the quasi-random error falls more slowly than
#: 1/sqrt(N) (seed spread of eg 0.46%, 0.45%, 0.37% at N = 16000, 32000, 64000 against plain
#: MC's 0.49% at 64000), so beyond the measured range the engine uses plain sampling, whose 1/N
#: law the replica se relies on (docs/committee.md, "Which error figure is right").
SAMPLING = "auto"
QMC_MIN_SAMPLES = 8000
QMC_MAX_SAMPLES = 65536


def sampling_for(N: int, init_sampling: str = SAMPLING) -> str:
    """The sampling a population of ``N`` uses ('auto' resolved, see :data:`SAMPLING`)."""
    if init_sampling != "auto":
        return init_sampling
    return "qmc_steps" if QMC_MIN_SAMPLES <= N <= QMC_MAX_SAMPLES else "mc"
#: Estimators of MM[s, j] = E[dA_s dA_j^T]: 'raw' (the sample mean of dA_s dA_j^T, a Gram
#: matrix, so the covariance of (h*, omega_0..omega_s) stays positive semi-definite) or
#: 'dw_average' (dW_s averaged analytically: lower variance, same expectation, but not a Gram
#: matrix; small populations then hit negative pivots and drift away, docs/committee.md).
MM_ESTIMATORS = ("raw", "dw_average", "blend")
#: 'blend': raw - MM_BETA x (raw - dw_average), a zero-mean control variate with a share
#: MM_BETA (docs/committee.md).
MM_BETA = 0.5
#: Storage of the per-trajectory histories (``z``, ``dA``, ``u``) in the engine (:func:`stream`):
#: float32 halves the memory traffic of the O(K^2) field and E[dA dA^T] sums (which stream the
#: histories from memory at every step), every sum is still accumulated in float64, and the
#: tangent then runs in float32 (a float32 copy of ``R``; twice the SIMD width). Rounding the
#: stored draws and increments to float32 moves the curves by ~1e-7 relative, far below the
#: Monte Carlo error (docs/committee.md, "Float32 histories"). :class:`Population` defaults to
#: float64 (bit-for-bit the section-4 formulas, as the numpy reference test checks).
HIST_DTYPE = np.float32
#: Let LLVM fuse multiply-adds (and nothing else) in the tangent loops.
FMA = {"contract"}
#: ... and, in the per-trajectory sums over the past (fields, E[l' dA^T]), reassociation too:
#: without it every sum is one chain of dependent multiply-adds (latency-bound, 3-4 times slower).
FIELD_FM = {"contract", "reassoc"}
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Multiply-adds per kernel call between cancel checks (about 0.05-0.1 s).
CHUNK_WORK = 1e8


#: relu: width of the Gaussian kernel that stands for the delta mass of sigma'' in the tangent,
#: relative to the field's scale sqrt(C[s,s,a,a]), for a population of RELU_N_REF
#: trajectories; it shrinks like N^(-1/5) (bias O(eps^2), variance O(1/(N eps)); docs/committee.md).
RELU_WIDTH = 0.1
RELU_N_REF = 4000
#: ... but not below RELU_MIN_WIDTH: narrower kernels make the tangent heavy-tailed (a path that
#: lingers near h = 0 picks up O(1) factors per step; width 0.025 blew up a population of 4000).
RELU_MIN_WIDTH = 0.05


def relu_width_for(n, width=RELU_WIDTH, n_ref=RELU_N_REF, floor=RELU_MIN_WIDTH):
    """Relative relu kernel width for a solve whose main population has ``n`` trajectories."""
    return max(floor, width * (max(int(n), 1) / n_ref) ** -0.2)


#: The tangent (the O(N K^3) part) runs on a random subset of min(N, max(N // TANGENT_DIVISOR,
#: TANGENT_MIN)) trajectories of the main population (the same fraction in the replicas): G is
#: then an unbiased mean over fewer samples. Measured (k = k* = 2, erf, tau = 0.5, delta = 2,
#: T = 10): the seed-to-seed spread of eg, Q, m did not change from fraction 1 to 1/4 (the
#: fields, not G, carry the Monte Carlo error), and grew by about 25% at 1/16.
TANGENT_DIVISOR = 4
TANGENT_MIN = 2000


def tangent_fraction_for(n, divisor=TANGENT_DIVISOR, min_size=TANGENT_MIN):
    """Fraction of the trajectories that carry the tangent, for a main population of ``n``."""
    n = max(int(n), 1)
    return min(n, max(n // divisor, min_size)) / n


def _initial_normals(rng, n, d, k, how):
    """``n x d`` standard normals (h*: ``d - 1 - k`` columns, omega_0: ``k``, label noise: 1):
    i.i.d. (``'mc'``) or the first ``n`` points of a scrambled
    Sobol sequence (``'qmc'``; seeded from ``rng``) through the normal quantile."""
    if how == "mc":  # the order of the original draws: h*, label noise, then omega_0
        z = np.empty((n, d))
        z[:, :d - 1 - k] = rng.standard_normal((n, d - 1 - k))
        z[:, d - 1] = rng.standard_normal(n)
        z[:, d - 1 - k:d - 1] = rng.standard_normal((n, k))
        return z
    return _quantile(_step_uniforms(rng, n, d))


def _sobol_uniforms(rng, n, d):
    """The first ``n`` points of a scrambled Sobol sequence in ``d`` dimensions (seeded from
    ``rng``)."""
    import warnings

    from scipy.stats import qmc

    sob = qmc.Sobol(d, scramble=True, seed=rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n need not be a power of 2
        return sob.random(n)


_SOBOL_SV = {}


def _step_uniforms(rng, n, d):
    """Bit-for-bit :func:`_sobol_uniforms` (same draws from ``rng``: LMS + digital shift, 30
    bits), without constructing a ``qmc.Sobol`` (whose deep copy of ``rng`` cost ~2 ms per call,
    once per step and population): scipy's own kernels on cached direction numbers. Falls back
    to :func:`_sobol_uniforms` if scipy's private helpers move."""
    try:
        from scipy._lib._util import rng_integers
        from scipy.stats._qmc import _rng_spawn
        from scipy.stats._sobol import _cscramble, _draw
    except ImportError:  # pragma: no cover
        return _sobol_uniforms(rng, n, d)
    rng = _rng_spawn(rng, 1)[0]  # as qmc.Sobol(seed=rng): a spawned child draws the scrambling
    bits = 30
    if d not in _SOBOL_SV:
        from scipy.stats import qmc

        _SOBOL_SV[d] = qmc.Sobol(d, scramble=False)._sv.copy()
    sv = _SOBOL_SV[d].copy()
    shift = np.dot(rng_integers(rng, 2, size=(d, bits), dtype=np.uint32),
                   2 ** np.arange(bits, dtype=np.uint32))
    ltm = np.tril(rng_integers(rng, 2, size=(d, bits, bits), dtype=np.uint32))
    _cscramble(dim=d, bits=bits, ltm=ltm, sv=sv)
    scale = 1.0 / 2 ** bits
    first = (shift * scale).reshape(1, -1).astype(np.float64)
    if n <= 1:
        return first[:n]
    out = np.empty((n - 1, d))
    _draw(n=n - 1, num_gen=0, dim=d, scale=scale, sv=sv, quasi=shift.copy(), sample=out)
    return np.concatenate([first, out])


def _quantile(u):
    """Standard normals from uniforms (clipped away from 0 and 1)."""
    from scipy.special import ndtri

    return ndtri(np.clip(u, 1e-300, 1.0 - 2.0 ** -53))


#: "no draws in this call" / "no permutation" for :func:`_population_step`
_NO_DRAWS = np.empty((0, 1))
_NO_PERM = np.empty(0, dtype=np.int64)


@njit(cache=True, nogil=True, fastmath=False)  # set, not inherited from the caller
def _ndtri(p):
    """Normal quantile (Wichura's AS 241, PPND16: relative error ~1e-16), for the
    quasi-random uniforms inside the parallel step; ``p`` clipped as in
    :func:`_initial_normals`."""
    p = min(max(p, 1e-300), 1.0 - 2.0 ** -53)
    q = p - 0.5
    if abs(q) <= 0.425:
        r = 0.180625 - q * q
        return q * (((((((2509.0809287301226727 * r + 33430.575583588128105) * r
                         + 67265.770927008700853) * r + 45921.953931549871457) * r
                       + 13731.693765509461125) * r + 1971.5909503065514427) * r
                     + 133.14166789178437745) * r + 3.387132872796366608) / (
            ((((((5226.495278852545925 * r + 28729.085735721942674) * r
                 + 39307.89580009271061) * r + 21213.794301586595867) * r
               + 5394.1960214247511077) * r + 687.1870074920579083) * r
             + 42.313330701600911252) * r + 1.0)
    r = p if q < 0.0 else 1.0 - p
    r = math.sqrt(-math.log(r))
    if r <= 5.0:
        r -= 1.6
        val = (((((((7.7454501427834140764e-4 * r + 0.0227238449892691845833) * r
                    + 0.24178072517745061177) * r + 1.27045825245236838258) * r
                  + 3.64784832476320460504) * r + 5.7694972214606914055) * r
                + 4.6303378461565452959) * r + 1.42343711074968357734) / (
            ((((((1.05075007164441684324e-9 * r + 5.475938084995344946e-4) * r
                 + 0.0151986665636164571966) * r + 0.14810397642748007459) * r
               + 0.68976733498510000455) * r + 1.6763848301838038494) * r
             + 2.05319162663775882187) * r + 1.0)
    else:
        r -= 5.0
        val = (((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r
                    + 0.0012426609473880784386) * r + 0.026532189526576123093) * r
                  + 0.29656057182850489123) * r + 1.7848265399172913358) * r
                + 5.4637849111641143699) * r + 6.6579046435011037772) / (
            ((((((2.04426310338993978564e-15 * r + 1.4215117583164458887e-7) * r
                 + 1.8463183175100546818e-5) * r + 7.868691311456132591e-4) * r
               + 0.0148753612908506148525) * r + 0.13692988092273580531) * r
             + 0.59983220655588793769) * r + 1.0)
    return -val if q < 0.0 else val


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")  # numpy: SIMD division
def _ndtri_lanes(p, out, c):
    """``out[l] = _ndtri(p[l])`` for ``l < c``, bit for bit (both without fastmath, set
    explicitly: numba would otherwise compile them with the flags of their first caller, and
    cache that): the central branch (``|p - 1/2| <= 0.425``, 85% of the uniforms) for every
    lane in one vectorised pass, then the tails one by one. The scalar kernel (a branch and a division per draw) took ~20% of a block's
    time without tangent (3 draws per trajectory and step, k = 2, s = 120)."""
    hi = 1.0 - 2.0 ** -53
    for l in range(c):
        x = p[l]  # the clip of _ndtri as selects (equal but for NaN, which the tail pass redoes)
        x = x if x > 1e-300 else 1e-300
        q = (x if x < hi else hi) - 0.5
        r = 0.180625 - q * q
        out[l] = q * (((((((2509.0809287301226727 * r + 33430.575583588128105) * r
                           + 67265.770927008700853) * r + 45921.953931549871457) * r
                         + 13731.693765509461125) * r + 1971.5909503065514427) * r
                       + 133.14166789178437745) * r + 3.387132872796366608) / (
            ((((((5226.495278852545925 * r + 28729.085735721942674) * r
                 + 39307.89580009271061) * r + 21213.794301586595867) * r
               + 5394.1960214247511077) * r + 687.1870074920579083) * r
             + 42.313330701600911252) * r + 1.0)
    for l in range(c):
        q = min(max(p[l], 1e-300), 1.0 - 2.0 ** -53) - 0.5
        if not abs(q) <= 0.425:
            out[l] = _ndtri(p[l])


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
@njit(cache=True, nogil=True, inline="always")
def _d2(code, x, inv_eps):
    """sigma''(x) as used by the tangent: pointwise for erf and tanh; for relu the Gaussian
    kernel ``exp(-x^2/(2 eps^2)) / (sqrt(2 pi) eps)`` in place of its delta mass at 0."""
    if code == RELU:
        t = x * inv_eps
        return _INV_SQRT_2PI * inv_eps * math.exp(-0.5 * t * t)
    return sigma_d2(code, x)


@njit(cache=True, nogil=True, fastmath=FMA)
def _finish(j, k, acc, ub, V):
    """``V[j] = -acc[:, j] u[j]`` (k x k blocks, all ``BLOCK`` lanes; layouts of
    :func:`_tangent_block`)."""
    for e in range(k):
        out = V[j, e]
        for a in range(k):
            o = a * BLOCK
            for l in range(BLOCK):
                out[o + l] = 0.0
            for f in range(k):
                x = acc[f, j]
                y = ub[j, f, e]
                for l in range(BLOCK):
                    out[o + l] -= x[o + l] * y[l]


@njit(cache=True, nogil=True, fastmath=FMA)
def _retire1(kp, lo, hi, k, R, V, acc):
    """``acc[:, mm] += V[kp] R[kp, mm+1]`` for ``lo <= mm < hi``."""
    for mm in range(lo, hi):
        for e in range(k):
            out = acc[e, mm]
            for f in range(k):
                r = R[kp, mm + 1, f, e]
                x = V[kp, f]
                for l in range(k * BLOCK):
                    out[l] += x[l] * r


@njit(cache=True, nogil=True, fastmath=FMA)
def _retire4(kp, hi, k, R, V, acc):
    """``acc[:, mm] += sum_{q<4} V[kp-q] R[kp-q, mm+1]`` for ``mm < hi``: four rows retired
    per pass over ``acc`` (``k = 2`` spelt out, the common case)."""
    if k == 2:
        _retire4_k2(kp, hi, R, V, acc)
        return
    for mm in range(hi):
        for e in range(k):
            out = acc[e, mm]
            for f in range(k):
                r1 = R[kp, mm + 1, f, e]
                r2 = R[kp - 1, mm + 1, f, e]
                r3 = R[kp - 2, mm + 1, f, e]
                r4 = R[kp - 3, mm + 1, f, e]
                x1 = V[kp, f]
                x2 = V[kp - 1, f]
                x3 = V[kp - 2, f]
                x4 = V[kp - 3, f]
                for l in range(k * BLOCK):
                    out[l] += (x1[l] * r1 + x2[l] * r2) + (x3[l] * r3 + x4[l] * r4)


@njit(cache=True, nogil=True, fastmath=FMA)
def _retire4_k2(kp, hi, R, V, acc):
    """:func:`_retire4` for ``k = 2``: both columns ``e`` in one loop over the ``2 BLOCK``
    entries ``(a, lane)`` (each ``V`` row loaded once for two outputs, ``R`` broadcast once for
    both rows ``a``). ``acc[0]``, ``acc[1]`` are separate ranges of memory, so LLVM's run-time
    alias checks (hoisted out of the ``mm`` loop) pass; two outputs in ``acc[mm, a, e]``
    order overlap there and the loop runs scalar, 5-6 times slower."""
    v0 = V[kp, 0]
    v1 = V[kp, 1]
    v2 = V[kp - 1, 0]
    v3 = V[kp - 1, 1]
    v4 = V[kp - 2, 0]
    v5 = V[kp - 2, 1]
    v6 = V[kp - 3, 0]
    v7 = V[kp - 3, 1]
    for mm in range(hi):
        r0 = R[kp, mm + 1, 0, 0]
        r1 = R[kp, mm + 1, 1, 0]
        r2 = R[kp - 1, mm + 1, 0, 0]
        r3 = R[kp - 1, mm + 1, 1, 0]
        r4 = R[kp - 2, mm + 1, 0, 0]
        r5 = R[kp - 2, mm + 1, 1, 0]
        r6 = R[kp - 3, mm + 1, 0, 0]
        r7 = R[kp - 3, mm + 1, 1, 0]
        s0 = R[kp, mm + 1, 0, 1]
        s1 = R[kp, mm + 1, 1, 1]
        s2 = R[kp - 1, mm + 1, 0, 1]
        s3 = R[kp - 1, mm + 1, 1, 1]
        s4 = R[kp - 2, mm + 1, 0, 1]
        s5 = R[kp - 2, mm + 1, 1, 1]
        s6 = R[kp - 3, mm + 1, 0, 1]
        s7 = R[kp - 3, mm + 1, 1, 1]
        o0 = acc[0, mm]
        o1 = acc[1, mm]
        for l in range(2 * BLOCK):
            x0 = v0[l]
            x1 = v1[l]
            x2 = v2[l]
            x3 = v3[l]
            x4 = v4[l]
            x5 = v5[l]
            x6 = v6[l]
            x7 = v7[l]
            o0[l] += (((x0 * r0 + x1 * r1) + (x2 * r2 + x3 * r3))
                      + ((x4 * r4 + x5 * r5) + (x6 * r6 + x7 * r7)))
            o1[l] += (((x0 * s0 + x1 * s1) + (x2 * s2 + x3 * s3))
                      + ((x4 * s4 + x5 * s5) + (x6 * s6 + x7 * s7)))


@njit(cache=True, nogil=True)
def _tangent_block(s, k, R, ub, V, acc):
    """Tangent rows ``chi[s, m]`` (``m <= s``; blocks ``k x k``, all ``BLOCK`` lanes) by the
    adjoint recursion ``V[s] = I``, ``V[m] = -(sum_{m < s' <= s} V[s'] R[s', m+1]) u[m]``,
    rows retired four at a time (as :func:`solver.dmft.glm._tangent_row`). Layouts: entry
    ``(a, e)`` of block ``m`` at ``V[m, e, a BLOCK + lane]`` (shape ``(s + 1, k, k BLOCK)``),
    of the partial sum at ``acc[e, m, a BLOCK + lane]`` (``(k, s + 1, k BLOCK)``): a row ``e``
    of either is ``k BLOCK`` contiguous entries ``(a, lane)``, the unit of the retire loops; the
    padding lanes of a short block carry ``u = 0`` and stay finite."""
    for e in range(k):
        for a in range(k):
            for l in range(BLOCK):
                V[s, e, a * BLOCK + l] = 1.0 if a == e else 0.0
    for e in range(k):
        for mm in range(s):
            for l in range(k * BLOCK):
                acc[e, mm, l] = 0.0
    kp = s
    while kp >= 4:
        _retire1(kp, kp - 1, kp, k, R, V, acc)
        _finish(kp - 1, k, acc, ub, V)
        _retire1(kp, kp - 2, kp - 1, k, R, V, acc)
        _retire1(kp - 1, kp - 2, kp - 1, k, R, V, acc)
        _finish(kp - 2, k, acc, ub, V)
        _retire1(kp, kp - 3, kp - 2, k, R, V, acc)
        _retire1(kp - 1, kp - 3, kp - 2, k, R, V, acc)
        _retire1(kp - 2, kp - 3, kp - 2, k, R, V, acc)
        _finish(kp - 3, k, acc, ub, V)
        _retire4(kp, kp - 3, k, R, V, acc)
        _finish(kp - 4, k, acc, ub, V)
        kp -= 4
    while kp >= 1:
        _retire1(kp, 0, kp, k, R, V, acc)
        _finish(kp - 1, k, acc, ub, V)
        kp -= 1


@njit(cache=True, nogil=True, fastmath=FIELD_FM)
def _lincomb(coef, rows, nrows, c, out):
    """``out[l] += sum_{q < nrows} coef[q] rows[q, l]`` for lanes ``l < c``, four rows per pass
    (one store per lane loop; ``rows`` may be float32, the sum is float64)."""
    q = 0
    while q + 4 <= nrows:
        c0 = coef[q]
        c1 = coef[q + 1]
        c2 = coef[q + 2]
        c3 = coef[q + 3]
        x0 = rows[q]
        x1 = rows[q + 1]
        x2 = rows[q + 2]
        x3 = rows[q + 3]
        for l in range(c):
            out[l] += (c0 * x0[l] + c1 * x1[l]) + (c2 * x2[l] + c3 * x3[l])
        q += 4
    while q < nrows:
        c0 = coef[q]
        x0 = rows[q]
        for l in range(c):
            out[l] += c0 * x0[l]
        q += 1


@njit(cache=True, nogil=True, fastmath=FIELD_FM)
def _lincomb2(coef0, coef1, rows, nrows, out0, out1):
    """:func:`_lincomb` for two coefficient rows at once, over all ``BLOCK`` lanes: each
    history row is loaded and widened once for both outputs (``k = 2``)."""
    q = 0
    while q + 4 <= nrows:
        a0 = coef0[q]
        a1 = coef0[q + 1]
        a2 = coef0[q + 2]
        a3 = coef0[q + 3]
        b0 = coef1[q]
        b1 = coef1[q + 1]
        b2 = coef1[q + 2]
        b3 = coef1[q + 3]
        x0 = rows[q]
        x1 = rows[q + 1]
        x2 = rows[q + 2]
        x3 = rows[q + 3]
        for l in range(BLOCK):
            y0 = x0[l]
            y1 = x1[l]
            y2 = x2[l]
            y3 = x3[l]
            out0[l] += (a0 * y0 + a1 * y1) + (a2 * y2 + a3 * y3)
            out1[l] += (b0 * y0 + b1 * y1) + (b2 * y2 + b3 * y3)
        q += 4
    while q < nrows:
        a0 = coef0[q]
        b0 = coef1[q]
        x0 = rows[q]
        for l in range(BLOCK):
            out0[l] += a0 * x0[l]
            out1[l] += b0 * x0[l]
        q += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=FIELD_FM)
def _population_step(blk0, blk1, s, ks, code, vvec, dt, delta, tau, inv_eps, L, R, Rt, z, hstar,
                     y, dW, dA, u, h, pG, pM, pE, pS, raw, beta, nbt, kdir, Dw, pK, U, perm,
                     uniform):
    """Step 4 for the trajectories of blocks ``blk0 .. blk1-1``; per-block partial sums:
    ``pG[ib, m] = sum l''_s chi[s, m]``, ``pM[ib, j] = sum l'_s dA_j^T`` (j < s),
    ``pM[ib, s] = sum l'_s l'_s^T``, ``pE[ib] = sum l'_s h*^T``, ``pS[ib] = (sum loss,
    #non-finite)``. Only the first ``nbt`` blocks carry the tangent (and ``pG``).
    Histories in lane layout, trajectory ``ib * BLOCK + lane`` on the last (contiguous) axis:
    ``z[ib, q, lane]``, ``dA[ib, j, a, lane]``, ``u[ib, j, a, e, lane]`` (``l''_j w_j``), so that
    the sums over the past and the tangent run over ``BLOCK`` lanes at a time.
    ``inv_eps[a]``: inverse kernel width for relu's delta mass (unused otherwise).
    Pathwise kappa (``kdir``): ``J_s = dh_s/dh* = -sum_{j<s} R[s, j+1] Dw_j``,
    ``D_s = dl'_s/dh* = l''_s J_s - (v sigma'(h_s)/k) (sigma'(h*)/k*)^T`` (omega held fixed),
    ``Dw[ib, s, a, c, lane] = D_s w_s``, ``pK[ib] = sum D_s``.
    This step's draws (if ``U`` has rows): trajectory ``i`` takes row ``perm[i]`` of ``U``
    (row ``i`` if ``perm`` is empty), ``k`` columns for ``omega_s`` (stored in ``z``) and, if
    ``tau > 0``, one for ``dW_s = sqrt(dt) U[., k]``; standard normals, or uniforms mapped
    through the normal quantile if ``uniform``. Histories ``z``, ``dA``, ``u`` may be float32
    (sums in float64); the tangent runs in ``u``'s precision with ``Rt`` (= ``R`` rounded)."""
    n = y.shape[0]
    k = R.shape[2]
    w0 = dt / delta
    sq = math.sqrt(tau / delta)
    r0 = ks + s * k
    blend = (not raw) and beta < 1.0
    ew2 = w0 * w0 + tau * dt / delta
    fresh = U.shape[0] > 0
    useperm = perm.shape[0] > 0
    # coefficients of the memory term, -R[s, j+1, a, e] at j * k + e (the same for all blocks)
    Rm = np.empty((k, max(s, 1) * k))
    for a in range(k):
        for j in range(s):
            for e in range(k):
                Rm[a, j * k + e] = -R[s, j + 1, a, e]
    sqdt = math.sqrt(dt)
    for ib in prange(blk0, blk1):
        i0 = ib * BLOCK
        i1 = min(n, i0 + BLOCK)
        c = i1 - i0
        if fresh:
            zd = z[ib]
            pu = np.empty(BLOCK)
            nu = np.empty(BLOCK)
            for a in range(k + 1 if tau > 0.0 else k):
                for l in range(c):
                    i = i0 + l
                    pu[l] = U[perm[i] if useperm else i, a]
                if uniform:
                    _ndtri_lanes(pu, nu, c)
                else:
                    nu[:c] = pu[:c]
                if a < k:
                    for l in range(c):
                        zd[r0 + a, l] = nu[l]
                else:
                    for l in range(c):
                        dW[i0 + l] = sqdt * nu[l]
        for mm in range(s + 1):
            for a in range(k):
                for e in range(k):
                    pG[ib, mm, a, e] = 0.0
                    pM[ib, mm, a, e] = 0.0
        for a in range(k):
            for e in range(ks):
                pE[ib, a, e] = 0.0
        pS[ib, 0] = 0.0
        pS[ib, 1] = 0.0
        if kdir:
            for a in range(k):
                for e in range(ks):
                    pK[ib, a, e] = 0.0
        tang = ib < nbt
        ub = u[ib if tang else 0]
        zb = z[ib]
        dAb = dA[ib]
        app = np.zeros((k, k, BLOCK))
        good = np.zeros(BLOCK, dtype=np.bool_)
        # fields of the block's lanes: omega_s (conditional draw), minus the memory term
        H = np.zeros((k, BLOCK))
        dAf = dAb.reshape((dAb.shape[0] * k, BLOCK))  # rows j * k + e
        if k == 2:  # L[r0, r0 + 1] = 0: both components over the same rows (all lanes;
            # the padding lanes' histories are 0)
            _lincomb2(L[r0], L[r0 + 1], zb, r0 + 2, H[0], H[1])
            _lincomb2(Rm[0], Rm[1], dAf, s * k, H[0], H[1])
        else:
            for a in range(k):
                _lincomb(L[r0 + a], zb, r0 + a + 1, c, H[a])
                _lincomb(Rm[a], dAf, s * k, c, H[a])
        # pathwise kappa: J_s = dh_s/dh* = -sum_{j<s} R[s, j+1] Dw_j   (k x k*, lanes)
        Jm = np.zeros((k, ks, BLOCK))
        Db = Dw[ib if kdir else 0]
        if kdir:
            for a in range(k):
                for cc in range(ks):
                    Ja = Jm[a, cc]
                    for j in range(s):
                        for e in range(k):
                            rr = R[s, j + 1, a, e]
                            dj = Db[j, e, cc]
                            for l in range(c):
                                Ja[l] -= rr * dj[l]
        Dl = np.zeros((k, ks))
        s1 = np.empty(k)
        s2 = np.empty(k)
        F = np.zeros((k, BLOCK))  # fs * l'_s of the good lanes (0 for the others)
        Lp = np.zeros((k, BLOCK))  # blend: l'_s of the good lanes
        dg = np.zeros(BLOCK)  # blend: diagonal weight
        for l in range(c):
            i = i0 + l
            # loss and its derivatives
            yhat = 0.0
            for a in range(k):
                ha = H[a, l]
                yhat += vvec[a] * sigma(code, ha)
                s1[a] = sigma_d1(code, ha)
                s2[a] = _d2(code, ha, inv_eps[a])
            yhat /= k
            res = yhat - y[i]
            lo = 0.5 * res * res
            w = w0 + sq * dW[i]
            if blend:
                # dW_s partly averaged out: weight w0 + (1 - beta) sq dW_s against the past,
                # (1 - beta) w^2 + beta E[w^2] on the diagonal
                wb = w0 + (1.0 - beta) * sq * dW[i]
                dg[l] = (1.0 - beta) * w * w + beta * ew2
            bad = not math.isfinite(lo)
            for a in range(k):
                lpa = res * vvec[a] * s1[a] / k
                for e in range(k):
                    x = vvec[a] * vvec[e] * s1[a] * s1[e] / (k * k)
                    if a == e:
                        x += res * vvec[a] * s2[a] / k
                    app[a, e, l] = x
                    if tang:
                        ub[s, a, e, l] = x * w
                h[i, a] = H[a, l]
                dAb[s, a, l] = lpa * w
                if raw:  # the stored (possibly rounded) value: MM stays a Gram matrix
                    F[a, l] = dAb[s, a, l]
                elif blend:
                    F[a, l] = lpa * wb
                    Lp[a, l] = lpa
                else:
                    F[a, l] = lpa
                bad = bad or not math.isfinite(lpa)
            if kdir:
                # D_s = l''_s J_s - (v_a sigma'(h_a)/k) sigma'(h*_c)/k*
                for a in range(k):
                    g = vvec[a] * s1[a] / (k * ks)
                    for cc in range(ks):
                        x = -g * sigma_d1(code, hstar[i, cc])
                        for e in range(k):
                            x += app[a, e, l] * Jm[e, cc, l]
                        Dl[a, cc] = x
                        Db[s, a, cc, l] = x * w
                        bad = bad or not math.isfinite(x)
            if bad:
                pS[ib, 1] += 1.0
                for a in range(k):
                    F[a, l] = 0.0
                    Lp[a, l] = 0.0
                continue
            good[l] = True
            pS[ib, 0] += lo
            if kdir:
                for a in range(k):
                    for cc in range(ks):
                        pK[ib, a, cc] += Dl[a, cc]
            for a in range(k):
                lpa = res * vvec[a] * s1[a] / k
                for e in range(ks):
                    pE[ib, a, e] += lpa * hstar[i, e]
        # raw: dA_s dA_j^T (j <= s); else l'_s dA_j^T (j < s) and l'_s l'_s^T
        if k == 2 and not blend:  # the past for both components in one pass
            F0 = F[0]
            F1 = F[1]
            for j in range(s):
                d0 = dAb[j, 0]
                d1 = dAb[j, 1]
                x00 = 0.0
                x01 = 0.0
                x10 = 0.0
                x11 = 0.0
                for l in range(c):
                    if good[l]:
                        x00 += F0[l] * d0[l]
                        x01 += F0[l] * d1[l]
                        x10 += F1[l] * d0[l]
                        x11 += F1[l] * d1[l]
                pM[ib, j, 0, 0] = x00
                pM[ib, j, 0, 1] = x01
                pM[ib, j, 1, 0] = x10
                pM[ib, j, 1, 1] = x11
        for j in range(s if k == 2 and not blend else 0, s + 1):
            for a in range(k):
                Fa = F[a]
                for e in range(k):
                    x = 0.0
                    if j < s:
                        dj = dAb[j, e]
                        for l in range(c):
                            if good[l]:
                                x += Fa[l] * dj[l]
                    elif blend:
                        La = Lp[a]
                        Le = Lp[e]
                        for l in range(c):
                            x += La[l] * Le[l] * dg[l]
                    else:
                        Fe = F[e]
                        for l in range(c):
                            x += Fa[l] * Fe[l]
                    pM[ib, j, a, e] = x
        if not tang:
            continue
        # tangent rows chi[s, :] of the block's lanes, then G samples l''_s chi[s, m]
        V = np.empty((s + 1, k, k * BLOCK), dtype=ub.dtype)
        acc = np.empty((k, s + 1, k * BLOCK), dtype=ub.dtype)
        _tangent_block(s, k, Rt, ub, V, acc)
        for l in range(c):
            if not good[l]:
                for a in range(k):
                    for e in range(k):
                        app[a, e, l] = 0.0
        for mm in range(s + 1):
            for a in range(k):
                for e in range(k):
                    x = 0.0
                    for f in range(k):
                        for l in range(c):
                            if good[l]:
                                x += app[a, f, l] * V[mm, e, f * BLOCK + l]
                    pG[ib, mm, a, e] = x


@njit(cache=True, nogil=True)
def _block_sum(p, nrows, s):
    """``p[:nrows, :s+1].sum(axis=0)`` (blocks added in order, as numpy does; no temporary)."""
    k = p.shape[2]
    m = (s + 1) * k * k
    flat = p.reshape((p.shape[0], p.shape[1] * k * k))
    out = np.zeros(m)
    for ib in range(nrows):
        row = flat[ib]
        for q in range(m):  # one contiguous (vectorised) pass per block
            out[q] += row[q]
    return out.reshape((s + 1, k, k))


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

    def __init__(self, exp, n, seed_seq, kappa_mode="full", mm_estimator="raw",
                 relu_width=None, tangent_fraction=1.0, kappa_estimator="stein",
                 init_sampling="mc", mm_beta=None, hist_dtype=np.float64):
        if kappa_mode not in KAPPA_MODES:
            raise ValueError(f"kappa_mode must be one of {KAPPA_MODES}")
        if mm_estimator not in MM_ESTIMATORS:
            raise ValueError(f"mm_estimator must be one of {MM_ESTIMATORS}")
        init_sampling = sampling_for(n, init_sampling)
        if init_sampling not in INIT_SAMPLINGS:
            raise ValueError(f"init_sampling must be one of {INIT_SAMPLINGS}")
        if kappa_estimator not in KAPPA_ESTIMATORS:
            raise ValueError(f"kappa_estimator must be one of {KAPPA_ESTIMATORS}")
        self.kappa_mode = kappa_mode
        self.kappa_estimator = kappa_estimator
        self.mm_estimator = mm_estimator
        self.mm_beta = {"raw": 0.0, "dw_average": 1.0}.get(
            mm_estimator, float(MM_BETA if mm_beta is None else mm_beta))
        if not 0.0 <= self.mm_beta <= 1.0:
            raise ValueError("mm_beta must lie in [0, 1]")
        #: storage of the per-trajectory histories z, dA, u (float32: :data:`HIST_DTYPE`)
        self.hist_dtype = hd = np.dtype(hist_dtype)
        if hd not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError("hist_dtype must be float32 or float64")
        self.n = n = int(n)
        self.k = k = int(exp.k)
        self.ks = ks = int(exp.kstar)
        self.K = K = int(exp.steps)
        self.code = code_of(exp.activation)
        #: relu only: kernel width for the delta mass of sigma'', relative to sqrt(C[s,s,a,a])
        self.relu_width = float(relu_width if relu_width is not None else relu_width_for(n))
        self.v = np.ascontiguousarray(exp.second_layer(), dtype=float)
        Q0, M0, rho = exp.overlaps0()
        self.Q0 = np.ascontiguousarray(Q0, float)
        self.M0 = np.ascontiguousarray(M0, float)
        self.rho = np.ascontiguousarray(rho, float)
        self.rho_inv = np.linalg.inv(self.rho)
        self.dt, self.lam, self.delta, self.tau = float(exp.dt), float(exp.lam), float(exp.delta), float(exp.tau)
        Kp = K + 1
        self.R = np.zeros((Kp, Kp, k, k))
        #: R in the tangent's precision (the histories')
        self.Rt = self.R if hd == np.float64 else np.zeros((Kp, Kp, k, k), dtype=hd)
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
        nb = -(-n // BLOCK)
        #: per-trajectory histories in lane layout: ``z[ib, q, lane]``, ``dA[ib, j, a, lane]``
        #: (trajectory ``ib * BLOCK + lane``; :meth:`z_of`, :meth:`dA_of` give one trajectory's)
        self.z = np.zeros((nb, D, BLOCK), dtype=hd)
        #: the draws that stay fixed for the whole sweep: h*, omega_0 and the label noise
        #: (k* + k + 1 standard normals per trajectory); 'qmc': a scrambled Sobol sequence
        self.init_sampling = init_sampling
        self._init = _initial_normals(self.rng, n, ks + k + 1, k,
                                      "mc" if init_sampling == "mc" else "qmc")
        z0 = np.ascontiguousarray(self._init[:, :ks])
        self._put_z(0, z0)
        self.hstar = np.ascontiguousarray(z0 @ self.L[:ks, :ks].T)
        eps = np.ascontiguousarray(self._init[:, ks + k])
        self.y = np.empty(n)
        _teacher_labels(self.code, self.hstar, eps, float(exp.noise), self.y)
        self.dA = np.zeros((nb, Kp, k, BLOCK), dtype=hd)
        #: the tangent (the O(N K^3) part) runs on the first nbt blocks only (G is then the mean
        #: over their n_tangent trajectories: unbiased, noisier; tangent_fraction < 1)
        self.nbt = min(nb, max(1, int(math.ceil(float(tangent_fraction) * n / BLOCK))))
        self.n_tangent = min(n, self.nbt * BLOCK)
        self.u = np.zeros((self.nbt, Kp, k, k, BLOCK), dtype=hd)
        self.h = np.zeros((n, k))
        self.dW = np.zeros(n)
        self.pG = np.zeros((nb, Kp, k, k))
        self.pM = np.zeros((nb, Kp, k, k))
        self.pE = np.zeros((nb, k, ks))
        self.pS = np.zeros((nb, 2))
        #: pathwise kappa: Dw[ib, j, a, c, lane] = w_j dl'_j/dh*, pK[ib] = per-block sums
        kd = kappa_estimator == "pathwise"
        self.Dw = np.zeros((nb, Kp, k, ks, BLOCK) if kd else (1, 1, k, ks, BLOCK))
        self.pK = np.zeros((nb, k, ks))
        #: E[dl'_s/dh*] (pathwise only; NaN otherwise)
        self.Ek = np.full((Kp, k, ks), np.nan)
        self.s = -1

    def step(self, s, cancel=None):
        """Solve grid step s (in order 0, 1, ..., K); raises :class:`Cancelled` (state then
        unusable) when ``cancel`` is set between chunks of trajectories."""
        assert s == self.s + 1
        k, ks, n = self.k, self.ks, self.n
        _advance(s, self.dt, self.lam, self.R, self.b, self.G, self.kappa)
        if self.Rt is not self.R:
            self.Rt[s, : s + 1] = self.R[s, : s + 1]
        _correlate(s, self.delta, self.Q0, self.M0, self.rho, self.R, self.b, self.MM, self.m,
                   self.C, self._P)
        self.zero_pivots += _chol_rows(s, ks, self.m, self.C, self.L, self._srow)
        r0 = ks + s * k
        # this step's draws (omega_s: k normals, dW_s: one if tau > 0), in the order of the
        # generator's stream; mapped and stored by the parallel step (U, perm)
        d = k + (1 if self.tau > 0 else 0)
        perm = _NO_PERM
        uniform = self.init_sampling == "qmc_steps"
        if uniform:  # scrambled Sobol uniforms, randomly permuted over the trajectories
            U = _step_uniforms(self.rng, n, d)
            perm = self.rng.permutation(n)
        elif s == 0:  # omega_0 is in _init; dW_0 from the generator
            U = np.empty((n, d))
            if self.tau > 0:
                U[:, k] = self.rng.standard_normal(n)
        else:
            U = np.empty((n, d))
            U[:, :k] = self.rng.standard_normal((n, k))
            if self.tau > 0:
                U[:, k] = self.rng.standard_normal(n)
        if s == 0:  # omega_0: the reused initial draws (normals), stored here
            self._put_z(r0, self._init[:, ks:ks + k])
            if self.tau > 0:
                x = U[perm, k] if uniform else U[:, k]
                self.dW[:] = math.sqrt(self.dt) * (_quantile(x) if uniform else x)
            U, perm = _NO_DRAWS, _NO_PERM
        inv_eps = np.zeros(k)
        if self.code == RELU:
            for a in range(k):
                sd = math.sqrt(max(self.C[s, s, a, a], 0.0))
                inv_eps[a] = 1.0 / (self.relu_width * sd) if sd > 1e-150 else 0.0
        nb = self.pG.shape[0]
        per_block = BLOCK * (0.5 * s * s * k ** 3 * self.nbt / nb + 8.0 * s * k * k + 64.0)
        chunk = max(1, int(CHUNK_WORK / per_block))
        for b0 in range(0, nb, chunk):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            # dynamic scheduling: the tangent blocks come first and cost far more
            with parallel_chunksize(1):
                _population_step(b0, min(nb, b0 + chunk), s, ks, self.code, self.v, self.dt,
                                 self.delta, self.tau, inv_eps, self.L, self.R, self.Rt,
                                 self.z, self.hstar, self.y, self.dW, self.dA, self.u, self.h,
                                 self.pG, self.pM, self.pE, self.pS, self.mm_estimator == "raw",
                                 self.mm_beta, self.nbt, self.kappa_estimator == "pathwise",
                                 self.Dw, self.pK, U, perm, uniform)
        Grow = _block_sum(self.pG, self.nbt, s) / self.n_tangent
        Mrow = _block_sum(self.pM, nb, s) / n
        if self.mm_estimator != "raw" and self.mm_beta >= 1.0:  # dw_average
            Mrow[:s] *= self.dt / self.delta
            Mrow[s] *= (self.dt / self.delta) ** 2 + self.tau * self.dt / self.delta
        tot = self.pS.sum(axis=0)
        self.train[s] = tot[0] / n if tot[1] == 0 else np.nan
        self.G[s, : s + 1] = Grow
        self.MM[s, : s + 1] = Mrow
        self.MM[: s + 1, s] = np.swapaxes(Mrow, 1, 2)
        self.Elh[s] = self.pE.sum(axis=0) / n
        if self.kappa_estimator == "pathwise":
            self.Ek[s] = self.pK.sum(axis=0) / n
            if self.kappa_mode == "full":
                self.kappa[s] = self.Ek[s]
                self.s = s
                return
        if self.kappa_mode == "full":
            mem = np.einsum("mab,mbc->ac", Grow, self.m[: s + 1])
        elif self.kappa_mode == "no_past":
            mem = Grow[s] @ self.m[s]
        else:
            mem = 0.0
        self.kappa[s] = (self.Elh[s] - mem) @ self.rho_inv
        self.s = s

    def _put_z(self, r0, draws):
        """Store standard normals ``draws[i, c]`` as ``z[ib, r0 + c, lane]``."""
        n, w = draws.shape
        nb = self.z.shape[0]
        buf = np.zeros((nb * BLOCK, w))
        buf[:n] = draws
        self.z[:, r0:r0 + w, :] = buf.reshape(nb, BLOCK, w).transpose(0, 2, 1)

    def z_of(self, i):
        """The standard normals of trajectory ``i`` (``x = L z``)."""
        return self.z[i // BLOCK, :, i % BLOCK].copy()

    def dA_of(self, i):
        """``dA[j, a]`` of trajectory ``i`` (``j = 0..K``)."""
        return self.dA[i // BLOCK, :, :, i % BLOCK].copy()

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
def replica_plan(N, replicas=None, divisor=REPLICA_DIVISOR, min_size=MIN_REPLICA):
    """Population sizes ``[N] + [n_rep] * r`` (:data:`REPLICAS`; ``r = replicas`` if given);
    just ``[N]`` if ``r < 2``."""
    N = int(N)
    r = replicas if replicas is not None else min(MAX_REPLICAS, max(REPLICAS, N // REPLICA_STEP))
    if r < 2:
        return [N]
    n_rep = min(N, max(N // (divisor * r), min_size))
    return [N] + [n_rep] * r


#: Error estimation of :func:`stream` (``errors``): 'replicas' (the main population of N
#: and :func:`replica_plan`'s smaller independent ones, whose spread rescaled by
#: ``sqrt(n_rep / N)`` is the se) or 'batches' (batch means: ``r`` independent populations of
#: ``n = N // r`` trajectories each, every one with the sampling of its own size
#: (:func:`sampling_for`: quasi-random for ``n`` from QMC_MIN_SAMPLES on), stepped in lockstep;
#: values are the means over the populations, se = their sample sd / sqrt(r): every
#: trajectory enters the estimate and the se needs no scaling law, at the price of the
#: ``O(1/n)`` bias of populations of n, not N; docs/committee.md, "Batch means").
#: 'auto': 'batches' from BATCH_MIN_SAMPLES trajectories on (unless ``replicas`` is given).
#: Measured (benchmark configuration: k = k* = 2, erf, tau = 0.5, delta = 2, T = 10; independent
#: 'qmc_steps' populations, tangent on 1/4; 2026-11-26): the mean of eg(T) over populations of n
#: fits mu + c/n with c/mu = 2.9 +- 2.4 (n = 2000 to 16000, chi^2 1.35 for 2 dof), a bias of
#: 0.02% +- 0.015% at n = 16000, a fifth of a 0.1% standard error; the spread sd(eg) sqrt(n) / eg
#: was 0.65-0.92 from n = 2000 to 16000 (0.68 at 16000, 57 populations; 0.78-0.90 inside engine
#: runs of 8 x 16000 and 34 x 15882), no better per trajectory at large n, so batches lose
#: nothing against one population of N. A 0.1% se of eg needs N ~ 8e5 with populations of
#: 33333 (sd sqrt(N)/eg = 0.89 inside engine runs, 2026-11-27; docs/committee.md "Session 6").
ERRORS = ("auto", "replicas", "batches")
#: Batch size aimed at (:func:`batch_plan`): r = max(MIN_BATCHES, the even number nearest
#: N / BATCH_SIZE) (even: the populations run two side by side, :class:`_PopulationWorkers`).
#: MIN_BATCHES = 8: the se from r populations is itself uncertain by about 1/sqrt(2 (r - 1)),
#: 27% for 8 (eight populations of N / 8 from N = 64000 to 256000; quasi-random from n = 8000).
#: 32000 rather than 16000 (2026-11-27, docs/committee.md "Tangent share of the batch
#: populations"): with the tangent on BATCH_TANGENT trajectories either way, a population of
#: 32000 cost 0.66-0.68x the CPU per trajectory of one of 16000 with the tangent on 1/4, for
#: 1.15x the variance per trajectory, and halves the populations' O(1/n) bias.
BATCH_SIZE = 32000
MIN_BATCHES = 8
BATCH_MIN_SAMPLES = 64000
#: Trajectories of a batch population that carry the tangent (:func:`batch_tangent_fraction`):
#: G's noise biases eg(T) by c/N_t with c/eg = 0.49 +- 0.35 (paired fractions of the same
#: populations, 2026-11-27): +0.012% +- 0.009% at 4000, independent of the population's size.
BATCH_TANGENT = 4000


def errors_for(N: int, errors: str = "auto", replicas: int | None = None) -> str:
    """The error mode a solve of ``N`` trajectories uses ('auto' resolved, see :data:`ERRORS`)."""
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}")
    if errors != "auto":
        return errors
    return "batches" if replicas is None and int(N) >= BATCH_MIN_SAMPLES else "replicas"


def batch_plan(N, batches=None, size=BATCH_SIZE):
    """Population sizes ``[n] * r`` of ``errors='batches'``: ``r = batches`` if given, else
    ``max(MIN_BATCHES, 2 round(N / (2 size)))``; ``n = N // r`` (the ``N mod r`` rest is
    dropped)."""
    N = int(N)
    r = int(batches) if batches is not None else max(MIN_BATCHES, 2 * int(round(N / (2 * size))))
    if r < 2:
        raise ValueError("batch means need at least 2 populations")
    n = N // r
    if n < 1:
        raise ValueError(f"{N} trajectories cannot fill {r} populations")
    return [n] * r


def batch_tangent_fraction(n, size=BATCH_TANGENT):
    """Tangent fraction of a batch population of ``n``: ``n // d`` trajectories with
    ``d = max(TANGENT_DIVISOR, n // size)`` (1/4 up to n = 16000, then about ``size``)."""
    n = max(int(n), 1)
    return tangent_fraction_for(n, divisor=max(TANGENT_DIVISOR, n // int(size)))


def check(exp):
    """ConfigError unless the experiment is a committee."""
    from ..config import ConfigError

    exp.validate()
    if exp.model != "committee":
        raise ConfigError("model", "solver.dmft.committee needs model='committee'")


def _observables(exp, pops, s):
    from ..committee.observables import metrics

    Q = np.stack([p.overlaps(s)[0] for p in pops])
    M = np.stack([p.overlaps(s)[1] for p in pops])
    _, _, rho = exp.overlaps0()
    with np.errstate(all="ignore"):
        out = metrics(Q, M, rho, exp.second_layer(), exp.activation, exp.noise)
    out = {"train_loss": np.array([p.train[s] for p in pops]), **out}
    return out


def stream(exp, cancel=None, replicas: int | None = None, divisor: int = REPLICA_DIVISOR,
           min_replica: int = MIN_REPLICA, kappa_mode: str = "full", mm_estimator: str = "raw",
           kernels: bool = True, relu_width: float | None = None,
           tangent_fraction: float | None = None, kappa_estimator: str = KAPPA_ESTIMATOR,
           init_sampling: str = SAMPLING, mm_beta: float | None = None,
           hist_dtype=HIST_DTYPE, errors: str = "auto", batches: int | None = None):
    """Monte Carlo DMFT of the committee (engine 'dmft-mc'): one Snapshot per recording step
    (every ``exp.record_every`` grid steps, and the last), yielded as soon as it is solved.

    Values (train_loss, test_loss = eg + noise^2/2, test_error = eg, m = tr(M)/k, Q = tr(Q)/k,
    cosine, Q_a_b, M_a_b; :func:`solver.committee.observables.metrics`) come from the population
    of ``exp.samples`` trajectories, standard errors from ``replicas`` smaller independent
    populations (:func:`replica_plan`). ``extras['kernels']`` (last snapshot, if ``kernels``):
    :meth:`Population.kernels`. Raises SolverError (after yielding what was computed) when the
    main population diverges; ConfigError for a non-committee model. ``relu_width``: relu
    kernel width relative to the field's scale (default :func:`relu_width_for` of N, the same
    in every population); ``tangent_fraction``: share of each population that carries the
    tangent (default :func:`tangent_fraction_for` of N); ``hist_dtype``: storage of the
    per-trajectory histories (:data:`HIST_DTYPE`; ``np.float64`` for the old engine).

    ``errors`` (:data:`ERRORS`, :func:`errors_for`): with 'batches' there is no main
    population: ``batches`` (default :func:`batch_plan`) independent populations of
    ``n = N // r``, each with the sampling and tangent fraction of its own size ``n``
    (:func:`sampling_for`, :func:`batch_tangent_fraction`) and the relu width of N; values and
    ``extras['kernels']`` are the means over the populations, se = sd / sqrt(r); any population
    diverging raises SolverError (the mean is then undefined)."""
    from ..snapshot import Snapshot

    check(exp)
    if errors_for(exp.samples, errors, replicas) == "batches":
        yield from _stream_batches(exp, cancel, batches, kappa_mode, mm_estimator, kernels,
                                   relu_width, tangent_fraction, kappa_estimator, init_sampling,
                                   mm_beta, hist_dtype)
        return
    K = exp.steps
    sizes = replica_plan(exp.samples, replicas, divisor, min_replica)
    seqs = np.random.SeedSequence(exp.seed).spawn(len(sizes))
    # every population uses the main one's relu kernel width, so that the replica spread
    # estimates the main population's Monte Carlo error (the kernel's bias is not in it)
    width = relu_width if relu_width is not None else relu_width_for(sizes[0])
    frac = tangent_fraction if tangent_fraction is not None else tangent_fraction_for(sizes[0])
    init_sampling = sampling_for(sizes[0], init_sampling)
    # The replicas draw i.i.d. normals ('mc') whatever the main population uses: the rescaled
    # replica spread is then the plain Monte Carlo error at N, whose 1/N law holds, and an upper
    # bound of the quasi-random error (measured: the spread of 'qmc_steps' solves, 0.71% and
    # 0.37% at N = 8000 and 64000, below plain MC's 1.18% and 0.49%, falls more slowly than
    # 1/sqrt(N) above N = 16000, so rescaling quasi-random replicas of N/4 understated it, 0.15%
    # reported at N = 64000; docs/committee.md "Which error figure is right").
    with _small_pages():
        pops = [Population(exp, n, sq, kappa_mode, mm_estimator, width, frac, kappa_estimator,
                           init_sampling if g == 0 else "mc", mm_beta, hist_dtype)
                for g, (n, sq) in enumerate(zip(sizes, seqs))]
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
            raise _diverged(exp, s)
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


@contextlib.contextmanager
def _small_pages():
    """Allocate without numpy's transparent-huge-page advice. The histories of a large solve
    (2.7 GB at N = 600000) were then faulted in as 2 MB pages, each zeroed (and compacted for)
    on first touch: building and first stepping 18 populations of 33333 took 2.1 + 1.5 s
    against 0.34 + 0.15 s with 4 kB pages, and the first snapshot of the benchmark came after
    4.9 s instead of 0.7 s (whole solve 52.1 against 48.3 s; 2026-11-27)."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # pragma: no cover  (numpy < 2 or a private name moved)
        yield
        return
    old = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(old)


def _diverged(exp, s, where=""):
    """The SolverError of a population that became non-finite at grid step ``s``."""
    from ..snapshot import SolverError

    return SolverError(f"diverged at t={s * exp.dt:.4g} (grid step {s}{where}): "
                       + ("lower tau or dt" if exp.tau > 0 else "lower dt"),
                       parameter="tau" if exp.tau > 0 else "dt")


def _stream_batches(exp, cancel, batches, kappa_mode, mm_estimator, kernels, relu_width,
                    tangent_fraction, kappa_estimator, init_sampling, mm_beta, hist_dtype):
    """:func:`stream` with ``errors='batches'``: :func:`batch_plan` populations in lockstep."""
    K = exp.steps
    sizes = batch_plan(exp.samples, batches)
    r, n = len(sizes), sizes[0]
    seqs = np.random.SeedSequence(exp.seed).spawn(r)
    # relu: the kernel width of the whole solve (its variance O(1/(n eps)) averages over the
    # r populations like that of one population of N; RELU_MIN_WIDTH bounds it below)
    width = relu_width if relu_width is not None else relu_width_for(exp.samples)
    frac = tangent_fraction if tangent_fraction is not None else batch_tangent_fraction(n)
    sampling = sampling_for(n, init_sampling)
    with _small_pages():
        pops = [Population(exp, n, sq, kappa_mode, mm_estimator, width, frac, kappa_estimator,
                           sampling, mm_beta, hist_dtype) for sq in seqs]
    with _PopulationWorkers() as workers:
        for s in range(K + 1):
            if cancel is not None and cancel.is_set():
                return
            try:
                workers.step(pops, s, cancel)
            except Cancelled:
                return
            for g, p in enumerate(pops):
                if not p.finite(s):
                    raise _diverged(exp, s, f", population {g + 1} of {r}")
            yield from _batch_snapshot(exp, pops, s, kernels)


class _PopulationWorkers:
    """Steps independent populations side by side: one Python thread per numba thread, each
    running its populations' kernels on one thread (the kernels release the GIL). One
    population's step parallelises poorly over 2 threads (the serial draws, the deterministic
    part and short parallel regions between them: 1.3-1.4x measured at n = 16000); two
    populations at once on one thread each were 1.2-1.3x faster than in turn on two threads
    (4 x 16000, benchmark configuration, quiet 2 cores, 2026-11-26). Same results bit for bit:
    every population keeps its own generator."""

    def __init__(self):
        import numba

        self.threads = max(1, numba.get_num_threads())
        self._ex = None

    def __enter__(self):
        if self.threads > 1:
            import numba
            from concurrent.futures import ThreadPoolExecutor

            self._ex = ThreadPoolExecutor(self.threads, thread_name_prefix="dmft-pop",
                                          initializer=numba.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, *exc):
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)

    def step(self, pops, s, cancel):
        if self._ex is None:
            for p in pops:
                p.step(s, cancel)
            return
        futures = [self._ex.submit(p.step, s, cancel) for p in pops]
        for f in futures:
            f.result()  # re-raises Cancelled (or an error) of a population


def _batch_snapshot(exp, pops, s, kernels):
    """The batch-means Snapshot of step ``s`` (none between recording steps)."""
    from ..snapshot import Snapshot

    K, r = exp.steps, len(pops)
    if not (s % exp.record_every == 0 or s == K):
        return
    obs = _observables(exp, pops, s)
    values, se = {}, {}
    for key, x in obs.items():
        ok = bool(np.all(np.isfinite(x)))
        values[key] = float(np.mean(x)) if ok else math.nan
        se[key] = float(np.std(x, ddof=1) / math.sqrt(r)) if ok else math.nan
    extras = {}
    if kernels and s == K:
        ks = [p.kernels(s) for p in pops]
        extras["kernels"] = {key: np.mean([q[key] for q in ks], axis=0) for key in ks[0]}
    yield Snapshot(t=s * exp.dt, step=s, epochs=float(exp.epochs(s * exp.dt)), values=values,
                   se=se, extras=extras, engine=ENGINE, progress=s / K)


def solve(exp, cancel=None, callback=None, **kw):
    """Collect :func:`stream` into a Result (see :func:`solver.dmft.solve`)."""
    from ..snapshot import collect

    return collect(stream(exp, cancel, **kw), exp.to_dict(), ENGINE, cancel, callback)


run = solve
