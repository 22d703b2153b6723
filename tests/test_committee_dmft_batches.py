"""Batch means in the committee Monte Carlo DMFT (``solver.dmft.committee.stream``,
``errors='batches'``): r independent populations of N / r stepped in lockstep, values = their
mean, se = their sd / sqrt(r).

* the batch means agree with the replica engine (main population + replicas; independent
  seeds) within 4 combined standard errors at every recording time;
* the batch se is honest: over M independent engine runs, the spread of the reported values
  against the mean reported se^2 follows F(M - 1, M (r - 1)) (independent populations); a se
  off by sqrt(r) (sd / r), or populations sharing their draws, fail it;
* the per-step quasi-random sets (:func:`committee._step_uniforms`) are bit-for-bit scipy's
  scrambled Sobol points (:func:`committee._sobol_uniforms`) from the same generator;
* the plan, the 'auto' choice, and SolverError when one population diverges.

Budget: about 15 s on 2 shared cores, numba cache warm.
"""
import math

import numpy as np
import pytest
from scipy import stats

from solver.dmft import committee as dc
from solver.snapshot import SolverError
from test_committee_dmft_estimators import committee as _committee

KEYS = ("train_loss", "test_error", "m", "Q", "M_0_1", "Q_0_1")


def committee(**kw):
    """The estimator tests' configuration (THEORY 5.5 setup, T = 2) with N = 8000."""
    return _committee(**{"samples": 8000, **kw})


def test_step_uniforms_are_scipys_sobol_points():
    for n, d in [(1, 3), (7, 2), (2000, 3), (4096, 1)]:
        # (own seed sequences: the Sobol scramblings come from children they spawn)
        ra, rb = (np.random.Generator(np.random.PCG64(np.random.SeedSequence(5)))
                  for _ in range(2))
        for _ in range(3):  # consecutive steps: the generators stay in step
            np.testing.assert_array_equal(dc._sobol_uniforms(ra, n, d),
                                          dc._step_uniforms(rb, n, d))
        assert ra.integers(1 << 62) == rb.integers(1 << 62)


def test_plan_and_auto():
    assert dc.batch_plan(64000) == [8000] * 8
    assert dc.batch_plan(340000) == [34000] * 10  # even r nearest N / 32000
    assert dc.batch_plan(600000) == [33333] * 18
    # the tangent: 1/4 of a population up to 16000, then about BATCH_TANGENT trajectories
    assert dc.batch_tangent_fraction(8000) == 0.25
    assert dc.batch_tangent_fraction(16000) == 0.25
    assert dc.batch_tangent_fraction(33333) * 33333 == 33333 // 8
    assert dc.batch_plan(8001, 4) == [2000] * 4
    with pytest.raises(ValueError):
        dc.batch_plan(8000, 1)
    assert dc.errors_for(dc.BATCH_MIN_SAMPLES) == "batches"
    assert dc.errors_for(dc.BATCH_MIN_SAMPLES - 1) == "replicas"
    assert dc.errors_for(10 ** 6, replicas=0) == "replicas"  # replicas asked for
    assert dc.errors_for(2000, "batches") == "batches"
    with pytest.raises(ValueError):
        dc.errors_for(2000, "bootstrap")


def test_batch_means_agree_with_replicas():
    exp = committee()
    ref = list(dc.stream(exp.copy(seed=21), errors="replicas", kernels=False))
    bat = list(dc.stream(exp.copy(seed=22), errors="batches", batches=4,
                         init_sampling="qmc_steps"))
    assert [s.t for s in ref] == [s.t for s in bat]
    for a, b in zip(ref, bat):
        for key in KEYS:
            se = math.hypot(a.se[key], b.se[key])
            assert abs(a.values[key] - b.values[key]) <= 4 * se, (
                key, a.t, a.values[key], b.values[key], se)
    # extras: the kernels averaged over the populations (m is linear: tr(M)/k is the value)
    last = bat[-1]
    kern = last.extras["kernels"]
    assert kern["C"].shape == (exp.steps + 1, exp.steps + 1, 2, 2)
    assert abs(np.trace(kern["m"][-1]) / 2 - last.values["m"]) < 1e-12


def test_batch_se_is_honest():
    M, r = 8, 8
    exp = committee(samples=8000, T=1.0)
    runs = [list(dc.stream(exp.copy(seed=100 + i), errors="batches", batches=r,
                           init_sampling="qmc_steps", kernels=False))[-1] for i in range(M)]
    # three correlated observables: each ratio inside its central 99.8%
    lo, hi = stats.f.ppf([0.001, 0.999], M - 1, M * (r - 1))
    for key in ("test_error", "m", "Q"):
        vals = np.array([s.values[key] for s in runs])
        se2 = np.array([s.se[key] for s in runs]) ** 2
        ratio = np.var(vals, ddof=1) / se2.mean()
        assert lo < ratio < hi, (key, ratio, lo, hi)


def test_batch_divergence_raises():
    exp = committee(samples=400, activation="relu", v=[3.0, 3.0], dt=0.5, tau=4.0, T=20.0,
                    record_every=1)
    got = []
    with pytest.raises(SolverError, match="diverged at t=.*population") as ei:
        for s in dc.stream(exp, errors="batches", batches=2, kernels=False):
            got.append(s)
    assert got and ei.value.parameter == "tau"


def test_populations_stepped_side_by_side_give_the_same_numbers():
    """The populations of a step run on one thread each, side by side (numba threads > 1), or
    in turn: the values are the same bit for bit (each population has its own generator)."""
    import numba

    exp = committee(samples=2000, T=0.5)
    assert numba.get_num_threads() > 1 or pytest.skip("one numba thread: nothing side by side")
    side = list(dc.stream(exp, errors="batches", batches=4, kernels=False))
    saved = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        turn = list(dc.stream(exp, errors="batches", batches=4, kernels=False))
    finally:
        numba.set_num_threads(saved)
    assert [s.values for s in side] == [s.values for s in turn]
    assert [s.se for s in side] == [s.se for s in turn]
