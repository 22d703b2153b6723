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
but ``O(K)`` memory per trajectory instead of ``O(K^2)``. It runs for all trajectories of a block
at once, vectorised over them (:func:`_tangent_lanes`: the block's ``u`` history is already
``[time, lane]``), with the rows of ``R`` retired eight at a time as a rank-8 update.

Large populations compute the tangent (and the kappa paths) on a subset of ``N_t`` of their
trajectories only (:func:`tangent_plan`: ``N_t = min(N, max(4096, N/4))``): ``G``, ``kappa`` and
the tangent part of the cross moments are averaged over those, fields, the rest of ``M`` and the
train loss over all ``N`` (same expectations; docs/theory.md, "Subset tangent").

Per-trajectory histories are stored as :data:`HIST_DTYPE` (float32: half the memory traffic of
the O(k) passes, which dominate the field part); the O(k) sums over them and the sums over a
block's lanes run in the same precision (float32 copies ``Lt``, ``Rt`` of the rows of L and R;
population sums and kernels stay float64; docs/theory.md, "Float32 histories"), and so do the
tangent rows ("Float32 tangent"). The Gaussian draws come from a
counter-based generator inside the parallel step (:func:`_normal_pair`; results independent of
the number of threads) and are stored as int16 codes (:data:`ZQ`); ``dA`` is not stored but
formed from ``l'`` and the noise codes (docs/theory.md, "Random numbers").

Several independent populations (*groups*) are advanced together: group 0 is the solve whose
curves are reported (``N = exp.samples``); groups ``1..r`` are independent replicas used for the
Monte Carlo standard errors (docs/theory.md, "Standard errors").
"""
from __future__ import annotations

import math
import os

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, parallel_chunksize, prange, types
from numba.extending import intrinsic

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
#: Storage type of the per-trajectory histories (l', u, kappa paths), and the precision of the
#: O(k) sums over them and of the tangent rows (population sums stay float64); float32 halves
#: the memory traffic and doubles the lanes per vector instruction of the field and cross-moment
#: passes, and changes the curves by far less than their Monte Carlo error (measured,
#: docs/theory.md "Float32 histories";
#: tests/test_dmft_mc.py::test_float32_histories_are_harmless). ``np.float64`` restores the old
#: storage; ``Populations(hist_dtype=...)`` overrides it per solve.
HIST_DTYPE = np.float32
#: The Gaussian draws (``z``: the field's innovations; ``xi``: the SGF noise, ``dW = sqrt(dt) xi``)
#: are stored as int16 codes ``round(ZQ x)`` (|x| <= 32767 / ZQ = 8) and used as the exact values
#: ``code / ZQ`` (the quantisation changes the variance of a draw by 1/(12 ZQ^2) = 5e-9 relative;
#: docs/theory.md, "Random numbers"). A quarter of the bytes of the float64 draws: the field
#: part of the sweep is memory-bound.
ZQ = 4096.0
ZS = 1.0 / ZQ
DRAW_DTYPE = np.int16


# --------------------------------------------------------------------------------------------
# counter-based random numbers: draw (group key, trajectory, step) -> normals, no state
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _mix64(x):
    """SplitMix64 finaliser (a bijection of uint64 with full avalanche)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _hash_u64(ka, kb, n, s, j):
    """64 random bits for (trajectory n, step slot s, stream j < 4) under the group key (ka, kb):
    two keyed SplitMix64 rounds of the counter ``(n 2^24 + s) 4 + j`` (distinct for n < 2^38,
    s < 2^24)."""
    c = ((np.uint64(n) << np.uint64(24)) + np.uint64(s)) * np.uint64(4) + np.uint64(j)
    return _mix64(_mix64(c + ka) ^ kb)


@njit(cache=True, nogil=True, inline="always")
def _uniform(ka, kb, n, s, j):
    """U(0, 1] with 53 random bits."""
    return (float(_hash_u64(ka, kb, n, s, j) >> np.uint64(11)) + 1.0) * 1.1102230246251565e-16


@intrinsic
def _f2i(typingctx, x):
    """Bits of a float64 as int64 (a bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], llvm_ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _i2f(typingctx, x):
    """float64 with the bits of an int64 (a bitcast)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], llvm_ir.DoubleType())
    return types.float64(types.int64), codegen


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _log_pos(v):
    """ln v for a normal float64 v > 0, branch-free (vectorisable): v = 2^e f with f in
    [sqrt(1/2), sqrt(2)), ln f = 2 atanh(s), s = (f-1)/(f+1), |s| < 0.172, series to s^15
    (relative error < 1e-13)."""
    bits = _f2i(v)
    e = (bits >> 52) - 1023
    f = _i2f((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)  # [1, 2)
    big = f > 1.4142135623730951
    f = f * (1.0 - 0.5 * big)
    e = e + big
    s = (f - 1.0) / (f + 1.0)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return e * 0.6931471805599453 + 2.0 * s * p


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _sincos_turn(x):
    """(cos, sin)(2 pi u) for u = (top 53 bits of x) / 2^53, branch-free: the top two bits pick
    the quadrant, the angle within it is pi/4 + a with |a| <= pi/4 (Taylor series to a^15 / a^16,
    absolute error < 1e-15)."""
    q = x >> np.uint64(62)
    t = float((x >> np.uint64(11)) & np.uint64(0x7FFFFFFFFFFFF)) * (1.0 / 2251799813685248.0)
    a = (t - 0.5) * 1.5707963267948966
    a2 = a * a
    sn = a * (1.0 + a2 * (-1.0 / 6 + a2 * (1.0 / 120 + a2 * (-1.0 / 5040 + a2 * (
        1.0 / 362880 + a2 * (-1.0 / 39916800 + a2 * (1.0 / 6227020800 + a2 * (
            -1.0 / 1307674368000))))))))
    cs = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24 + a2 * (-1.0 / 720 + a2 * (1.0 / 40320 + a2 * (
        -1.0 / 3628800 + a2 * (1.0 / 479001600 + a2 * (-1.0 / 87178291200 + a2 * (
            1.0 / 20922789888000))))))))
    c0 = (cs - sn) * 0.7071067811865476  # cos(pi/4 + a)
    s0 = (cs + sn) * 0.7071067811865476  # sin(pi/4 + a)
    odd = (q & np.uint64(1)) == np.uint64(1)  # rotate by q pi/2
    c1 = -s0 if odd else c0
    s1 = c0 if odd else s0
    sg = 1.0 - 2.0 * float(q >> np.uint64(1))
    return sg * c1, sg * s1


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _normal_pair(ka, kb, n, s):
    """Two independent N(0, 1) for (n, s) by Box-Muller from streams 0 (radius, u in (0, 1])
    and 1 (angle), with the branch-free :func:`_log_pos` and :func:`_sincos_turn` (within
    1e-13 of the libm values; far below the ZS quantisation)."""
    u1 = _uniform(ka, kb, n, s, 0)
    r = math.sqrt(-2.0 * _log_pos(u1))
    c, sn = _sincos_turn(_hash_u64(ka, kb, n, s, 1))
    return r * c, r * sn


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _quantise(x):
    """int16 code of a normal draw: round(ZQ x), clipped to +-32767 (|x| > 8: p = 1e-15)."""
    q = min(max(math.floor(x * ZQ + 0.5), -32767.0), 32767.0)
    return np.int16(q)


