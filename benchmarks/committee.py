"""Speed and accuracy of the Monte Carlo DMFT of the committee machine (solver.dmft.committee).

Run:  NUMBA_NUM_THREADS=2 python benchmarks/committee.py [--quick] [--no-write]
      [--samples N1,N2] [--errors auto|replicas|batches] [--engine-seeds S --spread-at N]
      [--plain] [--sweeps S --sweep-at n1,n2]

Configuration (issue #5's benchmark, THEORY.md 5.5 setup): k = k* = 2, erf, v = 1, rho = I,
q0 = 0.1, m0 = 0.2, square loss, no label noise, lambda = 0, tau = 0.5, delta = 2, T = 10,
dt = 0.05 (K = 200 steps).

* Engine: ``committee.stream`` as the dashboard calls it (snapshots, kernels extra), once at
  each N (default 64000 and TARGET_N, the N that should give a 0.1% standard error of eg with
  batch means): wall time, CPU time (all threads), time to the first snapshot, peak RSS
  (``ru_maxrss``: the largest run so far; runs go in increasing N), eg at T with its standard
  error, and the N (and wall time at this run's rate) a 0.1% standard error would need,
  ``N (se/0.1%)^2``. From N = 64000 the engine uses batch means (``errors='batches'``: r
  independent quasi-random populations of N/r, se = sd/sqrt(r)); ``--errors replicas`` for the
  main population + replicas.
* ``--engine-seeds S``: S more engine runs (seeds 1..S) at each N of ``--spread-at``: the spread
  of eg against the reported se (the honesty check; F(S, (S+1)(r-1)) distributed ratio).
* ``--plain``: the plain estimators ('stein', 'mc') too. ``--sweeps S --sweep-at n1,n2``: S
  independent one-population sweeps at each n (mean and spread of eg: the batch-size bias).

Kernels are compiled (numba cache) before timing. Writes its table into the "Committee
machines" section of docs/benchmarks.md (between the committee markers) unless --no-write or
--quick. Default run: about 1.5 minutes on 2 quiet cores (N = 64000 and 800000; peak RSS ~3.7 GB).
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
#: the engine run that should reach a 0.1% standard error of eg (batch means; docs/committee.md):
#: the populations of the engine's runs at N = 600000 spread by sd(eg) sqrt(N) / eg = 0.89
#: (4 runs x 18 populations, 2026-11-27), so N = (0.89 / 0.1%)^2 = 7.9e5
TARGET_N = 800000


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
    ap.add_argument("--samples", help=f"comma-separated N of the engine runs (default 64000,"
                    f"{TARGET_N})")
    ap.add_argument("--errors", default="auto", choices=dc.ERRORS,
                    help="the engine's error mode (committee.stream errors=)")
    ap.add_argument("--engine-seeds", type=int, default=0,
                    help="extra engine runs (seeds 1..S) at each N of --spread-at: the spread "
                    "of eg against the reported se")
    ap.add_argument("--spread-at", help="comma-separated N for --engine-seeds (default: the "
                    "smallest N of --samples)")
    ap.add_argument("--plain", action="store_true",
                    help="also the plain estimators (stein, mc), for comparison")
    ap.add_argument("--sweeps", type=int, default=0,
                    help="independent one-population sweeps at each N of --sweep-at")
    ap.add_argument("--sweep-at", help="comma-separated population sizes for --sweeps")
    args = ap.parse_args(argv)
    threads = os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count()))
    Ns = sorted(int(x) for x in
                (args.samples or ("2000" if args.quick else f"64000,{TARGET_N}")).split(","))
    spread_at = ({int(x) for x in args.spread_at.split(",")} if args.spread_at else {Ns[0]})
    variants = [("plain", PLAIN)] * args.plain + [("default", DEFAULT)]
    mode = dict(errors=args.errors)

    # compile (or load) every kernel on a tiny problem
    for _, opts in variants:
        for _ in dc.stream(config(64, True).copy(T=0.2), **opts):
            pass
        for _ in dc.stream(config(256, True).copy(T=0.2), errors="batches", batches=2, **opts):
            pass

    heads = []
    for name, opts in variants:
        for N in Ns:
            exp = config(N, args.quick)
            snap, wall, cpu, first = engine(exp, {**opts, **mode})
            mem = peak_mb()
            how = dc.errors_for(N, args.errors)
            if how == "batches":
                sizes = dc.batch_plan(N)
                plan = f"batches {len(sizes)} x {sizes[0]}"
                nt = math.ceil(dc.batch_tangent_fraction(sizes[0]) * sizes[0] / dc.BLOCK) * dc.BLOCK
                nt = min(sizes[0], nt)
                ntraj = sum(sizes)
                sampling = dc.sampling_for(sizes[0], opts["init_sampling"])
            else:
                sizes = dc.replica_plan(N)
                plan = f"main + {len(sizes) - 1} x {sizes[-1]} replicas"
                nt = min(N, math.ceil(dc.tangent_fraction_for(N) * N / dc.BLOCK) * dc.BLOCK)
                ntraj = sum(sizes)
                sampling = dc.sampling_for(N, opts["init_sampling"])
            eg, se = snap.values["test_error"], snap.se["test_error"]
            rel = se / eg
            h = dict(name=name, N=N, plan=plan, nt=nt, ntraj=ntraj, sampling=sampling,
                     wall=wall, cpu=cpu, first=first, mem=mem, snap=snap, rel=rel,
                     need=N * (rel / 1e-3) ** 2, wall_need=wall * (rel / 1e-3) ** 2,
                     cpu_need=cpu * (rel / 1e-3) ** 2)
            print(f"{name} N={N} ({plan}, {sampling}): engine {wall:.1f} s wall, {cpu:.1f} s "
                  f"cpu, first snapshot {1e3 * first:.0f} ms, peak RSS {mem:.0f} MB; eg(T) = "
                  f"{eg:.6f} +- {se:.6f} ({100 * rel:.3f}%), 0.1% needs N ~ {h['need']:.3g} "
                  f"(~{h['wall_need']:.0f} s wall, {h['cpu_need']:.0f} s cpu at this rate); load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
            if N in spread_at and args.engine_seeds >= 2:
                runs = [engine(config(N, args.quick, seed=s), {**opts, **mode})[0]
                        for s in range(1, args.engine_seeds + 1)] + [snap]
                egs = np.array([r.values["test_error"] for r in runs])
                ses = np.array([r.se["test_error"] for r in runs])
                sd = float(np.std(egs, ddof=1))
                h["spread"] = (sd, len(runs), float(np.mean(egs)), float(np.sqrt(np.mean(ses ** 2))))
                print(f"{name} N={N}: spread of eg(T) over {len(runs)} engine runs {sd:.6f} "
                      f"({100 * sd / np.mean(egs):.3f}%), rms reported se "
                      f"{h['spread'][3]:.6f}; means {np.round(egs, 6).tolist()}", flush=True)
            heads.append(h)
    sweeps = []
    if args.sweeps >= 2 and args.sweep_at:
        for n in sorted(int(x) for x in args.sweep_at.split(",")):
            runs = [sweep(config(n, args.quick, seed=1000 + s)) for s in range(args.sweeps)]
            egs = np.array([r[0]["test_error"] for r in runs])
            sweeps.append((n, len(runs), float(np.mean(egs)), float(np.std(egs, ddof=1)),
                           float(np.mean([r[2] for r in runs]))))
            print("sweeps n={}: {} runs, eg mean {:.6f}, sd {:.6f}, {:.1f} s cpu each".format(
                *sweeps[-1]), flush=True)
    table = render(config(Ns[0], args.quick), heads, threads, sweeps, args)
    print(table)
    if not args.no_write and not args.quick:
        write_doc(table)


def render(exp, heads, threads, sweeps=(), args=None):
    cmd = "NUMBA_NUM_THREADS=2 python benchmarks/committee.py" + (
        " " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} "
             f"({os.cpu_count()} cores, NUMBA_NUM_THREADS={threads}, load average "
             f"{os.getloadavg()[0]:.1f} at the end), `{cmd}`: k = k* = "
             f"2, erf, rho = I, q0 = 0.1, m0 = 0.2, tau = {exp.tau}, delta = {exp.delta}, "
             f"lambda = 0, T = {exp.T}, dt = {exp.dt} (K = {exp.steps}). One engine run per row "
             "(`committee.stream` as the dashboard calls it, snapshots and kernels extra). "
             "Errors: *batches* = r independent populations of N/r, values their mean, se "
             "their sd / sqrt(r) (`errors='batches'`, the default from "
             f"N = {dc.BATCH_MIN_SAMPLES}); *replicas* = main population + rescaled replica "
             "spread. Estimators: *default* = the engine's (kappa "
             f"'{dc.KAPPA_ESTIMATOR}', sampling '{dc.SAMPLING}': quasi-random 'qmc_steps' "
             f"for populations of {dc.QMC_MIN_SAMPLES} to {dc.QMC_MAX_SAMPLES}), *plain* = "
             "'stein', 'mc'. N_t: trajectories of each population that carry the tangent. "
             "Peak RSS: largest so far in the process (runs in increasing N). For 0.1%: "
             "`N (se/0.1%)^2` and the wall/CPU time at this run's rate (the se of eg falls like "
             "1/sqrt(N) with the number of populations of a fixed size). Batch means and their "
             "bias: docs/committee.md, \"Batch means\".",
             "",
             "| estimators | N | errors | sampling | N_t | engine wall (s) | engine CPU (s) "
             "| first snapshot (ms) | peak RSS (MB) | eg at T | se (%) | N for se = 0.1% "
             "| wall for 0.1% (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in heads:
        sn = h["snap"]
        lines.append(f"| {h['name']} | {h['N']} | {h['plan']} | {h['sampling']} | {h['nt']} | "
                     f"{h['wall']:.1f} | {h['cpu']:.1f} | {1e3 * h['first']:.0f} | "
                     f"{h['mem']:.0f} | {sn.values['test_error']:.6f} +- "
                     f"{sn.se['test_error']:.6f} | {100 * h['rel']:.3f} | {h['need']:.3g} | "
                     f"{h['wall_need']:.0f} |")
    last = heads[-1]["snap"]
    lines += ["", f"At T ({heads[-1]['name']}, N = {heads[-1]['N']}): " + ", ".join(
        f"{k} {last.values[k]:.5f} +- {last.se[k]:.5f}" for k in ("train_loss", "m", "Q", "M_0_1"))
        + "."]
    spread = [h for h in heads if "spread" in h]
    if spread:
        lines += ["", "Spread of eg(T) over independent engine runs (seeds 0..S) against the "
                  "rms of their reported se (equal in expectation if the se is honest; the "
                  "ratio of variances follows F(S, (S + 1) (r - 1)) for r populations):", "",
                  "| estimators | N | runs | eg (mean) | sd of eg (%) | rms se (%) |",
                  "|---|---|---|---|---|---|"]
        for h in spread:
            sd, S, mean, rse = h["spread"]
            lines.append(f"| {h['name']} | {h['N']} | {S} | {mean:.6f} | {100 * sd / mean:.3f} "
                         f"| {100 * rse / mean:.3f} |")
    if sweeps:
        lines += ["", "Independent one-population sweeps (default estimators; mean and sd of "
                  "eg(T), sd sqrt(n)/eg is constant under a 1/n variance law):", "",
                  "| n | sweeps | eg (mean) | sd of eg (%) | sd sqrt(n)/eg | CPU per sweep (s) |",
                  "|---|---|---|---|---|---|"]
        for n, S, mean, sd, csw in sweeps:
            lines.append(f"| {n} | {S} | {mean:.6f} +- {sd / math.sqrt(S):.6f} | "
                         f"{100 * sd / mean:.3f} | {sd / mean * math.sqrt(n):.2f} | {csw:.1f} |")
    return "\n".join(lines)


def write_doc(table):
    write_block("committee", table, section=SECTION)


if __name__ == "__main__":
    main()
