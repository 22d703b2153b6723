"""Unit tests of the dashboard's state logic (no browser): runner threads and cancellation,
job planning and validation, presets, the session's store and plot data, exports and the URL.

Engines are fakes with the engines' signature (``stream(exp, cancel) -> Snapshots``); one test
runs the real engines on a tiny problem and checks that the app shows exactly what they yield.
Budget: about 20 s on 2 cores.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

import holoviews as hv  # noqa: E402

from solver.config import ConfigError, Experiment  # noqa: E402
from solver.snapshot import OBSERVABLES, Snapshot, SolverError  # noqa: E402

from app import export, plots, presets  # noqa: E402
from app import store as store_mod  # noqa: E402
from app.dashboard import Dashboard  # noqa: E402
from app.runner import Job, Runner  # noqa: E402
from app.store import SIMS, THEORY, THEORY_GD, Series, Store, plan_jobs  # noqa: E402


# --- fake engines ---------------------------------------------------------------------------
def fake_values(kind, exp, t):
    """Deterministic curves; 'sim' differs from 'theory' so that mix-ups show."""
    shift = 0.0 if kind == "theory" else 0.01 * (1 + ["gd", "sgf", "sgd"].index(exp.algo))
    m = 1 - math.exp(-t) + shift
    Q = 1 - math.exp(-2 * t) + 0.1 * exp.tau + shift
    return dict(train_loss=math.exp(-t) + 0.1 + shift, test_loss=math.exp(-t) + 0.2 + shift,
                test_error=0.5 * math.exp(-t) if exp.teacher == "sign" else math.nan,
                m=m, Q=Q, cosine=m / math.sqrt(Q * exp.rho) if Q > 0 else 0.0)


def make_fake(kind, delay=0.0, diverge_at=None, started=None, hang=None):
    """A fake engine. ``started``: Event set at the first snapshot; ``hang``: Event the engine
    waits on (honouring cancel) after its first snapshot."""
    def stream(exp, cancel=None):
        K = exp.steps
        for k in range(0, K + 1, exp.record_every):
            if cancel is not None and cancel.is_set():
                return
            t = k * exp.dt
            if diverge_at is not None and t > diverge_at:
                raise SolverError(f"diverged at t={t:.4g}: lower tau or dt", parameter="tau")
            vals = fake_values(kind, exp, t)
            se = {n: (0.01 if kind == "sim" else 0.002) for n in vals}
            extras = {}
            if k % (4 * exp.record_every) == 0:
                edges = np.linspace(-3, 3, 13)
                c = 0.5 * (edges[1:] + edges[:-1])
                extras["field_hist"] = (edges, np.exp(-c * c / 2) / math.sqrt(2 * math.pi))
                if kind == "theory":
                    x = np.linspace(-3, 3, 50)
                    extras["theta_density"] = (x, np.exp(-x * x / 2) / math.sqrt(2 * math.pi))
                    tt = np.arange(k + 1) * exp.dt
                    extras["kernels"] = dict(t=tt, C=np.exp(-np.abs(tt[:, None] - tt[None])),
                                             R=np.tril(np.ones((k + 1, k + 1))))
                else:
                    extras["theta_hist"] = (edges, np.exp(-c * c / 2) / math.sqrt(2 * math.pi))
            yield Snapshot(t=t, step=k, epochs=exp.epochs(t), values=vals, se=se, extras=extras,
                           engine="dmft-fake" if kind == "theory" else f"sim-{exp.algo}",
                           progress=k / K)
            if started is not None:
                started.set()
            if hang is not None:
                while not hang.is_set():
                    if cancel is not None and cancel.is_set():
                        return
                    time.sleep(0.01)
            if delay:
                time.sleep(delay)
    return stream


def fakes(**kw):
    return {"theory": make_fake("theory", **kw), "sim": make_fake("sim", **kw)}


def small_exp(**kw):
    base = dict(T=1.0, dt=0.1, d=200, samples=200, seeds=2)
    base.update(kw)
    return Experiment(**base)


def dashboard(engines=None, exp=None, **kw):
    return Dashboard(experiment=exp or small_exp(), engines=engines or fakes(), period_ms=0,
                     sync_url=False, **kw)


# --- runner ---------------------------------------------------------------------------------
def drain_all(r: Runner, timeout=10.0):
    assert r.join(timeout), "worker threads did not end"
    return r.drain()


def test_runner_runs_jobs_in_order_and_reports_done():
    r = Runner(fakes(), max_workers=1)
    exp = small_exp()
    jobs = [Job("theory", "theory", exp), Job("sgf", "sim", exp.copy(algo="sgf"))]
    rid = r.start(jobs)
    evs = drain_all(r)
    assert all(e.run_id == rid for e in evs)
    kinds = [(e.key, e.kind) for e in evs if e.kind != "snap"]
    assert kinds == [("theory", "start"), ("theory", "done"), ("sgf", "start"), ("sgf", "done")]
    snaps = [e for e in evs if e.kind == "snap" and e.key == "theory"]
    assert [s.payload.step for s in snaps] == list(range(exp.steps + 1))


def test_runner_stop_cancels_promptly():
    started, hang = threading.Event(), threading.Event()
    r = Runner({"theory": make_fake("theory", started=started, hang=hang)}, max_workers=2)
    r.start([Job("theory", "theory", small_exp())])
    assert started.wait(10)
    assert r.busy()
    r.stop()
    assert r.join(5.0), "engine did not stop after cancel"
    kinds = [e.kind for e in r.drain()]
    assert kinds[-1] == "cancelled" and "done" not in kinds


def test_new_run_cancels_the_old_and_drops_its_events():
    started, hang = threading.Event(), threading.Event()
    eng = {"theory": make_fake("theory", started=started, hang=hang)}
    r = Runner(eng, max_workers=1)
    first = r.start([Job("theory", "theory", small_exp())])
    assert started.wait(10)
    hang.set()  # the second run must not hang
    second = r.start([Job("theory", "theory", small_exp(T=0.5))])
    assert second == first + 1
    evs = drain_all(r)
    assert evs and all(e.run_id == second for e in evs)
    assert [e.kind for e in evs][-1] == "done"
    assert len([e for e in evs if e.kind == "snap"]) == small_exp(T=0.5).steps + 1


def test_runner_reports_solver_error_and_other_exceptions():
    def broken(exp, cancel=None):
        yield Snapshot(t=0.0, step=0, epochs=0.0, values={"m": 0.0}, se={})
        raise RuntimeError("boom")

    r = Runner({"theory": make_fake("theory", diverge_at=0.35), "sim": broken})
    exp = small_exp()
    r.start([Job("theory", "theory", exp), Job("sgf", "sim", exp)])
    evs = drain_all(r)
    err = {e.key: e.payload for e in evs if e.kind == "error"}
    assert "diverged at t=0.4" in err["theory"]
    assert err["sgf"] == "RuntimeError: boom"
    assert len([e for e in evs if e.kind == "snap" and e.key == "theory"]) == 4


# --- planning and validation ----------------------------------------------------------------
def test_plan_jobs_theory_first_copies_per_simulation():
    exp = Experiment(tau=0.5, batch=8)
    jobs = plan_jobs(exp, ["sgd-reshuffle", "gd", "sgf", "sgd-fresh"], gd_theory=True)
    assert [j.key for j in jobs] == [THEORY, "gd", "sgf", "sgd-fresh", "sgd-reshuffle",
                                     THEORY_GD]
    by = {j.key: j.exp for j in jobs}
    assert (by["gd"].algo, by["sgf"].algo) == ("gd", "sgf")
    assert (by["sgd-fresh"].algo, by["sgd-fresh"].sampling) == ("sgd", "fresh")
    assert (by["sgd-reshuffle"].algo, by["sgd-reshuffle"].sampling) == ("sgd", "reshuffle")
    assert by[THEORY_GD].tau == 0.0 and by[THEORY].tau == 0.5
    for j in jobs:  # copies, not the widget-bound object
        assert j.exp is not exp
        assert {k: v for k, v in j.exp.to_dict().items()
                if k not in ("algo", "sampling", "tau", "eta")} == \
               {k: v for k, v in exp.to_dict().items()
                if k not in ("algo", "sampling", "tau", "eta")}
    assert [j.key for j in plan_jobs(exp, ["gd"], gd_theory=False)] == [THEORY, "gd"]
    assert [j.key for j in plan_jobs(exp.copy(tau=0.0), ["gd"], True)] == [THEORY, "gd"]


@pytest.mark.parametrize("changes,sims,param_name", [
    (dict(loss="logistic", teacher="linear"), ["sgf"], "loss"),
    (dict(q0=0.0, m0=0.5), [], "m0"),
    (dict(T=0.01, dt=0.05), [], "dt"),
    (dict(d=10, delta=0.5, batch=8), ["sgd-fresh"], "batch"),
    (dict(tau=0.0), ["sgd-fresh"], "tau"),
    (dict(dt=1e-4, T=1000.0), [], "record_every"),
])
def test_plan_jobs_names_the_bad_parameter(changes, sims, param_name):
    exp = Experiment()
    exp.param.update(**changes)
    with pytest.raises(ConfigError) as e:
        plan_jobs(exp, sims)
    assert e.value.param == param_name


# --- presets ----------------------------------------------------------------------------------
def test_presets_are_data_and_all_validate():
    ps = presets.presets()
    required = {"Linear regression: SGD noise vs ridge", "Logistic regression: GD vs SGD vs SGF",
                "Online limit: many samples", "Overfitting and early stopping",
                "Where the theory stops: fresh batches vs reshuffled epochs"}
    assert required <= set(ps)
    assert presets.default_name() == "Logistic regression: GD vs SGD vs SGF"
    # the default preset is the Experiment defaults on a coarser grid (dt = 0.1: a Run takes
    # a few seconds on 2 cores, docs/dashboard.md "Latency"), and a new page starts on it
    default = presets.build(ps[presets.default_name()])
    assert default.to_dict() == Experiment(dt=0.1).to_dict()
    page = Dashboard(engines=fakes(), period_ms=0, sync_url=False)
    assert page.experiment.to_dict() == default.to_dict()
    assert page.sims == ps[presets.default_name()]["sims"]
    page.close()
    for name, p in ps.items():
        assert p["description"] and set(p["sims"]) <= set(SIMS), name
        exp = presets.build(p)
        jobs = plan_jobs(exp, p["sims"], p.get("gd_theory", True))
        assert jobs[0].key == THEORY
        # small enough for a few seconds on 2 cores (the committee preset: a long horizon,
        # but the cheap online theory and d = 300; about 12 s measured)
        assert exp.d <= 1000 and exp.seeds <= 4 and exp.samples <= 4000, name
        assert exp.T <= 40 or (exp.model == "committee" and exp.resolved_method() == "online"
                               and exp.d <= 300 and exp.T / exp.dt <= 400), name


def test_applying_a_preset_resets_other_parameters():
    d = dashboard()
    d.experiment.param.update(lam=1.7, seed=5)
    d.apply_preset("Online limit: many samples")
    p = presets.presets()["Online limit: many samples"]
    assert d.experiment.lam == p["experiment"]["lam"] and d.experiment.seed == 0
    assert d.experiment.delta == p["experiment"]["delta"] and d.experiment.method == "online"
    assert d.experiment.eta == pytest.approx(d.experiment.tau * d.experiment.batch)
    assert d.sims == p["sims"] and d.preset_select.value == "Online limit: many samples"
    d.close()


# --- the session: run, stop, errors, plots, exports -----------------------------------------
def test_run_streams_into_the_plot_data_and_status():
    d = dashboard()
    d.sims = ["sgf", "sgd-fresh"]
    assert d.run()
    assert d.wait(20)
    run = d.store.current
    assert all(s.status == "done" for s in run.series.values())
    exp = d.experiment
    for key, kind, algo in ((THEORY, "theory", "sgf"), ("sgf", "sim", "sgf"),
                            ("sgd-fresh", "sim", "sgd")):
        x, v, se = d.plotted(key, "train_loss")
        ref_exp = exp.copy(algo=algo)
        ts = np.arange(exp.steps + 1) * exp.dt
        np.testing.assert_allclose(x, ts)
        np.testing.assert_allclose(v, [fake_values(kind, ref_exp, t)["train_loss"] for t in ts])
        assert np.all(se == (0.002 if kind == "theory" else 0.01))
    assert "Done" in d.status.object and d.progress.value == 1000
    assert run.t_first_theory is not None and run.t_all is not None
    assert not d.alert.visible
    # distributions and kernels reached their pipes
    assert d._dist_times() and d.kernel_pipe.data.get("kernels") is not None
    d.close()


def test_first_theory_point_is_drawn_at_once():
    """Redraws are paced by their cost; the theory's first point must not wait for that pace
    (the empty redraw that starts a Run may have been slow)."""
    go, hang = threading.Event(), threading.Event()
    fake = make_fake("theory", hang=hang)

    def theory(exp, cancel=None):
        go.wait(10)
        yield from fake(exp, cancel)

    d = dashboard(engines={"theory": theory, "sim": make_fake("sim")})
    d.sims = []
    assert d.run()
    d.tick()                                         # the Run's first (empty) redraw ...
    d._next_draw = time.perf_counter() + 3600.0      # ... as if it had been very slow
    go.set()
    deadline = time.monotonic() + 10
    while not len(d.plotted(THEORY)[0]) and time.monotonic() < deadline:
        d.tick()
        time.sleep(0.01)
    assert len(d.plotted(THEORY)[0]) == 1 and d.runner.busy()
    hang.set()
    assert d.wait(20)
    d.close()


def test_status_line_follows_redraws_and_job_states():
    """The status line and progress bar change with the (paced) redraws and when a job starts,
    ends or moves in the queue, not at every tick that drained snapshots: each change makes the
    browser lay the page out again. Held-back redraws: the line shows the jobs' states only."""
    d = dashboard(engines=fakes(delay=0.02), exp=small_exp(T=2.0))
    d.sims = ["sgf"]
    shown = []
    d.status.param.watch(lambda e: shown.append(e.new), "object")
    assert d.run()
    ticks_with_events = 0
    deadline = time.monotonic() + 20
    while d.runner.busy() and time.monotonic() < deadline:
        d._next_draw = time.perf_counter() + 3600.0  # as if the pacer held every redraw back
        ticks_with_events += d.tick() > 0
        time.sleep(0.005)
    assert d.wait(20)
    d.tick()
    run = d.store.current
    assert "Done" in d.status.object and d.progress.value == 1000
    # 2 jobs: queued -> running -> done each, the first theory point's immediate redraw, the
    # end; far fewer than the ticks that brought snapshots (21 recording steps per job)
    assert ticks_with_events >= 10
    assert len(shown) <= 2 * len(run.series) + 3 < ticks_with_events
    d.close()


