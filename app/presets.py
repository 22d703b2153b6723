"""Teaching presets, stored as data in ``assets/presets.json``.

Each preset: ``name``, ``description``, ``experiment`` (Experiment parameters that differ from
the defaults), ``sims`` (keys of :data:`app.store.SIMS`) and ``gd_theory``. Applying a preset
resets every other parameter to its default, so a preset always means the same experiment.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from solver.config import Experiment

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PRESETS_FILE = ASSETS / "presets.json"
#: Parameters a preset may not set (derived, or set per simulation).
NOT_PRESETTABLE = ("eta", "algo", "sampling", "name")


#: Used when assets/presets.json is not shipped next to app/ (e.g. a wheel without assets).
FALLBACK = {"default": "Experiment defaults", "presets": [{
    "name": "Experiment defaults", "description": "The defaults of solver.config.Experiment "
    "(assets/presets.json was not found).", "experiment": {}, "sims": ["gd", "sgf", "sgd-fresh"],
    "gd_theory": True}]}


@lru_cache(maxsize=1)
def _load(path: str = str(PRESETS_FILE)) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        log.warning("presets file %s not found: only the defaults are offered", path)
        return FALLBACK


def presets() -> dict[str, dict]:
    """name -> preset dict, in file order."""
    return {p["name"]: p for p in _load()["presets"]}


def default_name() -> str:
    return _load().get("default") or next(iter(presets()))


def experiment_values(preset: dict) -> dict:
    """Full parameter values of a preset: the defaults, overridden by the preset."""
    base = Experiment().to_dict()
    for k in NOT_PRESETTABLE:
        base.pop(k, None)
    given = {k: v for k, v in preset.get("experiment", {}).items()}
    bad = [k for k in given if k in NOT_PRESETTABLE or k not in base]
    if bad:
        raise ValueError(f"preset {preset.get('name')!r}: cannot set {bad}")
    base.update(given)
    return base


def build(preset: dict) -> Experiment:
    """A new Experiment holding the preset (validated)."""
    return Experiment(**experiment_values(preset)).validate()


def apply(preset: dict, exp: Experiment) -> None:
    """Set ``exp`` in place to the preset's values (one batched param update)."""
    values = experiment_values(preset)
    # batch and tau together so that eta = tau*batch is recomputed once, from the preset's tau
    exp.param.update(**values)
