"""Speed and accuracy of the Monte Carlo DMFT solver (solver.dmft.glm) against a Picard baseline.

Run:  python benchmarks/dmft.py [--quick] [--no-write] [--samples N] [--full-samples N]
                                [--spread-seeds S] [--picard-samples N] [--no-picard]

Configuration (the issue's benchmark): logistic loss, sign teacher, tau = 0.5, delta = 2,
lambda = 0.01, T = 10, dt = 0.05 (K = 200 steps).

* Headline: the engine as shipped (``glm.stream``: the population plus the replica populations
  that give the standard errors, snapshots and extras included; time to the first snapshot) and
  the forward sweep alone (one population of N, no replicas: the work that makes the curves),
  at N = 120000 with the subset tangent of ``glm.tangent_plan`` (N_t = N/4; test-loss standard
  error about 0.1% at T, docs/theory.md "Subset tangent"), and for comparison at N = 70000
  with the tangent on every trajectory (the same error the old way). Kernels compiled and
  cached beforehand. Peak memory: ``ru_maxrss`` of this process after the engine run (the
  process's maximum so far: the shipped rows run first). One more engine run with timers
  around the compiled phases (``phases``: the parallel population step, the per-population
  kernels, the reductions; 'other' = Python, observables, histograms) shows where the time
  goes. The reported standard error is
  checked against the seed-to-seed spread of ``--spread-seeds`` solves of the shipped
  configuration (the engine's and further sweeps with other seeds; the spread of S solves is
  itself uncertain by about 1/sqrt(2 (S-1))).
* Baseline at N = 8000: damped fixed-point (Picard) iteration of the same discretisation
  (Gerbelot et al. style): given kernels (G, kappa, E[dA dA]) for the whole horizon, compute
  R, b, C, m, simulate the population over all K steps, recompute the kernels, mix them with
  damping ``alpha`` and repeat until no curve (train loss, test loss, m, Q) moves by more than
  its Monte Carlo standard error between iterations. Common random numbers (same seed every
  iteration), so the fixed point is exactly the sweep's solution; the table reports the
  distance to it, and the time ratio is the ratio at equal accuracy. Its time is the sum of the
  iterations' times (with --quiet-load each iteration starts on a quiet machine). Sweep and
  Picard both compute the tangent on every trajectory here.

Every timing is the best of ``REPEATS`` runs (the machine is shared; ``--quiet-load 0.5`` waits
for a quiet machine before each run). Writes its table into the
"DMFT solver" section of docs/benchmarks.md (between the dmft markers).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _doc import write_block  # noqa: E402  (benchmarks/_doc.py)
from solver.config import Experiment  # noqa: E402
from solver.dmft import glm  # noqa: E402
from solver.observables import metrics  # noqa: E402

REPEATS = 2
CURVES = ("train_loss", "test_loss", "m", "Q")
EXTRA = ("test_error",)


def config(N, quick=False):
    if quick:
        return Experiment(loss="logistic", teacher="sign", tau=0.5, delta=2.0, lam=0.01, T=3.0,
                          dt=0.05, samples=N, method="mc", seed=0)
    return Experiment(loss="logistic", teacher="sign", tau=0.5, delta=2.0, lam=0.01, T=10.0,
                      dt=0.05, samples=N, method="mc", seed=0)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def curves_of(pop, exp, g=0):
    Q = np.diagonal(pop.C[g]).copy()
    m = pop.m[g].copy()
    return {"train_loss": pop.train[g].copy(), "m": m, "Q": Q,
            "test_loss": np.asarray(metrics(m, np.maximum(Q, 0), exp)["test_loss"], float)}


def tangent_size(N, full=False):
    """N_t of the main population: all N with ``full``, else the engine's rule."""
    return N if full else glm.tangent_plan([N])[0]


def sweep(exp, full=False):
    """The forward sweep alone: one population (tangent on N_t of it), all K+1 steps."""
    pop = glm.Populations(exp, [exp.samples], tangent_sizes=[tangent_size(exp.samples, full)])
    for k in range(exp.steps + 1):
        pop.step(k)
    return curves_of(pop, exp)


def engine(exp, full=False):
    """The shipped engine: stream with replicas; returns (result curves, se curves, t_first).
    ``full``: tangent on every trajectory (``tangent_divisor=1``)."""
    t0 = time.perf_counter()
    t_first = None
    vals = {k: [] for k in CURVES + EXTRA}
    ses = {k: [] for k in CURVES + EXTRA}
    kw = {"tangent_divisor": 1} if full else {}
    if REPLICA_DIVISOR is not None:
        kw["divisor"] = REPLICA_DIVISOR
    for snap in glm.stream(exp, **kw):
        if t_first is None:
            t_first = time.perf_counter() - t0
        for k in CURVES + EXTRA:
            vals[k].append(snap.values[k])
            ses[k].append(snap.se[k])
    return ({k: np.array(v) for k, v in vals.items()}, {k: np.array(v) for k, v in ses.items()},
            t_first)


