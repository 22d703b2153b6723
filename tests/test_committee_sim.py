"""Committee machine: observables (vs Monte Carlo) and the finite-size simulator (vs numpy).

Budget (with tests/test_committee_online.py): 21 s on 2 cores under load ~4 with numba's cache
warm, 35 s cold.
"""
import math
import threading

import numpy as np
import pytest
from scipy.special import erf

from solver.config import Experiment
from solver.committee import simulate
from solver.committee.observables import gen_error, metrics, pair_moments
from solver.snapshot import SolverError

ACTS = {"erf": lambda x: erf(x / math.sqrt(2.0)), "relu": lambda x: np.maximum(x, 0.0),
        "tanh": np.tanh}
DACTS = {"erf": lambda x: math.sqrt(2 / math.pi) * np.exp(-0.5 * x * x),
         "relu": lambda x: (x > 0).astype(float), "tanh": lambda x: 1.0 - np.tanh(x) ** 2}


def committee(**kw):
    base = dict(model="committee", loss="square", teacher="linear", lam=0.0)
    base.update(kw)
    return Experiment(**base).validate()


def random_overlaps(rng, k, ks, scale=1.0):
    A = rng.standard_normal((k + ks, k + ks + 2))
    S = scale * A @ A.T / (k + ks + 2)
    return S[:k, :k], S[:k, k:], S[k:, k:]


# --- observables ------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["erf", "relu", "tanh"])
def test_gen_error_vs_monte_carlo(act):
    """eg from pair moments (closed forms / trapezoid) vs a direct average over 4e5 Gaussian
    samples, for an asymmetric setup (k=3, k*=2, unequal v), vectorised over two 'times'."""
    rng = np.random.default_rng(1)
    v = np.array([1.0, 0.4, 1.7])
    mats = [random_overlaps(rng, 3, 2, s) for s in (1.0, 3.0)]
    Q = np.stack([m[0] for m in mats])
    M = np.stack([m[1] for m in mats])
    R = np.stack([m[2] for m in mats])
    eg = gen_error(Q, M, R, v, act)
    assert eg.shape == (2,)
    N = 400_000
    for i in range(2):
        S = np.block([[Q[i], M[i]], [M[i].T, R[i]]])
        X = rng.standard_normal((N, 5)) @ np.linalg.cholesky(S).T
        s = ACTS[act](X)
        e2 = 0.5 * ((s[:, :3] @ v) / 3 - s[:, 3:].mean(1)) ** 2
        se = e2.std() / math.sqrt(N)
        assert abs(eg[i] - e2.mean()) < 5 * se, (act, i, eg[i], e2.mean(), se)


@pytest.mark.parametrize("act", ["erf", "relu", "tanh"])
def test_pair_moments_vs_monte_carlo(act):
    """F = E[s(u)s(w)], B = E[s'(u)s'(w)] and the Stein combination Sigma_xu A + Sigma_xw B =
    E[x s'(u) s(w)] against 1e6 samples of (u, w, x)."""
    rng = np.random.default_rng(2)
    C = np.array([[1.3, 0.5, -0.4], [0.5, 0.8, 0.3], [-0.4, 0.3, 1.1]])
    X = rng.standard_normal((1_000_000, 3)) @ np.linalg.cholesky(C).T
    u, w, x = X.T
    F, A, B = pair_moments({"erf": 0, "relu": 1, "tanh": 2}[act], C[0, 0], C[1, 1], C[0, 1])
    for val, samples in ((F, ACTS[act](u) * ACTS[act](w)), (B, DACTS[act](u) * DACTS[act](w)),
                         (C[2, 0] * A + C[2, 1] * B, x * DACTS[act](u) * ACTS[act](w))):
        se = samples.std() / math.sqrt(samples.size)
        assert abs(val - samples.mean()) < 5 * se, (act, val, samples.mean(), se)


