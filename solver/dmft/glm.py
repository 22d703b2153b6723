"""Monte Carlo DMFT of the SGF for generalised linear models (width k = 1): the causal forward
sweep of THEORY.md section 4.

One *population* is a DMFT solve: ``n`` trajectories of the sample process driven by kernels
``(R, b, C, m)`` that are themselves computed from averages over those trajectories. At grid
step ``k`` (``t_k = k dt``):

1. ``R[k, :]`` and ``b[k]`` from ``G``, ``kappa`` of steps ``< k`` (parameter-process recursions);
2. ``m[k]`` and ``C[k, :k+1]`` from ``R``, ``b`` and the raw second moments
   ``M[j, j'] = E[dA_j dA_j']`` of steps ``< k``;
3. one more row of the Cholesky factor of the covariance of ``(h*, omega_0 .. omega_k)``
   (:mod:`solver.dmft.gaussian`, zero-pivot guard);
4. for every trajectory: ``omega_k`` (conditional draw), ``h_k = omega_k - sum_{j<k} R[k, j+1] dA_j``,
   ``a_k = l''``, ``w_k = dt/delta + sqrt(tau/delta) dW_k``, ``dA_k = l'(h_k) w_k`` and row ``k`` of
   the tangent ``chi[k, m] = dh_k / d eps_m`` (``m <= k``);
5. population averages: ``G[k, m] = E[a_k chi[k, m]]``, ``kappa_k``, ``M[k, :k+1]``, the train
   loss. ``kappa_k = E[dl'_k/dh*]`` (omega fixed) and the cross moments are estimated with lower
   variance than the plain samples of section 4, with the same expectation (docs/theory.md,
   "Variance reduction"): ``dW_k`` averaged analytically, the Ito cross terms of ``M``
   integrated by parts in ``dW_j``, and ``kappa`` from paths at ``h* = 0`` (sign teacher) or the
   label tangent (linear teacher); the section-4 form
   ``kappa_k = (E[l'_k h*] - sum_{m<=k} G[k, m] m_m) / rho`` is kept as ``kappa_estimator='stein'``.

The tangent row ``k`` is computed per trajectory by the *adjoint* (row) recursion instead of
storing the whole ``chi`` triangle: with ``u_j = a_j w_j``, ``chi = (I + L)^{-1}`` for the strictly
lower triangular ``L[k, j] = R[k, j+1] u_j``, so row ``v = chi[k, :]`` solves ``v (I + L) = e_k``:

    v_k = 1,   v_m = -u_m sum_{m < k' <= k} v_k' R[k', m+1]     (m = k-1 .. 0).

Same ``O(k^2)`` work per trajectory and step as the forward recursion (``O(N K^3 / 6)`` in all),
but ``O(K)`` memory per trajectory instead of ``O(K^2)``; the inner loop is a contiguous AXPY over
rows of ``R`` that stay in cache.

Several independent populations (*groups*) are advanced together: group 0 is the solve whose
curves are reported (``N = exp.samples``); groups ``1..r`` are independent replicas used for the
Monte Carlo standard errors (docs/theory.md, "Standard errors").
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import njit, parallel_chunksize, prange

from ..models import LOSS_CODES, SIGN, SQUARE, TEACHER_CODES, _sigmoid, loss_d1, teacher_label
from .gaussian import chol_append

#: Trajectories per block: the unit of parallel work and of the deterministic partial sums
#: (results do not depend on the number of threads).
BLOCK = 32
#: Blocks handed to a thread at a time (dynamic scheduling).
PAR_CHUNK = 2
#: Let LLVM fuse multiply-adds (and nothing else) in the tangent loops.
FMA = {"contract"}
#: Partial sums per block: train loss, E[l' h*], E[a], #non-finite, direct kappa sample.
_NS = 5


# --------------------------------------------------------------------------------------------
# deterministic part (one group; O(K^2) per step)
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _advance(k, dt, lam, R, b, G, kappa, work):
    """R[k, :k+1] and b[k] from step k-1 (explicit Euler of the parameter process):
    ``R[k, i] = R[k-1, i] - dt (lam R[k-1, i] + sum_{i<=j<=k-1} G[k-1, j] R[j, i])``, ``R[k, k] = 1``,
    ``b[k] = b[k-1] - dt (lam b[k-1] + sum_{j<=k-1} G[k-1, j] b[j] + kappa[k-1])``.
    (The sum over j runs along rows of R: ``work[i] = sum_j G[k-1, j] R[j, i]``.)"""
    if k == 0:
        R[0, 0] = 1.0
        b[0] = 0.0
        return
    for i in range(k):
        work[i] = 0.0
    for j in range(k):
        gj = G[k - 1, j]
        Rj = R[j]
        for i in range(j + 1):
            work[i] += gj * Rj[i]
    for i in range(k):
        R[k, i] = R[k - 1, i] - dt * (lam * R[k - 1, i] + work[i])
    R[k, k] = 1.0
    s = 0.0
    for j in range(k):
        s += G[k - 1, j] * b[j]
    b[k] = b[k - 1] - dt * (lam * b[k - 1] + s + kappa[k - 1])


@njit(cache=True, nogil=True)
def _correlate(k, delta, q0, m0, rho, R, b, M, m, C, P):
    """m[k] and C[k, :k+1] (mirrored into C[:k+1, k]):
    ``C[k, l] = R[k,0] q0 R[l,0] + R[k,0] m0 b[l] + b[k] m0 R[l,0] + b[k] rho b[l]
               + delta sum_{j<k, j'<l} R[k, j+1] M[j, j'] R[l, j'+1]``."""
    m[k] = R[k, 0] * m0 + b[k] * rho
    for jp in range(k):
        P[jp] = 0.0
    for j in range(k):  # P[jp] = sum_{j<k} R[k, j+1] M[j, jp], along rows of M
        r = R[k, j + 1]
        Mj = M[j]
        for jp in range(k):
            P[jp] += r * Mj[jp]
    for l in range(k + 1):
        s = 0.0
        for jp in range(l):
            s += P[jp] * R[l, jp + 1]
        c = (R[k, 0] * q0 * R[l, 0] + R[k, 0] * m0 * b[l] + b[k] * m0 * R[l, 0]
             + b[k] * rho * b[l] + delta * s)
        C[k, l] = c
        C[l, k] = c


@njit(cache=True, nogil=True)
def _deterministic(k, dt, lam, delta, q0, m0, rho, R, b, G, kappa, M, m, C, L, P, srow):
    """Steps 1-3 for every group (leading axis); returns the pivots of the new Cholesky rows."""
    ng = R.shape[0]
    piv = np.empty(ng)
    for g in range(ng):
        _advance(k, dt, lam, R[g], b[g], G[g], kappa[g], srow[g])
        _correlate(k, delta, q0, m0, rho, R[g], b[g], M[g], m[g], C[g], P[g])
        srow[g, 0] = m[g, k]
        for l in range(k):
            srow[g, l + 1] = C[g, k, l]
        piv[g] = chol_append(L[g], k + 1, srow[g], C[g, k, k])
    return piv


# --------------------------------------------------------------------------------------------
# tangent row by the adjoint recursion
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, fastmath=FMA)
def _tangent_row(k, R, u, v, acc):
    """v[m] = chi[k, m] (m <= k) for one trajectory with ``u[j] = a_j w_j``:
    ``v_k = 1``, ``v_m = -u_m sum_{m < k' <= k} v_k' R[k', m+1]``.

    ``acc[m]`` accumulates ``sum_{k'} v_k' R[k', m+1]`` over the rows ``k'`` already final; rows
    are retired four at a time (the first three of a group are completed by short scalar sums)
    so that each pass over ``acc`` does four multiply-adds per load/store. On return
    ``acc[j] = sum_{j < i <= k} chi[k, i] R[i, j+1] = -dh_k/d(dA_j)`` for j < k."""
    v[k] = 1.0
    for mm in range(k):
        acc[mm] = 0.0
    kp = k
    while kp >= 4:
        R1 = R[kp]
        R2 = R[kp - 1]
        R3 = R[kp - 2]
        R4 = R[kp - 3]
        v1 = v[kp]
        acc[kp - 1] += v1 * R1[kp]
        v2 = -u[kp - 1] * acc[kp - 1]
        acc[kp - 2] += v1 * R1[kp - 1] + v2 * R2[kp - 1]
        v3 = -u[kp - 2] * acc[kp - 2]
        acc[kp - 3] += v1 * R1[kp - 2] + v2 * R2[kp - 2] + v3 * R3[kp - 2]
        v4 = -u[kp - 3] * acc[kp - 3]
        v[kp - 1] = v2
        v[kp - 2] = v3
        v[kp - 3] = v4
        for mm in range(kp - 3):
            acc[mm] += v1 * R1[mm + 1] + v2 * R2[mm + 1] + v3 * R3[mm + 1] + v4 * R4[mm + 1]
        v[kp - 4] = -u[kp - 4] * acc[kp - 4]
        kp -= 4
    while kp >= 1:
        vk = v[kp]
        Rk = R[kp]
        for mm in range(kp):
            acc[mm] += vk * Rk[mm + 1]
        v[kp - 1] = -u[kp - 1] * acc[kp - 1]
        kp -= 1


