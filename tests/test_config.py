"""Experiment configuration: tau <-> eta, validation messages."""
import math

import pytest

from solver.config import ConfigError, Experiment


def test_tau_eta_batch_consistency():
    e = Experiment(tau=0.5, batch=8)
    assert e.eta == pytest.approx(4.0)
    e.batch = 16  # batch keeps tau
    assert e.tau == pytest.approx(0.5) and e.eta == pytest.approx(8.0)
    e.eta = 4.0  # eta sets tau
    assert e.tau == pytest.approx(0.25)
    assert Experiment(eta=2.0, batch=4).tau == pytest.approx(0.5)


def test_contradictory_tau_eta():
    with pytest.raises(ConfigError, match="eta"):
        Experiment(tau=1.0, eta=2.0, batch=1)


@pytest.mark.parametrize("kw,name", [
    (dict(q0=0.1, m0=1.0), "m0"),
    (dict(loss="logistic", teacher="linear"), "loss"),
    (dict(T=0.01, dt=0.05), "dt"),
    (dict(algo="sgd", d=10, delta=0.5, batch=6), "batch"),
    (dict(method="exact", loss="logistic"), "method"),
])
def test_cross_field_validation_names_parameter(kw, name):
    with pytest.raises(ConfigError) as ei:
        Experiment(**kw).validate()
    assert ei.value.param == name and str(ei.value).startswith(name)


def test_bounds_name_parameter():
    with pytest.raises(ValueError, match="delta"):
        Experiment(delta=-1)
    with pytest.raises(ValueError, match="tau"):
        Experiment(tau=math.nan)


def test_roundtrip_dict():
    e = Experiment(tau=1.5, batch=3, loss="square", teacher="linear", noise=0.3)
    f = Experiment.from_dict(e.to_dict())
    assert f.to_dict() == e.to_dict()


def test_derived_quantities():
    e = Experiment(delta=2.0, d=500, tau=0.5, batch=4, T=10, dt=0.05)
    assert e.n == 1000 and e.steps == 200
    assert e.epochs(1.0) == pytest.approx(1.0)
    assert e.sgd_steps(1.0) == pytest.approx(500 / 2.0)
