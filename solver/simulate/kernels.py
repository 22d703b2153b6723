"""numba step kernels of the finite-size simulator (THEORY.md section 2), GLM width k = 1.

All kernels are ``nogil`` and serial (the engine runs one seed per thread, or splits the rows of
a step over two threads with ``sgf_part``). They take plain arrays and scalars and update the
state arrays in place; the step kernels return the number of steps completed (fewer than asked
when the state stopped being finite or exceeded ``QMAX`` per coordinate: the run diverged).

SGF / GD step (``sgf_steps``, or ``sgf_part`` + ``sgf_update`` when the rows are split over two
threads). With ``w_mu = dt/delta + sqrt(tau/delta) dW_mu``, ``dW_mu ~ N(0, dt)``:
``theta <- (1 - dt*lambda) theta - sum_mu x_mu l'(h_mu, y_mu) w_mu``,  ``h = X theta``.
Both mat-vecs are fused into ONE pass over the rows of ``X``: a block of 8 rows is read, its
fields ``h_mu = x_mu . theta`` are formed, then ``sum x_mu l'_mu w_mu`` is accumulated from the
same rows while they are still in cache. The pass therefore streams ``X`` from memory once per
step instead of twice (two BLAS mat-vecs), which is what makes it faster than the "two mat-vec"
floor at large ``n d`` (docs/benchmarks.md).

SGD step (``sgd_steps``), learning rate ``eta``, batch ``B``:
``theta <- (1 - eta*lambda/d) theta - (eta/B) sum_{mu in S} x_mu l'(h_mu, y_mu)``.
``theta = s * v`` is stored with a scalar ``s`` so the ridge shrinkage costs O(1) per step; the
cost per step is ``2 B d`` (B dot products and B axpys on gathered rows).
"""
from __future__ import annotations

from numba import njit

from ..models import loss_d1, loss_value

#: Reassociation for SIMD reductions, but NaN/inf semantics kept (divergence checks rely on them).
FM = {"reassoc", "contract", "nsz", "arcp"}
#: A state with |theta|^2/d above this counts as diverged (overflow would follow).
QMAX = 1e30
#: Rows per block of the fused pass.
RB = 8


@njit(cache=True, nogil=True, fastmath=FM)
def _dot(x, v):
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i] * v[i]
    return s


@njit(cache=True, nogil=True, fastmath=FM)
def _sumsq(v):
    s = 0.0
    for i in range(v.shape[0]):
        s += v[i] * v[i]
    return s


@njit(cache=True, nogil=True, fastmath=FM)
def fields(X, theta, y, code, h):
    """h = X theta (written to ``h``); returns sum_mu l(h_mu, y_mu)."""
    n, d = X.shape
    tot = 0.0
    mu = 0
    while mu + 4 <= n:
        x0 = X[mu]
        x1 = X[mu + 1]
        x2 = X[mu + 2]
        x3 = X[mu + 3]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        for i in range(d):
            t = theta[i]
            s0 += x0[i] * t
            s1 += x1[i] * t
            s2 += x2[i] * t
            s3 += x3[i] * t
        h[mu] = s0
        h[mu + 1] = s1
        h[mu + 2] = s2
        h[mu + 3] = s3
        mu += 4
    while mu < n:
        h[mu] = _dot(X[mu], theta)
        mu += 1
    for mu in range(n):
        tot += loss_value(code, h[mu], y[mu])
    return tot