@njit(cache=True, nogil=True, error_model="numpy")
def _draw_codes(ka, kb, n0, s, c, za, zb):
    """Codes of the normal pairs of trajectories ``n0 .. n0+c-1`` at step slot ``s`` into
    ``za[:c]``, ``zb[:c]`` (one vectorised loop)."""
    for i in range(c):
        a, b = _normal_pair(ka, kb, n0 + i, s)
        za[i] = _quantise(a)
        zb[i] = _quantise(b)


@njit(cache=True, nogil=True)
def normal_codes(ka, kb, n0, n1, s, out_a, out_b):
    """The quantised normal pairs (codes) of trajectories ``n0 .. n1-1`` at step slot ``s``
    (test and inspection helper: the same numbers as the population step)."""
    _draw_codes(ka, kb, n0, s, n1 - n0, out_a, out_b)


def group_keys(seed, ng):
    """(ng, 2) uint64 keys of the groups' counter-based streams, from
    ``SeedSequence(seed).spawn(ng)``: group g's numbers depend only on (seed, g)."""
    seqs = np.random.SeedSequence(seed).spawn(ng)
    return np.array([s.generate_state(2, np.uint64) for s in seqs], dtype=np.uint64)


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
    """Steps 1-3 for every group (leading axis); returns the pivots of the new Cholesky rows.
    (Serial: about 1 ms for 17 groups at k = 200; a prange over the groups saved a few tenths of
    that on a quiet machine and lost several ms per call on a loaded one.)"""
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
@njit(cache=True, nogil=True, fastmath=FMA, inline="always")
def _head4(kp, R1, R2, R3, u, v, acc):
    """First three rows of a group of four in :func:`_tangent_row`: completes ``acc`` at
    ``kp-1 .. kp-3`` by short scalar sums, sets ``v[kp-1 .. kp-3]``; returns ``v[kp .. kp-3]``."""
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
    return v1, v2, v3, v4


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
        v1, v2, v3, v4 = _head4(kp, R1, R2, R3, u, v, acc)
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


#: Rows of R retired per pass by :func:`_tangent_lanes` (a rank-TILE update of the accumulators).
TILE = 8


@njit(cache=True, nogil=True)
def _pack_tiles(k, R, P):
    """``P`` for :func:`_tangent_lanes` at step k: for the tiles' top rows ``p = k, k-8, ...``
    (while ``lo = p - 8 > 0``), ``R[p - i, mm + 1]`` at ``off_p + 8 mm + i`` (mm < lo, i < 8),
    tiles one after the other."""
    p = k
    off = 0
    while p > TILE:
        lo = p - TILE
        for mm in range(lo):
            for i in range(TILE):
                P[off + TILE * mm + i] = R[p - i, mm + 1]
        off += TILE * lo
        p = lo


@njit(cache=True, nogil=True)
def _pack_groups(k, R, P):
    """:func:`_pack_tiles` for every group (leading axis of ``R`` and ``P``)."""
    for g in range(R.shape[0]):
        _pack_tiles(k, R[g], P[g])


