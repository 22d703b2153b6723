"""Variance-reduction options of the committee Monte Carlo DMFT (solver.dmft.committee):
the pathwise kappa estimator (``kappa_estimator='pathwise'``), quasi-random draws of the
fixed initial normals (``init_sampling='qmc'``) and of every step's draws
(``'qmc_steps'``), and the partly dW-averaged E[dA dA^T] (``mm_estimator='blend'``). Each
must keep the expectations of the plain estimators ('stein', 'mc', 'raw'):

* pathwise kappa: Gaussian integration by parts gives, for every step s and in every
  population, ``E[l'_s h*^T] - sum_m G[s, m] m[m] - E[dl'_s/dh*] rho = 0`` exactly (THEORY.md
  section 3, "Closure"). The per-block sums of the three terms are i.i.d. over blocks at a
  given step, so their mean difference has a standard error from the block spread (measured
  largest |z| 1.5); the tangent J = dh/dh* without its memory term broke it by 11 (erf, T = 2,
  N = 2000, checked on a mutated copy).
* engine curves with each option against the plain estimators (independent seeds): within 4
  combined replica standard errors at every recording time (4: about 40 correlated
  comparisons per test).
* the quasi-random normals: exact N(0, 1) marginals and (scrambled Sobol) sample moments far
  closer to the truth than i.i.d. draws of the same size.

Budget: about 25 s on 2 shared cores, numba cache warm (the module's kernels compile in
about 40 s more).
"""
import math

import numpy as np
import pytest

from solver.config import Experiment
from solver.dmft import committee as dc


def committee(**kw):
    base = dict(model="committee", loss="square", teacher="linear", lam=0.0, activation="erf",
                k=2, kstar=2, q0=0.1, m0=0.2, rho=1.0, tau=0.5, delta=2.0, dt=0.05, T=2.0,
                record_every=8, samples=2000, method="mc", seed=1)
    base.update(kw)
    return Experiment(**base).validate()


@pytest.mark.parametrize("kw", [dict(), dict(activation="relu", tau=0.0),
                                dict(k=3, kstar=2, v=[1.0, 0.5, 1.6], noise=0.2,
                                     rho_matrix=[[1.0, 0.3], [0.3, 0.6]], lam=0.05)])
def test_pathwise_kappa_obeys_stein_identity(kw):
    exp = committee(**kw)
    n = 2000
    p = dc.Population(exp, n, np.random.SeedSequence(7), tangent_fraction=1.0,
                      kappa_estimator="pathwise", relu_width=dc.relu_width_for(n))
    zmax = 0.0
    for s in range(exp.steps + 1):
        p.step(s)
        d = (p.pE - np.einsum("bmac,mce->bae", p.pG[:, :s + 1], p.m[:s + 1])
             - p.pK @ p.rho)
        mean = d.sum(axis=0) / n
        se = d.std(axis=0, ddof=1) * math.sqrt(d.shape[0]) / n
        zmax = max(zmax, float(np.max(np.abs(mean) / se)))
        np.testing.assert_allclose(p.kappa[s], p.Ek[s])
    # (steps + 1) * k * k* z-scores, strongly correlated in s: 4.5 is about a 1% tail
    assert zmax < 4.5, zmax


def _curves(exp, **kw):
    return list(dc.stream(exp, kernels=False, **kw))


@pytest.mark.parametrize("kw", [dict(kappa_estimator="pathwise"), dict(init_sampling="qmc"),
                                dict(kappa_estimator="pathwise", init_sampling="qmc_steps"),
                                dict(mm_estimator="blend")])
def test_options_keep_the_curves(kw):
    exp = committee()
    ref = _curves(exp.copy(seed=11), kappa_estimator="stein", init_sampling="mc",
                  mm_estimator="raw")
    alt = _curves(exp.copy(seed=12), **{**dict(kappa_estimator="stein", init_sampling="mc"),
                                        **kw})
    for a, b in zip(ref, alt):
        for key in ("train_loss", "test_error", "m", "Q", "M_0_1", "Q_0_1"):
            se = math.hypot(a.se[key], b.se[key])
            assert abs(a.values[key] - b.values[key]) <= 4 * se, (kw, key, a.t, a.values[key],
                                                                   b.values[key], se)


def test_qmc_initial_normals():
    rng = np.random.Generator(np.random.PCG64(3))
    n, d, k = 4000, 5, 2
    z = dc._initial_normals(rng, n, d, k, "qmc")
    assert z.shape == (n, d) and np.all(np.isfinite(z))
    # sample moments: i.i.d. normals miss E[z] by ~1/sqrt(n) = 0.016, E[z z^T] by ~0.022
    assert np.max(np.abs(z.mean(axis=0))) < 2e-3
    assert np.max(np.abs(z.T @ z / n - np.eye(d))) < 0.01
    # exact marginals: independent scramblings, each point N(0, 1) (mean over 200 sets of 8)
    zz = np.concatenate([dc._initial_normals(rng, 8, d, k, "qmc") for _ in range(200)])
    se = 1.0 / math.sqrt(zz.shape[0])
    assert np.max(np.abs(zz.mean(axis=0))) < 4 * se
    assert np.max(np.abs((zz ** 2).mean(axis=0) - 1.0)) < 4 * math.sqrt(2.0) * se
    # 'mc' keeps the shipped order of draws (h*, label noise, omega_0)
    a = dc._initial_normals(np.random.Generator(np.random.PCG64(5)), 10, d, k, "mc")
    r = np.random.Generator(np.random.PCG64(5))
    h, e, w = r.standard_normal((10, d - 1 - k)), r.standard_normal(10), r.standard_normal((10, k))
    np.testing.assert_array_equal(a, np.column_stack([h, w, e]))