def test_an_edit_during_a_run_holds_the_redraws_then_they_catch_up(monkeypatch):
    """Interaction first: an edit of the configuration while the runs stream holds that
    session's redraws and status line back (``SGF_DMFT_INTERACT_QUIET`` s), so that its page
    shows the edit's response before it repaints the plots; nothing is lost: the first redraw
    after the pause draws every snapshot that came during it."""
    monkeypatch.setenv("SGF_DMFT_INTERACT_QUIET", "3600")  # a pause that does not end here
    hang = threading.Event()
    d = dashboard(engines={"theory": make_fake("theory", hang=hang), "sim": make_fake("sim")})
    d.sims = []
    assert d.run()
    deadline = time.monotonic() + 10
    while not len(d.plotted(THEORY)[0]) and time.monotonic() < deadline:
        d.tick()
        time.sleep(0.01)
    assert len(d.plotted(THEORY)[0]) == 1 and d.runner.busy()
    status = d.status.object
    sends = []
    orig = d._send_curves
    monkeypatch.setattr(d, "_send_curves", lambda: (sends.append(1), orig())[1])
    d.experiment.delta = 3.0                           # the edit ...
    n = d.experiment.n
    assert f"n = δd = {n:,} samples" in d.horizon.object   # ... and its response, at once
    assert d._quiet_until > time.perf_counter() + 3000
    hang.set()                                         # the theory streams to its end
    assert d.runner.join(20)
    for _ in range(3):
        d.tick()
    run = d.store.current
    K1 = d.experiment.steps + 1
    assert len(run.series[THEORY]) == K1 and run.finished
    assert sends == [] and len(d.plotted(THEORY)[0]) == 1 and d.status.object == status
    d._quiet_until = 0.0                               # the pause is over
    d.tick()
    assert len(sends) == 1 and len(d.plotted(THEORY)[0]) == K1
    assert "Done" in d.status.object and d.progress.value == 1000
    # off (0), or no run streaming: an edit holds nothing back
    monkeypatch.setenv("SGF_DMFT_INTERACT_QUIET", "0")
    d.experiment.delta = 2.0
    assert d._quiet_until == 0.0
    monkeypatch.setenv("SGF_DMFT_INTERACT_QUIET", "1")
    d.experiment.delta = 3.0
    assert d._quiet_until == 0.0 and not d.runner.busy()
    d.close()