@njit(cache=True, nogil=True, fastmath=FMA)
def _tangent_rows2(k, R, u, x, v, y, acc, bcc):
    """:func:`_tangent_row` for two trajectories at once (weights ``u``, ``x``; rows ``v``, ``y``;
    accumulators ``acc``, ``bcc``): each row of R is loaded once for both, which is what limits
    the single-trajectory loop."""
    v[k] = 1.0
    y[k] = 1.0
    for mm in range(k):
        acc[mm] = 0.0
        bcc[mm] = 0.0
    kp = k
    while kp >= 4:
        R1 = R[kp]
        R2 = R[kp - 1]
        R3 = R[kp - 2]
        R4 = R[kp - 3]
        v1 = v[kp]
        y1 = y[kp]
        acc[kp - 1] += v1 * R1[kp]
        bcc[kp - 1] += y1 * R1[kp]
        v2 = -u[kp - 1] * acc[kp - 1]
        y2 = -x[kp - 1] * bcc[kp - 1]
        acc[kp - 2] += v1 * R1[kp - 1] + v2 * R2[kp - 1]
        bcc[kp - 2] += y1 * R1[kp - 1] + y2 * R2[kp - 1]
        v3 = -u[kp - 2] * acc[kp - 2]
        y3 = -x[kp - 2] * bcc[kp - 2]
        acc[kp - 3] += v1 * R1[kp - 2] + v2 * R2[kp - 2] + v3 * R3[kp - 2]
        bcc[kp - 3] += y1 * R1[kp - 2] + y2 * R2[kp - 2] + y3 * R3[kp - 2]
        v4 = -u[kp - 3] * acc[kp - 3]
        y4 = -x[kp - 3] * bcc[kp - 3]
        v[kp - 1] = v2
        v[kp - 2] = v3
        v[kp - 3] = v4
        y[kp - 1] = y2
        y[kp - 2] = y3
        y[kp - 3] = y4
        for mm in range(kp - 3):
            r1 = R1[mm + 1]
            r2 = R2[mm + 1]
            r3 = R3[mm + 1]
            r4 = R4[mm + 1]
            acc[mm] += v1 * r1 + v2 * r2 + v3 * r3 + v4 * r4
            bcc[mm] += y1 * r1 + y2 * r2 + y3 * r3 + y4 * r4
        v[kp - 4] = -u[kp - 4] * acc[kp - 4]
        y[kp - 4] = -x[kp - 4] * bcc[kp - 4]
        kp -= 4
    while kp >= 1:
        Rk = R[kp]
        vk = v[kp]
        yk = y[kp]
        for mm in range(kp):
            acc[mm] += vk * Rk[mm + 1]
            bcc[mm] += yk * Rk[mm + 1]
        v[kp - 1] = -u[kp - 1] * acc[kp - 1]
        y[kp - 1] = -x[kp - 1] * bcc[kp - 1]
        kp -= 1


