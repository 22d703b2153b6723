"""Online limit ``delta -> infinity`` of the DMFT (THEORY.md section 5.3): two ODEs.

With ``(omega, h*) ~ N(0, [[Q, m], [m, rho]])``, ``y = phi(h*, eps)`` and no memory (``h = omega``):

    dm/dt = -lam m - E[l' h*],      dQ/dt = -2 lam Q - 2 E[l' omega] + tau E[l'^2].

Two integrators:

* ``scheme='euler'`` (default): the ``delta -> infinity`` limit of the section-4 grid scheme at the
  same ``dt``, i.e. the Euler step of the parameter process
  ``theta_{k+1} = (1 - dt a) theta_k - dt kappa theta* + dU_k`` with ``a = lam + E[l'']``,
  ``kappa = (E[l' h*] - E[l''] m)/rho`` and ``E[dU_k^2] = tau dt E[l'^2]``:

      m' = (1 - dt a) m - dt kappa rho
      Q' = (1 - dt a)^2 Q - 2 dt (1 - dt a) kappa m + dt^2 kappa^2 rho + tau dt E[l'^2]

  (first order in ``dt``; keeps ``Q >= m^2/rho``). The Monte Carlo solver approaches it as
  ``delta`` grows at equal ``dt``.
* ``scheme='ivp'``: the continuous ODEs with ``scipy.integrate.solve_ivp`` (DOP853, tight
  tolerances), the reference for tests.

Gaussian averages: closed forms for the square loss; for the sign teacher with a margin loss
(logistic) a 1-D integral over the skew-normal margin ``y omega`` (see :func:`_moments`),
accurate to ~1e-14 also where ``Q`` is large or the cosine is near 1.
Time ``t`` is SGF time; online SGD with batch ``B`` and learning rate ``eta`` has made
``steps = t d/eta`` steps (``steps/d = t/(tau B)``), so plotting against ``steps/d`` is off by
``tau`` for ``B = 1``.
"""
from __future__ import annotations

import math
import threading
from typing import Iterator

import numpy as np
from numba import njit
from scipy.special import roots_legendre

from ..models import (LINEAR, LOSS_CODES, SIGN, SQUARE, TEACHER_CODES, loss_d1, loss_d2,
                      loss_value)
from ..observables import metrics
from ..snapshot import Result, Snapshot, SolverError, collect

ENGINE = "dmft-online"
_TWO_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
#: Quadrature cut-off in standard deviations.
_L = 9.0


@njit(cache=True, nogil=True, inline="always")
def _Phi(x):
    return 0.5 * math.erfc(-x * _INV_SQRT_2)