def _scaled(diff, se, ref):
    """max |diff| / se over t > 0; where a curve is exact (se = 0, e.g. m at the first step)
    its own roundoff scale stands in for se."""
    floor = 1e-9 * max(1.0, float(np.max(np.abs(ref))))
    return float(np.max(np.abs(diff[1:]) / np.maximum(se[1:], floor)))


def picard(exp, se, alpha, max_iter=100):
    """Damped Picard iteration; returns (curves, iterations, seconds, converged)."""
    Kp = exp.steps + 1
    G = np.zeros((1, Kp, Kp))
    kap = np.zeros((1, Kp))
    M = np.zeros((1, Kp, Kp))
    prev = None
    spent = 0.0  # compute time summed over iterations (each started on a quiet machine)
    for it in range(1, max_iter + 1):
        wait_quiet()
        t0 = time.perf_counter()
        pop = glm.Populations(exp, [exp.samples])  # same seed: common random numbers
        pop.kernels_from = (G, kap, M)
        with np.errstate(all="ignore"):
            for k in range(Kp):
                pop.step(k)
        cur = curves_of(pop, exp)
        G = (1 - alpha) * G + alpha * pop.G
        kap = (1 - alpha) * kap + alpha * pop.kappa
        M = (1 - alpha) * M + alpha * pop.M
        spent += time.perf_counter() - t0
        if not all(np.all(np.isfinite(v)) for v in cur.values()):
            return cur, it, spent, False
        if prev is not None:
            moved = max(_scaled(cur[k] - prev[k], se[k], cur[k]) for k in CURVES)
            if moved <= 1.0:
                return cur, it, spent, True
        prev = cur
    return cur, max_iter, spent, False


#: Before each timed run wait (at most QUIET_WAIT s) until fewer than this many cores are busy
#: (--quiet-load; the machines are shared, and a busy core doubles a parallel run's time).
QUIET_LOAD = None
QUIET_WAIT = 600


def busy_cores(interval=2.0):
    """Cores busy over the last ``interval`` seconds (from /proc/stat; None where unavailable)."""
    def snap():
        with open("/proc/stat") as fh:
            f = [float(x) for x in fh.readline().split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return None
    return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(t1 - t0, 1e-9))


def wait_quiet():
    """Wait until fewer than QUIET_LOAD cores are busy (at most QUIET_WAIT seconds)."""
    if QUIET_LOAD is None:
        return
    t0 = time.time()
    while time.time() - t0 < QUIET_WAIT:
        b = busy_cores()
        if b is None or b < QUIET_LOAD:
            return


#: --replica-divisor (None: the engine's default)
REPLICA_DIVISOR = None

#: CPU seconds (this process, all threads) of the best run of the last call to best()
LAST_CPU = math.nan

#: the engine's phases timed by phases(): compiled calls made by glm.Populations.step
PHASES = ("_population_step", "_deterministic", "_reduce")


