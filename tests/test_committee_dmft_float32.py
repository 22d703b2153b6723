"""Speed changes of the committee Monte Carlo DMFT (solver.dmft.committee) that must not move
the curves:

* float32 per-trajectory histories (``hist_dtype``, the engine's default :data:`HIST_DTYPE`;
  sums in float64, the tangent in float32): the same seed with float64 histories gives the
  same curves up to rounding, far below the Monte Carlo error (tolerance 1% of the replica
  standard error; measured: 4e-8 ('mc') and 1.3e-7 ('qmc_steps') of it, N = 2000, T = 2);
* the draws of each step mapped and stored inside the parallel step (``_ndtri`` for the
  quasi-random uniforms, row ``perm[i]`` for trajectory ``i``): the same normals as the
  plain numpy path (scipy's ``ndtri`` of the permuted Sobol points; i.i.d. normals for 'mc'),
  from the same generator stream.

Budget: about 5 s on 2 shared cores, numba cache warm.
"""
import math

import numpy as np
import pytest
from scipy.special import ndtri

from solver.dmft import committee as dc
from test_committee_dmft_estimators import committee as _committee


def committee(**kw):
    """The estimator tests' configuration (same defaults), with seed 4."""
    return _committee(**{"seed": 4, **kw})


def test_ndtri_matches_scipy():
    from numba import njit

    @njit
    def many(u):
        out = np.empty_like(u)
        for i in range(u.size):
            out[i] = dc._ndtri(u[i])
        return out

    rng = np.random.default_rng(0)
    u = np.concatenate([rng.random(20000), 10.0 ** -rng.uniform(0, 300, 2000),
                        1.0 - 10.0 ** -rng.uniform(0, 16, 2000),
                        [0.0, 1.0, 0.5, 0.075, 0.925, 1e-300]])
    ref = ndtri(np.clip(u, 1e-300, 1.0 - 2.0 ** -53))
    np.testing.assert_allclose(many(u), ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("sampling", ["mc", "qmc_steps"])
def test_step_draws_are_the_generator_stream(sampling):
    """Trajectory i's omega_s and dW_s, replayed from a copy of the population's generator in
    the order of the numpy path (Sobol set, then a permutation; or normals for omega then dW)."""
    exp = committee(T=0.2)
    n, k, ks = 70, 2, 2
    p = dc.Population(exp, n, np.random.SeedSequence(5), init_sampling=sampling)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(5)))
    init = dc._initial_normals(rng, n, ks + k + 1, k, "mc" if sampling == "mc" else "qmc")
    for s in range(exp.steps + 1):
        p.step(s)
        if sampling == "qmc_steps":
            zs = dc._quantile(dc._sobol_uniforms(rng, n, k + 1))[rng.permutation(n)]
            om, dw = (init[:, ks:ks + k] if s == 0 else zs[:, :k]), zs[:, k]
        else:
            om = init[:, ks:ks + k] if s == 0 else rng.standard_normal((n, k))
            dw = rng.standard_normal(n)
        got = np.array([p.z_of(i)[ks + s * k: ks + (s + 1) * k] for i in range(n)])
        np.testing.assert_allclose(got, om, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(p.dW, math.sqrt(exp.dt) * dw, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sampling", ["mc", "qmc_steps"])
def test_float32_histories_keep_the_curves(sampling):
    exp = committee()
    a = list(dc.stream(exp, init_sampling=sampling, hist_dtype=np.float64, kernels=False))
    b = list(dc.stream(exp, init_sampling=sampling, hist_dtype=np.float32, kernels=False))
    worst = 0.0
    for x, y in zip(a, b):
        for key in ("train_loss", "test_error", "m", "Q", "M_0_1", "Q_0_1", "cosine"):
            se, d = x.se[key], abs(x.values[key] - y.values[key])
            assert math.isfinite(se)
            if se == 0.0:  # deterministic at t = 0
                assert d < 1e-12, (key, x.t)
            else:
                worst = max(worst, d / se)
    assert 0.0 < worst < 0.01, worst