@njit(cache=True, nogil=True, fastmath=FM)
def sgf_part(X, y, theta, g, h, u, r0, r1, c0, c1, code, rng, record):
    """One SGF/GD step restricted to the rows r0 <= mu < r1 of X:
    ``g = sum_mu x_mu l'(h_mu, y_mu) w_mu`` with ``w_mu = c0 + c1 z_mu`` (``z_mu`` drawn from
    ``rng`` in row order; none drawn when ``c1 == 0``). If ``record``, ``h[r0:r1]`` gets the
    fields. Returns sum_mu l(h_mu, y_mu) when recording, else 0. ``u`` (RB,) is a work buffer.
    """
    d = X.shape[1]
    noisy = c1 != 0.0
    tot = 0.0
    for i in range(d):
        g[i] = 0.0
    mu = r0
    while mu + RB <= r1:
        x0 = X[mu]
        x1 = X[mu + 1]
        x2 = X[mu + 2]
        x3 = X[mu + 3]
        x4 = X[mu + 4]
        x5 = X[mu + 5]
        x6 = X[mu + 6]
        x7 = X[mu + 7]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        s5 = 0.0
        s6 = 0.0
        s7 = 0.0
        for i in range(d):
            t = theta[i]
            s0 += x0[i] * t
            s1 += x1[i] * t
            s2 += x2[i] * t
            s3 += x3[i] * t
            s4 += x4[i] * t
            s5 += x5[i] * t
            s6 += x6[i] * t
            s7 += x7[i] * t
        u[0] = s0
        u[1] = s1
        u[2] = s2
        u[3] = s3
        u[4] = s4
        u[5] = s5
        u[6] = s6
        u[7] = s7
        for r in range(RB):
            hv = u[r]
            yv = y[mu + r]
            if record:
                h[mu + r] = hv
                tot += loss_value(code, hv, yv)
            w = c0
            if noisy:
                w += c1 * rng.standard_normal()
            u[r] = loss_d1(code, hv, yv) * w
        u0 = u[0]
        u1 = u[1]
        u2 = u[2]
        u3 = u[3]
        u4 = u[4]
        u5 = u[5]
        u6 = u[6]
        u7 = u[7]
        for i in range(d):
            g[i] += ((u0 * x0[i] + u1 * x1[i]) + (u2 * x2[i] + u3 * x3[i])) + \
                    ((u4 * x4[i] + u5 * x5[i]) + (u6 * x6[i] + u7 * x7[i]))
        mu += RB
    while mu < r1:
        x = X[mu]
        hv = _dot(x, theta)
        yv = y[mu]
        if record:
            h[mu] = hv
            tot += loss_value(code, hv, yv)
        w = c0
        if noisy:
            w += c1 * rng.standard_normal()
        c = loss_d1(code, hv, yv) * w
        for i in range(d):
            g[i] += c * x[i]
        mu += 1
    return tot


@njit(cache=True, nogil=True, fastmath=FM)
def sgf_update(theta, g0, g1, a):
    """theta <- a*theta - (g0 + g1); returns True while |theta|^2/d <= QMAX (False on NaN)."""
    d = theta.shape[0]
    q = 0.0
    for i in range(d):
        t = a * theta[i] - (g0[i] + g1[i])
        theta[i] = t
        q += t * t
    return q <= QMAX * d


