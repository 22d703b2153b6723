"""Server policy: per-session caps on the cost of a Run, and one shared, process-wide worker pool.

Nothing here touches Panel. Two things an operator sets through environment variables:

* **Caps** (checked by the dashboard before Run; the Experiment's own bounds stay as they are):
  ``SGF_DMFT_MAX_D`` (dimension d of the simulations), ``SGF_DMFT_MAX_SAMPLES`` (Monte Carlo
  samples of the DMFT), ``SGF_DMFT_MAX_STEPS`` (grid steps T/dt), ``SGF_DMFT_MAX_SEEDS``
  (simulation seeds). ``0`` or ``none`` lifts a cap; an unreadable value keeps the default.
* **Workers**: ``SGF_DMFT_WORKERS`` (default 2) threads, shared by every session of the process,
  take the jobs (one engine call each) from one FIFO queue, so twenty sessions do not run
  twenty sets of solvers on two cores. A session (:class:`Group`) also has its own limit of
  concurrently running jobs; the first queued job whose session is under its limit starts.
  Worker threads start on demand and end after ``idle_s`` without work.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from typing import Callable

from solver.config import ConfigError

log = logging.getLogger(__name__)

#: cap name -> (environment variable, default for a 2-core server, what the user lowers).
CAPS = {
    "d": ("SGF_DMFT_MAX_D", 5000, "d"),
    "samples": ("SGF_DMFT_MAX_SAMPLES", 20000, "samples"),
    "steps": ("SGF_DMFT_MAX_STEPS", 5000, "T or raise dt"),
    "seeds": ("SGF_DMFT_MAX_SEEDS", 16, "seeds"),
}
WORKERS_ENV = "SGF_DMFT_WORKERS"
DEFAULT_WORKERS = 2
#: nice increment of the compute threads (workers, their numba and simulation threads, the
#: kernel warm-up); 0 keeps them at the server's priority.
NICE_ENV = "SGF_DMFT_WORKER_NICE"
DEFAULT_NICE = 10


class CapError(ConfigError):
    """A configuration above the server's per-session cap (``param`` names the parameter)."""


def env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    if raw.strip().lower() in ("0", "none", "off", "inf"):
        return None
    try:
        v = int(float(raw))
        if v < 1:
            raise ValueError
        return v
    except ValueError:
        log.warning("%s=%r is not a positive integer: using %s", name, raw, default)
        return default


def env_float(name: str, default: float) -> float:
    """A number from the environment; ``default`` when unset, empty or not a number."""
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        log.warning("%s=%r is not a number: using %s", name, raw, default)
        return default


def caps() -> dict[str, int | None]:
    """The caps in force (read from the environment on each call; None = no cap)."""
    return {k: env_int(env, default) for k, (env, default, _) in CAPS.items()}


def check_caps(exp, sims=("sim",), limits: dict | None = None) -> None:
    """Raise :class:`CapError` if ``exp`` exceeds a cap. d and seeds count only when
    simulations are run (``sims`` non-empty)."""
    limits = caps() if limits is None else limits
    values = {"samples": ("samples", exp.samples), "steps": ("T/dt", exp.steps)}
    if sims:
        values["d"] = ("d", exp.d)
        values["seeds"] = ("seeds", exp.seeds)
    for key, (pname, v) in values.items():
        cap = limits.get(key)
        if cap is not None and v > cap:
            env, _, lower = CAPS[key]
            what = f"T/dt = {v} steps" if key == "steps" else f"{pname} = {v}"
            raise CapError(pname, f"{what} is above this server's limit of {cap} per session "
                                  f"({env}); lower {lower}")