def test_distributions_are_built_when_their_tab_is_shown():
    """A Run does not build the hidden Distributions tab's plots (about half of a first Run
    click's CPU); showing the tab builds them for the current series, with their data."""
    d = dashboard(engines=fakes())
    d.sims = ["sgf"]
    calls = []
    orig = plots.dists_layout
    try:
        plots.dists_layout = lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1]
        assert d.run() and d.wait(20)
        assert calls == [] and d.tabs.active == 0
        d.tabs.active = 1                                   # the Distributions tab
        assert len(calls) == 1 and d.dists_pane.object is not None
        assert set(d.dist_pipe.data) - {"_t"} == {plots.sid(0, THEORY), plots.sid(0, "sgf")}
        assert math.isclose(d.dist_pipe.data["_t"], d.time_player.value, abs_tol=1e-6)
        first = d.dist_pipe.data
        assert d.run() and d.wait(20)                       # same series, tab shown: new data
        assert len(calls) == 1 and d.dist_pipe.data is not first
        assert math.isclose(d.dist_pipe.data["_t"], d.time_player.value, abs_tol=1e-6)
        d.sims = []
        d.tabs.active = 0
        assert d.run() and d.wait(20)                       # other series, tab hidden
        assert len(calls) == 1
        d.tabs.active = 1
        assert len(calls) == 2 and set(d.dist_pipe.data) - {"_t"} == {plots.sid(0, THEORY)}
    finally:
        plots.dists_layout = orig
    d.close()


