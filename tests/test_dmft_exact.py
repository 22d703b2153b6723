"""Deterministic DMFT of linear regression (solver.dmft.exact) and its finite-d reference
(solver.finite_exact), against independent computations.

Budget: about 10 s on 2 cores (most of it in the finite-d and Monte Carlo references).
"""
import math
import os
import threading

import numpy as np
import pytest
from scipy.special import roots_chebyu

from solver.config import ConfigError, Experiment
from solver.dmft import exact
from solver import finite_exact as fe
from solver.snapshot import SolverError

OBS = ("train_loss", "test_loss", "m", "Q")
SEED = int(os.environ.get("SGF_TEST_SEED", "1000"))


def _exp(**kw):
    base = dict(loss="square", teacher="linear", lam=0.1, noise=0.5, q0=0.5, m0=0.2, rho=1.2,
                T=2.0, dt=0.1)
    base.update(kw)
    return Experiment(**base)


def _gd_marchenko_pastur(exp, nq=400):
    """Large-d limit of full-batch GD with step dt, averaged over theta*, eps, theta(0):
    per eigenvalue lam of X^T X the second moments obey scalar recursions; integrate them
    against the Marchenko-Pastur law of X^T X = delta * W, W ~ MP(ratio 1/delta)."""
    dl, g = exp.delta, 1.0 / exp.delta
    lo, hi = (1 - math.sqrt(g)) ** 2, (1 + math.sqrt(g)) ** 2
    x, w = roots_chebyu(nq)  # weight sqrt(1 - x^2)
    nu = 0.5 * (lo + hi) + 0.5 * (hi - lo) * x
    wts = w * (0.5 * (hi - lo)) ** 2 / (2 * math.pi * g * nu)
    lam = dl * nu
    if dl < 1:  # atom at 0 of mass 1 - delta
        lam, wts = np.append(lam, 0.0), np.append(wts, 1 - dl)
    assert wts.sum() == pytest.approx(1.0, abs=1e-12)
    dt, rho, s2 = exp.dt, exp.rho, exp.noise ** 2
    b = 1 - dt * exp.lam - (dt / dl) * lam
    s, f, e = (np.full_like(lam, v) for v in (exp.q0, exp.m0, exp.m0))
    out = {k: [] for k in OBS}
    for _ in range(exp.steps + 1):
        m, Q = wts @ f, wts @ s
        out["m"].append(m)
        out["Q"].append(Q)
        out["train_loss"].append(wts @ (lam * s - 2 * lam * e + rho * lam) / (2 * dl) + s2 / 2)
        out["test_loss"].append(0.5 * (Q - 2 * m + rho + s2))
        s = b * b * s + 2 * (dt / dl) * b * e * lam + (dt / dl) ** 2 * (rho * lam ** 2 + s2 * lam)
        f = b * f + (dt / dl) * rho * lam
        e = b * e + (dt / dl) * (rho * lam + s2)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("delta", [2.0, 0.5])
