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


def warmup(verbose: bool = False) -> float:
    """Run every engine once on a tiny problem; returns seconds spent. Thread-safe, idempotent."""
    from . import dmft, simulate

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