def test_new_run_clears_old_curves_with_its_first_point(monkeypatch):
    """A Run with the same plots redraws once for its start: the old curves go when the
    theory's first point comes (not in a separate, empty redraw before it)."""
    import app.dashboard as dash_mod

    monkeypatch.setattr(dash_mod, "FIRST_DRAW_WAIT", 60.0)
    go = threading.Event()
    fake = make_fake("theory", delay=0.02)

    def theory(exp, cancel=None):
        go.wait(10)
        yield from fake(exp, cancel)

    d = dashboard(engines={"theory": theory, "sim": make_fake("sim")})
    d.sims = []
    go.set()
    assert d.run() and d.wait(20)
    K1 = d.experiment.steps + 1
    assert len(d.plotted(THEORY)[0]) == K1
    go.clear()
    sends = []
    orig = d._send_curves
    monkeypatch.setattr(d, "_send_curves", lambda: (sends.append(1), orig())[1])
    assert d.run()
    for _ in range(5):
        d.tick()
        time.sleep(0.01)
    assert sends == [] and len(d.plotted(THEORY)[0]) == K1   # old curves still shown
    go.set()
    deadline = time.monotonic() + 10
    while len(d.plotted(THEORY)[0]) == K1 and time.monotonic() < deadline:
        d.tick()
        time.sleep(0.005)
    assert 1 <= len(d.plotted(THEORY)[0]) < K1 and len(sends) == 1
    assert d.wait(20)
    d.close()


def test_x_axis_switch_uses_epochs_and_steps():
    d = dashboard()
    d.sims = ["sgf", "sgd-fresh", "gd"]
    d.run()
    assert d.wait(20)
    exp = d.experiment
    ts = np.arange(exp.steps + 1) * exp.dt
    d.xaxis = "epochs"
    np.testing.assert_allclose(d.plotted(THEORY)[0], ts / (exp.tau * exp.delta))
    np.testing.assert_allclose(d.plotted("gd")[0], ts / exp.dt)
    d.xaxis = "sgd_steps"
    np.testing.assert_allclose(d.plotted("sgd-fresh")[0], ts * exp.d / exp.eta)
    np.testing.assert_allclose(d.plotted("gd")[0], ts / exp.dt)
    d.close()


def test_invalid_configuration_shows_alert_and_starts_nothing():
    d = dashboard()
    d.experiment.param.update(loss="logistic", teacher="linear")
    assert d.run() is False
    assert d.alert.visible and "loss" in d.alert.object
    assert d.store.current is None and not d.runner.busy()
    d.experiment.teacher = "sign"
    assert d.run() and d.wait(20)
    assert not d.alert.visible
    d.close()


def test_divergence_keeps_curves_and_shows_message():
    d = dashboard(engines={"theory": make_fake("theory", diverge_at=0.45),
                           "sim": make_fake("sim")})
    d.sims = ["sgf"]
    d.run()
    assert d.wait(20)
    run = d.store.current
    s = run.series[THEORY]
    assert s.status == "error" and "diverged at t=0.5" in s.message
    assert len(d.plotted(THEORY)[0]) == 5  # t = 0 ... 0.4 kept
    assert run.series["sgf"].status == "done"
    assert d.alert.visible and d.alert.alert_type == "warning" and "diverged" in d.alert.object
    d.close()


