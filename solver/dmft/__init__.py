"""DMFT of the SGF (THEORY.md sections 3-4): one entry point, three methods.

``exp.resolved_method()`` picks the engine:

* ``'mc'``     Monte Carlo forward sweep (:mod:`solver.dmft.glm`), any GLM loss/teacher;
* ``'exact'``  square loss with linear teacher, deterministic closure (:mod:`solver.dmft.exact`);
* ``'online'`` delta -> infinity ODEs (:mod:`solver.dmft.online`).

The engine modules are imported lazily, so that importing :mod:`solver.dmft` stays cheap and
does not compile anything.
"""
from __future__ import annotations

from ..snapshot import Result, collect


def _engine(method: str):
    if method == "mc":
        from . import glm

        return glm.stream
    if method == "exact":
        from . import exact

        return exact.stream
    if method == "online":
        from . import online

        return online.stream
    raise ValueError(f"unknown DMFT method {method!r}")


def stream(exp, cancel=None):
    """Yield one :class:`~solver.snapshot.Snapshot` per recording time (see the engine contract
    in :mod:`solver.snapshot`); raises SolverError on divergence after what was computed."""
    if exp.model == "committee":
        if exp.resolved_method() == "online":
            from ..committee import online

            return online.stream(exp, cancel)
        from . import committee

        return committee.stream(exp, cancel)
    return _engine(exp.resolved_method())(exp, cancel)


def solve(exp, cancel=None, callback=None) -> Result:
    """Collect :func:`stream` into a Result; ``callback(snapshot)`` is called for each snapshot.

    On divergence the SolverError is re-raised with ``err.result`` holding the snapshots computed
    before it (``status='diverged'``); a cancelled run returns ``status='cancelled'``."""
    return collect(stream(exp, cancel), exp.to_dict(), "", cancel, callback)


run = solve
