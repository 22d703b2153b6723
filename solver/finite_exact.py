"""Exact expected dynamics of linear regression at finite ``d``, without sampling over ``dW``.

Square loss, linear teacher ``y = X theta* + sigma eps`` (THEORY.md sections 1-2, 5.2). The
Euler-Maruyama SGF with step ``dt`` (``tau = 0``: full-batch GD with step ``dt``),

    theta_{k+1} = B theta_k + c - sqrt(tau/delta) X^T diag(r_k) dW_k,
    B = (1 - dt lam) I - (dt/delta) X^T X,   c = (dt/delta) X^T y,   r_k = X theta_k - y,

is linear in ``theta`` except for the multiplicative noise, whose covariance
``(tau dt/delta) X^T diag(E[r_k^2]) X`` depends only on the first two moments of ``theta_k``. So
``E[theta_k]`` and ``E[theta_k theta_k^T]`` obey closed linear recursions. They are propagated in
the eigenbasis of ``X^T X`` (where ``B`` is diagonal); one step costs ``O(n d^2)`` (``O(d)`` at
``tau = 0``).

Two conditionings:

* :func:`expected_path_given` -- one data set ``(X, theta*, eps)``; expectation over the
  initialisation (given ``theta*``) and over ``dW``.
* :func:`expected_path` -- given ``X`` only; ``theta*`` (i.i.d. rows, ``E theta*_i^2 = rho``),
  ``eps`` and ``theta(0)`` are averaged analytically as well. Only the spectrum-and-eigenvector
  randomness of ``X`` is left, so data-set spread is far smaller (``O(1/d)`` instead of
  ``O(1/sqrt d)``). This is what :func:`solve` averages over data sets.

Derivation: ``docs/theory_deterministic.md``, section "Finite d".
"""
from __future__ import annotations

import math

import numpy as np

from .snapshot import Result, Snapshot

OBS = ("train_loss", "test_loss", "m", "Q")


def _check(exp):
    if exp.loss != "square" or exp.teacher != "linear":
        raise ValueError("finite_exact applies to square loss with a linear teacher")


def draw_X(exp, d, rng):
    """Design matrix ``X`` (``n x d``, ``n = round(delta d)``) with i.i.d. ``N(0, 1/d)`` entries."""
    n = max(1, int(round(exp.delta * d)))
    return rng.standard_normal((n, d)) / math.sqrt(d)


def _grid(exp):
    K = exp.steps
    rec = set(range(0, K + 1, exp.record_every))
    rec.add(K)
    return K, rec


def _eig(X):
    lam, V = np.linalg.eigh(X.T @ X)
    lam = np.maximum(lam, 0.0)
    return lam, V, X @ V


def expected_path(X, exp) -> dict:
    """Expected observables given ``X``, averaged over ``theta*``, ``eps``, ``theta(0)``, ``dW``.

    State in the eigenbasis ``X^T X = V diag(lam) V^T`` (``Xt = X V``): ``S = E[th th^T]``,
    ``E[th theta*^T] = diag(f)``, ``E[th y^T] = diag(e) Xt^T`` (``th = V^T theta``). Returns a dict
    of arrays on the recording steps: ``k, t, train_loss, test_loss, m, Q``.
    """
    _check(exp)
    n, d = X.shape
    dl, dt, tau, lamr = exp.delta, exp.dt, exp.tau, exp.lam
    rho, sig2 = exp.rho, exp.noise ** 2
    lam, V, Xt = _eig(X)
    Xt2 = Xt * Xt
    xnorm2 = Xt2.sum(axis=1)  # |x_mu|^2
    b = 1.0 - dt * lamr - (dt / dl) * lam
    S = np.eye(d) * exp.q0
    f = np.full(d, exp.m0)
    e = np.full(d, exp.m0)
    drive_diag = (dt / dl) ** 2 * (rho * lam ** 2 + sig2 * lam)
    noisy = tau > 0
    K, rec = _grid(exp)
    out = {k: [] for k in ("k",) + OBS}
    for k in range(K + 1):
        if noisy:
            XS = Xt @ S
            s = np.einsum("ij,ij->i", XS, Xt)
        else:  # S stays diagonal
            s = Xt2 @ np.diag(S)
        s = s - 2.0 * (Xt2 @ e) + rho * xnorm2 + sig2  # E[r_mu^2]
        if k in rec:
            m = f.mean()
            Q = np.trace(S) / d
            out["k"].append(k)
            out["m"].append(m)
            out["Q"].append(Q)
            out["train_loss"].append(0.5 * s.mean())
            out["test_loss"].append(0.5 * (Q - 2 * m + rho + sig2))
        if k == K:
            break
        Snew = (b[:, None] * S) * b[None, :]
        Snew[np.diag_indices(d)] += 2.0 * (dt / dl) * b * e * lam + drive_diag
        if noisy:
            Snew += (tau * dt / dl) * (Xt.T @ (s[:, None] * Xt))
        S = Snew
        f = b * f + (dt / dl) * rho * lam
        e = b * e + (dt / dl) * (rho * lam + sig2)
    out = {k: np.asarray(v) for k, v in out.items()}
    out["t"] = out["k"] * dt
    return out