@njit(cache=True, nogil=True, fastmath=FMA)
def _tangent_lanes(k, R, P, u, V, A):
    """:func:`_tangent_row` for every lane of a block at once, vectorised over the lanes:
    ``V[m, l] = chi_l[k, m]`` (m <= k) and ``A[m, l] = sum_{m < i <= k} V[i, l] R[i, m+1]``
    (m < k), for the weights ``u[j, l] = a_j w_j`` of lane l ([time, lane], the block's own
    history layout: no copies). Rows are retired TILE at a time: inside a tile the recursion
    runs row by row over ``A[lo:p]`` only, then one rank-TILE update brings ``A[:lo]`` up to
    date (TILE multiply-adds per load/store of an accumulator), reading the tile's rows of R
    packed by :func:`_pack_tiles` (``P``: one stream instead of eight); the per-row
    bookkeeping that limits the per-trajectory kernels is shared by all lanes. Lanes with ``u = 0`` give
    ``V = e_k`` and ``A[m] = R[k, m+1]`` (finite; the caller masks them)."""
    nl = V.shape[1]
    for l in range(nl):
        V[k, l] = 1.0
    for mm in range(k):
        Am = A[mm]
        for l in range(nl):
            Am[l] = 0.0
    p = k
    off = 0
    while p >= 1:
        lo = p - min(TILE, p)
        for kp in range(p, lo, -1):  # inside the tile: finalise V[p-1] .. V[lo]
            Rk = R[kp]
            Vk = V[kp]
            for mm in range(lo, kp):
                r = Rk[mm + 1]
                Am = A[mm]
                for l in range(nl):
                    Am[l] += Vk[l] * r
            Vn = V[kp - 1]
            An = A[kp - 1]
            un = u[kp - 1]
            for l in range(nl):
                Vn[l] = -un[l] * An[l]
        if lo > 0:  # rank-8 update of A[:lo] with rows p .. p-7 (lo > 0 implies a full tile)
            V0 = V[p]
            V1 = V[p - 1]
            V2 = V[p - 2]
            V3 = V[p - 3]
            V4 = V[p - 4]
            V5 = V[p - 5]
            V6 = V[p - 6]
            V7 = V[p - 7]
            for mm in range(lo):
                q = off + TILE * mm
                r0 = P[q]
                r1 = P[q + 1]
                r2 = P[q + 2]
                r3 = P[q + 3]
                r4 = P[q + 4]
                r5 = P[q + 5]
                r6 = P[q + 6]
                r7 = P[q + 7]
                Am = A[mm]
                for l in range(nl):
                    Am[l] += (V0[l] * r0 + V1[l] * r1 + V2[l] * r2 + V3[l] * r3
                              + V4[l] * r4 + V5[l] * r5 + V6[l] * r6 + V7[l] * r7)
            off += TILE * lo
        p = lo


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _accumulate_lanes(k, ak, lph, V, A, good, c, pG, pM2, cI, mibp):
    """Add the samples of the good lanes ``l < c`` (``good[l]``; the others add nothing,
    whatever their V and A) from :func:`_tangent_lanes`' ``V``, ``A``: ``a_k chi[k, :]`` to
    ``pG`` and, if ``mibp``, the Ito correction ``(tau dt/delta) a_k l'_j^2 acc_j`` (j < k) of
    E[l'_k dA_j] to ``pM2`` (``lph``: the block's l' history, ``cI = tau dt/delta``)."""
    for mm in range(k + 1):
        Vm = V[mm]
        s = 0.0
        for l in range(c):
            s += ak[l] * Vm[l] if good[l] else 0.0
        pG[mm] += s
    if mibp:
        for j in range(k):
            Aj = A[j]
            Lj = lph[j]
            s = 0.0
            for l in range(c):
                lj = Lj[l]
                s += ak[l] * lj * lj * Aj[l] if good[l] else 0.0
            pM2[j] += cI * s


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


@njit(cache=True, nogil=True, fastmath=FMA)
def _lane_sum(out, coef, off, hist, j0, j1, c, scale=1.0):
    """``out[i] += sum_{j0 <= j < j1} scale coef[j + off] hist[j, i]`` (i < c), in the precision
    of ``out``, ``coef`` and ``scale`` (the population step passes the histories'): four
    history rows per pass over ``out`` (each row read once, one load/store of ``out`` per four
    multiply-adds), vectorised over lanes."""
    j = j0
    while j + 4 <= j1:
        a0 = coef[j + off] * scale
        a1 = coef[j + 1 + off] * scale
        a2 = coef[j + 2 + off] * scale
        a3 = coef[j + 3 + off] * scale
        h0 = hist[j]
        h1 = hist[j + 1]
        h2 = hist[j + 2]
        h3 = hist[j + 3]
        for i in range(c):
            out[i] += (a0 * h0[i] + a1 * h1[i]) + (a2 * h2[i] + a3 * h3[i])
        j += 4
    while j < j1:
        a0 = coef[j + off] * scale
        h0 = hist[j]
        for i in range(c):
            out[i] += a0 * h0[i]
        j += 1