def test_gradient_descent_equals_marchenko_pastur_closed_form(delta):
    exp = _exp(delta=delta, tau=0.0, T=5.0)
    res = exact.solve(exp)
    ref = _gd_marchenko_pastur(exp)
    for k in OBS:
        np.testing.assert_allclose(getattr(res, k), ref[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_sgf_gap_to_finite_d_shrinks_like_one_over_d():
    """Exact expected finite-d SGF (averaged over theta*, eps, theta(0), dW given X; then over
    data sets X) approaches the DMFT: gap = a + c/d with a consistent with 0.

    Measured (test loss at T=1.5, delta=1.5, tau=1): d*gap = 0.39, 0.34, 0.32, 0.47 (+-0.02..0.06)
    at d = 50..400; spread of d*gap over data sets 0.1-0.2 per set; at d = 800 (T=2, delta=1)
    d*gap stays 0.35+-0.04, i.e. the gap is O(1/d) and extrapolates to 0."""
    exp = _exp(delta=1.5, tau=1.0, T=1.5)
    dmft = exact.solve(exp)
    ds = np.array([50, 100, 200, 400])
    sets = [16, 12, 8, 6]
    gaps = {k: [] for k in OBS}
    ses = {k: [] for k in OBS}
    for d, ns in zip(ds, sets):
        rng = np.random.default_rng(SEED + d)
        runs = [fe.expected_path(fe.draw_X(exp, d, rng), exp) for _ in range(ns)]
        for k in OBS:
            g = np.array([r[k][-1] for r in runs]) - getattr(dmft, k)[-1]
            gaps[k].append(g.mean())
            ses[k].append(g.std(ddof=1) / math.sqrt(ns))
    for k in OBS:
        g, se = np.array(gaps[k]), np.array(ses[k])
        # weighted least squares fit g = a + c/d
        A = np.stack([np.ones_like(ds, dtype=float), 1.0 / ds], axis=1) / se[:, None]
        coef, *_ = np.linalg.lstsq(A, g / se, rcond=None)
        cov = np.linalg.inv(A.T @ A)
        a, sa = coef[0], math.sqrt(cov[0, 0])
        assert abs(a) < 4 * sa + 1e-5, f"{k}: gap extrapolates to {a:.2e} +- {sa:.1e} at d = inf"
        chi2 = np.sum(((g - coef[0] - coef[1] / ds) / se) ** 2)
        assert chi2 < 16.0, f"{k}: gaps {g} +- {se} do not follow a + c/d (chi2 {chi2:.1f}, 2 dof)"
    for k in ("test_loss",):  # the lowest-noise observable shows the 1/d shrinkage
        g, se = np.array(gaps[k]), np.array(ses[k])
        assert g[0] > 4 * se[0], f"{k}: finite-size gap at d=50 not resolved: {g[0]:.2e}+-{se[0]:.1e}"
        assert g[-1] < g[0] / 3, f"{k}: gap does not shrink: {g}"


def _em_paths(X, exp, rng, R, theta_star=None, eps=None):
    """Direct Monte Carlo of the Euler-Maruyama SGF (R paths). theta*, eps drawn per path
    unless given."""
    n, d = X.shape
    if theta_star is None:
        ts = rng.standard_normal((R, d)) * math.sqrt(exp.rho)
        y = ts @ X.T + exp.noise * rng.standard_normal((R, n))
    else:
        ts = np.broadcast_to(theta_star, (R, d))
        y = np.broadcast_to(X @ theta_star + exp.noise * eps, (R, n))
    th = (exp.m0 / exp.rho) * ts + math.sqrt(exp.q0 - exp.m0 ** 2 / exp.rho) * rng.standard_normal((R, d))
    out = {k: [] for k in ("train_loss", "m", "Q")}
    for k in range(exp.steps + 1):
        r = th @ X.T - y
        out["train_loss"].append(0.5 * (r * r).mean(1))
        out["m"].append((th * ts).sum(1) / d)
        out["Q"].append((th * th).sum(1) / d)
        if k == exp.steps:
            break
        dW = rng.standard_normal((R, n)) * math.sqrt(exp.dt)
        th = th - exp.dt * (exp.lam * th + (r @ X) / exp.delta) - math.sqrt(exp.tau / exp.delta) * ((r * dW) @ X)
    return {k: (np.mean(v, axis=1), np.std(v, axis=1) / math.sqrt(R)) for k, v in out.items()}


def test_finite_exact_matches_euler_maruyama_monte_carlo():
    """The finite-d reference itself, both conditionings, against brute-force sampling (d=10)."""
    exp = _exp(delta=1.5, tau=0.3, T=1.5)
    rng = np.random.default_rng(7)
    X = fe.draw_X(exp, 10, rng)
    ts = rng.standard_normal(10) * math.sqrt(exp.rho)
    eps = rng.standard_normal(X.shape[0])
    for given in (True, False):
        ref = fe.expected_path_given(X, ts, eps, exp) if given else fe.expected_path(X, exp)
        mc = _em_paths(X, exp, rng, 60000, *((ts, eps) if given else ()))
        for k, (mu, se) in mc.items():
            z = np.abs(mu - ref[k]) / np.maximum(se, 1e-12)
            assert z[1:].max() < 4.5, f"given={given} {k}: max |z| = {z.max():.1f}"


def test_stream_contract_and_kernels():
    exp = _exp(delta=2.0, tau=0.5, T=1.0, dt=0.1, record_every=3)
    snaps = list(exact.stream(exp))
    assert [s.step for s in snaps] == [0, 3, 6, 9, 10]
    s = snaps[-1]
    assert s.engine == "dmft-exact" and s.progress == 1.0
    assert set(OBS) | {"test_error", "cosine"} <= set(s.values)
    assert math.isnan(s.values["test_error"]) and math.isnan(s.se["test_error"])
    assert all(v == 0 for k, v in s.se.items() if k != "test_error")
    assert s.epochs == pytest.approx(exp.epochs(1.0))
    x, p = s.extras["theta_density"]
    assert np.trapezoid(p, x) == pytest.approx(1.0, abs=1e-4)
    kern = s.extras["kernels"]  # the Monte Carlo solver's layout
    assert kern["C"].shape == kern["R"].shape == kern["Gamma"].shape == (11, 11)
    assert np.allclose(np.diag(kern["C"]), exact.solve(exp.copy(record_every=1)).Q)
    assert np.allclose(np.diag(kern["R"]), 1.0) and np.allclose(kern["Gamma_inst"], 1.0)
    assert np.isnan(kern["Gamma"][0, 0]) and np.isnan(kern["R"][0, 1])
    # regular part of the response: Gamma(t_1, t_0) dt = -R_{1,1} dt/delta
    assert kern["Gamma"][1, 0] == pytest.approx(-1.0 / exp.delta)
    assert "kernels" not in snaps[0].extras and "kernels" in snaps[1].extras
    # at tau = 0 the training field is Gaussian: its density is reported
    assert "field_density" in list(exact.stream(exp.copy(tau=0.0)))[-1].extras


def test_cancel_divergence_and_config_errors():
    cancel = threading.Event()
    got = []
    for snap in exact.stream(_exp(T=5.0, dt=0.05), cancel):
        got.append(snap)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3
    with pytest.raises(SolverError, match="diverged at t=.*lower tau or dt") as ei:
        exact.solve(_exp(delta=0.5, tau=30.0, T=60.0, dt=0.1))
    assert len(ei.value.result) > 0
    with pytest.raises(ConfigError, match="method"):
        list(exact.stream(Experiment(loss="logistic", teacher="sign")))
    with pytest.raises(ConfigError, match="dt"):
        list(exact.stream(_exp(T=1000.0, dt=0.1)))