@njit(cache=True, nogil=True, fastmath=FMA)
def _accumulate(k, a, lp, lpi, dAi, v, acc, pG, pM, w0, cI, mibp):
    """Add one trajectory's samples of a_k chi[k, :] and E[l'_k dA_j] (j < k) to the block sums
    (``lpi``, ``dAi``: its l' and dA histories)."""
    for mm in range(k + 1):
        pG[mm] += a * v[mm]
    if mibp:
        for j in range(k):
            lj = lpi[j]
            pM[j] += lj * (w0 * lp - cI * a * lj * acc[j])
    else:
        for j in range(k):
            pM[j] += lp * dAi[j]


# --------------------------------------------------------------------------------------------
# population part (all groups; O(N k^2) per step, parallel over blocks of trajectories)
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _dl1_dy(code, h, y):
    """Partial derivative of l'(h, y) in the label y (linear teacher's kappa estimator)."""
    if code == SQUARE:
        return -1.0
    e = _sigmoid(-y * h)  # logistic: l' = -y s(-y h)
    return -e + y * h * e * (1.0 - e)


@njit(cache=True, nogil=True, inline="always")
def _loss3(code, h, y):
    """(l, l', l'') of :mod:`solver.models` in one go: the logistic loss from one exp and one
    log1p (instead of three exps), with ``l'' = y^2 e/(1+e)^2``, ``e = exp(-|y h|)``, free of the
    cancellation in ``s (1 - s)`` for large ``|h|``."""
    if code == SQUARE:
        r = h - y
        return 0.5 * r * r, r, 1.0
    x = y * h
    if x >= 0.0:
        e = math.exp(-x)
        sm = e / (1.0 + e)  # sigmoid(-x)
        lo = math.log1p(e)
    else:
        e = math.exp(x)
        sm = 1.0 / (1.0 + e)
        lo = -x + math.log1p(e)
    ope = 1.0 + e
    return lo, -y * sm, y * y * e / (ope * ope)