def test_metrics_conventions():
    """m, Q are traces / k, cosine = tr M / sqrt(tr Q tr rho), entries exposed, test_loss = eg +
    noise^2/2, and a perfect student has eg = 0."""
    Q = np.array([[1.0, 0.2], [0.2, 2.0]])
    M = np.array([[0.5, 0.1, 0.0], [0.3, 0.7, 0.2]])
    R = np.eye(3)
    out = metrics(Q, M, R, [1.0, 1.0], "erf", noise=0.5)
    assert out["m"] == pytest.approx(0.6) and out["Q"] == pytest.approx(1.5)
    assert out["cosine"] == pytest.approx(1.2 / math.sqrt(3.0 * 3.0))
    assert out["Q_1_0"] == 0.2 and out["M_1_2"] == 0.2 and "M_0_2" in out and "Q_2_2" not in out
    assert out["test_loss"] == pytest.approx(out["test_error"] + 0.125)
    R2 = np.array([[1.0, 0.3], [0.3, 2.0]])
    for act in ACTS:
        assert gen_error(R2, R2, R2, [1.0, 1.0], act) == pytest.approx(0.0, abs=1e-12)


# --- simulator vs a direct numpy implementation ------------------------------------------------
def _numpy_fullbatch(exp, noisy):
    """Direct numpy GD / Euler-Maruyama SGF with the simulator's draws (same generator order)."""
    p = simulate.draw_problem(exp, 0)
    X, y, ts, th, rng = p["X"], p["y"], p["theta_star"], p["theta0"].copy(), p["rng"]
    s, ds, v, k, d = ACTS[exp.activation], DACTS[exp.activation], exp.second_layer(), exp.k, exp.d
    out = []
    for step in range(exp.steps + 1):
        H = X @ th
        r = s(H) @ v / k - y
        if step % exp.record_every == 0:
            out.append(dict(Q=th.T @ th / d, M=th.T @ ts / d, train=np.mean(0.5 * r * r)))
        if step == exp.steps:
            break
        w = np.full(exp.n, exp.dt / exp.delta)
        if noisy:
            w = w + math.sqrt(exp.tau / exp.delta) * rng.standard_normal(exp.n) * math.sqrt(exp.dt)
        Lp = (w * r)[:, None] * v * ds(H) / k
        th = (1 - exp.lam * exp.dt) * th - X.T @ Lp
    return out


@pytest.mark.parametrize("algo,act", [("gd", "relu"), ("sgf", "erf"), ("sgf", "tanh")])
def test_full_batch_matches_numpy(algo, act):
    exp = committee(k=2, kstar=3, activation=act, v=[1.0, 0.6], d=60, delta=1.5, T=0.3, dt=0.05,
                    record_every=2, seeds=1, tau=0.7, lam=0.1, noise=0.3,
                    Q0=np.array([[0.6, 0.1], [0.1, 0.4]]),
                    M0=np.array([[0.2, 0.0, 0.1], [0.0, 0.3, 0.0]]))
    ref = _numpy_fullbatch(exp, noisy=(algo == "sgf"))
    res = simulate.run(_with_algo(exp, algo))
    assert len(res) == len(ref) == 4  # t = 0, 0.1, 0.2, 0.3
    for snap, r in zip(res.snapshots, ref):
        assert snap.values["train_loss"] == pytest.approx(r["train"], rel=1e-10, abs=1e-13)
        for a in range(2):
            for b in range(2):
                assert snap.values[f"Q_{a}_{b}"] == pytest.approx(r["Q"][a, b], rel=1e-10,
                                                                  abs=1e-13)
            for b in range(3):
                assert snap.values[f"M_{a}_{b}"] == pytest.approx(r["M"][a, b], rel=1e-10,
                                                                  abs=1e-13)


def _with_algo(exp, algo):
    d = exp.to_dict()
    d["algo"] = algo
    return Experiment.from_dict(d).validate()


