"""sgf-dmft: DMFT of the stochastic gradient flow, and finite-size simulation of SGD / SGF / GD.

Numerics only: this package never imports Panel, HoloViews or Bokeh.
"""
__version__ = "0.1.0"

from .config import ConfigError, Experiment  # noqa: E402,F401
from .snapshot import Result, Snapshot, SolverError  # noqa: E402,F401