def phases(fn):
    """Run ``fn`` once with wall-clock timers around the engine's compiled phases
    (:data:`PHASES`; the parallel population step, the per-group kernels, the reductions);
    returns {phase: seconds} with 'other' = the rest (Python, observables, histograms, ...)
    and 'total'."""
    spent = dict.fromkeys(PHASES, 0.0)
    orig = {name: getattr(glm, name) for name in PHASES}

    def timed(name, f):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    for name, f in orig.items():
        setattr(glm, name, timed(name, f))
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        for name, f in orig.items():
            setattr(glm, name, f)
    spent["other"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def best(fn, reps=REPEATS):
    """(best wall time, result); LAST_CPU: the CPU time of that run (steadier on a shared
    machine, where wall times of parallel runs vary by tens of percent)."""
    global LAST_CPU
    out, res = [], None
    for _ in range(reps):
        wait_quiet()
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = fn()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, LAST_CPU = min(out)
    return wall, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 3, small N: a smoke run")
    ap.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    ap.add_argument("--samples", default=None,
                    help="comma-separated N of the headline runs as shipped (default 120000)")
    ap.add_argument("--full-samples", default=None,
                    help="comma-separated N of headline runs with the tangent on every "
                         "trajectory (default 70000; 0: none)")
    ap.add_argument("--spread-seeds", type=int, default=None,
                    help="independent sweeps of the last shipped N for the seed spread "
                         "(default 4; 0: none)")
    ap.add_argument("--picard-samples", type=int, default=None,
                    help="N of the sweep-vs-Picard comparison (default 8000)")
    ap.add_argument("--no-picard", action="store_true", help="skip the Picard baseline")
    ap.add_argument("--replica-divisor", type=int, default=None,
                    help="replicas hold samples // D trajectories in all, each at least "
                         "glm.MIN_REPLICA (default: the engine's glm.REPLICA_DIVISOR = 8); "
                         "4 gives the replicas of N/64 used before 2026-11-26 session 4")
    ap.add_argument("--alphas", default="1.0,0.5", help="Picard damping values")
    ap.add_argument("--quiet-load", type=float, default=None,
                    help="before each timed run, wait until fewer than this many cores are busy "
                         "(shared machines), e.g. 0.3")
    args = ap.parse_args(argv)
    global QUIET_LOAD, REPLICA_DIVISOR
    QUIET_LOAD = args.quiet_load
    REPLICA_DIVISOR = args.replica_divisor
    Ns = [int(x) for x in (args.samples or ("16384" if args.quick else "120000")).split(",")]
    Nf = [int(x) for x in (args.full_samples or ("4096" if args.quick else "70000")).split(",")
          if int(x) > 0]
    S = args.spread_seeds if args.spread_seeds is not None else (3 if args.quick else 4)
    Np = args.picard_samples or (2000 if args.quick else 8000)
    threads = os.environ.get("NUMBA_NUM_THREADS", "default")
    exp = config(Ns[0], args.quick)
    print(f"config: {exp.loss}/{exp.teacher} tau={exp.tau} delta={exp.delta} lam={exp.lam} "
          f"T={exp.T} dt={exp.dt} K={exp.steps}; NUMBA_NUM_THREADS={threads}; "
          f"load average {os.getloadavg()[0]:.1f}")
    list(glm.stream(exp.copy(T=0.2, samples=64)))  # compile / load the cached kernels
    # --- headline: the engine at N -----------------------------------------------------------
    heads = []
    # shipped rows first: peak RSS is the process's maximum so far
    for N, full in [(n, False) for n in Ns] + [(n, True) for n in Nf]:
        ex = config(N, args.quick)
        t_engine, (vals, se, t_first) = best(lambda: engine(ex, full))
        c_engine = LAST_CPU
        mem = peak_mb()
        t_sweep, _ = best(lambda: sweep(ex, full))
        c_sweep = LAST_CPU
        sizes = glm.replica_plan(N, divisor=REPLICA_DIVISOR or glm.REPLICA_DIVISOR)
        tsizes = list(sizes) if full else glm.tangent_plan(sizes)
        rel = se["test_loss"][-1] / vals["test_loss"][-1]
        print(f"N={N} N_t={tsizes[0]}: engine (+{len(sizes) - 1} replicas of {sizes[-1]}) "
              f"{t_engine:.2f} s ({c_engine:.1f} CPU s), first snapshot after {1e3 * t_first:.1f} ms, peak RSS "
              f"{mem:.0f} MB; sweep alone {t_sweep:.2f} s ({c_sweep:.1f} CPU s); test loss at T "
              f"{vals['test_loss'][-1]:.5f} +- {se['test_loss'][-1]:.5f} ({100 * rel:.3f}%); "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        ph = phases(lambda: engine(ex, full))
        print("  engine phases (wall s, one more run): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()), flush=True)
        heads.append(dict(N=N, sizes=sizes, tsizes=tsizes, full=full, t_engine=t_engine,
                          phases=ph,
                          t_sweep=t_sweep, c_engine=c_engine, c_sweep=c_sweep, t_first=t_first, mem=mem, vals=vals, se=se,
                          spread=None))
    # --- the reported se against the seed spread (shipped configuration, last N) ------------
    if S >= 2 and Ns:
        h = [x for x in heads if not x["full"]][-1]
        tl = [h["vals"]["test_loss"][-1]]
        for s in range(1, S):
            tl.append(sweep(config(h["N"], args.quick).copy(seed=s))["test_loss"][-1])
        h["spread"] = (float(np.std(tl, ddof=1)), len(tl))
        print(f"N={h['N']}: seed spread of the test loss at T over {len(tl)} solves "
              f"{h['spread'][0]:.5f} ({100 * h['spread'][0] / np.mean(tl):.3f}%), reported se "
              f"{h['se']['test_loss'][-1]:.5f}", flush=True)
    # --- sweep against Picard at equal accuracy ----------------------------------------------
    rows = []
    if not args.no_picard:
        ep = config(Np, args.quick)
        t_sw, ref = best(lambda: sweep(ep, full=True))  # Picard's populations: full tangent
        _, (v_p, se_p, _) = best(lambda: engine(ep, full=True), reps=1)
        rows.append(("forward sweep", t_sw, 1.0, "1", "0"))
        for alpha in (float(a) for a in args.alphas.split(",")):
            cur, its, t_p, ok = picard(ep, se_p, alpha)
            dist = max(_scaled(cur[k] - ref[k], se_p[k], ref[k]) for k in CURVES)
            print(f"N={Np}: picard alpha={alpha}: {its} iterations, {t_p:.1f} s "
                  f"({t_p / t_sw:.1f} x sweep {t_sw:.2f} s), "
                  f"{'converged' if ok else 'NOT converged'}, distance to sweep {dist:.2f} se",
                  flush=True)
            rows.append((f"Picard, damping {alpha}", t_p, t_p / t_sw,
                         f"{its}{'' if ok else ' (not converged)'}", f"{dist:.2f}"))
    table = render(exp, heads, Np, rows, threads)
    print(table)
    if not args.no_write and not args.quick:
        write_doc(table)


def render(exp, heads, Np, rows, threads):
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} "
             f"({os.cpu_count()} cores, NUMBA_NUM_THREADS={threads}, load average "
             f"{os.getloadavg()[0]:.1f} at the end), `python benchmarks/dmft.py`: logistic "
             f"loss, sign teacher, tau = {exp.tau}, delta = {exp.delta}, lambda = {exp.lam}, "
             f"T = {exp.T}, dt = {exp.dt} (K = {exp.steps}). Wall times, best of {REPEATS}. "
             "N_t: trajectories that compute the tangent (main population / each replica).", "",
             "Times: wall seconds (CPU seconds of the same run, all threads).", "",
             "| tangent | N | N_t | replicas | engine (s) | sweep alone (s) | first snapshot (ms) "
             "| peak RSS (MB) | test loss at T | se (%) | seed spread (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in heads:
        v, e, sz, ts = h["vals"], h["se"], h["sizes"], h["tsizes"]
        tl = v["test_loss"][-1]
        spread = (f"{100 * h['spread'][0] / tl:.3f} ({h['spread'][1]} solves)"
                  if h["spread"] else "")
        lines.append(f"| {'all' if h['full'] else 'subset (shipped)'} | {h['N']} | "
                     f"{ts[0]} / {ts[-1]} | {len(sz) - 1} x {sz[-1]} | {h['t_engine']:.2f} "
                     f"({h['c_engine']:.1f}) | {h['t_sweep']:.2f} ({h['c_sweep']:.1f}) | "
                     f"{1e3 * h['t_first']:.0f} | {h['mem']:.0f} | "
                     f"{tl:.5f} +- {e['test_loss'][-1]:.5f} | "
                     f"{100 * e['test_loss'][-1] / tl:.3f} | {spread} |")
    h = ([x for x in heads if not x["full"]] or heads)[-1]
    v, e = h["vals"], h["se"]
    ph = h.get("phases")
    if ph:
        lines += ["", f"Engine phases at N = {h['N']} (wall s, one more run): parallel population "
                  f"step {ph['_population_step']:.2f}, per-population kernels "
                  f"{ph['_deterministic']:.2f}, reductions {ph['_reduce']:.2f}, the rest "
                  f"(Python, observables, histograms) {ph['other']:.2f}; total {ph['total']:.2f}."]
    lines += ["", f"At T (N = {h['N']}, shipped): test error {v['test_error'][-1]:.4f}, m "
              f"{v['m'][-1]:.4f} +- {e['m'][-1]:.4f}, Q {v['Q'][-1]:.3f} +- {e['Q'][-1]:.3f}, "
              f"train loss {v['train_loss'][-1]:.4f} +- {e['train_loss'][-1]:.4f}. Peak RSS is "
              "the whole process (Python, numba, the largest run so far)."]
    if rows:
        lines += ["", f"Forward sweep against Picard at N = {Np} (same random numbers; iterations "
                  "until no curve moves by more than its standard error):", "",
                  "| method | wall time (s) | x sweep | iterations | distance to sweep (se) |",
                  "|---|---|---|---|---|"]
        for name, t, ratio, its, dist in rows:
            lines.append(f"| {name} | {t:.2f} | {ratio:.1f} | {its} | {dist} |")
    return "\n".join(lines)


def write_doc(table):
    write_block("dmft", table, section=None)


if __name__ == "__main__":
    main()