def test_stop_and_new_run_cancel_cleanly():
    started, hang = threading.Event(), threading.Event()
    d = dashboard(engines={"theory": make_fake("theory", started=started, hang=hang),
                           "sim": make_fake("sim", started=None, hang=hang)})
    d.sims = ["sgf"]
    d.run()
    assert started.wait(10)
    d.tick()
    d.stop()
    assert d.runner.join(5.0)
    d.tick()
    run = d.store.current
    assert {s.status for s in run.series.values()} == {"stopped"}
    assert "Stopped" in d.status.object and d.stop_button.disabled
    n = len(run.series[THEORY])
    # a new run while one is in progress: the old one is cancelled, its events dropped
    started.clear()
    d.run()
    assert started.wait(10)
    old = d.store.current
    hang.set()
    d.run()
    assert d.wait(20)
    assert d.store.current is not old and len(d.store.runs) == 1
    assert all(s.status == "done" for s in d.store.current.series.values())
    assert n >= 1
    d.close()


def test_keep_hide_clear_runs():
    d = dashboard()
    d.sims = ["sgf"]
    d.run() and d.wait(20)
    assert d.store.keep_current() is True
    d.experiment.tau = 1.0
    d.run() and d.wait(20)
    assert [r.label for r in d.store.runs] == ["run 1", "run 2"]
    keys = set(d.last_curve_data)
    assert {"0:theory", "0:sgf"} <= keys and any(k.startswith("1:") for k in keys)
    specs = d.grid.specs
    assert {sp.style for sp in specs} == {0, 1}
    # hide the kept run
    d.visible_widget.value = ["run 2"]
    assert all(k.startswith("0:") for k in d.last_curve_data)
    d.visible_widget.value = ["run 1", "run 2"]
    d.clear_kept()
    assert [r.label for r in d.store.runs] == ["run 2"]
    # an unkept run is replaced by the next one
    d.run() and d.wait(20)
    assert [r.label for r in d.store.runs] == ["run 3"]
    d.close()


def test_same_series_reuse_the_plots():
    d = dashboard()
    d.sims = ["sgf"]
    g0 = d.grid
    d.run() and d.wait(20)
    assert d.grid is g0  # planned at start: the first Run needs no new plots
    d.run() and d.wait(20)
    assert d.grid is g0
    d.sims = ["sgf", "gd"]
    d.run() and d.wait(20)
    assert d.grid is not g0
    d.close()


def test_csv_export_holds_every_curve():
    d = dashboard()
    d.sims = ["sgf", "gd"]
    d.experiment.teacher = "sign"
    d.run() and d.wait(20)
    text = d._csv_file().read()
    rows = list(csv.DictReader(io.StringIO(text)))
    cols = text.splitlines()[0].split(",")
    assert cols[:10] == list(export.LEAD)
    for k in OBSERVABLES:
        assert k in cols and f"{k}_se" in cols
    assert "cosine" in cols
    exp = d.experiment
    K = exp.steps + 1
    series = {}
    for r in rows:
        series.setdefault(r["series"], []).append(r)
    assert set(series) == {THEORY, THEORY_GD, "gd", "sgf"}
    for key, kind, algo in ((THEORY, "theory", "sgf"), ("sgf", "sim", "sgf"),
                            ("gd", "sim", "gd"), (THEORY_GD, "theory", "gd")):
        rs = series[key]
        assert len(rs) == K
        e = exp.copy(algo=algo, **({"tau": 0.0} if key == THEORY_GD else {}))
        for r in rs:
            t = float(r["t"])
            want = fake_values(kind, e, t)
            for k in ("train_loss", "test_loss", "test_error", "m", "Q", "cosine"):
                assert float(r[k]) == pytest.approx(want[k], rel=1e-12), (key, k)
        assert rs[0]["run"] == "run 1" and rs[0]["status"] == "done"
    # theory series are labelled by the method actually used
    assert series[THEORY][0]["label"] == "theory (DMFT mc)"
    assert series[THEORY_GD][0]["label"] == "GD theory τ=0 (DMFT mc)"
    # regression: test error is empty, not 'nan'
    d.experiment.param.update(loss="square", teacher="linear")
    d.run() and d.wait(20)
    rows = list(csv.DictReader(io.StringIO(d.curves_csv())))
    assert rows and all(r["test_error"] == "" for r in rows)
    d.close()


@pytest.mark.parametrize("changes, label, band", [
    (dict(), "theory (DMFT mc)", True),
    (dict(loss="square", teacher="linear"), "theory (DMFT exact)", False),
    (dict(method="online"), "theory (online ODEs)", False),
])
def test_theory_is_labelled_by_its_method(changes, label, band):
    d = dashboard(exp=small_exp(**changes))
    d.sims = ["gd"]
    specs = d._planned_specs()  # the empty plots before Run already name the method
    assert [sp.label for sp in specs if sp.theory] == [label, "GD " + label.replace(
        "theory", "theory τ=0")]
    assert ("(band ±1 SE)" in d.legend.object) is band
    assert label in d.legend.object
    d.run() and d.wait(20)
    assert d.store.current.series[THEORY].label == label
    assert label in d.status.object
    d.close()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless ``data`` is a well-formed PNG."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        pos += 12 + n
        if kind == b"IEND":
            break
    assert chunks[0] == b"IHDR" and b"IDAT" in chunks and chunks[-1] == b"IEND"
    assert pos == len(data)
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_png_export_of_the_curves(monkeypatch):
    pytest.importorskip("matplotlib")
    d = dashboard()
    d.sims = ["gd", "sgf"]
    empty = d._png_file().read()  # before any Run: the empty plots (no crash)
    assert _png_size(empty)[0] >= 800
    d.run() and d.wait(20)
    d.keep()
    d.experiment.tau = 1.0
    d.logy = True
    d.run() and d.wait(20)
    data = d._png_file().read()
    w, h = _png_size(data)
    # 3 x 2 plots at 100 dpi, and real content (more than the empty grid's bytes)
    assert 1200 <= w <= 2000 and 600 <= h <= 1200, (w, h)
    assert len(data) > 1.5 * len(empty) and len(data) < 2_000_000
    assert not d.alert.visible
    # a server without matplotlib: an alert, no crash
    def broken(*a, **k):
        raise ModuleNotFoundError("No module named 'matplotlib'")
    monkeypatch.setattr(export, "curves_png", broken)
    assert d._png_file() is None
    assert d.alert.visible and "PNG export failed" in d.alert.object
    d.close()


