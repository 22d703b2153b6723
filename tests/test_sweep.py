"""Sweeps: grid parsing, execution backends (serial / threads / Dask) agree bit for bit, the
disk cache, per-point failures, streaming, and the ``sgf-dmft sweep`` command.

Budget: about 15-25 s on 2 cores (one Dask LocalCluster in-process, one CLI subprocess, tiny
real DMFT runs with T <= 1 and 64-128 trajectories; the rest uses a fake solve function).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest

from solver import sweep as sw
from solver.config import Experiment
from solver.observables import metrics
from solver.snapshot import Result, Snapshot, SolverError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS: list[tuple] = []
_LOCK = threading.Lock()


def fake_solve(exp, cancel=None):
    """Deterministic stand-in for a solver: closed-form (m, Q) curves with seeded noise, an
    array extra, a SolverError for tau >= 3 (after two snapshots), a crash for lam = 0.5."""
    with _LOCK:
        CALLS.append((exp.tau, exp.delta, exp.lam, exp.seed))
    if exp.lam == 0.5:
        raise RuntimeError("boom")
    rng = np.random.default_rng(exp.seed + int(1000 * exp.tau) + int(1000 * exp.delta))
    res = Result(config=exp.to_dict(), engine="fake")
    for k in range(5):
        if exp.tau >= 3 and k == 2:
            res.status, res.message = "diverged", "diverged at t=0.5: lower tau or dt"
            raise SolverError(res.message, result=res, parameter="tau")
        t = k * exp.T / 4
        m = (1 - math.exp(-exp.delta * t)) / (1 + exp.tau) + 1e-3 * rng.standard_normal()
        Q = m * m + 0.1 * exp.tau * t + 1e-2
        vals = {"train_loss": 0.4 * Q, "m": m, "Q": Q}
        vals.update({k2: float(v) for k2, v in metrics(m, Q, exp).items()})
        extras = {"theta_hist": (np.linspace(-1, 1, 4), rng.random(3))} if k == 4 else {}
        res.append(Snapshot(t, k, t / exp.delta, vals, {k2: 0.01 * abs(v) for k2, v in vals.items()},
                            extras, "fake", k / 4))
    return res


def fake_sim(exp, cancel=None):
    res = fake_solve(exp, cancel)
    res.engine = "fake-sim"
    return res


# --------------------------------------------------------------------------------------------
# grid parser
# --------------------------------------------------------------------------------------------
def test_parse_grid_types_ranges_and_order():
    g = sw.parse_grid(" tau=0, 0.5,1,2 ; delta=0.5:2:4; loss=square,logistic; samples=100,2e2;")
    assert g == {"tau": [0.0, 0.5, 1.0, 2.0], "delta": [0.5, 1.0, 1.5, 2.0],
                 "loss": ["square", "logistic"], "samples": [100, 200]}
    assert all(isinstance(v, float) for v in g["tau"]) and all(type(v) is int for v in g["samples"])
    points, gnames = sw.expand("tau=0,1;delta=1,2,3")
    assert gnames == ["tau", "delta"]
    assert [(p["tau"], p["delta"]) for p in points] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


@pytest.mark.parametrize("text, param, words", [
    ("", "grid", "empty"),
    ("tau", "grid", "NAME=V1,V2"),
    ("taux=1,2", "taux", "unknown parameter"),
    ("tau=1;tau=2", "tau", "twice"),
    ("tau=0,abc", "tau", "must be a number"),
    ("tau=-1", "tau", "outside [0.0, 100.0]"),
    ("tau=nan", "tau", "finite"),
    ("tau=1,,2", "tau", "empty value"),
    ("delta=", "delta", "no values"),
    ("samples=10.5", "samples", "integer"),
    ("loss=hinge", "loss", "one of {square, logistic}"),
    ("delta=1:2", "delta", "START:STOP:NUM"),
    ("v=1,2", "v", "Python API"),
])
def test_parse_grid_errors_name_the_parameter(text, param, words):
    with pytest.raises(sw.GridError) as ei:
        sw.parse_grid(text)
    assert ei.value.param == param
    assert str(ei.value).startswith(param + ":") and words in str(ei.value)


def test_grid_and_fixed_conflict_and_unknown_fixed():
    with pytest.raises(sw.GridError, match="^tau: given both"):
        sw.Sweep("tau=1,2", dict(tau=1.0), cache=False)
    with pytest.raises(sw.GridError, match="^bogus: unknown"):
        sw.Sweep({"tau": [1.0]}, dict(bogus=1), cache=False)


# --------------------------------------------------------------------------------------------
# execution: backends agree, streaming, failures, cache
# --------------------------------------------------------------------------------------------
GRID = {"tau": [0.0, 0.5, 3.0], "delta": [1.0, 2.0]}
FIXED = dict(T=1.0, dt=0.25)


def test_backends_agree_bit_for_bit_including_dask(tmp_path):
    solve = {"theory": fake_solve, "simulate": fake_sim}
    eng = ("theory", "simulate")
    ref = sw.Sweep(GRID, FIXED, engines=eng, solve=solve, cache=False).run(backend="serial")
    thr = sw.Sweep(GRID, FIXED, engines=eng, solve=solve, cache=False).run(backend="threads",
                                                                          workers=3)
    dsk = sw.Sweep(GRID, FIXED, engines=eng, solve=solve, cache=False).run(backend="dask",
                                                                          workers=2)
    for other in (thr, dsk):
        sw.compare_tables(ref.table, other.table)
        pd.testing.assert_frame_equal(ref.curves, other.curves, check_exact=True)
    t = ref.table
    assert len(t) == 12 and list(t.columns[:3]) == ["point", "tau", "delta"]
    assert list(t["kind"][:2]) == ["theory", "simulate"]
    assert list(t["engine"][:2]) == ["fake", "fake-sim"]
    # summaries are those of the curves
    r = ref.result(1, "theory")
    row = t[(t.point == 1) & (t.kind == "theory")].iloc[0]
    assert row.test_loss_final == r.test_loss[-1] and row.test_loss_min == np.min(r.test_loss)
    assert row.t_test_loss_min == r.t[np.argmin(r.test_loss)]
    assert row.m_final_se == r.se["m"][-1] and row.cosine_final == r.cosine[-1]
    assert row.status == "ok" and row.n_records == 5 and row.t_final == 1.0
    # diverged points (tau = 3) keep their partial curves
    div = t[t.tau == 3.0]
    assert set(div.status) == {"diverged"} and (div.n_records == 2).all()
    assert div.message.str.contains("lower tau").all()
    assert len(ref.curves) == 8 * 5 + 4 * 2


def test_failures_are_reported_per_point_and_the_rest_completes():
    # m0 = 0.5 with q0 = 0 violates m0^2 <= q0*rho (a cross-parameter rule); lam = 0.5 crashes
    points = [dict(tau=0.5, lam=0.01), dict(tau=0.5, m0=0.5), dict(tau=0.5, lam=0.5),
              dict(tau=1.0, lam=0.01), dict(tau=-1.0)]
    seen = []
    out = sw.Sweep(points, FIXED, solve=fake_solve, cache=False).run(backend="threads",
                                                                      callback=seen.append)
    t = out.table
    assert list(t.status) == ["ok", "error", "error", "ok", "error"]
    assert t.message[1].startswith("m0: needs m0^2 <= q0*rho")
    assert t.message[2] == "RuntimeError: boom"
    assert t.message[4].startswith("tau:")
    assert np.isnan(t.test_loss_final[1]) and np.isfinite(t.test_loss_final[3])
    assert sorted(p.index for p in seen) == [0, 1, 2, 3, 4]
    assert out.result(1) is None and out.result(0).engine == "fake"


def test_cache_hits_are_not_recomputed_and_identical(tmp_path):
    def calls_during(f):
        n0 = len(CALLS)
        out = f()
        return len(CALLS) - n0, out

    def run(fixed=FIXED, solve=fake_solve, **kw):
        backend = kw.pop("backend", "threads")
        return sw.Sweep(GRID, fixed, solve=solve, cache=str(tmp_path), **kw).run(backend=backend)

    n, cold = calls_during(lambda: run())
    assert n == 6 and not cold.table.cache_hit.any()
    n, warm = calls_during(lambda: run(backend="dask"))
    assert n == 0, "cached points were recomputed"
    assert warm.table.cache_hit.all()
    sw.compare_tables(cold.table, warm.table)
    pd.testing.assert_frame_equal(cold.curves, warm.curves, check_exact=True)
    # extras: none by default; asking for more recomputes once, then arrays inside tuples come
    # back from the cache exactly; asking for less is a hit
    assert cold.result(1).extras == {} and warm.result(1).extras == {}
    n, last = calls_during(lambda: run(extras="last"))
    assert n == 6 and not last.table.cache_hit.any()
    n, again = calls_during(lambda: run(extras="last", backend="serial"))
    assert n == 0 and again.table.cache_hit.all()
    e_cold, e_warm = last.result(1).extras["theta_hist"], again.result(1).extras["theta_hist"]
    assert isinstance(e_warm, tuple) and all(np.array_equal(a, b) for a, b in zip(e_cold, e_warm))
    assert [bool(s.extras) for s in again.result(1).snapshots] == [False] * 4 + [True]
    n, less = calls_during(lambda: run())
    assert n == 0 and less.result(1).extras == {}
    # any change of the configuration (here the seed) or of the solve function is a new key
    assert calls_during(lambda: run(fixed=dict(FIXED, seed=1)))[0] == 6
    assert calls_during(lambda: run(solve=fake_sim))[0] == 6
    # errors (possibly transient) are not cached; a point's Result is retrievable on its own
    s = sw.Sweep([dict(lam=0.5), dict(tau=0.25)], FIXED, solve=fake_solve, cache=str(tmp_path))
    assert calls_during(lambda: s.run(backend="serial"))[0] == 2
    assert calls_during(lambda: s.run(backend="serial"))[0] == 1
    assert s.result(1).test_loss[-1] == s.run().table.test_loss_final[1]


def test_streaming_yields_as_points_complete_and_cancel_stops():
    s = sw.Sweep(GRID, FIXED, solve=fake_solve, cache=False)
    assert s.shape == (3, 2) and s.coords(5) == (2, 1)
    got = list(s.iter(backend="threads", workers=2))
    assert sorted(i for i, *_ in got) == list(range(6))
    for index, params, row, result in got:
        assert params == s.points[index].params and row["point"] == index
        assert (result is None) == (row["status"] == "error")
    cancel = threading.Event()
    n = 0
    for _ in s.iter(backend="serial", cancel=cancel):
        n += 1
        cancel.set()
    assert n == 1


_STARTED, _SAW_CANCEL = threading.Event(), threading.Event()


def blocking_solve(exp, cancel=None):
    """tau = 1 runs until cancelled; tau = 0 finishes once the tau = 1 run has started."""
    if exp.tau == 1.0:
        _STARTED.set()
        if cancel.wait(30):
            _SAW_CANCEL.set()
        return Result(config=exp.to_dict(), status="cancelled", message="cancelled")
    _STARTED.wait(30)
    return fake_solve(exp, cancel)


def test_leaving_the_iteration_cancels_running_points():
    s = sw.Sweep({"tau": [0.0, 1.0]}, FIXED, solve=blocking_solve, cache=False)
    for index, params, row, result in s.iter(backend="threads", workers=2):
        assert index == 0 and row["status"] == "ok"
        break
    assert _SAW_CANCEL.is_set(), "the running point did not see the cancel flag"


# --------------------------------------------------------------------------------------------
# the real DMFT engine, tiny (skipped while solver.dmft is missing)
# --------------------------------------------------------------------------------------------
def _real_dmft():
    try:
        from solver.dmft import solve  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _real_dmft(), reason="solver.dmft not available")
def test_real_dmft_sweep_serial_threads_dask_identical(tmp_path):
    fixed = dict(T=0.5, dt=0.1, samples=64)
    grid = {"tau": [0.0, 1.0], "delta": [1.0, 2.0]}
    ref = sw.Sweep(grid, fixed, cache=False).run(backend="serial")
    assert set(ref.table.status) == {"ok"} and set(ref.table.engine) == {"dmft-mc"}
    thr = sw.Sweep(grid, fixed, cache=str(tmp_path)).run(backend="threads", workers=2)
    dsk = sw.Sweep(grid, fixed, cache=False).run(backend="dask", workers=2)
    cached = sw.Sweep(grid, fixed, cache=str(tmp_path)).run(backend="serial")
    assert cached.table.cache_hit.all()
    for other in (thr, dsk, cached):
        sw.compare_tables(ref.table, other.table)
        pd.testing.assert_frame_equal(ref.curves, other.curves, check_exact=True)
    # the table's numbers are the engine's own
    from solver.dmft import solve

    r = solve(Experiment.checked(tau=1.0, delta=2.0, **fixed))
    row = ref.table.iloc[3]
    assert (row.tau, row.delta) == (1.0, 2.0)
    assert row.test_loss_final == r.test_loss[-1] and row.Q_final == r.Q[-1]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["--grid", "tau=0,1;delt=1,2"], "sgf-dmft: error: delt: unknown parameter"),
    (["--grid", "tau=0,x"], "sgf-dmft: error: tau: must be a number"),
    (["--grid", "tau=0,1", "--tau", "1"], "sgf-dmft: error: tau: given both"),
    (["--grid", "delta=1", "--lam", "-1"], "sgf-dmft: error: lam: value -1.0 is outside"),
    (["--grid", "delta=1", "--workers", "0"], "sgf-dmft: error: workers:"),
])
def test_cli_invalid_input_exits_2_with_one_line(args, line, tmp_path, capsys):
    from solver.cli import main

    assert main(["sweep", *args, "--out", str(tmp_path / "s.parquet"), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(not _real_dmft(), reason="solver.dmft not available")
def test_cli_end_to_end_dask_local(tmp_path):
    out = tmp_path / "s.parquet"
    env = dict(os.environ, NUMBA_NUM_THREADS="2", SGF_DMFT_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "solver.cli", "sweep", "--grid", "tau=0,1;delta=1,2",
           "--T", "0.5", "--dt", "0.1", "--samples", "64", "--dask", "local", "--workers", "2",
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "sweep 4/4" in p.stderr and "4 ok" in p.stderr and p.stdout == ""
    t = pd.read_parquet(out)
    c = pd.read_parquet(tmp_path / "s.curves.parquet")
    assert list(t.columns[:3]) == ["point", "tau", "delta"] and len(t) == 4
    assert (t.status == "ok").all() and not t.cache_hit.any() and (t["T"] == 0.5).all()
    assert set(c.point) == {0, 1, 2, 3} and len(c) == 4 * 6
    assert os.path.exists(tmp_path / "s.json")
    assert len(os.listdir(tmp_path / "cache" / "points")) >= 1
    # from cache, CSV output, default thread backend
    from solver.cli import main

    os.environ["SGF_DMFT_CACHE"], old = str(tmp_path / "cache"), os.environ.get("SGF_DMFT_CACHE")
    try:
        assert main(["sweep", "--grid", "tau=0,1;delta=1,2", "--T", "0.5", "--dt", "0.1",
                     "--samples", "64", "--quiet", "--out", str(tmp_path / "s.csv")]) == 0
    finally:
        if old is None:
            del os.environ["SGF_DMFT_CACHE"]
        else:
            os.environ["SGF_DMFT_CACHE"] = old
    t2 = pd.read_csv(tmp_path / "s.csv")
    assert t2.cache_hit.all()
    np.testing.assert_array_equal(t2.test_loss_final.to_numpy(), t.test_loss_final.to_numpy())