def split_row(n):
    """Rows [0, split_row(n)) form part 0 and the rest part 1 (a multiple of RB when n >= 2 RB).
    The step always sums the two parts' contributions in this order, so a seed gives the same
    numbers whether its two parts run in one thread or in two."""
    return (n // 2) // RB * RB if n >= 2 * RB else n // 2


@njit(cache=True, nogil=True, fastmath=FM)
def sgf_steps(X, y, theta, g0, g1, h, u, nsteps, a, c0, c1, code, rng0, rng1, n1, record, out):
    """``nsteps`` Euler-Maruyama SGF steps (GD when ``c1 == 0``), serially.

    a = 1 - dt*lambda, c0 = dt/delta, c1 = sqrt(tau*dt/delta); rows [0, n1) draw their noise from
    ``rng0``, rows [n1, n) from ``rng1`` (see :func:`split_row`). If ``record``, the fields of
    the first step's state go to ``h`` and their loss sum to ``out[0]``. Returns the number of
    steps completed with a finite state.
    """
    n = X.shape[0]
    for step in range(nsteps):
        rec = record and step == 0
        t0 = sgf_part(X, y, theta, g0, h, u, 0, n1, c0, c1, code, rng0, rec)
        t1 = sgf_part(X, y, theta, g1, h, u, n1, n, c0, c1, code, rng1, rec)
        if rec:
            out[0] = t0 + t1
        if not sgf_update(theta, g0, g1, a):
            return step
    return nsteps


@njit(cache=True, nogil=True, inline="always")
def _below(rng, m):
    """Uniform integer in [0, m): floor(m U) with a 53-bit U (bias below m / 2^53)."""
    j = int(rng.random() * m)
    return j if j < m else m - 1


@njit(cache=True, nogil=True)
def _select_batch(perm, B, fresh, pos, rng):
    """Indices of the next batch in perm[start:start+B]; returns start. ``pos[0]`` is the
    reshuffle cursor (n forces a reshuffle)."""
    n = perm.shape[0]
    if fresh:
        # partial Fisher-Yates: perm[:B] becomes a uniform random B-subset, whatever perm was
        for i in range(B):
            j = i + _below(rng, n - i)
            tmp = perm[i]
            perm[i] = perm[j]
            perm[j] = tmp
        return 0
    if pos[0] + B > n:  # new epoch: full reshuffle (a trailing partial batch is dropped)
        for i in range(n - 1):
            j = i + _below(rng, n - i)
            tmp = perm[i]
            perm[i] = perm[j]
            perm[j] = tmp
        pos[0] = 0
    start = pos[0]
    pos[0] = start + B
    return start


@njit(cache=True, nogil=True, fastmath=FM, inline="always")
def _fields8(X, rows, v, s, out):
    """out[r] = s * X[rows[r]] . v for 8 rows, in one pass over v."""
    x0 = X[rows[0]]
    x1 = X[rows[1]]
    x2 = X[rows[2]]
    x3 = X[rows[3]]
    x4 = X[rows[4]]
    x5 = X[rows[5]]
    x6 = X[rows[6]]
    x7 = X[rows[7]]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    s5 = 0.0
    s6 = 0.0
    s7 = 0.0
    for i in range(v.shape[0]):
        t = v[i]
        s0 += x0[i] * t
        s1 += x1[i] * t
        s2 += x2[i] * t
        s3 += x3[i] * t
        s4 += x4[i] * t
        s5 += x5[i] * t
        s6 += x6[i] * t
        s7 += x7[i] * t
    out[0] = s * s0
    out[1] = s * s1
    out[2] = s * s2
    out[3] = s * s3
    out[4] = s * s4
    out[5] = s * s5
    out[6] = s * s6
    out[7] = s * s7


@njit(cache=True, nogil=True, fastmath=FM, inline="always")
def _axpy8(X, rows, c, v):
    """v += sum_r c[r] X[rows[r]] for 8 rows, in one pass over v."""
    x0 = X[rows[0]]
    x1 = X[rows[1]]
    x2 = X[rows[2]]
    x3 = X[rows[3]]
    x4 = X[rows[4]]
    x5 = X[rows[5]]
    x6 = X[rows[6]]
    x7 = X[rows[7]]
    c0 = c[0]
    c1 = c[1]
    c2 = c[2]
    c3 = c[3]
    c4 = c[4]
    c5 = c[5]
    c6 = c[6]
    c7 = c[7]
    for i in range(v.shape[0]):
        v[i] += ((c0 * x0[i] + c1 * x1[i]) + (c2 * x2[i] + c3 * x3[i])) + \
                ((c4 * x4[i] + c5 * x5[i]) + (c6 * x6[i] + c7 * x7[i]))


@njit(cache=True, nogil=True, fastmath=FM)
def sgd_steps(X, y, v, scale, perm, pos, lp, nsteps, eta, lam, B, code, fresh, rng):
    """``nsteps`` minibatch SGD steps on ``theta = scale[0] * v`` (both updated in place).

    ``fresh``: B distinct samples drawn uniformly at every step; else random reshuffling
    (cursor ``pos[0]``). ``lp`` (B,) is a work buffer. Returns the steps completed with finite
    fields. Rows are processed 8 at a time (one pass over v per 8 rows), then one by one.
    """
    n, d = X.shape
    a = 1.0 - eta * lam / d
    s = scale[0]
    for step in range(nsteps):
        start = _select_batch(perm, B, fresh, pos, rng)
        rows = perm[start:start + B]
        b = 0
        while b + 8 <= B:
            _fields8(X, rows[b:b + 8], v, s, lp[b:b + 8])
            b += 8
        while b < B:
            lp[b] = s * _dot(X[rows[b]], v)
            b += 1
        ok = True
        for b in range(B):
            hv = lp[b]
            if not (abs(hv) < 1e150):
                ok = False
            lp[b] = loss_d1(code, hv, y[rows[b]])
        if not ok:
            scale[0] = s
            return step
        s_new = s * a
        if not (1e-150 < abs(s_new) < 1e150):  # renormalise: v <- theta after the shrinkage
            for i in range(d):
                v[i] *= s_new
            s_new = 1.0
        coef = -eta / (B * s_new)
        for b in range(B):
            lp[b] *= coef
        b = 0
        while b + 8 <= B:
            _axpy8(X, rows[b:b + 8], lp[b:b + 8], v)
            b += 8
        while b < B:
            c0 = lp[b]
            x0 = X[rows[b]]
            for i in range(d):
                v[i] += c0 * x0[i]
            b += 1
        s = s_new
    scale[0] = s
    return nsteps


@njit(cache=True, nogil=True)
def histogram(values, lo, hi, nbins, counts):
    """Add the counts of ``values`` in ``nbins`` equal bins of [lo, hi) to ``counts``
    (values outside are not counted)."""
    w = (hi - lo) / nbins
    for k in range(values.shape[0]):
        x = values[k]
        if x >= lo and x < hi:
            j = int((x - lo) / w)
            if j >= nbins:
                j = nbins - 1
            counts[j] += 1.0
    return counts
