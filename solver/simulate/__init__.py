"""Finite-size simulation of GD, the SGF (Euler-Maruyama) and minibatch SGD for GLMs (k = 1).

THEORY.md section 2. Per seed ``s``: its own data set (``np.random.default_rng(exp.seed + s)``,
see :mod:`.data`) and its own dynamics noise; all seeds advance in lockstep and every recording
time yields one :class:`~solver.snapshot.Snapshot` (engine ``'sim-' + algo``) with the mean and
standard error over seeds of ``train_loss`` (mean loss over the n training samples, no penalty),
``test_loss``/``test_error`` (Gaussian formula of :func:`solver.observables.metrics` from each
seed's ``m``, ``Q``), ``m = theta.theta*/d``, ``Q = |theta|^2/d`` and ``cosine``; extras
``theta_hist``/``field_hist`` (``(edges, density)``, pooled over seeds) and ``seeds`` (the
per-seed values).

* ``algo='gd'``: full-batch GD with step dt (``eta = dt*d`` in SGD units).
* ``algo='sgf'``: Euler-Maruyama SGF with step dt, one Brownian increment per sample and step.
* ``algo='sgd'``: minibatch SGD, ``eta = tau*batch``, time ``eta/d`` per step; ``sampling='fresh'``
  draws B distinct samples afresh each step (what the SGF describes); ``'reshuffle'`` runs epochs
  of random reshuffling (outside the theory). Recording time ``t_k = k dt`` is taken at SGD step
  ``floor(t_k d/eta + 1e-9)``; the snapshot carries that step's exact time.
"""
from __future__ import annotations

from ..snapshot import Result, collect
from .data import Dataset, draw
from .engine import stream

__all__ = ["stream", "run", "draw", "Dataset"]


def run(exp, cancel=None, callback=None, **kw) -> Result:
    """Collect :func:`stream` into a Result; ``callback(snapshot)`` is called on each snapshot.

    On divergence the SolverError is re-raised with ``.result`` holding what was computed
    (``status='stopped'``); a cancelled run returns the partial Result with ``status='cancelled'``.
    """
    return collect(stream(exp, cancel, **kw), exp.to_dict(), "sim-" + exp.algo, cancel, callback,
                   error_status="stopped")