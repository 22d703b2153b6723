"""The optimised per-block kernels of the committee Monte Carlo DMFT (solver.dmft.committee)
against their plain formulas:

* ``_tangent_block`` (the adjoint recursion ``V[s] = I``, ``V[m] = -(sum_{m < s' <= s} V[s']
  R[s', m+1]) u[m]``, rows retired four at a time, ``k = 2`` spelt out, lane layouts with the
  block's column index outside) against the recursion written with numpy matrix products, lane
  by lane, for k = 1, 2, 3, float64 and float32, steps that use every branch (groups of four
  and the remainder), and a short block (padding lanes with ``u = 0``);
* ``_ndtri_lanes`` (the central branch of the normal quantile vectorised) equal bit for bit to
  the scalar ``_ndtri``;
* one population step (k = 1, 2; float64 and float32 histories) against the formulas for the
  fields, E[dA dA^T] and G recomputed from the stored histories.

Budget: about 6 s on 2 shared cores, numba cache warm (a cold cache compiles for ~1 min).
"""
import numpy as np
import pytest
from numba import njit

from solver.dmft import committee as dc

BLOCK = dc.BLOCK


def _reference_chi(s, R, u):
    """chi[s, m] (k x k) for every lane by the adjoint recursion in float64 numpy."""
    k, lanes = R.shape[2], u.shape[-1]
    R = R.astype(np.float64)
    u = u.astype(np.float64)
    out = np.zeros((s + 1, k, k, lanes))
    for lane in range(lanes):
        V = [None] * (s + 1)
        V[s] = np.eye(k)
        for m in range(s - 1, -1, -1):
            acc = sum(V[sp] @ R[sp, m + 1] for sp in range(m + 1, s + 1))
            V[m] = -acc @ u[m, :, :, lane]
        out[:, :, :, lane] = np.array(V)
    return out


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("s", [0, 3, 13])
def test_tangent_block_vs_recursion(k, s, dtype, rtol):
    rng = np.random.default_rng(100 * k + s)
    K = 16
    R = (0.4 * rng.standard_normal((K, K, k, k))).astype(dtype)
    u = (0.4 * rng.standard_normal((K, k, k, BLOCK))).astype(dtype)
    c = BLOCK - 27  # a short block: the padding lanes carry u = 0
    u[..., c:] = 0.0
    V = np.full((s + 1, k, k * BLOCK), np.nan, dtype=dtype)  # np.empty in the engine
    acc = np.full((k, s + 1, k * BLOCK), np.nan, dtype=dtype)
    dc._tangent_block(s, k, R, u, V, acc)
    got = V.reshape(s + 1, k, k, BLOCK).transpose(0, 2, 1, 3)  # V[m, e, a, l] -> chi[m, a, e, l]
    ref = _reference_chi(s, R, u)
    assert np.all(np.isfinite(got))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * scale)
    # the padding lanes: chi[s, s] = I, every other row 0
    np.testing.assert_array_equal(got[:s, ..., c:], 0.0)


def test_ndtri_lanes_is_the_scalar_quantile():
    @njit
    def scalar(u):
        out = np.empty_like(u)
        for i in range(u.size):
            out[i] = dc._ndtri(u[i])
        return out

    rng = np.random.default_rng(1)
    u = np.concatenate([rng.random(20000), 10.0 ** -rng.uniform(0, 300, 500),
                        1.0 - 10.0 ** -rng.uniform(0, 16, 500),
                        [0.0, 1.0, 0.5, 0.075, 0.925, 0.5 - 0.425, 0.5 + 0.425, 1e-300,
                         np.nextafter(0.075, 0.0), np.nextafter(0.925, 1.0), np.nan]])
    ref = scalar(u)
    for c in (BLOCK, BLOCK - 5):
        for start in range(0, u.size - BLOCK, BLOCK):
            p = u[start:start + BLOCK].copy()
            out = np.full(BLOCK, -7.0)
            dc._ndtri_lanes(p, out, c)
            np.testing.assert_array_equal(out[:c], ref[start:start + c])
            assert np.all(out[c:] == -7.0)
    p = u[-BLOCK:].copy()
    out = np.empty(BLOCK)
    dc._ndtri_lanes(p, out, BLOCK)
    np.testing.assert_array_equal(out, ref[-BLOCK:])  # the edge values and NaN


@pytest.mark.parametrize("hist_dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("k", [1, 2])
def test_population_step_vs_formulas(k, hist_dtype, tol):
    """One population of 70 trajectories (a full and a short block), every trajectory on the
    tangent, 'qmc_steps' draws: at the last step S the fields ``h_S = L_S z - sum_j R[S, j+1]
    dA_j``, ``E[dA_S dA_j^T]`` and ``G[S, m] = E[l''_S chi[S, m]]`` (chi by the adjoint recursion
    in numpy on the stored ``u``, ``l''_S = u_S / w_S``) recomputed from the stored histories
    (k = 2 takes the spelt-out field and tangent kernels, k = 1 the general ones; the k = 3
    engine is checked against finite differences in tests/test_dmft_committee.py)."""
    from test_committee_dmft_estimators import committee

    exp = committee(k=k, kstar=2, T=0.35, seed=3, v=[1.0, 0.7][:k])
    n, ks, S = 70, 2, exp.steps
    pop = dc.Population(exp, n, np.random.SeedSequence(8), tangent_fraction=1.0,
                        init_sampling="qmc_steps", hist_dtype=hist_dtype)
    for s in range(S + 1):
        pop.step(s)
    assert S >= 6 and pop.nbt == 2
    R, r0 = pop.R, ks + S * k
    dA = np.array([pop.dA_of(i) for i in range(n)], dtype=np.float64)  # (n, S + 1, k)
    for i in range(n):
        h = pop.L[r0:r0 + k] @ pop.z_of(i).astype(np.float64)
        h -= sum(R[S, j + 1] @ dA[i, j] for j in range(S))
        np.testing.assert_allclose(pop.h[i], h, rtol=0, atol=1e-12 * (1 + np.abs(h).max()))
    MM = np.einsum("ia,ijb->jab", dA[:, S], dA[:, :S + 1]) / n
    np.testing.assert_allclose(pop.MM[S, :S + 1], MM, rtol=1e-12, atol=1e-15)
    w = exp.dt / exp.delta + np.sqrt(exp.tau / exp.delta) * pop.dW
    u = pop.u.astype(np.float64)  # (blocks, K + 1, k, k, lanes)
    G = np.zeros((S + 1, k, k))
    for ib in range(pop.nbt):
        lanes = min(BLOCK, n - ib * BLOCK)
        chi = _reference_chi(S, pop.Rt, u[ib, :, :, :, :lanes])
        for l in range(lanes):
            app = u[ib, S, :, :, l] / w[ib * BLOCK + l]
            G += np.einsum("af,mfe->mae", app, chi[..., l]) / n
    scale = np.abs(G).max()
    np.testing.assert_allclose(pop.G[S, :S + 1], G, rtol=0, atol=tol * scale)
