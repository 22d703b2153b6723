"""Scheduling: worker threads run the engines, a queue carries their snapshots to the session.

Nothing here touches Panel or Bokeh, so it is tested headless. One :class:`Runner` per browser
session. ``start(jobs)`` cancels the previous run (queued jobs are dropped, running engines
notice within their cancel latency, < 1 s) and queues one job per engine call, in order (so
the theory, listed first, starts first), on the process-wide :func:`app.pool.shared_pool`
(``SGF_DMFT_WORKERS`` threads shared by every session). At most ``max_workers`` jobs of a
session run at once, so a new run's jobs wait for the old ones to let go.
Jobs only put :class:`Event` objects on a bounded queue (``queue_size``; a full queue makes the
job wait, never grow); the session's periodic callback calls :meth:`Runner.drain` and draws.
Events of a cancelled run are dropped.

Engines are looked up lazily (``solver.dmft.stream`` for ``kind='theory'``,
``solver.simulate.stream`` for ``kind='sim'``) so that the app imports without them; tests
inject fakes with the same signature ``stream(exp, cancel) -> Iterator[Snapshot]``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .pool import Group, Pool, Ticket, env_float, shared_pool

log = logging.getLogger(__name__)

#: kind -> module whose ``stream(exp, cancel)`` runs it.
ENGINE_MODULES = {"theory": "solver.dmft", "sim": "solver.simulate"}

StreamFn = Callable[..., Iterator[Any]]


def default_engine(kind: str) -> StreamFn:
    """The real engine for ``kind`` ('theory' or 'sim'), imported on first use."""
    mod = importlib.import_module(ENGINE_MODULES[kind])
    return mod.stream


def engines_available() -> dict[str, bool]:
    """Which real engines can be imported (without importing them twice)."""
    out = {}
    for kind, name in ENGINE_MODULES.items():
        try:
            importlib.import_module(name)
            out[kind] = True
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            out[kind] = False
    return out


@dataclass
class Job:
    """One engine call: ``key`` names the series ('theory', 'sgf', ...), ``exp`` its config."""

    key: str
    kind: str  # 'theory' | 'sim'
    exp: Any
    label: str = ""


@dataclass
class Event:
    """What a worker reports. kind: 'start' | 'snap' | 'done' | 'error' | 'cancelled'."""

    run_id: int
    key: str
    kind: str
    payload: Any = None
    time: float = field(default_factory=time.perf_counter)


def parallel_threadsafe() -> bool:
    """Whether numba's threading layer allows parallel kernels called from several threads.

    'omp' and 'tbb' do; 'workqueue' aborts the process on concurrent use, so the runner then
    lets one theory job at a time (process-wide) call the engines.
    """
    try:
        import numba
    except ImportError:
        return True
    if str(numba.config.THREADING_LAYER).lower() == "workqueue":
        return False
    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:  # no parallel kernel has run yet: which layer would load?
        for mod in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
            try:
                importlib.import_module(mod)
                return True
            except Exception:  # noqa: BLE001
                continue
        return False


#: Process-wide guard for parallel (theory) kernels when the threading layer is not threadsafe.
_PARALLEL_GUARD = threading.Lock()


def parallel_guard():
    """Context for running a parallel (numba prange) kernel from a worker thread: the
    process-wide lock when numba's threading layer is not threadsafe, else nothing."""
    return _PARALLEL_GUARD if not parallel_threadsafe() else contextlib.nullcontext()


def _put(q: queue.Queue, ev: Event, cancel: threading.Event) -> bool:
    """Put on a bounded queue without blocking forever (gives up once cancelled)."""
    while True:
        try:
            q.put(ev, timeout=0.1)
            return True
        except queue.Full:
            if cancel.is_set():
                return False