@njit(cache=True, nogil=True, fastmath=FMA)
def _lane_sum_w(out, coef, off, lph, xi, w0, cw, j0, j1, c):
    """:func:`_lane_sum` of the increments ``dA[j, i] = l'[j, i] (w0 + cw xi[j, i])`` (l' and the
    noise codes stored, dA formed on the fly: 6 bytes read per value instead of 4 + 4)."""
    if cw == 0.0:  # no noise (tau = 0): dA = l' w0
        _lane_sum(out, coef, off, lph, j0, j1, c, w0)
        return
    j = j0
    while j + 4 <= j1:
        a0 = coef[j + off]
        a1 = coef[j + 1 + off]
        a2 = coef[j + 2 + off]
        a3 = coef[j + 3 + off]
        h0 = lph[j]
        h1 = lph[j + 1]
        h2 = lph[j + 2]
        h3 = lph[j + 3]
        x0 = xi[j]
        x1 = xi[j + 1]
        x2 = xi[j + 2]
        x3 = xi[j + 3]
        for i in range(c):
            out[i] += ((a0 * h0[i] * (w0 + cw * x0[i]) + a1 * h1[i] * (w0 + cw * x1[i]))
                       + (a2 * h2[i] * (w0 + cw * x2[i]) + a3 * h3[i] * (w0 + cw * x3[i])))
        j += 4
    while j < j1:
        a0 = coef[j + off]
        h0 = lph[j]
        x0 = xi[j]
        for i in range(c):
            out[i] += a0 * h0[i] * (w0 + cw * x0[i])
        j += 1


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _lane_dots_w(out, scale, x, lph, xi, w0, cw, k, c):
    """:func:`_lane_dots` against the increments ``dA = l' (w0 + cw xi)`` (plain estimator)."""
    for j in range(k):
        h = lph[j]
        q = xi[j]
        s = 0.0
        for i in range(c):
            s += x[i] * h[i] * (w0 + cw * q[i])
        out[j] += scale * s


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _lane_dots(out, scale, x, hist, k, c):
    """``out[j] += scale sum_{i<c} x[i] hist[j, i]`` for j < k, the lane sum in ``hist``'s
    precision (``out`` float64) and reassociated so
    that LLVM vectorises the sums over lanes (a strict left-to-right sum is one long dependency
    chain; the order is fixed at compile time, so results stay deterministic)."""
    zero = np.zeros(1, hist.dtype)[0]  # sums over the lanes in the histories' precision
    for j in range(k):
        h = hist[j]
        s = zero
        for i in range(c):
            s += x[i] * h[i]
        out[j] += scale * s


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
def _population_step(k, blk0, blk1, cnt, blk_group, blk_tidx, blk_n0, keys, lcode, kmode, dt,
                     delta, tau, L, Lt, Rt, z, hstar, y, xi, u, lph, dB, dC, h, part_s, part_G,
                     part_M, part_M2, mibp, Pt):
    """Step 4 for blocks ``blk0 .. blk1-1``: fields, increments, tangent row, and per-block
    partial sums: ``part_s`` = (loss, l' h*, a, #non-finite, kappa sample), ``part_G`` =
    a_k chi[k, :], ``part_M`` = (samples of E[l'_k dA_j] for j < k, l'_k^2), ``part_M2`` (see
    below); the caller multiplies by the dW_k average (docs/theory.md, "Variance reduction").
    The sample of E[l'_k dA_j] integrates the Gaussian dW_j by parts:
    ``(dt/delta) l'_k l'_j - (tau dt/delta) a_k l'_j^2 acc_j`` (``acc_j = -dh_k/d dA_j``) if
    ``mibp``, else the plain sample ``l'_k dA_j``. The first term goes to ``part_M``, the second
    (which needs the tangent) to ``part_M2``.

    Subset tangent: only blocks with ``blk_tidx[b] >= 0`` compute the O(k^2) tangent row and the
    kappa paths, i.e. add to ``part_G``, ``part_M2`` and the kappa sample ``part_s[:, 4]``; the
    caller divides those sums by the number of trajectories in such blocks, the others by the
    whole population (docs/theory.md, "Subset tangent"). Their histories ``u``, ``dB``, ``dC``
    live at index ``blk_tidx[b]`` of those arrays (only tangent blocks have them).

    Layout: per-trajectory histories are ``[block, time, lane]`` (``BLOCK`` lanes, ``cnt[b]``
    used), so that a block's past at step k is one contiguous stretch and the O(k) sums run
    over lanes.

    ``kmode`` selects the direct kappa estimator (docs/theory.md, "Variance reduction"):
    1 (sign teacher): each trajectory also carries two paths with h* = 0 (omega drawn without
    its z_0 term, i.e. from the law conditional on h* = 0) and labels +1 / -1, increments in
    ``dB`` / ``dC``; the sample is l'_k(+) - l'_k(-). 2 (linear teacher): the label tangent
    eta_k = dh_k/dy with increments ``dB_j = w_j (a_j eta_j + dl'_j/dy)``; the sample is
    a_k eta_k + dl'_k/dy. 0: none.

    Random numbers: each block first draws, per trajectory ``n`` (index in its group, from
    ``blk_n0``), the pair ``(z_{k+1}, xi_k)`` from the counter-based generator under its group's
    key (:func:`_normal_pair`; results independent of threads and chunking) and stores their
    int16 codes (:data:`ZQ`); the increments are ``dA_j = l'_j w_j`` with
    ``w_j = dt/delta + sqrt(tau dt/delta) xi_j``, formed on the fly from ``lph`` and ``xi``."""
    w0 = dt / delta
    sq = math.sqrt(tau / delta)
    cw = sq * math.sqrt(dt) * ZS  # w = w0 + cw * (xi code)
    cI = tau * dt / delta
    B = z.shape[2]
    sc = np.empty(3, Rt.dtype)  # w0, cw, 1 in the precision of the field sums
    sc[0] = w0
    sc[1] = cw
    sc[2] = 1.0
    for ib in prange(blk0, blk1):
        c = cnt[ib]
        g = blk_group[ib]
        ka = keys[g, 0]
        kb = keys[g, 1]
        n0 = blk_n0[ib]
        zb = z[ib]
        xib = xi[ib]
        _draw_codes(ka, kb, n0, k + 1, c, zb[k + 1], xib[k])
        it = blk_tidx[ib]
        tan = it >= 0
        km = kmode if tan else 0  # the kappa paths run with the tangent only
        it = max(it, 0)
        Lr = L[g, k + 1]
        ps = part_s[ib]
        pG = part_G[ib]
        pM = part_M[ib]
        for i in range(_NS):
            ps[i] = 0.0
        for j in range(k + 1):
            pG[j] = 0.0
            pM[j] = 0.0
        ub = u[it]
        lphb = lph[ib]
        dBb = dB[it]
        # fields: O(k) sums over the block's contiguous past, vectorised over lanes, in the
        # precision of Rt (the histories'; docs/theory.md "Float32 histories")
        Rkt = Rt[g, k]
        om0h = np.zeros(B, Rt.dtype)  # omega_k without the h* term: its law given h* = 0
        _lane_sum(om0h, Lt[g], 0, zb, 1, k + 2, c, sc[2])  # in code units (exact scale below)
        memh = np.zeros(B, Rt.dtype)  # memory term sum_{j<k} R[k, j+1] dA_j
        _lane_sum_w(memh, Rkt, 1, lphb, xib, sc[0], sc[1], 0, k, c)
        om0 = np.empty(B)
        hk = np.empty(B)
        l0 = Lr[0] * ZS
        for i in range(c):
            om0[i] = om0h[i] * ZS
            hk[i] = om0[i] + l0 * zb[0, i] - memh[i]
        hp = np.empty(B)
        hm = np.empty(B)
        if km == 1:
            dCb = dC[it]
            mp = np.zeros(B, Rt.dtype)
            mn = np.zeros(B, Rt.dtype)
            _lane_sum(mp, Rkt, 1, dBb, 0, k, c, sc[2])
            _lane_sum(mn, Rkt, 1, dCb, 0, k, c, sc[2])
            for i in range(c):
                hp[i] = om0[i] - mp[i]
                hm[i] = om0[i] - mn[i]
        elif km == 2:
            mp = np.zeros(B, Rt.dtype)
            _lane_sum(mp, Rkt, 1, dBb, 0, k, c, sc[2])
            for i in range(c):
                hp[i] = -mp[i]  # the label tangent eta_k
        ak = np.empty(B)
        lpk = np.zeros(B, Rt.dtype)
        good = np.zeros(B, dtype=np.bool_)
        for i in range(c):
            hh = hk[i]
            yi = y[ib, i]
            lo, lp, a = _loss3(lcode, hh, yi)
            w = w0 + cw * xib[k, i]
            dak = lp * w
            if tan:
                ub[k, i] = a * w
            lphb[k, i] = lp
            h[ib, i] = hh
            ksamp = 0.0
            if km == 1:
                lpp = loss_d1(lcode, hp[i], 1.0)
                lpm = loss_d1(lcode, hm[i], -1.0)
                dBb[k, i] = lpp * w
                dCb[k, i] = lpm * w
                ksamp = lpp - lpm
            elif km == 2:
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
        # cross moments without the tangent: (dt/delta) l'_k l'_j (ibp) or l'_k dA_j (plain),
        # vectorised over lanes (lpk: 0 on bad lanes)
        if mibp:
            _lane_dots(pM, w0, lpk, lphb, k, c)
        else:
            _lane_dots_w(pM, 1.0, lpk, lphb, xib, w0, cw, k, c)
        if not tan:
            continue
        pM2 = part_M2[ib]
        for j in range(k + 1):
            pM2[j] = 0.0
        # tangent rows (O(k^2) per trajectory) of every lane at once, from the block's
        # [time, lane] history of the weights u, in the precision of Rt; bad lanes masked
        Rtg = Rt[g]
        Vl = np.empty((k + 1, B), Rt.dtype)
        Al = np.empty((k + 1, B), Rt.dtype)
        _tangent_lanes(k, Rtg, Pt[g], ub, Vl, Al)
        _accumulate_lanes(k, ak, lphb, Vl, Al, good, c, pG, pM2, cI, mibp)


