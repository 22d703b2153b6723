"""Finite-size simulator (solver.simulate) against independent computations.

Budget: the whole file runs in about 20 s on 2 shared cores (plus about 10 s of numba
compilation on a cold cache). Every tolerance is either floating-point roundoff (exact
identities) or a multiple of the standard errors the simulator reports.
"""
import math
import threading

import numpy as np
import pytest

from solver.config import Experiment
from solver.snapshot import SolverError
from solver.simulate import draw, run, stream
from solver.simulate import engine


def per_seed(res, key):
    """(snapshots, seeds) array of a per-seed observable."""
    return np.array([s.extras["seeds"][key] for s in res.snapshots])


# --- data --------------------------------------------------------------------------------------

def test_data_moments():
    exp = Experiment(loss="square", teacher="sign", flip=0.2, d=2000, delta=1.0, rho=2.0, q0=1.5,
                     m0=0.9)
    ds = draw(exp, 0)
    n, d = ds.X.shape
    assert (n, d) == (exp.n, exp.d) and ds.X.flags.c_contiguous
    z = 5.0  # five standard errors
    assert abs(np.mean(ds.X ** 2) * d - 1) < z * math.sqrt(2 / (n * d))
    assert abs(np.mean(ds.theta_star ** 2) / 2.0 - 1) < z * math.sqrt(2 / d)
    assert abs(np.mean(ds.theta0 ** 2) - 1.5) < z * 1.5 * math.sqrt(2 / d)
    # E[theta0 theta*] = m0; Var(theta0_i theta*_i) = q0*rho + m0^2
    assert abs(np.mean(ds.theta0 * ds.theta_star) - 0.9) < z * math.sqrt((1.5 * 2 + 0.81) / d)
    np.testing.assert_allclose(ds.hstar, ds.X @ ds.theta_star)
    flipped = np.mean(ds.y != np.where(ds.hstar >= 0, 1.0, -1.0))
    assert abs(flipped - 0.2) < z * math.sqrt(0.16 / n)
    # independent data sets per seed, reproducible per seed
    assert not np.allclose(draw(exp, 1).X[:5], ds.X[:5])
    np.testing.assert_array_equal(draw(exp, 0).X, ds.X)


# --- (1) GD on the square loss: exact discrete path ---------------------------------------------

