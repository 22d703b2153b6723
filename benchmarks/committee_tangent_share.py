"""Tangent share of the committee Monte Carlo DMFT: paired bias, extra variance and CPU
(issue #5; solver/dmft/committee.py, TANGENT_DIVISOR / BATCH_SIZE).

Run (from anywhere; writes raw JSON lines under --out, default benchmarks/data/tangent_share):
    python benchmarks/committee_tangent_share.py [--quick] [--seeds A] [--seeds-b B] [--workers 2]
                                              [--stop-at HH:MM] [--analyze] [--timing]
This session's data: --seeds 260 --seeds-b 100 (stopped at 01:45 UTC; 2 workers on a loaded
2-core machine, ~1.2 cores: about 7 jobs per minute at best). --timing: CPU ratios only with the
current kernels (6 + 4 jobs, about 1-2 min on 2 quiet cores), combined with data/'s variances.

Each job = one seed, one population size n, several tangent fractions f run one after the other
in the same worker process (alternating order): ``Population(exp, n,
SeedSequence(seed), tangent_fraction=f, init_sampling='qmc_steps', hist_dtype=float32)`` on the
benchmark configuration (benchmarks/committee.py ``config``: k = k* = 2, erf, tau = 0.5,
delta = 2, T = 10, dt = 0.05). Every random draw (initial normals, per-step Sobol sets and
permutations) comes from the population's generator independently of f, so the runs of one job
share all draws (checked: hash of the stored normals z and of dW); the tangent runs on the first
ceil(f n / 64) blocks (a subset of the larger fraction's). eg(T) from ``committee._observables``.
Set A: n = 16000, f = 1/4, 1/8, 1/16 (N_t = 4032, 2048, 1024). Set B: n = 32000, f = 1/8, 1/16
(N_t = 4032, 2048). Workers: separate processes, NUMBA_NUM_THREADS=1 each, nice +5; CPU time per
run is time.process_time of the worker (after a warm-up compile). Jobs already in the output are
skipped (resumable); --stop-at stops starting new jobs after that UTC time.
--analyze: only the analysis of what is in --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN = HERE.parent  # the repository (this file is benchmarks/committee_tangent_share.py)
A_FRACS = (0.25, 0.125, 0.0625)
B_FRACS = (0.125, 0.0625)


def plan(seeds_a, seeds_b, n_a, n_b, seed0):
    """Jobs interleaved A, A, B, ... so that partial data stay balanced."""
    a = [("A", n_a, seed0 + i, A_FRACS) for i in range(seeds_a)]
    b = [("B", n_b, seed0 + 100000 + i, B_FRACS) for i in range(seeds_b)]
    jobs = []
    while a or b:
        for _ in range(2):
            if a:
                jobs.append(a.pop(0))
        if b:
            jobs.append(b.pop(0))
    return jobs


def done_keys(out):
    keys = set()
    for f in Path(out).glob("runs_*.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                keys.add((r["set"], r["n"], r["seed"], r["T"], r["frac"]))
    return keys


def worker(args):
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    sys.path.insert(0, str(MAIN))
    sys.path.insert(0, str(MAIN / "benchmarks"))
    import numba
    import numpy as np
    from committee import config  # benchmarks/committee.py
    from solver.dmft import committee as dc

    numba.set_num_threads(1)
    src = (MAIN / "solver/dmft/committee.py").read_bytes()
    sha = hashlib.sha1(src).hexdigest()[:10]

    def run(exp, n, seed, f):
        c0, w0 = time.process_time(), time.perf_counter()
        p = dc.Population(exp, n, np.random.SeedSequence(seed), tangent_fraction=f,
                          init_sampling="qmc_steps", hist_dtype=np.float32)
        for s in range(exp.steps + 1):
            p.step(s)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        obs = dc._observables(exp, [p], exp.steps)
        hz = hashlib.sha1(p.z.tobytes()).hexdigest()[:12]
        hw = hashlib.sha1(p.dW.tobytes()).hexdigest()[:12]
        return dict(eg=float(obs["test_error"][0]), m=float(obs["m"][0]), Q=float(obs["Q"][0]),
                    train=float(p.train[exp.steps]), n_tangent=int(p.n_tangent),
                    cpu=cpu, wall=wall, zhash=hz, dwhash=hw)

    # warm-up: compile / load every kernel before timing
    for f in (0.25, 0.125):
        run(config(256, True).copy(T=0.2), 256, 1, f)
    jobs = plan(args.seeds, args.seeds_b, args.n_a, args.n_b, args.seed0)
    have = done_keys(args.out)
    T = 3.0 if args.quick else 10.0
    outf = Path(args.out) / f"runs_{args.worker}.jsonl"
    for j, (name, n, seed, fracs) in enumerate(jobs):
        if j % args.workers != args.worker:
            continue
        if all((name, n, seed, T, f) in have for f in fracs):
            continue
        if args.stop_at and _dt.datetime.utcnow().strftime("%H:%M") >= args.stop_at:
            print(f"worker {args.worker}: stop time reached", flush=True)
            break
        exp = config(n, args.quick, seed=seed)
        k = seed % len(fracs)
        order = fracs[k:] + fracs[:k]  # alternate which fraction runs first
        recs = []
        for f in order:
            r = run(exp, n, seed, f)
            recs.append(dict(set=name, n=n, seed=seed, T=exp.T, frac=f, order=order.index(f),
                             sha=sha, load=os.getloadavg()[0],
                             utc=_dt.datetime.utcnow().strftime("%H:%M:%S"), **r))
        with open(outf, "a") as fh:  # a job's runs land together (paired)
            for r in recs:
                fh.write(json.dumps(r) + "\n")
        print(f"worker {args.worker}: {name} n={n} seed={seed} " + " ".join(
            f"f={r['frac']:g} eg={r['eg']:.7f} cpu={r['cpu']:.2f}" for r in recs), flush=True)


# ------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------
def analyze(out, quick=False, target=1e-3, nboot=2000):
    import numpy as np

    T = 3.0 if quick else 10.0
    rows = []
    for f in sorted(Path(out).glob("runs_*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["T"] == T]
    rng = np.random.default_rng(12345)
    report = {}
    lines = []
    for name, fracs in (("A", A_FRACS), ("B", B_FRACS)):
        by = {}
        for r in rows:
            if r["set"] == name:
                by.setdefault(r["seed"], {})[r["frac"]] = r
        seeds = sorted(s for s, d in by.items() if all(f in d for f in fracs))
        if len(seeds) < 3:
            continue
        n = by[seeds[0]][fracs[0]]["n"]
        E = np.array([[by[s][f]["eg"] for f in fracs] for s in seeds])  # seeds x fracs
        C = np.array([[by[s][f]["cpu"] for f in fracs] for s in seeds])
        nt = np.array([by[seeds[0]][f]["n_tangent"] for f in fracs], float)
        same_z = all(len({by[s][f]["zhash"] for f in fracs}) == 1
                     and len({by[s][f]["dwhash"] for f in fracs}) == 1 for s in seeds)
        shas = sorted({by[s][f]["sha"] for s in seeds for f in fracs})
        S = len(seeds)
        mu = E.mean()
        lines.append(f"set {name}: n = {n}, {S} paired seeds, fractions {fracs} (N_t "
                     f"{nt.astype(int).tolist()}), identical draws across fractions: {same_z}; "
                     f"committee.py sha {shas}")
        lines.append(f"  mean eg: " + ", ".join(
            f"f={f:g}: {E[:, i].mean():.7f} +- {E[:, i].std(ddof=1) / math.sqrt(S):.7f}"
            for i, f in enumerate(fracs)))
        ref = 0
        res = dict(n=n, seeds=S, fracs=fracs, nt=nt.tolist(), same_draws=same_z, mean=mu)
        # paired differences against the first fraction
        for i in range(1, len(fracs)):
            d = E[:, i] - E[:, ref]
            m, se = d.mean(), d.std(ddof=1) / math.sqrt(S)
            res[f"d_{fracs[i]:g}"] = (m / mu, se / mu, d.std(ddof=1) / mu)
            lines.append(f"  eg(f={fracs[i]:g}) - eg(f={fracs[ref]:g}): mean {100 * m / mu:+.4f}% "
                         f"+- {100 * se / mu:.4f}% (t = {m / se:+.2f}), sd of the paired "
                         f"difference {100 * d.std(ddof=1) / mu:.4f}% "
                         f"(sd of eg itself {100 * E[:, ref].std(ddof=1) / mu:.4f}%)")
        # slope in 1/N_t, per seed (fixed seed effect): eg = a_seed + c / N_t
        x = 1.0 / nt
        xc = x - x.mean()
        ci = (E - E.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
        c, cse = ci.mean(), ci.std(ddof=1) / math.sqrt(S)
        res["c_rel"] = (c / mu, cse / mu)
        lines.append(f"  fit eg = a + c/N_t (per-seed slopes): c/eg = {c / mu:+.3f} +- "
                     f"{cse / mu:.3f}; G-noise bias vs a full tangent (c (1/N_t - 1/n)): " + ", ".join(
                         f"f={f:g}: {100 * c * (1 / nt[i] - 1 / n) / mu:+.4f}% +- "
                         f"{100 * cse * (1 / nt[i] - 1 / n) / mu:.4f}%" for i, f in enumerate(fracs)))
        # nested tangent subsets: G's noise is a mean over N_t, subsets of each other, so its
        # covariance is sigma^2 min(1/N_t, 1/N_t') (Brownian in x = 1/N_t): the efficient slope
        # is the end-point difference (GLS), its variance sigma^2 / (x_max - x_min)
        de = E[:, -1] - E[:, 0]
        cg, cgse = de.mean() / (x[-1] - x[0]), de.std(ddof=1) / math.sqrt(S) / (x[-1] - x[0])
        res["c_gls"] = (cg / mu, cgse / mu)
        lines.append(f"  GLS (end points): c/eg = {cg / mu:+.3f} +- {cgse / mu:.3f}; bias c/N_t "
                     "(vs exact G): " + ", ".join(
                         f"f={f:g}: {100 * cg / nt[i] / mu:+.4f}% +- {100 * cgse / nt[i] / mu:.4f}%"
                         for i, f in enumerate(fracs)))
        for i in range(1, len(fracs)):
            d = E[:, i] - E[:, 0]
            cv = np.cov(E[:, 0], d)[0, 1]
            lines.append(f"  f={fracs[i]:g}: var(d)/var(eg_ref) {d.var(ddof=1) / E[:, 0].var(ddof=1):.3f}, "
                         f"2 cov(eg_ref, d)/var(eg_ref) {2 * cv / E[:, 0].var(ddof=1):+.3f}; var(d) per "
                         f"(x - x_ref): {d.var(ddof=1) / (x[i] - x[0]) / mu ** 2:.3f} (eg^2 units)")
        if len(fracs) == 3:
            # curvature check: residual of the middle point from the line through the ends
            w = (x[1] - x[0]) / (x[2] - x[0])
            r3 = E[:, 1] - ((1 - w) * E[:, 0] + w * E[:, 2])
            lines.append(f"  linearity in 1/N_t: middle point off the line by "
                         f"{100 * r3.mean() / mu:+.4f}% +- {100 * r3.std(ddof=1) / math.sqrt(S) / mu:.4f}%")
        # variances and efficiencies, with paired bootstrap intervals
        V = E.var(axis=0, ddof=1)
        idx = rng.integers(0, S, size=(nboot, S))
        Vb = np.array([E[i].var(axis=0, ddof=1) for i in idx])
        eff = np.sqrt(V * n) / mu
        cpu = C.mean(axis=0)
        cpu_ratio = (C / C[:, [ref]]).mean(axis=0)
        cr_se = (C / C[:, [ref]]).std(axis=0, ddof=1) / math.sqrt(S)
        res.update(V=V.tolist(), eff=eff.tolist(), cpu=cpu.tolist(), cpu_ratio=cpu_ratio.tolist())
        D = E - E[:, [ref]]
        Vm = V[ref] + D.var(axis=0, ddof=1)  # nested model: cov(eg_ref, d) = 0
        Vmb = np.array([E[i][:, ref].var(ddof=1) + D[i].var(axis=0, ddof=1) for i in idx])
        res.update(Vmodel=Vm.tolist(), cpu_per_traj=(cpu / n).tolist())
        for i, f in enumerate(fracs):
            rm = Vm[i] / V[ref]
            lo, hi = np.nanpercentile(Vmb[:, i] / Vb[:, ref], [5, 95])
            if i:
                lines.append(f"  f={f:g}: var ratio (nested model, 1 + var(d)/var(eg_ref)) {rm:.3f} "
                             f"[90%: {lo:.3f}-{hi:.3f}], eff {math.sqrt(Vm[i] * n) / mu:.3f}")
        for i, f in enumerate(fracs):
            ratio = V[i] / V[ref]
            lo, hi = np.nanpercentile(Vb[:, i] / Vb[:, ref], [5, 95])
            elo, ehi = np.nanpercentile(np.sqrt(Vb[:, i] * n) / mu, [5, 95])
            # CPU s for a 0.1% se: N = (eff/target)^2 trajectories at cpu/n per trajectory
            Nn = (eff[i] / target) ** 2
            lines.append(f"  f={f:g}: sd(eg) {100 * math.sqrt(V[i]) / mu:.4f}%, sd sqrt(n)/eg "
                         f"{eff[i]:.3f} [90%: {elo:.3f}-{ehi:.3f}], var ratio vs f={fracs[ref]:g} "
                         f"{ratio:.3f} [90%: {lo:.3f}-{hi:.3f}]; CPU/population {cpu[i]:.2f} s "
                         f"(ratio {cpu_ratio[i]:.3f} +- {cr_se[i]:.3f}); 0.1% se needs N "
                         f"{Nn:.3g}, {Nn * cpu[i] / n:.0f} CPU s at this rate")
        for sh in shas:  # CPU per kernel version (the kernels changed during the runs)
            ok = [j for j, sd in enumerate(seeds) if by[sd][fracs[0]]["sha"] == sh]
            if len(ok) >= 2:
                cr = (C[ok] / C[ok][:, [ref]])
                lines.append(f"  committee.py {sh}: {len(ok)} jobs, CPU/population " + ", ".join(
                    f"f={f:g}: {C[ok, i].mean():.2f} s (ratio {cr[:, i].mean():.3f} +- "
                    f"{cr[:, i].std(ddof=1) / math.sqrt(len(ok)):.3f}, {1e3 * C[ok, i].mean() / n:.4f} ms "
                    f"per trajectory)" for i, f in enumerate(fracs)))
                res.setdefault("cpu_by_sha", {})[sh] = C[ok].mean(axis=0).tolist()
        report[name] = res
    print("\n".join(lines))
    (Path(out) / "analysis.txt").write_text("\n".join(lines) + "\n")
    (Path(out) / "analysis.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 3, 4+2 seeds, n = 4000/8000")
    ap.add_argument("--seeds", type=int, default=100, help="seeds of set A (n = 16000)")
    ap.add_argument("--seeds-b", type=int, default=50, help="seeds of set B (n = 32000)")
    ap.add_argument("--n-a", type=int, default=16000)
    ap.add_argument("--n-b", type=int, default=32000)
    ap.add_argument("--seed0", type=int, default=7000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--stop-at", default="", help="UTC HH:MM: start no job after it")
    ap.add_argument("--out", default=str(HERE / "data" / "tangent_share"))
    ap.add_argument("--analyze", action="store_true", help="only analyse --out")
    ap.add_argument("--timing", action="store_true",
                    help="CPU ratios only: 8 set-A jobs (n = 16000) into data_timing/ (fresh), "
                    "combined with the variance ratios of data/analysis.json")
    args = ap.parse_args(argv)
    if args.timing:
        args.seeds, args.seeds_b, args.seed0 = 6, 4, 900000
        args.out = str(HERE / "data" / "tangent_share_timing")
        if args.worker < 0 and not args.analyze:
            for f in Path(args.out).glob("*"):
                f.unlink()
    if args.quick:
        args.seeds, args.seeds_b = min(args.seeds, 4), min(args.seeds_b, 2)
        args.n_a, args.n_b = 4000, 8000
        if args.out == str(HERE / "data" / "tangent_share"):
            args.out = str(HERE / "data" / "tangent_share_quick")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker >= 0:
        return worker(args)
    if not args.analyze:
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        procs = []
        for w in range(args.workers):
            cmd = ["nice", "-n", "5", str(MAIN / ".venv/bin/python"), __file__, "--worker",
                   str(w)] + [a for a in (argv if argv is not None else sys.argv[1:])]
            log = open(Path(args.out) / f"worker_{w}.log", "a")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait()
    rep = analyze(args.out, args.quick)
    if args.timing and "A" in rep and (HERE / "data" / "tangent_share" / "analysis.json").exists():
        stat = json.loads((HERE / "data" / "tangent_share" / "analysis.json").read_text())["A"]
        a = rep["A"]
        print("CPU for a 0.1% se relative to f = 1/4 (this run's CPU ratio x the variance ratio "
              "of data/, nested model):")
        for i, f in enumerate(a["fracs"]):
            vr = stat["Vmodel"][i] / stat["V"][0]
            print(f"  n=16000 f={f:g}: CPU ratio {a['cpu_ratio'][i]:.3f} x variance ratio "
                  f"{vr:.3f} = {a['cpu_ratio'][i] * vr:.3f}")
        if "B" in rep and "B" in json.loads((HERE / "data" / "tangent_share" / "analysis.json").read_text()):
            sb, b = json.loads((HERE / "data" / "tangent_share" / "analysis.json").read_text())["B"], rep["B"]
            for i, f in enumerate(b["fracs"]):
                cr = b["cpu_per_traj"][i] / a["cpu_per_traj"][0]
                vr = (sb["Vmodel"][i] * sb["n"]) / (stat["V"][0] * stat["n"])  # per trajectory
                print(f"  n=32000 f={f:g}: CPU per trajectory ratio {cr:.3f} (separate jobs) x "
                      f"variance-per-trajectory ratio {vr:.3f} (unpaired) = {cr * vr:.3f}")


if __name__ == "__main__":
    main()
