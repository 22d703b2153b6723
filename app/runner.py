"""Scheduling: worker threads run the engines, a queue carries their snapshots to the session.

Nothing here touches Panel or Bokeh, so it is tested headless. One :class:`Runner` per browser
session. ``start(jobs)`` cancels the previous run (its threads notice within the engines'
cancel latency, < 1 s) and starts up to ``max_workers`` worker threads that take the jobs in
order (so the theory, listed first, starts first); a worker computes only once it holds one of
the runner's ``max_workers`` slots, so a new run's threads wait for the old ones to let go.
Workers only put :class:`Event` objects on a bounded queue; the session's periodic callback
calls :meth:`Runner.drain` and draws. Events of a cancelled run are dropped.

Engines are looked up lazily (``solver.dmft.stream`` for ``kind='theory'``,
``solver.simulate.stream`` for ``kind='sim'``) so that the app imports without them; tests
inject fakes with the same signature ``stream(exp, cancel) -> Iterator[Snapshot]``.
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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


def _put(q: queue.Queue, ev: Event, cancel: threading.Event) -> bool:
    """Put on a bounded queue without blocking forever (gives up once cancelled)."""
    while True:
        try:
            q.put(ev, timeout=0.1)
            return True
        except queue.Full:
            if cancel.is_set():
                return False


def _worker(run_id: int, pending: "deque[tuple[Job, StreamFn]]", lock: threading.Lock,
            cancel: threading.Event, q: queue.Queue, slots: threading.Semaphore) -> None:
    """Take a compute slot, then run the run's pending jobs in order until none is left."""
    got = False
    while not cancel.is_set():
        if slots.acquire(timeout=0.05):
            got = True
            break
    try:
        while True:
            with lock:
                if not pending:
                    return
                job, fn = pending.popleft()
            if not got or cancel.is_set():
                _put(q, Event(run_id, job.key, "cancelled"), cancel)
                continue
            _run_job(run_id, job, fn, cancel, q)
    finally:
        if got:
            slots.release()


def _run_job(run_id: int, job: Job, fn: StreamFn, cancel: threading.Event,
             q: queue.Queue) -> None:
    try:
        _put(q, Event(run_id, job.key, "start"), cancel)
        if job.kind == "theory" and not parallel_threadsafe():
            with _PARALLEL_GUARD:
                _run_stream(run_id, job, fn, cancel, q)
        else:
            _run_stream(run_id, job, fn, cancel, q)
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
                q: queue.Queue) -> None:
    gen = fn(job.exp, cancel)
    try:
        for snap in gen:
            if not _put(q, Event(run_id, job.key, "snap", snap), cancel):
                break
            if cancel.is_set():
                break
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()


class Runner:
    """Worker threads for one session; see the module docstring."""

    def __init__(self, engines: dict[str, StreamFn] | None = None, max_workers: int | None = None,
                 queue_size: int = 20000):
        self.engines = dict(engines or {})
        self.max_workers = max_workers or max(2, os.cpu_count() or 2)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._slots = threading.Semaphore(self.max_workers)
        self._cancel = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.run_id = 0
        self.t_start = 0.0

    def engine(self, kind: str) -> StreamFn:
        if kind not in self.engines:
            self.engines[kind] = default_engine(kind)
        return self.engines[kind]

    def start(self, jobs: list[Job]) -> int:
        """Cancel the current run (without waiting) and start ``jobs``; returns the new run id.

        Engines are resolved first, so a missing engine raises here and nothing starts.
        """
        fns = [self.engine(j.kind) for j in jobs]
        with self._lock:
            self._cancel.set()
            self.run_id += 1
            self._cancel = threading.Event()
            self.t_start = time.perf_counter()
            self._threads = [t for t in self._threads if t.is_alive()]
            pending = deque(zip(jobs, fns))
            lock = threading.Lock()
            for i in range(min(self.max_workers, len(jobs))):
                th = threading.Thread(target=_worker, name=f"sgf-dmft-run{self.run_id}-w{i}",
                                      args=(self.run_id, pending, lock, self._cancel,
                                            self._queue, self._slots), daemon=True)
                self._threads.append(th)
                th.start()
            return self.run_id

    def stop(self) -> None:
        """Ask the current run to stop; engines return within their cancel latency."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def busy(self) -> bool:
        """Whether any worker thread (of any run) is still alive."""
        return any(t.is_alive() for t in self._threads)

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
        """Wait for every worker thread; True if all ended."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        return not self.busy()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Cancel and forget (session closed); optionally wait for the threads."""
        self.stop()
        if timeout:
            self.join(timeout)
        self.engines.clear()