@njit(cache=True, nogil=True, parallel=True)
def _population_step(k, blk0, blk1, cnt, blk_group, lcode, kmode, dt, delta, tau, L, R, z,
                     hstar, y, dW, dA, u, lph, dB, dC, h, part_s, part_G, part_M, mibp):
    """Step 4 for blocks ``blk0 .. blk1-1``: fields, increments, tangent row, and per-block
    partial sums: ``part_s`` = (loss, l' h*, a, #non-finite, kappa sample), ``part_G`` =
    a_k chi[k, :], ``part_M`` = (samples of E[l'_k dA_j] for j < k, l'_k^2); the caller
    multiplies by the dW_k average (docs/theory.md, "Variance reduction"). The sample of
    E[l'_k dA_j] integrates the Gaussian dW_j by parts:
    ``(dt/delta) l'_k l'_j - (tau dt/delta) a_k l'_j^2 acc_j`` (``acc_j = -dh_k/d dA_j``) if
    ``mibp``, else the plain sample ``l'_k dA_j``.

    Layout: per-trajectory histories are ``[block, time, lane]`` (``BLOCK`` lanes, ``cnt[b]``
    used), so that a block's past at step k is one contiguous stretch and the O(k) sums run
    over lanes.

    ``kmode`` selects the direct kappa estimator (docs/theory.md, "Variance reduction"):
    1 (sign teacher): each trajectory also carries two paths with h* = 0 (omega drawn without
    its z_0 term, i.e. from the law conditional on h* = 0) and labels +1 / -1, increments in
    ``dB`` / ``dC``; the sample is l'_k(+) - l'_k(-). 2 (linear teacher): the label tangent
    eta_k = dh_k/dy with increments ``dB_j = w_j (a_j eta_j + dl'_j/dy)``; the sample is
    a_k eta_k + dl'_k/dy. 0: none."""
    w0 = dt / delta
    sq = math.sqrt(tau / delta)
    cI = tau * dt / delta
    B = z.shape[2]
    for ib in prange(blk0, blk1):
        c = cnt[ib]
        g = blk_group[ib]
        Lr = L[g, k + 1]
        Rg = R[g]
        Rk = Rg[k]
        ps = part_s[ib]
        pG = part_G[ib]
        pM = part_M[ib]
        for i in range(_NS):
            ps[i] = 0.0
        for j in range(k + 1):
            pG[j] = 0.0
            pM[j] = 0.0
        zb = z[ib]
        dAb = dA[ib]
        ub = u[ib]
        lphb = lph[ib]
        dBb = dB[ib]
        # fields: O(k) sums over the block's contiguous past, vectorised over lanes
        om0 = np.zeros(B)  # omega_k without the h* term: its law given h* = 0
        for j in range(1, k + 2):
            lj = Lr[j]
            zj = zb[j]
            for i in range(c):
                om0[i] += lj * zj[i]
        hk = np.empty(B)
        l0 = Lr[0]
        for i in range(c):
            hk[i] = om0[i] + l0 * zb[0, i]
        for j in range(k):
            r = Rk[j + 1]
            dj = dAb[j]
            for i in range(c):
                hk[i] -= r * dj[i]
        hp = np.empty(B)
        hm = np.empty(B)
        if kmode == 1:
            dCb = dC[ib]
            for i in range(c):
                hp[i] = om0[i]
                hm[i] = om0[i]
            for j in range(k):
                r = Rk[j + 1]
                bj = dBb[j]
                cj = dCb[j]
                for i in range(c):
                    hp[i] -= r * bj[i]
                    hm[i] -= r * cj[i]
        elif kmode == 2:
            for i in range(c):
                hp[i] = 0.0  # the label tangent eta_k
            for j in range(k):
                r = Rk[j + 1]
                bj = dBb[j]
                for i in range(c):
                    hp[i] -= r * bj[i]
        ak = np.empty(B)
        lpk = np.empty(B)
        good = np.zeros(B, dtype=np.bool_)
        for i in range(c):
            hh = hk[i]
            yi = y[ib, i]
            lo, lp, a = _loss3(lcode, hh, yi)
            w = w0 + sq * dW[ib, i]
            dak = lp * w
            dAb[k, i] = dak
            ub[k, i] = a * w
            lphb[k, i] = lp
            h[ib, i] = hh
            ksamp = 0.0
            if kmode == 1:
                lpp = loss_d1(lcode, hp[i], 1.0)
                lpm = loss_d1(lcode, hm[i], -1.0)
                dBb[k, i] = lpp * w
                dC[ib, k, i] = lpm * w
                ksamp = lpp - lpm
            elif kmode == 2:
                ksamp = a * hp[i] + _dl1_dy(lcode, hh, yi)
                dBb[k, i] = w * ksamp
            if not (math.isfinite(lo) and math.isfinite(dak) and math.isfinite(a)
                    and math.isfinite(ksamp)):
                ps[3] += 1.0
                continue
            good[i] = True
            ak[i] = a
            lpk[i] = lp
            ps[0] += lo
            ps[1] += lp * hstar[ib, i]
            ps[2] += a
            ps[4] += ksamp
            pM[k] += lp * lp
        # tangent rows (O(k^2) per trajectory), two lanes at a time, from per-lane contiguous
        # copies of the histories u, l' (and dA for the plain cross moments)
        UT = np.empty((c, k + 1))
        LT = np.empty((c, k + 1))
        AT = np.empty((c if not mibp else 1, k + 1))
        for j in range(k + 1):
            uj = ub[j]
            lj = lphb[j]
            for i in range(c):
                UT[i, j] = uj[i]
                LT[i, j] = lj[i]
            if not mibp:
                aj = dAb[j]
                for i in range(c):
                    AT[i, j] = aj[i]
        v = np.empty(k + 1)
        vv = np.empty(k + 1)
        acc = np.empty(k + 1)
        bcc = np.empty(k + 1)
        i = 0
        while i < c:
            if not good[i]:
                i += 1
                continue
            i2 = i + 1
            while i2 < c and not good[i2]:
                i2 += 1
            ia = i if not mibp else 0
            if i2 < c:
                ia2 = i2 if not mibp else 0
                _tangent_rows2(k, Rg, UT[i], UT[i2], v, vv, acc, bcc)
                _accumulate(k, ak[i], lpk[i], LT[i], AT[ia], v, acc, pG, pM, w0, cI, mibp)
                _accumulate(k, ak[i2], lpk[i2], LT[i2], AT[ia2], vv, bcc, pG, pM, w0, cI, mibp)
                i = i2 + 1
            else:
                _tangent_row(k, Rg, UT[i], v, acc)
                _accumulate(k, ak[i], lpk[i], LT[i], AT[ia], v, acc, pG, pM, w0, cI, mibp)
                i += 1


