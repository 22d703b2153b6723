"""Property-based tests: any input to the configuration either builds a valid Experiment or is
rejected with a ConfigError that names the parameter and its valid range. Nothing else escapes."""
import math

import param
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.config import ConfigError, Experiment, names, valid_range

SCALARS = (param.Number, param.Integer, param.Selector)
NAMES = [n for n in names() if n != "eta" and isinstance(Experiment.param[n], SCALARS)]

anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10**9, max_value=10**9),
    st.booleans(), st.none(), st.text(max_size=12),
    st.sampled_from(["square", "logistic", "linear", "sign", "gd", "sgf", "sgd", "fresh",
                     "reshuffle", "auto", "mc", "exact", "online", "__import__('os')"]),
)


def plausible(name):
    p = Experiment.param[name]
    if isinstance(p, param.Selector):
        return st.sampled_from(list(p.objects))
    lo, hi = p.bounds
    if isinstance(p, param.Integer):
        return st.integers(min_value=lo, max_value=min(hi, lo + 10_000))
    return st.floats(min_value=lo, max_value=hi, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), anything, max_size=4))
def test_garbage_is_rejected_with_named_parameter(kw):
    try:
        exp = Experiment.checked(**kw)
    except ConfigError as e:
        assert e.param in kw or e.param in names(), e
        assert str(e).startswith(e.param)
        if e.param in kw and e.param not in ("m0", "loss", "dt", "batch", "method", "tau", "eta",
                                             "M0", "v"):
            # single-field rejections state the valid range or choices
            assert valid_range(e.param) in str(e) or "Valid" in str(e), str(e)
    else:
        for k, v in kw.items():
            assert getattr(exp, k) == v


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={n: plausible(n) for n in NAMES}))
def test_in_range_values_build_or_fail_cross_field(kw):
    try:
        exp = Experiment.checked(**kw)
    except ConfigError as e:
        # only cross-field rules may reject in-range values
        assert e.param in ("m0", "loss", "dt", "batch", "method", "tau", "M0", "v"), str(e)
    else:
        assert exp.eta == exp.tau * exp.batch or math.isclose(exp.eta, exp.tau * exp.batch)
        assert exp.n >= 1 and exp.steps >= 1


@pytest.mark.parametrize("kw,name", [
    (dict(v="1,abc"), "v"), (dict(v=[]), "v"), (dict(v=[1.0, float("nan")]), "v"),
    (dict(Q0=[["a"]]), "Q0"), (dict(Q0=[[1.0, float("inf")]]), "Q0"),
    (dict(model="committee", loss="square", teacher="linear", k=2, v=[1, 2, 3]), "v"),
    (dict(model="committee", loss="square", teacher="linear", k=2, Q0=[[1.0]]), "Q0"),
    (dict(model="committee", loss="square", teacher="linear", k=2, kstar=2,
          Q0=[[0.1, 0], [0, 0.1]], M0=[[0.5, 0], [0, 0.5]]), "M0"),
    (dict(model="committee", loss="logistic", teacher="sign"), "loss"),
])
def test_committee_inputs_rejected_with_name(kw, name):
    with pytest.raises(ConfigError) as ei:
        Experiment.checked(**kw)
    assert ei.value.param == name


def test_committee_accepts_lists_and_strings():
    e = Experiment.checked(model="committee", loss="square", teacher="linear", k=2, kstar=1,
                           v="1, 0.5", Q0=[[0.2, 0.05], [0.05, 0.1]], M0=[[0.1], [0.0]])
    assert e.second_layer().tolist() == [1.0, 0.5]
    assert e.overlaps0()[1].shape == (2, 1)