def expected_path_given(X, theta_star, eps, exp) -> dict:
    """Expected observables for one data set ``(X, theta*, eps)``, averaged over ``theta(0)``
    (rows ``(m0/rho) theta*_i + sqrt(q0 - m0^2/rho) xi_i``) and over ``dW``.

    ``m = theta*.E[theta]/d``; test loss ``(Q - 2m + |theta*|^2/d + sigma^2)/2`` (exact for a fresh
    ``x`` given ``theta*``). Same output as :func:`expected_path`.
    """
    _check(exp)
    n, d = X.shape
    dl, dt, tau, lamr = exp.delta, exp.dt, exp.tau, exp.lam
    y = X @ theta_star + exp.noise * eps
    lam, V, Xt = _eig(X)
    ts = V.T @ theta_star
    b = 1.0 - dt * lamr - (dt / dl) * lam
    c = (dt / dl) * (Xt.T @ y)
    mu = (exp.m0 / exp.rho) * ts
    S = np.eye(d) * (exp.q0 - exp.m0 ** 2 / exp.rho) + np.outer(mu, mu)
    rho_hat = theta_star @ theta_star / d
    K, rec = _grid(exp)
    out = {k: [] for k in ("k",) + OBS}
    for k in range(K + 1):
        s = np.einsum("ij,ij->i", Xt @ S, Xt) - 2.0 * y * (Xt @ mu) + y * y
        if k in rec:
            m = ts @ mu / d
            Q = np.trace(S) / d
            out["k"].append(k)
            out["m"].append(m)
            out["Q"].append(Q)
            out["train_loss"].append(0.5 * s.mean())
            out["test_loss"].append(0.5 * (Q - 2 * m + rho_hat + exp.noise ** 2))
        if k == K:
            break
        bmu = b * mu
        S = (b[:, None] * S) * b[None, :] + np.outer(bmu, c) + np.outer(c, bmu) + np.outer(c, c)
        if tau > 0:
            S += (tau * dt / dl) * (Xt.T @ (s[:, None] * Xt))
        mu = bmu + c
    out = {k: np.asarray(v) for k, v in out.items()}
    out["t"] = out["k"] * dt
    return out


def average(exp, d, sets=4, seed=None) -> dict:
    """:func:`expected_path` averaged over ``sets`` independent ``X``: dict name -> (mean, se)."""
    rng = np.random.default_rng(exp.seed if seed is None else seed)
    runs = [expected_path(draw_X(exp, d, rng), exp) for _ in range(sets)]
    out = {"t": runs[0]["t"], "k": runs[0]["k"]}
    for name in OBS:
        a = np.array([r[name] for r in runs])
        se = a.std(axis=0, ddof=1) / math.sqrt(sets) if sets > 1 else np.zeros(a.shape[1])
        out[name] = (a.mean(axis=0), se)
    return out


def solve(exp, d=None, sets=4, seed=None) -> Result:
    """:func:`average` as a :class:`Result` (engine ``'finite-exact'``; se over data sets)."""
    from .observables import metrics

    d = exp.d if d is None else d
    avg = average(exp, d, sets, seed)
    res = Result(config=exp.to_dict(), engine="finite-exact")
    K = exp.steps
    for i, (k, t) in enumerate(zip(avg["k"], avg["t"])):
        vals = {name: float(avg[name][0][i]) for name in OBS}
        se = {name: float(avg[name][1][i]) for name in OBS}
        met = metrics(vals["m"], vals["Q"], exp)
        vals["test_error"] = math.nan
        vals["cosine"] = float(met["cosine"])
        se["test_error"] = math.nan
        res.append(Snapshot(t=float(t), step=int(k), epochs=float(exp.epochs(t)), values=vals,
                            se=se, engine="finite-exact", progress=float(k) / K))
    return res