def _run_job(run_id: int, job: Job, fn: StreamFn, cancel: threading.Event,
             q: queue.Queue, first=None) -> None:
    try:
        _put(q, Event(run_id, job.key, "start"), cancel)
        with parallel_guard() if job.kind == "theory" else contextlib.nullcontext():
            _run_stream(run_id, job, fn, cancel, q, first)
        _put(q, Event(run_id, job.key, "cancelled" if cancel.is_set() else "done"), cancel)
    except Exception as e:  # noqa: BLE001 - every failure is shown to the user, never raised
        from solver.snapshot import SolverError

        from solver.config import ConfigError

        if isinstance(e, (SolverError, ConfigError)):
            msg = str(e)
        else:
            log.error("engine %s failed:\n%s", job.key, traceback.format_exc())
            msg = f"{type(e).__name__}: {e}"
        _put(q, Event(run_id, job.key, "error", msg), cancel)


def _run_stream(run_id: int, job: Job, fn: StreamFn, cancel: threading.Event,
                q: queue.Queue, first=None) -> None:
    gen = fn(job.exp, cancel)
    try:
        for snap in gen:
            if not _put(q, Event(run_id, job.key, "snap", snap), cancel):
                break
            if cancel.is_set():
                break
            if first is not None:  # the job's first snapshot is queued: tell the session
                try:
                    first(job.key)
                except Exception:  # noqa: BLE001 - a hook never stops the engine
                    log.exception("first-snapshot hook failed")
                first = None
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()