def test_config_json_round_trips():
    d = dashboard()
    d.experiment.param.update(delta=3.5, tau=0.25, batch=16, lam=0.2)
    d.sims = ["sgd-reshuffle"]
    d.run() and d.wait(20)
    cfg = json.loads(d._json_file().read())
    exp = Experiment.from_dict(cfg["experiment"])
    assert exp.to_dict() == d.experiment.to_dict()
    assert cfg["sims"] == ["sgd-reshuffle"] and cfg["runs"][0]["label"] == "run 1"
    d.close()


def test_query_string_follows_and_sets_the_configuration():
    from panel.io.location import Location

    loc = Location()
    d = dashboard()
    d.sync_location(loc)
    d.experiment.param.update(delta=3.0, tau=1.25, batch=4)
    d.sims = ["gd", "sgd-fresh"]
    q = loc.query_params
    assert q["delta"] == 3.0 and q["tau"] == 1.25 and q["batch"] == 4
    assert q["sims"] == ["gd", "sgd-fresh"] and "eta" not in q
    # a new session opened with that link reproduces the experiment
    loc2 = Location(search=loc.search)
    d2 = dashboard(exp=Experiment())
    d2.sync_location(loc2)
    assert d2.experiment.to_dict() == d.experiment.to_dict()
    assert d2.sims == ["gd", "sgd-fresh"]
    # a bad value in a link is reported, not raised
    loc3 = Location(search="?delta=-5&tau=0.75")
    d3 = dashboard(exp=Experiment())
    d3.sync_location(loc3)
    assert d3.experiment.delta == Experiment().delta
    assert d3.alert.visible and "delta" in d3.alert.object
    assert export.query_string(d.experiment, ["delta", "tau"], ["gd"]).startswith("?delta=3.0")
    for x in (d, d2, d3):
        x.close()


def test_tau_eta_batch_stay_linked_through_widgets():
    d = dashboard()
    from app.controls import inner_widget

    inner_widget(d.param_widgets["eta"]).value = 6.0
    assert d.experiment.tau == pytest.approx(6.0 / d.experiment.batch)
    inner_widget(d.param_widgets["batch"]).value = 3
    assert d.experiment.eta == pytest.approx(3 * d.experiment.tau)
    assert "epochs" in d.horizon.object and "SGD steps" in d.horizon.object
    d.close()


# --- bounded memory and plotting helpers -----------------------------------------------------
def test_series_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(store_mod, "MAX_POINTS", 64)
    monkeypatch.setattr(store_mod, "MAX_DIST_TIMES", 16)
    exp = small_exp(T=50.0, dt=0.1)
    s = Series("theory", "theory", exp, "DMFT")
    for snap in make_fake("theory")(exp):
        s.add(snap)
    assert len(s.t) <= 64 and len(s.dists) <= 16
    assert s.t[0] == 0.0 and np.all(np.diff(s.t) > 0)
    assert all(len(v) == len(s.t) for v in s.values.values())
    st = Store()
    jobs = plan_jobs(exp, ["sgf"])
    for i in range(store_mod.MAX_KEPT_RUNS + 3):
        st.new_run(jobs, exp, ["sgf"], i + 1)
        st.keep_current()
    assert len(st.runs) <= store_mod.MAX_KEPT_RUNS


def test_curve_overlay_log_axes_drop_nonpositive_values():
    specs = [plots.SeriesSpec("0:theory", THEORY, "DMFT", True, 0),
             plots.SeriesSpec("0:sgf", "sgf", "SGF", False, 0)]
    x = np.array([0.0, 1.0, 2.0, 3.0])
    data = {sp.sid: {"x": x, "t": x, "values": {"m": (np.array([0.0, 0.5, -1.0, 2.0]),
                                                       np.full(4, 0.1))}} for sp in specs}
    ov = plots.curve_overlay("m", specs, "t", data, logx=True, logy=True)
    line = [e for e in ov if isinstance(e, hv.Curve)][0]
    np.testing.assert_allclose(line.dimension_values(0), [1.0, 3.0])
    ov = plots.curve_overlay("m", specs, "t", data)
    assert len([e for e in ov if isinstance(e, hv.Curve)][0]) == 4


def test_session_close_stops_workers():
    started, hang = threading.Event(), threading.Event()
    d = dashboard(engines={"theory": make_fake("theory", started=started, hang=hang),
                           "sim": make_fake("sim")})
    d.run()
    assert started.wait(10)
    runner = d.runner
    d.close()
    assert runner.join(5.0)
    assert d.tick() == 0


# --- with the real engines ------------------------------------------------------------------
def _real_engines():
    try:
        from solver import dmft, simulate
    except ImportError as e:
        pytest.skip(f"engines not available: {e}")
    return dmft, simulate