class Group:
    """The jobs of one session: at most ``limit`` of them run at once."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.running = 0


class Ticket:
    """One queued call. ``run()`` does the work; ``on_drop()`` is called instead when the
    ticket is cancelled before it starts. ``done`` is set once either has returned."""

    __slots__ = ("run", "on_drop", "group", "cancel", "state", "done")

    def __init__(self, run: Callable[[], None], group: Group, cancel: threading.Event,
                 on_drop: Callable[[], None] | None = None):
        self.run, self.on_drop, self.group, self.cancel = run, on_drop, group, cancel
        self.state = "queued"  # queued | running | done
        self.done = threading.Event()


class Pool:
    """``workers`` threads taking :class:`Ticket` objects from one FIFO queue."""

    def __init__(self, workers: int = DEFAULT_WORKERS, idle_s: float = 5.0):
        self.workers = max(1, int(workers))
        self.idle_s = idle_s
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._threads: set[threading.Thread] = set()
        self._running = 0
        self._n = 0

    # --- submitting -------------------------------------------------------------------
    def submit(self, tickets: list[Ticket]) -> None:
        with self._cv:
            self._waiting.extend(tickets)
            busy = self._running + len(self._waiting)
            while len(self._threads) < min(self.workers, busy):
                self._n += 1
                th = threading.Thread(target=self._work, name=f"sgf-dmft-pool-{self._n}",
                                      daemon=True)
                self._threads.add(th)
                th.start()
            self._cv.notify_all()

    def purge(self) -> int:
        """Drop the queued tickets whose cancel is set (calls their ``on_drop``)."""
        with self._cv:
            dropped = [t for t in self._waiting if t.cancel.is_set()]
            if dropped:
                self._waiting = deque(t for t in self._waiting if not t.cancel.is_set())
        for t in dropped:
            self._finish(t, ran=False)
        return len(dropped)

    # --- what sessions see ------------------------------------------------------------
    def position(self, group: Group) -> int | None:
        """Jobs (of any session) queued ahead of the group's first queued job; None if the
        group has nothing queued."""
        with self._cv:
            ahead = 0
            for t in self._waiting:
                if t.cancel.is_set():
                    continue
                if t.group is group:
                    return ahead
                ahead += 1
        return None

    def stats(self) -> dict:
        with self._cv:
            return {"workers": self.workers, "threads": len(self._threads),
                    "running": self._running,
                    "queued": sum(not t.cancel.is_set() for t in self._waiting)}

    # --- the workers --------------------------------------------------------------------
    def _take(self) -> Ticket | None:
        """Next runnable ticket (first in the queue whose group is under its limit), or None
        after ``idle_s`` without work (the thread then ends)."""
        me = threading.current_thread()
        dropped = []
        try:
            with self._cv:
                while True:
                    pick = None
                    for t in list(self._waiting):
                        if t.cancel.is_set():
                            self._waiting.remove(t)
                            dropped.append(t)
                        elif pick is None and t.group.running < t.group.limit:
                            pick = t
                    if pick is not None:
                        self._waiting.remove(pick)
                        pick.state = "running"
                        pick.group.running += 1
                        self._running += 1
                        return pick
                    if not self._cv.wait(self.idle_s) and not self._waiting:
                        self._threads.discard(me)
                        return None
        finally:
            for t in dropped:
                self._finish(t, ran=False)

    def _work(self) -> None:
        lower_priority()
        while True:
            t = self._take()
            if t is None:
                return
            try:
                t.run()
            except Exception:  # noqa: BLE001 - a job's failure must not kill the worker
                log.exception("pool job failed")
            finally:
                with self._cv:
                    t.group.running -= 1
                    self._running -= 1
                    self._cv.notify_all()
                self._finish(t, ran=True)

    def _finish(self, t: Ticket, ran: bool) -> None:
        if not ran and t.on_drop is not None:
            try:
                t.on_drop()
            except Exception:  # noqa: BLE001
                log.exception("pool on_drop failed")
        t.state = "done"
        t.done.set()


def lower_priority(increment: int | None = None) -> bool:
    """Lower the calling thread's CPU priority by ``increment`` (default ``$SGF_DMFT_WORKER_NICE``,
    10), for the compute threads: the threads it starts later (numba's, the simulations') inherit
    it. On a loaded server the event loop thread (and Panel's, at the normal priority) then gets a
    core first when a browser event arrives, while the runs still use every idle cycle. Linux
    (``setpriority`` of a thread id); False where not supported or not raised."""
    if increment is None:
        raw = os.environ.get(NICE_ENV, "").strip()
        try:
            increment = int(raw) if raw else DEFAULT_NICE
        except ValueError:
            log.warning("%s=%r is not an integer: using %s", NICE_ENV, raw, DEFAULT_NICE)
            increment = DEFAULT_NICE
    if increment <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + increment)
        if now >= target:
            return False
        os.setpriority(os.PRIO_PROCESS, tid, target)  # Linux: this thread only
        return True
    except (OSError, AttributeError):
        return False


_SHARED: Pool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> Pool:
    """The process-wide pool (``SGF_DMFT_WORKERS`` threads, default 2), created on first use."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Pool(env_int(WORKERS_ENV, DEFAULT_WORKERS) or DEFAULT_WORKERS)
        return _SHARED