class Runner:
    """The jobs of one session, run by the shared pool; see the module docstring."""

    def __init__(self, engines: dict[str, StreamFn] | None = None, max_workers: int | None = None,
                 queue_size: int = 20000, pool: Pool | None = None):
        self.engines = dict(engines or {})
        self.pool = pool or shared_pool()
        self.max_workers = max_workers or self.pool.workers
        self._group = Group(self.max_workers)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._cancel = threading.Event()
        self._tickets: list[Ticket] = []
        self._lock = threading.Lock()
        self.run_id = 0
        self.t_start = 0.0
        #: ``f(job_key)``, called from the worker thread once a job's first snapshot is queued
        #: (the dashboard draws it then instead of at its next periodic tick)
        self.on_first_snapshot = None

    def engine(self, kind: str) -> StreamFn:
        if kind not in self.engines:
            self.engines[kind] = default_engine(kind)
        return self.engines[kind]

    def start(self, jobs: list[Job]) -> int:
        """Cancel the current run (without waiting) and queue ``jobs``; returns the new run id.

        Engines are resolved first, so a missing engine raises here and nothing starts.
        """
        fns = [self.engine(j.kind) for j in jobs]
        with self._lock:
            self._cancel.set()
            self.pool.purge()
            self.run_id += 1
            cancel = self._cancel = threading.Event()
            self.t_start = time.perf_counter()
            self._tickets = [t for t in self._tickets if not t.done.is_set()]
            q, rid = self._queue, self.run_id
            new = []
            for job, fn in zip(jobs, fns):
                def run(job=job, fn=fn):
                    if cancel.is_set():
                        _put(q, Event(rid, job.key, "cancelled"), cancel)
                    else:
                        _run_job(rid, job, fn, cancel, q, self.on_first_snapshot)

                def drop(job=job):
                    try:
                        q.put_nowait(Event(rid, job.key, "cancelled"))
                    except queue.Full:
                        pass

                new.append(Ticket(run, self._group, cancel, drop))
            self._tickets.extend(new)
            self.pool.submit(new)
            return self.run_id

    def stop(self) -> None:
        """Ask the current run to stop: queued jobs are dropped, running engines return
        within their cancel latency."""
        self._cancel.set()
        self.pool.purge()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def busy(self) -> bool:
        """Whether any job (of any run of this session) is queued or running."""
        return any(not t.done.is_set() for t in self._tickets)

    def queue_position(self) -> int | None:
        """Jobs of the server queued ahead of this session's first queued job (None: none
        of its jobs waits)."""
        if self._cancel.is_set():
            return None
        return self.pool.position(self._group)

    @property
    def group(self):
        """This session's :class:`~app.pool.Group` on the shared pool (its cap and queue)."""
        return self._group

    def drain(self, max_events: int = 100000) -> list[Event]:
        """Events of the current run queued since the last call (older runs' are dropped)."""
        out = []
        for _ in range(max_events):
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                break
            if ev.run_id == self.run_id:
                out.append(ev)
        return out

    def join(self, timeout: float = 5.0) -> bool:
        """Wait for every job of this session to end; True if all ended."""
        deadline = time.monotonic() + timeout
        for t in list(self._tickets):
            t.done.wait(max(0.0, deadline - time.monotonic()))
        return not self.busy()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Cancel and forget (session closed); optionally wait for the jobs."""
        self.stop()
        if timeout:
            self.join(timeout)
        self.engines.clear()


class DrawPacer:
    """Process-wide pacing of the sessions' redraws: every session draws on the one event
    loop of the server, so their drawing must share it.

    A session reports each redraw's cost (seconds of the loop it took) with :meth:`delay`,
    which returns how long the session waits before its next redraw:
    ``max(period, cost * (active / share - 1))``, ``active`` = the sessions that drew in the
    last ``window`` seconds. Together the sessions then spend at most about ``share`` of the
    loop's time drawing, and widget events find it free the rest of the time. One session
    alone waits ``3 * cost`` at the default ``share = 0.25`` (the per-session rule this
    replaces); ten sessions each wait ``39 * cost``. ``SGF_DMFT_DRAW_SHARE`` sets ``share``.

    Every redraw also costs the *browser* (it re-renders the plots), which the server's cost
    does not show once redraws are cheap (app/draw.py streams only the new points): at least
    ``interval * active`` seconds pass between a session's redraws, so the sessions together
    redraw at most ``1 / interval`` times a second (``SGF_DMFT_DRAW_INTERVAL``, default 0.1 s:
    one session every 0.15 s period, ten every 1 s each).
    Holds no references to sessions (keys are ids).
    """

    def __init__(self, share: float = 0.25, window: float = 3.0, interval: float = 0.1):
        self.share = min(1.0, max(0.01, float(share)))
        self.interval = max(0.0, float(interval))
        self.window = window
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()

    def delay(self, session: object, cost: float, period: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self._last[id(session)] = now
            for k in [k for k, t in self._last.items() if now - t > self.window]:
                del self._last[k]
            active = len(self._last)
        return max(period, cost * (active / self.share - 1.0), self.interval * active)

    def active(self) -> int:
        now = time.perf_counter()
        with self._lock:
            return sum(now - t <= self.window for t in self._last.values())


_PACER: DrawPacer | None = None

#: ``SGF_DMFT_INTERACT_QUIET`` (seconds; 0 = off): how long a session's plot redraws and status
#: line wait after an edit of its configuration while its runs stream (see
#: :func:`interaction_quiet`).
INTERACT_QUIET_ENV = "SGF_DMFT_INTERACT_QUIET"
INTERACT_QUIET_DEFAULT = 0.75


def interaction_quiet() -> float:
    """Seconds a session holds back its redraws after the user edits a value during a run
    (``SGF_DMFT_INTERACT_QUIET``, default 0.75 s; 0 turns it off).

    Every redraw makes the browser repaint up to six plots (BokehJS repaints a plot's canvas
    whole, reading its CSS for every glyph), the page's main thread busy for tens of ms, much
    longer on a machine whose cores are shared. The edit's dependent update (the "n = δd"
    line, a widget shown or hidden) then waits behind the repaint in the page. Holding the
    session's redraws for a moment after an edit leaves the page free to show the response;
    the snapshots stay in the store, and the first redraw after the pause draws them all."""
    return max(0.0, env_float(INTERACT_QUIET_ENV, INTERACT_QUIET_DEFAULT))


def draw_pacer() -> DrawPacer:
    """The process-wide :class:`DrawPacer` (``SGF_DMFT_DRAW_SHARE``, default 0.25;
    ``SGF_DMFT_DRAW_INTERVAL``, default 0.1 s)."""
    global _PACER
    if _PACER is None:
        _PACER = DrawPacer(env_float("SGF_DMFT_DRAW_SHARE", 0.25),
                           interval=env_float("SGF_DMFT_DRAW_INTERVAL", 0.1))
    return _PACER
