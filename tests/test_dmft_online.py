"""Online (delta -> infinity) DMFT, solver.dmft.online, against independent computations.

Budget: about 6 s on 2 cores (most of it in the online-SGD simulation).
"""
import math
import threading

import numpy as np
import pytest
from scipy.linalg import expm
from scipy.special import expit

from solver.config import Experiment
from solver.dmft import exact, online
from solver.snapshot import SolverError

CONFIGS = {
    "logistic-sign": dict(loss="logistic", teacher="sign", flip=0.1),
    "square-sign": dict(loss="square", teacher="sign", flip=0.2),
    "square-linear": dict(loss="square", teacher="linear", noise=0.5),
}


def _mc_moments(m, Q, exp, N, rng):
    """Direct Monte Carlo of the Gaussian averages: (mean, se) per key."""
    z1, z2 = rng.standard_normal((2, N))
    hs = math.sqrt(exp.rho) * z1
    a = m / math.sqrt(exp.rho)
    om = a * z1 + math.sqrt(Q - a * a) * z2
    if exp.teacher == "linear":
        y = hs + exp.noise * rng.standard_normal(N)
    else:
        y = np.where(hs >= 0, 1.0, -1.0) * np.where(rng.random(N) < exp.flip, -1.0, 1.0)
    if exp.loss == "square":
        l1, l2, l0 = om - y, np.ones(N), 0.5 * (om - y) ** 2
    else:
        l1 = -y * expit(-y * om)
        l2 = expit(y * om) * expit(-y * om)
        l0 = np.logaddexp(0.0, -y * om)
    vals = dict(l1h=l1 * hs, l1w=l1 * om, l1sq=l1 * l1, l2=l2, l=l0)
    return {k: (v.mean(), v.std() / math.sqrt(N)) for k, v in vals.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gaussian_averages_match_monte_carlo(name):
    exp = Experiment(rho=1.3, **CONFIGS[name])
    rng = np.random.default_rng(3)
    for m, Q in ((0.0, 0.5), (0.8, 1.5), (-0.4, 0.3), (2.5, 6.0)):
        got = online.moments(m, Q, exp)
        for k, (mu, se) in _mc_moments(m, Q, exp, 400_000, rng).items():
            assert abs(got[k] - mu) <= 4.5 * se + 1e-12, f"{name} (m={m}, Q={Q}) {k}: {got[k]} vs {mu}+-{se}"


def _square_ode_closed_form(exp, t):
    """Square loss: the online ODEs are linear in (m, Q); solve them with a matrix exponential."""
    lam, tau, rho = exp.lam, exp.tau, exp.rho
    if exp.teacher == "linear":
        ey_h, ey_w, ey2 = rho, 1.0, rho + exp.noise ** 2  # E[y h*], E[y omega] = c_w m, E[y^2]
    else:
        c = (1 - 2 * exp.flip) * math.sqrt(2 / math.pi)
        ey_h, ey_w, ey2 = c * math.sqrt(rho), c / math.sqrt(rho), 1.0
    # dm/dt = -lam m - (m - E[y h*]);  dQ/dt = -2 lam Q - 2 (Q - ey_w m) + tau (Q - 2 ey_w m + ey2)
    A = np.array([[-(1 + lam), 0.0, ey_h],
                  [2 * ey_w - 2 * tau * ey_w, -2 * lam - 2 + tau, tau * ey2],
                  [0.0, 0.0, 0.0]])
    x0 = np.array([exp.m0, exp.q0, 1.0])
    return np.array([expm(A * ti) @ x0 for ti in t])


@pytest.mark.parametrize("name", ["square-linear", "square-sign"])
def test_square_loss_matches_closed_form_and_euler_converges(name):
    exp = Experiment(rho=1.3, lam=0.05, tau=0.7, q0=0.3, m0=0.1, T=3.0, dt=0.05, **CONFIGS[name])
    ivp = online.solve(exp, scheme="ivp")
    ref = _square_ode_closed_form(exp, ivp.t)
    np.testing.assert_allclose(ivp.m, ref[:, 0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ivp.Q, ref[:, 1], rtol=1e-8, atol=1e-10)
    errs = []
    for dt in (0.05, 0.025):
        eu = online.solve(exp.copy(dt=dt))
        errs.append(max(abs(eu.m[-1] - ref[-1, 0]), abs(eu.Q[-1] - ref[-1, 1])))
    assert 1.6 < errs[0] / errs[1] < 2.4, f"Euler not first order: errors {errs}"


def test_exact_dmft_tends_to_online_euler_as_delta_grows():
    """Square loss: the finite-delta deterministic DMFT at the same dt approaches the online
    Euler scheme like 1/delta (an independent code path for the Euler step)."""
    gaps = []
    for delta in (100.0, 1000.0):
        exp = Experiment(loss="square", teacher="linear", noise=0.5, delta=delta, tau=0.7, lam=0.05,
                         q0=0.3, m0=0.1, rho=1.3, T=3.0, dt=0.05)
        on, ex = online.solve(exp), exact.solve(exp)
        gaps.append(max(np.max(np.abs(getattr(on, k) - getattr(ex, k))) for k in ("m", "Q", "test_loss")))
    assert gaps[1] < 1e-3 and 7 < gaps[0] / gaps[1] < 13, gaps


def _online_sgd(exp, d, seeds, times, rng):
    """Online SGD, batch 1, learning rate eta = tau, a fresh sample every step; time t = steps*eta/d.
    Returns m, Q at `times`, shape (len(times), seeds)."""
    eta = exp.tau
    S = seeds
    ts = rng.standard_normal((S, d)) * math.sqrt(exp.rho)
    th = (exp.m0 / exp.rho) * ts + math.sqrt(exp.q0 - exp.m0 ** 2 / exp.rho) * rng.standard_normal((S, d))
    targets = [int(round(t * d / eta)) for t in times]
    out_m, out_Q = [], []
    step, block = 0, 500
    while step < targets[-1]:
        nb = min(block, targets[-1] - step)
        xs = rng.standard_normal((nb, S, d)) / math.sqrt(d)
        flips = np.where(rng.random((nb, S)) < exp.flip, -1.0, 1.0)
        for i in range(nb):
            if step in targets:
                out_m.append((th * ts).sum(1) / d)
                out_Q.append((th * th).sum(1) / d)
            x = xs[i]
            h = (x * th).sum(1)
            y = np.where((x * ts).sum(1) >= 0, 1.0, -1.0) * flips[i]
            l1 = -y * expit(-y * h)
            th -= eta * (l1[:, None] * x + (exp.lam / d) * th)
            step += 1
    out_m.append((th * ts).sum(1) / d)
    out_Q.append((th * th).sum(1) / d)
    return np.array(out_m), np.array(out_Q)


def test_online_sgd_simulation_follows_the_odes():
    """Online SGD (batch 1, eta = tau) at d = 2000 against the ODEs in SGF time t = steps*eta/d.

    Measured: m, Q within 1-2 standard errors over 4 seeds; plotting against steps/d instead (time
    off by the factor tau = 0.5) puts the curves 10-80 standard errors away."""
    exp = Experiment(loss="logistic", teacher="sign", flip=0.1, tau=0.5, lam=0.05, q0=0.2, m0=0.1,
                     rho=1.0, T=2.0, dt=0.5)
    ode = online.solve(exp, scheme="ivp")
    times = list(ode.t[1:])
    m, Q = _online_sgd(exp, 2000, 4, times, np.random.default_rng(11))
    for name, sim, th in (("m", m, ode.m[1:]), ("Q", Q, ode.Q[1:])):
        mu, se = sim.mean(1), sim.std(1, ddof=1) / math.sqrt(sim.shape[1])
        z = (mu - th) / se
        assert np.all(np.abs(z) < 4.0), f"{name}: sim {mu} +- {se} vs ODE {th}"
    # the wrong clock (steps/d = t/tau): ODE at t' = tau*t is far from the simulation
    wrong = online.solve(exp.copy(T=exp.T * exp.tau, dt=exp.dt * exp.tau), scheme="ivp")
    mu, se = m.mean(1), m.std(1, ddof=1) / math.sqrt(m.shape[1])
    assert np.max(np.abs(mu - wrong.m[1:]) / se) > 8


def test_stream_contract_cancel_and_divergence():
    exp = Experiment(loss="logistic", teacher="sign", tau=0.5, T=1.0, dt=0.1, record_every=4)
    snaps = list(online.stream(exp))
    assert [s.step for s in snaps] == [0, 4, 8, 10]
    s = snaps[-1]
    assert s.engine == "dmft-online" and s.progress == 1.0
    assert s.values["train_loss"] == s.values["test_loss"]
    assert 0 < s.values["test_error"] < 0.5 and all(v == 0 for v in s.se.values())
    assert s.epochs == pytest.approx(exp.epochs(1.0))
    x, p = s.extras["theta_density"]
    assert np.trapezoid(p, x) == pytest.approx(1.0, abs=1e-4)
    reg = list(online.stream(exp.copy(loss="square", teacher="linear")))[-1]
    assert math.isnan(reg.values["test_error"]) and math.isnan(reg.se["test_error"])
    cancel = threading.Event()
    got = []
    for snap in online.stream(exp.copy(record_every=1), cancel):
        got.append(snap)
        if len(got) == 2:
            cancel.set()
    assert len(got) == 2
    # square loss with tau > 2 + 2 lam: Q grows like exp((tau - 2) t) until it overflows
    with pytest.raises(SolverError, match="diverged at t=.*lower tau or dt") as ei:
        online.solve(Experiment(loss="square", teacher="linear", tau=12.0, T=100.0, dt=0.1))
    assert len(ei.value.result) > 0
