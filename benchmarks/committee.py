"""Speed and accuracy of the Monte Carlo DMFT of the committee machine (solver.dmft.committee).

Run:  python benchmarks/committee.py [--quick] [--no-write] [--samples N1,N2] [--seeds S]
      [--no-plain] [--spread-at N1,N2]

Configuration (issue #5's benchmark, THEORY.md 5.5 setup): k = k* = 2, erf, v = 1, rho = I,
q0 = 0.1, m0 = 0.2, square loss, no label noise, lambda = 0, tau = 0.5, delta = 2, T = 10,
dt = 0.05 (K = 200 steps).

* Engine: ``committee.stream`` as shipped (main population of N trajectories, 5 replica
  populations for the standard errors, snapshots, kernels extra): wall time, CPU time (all
  threads), time to the first snapshot, peak RSS (``ru_maxrss`` of this process, i.e. the
  largest run so far; runs go in increasing N), generalisation error eg at T with its standard
  error, and the N a 0.1% standard error would need (``N (se/0.1%)^2``, every curve's variance
  falls like 1/N).
* Sweep alone (one population of N, no replicas): with the tangent on the engine's subset of
  trajectories (``tangent_fraction_for``) and on all of them (``tangent_fraction=1``), which
  shows what the tangent costs.
* Seed spread (``--seeds S`` sweeps at each N of ``--spread-at``, default every N): S
  independent sweeps; their standard deviation of eg at T against the replica standard error
  the engine printed (the honest error: the replica se rescales five populations of N/4 by
  sqrt(1/4), which assumes every variance falls like 1/N).
* Estimators: the engine's defaults (``init_sampling='qmc_steps'``, kappa ``'stein'``) against
  the plain ones (``'stein'``, ``'mc'``: the engine before the variance
  reduction), same run: the plain engine at every N and its own seed spread (``--no-plain``
  skips both). The figure of merit is the CPU time a 0.1% standard error of eg would need,
  ``cpu(N) (se/0.1%)^2`` (se from the seed spread, the honest one, and from the replicas).

Kernels are compiled (numba cache) before timing. Writes its table into the "Committee
machines" section of docs/benchmarks.md (between the committee markers) unless --no-write or
--quick. Takes about 7 minutes on 2 quiet cores (2 x 12 sweeps at each of N = 8000 and 64000;
the 64000 sweeps are most of it).
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
from solver.dmft import committee as dc  # noqa: E402

SECTION = "## Committee machines"
KEYS = ("test_error", "train_loss", "m", "Q")


def config(N, quick=False, seed=0):
    return Experiment(model="committee", loss="square", teacher="linear", activation="erf", k=2,
                      kstar=2, q0=0.1, m0=0.2, rho=1.0, noise=0.0, lam=0.0, tau=0.5, delta=2.0,
                      dt=0.05, T=3.0 if quick else 10.0, record_every=20, samples=N,
                      method="mc", seed=seed).validate()


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


PLAIN = dict(kappa_estimator="stein", init_sampling="mc")
DEFAULT = dict(kappa_estimator=dc.KAPPA_ESTIMATOR, init_sampling=dc.SAMPLING)


def engine(exp, opts=None):
    """The shipped engine; returns (last snapshot, wall s, cpu s, first-snapshot s)."""
    w0, c0 = time.perf_counter(), time.process_time()
    first = None
    last = None
    for snap in dc.stream(exp, **(opts or {})):
        if first is None:
            first = time.perf_counter() - w0
        last = snap
    return last, time.perf_counter() - w0, time.process_time() - c0, first


def sweep(exp, fraction=None, opts=None):
    """One population of exp.samples, no replicas; returns (values at T, wall s, cpu s)."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = exp.samples
    frac = dc.tangent_fraction_for(n) if fraction is None else fraction
    pop = dc.Population(exp, n, np.random.SeedSequence(exp.seed).spawn(1)[0],
                        relu_width=dc.relu_width_for(n), tangent_fraction=frac,
                        hist_dtype=dc.HIST_DTYPE, **(DEFAULT if opts is None else opts))
    for s in range(exp.steps + 1):
        pop.step(s)
    obs = dc._observables(exp, [pop], exp.steps)
    return ({k: float(obs[k][0]) for k in KEYS}, time.perf_counter() - w0,
            time.process_time() - c0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 3, small N: a smoke run")
    ap.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    ap.add_argument("--samples", help="comma-separated N of the main population")
    ap.add_argument("--seeds", type=int, default=None, help="independent sweeps for the spread")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the plain estimators (stein, mc) used for the comparison")
    ap.add_argument("--spread-at", help="comma-separated N for the seed spread (default: every "
                    "N of --samples; each must be one of them)")
    args = ap.parse_args(argv)
    threads = os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count()))
    Ns = sorted(int(x) for x in
                (args.samples or ("2000" if args.quick else "8000,64000")).split(","))
    S = args.seeds if args.seeds is not None else (2 if args.quick else 12)
    spread_at = {int(x) for x in args.spread_at.split(",")} if args.spread_at else set(Ns)
    if not spread_at <= set(Ns):
        ap.error("--spread-at: every N must be one of --samples")
    variants = [("plain", PLAIN)] * (not args.no_plain) + [("default", DEFAULT)]

    # compile (or load) every kernel on a tiny problem
    for _, opts in variants:
        for _ in dc.stream(config(64, True).copy(T=0.2), **opts):
            pass

    heads = []
    # plain first (peak RSS is the largest so far)
    for name, opts in variants:
        for N in Ns:
            exp = config(N, args.quick)
            snap, wall, cpu, first = engine(exp, opts)
            mem = peak_mb()
            sizes = dc.replica_plan(N)
            eg, se = snap.values["test_error"], snap.se["test_error"]
            rel = se / eg
            nt = min(N, math.ceil(dc.tangent_fraction_for(N) * N / dc.BLOCK) * dc.BLOCK)
            h = dict(name=name, N=N, sizes=sizes, nt=nt, wall=wall, cpu=cpu, first=first,
                     mem=mem, snap=snap, rel=rel, need=N * (rel / 1e-3) ** 2)
            print(f"{name} N={N}: engine {wall:.1f} s wall, {cpu:.1f} s cpu, first snapshot "
                  f"{1e3 * first:.0f} ms, peak RSS {mem:.0f} MB; eg(T) = {eg:.6f} +- {se:.6f} "
                  f"({100 * rel:.2f}%), 0.1% needs N ~ {h['need']:.2g}; load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            if N == Ns[0] and name == "default":
                v1, w1, c1 = sweep(exp)
                vf, wf, cf = sweep(exp, 1.0)
                h.update(sweep_sub=(w1, c1), sweep_full=(wf, cf))
                print(f"N={N}: sweep alone {w1:.1f} s wall / {c1:.1f} s cpu (tangent on "
                      f"{h['nt']}), {wf:.1f} s / {cf:.1f} s (tangent on all)", flush=True)
            if N in spread_at and S >= 2:
                runs = [sweep(config(N, args.quick, seed=s), opts=opts) for s in range(S)]
                egs = np.array([r[0]["test_error"] for r in runs])
                csw = float(np.mean([r[2] for r in runs]))
                sd = float(np.std(egs, ddof=1))
                h["spread"] = (sd, S, float(np.mean(egs)), csw)
                print(f"{name} N={N}: seed spread of eg(T) over {S} sweeps {sd:.6f} "
                      f"({100 * sd / np.mean(egs):.2f}%), engine se {se:.6f}; "
                      f"{csw:.1f} s cpu per sweep", flush=True)
            heads.append(h)
    table = render(config(Ns[0], args.quick), heads, threads)
    print(table)
    if not args.no_write and not args.quick:
        write_doc(table)


def render(exp, heads, threads):
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} "
             f"({os.cpu_count()} cores, NUMBA_NUM_THREADS={threads}, load average "
             f"{os.getloadavg()[0]:.1f} at the end), `python benchmarks/committee.py`: k = k* = "
             f"2, erf, rho = I, q0 = 0.1, m0 = 0.2, tau = {exp.tau}, delta = {exp.delta}, "
             f"lambda = 0, T = {exp.T}, dt = {exp.dt} (K = {exp.steps}). One run each (the "
             "machine may be shared: CPU time is the steadier number). Estimators: *default* = "
             f"the engine's (kappa '{dc.KAPPA_ESTIMATOR}', sampling '{dc.SAMPLING}'), *plain* = "
             "'stein', 'mc' (the engine before the variance reduction). N_t: trajectories of "
             "the main population that carry the tangent (the same fraction in each replica). "
             "Peak RSS: largest so far in the run (plain runs first). Per-trajectory "
             f"histories in {np.dtype(dc.HIST_DTYPE).name} (`committee.HIST_DTYPE`). Rerun: "
             "`NUMBA_NUM_THREADS=2 python benchmarks/committee.py` (both estimator sets at N = "
             "8000 and 64000, 12 sweeps of each at both N: about 7 minutes on 2 quiet cores; "
             "`--no-plain` for the default alone). The variance reduction (QMC draws; the "
             "prose above this table predates it): docs/committee.md, \"Variance reduction\".",
             "",
             "| estimators | N | N_t | replicas | engine wall (s) | engine CPU (s) "
             "| first snapshot (ms) | peak RSS (MB) | eg at T | se (%) | N for se = 0.1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in heads:
        sn, sz = h["snap"], h["sizes"]
        lines.append(f"| {h['name']} | {h['N']} | {h['nt']} | {len(sz) - 1} x {sz[-1]} | "
                     f"{h['wall']:.1f} | {h['cpu']:.1f} | {1e3 * h['first']:.0f} | "
                     f"{h['mem']:.0f} | {sn.values['test_error']:.5f} +- "
                     f"{sn.se['test_error']:.5f} | {100 * h['rel']:.2f} | {h['need']:.2g} |")
    last = heads[-1]["snap"]
    lines += ["", f"At T ({heads[-1]['name']}, N = {heads[-1]['N']}): " + ", ".join(
        f"{k} {last.values[k]:.5f} +- {last.se[k]:.5f}" for k in ("train_loss", "m", "Q", "M_0_1"))
        + "."]
    for h0 in heads:
        if "sweep_sub" in h0:
            (w1, c1), (wf, cf) = h0["sweep_sub"], h0["sweep_full"]
            lines += ["", f"Sweep alone at N = {h0['N']} ({h0['name']}, one population, no "
                      f"replicas): {w1:.1f} s wall / {c1:.1f} s CPU with the tangent on N_t = "
                      f"{h0['nt']}, {wf:.1f} s / {cf:.1f} s with the tangent on all N."]
    spread = [h for h in heads if "spread" in h]
    if spread:
        lines += ["", "Seed spread (independent sweeps of one population, no replicas) against "
                  "the engine's replica se, and the CPU time a 0.1% se of eg would need, "
                  "`cpu (sd/0.1%)^2` (sd relative; one population, so without the replicas' "
                  "1.25x):", "",
                  "| estimators | N | sweeps | eg (mean) | sd of eg (%) | engine se (%) "
                  "| CPU per sweep (s) | CPU for 0.1% (s) |", "|---|---|---|---|---|---|---|---|"]
        for h in spread:
            sd, S, mean, csw = h["spread"]
            rel = sd / mean
            lines.append(f"| {h['name']} | {h['N']} | {S} | {mean:.5f} | {100 * rel:.2f} | "
                         f"{100 * h['rel']:.2f} | {csw:.1f} | {csw * (rel / 1e-3) ** 2:.3g} |")
    return "\n".join(lines)


def write_doc(table):
    write_block("committee", table, section=SECTION)


if __name__ == "__main__":
    main()