def test_gd_square_loss_matches_eigendecomposition():
    exp = Experiment(loss="square", teacher="linear", noise=0.3, algo="gd", d=60, delta=1.5,
                     lam=0.05, dt=0.1, T=4.0, seeds=2, q0=0.4, m0=0.2, record_every=3)
    res = run(exp)
    ks = np.array([s.step for s in res.snapshots])
    assert ks[0] == 0 and ks[-1] == exp.steps
    np.testing.assert_allclose(res.t, ks * exp.dt, rtol=1e-14)
    np.testing.assert_allclose(res.epochs, ks, rtol=1e-12)  # GD: one pass per step
    for s in range(exp.seeds):
        ds = draw(exp, s)
        X, y, n, d = ds.X, ds.y, ds.n, ds.d
        # theta_{j+1} = (I - dt A) theta_j + dt b,  A = lam I + X^T X/delta,  b = X^T y/delta
        a, V = np.linalg.eigh(exp.lam * np.eye(d) + X.T @ X / exp.delta)
        b = V.T @ (X.T @ y / exp.delta)
        c0 = V.T @ ds.theta0
        fac = (1 - exp.dt * a)[None, :] ** ks[:, None]
        c = fac * c0 + (1 - fac) * (b / a)
        theta = c @ V.T  # (records, d)
        m = theta @ ds.theta_star / d
        Q = np.sum(theta ** 2, axis=1) / d
        train = np.mean(0.5 * (theta @ X.T - y) ** 2, axis=1)
        np.testing.assert_allclose(per_seed(res, "m")[:, s], m, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(per_seed(res, "Q")[:, s], Q, rtol=1e-10)
        np.testing.assert_allclose(per_seed(res, "train_loss")[:, s], train, rtol=1e-10)
    # aggregation: mean and standard error over seeds, Gaussian test loss
    m_all = per_seed(res, "m")
    np.testing.assert_allclose(res.m, m_all.mean(1), rtol=1e-14)
    np.testing.assert_allclose(res.se["m"], m_all.std(1, ddof=1) / math.sqrt(2), rtol=1e-12)
    Q_all = per_seed(res, "Q")
    np.testing.assert_allclose(res.test_loss, np.mean(0.5 * (Q_all - 2 * m_all + 1 + 0.09), 1),
                               rtol=1e-12)
    assert np.all(np.isnan(res.test_error))


# --- (2) SGD with batch n is GD -----------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["fresh", "reshuffle"])
def test_sgd_full_batch_equals_gd(sampling):
    gd = Experiment(loss="logistic", teacher="sign", flip=0.1, algo="gd", d=50, delta=2.0,
                    lam=0.05, dt=0.1, T=3.0, seeds=2, q0=0.3, m0=0.1, record_every=2)
    n, d = gd.n, gd.d
    sgd = gd.copy(algo="sgd", batch=n, tau=gd.dt * d / n, sampling=sampling)  # eta = dt*d
    assert sgd.eta == pytest.approx(gd.dt * d)
    r1, r2 = run(gd), run(sgd)
    assert len(r1) == len(r2)
    np.testing.assert_allclose(r2.t, r1.t, rtol=1e-12)
    np.testing.assert_allclose(r2.epochs, r1.epochs, rtol=1e-12)
    for key in ("m", "Q", "train_loss"):
        np.testing.assert_allclose(per_seed(r2, key), per_seed(r1, key), rtol=1e-10)
    assert r2.engine == "sim-sgd" and r1.engine == "sim-gd"


def test_sgd_recording_times_and_epochs():
    exp = Experiment(loss="square", teacher="linear", algo="sgd", d=100, delta=2.0, tau=0.3,
                     batch=3, dt=0.05, T=1.0, seeds=1)
    res = run(exp)
    eta = exp.eta
    steps = np.floor(np.arange(0, 21) * 0.05 * 100 / eta + 1e-9)
    np.testing.assert_allclose(res.t, steps * eta / 100, rtol=1e-12)
    np.testing.assert_allclose(res.epochs, steps * 3 / 200, rtol=1e-12)


def test_batch_sampling():
    from solver.simulate.kernels import _select_batch

    n, B = 30, 4
    rng = np.random.default_rng(5)
    perm, pos = np.arange(n, dtype=np.int64), np.array([n], dtype=np.int64)
    counts = np.zeros(n)
    steps = 3000
    for _ in range(steps):  # fresh: B distinct samples, each with probability B/n
        start = _select_batch(perm, B, True, pos, rng)
        batch = perm[start:start + B]
        assert len(set(batch.tolist())) == B
        counts[batch] += 1
    expected = steps * B / n
    chi2 = np.sum((counts - expected) ** 2 / expected)  # ~ chi2(n-1): mean 29, sd 7.6
    assert chi2 < 29 + 6 * 7.6
    B = 7  # reshuffle: every epoch of n // B batches visits distinct samples; remainder dropped
    for _ in range(5):
        seen = [perm[s:s + B].tolist() for s in (_select_batch(perm, B, False, pos, rng)
                                                  for _ in range(n // B))]
        flat = sum(seen, [])
        assert len(flat) == len(set(flat)) == (n // B) * B


# --- (3) SGD with fresh batches approaches the SGF as eta/d -> 0 at fixed tau -----------------

def test_sgd_fresh_approaches_sgf():
    """Paired by seed (same data), SGD minus SGF, in standard errors, rms over recording times.

    At fixed d, eta/d = tau*B/d shrinks with B: 0.32 (B=64), 0.04 (B=8), 0.005 (B=1).
    """
    base = dict(loss="logistic", teacher="sign", d=100, delta=2.0, tau=0.5, lam=0.01, q0=0.25,
                m0=0.0, T=3.2, seeds=64, seed=11)
    sgf = run(Experiment(algo="sgf", dt=0.005, record_every=64, **base))  # records every 0.32
    z = {}
    for B in (64, 8, 1):
        sgd = run(Experiment(algo="sgd", batch=B, dt=0.01, record_every=32, **base))
        np.testing.assert_allclose(sgd.t, sgf.t, rtol=1e-12, atol=1e-12)
        for key in ("train_loss", "Q", "m"):
            diff = per_seed(sgd, key)[1:] - per_seed(sgf, key)[1:]
            se = diff.std(1, ddof=1) / math.sqrt(diff.shape[1])
            z[B, key] = np.sqrt(np.mean((diff.mean(1) / se) ** 2))
    # resolved at eta/d = 0.32, shrinking with eta/d, within error bars at eta/d = 0.005
    assert z[64, "train_loss"] > 5.0, z
    assert z[8, "train_loss"] < z[64, "train_loss"], z
    assert all(z[1, key] < 2.5 for key in ("train_loss", "Q", "m")), z


# --- (4) SGF on linear regression: first and second moments over the noise ---------------------

def test_sgf_linear_regression_moments():
    exp = Experiment(loss="square", teacher="linear", noise=0.5, algo="sgf", d=80, delta=2.0,
                     tau=1.0, lam=0.1, dt=0.05, T=2.0, seeds=96, q0=0.5, m0=0.3,
                     record_every=4)
    ds = draw(exp, 0)
    res = run(exp, data=ds)  # one data set, 96 independent noise realisations
    X, y, d, dt, delta = ds.X, ds.y, ds.d, exp.dt, exp.delta
    c0, c1sq = dt / delta, exp.tau * dt / delta
    A = (1 - dt * exp.lam) * np.eye(d) - c0 * X.T @ X
    b = c0 * X.T @ y
    mu = ds.theta0.copy()
    P = np.outer(mu, mu)  # theta(0) is fixed by the data set
    m_ex, Q_ex = [], []
    ks = [s.step for s in res.snapshots]
    for j in range(exp.steps + 1):
        if j in ks:
            m_ex.append(mu @ ds.theta_star / d)
            Q_ex.append(np.trace(P) / d)
        # E[r_mu^2] with r = X theta - y; noise covariance c1^2 sum_mu x_mu x_mu^T E[r_mu^2]
        r2 = np.einsum("mi,ij,mj->m", X, P, X) - 2 * y * (X @ mu) + y ** 2
        P = (A @ P @ A.T + A @ np.outer(mu, b) + np.outer(b, mu) @ A.T + np.outer(b, b)
             + c1sq * (X.T * r2) @ X)
        mu = A @ mu + b
    z_m = (res.m - np.array(m_ex))[1:] / res.se["m"][1:]
    z_Q = (res.Q - np.array(Q_ex))[1:] / res.se["Q"][1:]
    assert np.max(np.abs(z_m)) < 4.0, z_m
    assert np.max(np.abs(z_Q)) < 4.0, z_Q
    # the noise matters: Q is well above its noise-free value
    Q_gd = run(exp.copy(algo="gd", seeds=1), data=ds).Q
    assert res.Q[-1] - Q_gd[-1] > 10 * res.se["Q"][-1]


# --- (5) reproducibility --------------------------------------------------------------------------

def _csv(exp, tmp_path, name, **kw):
    path = tmp_path / name
    run(exp, **kw).write(path)
    return path.read_bytes()


@pytest.mark.parametrize("algo", ["sgf", "sgd"])
def test_seed_reproducibility(tmp_path, monkeypatch, algo):
    exp = Experiment(loss="logistic", teacher="sign", algo=algo, d=100, T=1.0, seeds=3, batch=4)
    a = _csv(exp, tmp_path, "a.csv")
    assert _csv(exp, tmp_path, "b.csv") == a
    for mode in ("serial", "seeds", "rows"):  # parallel modes do not change the numbers
        assert _csv(exp, tmp_path, f"c{mode}.csv", parallel=mode) == a
    monkeypatch.setattr(engine, "CHUNK_SECONDS", 1e-9)  # one step per chunk
    assert _csv(exp, tmp_path, "d.csv") == a
    assert _csv(exp.copy(seed=1), tmp_path, "e.csv") != a


def test_snapshot_contents():
    exp = Experiment(loss="logistic", teacher="sign", algo="sgf", d=100, T=0.5, dt=0.1, seeds=2,
                     record_every=2)
    snaps = list(stream(exp))
    assert [s.step for s in snaps] == [0, 2, 4, 5]  # every record_every steps and the horizon
    assert [s.progress for s in snaps] == [0.0, 0.4, 0.8, 1.0]
    for s in snaps:
        assert s.engine == "sim-sgf"
        for key in ("train_loss", "test_loss", "test_error", "m", "Q", "cosine"):
            assert np.isfinite(s.values[key]) and np.isfinite(s.se[key])
        for key in ("theta_hist", "field_hist"):
            edges, dens = s.extras[key]
            assert len(edges) == engine.NBINS + 1 and len(dens) == engine.NBINS
            assert 0.99 < np.sum(dens * np.diff(edges)) <= 1.0 + 1e-12


# --- (6) cancel and divergence --------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["sgf", "sgd"])
def test_cancel_stops(algo):
    exp = Experiment(loss="logistic", teacher="sign", algo=algo, d=200, T=2000.0, dt=0.05,
                     seeds=2, record_every=1000, batch=1)
    cancel = threading.Event()
    snaps = []
    for s in stream(exp, cancel):
        snaps.append(s)
        cancel.set()
    assert len(snaps) == 1 and snaps[0].progress == 0.0
    cancel = threading.Event()
    cancel.set()
    assert list(stream(exp, cancel)) == []  # cancelled while drawing the data
    res = run(exp.copy(T=1.0), cancel)
    assert res.status == "cancelled" and len(res) == 0


@pytest.mark.parametrize("kw,param", [
    (dict(algo="sgf", tau=50.0, dt=0.5), "tau"),
    (dict(algo="gd", dt=1.5, lam=0.0), "dt"),
    (dict(algo="sgd", tau=100.0, batch=8), "tau"),
])
def test_divergence_raises(kw, param):
    exp = Experiment(loss="square", teacher="linear", d=100, delta=2.0, T=200.0, seeds=2, **kw)
    snaps = []
    with pytest.raises(SolverError) as ei:
        for s in stream(exp):
            snaps.append(s)
    msg = str(ei.value)
    assert ei.value.parameter == param and f"lower {param}" in msg and "diverged at t=" in msg
    assert snaps and snaps[0].t == 0.0 and snaps[-1].progress < 1.0
    assert all(np.isfinite(s.values["Q"]) for s in snaps)
    with pytest.raises(SolverError) as ei:
        run(exp)
    assert ei.value.result.status == "stopped" and len(ei.value.result) == len(snaps)


def test_sgd_coarse_steps_one_snapshot_per_step():
    exp = Experiment(loss="square", teacher="linear", algo="sgd", d=20, delta=2.0, tau=1.0,
                     batch=2, dt=0.02, T=0.5, seeds=1)  # eta/d = 0.1 = 5 grid steps
    snaps = list(stream(exp))
    assert [s.t for s in snaps] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert snaps[-1].progress == 1.0
