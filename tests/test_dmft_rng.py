"""Counter-based random numbers of the Monte Carlo DMFT (solver.dmft.glm): the quantised normal
draws (law, independence, agreement with libm Box-Muller) and the reproducibility they buy
(same seed, any thread count or chunking, group 0 independent of the replicas).

Tolerances are 5 standard errors of the statistic under the exact law (a false alarm about
once in 10^6 runs per check); budget about 5 s on 2 cores with the numba cache warm (the
first compilation of the population step, shared with tests/test_dmft_mc.py, takes 30-50 s).
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from solver.config import Experiment
from solver.dmft import glm

N = 1 << 20  # draws per check


def _codes(seed=0, g=0, s=3, n0=0, n=N):
    keys = glm.group_keys(seed, g + 1)[g]
    a = np.empty(n, np.int16)
    b = np.empty(n, np.int16)
    glm.normal_codes(keys[0], keys[1], n0, n0 + n, s, a, b)
    return a.astype(np.float64) * glm.ZS, b.astype(np.float64) * glm.ZS


def test_draws_have_the_normal_law():
    """Mean, variance, kurtosis and the CDF at +-0.5, 1, 2, 3 of both members of the pair."""
    from scipy.stats import norm

    for x in _codes():
        n = x.size
        assert abs(x.mean()) < 5 / math.sqrt(n)
        assert abs(x.var() - 1.0) < 5 * math.sqrt(2.0 / n)
        assert abs(np.mean(x ** 4) - 3.0) < 5 * math.sqrt(96.0 / n)
        for c in (-3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0):
            p = norm.cdf(c)
            assert abs(np.mean(x <= c) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1.0 / n, c


def test_draws_are_uncorrelated_across_pairs_trajectories_steps_and_groups():
    a, b = _codes()
    a_next_traj, _ = _codes(n0=1)
    a_next_step, b_next_step = _codes(s=4)
    a_group1, _ = _codes(g=1)
    a_seed1, _ = _codes(seed=1)
    tol = 5 / math.sqrt(N)
    for u, v in [(a, b), (a[:-1], a_next_traj[:-1]), (a, a_next_step), (b, b_next_step),
                 (a, a_group1), (a, a_seed1), (a ** 2, b ** 2)]:
        assert abs(np.corrcoef(u, v)[0, 1]) < tol


def test_fast_box_muller_matches_libm():
    """The branch-free log / sincos of the generator against math.log / cos / sin."""
    ka, kb = glm.group_keys(7, 1)[0]
    for n in list(range(0, 4000, 7)) + [2 ** 30 + 5]:
        for s in (0, 1, 199):
            x1 = int(glm._hash_u64(ka, kb, n, s, 0))
            x2 = int(glm._hash_u64(ka, kb, n, s, 1))
            u1 = ((x1 >> 11) + 1.0) * 2.0 ** -53
            u2 = (x2 >> 11) * 2.0 ** -53
            r = math.sqrt(-2.0 * math.log(u1))
            za, zb = glm._normal_pair(ka, kb, n, s)
            assert za == pytest.approx(r * math.cos(2 * math.pi * u2), abs=1e-12)
            assert zb == pytest.approx(r * math.sin(2 * math.pi * u2), abs=1e-12)


def test_solve_is_reproducible_across_threads_chunks_and_replicas():
    exp = Experiment(loss="logistic", teacher="sign", tau=0.5, T=1.0, dt=0.05, samples=2000,
                     method="mc", seed=5)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = glm.solve(exp)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # all (2 in CI)
        two = glm.solve(exp)
    finally:
        numba.set_num_threads(threads)
    for k in ("train_loss", "test_loss", "m", "Q"):
        np.testing.assert_array_equal(getattr(one, k), getattr(two, k))
        np.testing.assert_array_equal(one.se[k], two.se[k])
    # other chunking of the parallel calls, and group 0 alone (no replicas): same main curves
    pop = glm.Populations(exp, [exp.samples])
    pop.CHUNK_WORK = 1e5
    for k in range(exp.steps + 1):
        pop.step(k)
    np.testing.assert_array_equal(pop.C[0].diagonal(), one.Q)
    np.testing.assert_array_equal(pop.train[0], one.train_loss)