@njit(cache=True, nogil=True)
def _moments(lc, tc, m, Q, rho, noise, flip, xg, wg):
    """(E[l' h*], E[l' omega], E[l'^2], E[l''], E[l]) for (omega, h*) ~ N(0, [[Q, m], [m, rho]]).

    Square loss: closed forms. Sign teacher with a margin loss (``l(omega, y) = L(y omega)``,
    ``y = +-1``): with ``h* = sqrt(rho) z1``, ``omega = a z1 + b z2`` (``a = m/sqrt(rho)``,
    ``b^2 = Q - a^2``) and no flip, the margin ``v = y omega = a|z1| + b z2'`` is skew-normal,
    ``p(v) = (2/sqrt Q) phi(v/sqrt Q) Phi(a v/(b sqrt Q))``, and ``|z1|`` given ``v`` is a normal
    ``N(a v/Q, b^2/Q)`` truncated to ``> 0``; a flip maps ``(v, y h*) -> (-v, -y h*)``. So every
    average is a 1-D integral over ``v``. Its two sharp features (the loss on the unit scale,
    the teacher's step of width ``b sqrt(Q)/|a|``) both sit at ``v = 0``: composite
    Gauss-Legendre on panels growing geometrically away from 0, cut at ``|v| = 9 sqrt Q``.
    """
    if lc == SQUARE:
        if tc == LINEAR:
            e1h = m - rho
            e1w = Q - m
            e11 = Q - 2.0 * m + rho + noise * noise
        else:  # sign teacher with flips: E[y h*] = c sqrt(rho), E[y omega] = c m / sqrt(rho)
            c = (1.0 - 2.0 * flip) * _TWO_OVER_PI
            e1h = m - c * math.sqrt(rho)
            e1w = Q - c * m / math.sqrt(rho)
            e11 = Q - 2.0 * c * m / math.sqrt(rho) + 1.0
        return e1h, e1w, e11, 1.0, 0.5 * e11
    sr = math.sqrt(rho)
    if Q <= 0.0:  # omega = 0
        d1 = loss_d1(lc, 0.0, 1.0)
        return (sr * _TWO_OVER_PI * (1.0 - 2.0 * flip) * d1, 0.0, d1 * d1,
                loss_d2(lc, 0.0, 1.0), loss_value(lc, 0.0, 1.0))
    sq = math.sqrt(Q)
    a = m / sr
    b = math.sqrt(max(Q - a * a, 0.0))
    h0 = min(1.0, 0.25 * sq)
    if b > 0.0 and a != 0.0:
        h0 = min(h0, b * sq / abs(a))
    h0 = max(h0, 1e-9 * sq)
    vmax = _L * sq
    e1h = 0.0
    e1w = 0.0
    e11 = 0.0
    e2 = 0.0
    e0 = 0.0
    lo = 0.0
    hi = h0
    while lo < vmax:
        hi = min(hi, vmax)
        half = 0.5 * (hi - lo)
        mid = 0.5 * (hi + lo)
        for i in range(xg.shape[0]):
            for side in range(2):
                v = (mid + half * xg[i]) if side == 0 else -(mid + half * xg[i])
                g = 2.0 / sq * math.exp(-0.5 * v * v / Q) * _INV_SQRT_2PI
                if b > 0.0:
                    kv = a * v / (b * sq)
                    Ph = _Phi(kv)
                    ph = math.exp(-0.5 * kv * kv) * _INV_SQRT_2PI
                else:
                    Ph = 1.0 if a * v > 0.0 else 0.0
                    ph = 0.0
                w = half * wg[i]
                pv = w * g * Ph  # density of the margin v (no flip)
                qv = w * g * (a * v / Q * Ph + b / sq * ph)  # p(v) E[|z1| | v]
                for flipped in range(2):
                    pw = flip if flipped == 1 else 1.0 - flip
                    if pw == 0.0:
                        continue
                    vv = -v if flipped == 1 else v  # margin y*omega
                    uu = -sr if flipped == 1 else sr  # y h* = uu |z1|
                    d1 = loss_d1(lc, vv, 1.0)
                    e1h += pw * qv * uu * d1
                    e1w += pw * pv * vv * d1
                    e11 += pw * pv * d1 * d1
                    e2 += pw * pv * loss_d2(lc, vv, 1.0)
                    e0 += pw * pv * loss_value(lc, vv, 1.0)
        lo = hi
        hi = 2.0 * hi
    return e1h, e1w, e11, e2, e0


@njit(cache=True, nogil=True)
def _euler(k0, k1, ms, Qs, dt, lam, tau, lc, tc, rho, noise, flip, bound, xg, wg):
    """Euler steps k0 -> k1 of the online system; ms[k], Qs[k] given for k = k0."""
    for k in range(k0, k1):
        m = ms[k]
        Q = Qs[k]
        e1h, e1w, e11, e2, e0 = _moments(lc, tc, m, Q, rho, noise, flip, xg, wg)
        a = 1.0 - dt * (lam + e2)
        kap = (e1h - e2 * m) / rho
        ms[k + 1] = a * m - dt * kap * rho
        Qs[k + 1] = a * a * Q - 2.0 * dt * a * kap * m + dt * dt * kap * kap * rho + tau * dt * e11
        if not (math.isfinite(ms[k + 1]) and math.isfinite(Qs[k + 1])) or abs(Qs[k + 1]) > bound:
            return k + 1
    return k1


def _codes(exp):
    return LOSS_CODES[exp.loss], TEACHER_CODES[exp.teacher]


def _nodes(n=16):
    """Gauss-Legendre reference nodes for each quadrature panel."""
    x, w = roots_legendre(n)
    return x, w


def moments(m, Q, exp, nodes=None) -> dict:
    """Gaussian averages at one ``(m, Q)``: keys ``l1h`` = E[l' h*], ``l1w`` = E[l' omega],
    ``l1sq`` = E[l'^2], ``l2`` = E[l''], ``l`` = E[l]."""
    lc, tc = _codes(exp)
    if lc != SQUARE and tc != SIGN:
        raise ValueError(f"loss={exp.loss!r} needs teacher='sign'")
    vals = _moments(lc, tc, float(m), float(Q), exp.rho, exp.noise, exp.flip,
                    *(nodes or _nodes()))
    return dict(zip(("l1h", "l1w", "l1sq", "l2", "l"), vals))


