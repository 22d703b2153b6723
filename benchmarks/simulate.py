"""Speed of the finite-size simulator (solver.simulate), measured against its floors.

Run:  python benchmarks/simulate.py [--quick] [--no-write]

* SGF step at (d, n) = (1000, 2000) and (4000, 8000), logistic loss, float64:
  - ``kernel``: solver.simulate.kernels.sgf_steps on one seed (one fused pass over X per step);
  - ``stream``: the whole engine (4 seeds in lockstep, thread per seed), per seed-step;
  - ``floor``: two bare BLAS mat-vecs ``np.dot(X, theta, out=h)``, ``np.dot(X.T, u, out=g)``
    with preallocated buffers (numpy's BLAS with its default threads);
  - ``numpy``: the plain numpy loop a user would write for the same SGF step.
* SGD at d = 1000, n = 2000, B = 1 and 8 (fresh batches): the numba kernel vs the plain numpy
  loop (``rng.choice(n, B, replace=False)``, row gather, two small mat-vecs).

Every timing is the best of ``REPEATS`` runs (the machine is shared); all ratios come from the
same run. Writes the table into the "Simulator" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _doc import write_block  # noqa: E402  (benchmarks/_doc.py)
from solver.config import Experiment  # noqa: E402
from solver.models import LOSS_CODES  # noqa: E402
from solver.simulate import kernels as K  # noqa: E402
from solver.simulate import engine, stream  # noqa: E402
from solver.simulate.data import draw, noise_rngs  # noqa: E402

REPEATS = 3
#: Short timed units, many times, best kept: on a shared machine the minimum over short units
#: is the uncontended time (a unit fits in a scheduler time slice).
UNITS = 40
DOC = ROOT / "docs" / "benchmarks.md"


def best_unit(fn, unit, total):
    """Per-step time: ``fn(unit)`` runs ``unit`` steps; best of about total/unit units."""
    fn(unit)
    return best(lambda: fn(unit), reps=max(3, total // unit)) / unit


def best(fn, reps=REPEATS):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def _openblas():
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "libscipy_openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        if hasattr(lib, "scipy_openblas_set_num_threads64_"):
            return lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
    return None


def blas_floor(fn, unit, steps):
    """Floor with numpy's BLAS at its default threads, and (where settable) at one thread."""
    t_default = best_unit(fn, unit, steps)
    ob = _openblas()
    if ob is None:
        return t_default, math.nan, None
    get, set_ = ob
    nthreads = get()
    set_(1)
    try:
        t_one = best_unit(fn, unit, steps)
    finally:
        set_(nthreads)
    return t_default, t_one, nthreads


def logistic_d1(h, y):
    return -y / (1.0 + np.exp(y * h))


