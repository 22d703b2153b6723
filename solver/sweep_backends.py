"""Execution backends of :mod:`solver.sweep`: serial, thread pool, process pool, Dask.

Every backend takes a list of tasks and a ``compute(task, cancel) -> dict`` function that never
raises, and yields ``(task, outcome)`` in completion order. Leaving the iteration early (break,
exception, ``cancel.set()``) cancels what has not started; on the in-process backends running
points see the cancel flag and stop at their next snapshot. A LocalCluster started here is shut
down when the iteration ends.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import os
import threading
import time
import uuid
import warnings
from typing import Callable, Iterator

BACKENDS = ("serial", "threads", "processes", "dask")
_POLL_S = 0.1


class _AnyEvent(threading.Event):
    """An Event that also reads as set when any parent event is set (user cancel + our stop)."""

    def __init__(self, *parents):
        super().__init__()
        self._parents = [p for p in parents if p is not None]

    def is_set(self) -> bool:
        return super().is_set() or any(p.is_set() for p in self._parents)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def numba_threadsafe() -> bool:
    """Whether numba's parallel kernels may be launched from several threads at once.

    The 'tbb' and 'omp' threading layers allow it; 'workqueue' (what numba falls back to when
    neither TBB nor libgomp is installed) aborts the process on concurrent launches.
    """
    try:
        import numba
    except ImportError:  # pragma: no cover
        return True
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # no parallel kernel launched yet: which layer would load?
        pass
    layer = numba.config.THREADING_LAYER
    if layer == "workqueue":
        return False
    if layer in ("tbb", "omp", "threadsafe"):
        return True
    for mod in ("numba.np.ufunc.tbbpool", "numba.np.ufunc.omppool"):
        try:
            importlib.import_module(mod)
            return True
        except (ImportError, OSError):
            continue
    return False


def run_tasks(tasks: list, compute: Callable, *, backend: str = "threads", workers: int | None = None,
              scheduler: str | None = None, client=None, cancel: threading.Event | None = None,
              dask_processes: bool = False) -> Iterator[tuple]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    workers = workers or default_workers()
    if backend in ("threads", "dask") and client is None and scheduler in (None, "", "local") \
            and not dask_processes and workers > 1 and not numba_threadsafe():
        if backend == "threads":
            warnings.warn("numba has no thread-safe threading layer (install libgomp1 or tbb): "
                          "running the sweep serially", RuntimeWarning, stacklevel=3)
            backend = "serial"
        else:
            warnings.warn("numba has no thread-safe threading layer (install libgomp1 or tbb): "
                          "using Dask worker processes", RuntimeWarning, stacklevel=3)
            dask_processes = True
    if backend == "serial":
        yield from _serial(tasks, compute, cancel)
    elif backend == "threads":
        yield from _pool(tasks, compute, cf.ThreadPoolExecutor(workers, "sgf-sweep"), cancel,
                         pass_cancel=True)
    elif backend == "processes":
        import multiprocessing as mp

        ex = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        yield from _pool(tasks, compute, ex, cancel, pass_cancel=False)
    else:
        yield from _dask(tasks, compute, workers, scheduler, client, cancel, dask_processes)


def _serial(tasks, compute, cancel):
    for task in tasks:
        if cancel is not None and cancel.is_set():
            return
        yield task, compute(task, cancel)


def _pool(tasks, compute, executor, cancel, pass_cancel):
    stop = _AnyEvent(cancel)
    with executor:
        try:
            futs = {}
            for task in tasks:
                if pass_cancel:
                    futs[executor.submit(compute, task, stop)] = task
                else:
                    futs[executor.submit(compute, task)] = task
            pending = set(futs)
            while pending:
                if stop.is_set():
                    return
                done, pending = cf.wait(pending, timeout=_POLL_S, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield futs[fut], _outcome(fut.result)
        finally:
            stop.set()
            for f in futs:
                f.cancel()


def _outcome(get):
    try:
        return get()
    except BaseException as e:  # a worker that died, a task that could not be pickled ...
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return {"result": None, "status": "error", "message": f"{type(e).__name__}: {e}",
                "wall_s": 0.0}


def start_local_cluster(workers: int, processes: bool = False):
    """A LocalCluster for a sweep: with processes=False one in-process worker with ``workers``
    threads (numba kernels release the GIL); with processes=True ``workers`` single-threaded
    worker processes. No dashboard (pass your own Client for that)."""
    from distributed import LocalCluster

    import logging

    # silence_logs: no warnings about the tasks cancelled when a sweep is interrupted
    if processes:
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=None, silence_logs=logging.ERROR)
    return LocalCluster(n_workers=1, threads_per_worker=workers, processes=False,
                        dashboard_address=None, silence_logs=logging.ERROR)


def _dask(tasks, compute, workers, scheduler, client, cancel, processes):
    from distributed import Client, as_completed

    cluster = own_client = None
    try:
        if client is None:
            if scheduler in (None, "", "local"):
                cluster = start_local_cluster(workers, processes)
                own_client = Client(cluster)
            else:
                own_client = Client(scheduler, timeout="20s")
            client = own_client
        token = uuid.uuid4().hex[:12]
        futs = {}
        for task in tasks:
            fut = client.submit(compute, task, key=f"sgf-dmft-sweep-{token}-{task.index}-{task.kind}",
                                pure=False)
            futs[fut] = task
        ac = as_completed(list(futs))
        try:
            while not ac.is_empty():
                if cancel is not None and cancel.is_set():
                    return
                if not ac.has_ready():
                    time.sleep(_POLL_S / 2)
                    continue
                for fut in ac.next_batch(block=False):
                    task = futs[fut]
                    if fut.status == "error":
                        e = fut.exception()
                        out = {"result": None, "status": "error",
                               "message": f"{type(e).__name__}: {e}", "wall_s": 0.0}
                    elif fut.status == "cancelled":
                        out = {"result": None, "status": "error", "message": "cancelled by Dask",
                               "wall_s": 0.0}
                    else:
                        out = _outcome(fut.result)
                    fut.release()
                    yield task, out
        finally:
            left = [f for f in futs if not f.done()]
            if left:
                client.cancel(left)
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()
