"""Server policy of the dashboard (app/pool.py): per-session caps read from the environment,
and the process-wide worker pool (FIFO queue, per-session limit, queue position, cancellation
of queued and running jobs, idle threads ending, bounded event queue).

Fake engines and blocking jobs only, no numerics. Budget: about 3 s on 2 cores.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")

from solver.config import ConfigError, Experiment  # noqa: E402
from solver.snapshot import Snapshot  # noqa: E402

from app import pool as pool_mod  # noqa: E402
from app.pool import CAPS, CapError, Group, Pool, Ticket, caps, check_caps  # noqa: E402
from app.runner import Job, Runner  # noqa: E402


def wait_for(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def small_exp(**kw):
    base = dict(T=1.0, dt=0.1, d=200, samples=200, seeds=2)
    base.update(kw)
    return Experiment(**base)


def gated_engine(gate: threading.Event, started: threading.Event | None = None, n_snaps=3):
    """Yields one snapshot, then waits on ``gate`` (honouring cancel), then the rest."""
    def stream(exp, cancel=None):
        for k in range(n_snaps):
            if cancel is not None and cancel.is_set():
                return
            yield Snapshot(t=0.1 * k, step=k, epochs=0.0, values={"m": 0.0}, se={},
                           progress=k / max(1, n_snaps - 1))
            if started is not None:
                started.set()
            while not gate.is_set():
                if cancel is not None and cancel.is_set():
                    return
                time.sleep(0.005)
    return stream


# --- caps ---------------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for env, _, _ in CAPS.values():
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


def test_caps_defaults_and_environment(clean_env):
    assert caps() == {k: default for k, (_, default, _) in CAPS.items()}
    # the defaults admit the Experiment defaults
    check_caps(Experiment(), ["sgf"])
    clean_env.setenv("SGF_DMFT_MAX_D", "300")
    clean_env.setenv("SGF_DMFT_MAX_SEEDS", "none")  # lifted
    clean_env.setenv("SGF_DMFT_MAX_STEPS", "lots")  # unreadable: the default stays
    c = caps()
    assert c["d"] == 300 and c["seeds"] is None and c["steps"] == CAPS["steps"][1]


@pytest.mark.parametrize("name,env,cap,value,shown", [
    ("d", "SGF_DMFT_MAX_D", 300, dict(d=400), "d = 400"),
    ("samples", "SGF_DMFT_MAX_SAMPLES", 300, dict(samples=400), "samples = 400"),
    ("T/dt", "SGF_DMFT_MAX_STEPS", 100, dict(T=2.0, dt=0.01), "T/dt = 200 steps"),
    ("seeds", "SGF_DMFT_MAX_SEEDS", 4, dict(seeds=8), "seeds = 8"),
])
def test_check_caps_names_parameter_and_cap(clean_env, name, env, cap, value, shown):
    clean_env.setenv(env, str(cap))
    check_caps(small_exp(), ["sgf"])  # under every cap
    with pytest.raises(CapError) as err:
        check_caps(small_exp(**value), ["sgf"])
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and err.value.param == name
    assert shown in msg and env in msg
    assert f"limit of {cap} " in msg


def test_d_and_seeds_only_count_with_simulations():
    limits = dict(d=10, seeds=1, samples=None, steps=None)
    check_caps(small_exp(), [], limits)  # theory only
    with pytest.raises(CapError):
        check_caps(small_exp(), ["gd"], limits)


def test_dashboard_refuses_run_over_cap(clean_env):
    from app.dashboard import Dashboard

    gate = threading.Event()
    gate.set()
    eng = {"theory": gated_engine(gate), "sim": gated_engine(gate)}
    d = Dashboard(experiment=small_exp(d=600), engines=eng, period_ms=0, sync_url=False)
    try:
        clean_env.setenv("SGF_DMFT_MAX_D", "500")
        assert d.run() is False
        assert d.alert.visible and "d = 600" in d.alert.object and "500" in d.alert.object
        assert "SGF_DMFT_MAX_D" in d.alert.object and d.store.current is None
        assert not d.runner.busy()
        d.experiment.d = 500
        assert d.run() is True and not d.alert.visible
        assert d.wait(10)
    finally:
        d.close()


# --- the pool -----------------------------------------------------------------------------
def test_pool_bounds_concurrency_and_reports_queue_positions():
    p = Pool(2, idle_s=0.2)
    gate = threading.Event()
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "ran": 0}

    def job():
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        gate.wait(5)
        with lock:
            state["now"] -= 1
            state["ran"] += 1

    groups = [Group(2) for _ in range(5)]
    tickets = []
    for g in groups:  # twenty jobs of five sessions
        ts = [Ticket(job, g, threading.Event()) for _ in range(4)]
        tickets += ts
        p.submit(ts)
    wait_for(lambda: p.stats()["running"] == 2, what="two running jobs")
    # the first session holds both workers (2 more queued); the others wait in submission order
    assert [p.position(g) for g in groups] == [0, 2, 6, 10, 14]
    assert p.stats()["threads"] == 2 and p.stats()["queued"] == 18
    gate.set()
    for t in tickets:
        assert t.done.wait(5)
    assert state == {"now": 0, "max": 2, "ran": 20}
    assert all(p.position(g) is None for g in groups)
    # idle workers end
    wait_for(lambda: p.stats()["threads"] == 0, what="idle workers to end")


def test_pool_group_limit_and_fifo_order():
    p = Pool(3, idle_s=0.2)
    order = []
    g = Group(1)
    ts = [Ticket(lambda i=i: order.append(i), g, threading.Event()) for i in range(6)]
    p.submit(ts)
    for t in ts:
        assert t.done.wait(5)
    assert order == list(range(6))  # limit 1: one at a time, in order


def test_pool_cancel_queued_and_running():
    p = Pool(1, idle_s=0.2)
    started, gate = threading.Event(), threading.Event()
    c1, c2 = threading.Event(), threading.Event()
    ran, dropped = [], []

    def blocking():
        started.set()
        while not c1.is_set() and not gate.is_set():
            time.sleep(0.005)
        ran.append("first")

    t1 = Ticket(blocking, Group(1), c1)
    t2 = Ticket(lambda: ran.append("second"), Group(1), c2, on_drop=lambda: dropped.append(2))
    p.submit([t1, t2])
    assert started.wait(5)
    assert p.position(t2.group) == 0
    c2.set()  # cancel the queued job: it never runs
    assert p.purge() == 1 and t2.done.is_set() and dropped == [2]
    c1.set()  # cancel the running job: it returns
    assert t1.done.wait(5)
    assert ran == ["first"]


def test_runner_queues_on_shared_pool_and_stop_drops_queued_jobs():
    p = Pool(1, idle_s=0.2)
    gate, started = threading.Event(), threading.Event()
    a = Runner({"theory": gated_engine(gate, started)}, pool=p)
    b = Runner({"theory": gated_engine(gate)}, pool=p)
    a.start([Job("theory", "theory", small_exp())])
    assert started.wait(5)
    b.start([Job("theory", "theory", small_exp()), Job("gd", "theory", small_exp())])
    assert a.queue_position() is None and b.queue_position() == 0
    b.stop()  # queued jobs: dropped without running, reported as cancelled
    assert b.join(2) and b.queue_position() is None
    assert [(e.key, e.kind) for e in b.drain()] == [("theory", "cancelled"), ("gd", "cancelled")]
    assert a.busy()
    a.shutdown()  # session ended: its running job stops
    assert a.join(5)
    assert [e.kind for e in a.drain()][-1] == "cancelled"


def test_new_run_replaces_queued_run():
    p = Pool(1, idle_s=0.2)
    gate, started = threading.Event(), threading.Event()
    other = Runner({"theory": gated_engine(gate, started)}, pool=p)
    other.start([Job("theory", "theory", small_exp())])
    assert started.wait(5)
    r = Runner({"theory": gated_engine(gate)}, pool=p)
    r.start([Job("theory", "theory", small_exp())])
    second = r.start([Job("theory", "theory", small_exp())])
    assert p.stats()["queued"] == 1  # the first run's job was dropped from the queue
    gate.set()
    assert r.join(5) and other.join(5)
    evs = r.drain()
    assert evs and {e.run_id for e in evs} == {second} and evs[-1].kind == "done"


def test_event_queue_is_bounded_and_stop_releases_a_full_queue():
    p = Pool(1, idle_s=0.2)
    gate = threading.Event()
    gate.set()
    r = Runner({"theory": gated_engine(gate, n_snaps=1000)}, pool=p, queue_size=10)
    r.start([Job("theory", "theory", small_exp())])
    wait_for(lambda: r._queue.full(), what="a full queue")
    time.sleep(0.05)
    assert r._queue.qsize() == 10 and r.busy()  # the job waits, the queue does not grow
    r.stop()
    assert r.join(5)


def test_session_close_ends_its_jobs(monkeypatch):
    from app.dashboard import Dashboard

    p = Pool(1, idle_s=0.2)
    monkeypatch.setattr(pool_mod, "_SHARED", p)
    gate, started = threading.Event(), threading.Event()
    eng = {"theory": gated_engine(gate, started), "sim": gated_engine(gate)}
    d = Dashboard(experiment=small_exp(), engines=eng, period_ms=0, sync_url=False)
    assert d.runner.pool is p
    d.run()
    assert started.wait(5)
    d.tick()
    assert "place in the server's queue: 1" in d.status.object  # the sims wait for the worker
    runner = d.runner
    d.close()
    assert runner.join(5) and p.stats()["queued"] == 0
    wait_for(lambda: p.stats()["threads"] == 0, what="the idle worker to end")


# --- redraw pacing shared by the sessions ------------------------------------------------
def test_draw_pacer_shares_the_loop_between_sessions():
    from app.runner import DrawPacer

    p = DrawPacer(share=0.25, window=60.0)
    a, b = object(), object()
    # one session alone: the per-session rule (wait 3x the drawing cost, at least the period)
    assert p.delay(a, 0.1, 0.15) == pytest.approx(0.3)
    assert p.delay(a, 0.01, 0.15) == pytest.approx(0.15)
    # ten sessions drawing: each waits (10 / share - 1) x cost, so that their drawing together
    # stays at share of the time: cost / (cost + wait) = share / 10
    others = [object() for _ in range(9)]
    for o in others:
        p.delay(o, 0.1, 0.15)
    w = p.delay(b, 0.1, 0.15)
    assert p.active() == 11
    assert w == pytest.approx(0.1 * (11 / 0.25 - 1))
    assert 11 * 0.1 / (0.1 + w) == pytest.approx(0.25)
    # sessions that stopped drawing no longer count
    q = DrawPacer(share=0.25, window=0.0)
    for o in others:
        q.delay(o, 0.1, 0.15)
    time.sleep(0.01)
    assert q.delay(a, 0.1, 0.15) == pytest.approx(0.3)


def test_first_snapshot_hook_is_called_once_per_job_after_it_is_queued():
    """The dashboard draws the theory's first point when this hook fires, not at its next
    periodic tick: it must fire once per job, from the worker, with that snapshot already
    in the session's queue; a failing hook must not stop the engine."""
    p = Pool(2, idle_s=0.2)
    gate = threading.Event()
    r = Runner({"theory": gated_engine(gate, n_snaps=3)}, pool=p)
    seen = []

    def hook(key):
        queued = [e for e in list(r._queue.queue) if e.key == key]
        seen.append((key, threading.current_thread() is not threading.main_thread(),
                     [e.kind for e in queued]))
        raise RuntimeError("a broken hook")

    r.on_first_snapshot = hook
    r.start([Job("theory", "theory", small_exp()), Job("gd", "theory", small_exp())])
    wait_for(lambda: len(seen) == 2, what="both hooks")
    gate.set()
    assert r.join(5)
    assert sorted(k for k, _, _ in seen) == ["gd", "theory"]
    for _, worker, kinds in seen:
        assert worker and "snap" in kinds  # from the worker, the snapshot already queued
    for _, _, kinds in seen:  # exactly the job's first snapshot was queued when it fired
        assert kinds.count("snap") == 1, kinds
    assert sum(e.kind == "snap" for e in r.drain()) == 2 * 3  # the engines went on
