"""Validation matrix: DMFT against finite-size simulation, and the DMFT methods against each other.

Run ``.venv/bin/python docs/validate.py`` (options: ``--quick`` for the lean sizes of
tests/test_validation.py). Writes one PNG per case into ``docs/figures/`` and the table
``docs/validation.md`` (largest |z| per case and observable, and the command used).

Cases (THEORY.md 5.4: the grid system is the exact large-d limit of the Euler-Maruyama SGF at the
same dt, and of full-batch GD at tau = 0, so theory and simulation use the same dt):

* matrix: {linear regression (square loss, linear teacher, noise 0.5), logistic regression
  (logistic loss, sign teacher)} x tau in {0, 0.5, 2} x delta in {0.5, 2}; DMFT ``method='auto'``
  (exact for square loss, mc for logistic) against ``solver.simulate`` (``algo='sgf'``, ``'gd'`` at
  tau = 0);
* ``mc_vs_exact``: square loss, tau = 1, delta = 2;
* ``online_vs_mc``: logistic, delta = 50, T = 1: the online ODEs are the delta -> infinity limit,
  the gap is O(1/delta) (docs/theory_deterministic.md), so the online curve is compared with the
  Richardson extrapolation ``2 mc(50) - mc(25)`` (error O(1/delta^2));
* refinement: doubling N moves the mc curves by less than 3 combined se; halving dt is a real
  O(dt) change of the target, so the check is that the changes halve: ``f(dt) - f(dt/2)`` against
  ``2 (f(dt/2) - f(dt/4))`` (Richardson; the residual is O(dt^2)).

Test: ``|DMFT - sim| <= 3 sqrt(se_dmft^2 + se_sim^2) + FS/d max(1, |sim|)`` at every recorded
time, with the finite-size allowance ``FS = 2`` for the O(1/d) bias (as in
tests/test_dmft_mc.py: 0.2% at d = 1000). The reported z is ``|DMFT - sim| / combined se``,
without the allowance.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from solver import dmft, simulate  # noqa: E402
from solver.config import Experiment  # noqa: E402

FS = 2.0  # finite-size allowance FS/d * max(1, |value|)
Z = 3.0   # combined standard errors

MODELS = {
    "linear": dict(loss="square", teacher="linear", noise=0.5),
    "logistic": dict(loss="logistic", teacher="sign", flip=0.0),
}
TAUS = (0.0, 0.5, 2.0)
DELTAS = (0.5, 2.0)
MATRIX = [(m, tau, delta) for m in MODELS for tau in TAUS for delta in DELTAS]


def obs_names(exp):
    base = ["train_loss", "test_loss", "m", "Q"]
    if exp.teacher == "sign":
        base.insert(2, "test_error")
    return base


def case_name(model, tau, delta):
    return f"{model}_tau{tau:g}_delta{delta:g}"


def dt_for(tau, dt, dt_hot):
    """tau = 2 runs at the smaller step dt_hot: at dt = 0.05 the Euler-Maruyama recursion of the
    square loss at delta = 0.5 is past its mean-square stability edge (exact DMFT Q(t) = 1.7, 2.6,
    4.0, 6.3, 10.0 at t = 2..10, growing geometrically, while the simulated seeds stay near 1 with
    rare huge outliers); at dt = 0.02 it grows slowly, at 0.0125 it saturates. Even there the
    simulated seeds at d = 1000 are heavy-tailed (32 seeds: bulk Q(3) = 0.57-0.97 below the DMFT
    1.29, one seed at 32): see docs/validation.md."""
    return dt_hot if tau >= 2 else dt


def make_exp(model, tau, delta, *, T, dt, N, d, seeds, rec_dt, dt_hot=0.0125, seed=0):
    dt = dt_for(tau, dt, dt_hot)
    return Experiment(**MODELS[model], tau=tau, delta=delta, lam=0.05, q0=0.0, m0=0.0, T=T,
                      dt=dt, samples=N, d=d, seeds=seeds,
                      record_every=max(1, int(round(rec_dt / dt))),
                      algo="gd" if tau == 0 else "sgf", method="auto", seed=seed)


def zscores(a, b, names, allowance=0.0):
    """{obs: (max |z| over t > 0, ok)} for Results a, b (same recording times)."""
    out = {}
    for k in names:
        va, sa = getattr(a, k), a.se[k]
        vb, sb = getattr(b, k), b.se[k]
        se = np.sqrt(sa ** 2 + sb ** 2)
        diff = np.abs(va - vb)
        tol = Z * se + allowance * np.maximum(1.0, np.abs(vb))
        z = diff / np.maximum(se, 1e-300)
        out[k] = (float(np.max(z[1:])), bool(np.all(diff[1:] <= tol[1:] + 1e-12)))
    return out


def run_matrix_case(model, tau, delta, **size):
    exp = make_exp(model, tau, delta, **size)
    t0 = time.perf_counter()
    th = dmft.solve(exp)
    t1 = time.perf_counter()
    sim = simulate.run(exp)
    t2 = time.perf_counter()
    assert np.allclose(th.t, sim.t), "recording times differ"
    z = zscores(th, sim, obs_names(exp), FS / exp.d)
    return dict(exp=exp, theory=th, sim=sim, z=z, t_theory=t1 - t0, t_sim=t2 - t1)


def mc_vs_exact(T, dt, N, record_every):
    exp = Experiment(**MODELS["linear"], tau=1.0, delta=2.0, lam=0.05, T=T, dt=dt, samples=N,
                     record_every=record_every, seed=3)
    ex = dmft.solve(exp.copy(method="exact"))
    mc = dmft.solve(exp.copy(method="mc"))
    return dict(exp=exp, theory=ex, other=mc, z=zscores(mc, ex, obs_names(exp)))


class _Combo:
    """A linear combination of Results (values and independent se) with Result-like access."""

    def __init__(self, parts, names):
        self.t = parts[0][1].t
        self.se = {}
        for k in names:
            setattr(self, k, sum(c * getattr(r, k) for c, r in parts))
            self.se[k] = np.sqrt(sum((c * r.se[k]) ** 2 for c, r in parts))


def online_vs_mc(T, dt, N, record_every, delta=50.0):
    exp = Experiment(**MODELS["logistic"], tau=0.5, delta=delta, lam=0.05, T=T, dt=dt, samples=N,
                     record_every=record_every, seed=5)
    names = obs_names(exp)
    from solver.dmft import glm

    on = dmft.solve(exp.copy(method="online"))
    # 32 replicas instead of the default 8: the check is a maximum of |z| over ~25 correlated
    # points, and with an 8-replica se (Student t, 7 degrees of freedom: P(|t| > 3) = 2 %) it
    # failed by chance for 2 of 12 seeds measured (max |z| 3.2 and 4.8, no bias: the others
    # 1.0-2.5); the replicas are cheap at T = 1
    mc = glm.solve(exp.copy(method="mc"), replicas=32)
    mc2 = glm.solve(exp.copy(method="mc", delta=delta / 2, seed=6), replicas=32)
    extrap = _Combo([(2.0, mc), (-1.0, mc2)], names)
    return dict(exp=exp, theory=on, other=mc, other2=mc2, extrap=extrap,
                z_direct=zscores(mc, on, names), z=zscores(extrap, on, names))


#: Matrix case whose simulated seeds are heavy-tailed at d = 1000-2000: its sample means of the
#: quadratic observables (train/test loss, Q) are not Gaussian-distributed estimates of the mean
#: (bulk of the seeds below the DMFT, rare huge excursions above); only m is compared to the
#: simulation in the test, the rest against the exact finite-d expectation (finite_d_limit).
HEAVY = ("linear", 2.0, 0.5)


def finite_d_limit(model, tau, delta, *, T, dt, rec_dt, d=(250, 500), sets=2, dt_hot=0.0125):
    """Exact finite-d expectation of the Euler-Maruyama SGF (solver.finite_exact, square loss,
    no sampling of dW) at d and 2d, extrapolated in 1/d (2 f(2d) - f(d), error O(1/d^2)),
    against the exact DMFT at the same dt."""
    from solver import finite_exact

    exp = make_exp(model, tau, delta, T=T, dt=dt, N=1000, d=d[0], seeds=1, rec_dt=rec_dt,
                   dt_hot=dt_hot)
    th = dmft.solve(exp)
    fa = finite_exact.solve(exp, d=d[0], sets=sets, seed=31)
    fb = finite_exact.solve(exp, d=d[1], sets=sets, seed=32)
    names = obs_names(exp)
    extrap = _Combo([(2.0, fb), (-1.0, fa)], names)
    return dict(exp=exp, theory=th, fa=fa, fb=fb, extrap=extrap, z=zscores(extrap, th, names))


def refine_N(model, tau, delta, T, dt, N, rec_dt):
    exp = make_exp(model, tau, delta, T=T, dt=dt, N=N, d=1000, seeds=1, rec_dt=rec_dt, dt_hot=dt)
    exp = exp.copy(method="mc", seed=11)
    a = dmft.solve(exp)
    b = dmft.solve(exp.copy(samples=2 * N, seed=12))
    return dict(exp=exp, theory=a, other=b, z=zscores(a, b, obs_names(exp)))


def refine_dt(model, tau, delta, T, dt, N, method="auto"):
    """f(dt) - f(dt/2) against 2 (f(dt/2) - f(dt/4)) at the common times (every dt)."""
    exp = make_exp(model, tau, delta, T=T, dt=dt, N=N, d=1000, seeds=1, rec_dt=dt, dt_hot=dt)
    exp = exp.copy(method=method, seed=21)
    names = obs_names(exp)
    rs = [dmft.solve(exp.copy(dt=dt / 2 ** i, record_every=2 ** i, seed=21 + i)) for i in range(3)]
    d1 = _Combo([(1.0, rs[0]), (-1.0, rs[1])], names)
    d2 = _Combo([(2.0, rs[1]), (-2.0, rs[2])], names)
    det = all(np.all(r.se[k] == 0) for r in rs for k in names)
    out = {}
    for k in names:
        a, b = getattr(d1, k), getattr(d2, k)
        se = np.sqrt(d1.se[k] ** 2 + d2.se[k] ** 2)
        out[k] = dict(change=float(np.max(np.abs(a))), expected=float(np.max(np.abs(b))),
                      resid=float(np.max(np.abs(a - b))),
                      z=float(np.max(np.abs(a - b)[1:] / np.maximum(se[1:], 1e-300))) if not det
                      else math.nan)
    return dict(exp=exp, runs=rs, d1=d1, d2=d2, stats=out, deterministic=det)


# ----------------------------------------------------------------------------------------------
# figures and table
# ----------------------------------------------------------------------------------------------
def figure(path, title, names, theory, sim=None, others=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0))
    for ax, k in zip(axes, names):
        t, v, se = theory.t, getattr(theory, k), theory.se[k]
        ax.plot(t, v, "C0-", lw=1.5, label=getattr(theory, "engine", "theory") or "theory")
        ax.fill_between(t, v - se, v + se, color="C0", alpha=0.3, lw=0)
        for i, (lab, r) in enumerate(others):
            ov, os_ = getattr(r, k), r.se[k]
            ax.plot(r.t, ov, f"C{2 + i}--", lw=1.2, label=lab)
            ax.fill_between(r.t, ov - os_, ov + os_, color=f"C{2 + i}", alpha=0.25, lw=0)
        if sim is not None:
            ax.errorbar(sim.t, getattr(sim, k), yerr=sim.se[k], fmt="o", ms=3, color="C1",
                        capsize=2, label=f"simulation ({sim.engine}, mean +- se)")
        ax.set_title(k)
        ax.set_xlabel("t")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="lean sizes (as the test)")
    args = ap.parse_args(argv)
    if args.quick:
        size = dict(T=3.0, dt=0.05, dt_hot=0.0125, N=4000, d=1000, seeds=32, rec_dt=0.3)
    else:
        size = dict(T=4.0, dt=0.05, dt_hot=0.0125, N=8000, d=2000, seeds=16, rec_dt=0.25)
    figdir = ROOT / "docs" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    cmd = "NUMBA_NUM_THREADS=2 .venv/bin/python docs/validate.py" + (" --quick" if args.quick else "")
    lines = ["# Validation matrix", "",
             f"Generated by `{cmd}` (docs/validate.py; its docstring states the method). "
             f"Matrix sizes: T = {size['T']}, dt = {size['dt']} ({size['dt_hot']} at tau = 2), DMFT N = {size['N']}, simulation "
             f"d = {size['d']}, {size['seeds']} seeds (independent data sets), lam = 0.05, "
             "theta(0) = 0, linear teacher noise 0.5, sign teacher without flips.", "",
             f"Pass: |DMFT - sim| <= {Z:g} sqrt(se_dmft^2 + se_sim^2) + {FS:g}/d max(1, |sim|) at every "
             "recorded time t > 0 (FS/d: allowance for the O(1/d) finite-size bias). Entries: "
             "max over t > 0 of |z| = |DMFT - sim| / combined se (no allowance); `*` marks a "
             "failure.", "",
             "| case | DMFT | sim | train_loss | test_loss | test_error | m | Q | time DMFT / sim (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    allok = True
    heavy = None
    for model, tau, delta in MATRIX:
        r = run_matrix_case(model, tau, delta, **size)
        name = case_name(model, tau, delta)
        cells = []
        for k in ("train_loss", "test_loss", "test_error", "m", "Q"):
            if k in r["z"]:
                z, ok = r["z"][k]
                allok &= ok or ((model, tau, delta) == HEAVY and k != "m")
                cells.append(f"{z:.2f}" + ("" if ok else " *"))
            else:
                cells.append("-")
        lines.append(f"| {name} | {r['theory'].engine} | {r['sim'].engine} | " + " | ".join(cells)
                     + f" | {r['t_theory']:.1f} / {r['t_sim']:.1f} |")
        figure(figdir / f"{name}.png", f"{name}: DMFT ({r['theory'].engine}, band +-se) vs "
               f"simulation d={size['d']}, {size['seeds']} seeds, dt={r['exp'].dt:g}",
               obs_names(r["exp"]), r["theory"], r["sim"])
        print(lines[-1], flush=True)
        if (model, tau, delta) == HEAVY:
            S = np.array([s.extras["seeds"]["Q"] for s in r["sim"].snapshots])
            heavy = (r["theory"].Q[-1], r["sim"].Q[-1], r["sim"].se["Q"][-1], np.median(S[-1]),
                     S[-1].min(), S[-1].max(), S.max(), r["exp"].T)

    if heavy is not None:
        lines += ["", f"**{case_name(*HEAVY)}** (`*` on train/test loss and Q): the simulated seeds "
                  "are heavy-tailed, so their sample mean is not a Gaussian estimate of the mean. "
                  f"At t = {heavy[7]:g}: DMFT Q = {heavy[0]:.3f}; simulation mean {heavy[1]:.3f} +- "
                  f"{heavy[2]:.3f}, median {heavy[3]:.3f}, seeds in [{heavy[4]:.3f}, {heavy[5]:.3f}]; "
                  f"the largest single-seed Q at any recorded time was {heavy[6]:.2f} (bursts that "
                  "decay again). The exact finite-d expectation of the same Euler-Maruyama "
                  "recursion (solver.finite_exact, no sampling of dW) approaches the DMFT like 1/d "
                  "from above (Q(4) = 1.814, 1.557, 1.442 at d = 250, 500, 1000 vs DMFT 1.337 at "
                  "dt = 0.0125), and its 1/d extrapolation agrees with the DMFT (row below). So "
                  "the DMFT is the large-d limit of the expectation; a typical run at d = 1000-2000 "
                  "sits below it, the gap carried by rare large excursions. m (linear in theta) "
                  "agrees. At dt = 0.05 this case is past the mean-square stability edge of the "
                  "recursion (DMFT Q grows geometrically); that is why tau = 2 runs at the smaller "
                  "dt. The test (tests/test_validation.py) checks m against the simulation and the "
                  "rest against the finite-d expectation."]
    lines += ["", "## Cross-checks between DMFT methods", "",
              "| check | train_loss | test_loss | test_error | m | Q |", "|---|---|---|---|---|---|"]

    def row(label, z):
        cells = []
        for k in ("train_loss", "test_loss", "test_error", "m", "Q"):
            cells.append("-" if k not in z else f"{z[k][0]:.2f}" + ("" if z[k][1] else " *"))
        return f"| {label} | " + " | ".join(cells) + " |"

    r = finite_d_limit(*HEAVY, T=size["T"], dt=size["dt"], rec_dt=size["rec_dt"],
                       dt_hot=size["dt_hot"])
    lines.append(row(f"{case_name(*HEAVY)}: exact DMFT vs 2 E_d=500 - E_d=250 (exact finite-d "
                     "expectation, finite_exact, extrapolated in 1/d)", r["z"]))
    figure(figdir / f"{case_name(*HEAVY)}_finite_d.png", f"{case_name(*HEAVY)}: exact DMFT (line) "
           "vs exact finite-d expectation at d=250, 500 and 2 E_500 - E_250",
           obs_names(r["exp"]), r["theory"], others=[("E, d=250", r["fa"]), ("E, d=500", r["fb"]),
                                                     ("2 E_500 - E_250", r["extrap"])])
    r = mc_vs_exact(T=5.0, dt=0.05, N=8000, record_every=5)
    lines.append(row("mc vs exact (square, tau=1, delta=2, N=8000); z = |mc-exact|/se_mc", r["z"]))
    figure(figdir / "mc_vs_exact.png", "square loss, tau=1, delta=2: exact (line) vs mc (band)",
           obs_names(r["exp"]), r["theory"], others=[("dmft-mc", r["other"])])
    r = online_vs_mc(T=1.0, dt=0.05, N=8000, record_every=2)
    lines.append(row("online vs mc, delta=50 (direct, no allowance for the O(1/delta) gap)",
                     r["z_direct"]))
    lines.append(row("online vs 2 mc(50) - mc(25) (Richardson in 1/delta)", r["z"]))
    figure(figdir / "online_vs_mc.png", "logistic tau=0.5, T=1: online ODE (line) vs mc at "
           "delta=50, 25 and the extrapolation 2 mc(50) - mc(25)", obs_names(r["exp"]),
           r["theory"], others=[("mc delta=50", r["other"]), ("mc delta=25", r["other2"]),
                                ("2 mc(50) - mc(25)", r["extrap"])])
    r = refine_N("logistic", 2.0, 2.0, T=3.0, dt=0.05, N=4000, rec_dt=0.3)
    lines.append(row("mc N=4000 vs N=8000 (logistic, tau=2, delta=2)", r["z"]))
    figure(figdir / "refine_N.png", "logistic tau=2 delta=2: N=4000 (line) vs N=8000",
           obs_names(r["exp"]), r["theory"], others=[("N=8000", r["other"])])

    lines += ["", "## Refinement in dt (T = 2, dt = 0.1, 0.05, 0.025)", "",
              "The grid system is first order in dt, so halving dt moves the target by O(dt): "
              "the check is that the change halves. `change` = max_t |f(dt) - f(dt/2)|, "
              "`expected` = max_t |2 (f(dt/2) - f(dt/4))|, `resid` = max_t of their difference "
              "(O(dt^2)), z = resid / combined se (mc only).", "",
              "| case | obs | change | expected | resid | z |", "|---|---|---|---|---|---|"]
    for model, tau, method in (("linear", 0.5, "exact"), ("linear", 2.0, "exact"),
                               ("logistic", 0.5, "mc"), ("logistic", 2.0, "mc")):
        r = refine_dt(model, tau, 2.0, T=2.0, dt=0.1, N=8000, method=method)
        for k, s in r["stats"].items():
            lines.append(f"| {model} tau={tau:g} ({method}) | {k} | {s['change']:.2e} | "
                         f"{s['expected']:.2e} | {s['resid']:.2e} | {s['z']:.2f} |")
        figure(figdir / f"refine_dt_{model}_tau{tau:g}.png",
               f"{model} tau={tau:g} delta=2: dt=0.1 (line), 0.05, 0.025",
               obs_names(r["exp"]), r["runs"][0],
               others=[("dt=0.05", r["runs"][1]), ("dt=0.025", r["runs"][2])])
    lines.append("")
    lines.append(f"All matrix cases pass (apart from the heavy-tailed {case_name(*HEAVY)}, "
                 "explained above)." if allok else "SOME MATRIX CASES FAIL (marked *).")
    (ROOT / "docs" / "validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if allok else 1


if __name__ == "__main__":
    sys.exit(main())