# --------------------------------------------------------------------------------------------
# Python driver
# --------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Raised inside :meth:`Populations.step` when the cancel flag is seen between chunks."""


class Populations:
    """Independent DMFT populations of sizes ``sizes`` advanced together, one grid step at a time.

    Attributes per group ``g`` (leading axis): ``R, C, G, M, L`` (K+1 square), ``b, m, kappa``,
    ``train, Elh`` (per step). Per-trajectory arrays are ``[block, time, lane]``
    (:meth:`series`, :meth:`fields`). Randomness: one ``numpy.random.Generator`` per group, seeded
    from ``SeedSequence(seed).spawn``: group 0's numbers do not depend on the number of replicas.

    ``kappa_estimator``: 'direct' (default; boundary pairs for the sign teacher, label tangent
    for the linear teacher) or 'stein' (``kappa_k = (E[l'_k h*] - sum_m G[k, m] m_m) / rho``, the
    formula of THEORY.md section 4; unbiased too, with a far larger variance). Both are
    recorded: ``kappa_direct`` and ``kappa_stein``. ``m_estimator``: 'ibp' (default) or 'plain'
    sample of the cross moments ``E[dA_k dA_j]`` (see :func:`_population_step`).

    ``kernels_from`` (Picard baseline only): use these arrays (G, kappa, M) instead of the
    population's own when advancing ``R, b, C, m``; the population's averages still go into
    ``G, kappa, M``.
    """

    #: target work (inner multiply-adds) per parallel call, so that cancel is seen quickly
    CHUNK_WORK = 6e7

    def __init__(self, exp, sizes, seed=None, seed_seqs=None, kappa_estimator="direct",
                 m_estimator="ibp"):
        self.exp = exp
        self.K = K = exp.steps
        self.sizes = np.asarray(sizes, dtype=np.int64)
        ng = len(self.sizes)
        self.ng = ng
        self.lcode = LOSS_CODES[exp.loss]
        tcode = TEACHER_CODES[exp.teacher]
        self.dt, self.lam, self.delta, self.tau = exp.dt, exp.lam, exp.delta, exp.tau
        self.q0, self.m0, self.rho = exp.q0, exp.m0, exp.rho
        Kp = K + 1
        self.R = np.zeros((ng, Kp, Kp))
        self.C = np.zeros((ng, Kp, Kp))
        self.G = np.zeros((ng, Kp, Kp))
        self.M = np.zeros((ng, Kp, Kp))
        self.L = np.zeros((ng, Kp + 1, Kp + 1))
        self.L[:, 0, 0] = math.sqrt(exp.rho)  # variable 0 is h* ~ N(0, rho)
        self.b = np.zeros((ng, Kp))
        self.m = np.zeros((ng, Kp))
        self.kappa = np.zeros((ng, Kp))
        self.train = np.full((ng, Kp), np.nan)
        self.Elh = np.zeros((ng, Kp))
        self.pivots = np.zeros((ng, Kp))
        self._P = np.zeros((ng, Kp))
        self._srow = np.zeros((ng, Kp + 1))
        self.kappa_direct = np.zeros((ng, Kp))
        self.kappa_stein = np.zeros((ng, Kp))
        self.kernels_from = None
        if kappa_estimator not in ("direct", "stein"):
            raise ValueError(f"kappa_estimator must be 'direct' or 'stein', got {kappa_estimator!r}")
        self.kappa_estimator = kappa_estimator
        if m_estimator not in ("ibp", "plain"):
            raise ValueError(f"m_estimator must be 'ibp' or 'plain', got {m_estimator!r}")
        self.m_estimator = m_estimator
        self.kmode = 1 if tcode == SIGN else 2
        self.flip = exp.flip
        # blocks of BLOCK lanes; blocks never straddle groups (only a group's last is partial)
        bg, cnt = [], []
        for g in range(ng):
            n_g = int(self.sizes[g])
            for a in range(0, n_g, BLOCK):
                bg.append(g)
                cnt.append(min(BLOCK, n_g - a))
        self.blk_group = np.array(bg, dtype=np.int64)
        self.cnt = np.array(cnt, dtype=np.int64)
        self.grp_blk = np.searchsorted(self.blk_group, np.arange(ng + 1))  # blocks of group g
        nb = len(bg)
        self.part_s = np.zeros((nb, _NS))
        self.part_G = np.zeros((nb, Kp))
        self.part_M = np.zeros((nb, Kp))
        # per-trajectory state, [block, time, lane]
        B = BLOCK
        self.z = np.zeros((nb, Kp + 1, B))
        self.dA = np.zeros((nb, Kp, B))
        self.u = np.zeros((nb, Kp, B))
        self.lph = np.zeros((nb, Kp, B))
        self.dB = np.zeros((nb, Kp, B))
        self.dC = np.zeros((nb, Kp, B) if self.kmode == 1 else (1, 1, B))
        self.h = np.zeros((nb, B))
        self.hstar = np.zeros((nb, B))
        self.y = np.zeros((nb, B))
        self.dW = np.zeros((nb, B))
        if seed_seqs is None:
            seed_seqs = np.random.SeedSequence(exp.seed if seed is None else seed).spawn(ng)
        self.rngs = [np.random.Generator(np.random.PCG64(s)) for s in seed_seqs]
        for g, rng in enumerate(self.rngs):
            n = int(self.sizes[g])
            z0 = rng.standard_normal(n)
            gauss = rng.standard_normal(n)
            unif = rng.random(n)
            hs = math.sqrt(exp.rho) * z0
            self._put(self.z[:, 0, :], g, z0)
            self._put(self.hstar, g, hs)
            self._put(self.y, g, _labels(tcode, hs, gauss, unif, exp.noise, exp.flip))
        self.k = -1  # last completed step

    # ---------------------------------------------------------------------------------------
    def step(self, k, cancel=None):
        """Solve grid step ``k`` (steps must be taken in order 0, 1, ..., K)."""
        assert k == self.k + 1
        if self.kernels_from is not None:
            Gs, ks, Ms = self.kernels_from
        else:
            Gs, ks, Ms = self.G, self.kappa, self.M
        self.pivots[:, k] = _deterministic(k, self.dt, self.lam, self.delta, self.q0, self.m0,
                                           self.rho, self.R, self.b, Gs, ks, Ms, self.m, self.C,
                                           self.L, self._P, self._srow)
        sdt = math.sqrt(self.dt)
        for g, rng in enumerate(self.rngs):
            n = int(self.sizes[g])
            self._put(self.z[:, k + 1, :], g, rng.standard_normal(n))
            if self.tau > 0:
                self._put(self.dW, g, sdt * rng.standard_normal(n))
        nb = len(self.cnt)
        per_traj = 0.5 * k * k + 4.0 * k + 16.0
        chunk = max(1, int(self.CHUNK_WORK / (per_traj * BLOCK)))
        for b0 in range(0, nb, chunk):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            with parallel_chunksize(PAR_CHUNK):  # dynamic scheduling: robust on shared cores
                _population_step(k, b0, min(b0 + chunk, nb), self.cnt, self.blk_group,
                                 self.lcode, self.kmode, self.dt, self.delta,
                                 self.tau, self.L, self.R, self.z, self.hstar, self.y, self.dW,
                                 self.dA, self.u, self.lph, self.dB, self.dC, self.h,
                                 self.part_s, self.part_G, self.part_M,
                                 self.m_estimator == "ibp")
        # reduce partial sums per group, in block order (deterministic)
        for g in range(self.ng):
            sel = slice(self.grp_blk[g], self.grp_blk[g + 1])
            n = float(self.sizes[g])
            s = self.part_s[sel].sum(axis=0)
            Grow = self.part_G[sel, : k + 1].sum(axis=0) / n
            Mrow = self.part_M[sel, : k + 1].sum(axis=0) / n
            # E over dW_k given the past (docs/theory.md, "Variance reduction")
            Mrow[:k] *= self.dt / self.delta
            Mrow[k] *= (self.dt / self.delta) ** 2 + self.tau * self.dt / self.delta
            if s[3] > 0:
                s[0] = np.nan  # a non-finite field: the group has diverged
            self.train[g, k] = s[0] / n
            self.Elh[g, k] = s[1] / n
            self.G[g, k, : k + 1] = Grow
            self.M[g, k, : k + 1] = Mrow
            self.M[g, : k + 1, k] = Mrow
            self.kappa_stein[g, k] = (s[1] / n - Grow @ self.m[g, : k + 1]) / self.rho
            if self.kmode == 1:  # density of h* at 0 times the flip factor
                kd = (1.0 - 2.0 * self.flip) / math.sqrt(2.0 * math.pi * self.rho) * s[4] / n
            else:
                kd = s[4] / n
            self.kappa_direct[g, k] = kd
            self.kappa[g, k] = kd if self.kappa_estimator == "direct" else self.kappa_stein[g, k]
        self.k = k

    # ---------------------------------------------------------------------------------------
    def diverged(self, k, bound=1e10):
        """Boolean per group: a non-finite value or an exploding overlap at step k."""
        scale = max(1.0, self.q0, self.rho)
        vals = np.stack([self.train[:, k], self.m[:, k], self.C[:, k, k], self.kappa[:, k],
                         self.M[:, k, k]])
        bad = ~np.all(np.isfinite(vals), axis=0)
        bad |= np.abs(self.C[:, k, k]) > bound * scale
        return bad

    # ---------------------------------------------------------------------------------------
    def _put(self, view, g, values):
        """Write group g's per-trajectory values into a ``[block, lane]`` view."""
        b0, b1 = self.grp_blk[g], self.grp_blk[g + 1]
        tmp = np.zeros((b1 - b0) * BLOCK)
        tmp[: values.size] = values
        view[b0:b1] = tmp.reshape(b1 - b0, BLOCK)

    def _locate(self, g, n):
        b = self.grp_blk[g] + n // BLOCK
        return b, n % BLOCK

    def fields(self, g=0):
        """Current fields h_k of group g's trajectories (copy)."""
        b0, b1 = self.grp_blk[g], self.grp_blk[g + 1]
        return self.h[b0:b1].reshape(-1)[: self.sizes[g]].copy()

    def series(self, name, n, g=0):
        """History (over time) of per-trajectory array ``name`` ('z', 'dA', 'u', 'lph', 'dB',
        'dC') for trajectory n of group g; scalars ('h', 'hstar', 'y') give a number."""
        b, i = self._locate(g, n)
        arr = getattr(self, name)
        return arr[b, :, i].copy() if arr.ndim == 3 else float(arr[b, i])

    def kernels(self, g=0, k=None):
        """Kernel matrices of group g up to step k: t, C (symmetric), R (lower, NaN above),
        Gamma = G/dt for m < k (the regular part as a density; NaN on and above the diagonal),
        Gamma_inst = G[k, k] = E[l''(h_k)] (the instantaneous part), kappa, b."""
        k = self.k if k is None else k
        s = slice(0, k + 1)
        lower = np.tril(np.ones((k + 1, k + 1), dtype=bool))
        strict = np.tril(lower, -1)
        R = np.where(lower, self.R[g, s, s], np.nan)
        Gam = np.where(strict, self.G[g, s, s] / self.dt, np.nan)
        return dict(t=np.arange(k + 1) * self.dt, C=self.C[g, s, s].copy(), R=R, Gamma=Gam,
                    Gamma_inst=np.diag(self.G[g, s, s]).copy(), kappa=self.kappa[g, s].copy(),
                    b=self.b[g, s].copy())