def bench_sgf(d, delta, steps, tau=0.5, dt=0.05, lam=0.01, seeds=4):
    exp = Experiment(loss="logistic", teacher="sign", algo="sgf", d=d, delta=delta, tau=tau,
                     dt=dt, lam=lam, seeds=seeds, q0=0.5, m0=0.1)
    ds = draw(exp, 0)
    X, y, n = ds.X, ds.y, ds.n
    a, c0, c1 = 1 - dt * lam, dt / delta, math.sqrt(tau * dt / delta)
    code = LOSS_CODES["logistic"]
    rng0, rng1 = noise_rngs(exp, 0)
    theta = ds.theta0.copy()
    g0, g1, h, u, out = np.empty(d), np.empty(d), np.empty(n), np.empty(K.RB), np.zeros(1)
    n1 = K.split_row(n)
    unit = max(1, steps // UNITS)
    t_kernel = best_unit(lambda k: K.sgf_steps(X, y, theta, g0, g1, h, u, k, a, c0, c1, code,
                                               rng0, rng1, n1, False, out), unit, steps)

    hb, gb, ub = np.empty(n), np.empty(d), np.ones(n)
    XT = X.T

    def floor(k):
        for _ in range(k):
            np.dot(X, theta, out=hb)
            np.dot(XT, ub, out=gb)

    t_floor, t_floor1, blas_threads = blas_floor(floor, unit, steps)

    nrng = np.random.default_rng(1)
    th = ds.theta0.copy()

    def numpy_loop(k):
        nonlocal th
        for _ in range(k):
            hh = X @ th
            w = c0 + c1 * nrng.standard_normal(n)
            th = a * th - X.T @ (logistic_d1(hh, y) * w)

    t_numpy = best_unit(numpy_loop, unit, steps)

    # the whole engine: `seeds` seeds in lockstep, snapshots at t = 0 and t = steps*dt (so it
    # also pays one extra fields pass per seed and two snapshots: slightly pessimistic)
    res = {}
    e = exp.copy(T=steps * dt, record_every=steps)
    data = [ds] * seeds  # same data, independent noise: drawing is not what is timed
    for mode in ("serial", "seeds", "rows"):
        res[mode] = best(lambda: [None for _ in stream(e, data=data, parallel=mode)],
                         reps=2) / (seeds * steps)
    e1 = e.copy(seeds=1)  # a single seed: serial or rows split over two threads
    res1 = {mode: best(lambda: [None for _ in stream(e1, data=ds, parallel=mode)], reps=2) / steps
            for mode in ("serial", "rows")}
    return dict(d=d, n=n, kernel=t_kernel, floor=t_floor, floor1=t_floor1,
                blas_threads=blas_threads, numpy=t_numpy, engine=res, engine1=res1,
                auto=engine.choose_parallel(e), auto1=engine.choose_parallel(e1), seeds=seeds)


def bench_sgd(d, delta, B, steps, tau=0.5, lam=0.01):
    exp = Experiment(loss="logistic", teacher="sign", algo="sgd", d=d, delta=delta, tau=tau,
                     batch=B, lam=lam, seeds=1, q0=0.5, m0=0.1)
    ds = draw(exp, 0)
    X, y, n = ds.X, ds.y, ds.n
    eta = exp.eta
    code = LOSS_CODES["logistic"]
    rng = noise_rngs(exp, 0)[0]
    v = ds.theta0.copy()
    scale, perm = np.ones(1), np.arange(n, dtype=np.int64)
    pos, lp = np.array([n], dtype=np.int64), np.empty(B)
    unit = max(1, steps // UNITS)
    t_kernel = best_unit(lambda k: K.sgd_steps(X, y, v, scale, perm, pos, lp, k, eta, lam, B,
                                               code, True, rng), unit, steps)

    nrng = np.random.default_rng(1)
    th = ds.theta0.copy()
    def numpy_loop(k):
        nonlocal th
        for _ in range(k):
            idx = nrng.choice(n, B, replace=False)
            xb = X[idx]
            lpb = logistic_d1(xb @ th, y[idx])
            th = th - eta * (xb.T @ lpb / B + (lam / d) * th)

    t_numpy = best_unit(numpy_loop, max(1, unit // 20), steps // 20)
    return dict(d=d, n=n, B=B, kernel=t_kernel, numpy=t_numpy)


def fmt_us(s):
    return f"{s * 1e6:,.1f}" if s < 1e-3 else f"{s * 1e3:,.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    q = args.quick
    load0 = os.getloadavg()[0]
    sgf = [bench_sgf(1000, 2.0, 20 if q else 200), bench_sgf(4000, 2.0, 3 if q else 12)]
    sgd = [bench_sgd(1000, 2.0, B, 2000 if q else 40000) for B in (1, 8)]
    load1 = os.getloadavg()[0]

    lines = []
    bt = sgf[0]["blas_threads"]
    lines.append("SGF step (logistic loss, float64), time per step of one seed (us unless "
                 "marked). floor = the two BLAS mat-vecs at numpy's default "
                 f"{bt} threads (floor-1t: one thread); engine = 4 seeds in lockstep, per "
                 "seed-step, by parallel mode; ratios are time / floor:")
    lines.append("")
    lines.append("| (d, n) | floor | floor-1t | kernel (1 thread) | engine serial | engine "
                 "'seeds' | engine 'rows' | auto picks | kernel / floor | engine (auto) / floor "
                 "| engine (auto) / floor-1t | plain numpy loop | numpy / engine (auto) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sgf:
        eng = r["engine"]
        auto = eng[r["auto"]]
        lines.append(f"| ({r['d']}, {r['n']}) | {fmt_us(r['floor'])} | {fmt_us(r['floor1'])} | "
                     f"{fmt_us(r['kernel'])} | {fmt_us(eng['serial'])} | "
                     f"{fmt_us(eng['seeds'])} | {fmt_us(eng['rows'])} | {r['auto']} | "
                     f"{r['kernel'] / r['floor']:.2f} | {auto / r['floor']:.2f} | "
                     f"{auto / r['floor1']:.2f} | {fmt_us(r['numpy'])} | "
                     f"{r['numpy'] / auto:.1f} |")
    lines.append("")
    lines.append("The same engine with a single seed (per step):")
    lines.append("")
    lines.append("| (d, n) | floor | engine serial | engine 'rows' | auto picks | engine (auto) / "
                 "floor |")
    lines.append("|---|---|---|---|---|---|")
    for r in sgf:
        e1 = r["engine1"]
        lines.append(f"| ({r['d']}, {r['n']}) | {fmt_us(r['floor'])} | {fmt_us(e1['serial'])} | "
                     f"{fmt_us(e1['rows'])} | {r['auto1']} | {e1[r['auto1']] / r['floor']:.2f} |")
    lines.append("")
    lines.append("SGD step (logistic loss, fresh batches), microseconds per step (unless marked):")
    lines.append("")
    lines.append("| (d, n) | B | numba kernel | plain numpy loop | numpy / kernel |")
    lines.append("|---|---|---|---|---|")
    for r in sgd:
        lines.append(f"| ({r['d']}, {r['n']}) | {r['B']} | {fmt_us(r['kernel'])} | "
                     f"{fmt_us(r['numpy'])} | {r['numpy'] / r['kernel']:.1f} |")
    lines.append("")
    lines.append(f"Machine: {platform.processor() or platform.machine()}, "
                 f"{len(os.sched_getaffinity(0))} cores; load average {load0:.2f} before, "
                 f"{load1:.2f} after; numpy {np.__version__}; "
                 f"{time.strftime('%Y-%m-%d %H:%M')}{' (--quick)' if q else ''}.")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_doc(table)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")


def write_doc(table):
    write_block("simulate", table, section="## Simulator")


if __name__ == "__main__":
    main()
