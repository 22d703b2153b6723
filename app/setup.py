"""Process-wide start-up for the dashboard server: warm the numba kernels in the background.

Used as ``panel serve --setup app/setup.py`` by ``sgf-dmft serve`` and called (idempotently)
by ``app/main.py``. Set ``SGF_DMFT_NO_WARMUP=1`` to skip it (tests with fake engines).
"""
from __future__ import annotations

import os
import threading

_started = threading.Event()


def start_warmup() -> bool:
    """Start solver.warmup in a daemon thread once per process; False if skipped."""
    if _started.is_set() or os.environ.get("SGF_DMFT_NO_WARMUP"):
        return False
    _started.set()
    try:
        from solver.warmup import warmup_in_background
    except ImportError:
        return False

    def run():
        try:
            warmup_in_background().join()
        except Exception:  # noqa: BLE001 - engines not there yet: the first Run compiles
            pass

    threading.Thread(target=run, name="sgf-dmft-warmup-start", daemon=True).start()
    return True


if __name__ != "app.setup":  # run as a script (panel serve --setup app/setup.py)
    from app.setup import start_warmup as _start  # the importable module holds the flag

    _start()