def _labels(tcode, hs, gauss, unif, noise, flip):
    out = np.empty_like(hs)
    _labels_kernel(tcode, hs, gauss, unif, noise, flip, out)
    return out


@njit(cache=True, nogil=True)
def _labels_kernel(tcode, hs, gauss, unif, noise, flip, out):
    for i in range(hs.shape[0]):
        out[i] = teacher_label(tcode, hs[i], gauss[i], unif[i], noise, flip)


# --------------------------------------------------------------------------------------------
# the engine: stream of Snapshots
# --------------------------------------------------------------------------------------------
ENGINE = "dmft-mc"
#: Number of independent replica populations used for the standard errors.
REPLICAS = 8
#: Replica size: samples // REPLICA_DIVISOR, but at least MIN_REPLICA (and at most samples):
#: the replicas add REPLICAS / REPLICA_DIVISOR = 25% to the work of a large solve.
#: Populations below about 1000 trajectories are noisier than 1/N extrapolates (measured,
#: docs/theory.md), so smaller replicas would overstate the error of the main population.
REPLICA_DIVISOR = 32
MIN_REPLICA = 1000
#: Field histogram: HIST_BINS equal bins over mean +- HIST_SIGMAS std (the simulator's layout).
HIST_BINS = 60
HIST_SIGMAS = 5.0
#: Points of the theta density grid (+- 5 sqrt(Q)).
DENSITY_POINTS = 201
OBS = ("train_loss", "test_loss", "test_error", "m", "Q", "cosine")


