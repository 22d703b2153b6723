"""Compile (or load from NUMBA_CACHE_DIR) every numba kernel by running tiny problems.

``python -m solver.warmup`` at image build time fills the cache; the dashboard calls
:func:`warmup` in a background thread at server start so that the first Run is not slowed
by compilation.
"""
from __future__ import annotations

import threading
import time

from .config import Experiment

_done = threading.Event()
_lock = threading.Lock()


def _tiny_configs():
    base = dict(d=20, delta=2.0, T=0.2, dt=0.05, samples=64, seeds=1)
    for loss, teacher in (("logistic", "sign"), ("square", "linear"), ("square", "sign")):
        for algo in ("gd", "sgf", "sgd"):
            yield Experiment(loss=loss, teacher=teacher, algo=algo, batch=2, **base)
    yield Experiment(loss="logistic", teacher="sign", algo="sgd", sampling="reshuffle", batch=2, **base)


def _committee_configs():
    """Tiny committee problems (k = k* = 2): SGF and SGD in the simulator (GD shares SGF's
    kernel), the Monte Carlo DMFT, the online ODEs. The activation is a run-time code in every
    numba kernel, so erf compiles them all, except the online ODEs' relu and tanh averages."""
    base = dict(model="committee", loss="square", teacher="linear", k=2, kstar=2, q0=0.1, m0=0.2,
                d=20, delta=2.0, T=0.2, dt=0.05, samples=64, seeds=1, batch=2)
    for algo in ("sgf", "sgd"):
        yield Experiment(algo=algo, activation="erf", **base)


def warmup(verbose: bool = False) -> float:
    """Run every engine once on a tiny problem; returns seconds spent. Thread-safe, idempotent."""
    from . import dmft, simulate
    from .committee import online
    from .dmft import committee

    with _lock:
        if _done.is_set():
            return 0.0
        t0 = time.perf_counter()
        for exp in _tiny_configs():
            for _ in simulate.stream(exp):
                pass
        for exp in _tiny_configs():
            if exp.algo != "gd":  # the theory does not depend on the simulated algorithm
                continue
            for method in ("mc", "online") + (("exact",) if exp.resolved_method() == "exact" else ()):
                for _ in dmft.stream(exp.copy(method=method)):
                    pass
        for exp in _committee_configs():
            for _ in simulate.stream(exp):
                pass
            if exp.algo == "sgf":
                for _ in committee.stream(exp, replicas=0):
                    pass
                for act in ("erf", "relu", "tanh"):
                    for _ in online.stream(exp.copy(activation=act, T=0.1)):
                        pass
        _done.set()
        dt = time.perf_counter() - t0
        if verbose:
            print(f"sgf-dmft: kernels ready in {dt:.1f} s")
        return dt


def warmup_in_background() -> threading.Thread:
    th = threading.Thread(target=warmup, name="sgf-dmft-warmup", daemon=True)
    th.start()
    return th


def is_warm() -> bool:
    return _done.is_set()


if __name__ == "__main__":
    warmup(verbose=True)