def test_real_engines_plotted_values_match_a_direct_solver_call():
    dmft, simulate = _real_engines()
    exp = Experiment(T=1.0, dt=0.1, d=100, seeds=2, samples=256, delta=2.0)
    d = Dashboard(experiment=exp, period_ms=0, sync_url=False)
    d.sims = ["sgf"]
    assert d.run()
    assert d.wait(120)
    run = d.store.current
    assert {s.status for s in run.series.values()} == {"done"}, \
        {k: s.message for k, s in run.series.items()}
    th = dmft.solve(exp.copy(algo="sgf", sampling="fresh"))
    sim = simulate.run(exp.copy(algo="sgf"))
    for key, res in ((THEORY, th), ("sgf", sim)):
        for obs in ("train_loss", "m", "Q"):
            x, v, se = d.plotted(key, obs)
            np.testing.assert_allclose(x, res.t)
            np.testing.assert_allclose(v, getattr(res, obs), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(np.nan_to_num(se), np.nan_to_num(res.se[obs]),
                                       rtol=1e-10, atol=1e-14)
    d.close()


# --- the committee machine ------------------------------------------------------------------
COMMITTEE = "Committee machine: plateau and escape"


def committee_values(kind, exp, t):
    """Fake committee snapshot values: scalars plus every entry Q_a_b, M_a_b, distinct per
    entry, time and engine (so that a transposed or mixed-up matrix shows)."""
    shift = 0.0 if kind == "theory" else 0.5
    vals = {"train_loss": 0.1, "test_loss": 0.2, "test_error": 0.1 * math.exp(-t), "m": 0.0,
            "Q": 0.0, "cosine": 0.0}
    for a in range(exp.k):
        for b in range(exp.k):
            vals[f"Q_{a}_{b}"] = 10 * a + b + t + shift
        for b in range(exp.kstar):
            vals[f"M_{a}_{b}"] = -(10 * a + b) - t - shift
    return vals


def make_committee_fake(kind):
    def stream(exp, cancel=None):
        for j in range(0, exp.steps + 1, exp.record_every):
            t = j * exp.dt
            vals = committee_values(kind, exp, t)
            yield Snapshot(t=t, step=j, epochs=exp.epochs(t), values=vals,
                           se={n: 0.01 for n in vals}, extras={}, engine=f"fake-{kind}",
                           progress=j / exp.steps)
    return stream


def committee_exp(**kw):
    base = dict(model="committee", loss="square", teacher="linear", k=2, kstar=3, T=1.0,
                dt=0.25, d=50, seeds=1, method="online")
    base.update(kw)
    return Experiment(**base)


def test_committee_widgets_appear_and_fix_loss_and_teacher():
    d = dashboard()
    w = d.param_widgets
    assert d.experiment.loss == "logistic" and d.experiment.teacher == "sign"
    assert not any(w[n].visible for n in ("k", "kstar", "activation", "v"))
    assert not d.model_note.visible
    d.experiment.model = "committee"
    assert all(w[n].visible for n in ("k", "kstar", "activation", "v"))
    assert d.experiment.loss == "square" and d.experiment.teacher == "linear"
    assert d.model_note.visible and "square loss" in d.model_note.object
    from app.controls import inner_widget
    assert inner_widget(w["loss"]).disabled and inner_widget(w["teacher"]).disabled
    d.experiment.validate()
    # the second layer is typed as text
    w["v"].value = "1, 0.5"
    assert d.experiment.v == [1.0, 0.5]
    w["v"].value = "1,abc"
    assert d.experiment.v == [1.0, 0.5] and d.alert.visible and "v" in d.alert.object
    w["v"].value = "2"
    assert d.experiment.v == [2.0] and not d.alert.visible
    d.experiment.v = [0.5, 1.5]
    assert w["v"].value == "0.5,1.5"
    d.experiment.model = "glm"
    assert not w["k"].visible and not inner_widget(w["loss"]).disabled
    d.close()


def test_committee_initial_overlap_matrices_typed_as_text():
    from panel.io.location import Location

    d = dashboard()
    w = d.param_widgets
    assert not w["Q0"].visible and not w["M0"].visible
    d.experiment.model = "committee"
    assert w["Q0"].visible and w["M0"].visible and w["Q0"].value == w["M0"].value == ""
    w["Q0"].value = "0.05,0.01; 0.01,0.05"
    w["M0"].value = "0.1,0;0,0.2"
    Q0, M0, _ = d.experiment.overlaps0()
    np.testing.assert_array_equal(Q0, [[0.05, 0.01], [0.01, 0.05]])
    np.testing.assert_array_equal(M0, [[0.1, 0.0], [0.0, 0.2]])
    d.experiment.validate()
    # text that is not a matrix: an alert, the experiment keeps its value
    w["Q0"].value = "1,2;3"
    assert d.alert.visible and "Q0" in d.alert.object
    np.testing.assert_array_equal(d.experiment.Q0, Q0)
    # the experiment -> text direction (a preset, a link)
    d.experiment.M0 = np.array([[0.2, 0.0], [0.0, 0.3]])
    assert w["M0"].value == "0.2,0;0,0.3"
    # a matrix of the wrong shape is refused at Run, naming the parameter
    w["Q0"].value = "0.05"
    assert not d.alert.visible  # parsed; the shape is the Run's check
    assert not d.run() and "Q0" in d.alert.object
    # a link carries the matrices
    w["Q0"].value = "0.05,0.01;0.01,0.05"
    loc = Location()
    d.sync_location(loc)
    d2 = dashboard(exp=Experiment())
    d2.sync_location(Location(search=loc.search))
    np.testing.assert_array_equal(d2.experiment.Q0, d.experiment.Q0)
    np.testing.assert_array_equal(d2.experiment.M0, d.experiment.M0)
    assert d2.param_widgets["Q0"].value == "0.05,0.01;0.01,0.05"
    # empty text: back to q0 I
    w["Q0"].value = ""
    assert d.experiment.Q0 is None
    np.testing.assert_array_equal(d.experiment.overlaps0()[0], d.experiment.q0 * np.eye(2))
    for x in (d, d2):
        x.close()


def test_committee_preset_validates_and_applies():
    p = presets.presets()[COMMITTEE]
    exp = presets.build(p)
    assert (exp.model, exp.k, exp.kstar, exp.activation, exp.second_layer().tolist()) == \
        ("committee", 2, 2, "erf", [1.0, 1.0])
    assert (exp.rho, exp.q0, exp.m0, exp.lam, exp.noise) == (4.0, 0.05, 0.1, 0.0, 0.0)
    assert exp.loss == "square" and exp.teacher == "linear"
    assert "online" in p["description"]
    jobs = plan_jobs(exp, p["sims"], p["gd_theory"])
    assert [j.key for j in jobs] == [THEORY] + p["sims"]
    d = dashboard()
    d.apply_preset(COMMITTEE)
    assert d.experiment.model == "committee" and d.param_widgets["k"].visible
    assert d.param_widgets["v"].value == "1"
    d.apply_preset(presets.default_name())
    assert d.experiment.model == "glm" and not d.param_widgets["k"].visible
    d.close()


def test_relu_with_monte_carlo_dmft_is_planned():
    """relu works with the Monte Carlo DMFT (smoothed delta of relu'' in the response)."""
    exp = committee_exp(activation="relu", method="auto")
    jobs = plan_jobs(exp, ["sgf"])
    assert jobs[0].exp.activation == "relu" and jobs[0].exp.resolved_method() == "mc"


def test_overlap_heatmaps_follow_the_snapshots_and_the_time_player():
    eng = {"theory": make_committee_fake("theory"), "sim": make_committee_fake("sim")}
    exp = committee_exp()
    d = dashboard(engines=eng, exp=exp)
    d.sims = ["sgf"]
    assert d.overlaps_pane.object is None  # GLM-free empty state before a committee run
    assert d.run() and d.wait(10)
    assert d.grid.titles["test_error"] == "Generalisation error ε_g"
    assert "test_error" in d.grid.observables  # drawn although the teacher is linear
    x, v, _ = d.plotted(THEORY, "test_error")
    np.testing.assert_allclose(v, 0.1 * np.exp(-x))
    assert d.time_player.options == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])

    def check(t):
        data = d.last_overlap_data
        assert set(data) == {plots.sid(0, THEORY), plots.sid(0, "sgf")}
        for key, kind in ((THEORY, "theory"), ("sgf", "sim")):
            e = data[plots.sid(0, key)]
            ref = committee_values(kind, exp, t)
            assert e["t"] == pytest.approx(t)
            assert e["Q"].shape == (2, 2) and e["M"].shape == (2, 3)
            np.testing.assert_allclose(e["Q"], [[ref[f"Q_{a}_{b}"] for b in range(2)]
                                                for a in range(2)])
            np.testing.assert_allclose(e["M"], [[ref[f"M_{a}_{b}"] for b in range(3)]
                                                for a in range(2)])
    check(1.0)  # follows the latest time
    d.time_player.value = 0.25
    check(0.25)
    # the heatmap element holds the matrix, rows a and columns b
    el = plots.overlap_heatmap("M", "DMFT", d.last_overlap_data[plots.sid(0, THEORY)], 2, 3)
    hm = el.get(0)
    assert isinstance(hm, hv.HeatMap) and "t = 0.25" in hm.opts.get().kwargs["title"]
    got = {(str(b), str(a)): val for b, a, val in zip(*(hm.dimension_values(i)
                                                         for i in range(3)))}
    assert got[("2", "1")] == pytest.approx(-(10 + 2) - 0.25)
    assert d.overlaps_pane.object is not None and d.overlaps_pane.visible
    # a GLM run hides the heatmaps again
    d.experiment.model = "glm"
    d.experiment.param.update(loss="logistic", teacher="sign")
    assert d.run() and d.wait(10)
    assert d.overlaps_pane.object is None and d.grid.titles["test_error"] != \
        "Generalisation error ε_g"
    d.close()