def test_sgd_fresh_matches_numpy():
    """SGD with fresh batches: the partial Fisher-Yates batches and the update, replayed in
    numpy."""
    exp = committee(k=2, kstar=2, activation="erf", d=40, delta=2.0, T=0.5, dt=0.25,
                    record_every=1, seeds=1, algo="sgd", tau=0.5, batch=3, lam=0.2, q0=0.5, m0=0.2)
    p = simulate.draw_problem(exp, 0)
    X, y, th, rng = p["X"], p["y"], p["theta0"].copy(), p["rng"]
    perm = np.arange(exp.n)
    steps = int(math.floor(exp.T * exp.d / exp.eta))  # SGD records after floor(t d/eta) steps
    # the simulator draws the uniforms of each recording interval in one call; so do we
    j = 0
    for target in (int(math.floor(0.25 * exp.d / exp.eta)), steps):
        U = rng.random((target - j, exp.batch))
        for s in range(target - j):
            idx = []
            for i in range(exp.batch):
                jj = min(i + int(U[s, i] * (exp.n - i)), exp.n - 1)
                perm[i], perm[jj] = perm[jj], perm[i]
                idx.append(perm[i])
            Xb = X[idx]
            H = Xb @ th
            r = ACTS["erf"](H).mean(1) - y[idx]
            G = Xb.T @ (r[:, None] * DACTS["erf"](H) / 2) / exp.batch
            th = (1 - exp.eta * exp.lam / exp.d) * th - exp.eta * G
        j = target
    res = simulate.run(exp)
    assert res.t[-1] == pytest.approx(steps * exp.eta / exp.d)
    Q = th.T @ th / exp.d
    assert res.Q_0_1[-1] == pytest.approx(Q[0, 1], rel=1e-10)
    assert res.Q[-1] == pytest.approx(np.trace(Q) / 2, rel=1e-10)


# --- stream contract ---------------------------------------------------------------------------
def test_stream_contract_and_extras():
    exp = committee(k=2, kstar=2, activation="tanh", d=80, delta=2.0, T=0.4, dt=0.05,
                    record_every=3, seeds=3, algo="sgf", tau=0.5, q0=0.3, m0=0.1)
    snaps = list(simulate.stream(exp))
    assert [s.step for s in snaps] == [0, 3, 6, 8]
    assert snaps[-1].progress == 1.0 and snaps[0].progress == 0.0
    for s in snaps:
        assert s.engine == "sim-sgf"
        for key in ("train_loss", "test_loss", "test_error", "m", "Q", "cosine", "Q_1_0", "M_0_1"):
            assert math.isfinite(s.values[key]) and s.se[key] >= 0
        assert s.values["test_loss"] == pytest.approx(s.values["test_error"])  # noise = 0
        edges, dens = s.extras["theta_hist"]
        assert 0.99 < np.sum(dens * np.diff(edges)) <= 1.0 + 1e-12
        xe, ye, d2 = s.extras["theta2d_hist"]
        assert d2.shape == (len(xe) - 1, len(ye) - 1)
        assert 0.99 < np.sum(d2) * np.diff(xe)[0] * np.diff(ye)[0] <= 1.0 + 1e-12
        assert s.extras["seeds"]["m"].shape == (3,)
        assert "field_hist" in s.extras
    # reproducible, and seeds are independent data sets
    again = list(simulate.stream(exp))
    assert again[-1].values == snaps[-1].values
    assert snaps[0].se["m"] > 0


def test_exact_init_overlaps():
    exp = committee(k=3, kstar=2, v=[1.0, 0.5, 1.5], d=50,
                    rho_matrix=np.array([[1.0, 0.3], [0.3, 0.7]]),
                    Q0=np.array([[0.5, 0.1, 0.0], [0.1, 0.3, -0.1], [0.0, -0.1, 0.4]]),
                    M0=np.array([[0.3, 0.0], [0.1, 0.2], [-0.1, 0.1]]))
    ts, th = simulate.draw_teacher_student(exp, np.random.default_rng(0), exact=True)
    Q0, M0, R = exp.overlaps0()
    np.testing.assert_allclose(th.T @ th / 50, Q0, atol=1e-12)
    np.testing.assert_allclose(th.T @ ts / 50, M0, atol=1e-12)
    np.testing.assert_allclose(ts.T @ ts / 50, R, atol=1e-12)


def test_divergence_raises_after_yielding():
    exp = committee(k=2, kstar=2, activation="relu", v=[8.0], d=60, delta=2.0, T=20, dt=1.0,
                    record_every=1, seeds=2, algo="gd", q0=1.0, m0=0.2)
    got = []
    with pytest.raises(SolverError) as ei:
        for s in simulate.stream(exp):
            got.append(s)
    assert got and "diverged at t=" in str(ei.value) and ei.value.parameter == "dt"


def test_cancel_stops_promptly():
    exp = committee(k=2, kstar=2, d=400, delta=2.0, T=50, dt=0.05, record_every=10, seeds=2,
                    algo="sgf", tau=0.5, q0=0.3, m0=0.1)
    ev = threading.Event()
    n = 0
    for s in simulate.stream(exp, ev):
        n += 1
        if n == 2:
            ev.set()
    assert n == 2