def rhs(m, Q, exp, nodes=None):
    """(dm/dt, dQ/dt) of the continuous online ODEs."""
    mo = moments(m, Q, exp, nodes)
    return (-exp.lam * m - mo["l1h"],
            -2.0 * exp.lam * Q - 2.0 * mo["l1w"] + exp.tau * mo["l1sq"])


def epochs(exp, t):
    """SGF convention (as the Monte Carlo solver): t/(tau delta) passes; at tau = 0 t/dt."""
    return t / (exp.tau * exp.delta) if exp.tau > 0 else t / exp.dt


def _bound(exp):
    return 1e10 * max(1.0, exp.q0, exp.rho)


def _snapshot(exp, k, K, t, m, Q):
    if not (math.isfinite(m) and math.isfinite(Q)) or abs(Q) > _bound(exp):
        return None
    met = metrics(m, Q, exp)
    te = float(met["test_loss"])
    vals = {"train_loss": te, "test_loss": te, "test_error": float(met["test_error"]),
            "m": float(m), "Q": float(Q), "cosine": float(met["cosine"])}
    se = {key: (math.nan if math.isnan(v) else 0.0) for key, v in vals.items()}
    extras = {}
    if Q > 0:
        sd = math.sqrt(Q)
        x = np.linspace(-5 * sd, 5 * sd, 201)
        p = np.exp(-0.5 * x * x / Q) / math.sqrt(2 * math.pi * Q)
        extras["theta_density"] = (x, p)
        extras["field_density"] = (x.copy(), p.copy())  # h = omega ~ N(0, Q)
    return Snapshot(t=t, step=k, epochs=float(epochs(exp, t)), values=vals, se=se, extras=extras,
                    engine=ENGINE, progress=k / K)


def _diverged(exp, t):
    return SolverError(f"diverged at t={t:.4g}: " + ("lower tau or dt" if exp.tau > 0 else "lower dt"),
                       parameter="tau" if exp.tau > 0 else "dt")


def stream(exp, cancel: threading.Event | None = None, scheme: str = "euler") -> Iterator[Snapshot]:
    """Yield a :class:`Snapshot` every ``exp.record_every`` grid steps (and at ``T``)."""
    lc, tc = _codes(exp)
    if lc != SQUARE and tc != SIGN:
        raise ValueError(f"loss={exp.loss!r} needs teacher='sign'")
    K = exp.steps
    rec = sorted(set(range(0, K + 1, exp.record_every)) | {K})
    nodes = _nodes()
    if scheme == "euler":
        ms = np.empty(K + 1)
        Qs = np.empty(K + 1)
        ms[0], Qs[0] = exp.m0, exp.q0
        done = 0
        chunk = 2000
        for k in rec:
            while done < k:
                if cancel is not None and cancel.is_set():
                    return
                k1 = min(k, done + chunk)
                stop = _euler(done, k1, ms, Qs, exp.dt, exp.lam, exp.tau, lc, tc, exp.rho,
                              exp.noise, exp.flip, _bound(exp), *nodes)
                if stop < k1:
                    raise _diverged(exp, stop * exp.dt)
                done = k1
            snap = _snapshot(exp, k, K, k * exp.dt, ms[k], Qs[k])
            if snap is None:
                raise _diverged(exp, k * exp.dt)
            yield snap
    elif scheme == "ivp":
        from scipy.integrate import solve_ivp

        def f(_t, x):
            return rhs(x[0], x[1], exp, nodes)

        x = np.array([exp.m0, exp.q0], float)
        prev = 0
        for k in rec:
            if cancel is not None and cancel.is_set():
                return
            if k > prev:
                sol = solve_ivp(f, (prev * exp.dt, k * exp.dt), x, method="DOP853",
                                rtol=1e-10, atol=1e-12)
                if not sol.success:
                    raise _diverged(exp, sol.t[-1])
                x = sol.y[:, -1]
                prev = k
            snap = _snapshot(exp, k, K, k * exp.dt, x[0], x[1])
            if snap is None:
                raise _diverged(exp, k * exp.dt)
            yield snap
    else:
        raise ValueError(f"scheme must be 'euler' or 'ivp', got {scheme!r}")


def solve(exp, cancel: threading.Event | None = None, callback=None, scheme: str = "euler") -> Result:
    """Collect :func:`stream` into a :class:`Result` (``callback(snapshot)`` after each)."""
    return collect(stream(exp, cancel, scheme), exp.to_dict(), ENGINE, cancel, callback)


run = solve