def test_real_committee_run_shows_the_engines_overlaps():
    dmft, simulate = _real_engines()
    exp = committee_exp(T=1.0, dt=0.25, d=60, seeds=1, delta=20.0, tau=0.5, batch=1,
                        q0=0.05, m0=0.1, rho=4.0, lam=0.0)
    d = Dashboard(experiment=exp, period_ms=0, sync_url=False)
    d.sims = ["sgd-fresh"]
    assert d.run() and d.wait(120)
    run = d.store.current
    assert {s.status for s in run.series.values()} == {"done"}, \
        {k: s.message for k, s in run.series.items()}
    th = dmft.solve(exp.copy(algo="sgf", sampling="fresh"))
    e = d.last_overlap_data[plots.sid(0, THEORY)]
    assert e["t"] == pytest.approx(1.0)
    for a in range(2):
        for b in range(3):
            assert e["M"][a, b] == pytest.approx(getattr(th, f"M_{a}_{b}")[-1], rel=1e-12)
        for b in range(2):
            assert e["Q"][a, b] == pytest.approx(getattr(th, f"Q_{a}_{b}")[-1], rel=1e-12)
    sim = d.last_overlap_data[plots.sid(0, "sgd-fresh")]
    assert np.all(np.isfinite(sim["Q"])) and np.all(np.isfinite(sim["M"]))
    d.close()