def replica_plan(N: int, replicas: int = REPLICAS, divisor: int = REPLICA_DIVISOR,
                 min_size: int = MIN_REPLICA):
    """Population sizes: ``[N] + [n_rep] * replicas`` with
    ``n_rep = min(N, max(N // divisor, min_size))``; just ``[N]`` if ``replicas < 2``."""
    if replicas < 2:
        return [N]
    n_rep = min(N, max(N // divisor, min_size))
    return [N] + [n_rep] * replicas


def memory_bytes(exp, sizes) -> int:
    """Memory the populations hold: per trajectory about 6 (K+1) doubles of history (z, dA, u,
    l', and the two kappa paths), per population 6 (K+1)^2 doubles (R, C, G, M, L, ...)."""
    Kp = exp.steps + 1
    ntraj = sum(-(-int(n) // BLOCK) * BLOCK for n in sizes)
    return 8 * (ntraj * (6 * Kp + 5) + len(sizes) * 6 * Kp * Kp)


def check_memory(exp, sizes, fraction=0.5):
    """ConfigError('samples') if the solve would need more than ``fraction`` of the RAM."""
    from ..config import ConfigError

    need = memory_bytes(exp, sizes)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    if need > fraction * ram:
        raise ConfigError("samples", f"the Monte Carlo DMFT would need {need / 2**30:.1f} GiB for "
                                     f"samples={exp.samples} and {exp.steps} grid steps (this "
                                     f"machine has {ram / 2**30:.0f} GiB): lower samples or T, "
                                     "or raise dt")


def epochs(exp, t):
    """SGF convention: t/(tau delta) passes; at tau = 0 (GD with step dt) t/dt."""
    return t / (exp.tau * exp.delta) if exp.tau > 0 else t / exp.dt


def observables(pop, k, exp) -> dict:
    """train_loss, test_loss, test_error, m, Q, cosine of every group at step k (arrays over
    groups). Test quantities from (m, Q) (:func:`solver.observables.metrics`); the test loss,
    a quadrature, is evaluated at group 0's (m, Q) and linearised around it for the replicas,
    whose deviations (order 1/sqrt(n_rep)) only feed the standard error."""
    from ..observables import metrics, test_error

    m = pop.m[:, k].copy()
    Q = np.maximum(pop.C[:, k, k], 0.0)
    out = {"train_loss": pop.train[:, k].copy(), "m": m, "Q": pop.C[:, k, k].copy()}
    with np.errstate(all="ignore"):
        if exp.teacher == "sign":
            out["test_error"] = np.asarray(test_error(m, Q, exp.rho, exp.flip), float)
        else:
            out["test_error"] = np.full(m.shape, np.nan)
        out["cosine"] = np.where(Q > 0, m / np.sqrt(np.maximum(Q, 1e-300) * exp.rho), 0.0)
        m0, q0 = m[0], Q[0]
        hm = 1e-6 * max(abs(m0), math.sqrt(q0), 1e-3)
        hq = 1e-6 * max(q0, 1e-6)
        tl = np.asarray(metrics(np.array([m0, m0 + hm, m0]), np.array([q0, q0, q0 + hq]),
                                exp)["test_loss"], float)
        lin = tl[0] + (tl[1] - tl[0]) / hm * (m - m0) + (tl[2] - tl[0]) / hq * (Q - q0)
    lin[0] = tl[0]
    out["test_loss"] = lin
    return out


def field_hist(h):
    """(edges, density): HIST_BINS bins over mean +- HIST_SIGMAS std, density normalised by the
    total count (as the simulator's ``field_hist``)."""
    mean = float(np.mean(h))
    std = float(np.std(h))
    half = HIST_SIGMAS * std if std > 1e-12 * max(1.0, abs(mean)) else 1.0
    counts, edges = np.histogram(h, bins=HIST_BINS, range=(mean - half, mean + half))
    return edges, counts / (h.size * (2 * half / HIST_BINS))


def theta_density(Q):
    """(x, p) of N(0, Q) on +- 5 sqrt(Q): the exact law of a parameter row (docs/theory.md)."""
    s = math.sqrt(Q)
    x = np.linspace(-5 * s, 5 * s, DENSITY_POINTS)
    return x, np.exp(-0.5 * x * x / Q) / math.sqrt(2 * math.pi * Q)


def stream(exp, cancel=None, replicas: int = REPLICAS, divisor: int = REPLICA_DIVISOR,
           min_replica: int = MIN_REPLICA, **population_options):
    """Monte Carlo DMFT (engine 'dmft-mc'): one Snapshot per recording step (every
    ``exp.record_every`` grid steps, and the last), each yielded as soon as its step is solved.

    Values come from the population of ``exp.samples`` trajectories. Standard errors come from
    ``replicas`` independent populations of ``n_rep`` trajectories (:func:`replica_plan`): the
    sample standard deviation of an observable over the replicas times ``sqrt(n_rep/samples)``
    (the variance of every curve falls like 1/N; docs/theory.md, "Standard errors").
    Raises SolverError (after yielding what was computed) when the main population diverges.
    """
    from ..snapshot import Snapshot, SolverError

    exp.validate()
    K = exp.steps
    N = int(exp.samples)
    sizes = replica_plan(N, replicas, divisor, min_replica)
    check_memory(exp, sizes)
    pop = Populations(exp, sizes, **population_options)
    alive = np.ones(len(sizes), dtype=bool)
    scale = math.sqrt(sizes[-1] / N) if len(sizes) > 1 else math.nan
    kernel_every = max(1, int(round(0.1 * K)))
    next_kernels = kernel_every
    for k in range(K + 1):
        if cancel is not None and cancel.is_set():
            return
        try:
            pop.step(k, cancel)
        except Cancelled:
            return
        bad = pop.diverged(k)
        if bad[0]:
            raise SolverError(f"diverged at t={k * exp.dt:.4g} (grid step {k}): "
                              + ("lower tau or dt" if exp.tau > 0 else "lower dt"),
                              parameter="tau" if exp.tau > 0 else "dt")
        alive &= ~bad  # a diverged replica no longer counts towards the errors
        if not (k % exp.record_every == 0 or k == K):
            continue
        obs = observables(pop, k, exp)
        values = {name: float(obs[name][0]) for name in OBS}
        reps = np.flatnonzero(alive[1:]) + 1
        se = {}
        for name in OBS:
            if len(reps) >= 2 and math.isfinite(values[name]):
                se[name] = float(np.std(obs[name][reps], ddof=1) * scale)
            else:
                se[name] = math.nan
        t = k * exp.dt
        extras = {"field_hist": field_hist(pop.fields(0))}
        if values["Q"] > 0:
            extras["theta_density"] = theta_density(values["Q"])
        if k >= next_kernels or k == K:
            extras["kernels"] = pop.kernels(0, k)
            while next_kernels <= k:
                next_kernels += kernel_every
        yield Snapshot(t=t, step=k, epochs=float(epochs(exp, t)), values=values, se=se,
                       extras=extras, engine=ENGINE, progress=k / K)


def solve(exp, cancel=None, callback=None, **kw):
    """Collect :func:`stream` into a Result (see :func:`solver.dmft.solve`)."""
    from ..snapshot import collect

    return collect(stream(exp, cancel, **kw), exp.to_dict(), ENGINE, cancel, callback)