# --------------------------------------------------------------------------------------------
# Python driver
# --------------------------------------------------------------------------------------------
class Cancelled(Exception):
    """Raised inside :meth:`Populations.step` when the cancel flag is seen between chunks."""


class Populations:
    """Independent DMFT populations of sizes ``sizes`` advanced together, one grid step at a time.

    Attributes per group ``g`` (leading axis): ``R, C, G, M, L`` (K+1 square), ``b, m, kappa``,
    ``train, Elh`` (per step). Per-trajectory arrays are ``[block, time, lane]``
    (:meth:`series`, :meth:`fields`). Randomness: counter-based, keyed per group by
    :func:`group_keys` (from ``SeedSequence(seed).spawn``), trajectory and step: group 0's numbers
    depend neither on the number of replicas nor on the threads or chunking.

    ``kappa_estimator``: 'direct' (default; boundary pairs for the sign teacher, label tangent
    for the linear teacher) or 'stein' (``kappa_k = (E[l'_k h*] - sum_m G[k, m] m_m) / rho``, the
    formula of THEORY.md section 4; unbiased too, with a far larger variance). Both are
    recorded: ``kappa_direct`` and ``kappa_stein``. ``m_estimator``: 'ibp' (default) or 'plain'
    sample of the cross moments ``E[dA_k dA_j]`` (see :func:`_population_step`).

    ``tangent_sizes``: per group, how many trajectories compute the tangent (rounded up to whole
    blocks of ``BLOCK``, spread evenly over the group's blocks; default all): ``G``, ``kappa``
    and the Ito correction of ``M`` are averaged over those only (docs/theory.md, "Subset
    tangent"); ``self.tsizes`` holds the numbers used.

    ``kernels_from`` (Picard baseline only): use these arrays (G, kappa, M) instead of the
    population's own when advancing ``R, b, C, m``; the population's averages still go into
    ``G, kappa, M``.
    """

    #: target work (inner multiply-adds) per parallel call (about 10-20 ms), so that cancel is
    #: seen quickly while the barriers at the end of each call stay rare
    CHUNK_WORK = 2e8

    def __init__(self, exp, sizes, seed=None, seed_seqs=None, kappa_estimator="direct",
                 m_estimator="ibp", tangent_sizes=None, hist_dtype=None):
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
        if tangent_sizes is None:
            tangent_sizes = self.sizes
        self.blk_tidx = np.full(nb, -1, dtype=np.int64)  # index into u, dB, dC (tangent blocks)
        self.tsizes = np.zeros(ng, dtype=np.int64)
        self.grp_tblk = []  # group g's tangent blocks
        ntb = 0
        for g in range(ng):
            nt = min(int(self.sizes[g]), max(1, int(tangent_sizes[g])))
            b0, nbg = self.grp_blk[g], self.grp_blk[g + 1] - self.grp_blk[g]
            ntg = -(-nt // BLOCK)
            # spread evenly over the group's blocks, so that the memory-bound field-only blocks
            # and the compute-bound tangent blocks run side by side (about 12% faster)
            idx = b0 + (np.arange(ntg) * nbg) // ntg
            self.grp_tblk.append(idx)
            self.blk_tidx[idx] = np.arange(ntb, ntb + ntg)
            ntb += ntg
            self.tsizes[g] = int(self.cnt[idx].sum())
        self.tblk = np.concatenate(self.grp_tblk).astype(np.int64)
        self.tblk_off = np.cumsum([0] + [len(t) for t in self.grp_tblk]).astype(np.int64)
        self._sums = (np.zeros((ng, _NS)), np.zeros((ng, Kp)), np.zeros((ng, Kp)),
                      np.zeros((ng, Kp)))
        self.part_s = np.zeros((nb, _NS))
        self.part_G = np.zeros((nb, Kp))
        self.part_M = np.zeros((nb, Kp))
        self.part_M2 = np.zeros((nb, Kp))
        # per-trajectory state, [block, time, lane]; histories stored as hist_dtype
        B = BLOCK
        hd = np.dtype(HIST_DTYPE if hist_dtype is None else hist_dtype)
        self.hist_dtype = hd
        self.z = np.zeros((nb, Kp + 1, B), dtype=DRAW_DTYPE)  # codes of z_0 .. z_{K+1}
        self.xi = np.zeros((nb, Kp, B), dtype=DRAW_DTYPE)  # codes of xi_0 .. xi_K
        self.lph = np.zeros((nb, Kp, B), dtype=hd)
        # R in the tangent's precision: float32 with float32 histories (docs/theory.md,
        # "Float32 tangent"), else float64
        self.Rt = np.zeros((ng, Kp, Kp), dtype=np.float32 if hd == np.float32 else np.float64)
        # tiles of Rt (_pack_tiles: at most (k+1)^2/2 values at step k)
        self.Pt = np.zeros((ng, Kp * Kp // 2 + TILE * Kp), dtype=self.Rt.dtype)
        self.Lt = np.zeros((ng, Kp + 1), dtype=self.Rt.dtype)  # the current row of L, as Rt
        self.u = np.zeros((ntb, Kp, B), dtype=hd)  # tangent blocks only
        self.dB = np.zeros((ntb, Kp, B), dtype=hd)
        self.dC = np.zeros((ntb, Kp, B) if self.kmode == 1 else (1, 1, B), dtype=hd)
        self.h = np.zeros((nb, B))
        self.hstar = np.zeros((nb, B))
        self.y = np.zeros((nb, B))
        # random numbers: counter-based, keyed by (group key, trajectory, step); see _hash_u64
        if seed_seqs is None:
            self.keys = group_keys(exp.seed if seed is None else seed, ng)
        else:
            self.keys = np.array([s.generate_state(2, np.uint64) for s in seed_seqs],
                                 dtype=np.uint64)
        self.blk_n0 = ((np.arange(nb) - self.grp_blk[self.blk_group]) * BLOCK).astype(np.int64)
        _init_draws(self.keys, self.blk_group, self.blk_n0, self.cnt, tcode, math.sqrt(exp.rho),
                    float(exp.noise), float(exp.flip), self.z, self.hstar, self.y)
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
        self.Rt[:, k, : k + 1] = self.R[:, k, : k + 1]  # rows < k are final
        self.Lt[:, : k + 2] = self.L[:, k + 1, : k + 2]  # row k+1: omega_k's coefficients
        _pack_groups(k, self.Rt, self.Pt)
        nb = len(self.cnt)
        per_traj = 0.5 * k * k * float(self.tsizes.sum()) / float(self.sizes.sum()) + 6.0 * k + 16.0
        chunk = max(1, int(self.CHUNK_WORK / (per_traj * BLOCK)))
        for b0 in range(0, nb, chunk):
            if cancel is not None and cancel.is_set():
                raise Cancelled
            with parallel_chunksize(PAR_CHUNK):  # dynamic scheduling: robust on shared cores
                _population_step(k, b0, min(b0 + chunk, nb), self.cnt, self.blk_group,
                                 self.blk_tidx, self.blk_n0, self.keys, self.lcode, self.kmode,
                                 self.dt, self.delta, self.tau, self.L, self.Lt, self.Rt, self.z,
                                 self.hstar, self.y, self.xi, self.u, self.lph, self.dB, self.dC,
                                 self.h,
                                 self.part_s, self.part_G, self.part_M, self.part_M2,
                                 self.m_estimator == "ibp", self.Pt)
        # reduce partial sums per group, in block order (deterministic)
        k1 = k + 1
        S, Gs, Ms, M2s = self._sums
        _reduce(k, self.grp_blk, self.tblk, self.tblk_off, self.part_s, self.part_G,
                self.part_M, self.part_M2, self.m_estimator == "ibp", S, Gs, Ms, M2s)
        n = self.sizes.astype(float)
        nt = self.tsizes.astype(float)
        Grow = Gs[:, :k1] / nt[:, None]
        Mrow = Ms[:, :k1] / n[:, None]
        if self.m_estimator == "ibp":
            Mrow -= M2s[:, :k1] / nt[:, None]
        # E over dW_k given the past (docs/theory.md, "Variance reduction")
        Mrow[:, :k] *= self.dt / self.delta
        Mrow[:, k] *= (self.dt / self.delta) ** 2 + self.tau * self.dt / self.delta
        train = S[:, 0] / n
        train[S[:, 3] > 0] = np.nan  # a non-finite field: the group has diverged
        self.train[:, k] = train
        self.Elh[:, k] = S[:, 1] / n
        self.G[:, k, :k1] = Grow
        self.M[:, k, :k1] = Mrow
        self.M[:, :k1, k] = Mrow
        self.kappa_stein[:, k] = (S[:, 1] / n - np.einsum("gj,gj->g", Grow,
                                                           self.m[:, :k1])) / self.rho
        if self.kmode == 1:  # density of h* at 0 times the flip factor
            kd = (1.0 - 2.0 * self.flip) / math.sqrt(2.0 * math.pi * self.rho) * S[:, 4] / nt
        else:
            kd = S[:, 4] / nt
        self.kappa_direct[:, k] = kd
        self.kappa[:, k] = kd if self.kappa_estimator == "direct" else self.kappa_stein[:, k]
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
    def _locate(self, g, n):
        b = self.grp_blk[g] + n // BLOCK
        return b, n % BLOCK

    def fields(self, g=0):
        """Current fields h_k of group g's trajectories (copy)."""
        b0, b1 = self.grp_blk[g], self.grp_blk[g + 1]
        return self.h[b0:b1].reshape(-1)[: self.sizes[g]].copy()

    def series(self, name, n, g=0):
        """History (over time) of per-trajectory array ``name`` ('z', 'xi' (the draws, as
        values), 'dW' = sqrt(dt) xi, 'w' = dt/delta + sqrt(tau/delta) dW, 'dA' = l' w, 'u',
        'lph', 'dB', 'dC'; the last three only for tangent trajectories) for trajectory n of
        group g; scalars ('h', 'hstar', 'y') give a number."""
        b, i = self._locate(g, n)
        if name in ("z", "xi"):
            return getattr(self, name)[b, :, i].astype(np.float64) * ZS
        if name == "dW":
            return math.sqrt(self.dt) * self.series("xi", n, g)
        if name == "w":
            return self.dt / self.delta + math.sqrt(self.tau / self.delta) * self.series("dW", n, g)
        if name == "dA":
            return self.series("lph", n, g) * self.series("w", n, g)
        arr = getattr(self, name)
        if name in ("u", "dB", "dC"):
            b = int(self.blk_tidx[b])
            if b < 0:
                raise IndexError(f"trajectory {n} of group {g} has no tangent history")
        return arr[b, :, i].astype(np.float64) if arr.ndim == 3 else float(arr[b, i])

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


@njit(cache=True, nogil=True)
def _reduce(k, grp_blk, tblk, tblk_off, part_s, part_G, part_M, part_M2, mibp, S, Gs, Ms, M2s):
    """Per-group sums of the block partials, in block order (deterministic): ``S`` of
    ``part_s`` and ``Ms`` of ``part_M`` over all the group's blocks, ``Gs`` / ``M2s`` of
    ``part_G`` / ``part_M2`` over its tangent blocks ``tblk[tblk_off[g]:tblk_off[g+1]]``.
    (Serial: memory-bound, about 1 ms at k = 200; a parallel version was slower.)"""
    k1 = k + 1
    for g in range(grp_blk.shape[0] - 1):
        sg = S[g]
        mg = Ms[g]
        gg = Gs[g]
        m2 = M2s[g]
        sg[:] = 0.0
        mg[:k1] = 0.0
        gg[:k1] = 0.0
        m2[:k1] = 0.0
        for b in range(grp_blk[g], grp_blk[g + 1]):
            ps = part_s[b]
            for q in range(sg.shape[0]):
                sg[q] += ps[q]
            pm = part_M[b]
            for j in range(k1):
                mg[j] += pm[j]
        for t in range(tblk_off[g], tblk_off[g + 1]):
            pg = part_G[tblk[t]]
            for j in range(k1):
                gg[j] += pg[j]
            if mibp:
                pm2 = part_M2[tblk[t]]
                for j in range(k1):
                    m2[j] += pm2[j]


@njit(cache=True, nogil=True)
def _field_moments_hist(h, cnt, b0, b1, nbins, nsig):
    """Mean, standard deviation and the counts of ``nbins`` equal bins over mean +- nsig std
    (numpy.histogram's binning, values outside dropped) of the fields of blocks b0 .. b1-1."""
    n = 0
    s = 0.0
    for b in range(b0, b1):
        for i in range(cnt[b]):
            s += h[b, i]
            n += 1
    mean = s / max(n, 1)
    v = 0.0
    for b in range(b0, b1):
        for i in range(cnt[b]):
            d = h[b, i] - mean
            v += d * d
    std = math.sqrt(v / max(n, 1))
    half = nsig * std if std > 1e-12 * max(1.0, abs(mean)) else 1.0
    lo = mean - half
    hi = mean + half
    edges = np.linspace(lo, hi, nbins + 1)
    counts = np.zeros(nbins, dtype=np.int64)
    norm = nbins / (hi - lo)
    for b in range(b0, b1):
        for i in range(cnt[b]):
            x = h[b, i]
            if x < lo or x > hi or not math.isfinite(x):
                continue
            j = int((x - lo) * norm)
            if j >= nbins:
                j = nbins - 1
            if x < edges[j]:
                j -= 1
            elif j < nbins - 1 and x >= edges[j + 1]:
                j += 1
            counts[j] += 1
    return n, half, edges, counts


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _init_draws(keys, blk_group, blk_n0, cnt, tcode, srho, noise, flip, z, hstar, y):
    """Step slot 0 of every trajectory: z_0 and the label's Gaussian from one normal pair, the
    label's uniform from stream 2; ``h* = sqrt(rho) z_0`` with the stored (quantised) z_0.
    (Parallel over blocks; each value depends only on its counter.)"""
    for ib in prange(cnt.shape[0]):
        g = blk_group[ib]
        ka = keys[g, 0]
        kb = keys[g, 1]
        for i in range(cnt[ib]):
            n = blk_n0[ib] + i
            za, gauss = _normal_pair(ka, kb, n, 0)
            unif = _uniform(ka, kb, n, 0, 2)
            q = _quantise(za)
            z[ib, 0, i] = q
            hs = srho * (q * ZS)
            hstar[ib, i] = hs
            y[ib, i] = teacher_label(tcode, hs, gauss, unif, noise, flip)


# --------------------------------------------------------------------------------------------
# the engine: stream of Snapshots
# --------------------------------------------------------------------------------------------
ENGINE = "dmft-mc"
#: Number of independent replica populations used for the standard errors: at least REPLICAS,
#: up to MAX_REPLICAS where the replica budget allows (the se from r replicas is itself
#: uncertain by about 1/sqrt(2 (r-1)): 27% for 8, 18% for 16).
REPLICAS = 8
MAX_REPLICAS = 16
#: r = min(MAX_REPLICAS, max(REPLICAS, samples // REPLICA_STEP)) replicas.
REPLICA_STEP = 4000
#: The replicas together hold about samples // REPLICA_DIVISOR trajectories (12.5% more work
#: for a large solve), each at least MIN_REPLICA (and at most samples): populations below about
#: 1000 trajectories are noisier than 1/N extrapolates (measured, docs/theory.md), so smaller
#: replicas would overstate the error of the main population; above that the precision of the
#: se depends on the number of replicas r, not on their size (docs/theory.md, "Standard
#: errors"), so they are kept small.
REPLICA_DIVISOR = 8
MIN_REPLICA = 1000
#: Field histogram: HIST_BINS equal bins over mean +- HIST_SIGMAS std (the simulator's layout).
HIST_BINS = 60
HIST_SIGMAS = 5.0
#: Points of the theta density grid (+- 5 sqrt(Q)).
DENSITY_POINTS = 201
OBS = ("train_loss", "test_loss", "test_error", "m", "Q", "cosine")


def replica_plan(N: int, replicas: int | None = None, divisor: int = REPLICA_DIVISOR,
                 min_size: int = MIN_REPLICA):
    """Population sizes: ``[N] + [n_rep] * r`` with ``n_rep = min(N, max(N // (divisor r),
    min_size))`` and, unless ``replicas`` is given, ``r = min(MAX_REPLICAS, max(REPLICAS,
    N // REPLICA_STEP))`` (8 replicas below N = 36000, 16 from N = 64000; 1000 trajectories
    each up to N = 128000, N/128 beyond); just ``[N]`` if ``r < 2``."""
    r = replicas if replicas is not None else min(MAX_REPLICAS, max(REPLICAS, N // REPLICA_STEP))
    if r < 2:
        return [N]
    n_rep = min(N, max(N // (divisor * r), min_size))
    return [N] + [n_rep] * r


#: Subset tangent (docs/theory.md, "Subset tangent"): a population of N trajectories computes
#: the O(k^2) tangent row (G) and the kappa paths on its first
#: ``min(N, max(TANGENT_MIN, N // TANGENT_DIVISOR))`` trajectories only; fields, cross moments
#: M and the train loss use all N. Measured in the benchmark configuration: the test-loss
#: variance is about ``A/N + B/N_t`` with ``B/A`` about 0.1-0.15, and a tangent trajectory
#: costs about 3.5 times a field-only one, so at equal accuracy any ``N_t/N`` between 1/8 and
#: 1/4 halves the cost (1/4 is the less noise-sensitive end). Below TANGENT_MIN (the default
#: samples included) every trajectory computes the tangent, as before.
TANGENT_MIN = 4096
TANGENT_DIVISOR = 4


def tangent_plan(sizes, tangent_min: int = TANGENT_MIN, divisor: int = TANGENT_DIVISOR):
    """Tangent subset sizes for the populations ``sizes = [N, n_rep, ...]``: ``N_t =
    min(N, max(tangent_min, N // divisor))`` for the main population and the same fraction
    ``N_t / N`` (rounded up) for each replica, so that every population's variance has the same
    ``1/N`` law and the replica spread rescales to the main population's error."""
    N = int(sizes[0])
    nt = min(N, max(int(tangent_min), N // max(1, int(divisor))))
    return [nt] + [min(int(n), -(-int(n) * nt // N)) for n in sizes[1:]]


def memory_bytes(exp, sizes, tangent_sizes=None) -> int:
    """Memory the populations hold: per trajectory about 2 (K+1) draw codes (z, xi;
    :data:`DRAW_DTYPE`), (K+1) l' values (:data:`HIST_DTYPE`) and 4 doubles, per tangent
    trajectory 3 (K+1) more history values (u and the two kappa paths), per population
    6 (K+1)^2 doubles (R, C, G, M, L, ...)."""
    Kp = exp.steps + 1
    hb = np.dtype(HIST_DTYPE).itemsize
    db = np.dtype(DRAW_DTYPE).itemsize
    tangent_sizes = sizes if tangent_sizes is None else tangent_sizes
    ntraj = sum(-(-int(n) // BLOCK) * BLOCK for n in sizes)
    ntan = sum(-(-int(min(n, t)) // BLOCK) * BLOCK for n, t in zip(sizes, tangent_sizes))
    return (db * ntraj * 2 * Kp + hb * (ntraj * Kp + ntan * 3 * Kp)
            + 8 * (ntraj * 4 + len(sizes) * 6 * Kp * Kp))


def check_memory(exp, sizes, tangent_sizes=None, fraction=0.5):
    """ConfigError('samples') if the solve would need more than ``fraction`` of the RAM."""
    from ..config import ConfigError

    need = memory_bytes(exp, sizes, tangent_sizes)
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


def pop_field_hist(pop, g=0):
    """:func:`field_hist` of group g's current fields, in one compiled pass over the blocks
    (no copy; same bins, mean and std up to summation order)."""
    n, half, edges, counts = _field_moments_hist(pop.h, pop.cnt, int(pop.grp_blk[g]),
                                                 int(pop.grp_blk[g + 1]), HIST_BINS, HIST_SIGMAS)
    return edges, counts / (n * (2 * half / HIST_BINS))


def theta_density(Q):
    """(x, p) of N(0, Q) on +- 5 sqrt(Q): the exact law of a parameter row (docs/theory.md)."""
    s = math.sqrt(Q)
    x = np.linspace(-5 * s, 5 * s, DENSITY_POINTS)
    return x, np.exp(-0.5 * x * x / Q) / math.sqrt(2 * math.pi * Q)


def stream(exp, cancel=None, replicas: int | None = None, divisor: int = REPLICA_DIVISOR,
           min_replica: int = MIN_REPLICA, tangent_min: int = TANGENT_MIN,
           tangent_divisor: int = TANGENT_DIVISOR, **population_options):
    """Monte Carlo DMFT (engine 'dmft-mc'): one Snapshot per recording step (every
    ``exp.record_every`` grid steps, and the last), each yielded as soon as its step is solved.

    Values come from the population of ``exp.samples`` trajectories. Standard errors come from
    ``replicas`` independent populations of ``n_rep`` trajectories (:func:`replica_plan`): the
    sample standard deviation of an observable over the replicas times ``sqrt(n_rep/samples)``
    (the variance of every curve falls like 1/N; docs/theory.md, "Standard errors").
    Large populations compute the tangent on a subset (:func:`tangent_plan`; ``tangent_min``,
    ``tangent_divisor``; ``tangent_divisor=1`` turns it off).
    Raises SolverError (after yielding what was computed) when the main population diverges.
    """
    from ..snapshot import Snapshot, SolverError

    exp.validate()
    K = exp.steps
    N = int(exp.samples)
    sizes = replica_plan(N, replicas, divisor, min_replica)
    tsizes = tangent_plan(sizes, tangent_min, tangent_divisor)
    check_memory(exp, sizes, tsizes)
    pop = Populations(exp, sizes, tangent_sizes=tsizes, **population_options)
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
        extras = {"field_hist": pop_field_hist(pop, 0)}
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