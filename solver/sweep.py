"""Sweeps and phase diagrams: a grid of Experiments, each solved by the theory (and optionally
the simulator), summarised in a tidy table.

>>> from solver.sweep import Sweep, parse_grid
>>> sw = Sweep(parse_grid("tau=0,0.5,1,2;delta=0.5,1,2,4"), fixed=dict(T=5))
>>> for index, params, row, result in sw.iter():        # streams as points complete
...     print(index, params, row["status"], row["test_loss_final"])
>>> out = sw.run(backend="dask")                          # or "threads" (default), "serial"
>>> out.table, out.curves                                 # pandas DataFrames
>>> out.save("sweep.parquet")                             # + sweep.curves.parquet + sweep.json

Each point is built with :meth:`Experiment.checked` from the fixed options and its grid values,
so an invalid point becomes a row with ``status='error'`` and the others run. Every point carries
its own seed (``exp.seed``), so its numbers do not depend on where or in which order it ran:
serial, thread pool and Dask give bit-for-bit the same table (apart from the timing columns
``wall_s``, ``compute_s`` and the ``cache_hit`` flag). Results are cached on disk under a hash of the full configuration, the engine,
the package version and the solver's source code (see :class:`Cache`). Execution backends live
in :mod:`solver.sweep_backends`. Symbols follow THEORY.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import param

from .config import ConfigError, Experiment, names, valid_range
from .snapshot import Result, Snapshot, SolverError

GRID_EXAMPLE = "tau=0,0.5,1,2;delta=0.5,1,2,4"
#: What a point can be solved by: the DMFT ('theory') and the finite-size simulator ('simulate').
KINDS = ("theory", "simulate")
#: Summary columns of the table, after the configuration columns.
SUMMARY_COLUMNS = (
    "kind", "engine", "status", "message",
    "test_loss_final", "test_loss_final_se", "test_loss_min", "t_test_loss_min",
    "test_error_final", "test_error_final_se", "test_error_min", "t_test_error_min",
    "train_loss_final", "train_loss_final_se", "m_final", "m_final_se", "Q_final", "Q_final_se",
    "cosine_final", "t_final", "n_records", "wall_s", "compute_s", "cache_hit", "key",
)
#: Columns that legitimately differ between two runs of the same sweep.
VOLATILE_COLUMNS = ("wall_s", "compute_s", "cache_hit")
CACHE_FORMAT = 1
#: How much of each snapshot's ``extras`` (distributions, kernels) a sweep keeps: 'none';
#: 'last' (the latest value of each extra, on the last snapshot; the kernels alone are about
#: 1 MB per point at K = 200 steps); 'all' (every snapshot; about 5 MB per point at K = 200).
EXTRAS = ("none", "last", "all")


class GridError(ConfigError):
    """Invalid grid; ``param`` names the offending parameter ('grid' when none applies)."""


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
def _scalar_param(name: str):
    p = Experiment.param[name]
    return isinstance(p, (param.Number, param.Selector)) and not isinstance(p, param.Boolean)


def check_value(name: str, v):
    """Single-parameter check of a grid value (type, bounds, choices); returns the value.

    Cross-parameter rules (e.g. m0^2 <= q0*rho) are checked per point by ``Experiment.checked``.
    """
    p = Experiment.param[name]
    if isinstance(p, param.Selector):
        if v not in p.objects:
            raise GridError(name, f"must be one of {valid_range(name)}, got {v!r}")
        return v
    if isinstance(p, param.Integer):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GridError(name, f"must be an integer in {valid_range(name)}, got {v!r}")
    elif isinstance(p, param.Number):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise GridError(name, f"must be a finite number in {valid_range(name)}, got {v!r}")
    else:
        raise GridError(name, "only numbers and choices can be swept from the command line")
    lo, hi = p.bounds or (None, None)
    inc_lo, inc_hi = getattr(p, "inclusive_bounds", (True, True))
    if (lo is not None and (v < lo or (v == lo and not inc_lo))) or \
            (hi is not None and (v > hi or (v == hi and not inc_hi))):
        raise GridError(name, f"value {v!r} is outside {valid_range(name)}")
    return v


def _convert(name: str, text: str):
    p = Experiment.param[name]
    text = text.strip()
    if isinstance(p, param.Selector):
        return check_value(name, text)
    try:
        x = float(text)
    except ValueError:
        kind = "an integer" if isinstance(p, param.Integer) else "a number"
        raise GridError(name, f"must be {kind} in {valid_range(name)}, got {text!r}") from None
    if isinstance(p, param.Integer):
        if not x.is_integer():
            raise GridError(name, f"must be an integer in {valid_range(name)}, got {text!r}")
        return check_value(name, int(x))
    return check_value(name, x)


def _parse_values(name: str, text: str) -> list:
    text = text.strip()
    if not text:
        raise GridError(name, f"no values in the grid; expected e.g. {name}=1,2,3")
    if ":" in text and "," not in text and not isinstance(Experiment.param[name], param.Selector):
        parts = text.split(":")
        if len(parts) != 3:
            raise GridError(name, f"a range is START:STOP:NUM, got {text!r}")
        try:
            num = int(parts[2])
        except ValueError:
            raise GridError(name, f"a range is START:STOP:NUM with an integer NUM, "
                                  f"got {text!r}") from None
        if not 1 <= num <= 10000:
            raise GridError(name, f"range NUM must be in [1, 10000], got {num}")
        a, b = (_convert(name, s) for s in parts[:2])
        vals = np.linspace(float(a), float(b), num).tolist()
        if isinstance(Experiment.param[name], param.Integer):
            ints = [int(round(x)) for x in vals]
            if any(abs(i - x) > 1e-9 for i, x in zip(ints, vals)):
                raise GridError(name, f"range {text!r} does not give integers")
            vals = list(dict.fromkeys(ints))
        return [check_value(name, v) for v in vals]
    vals = [s for s in text.split(",")]
    if any(not s.strip() for s in vals):
        raise GridError(name, f"empty value in {text!r}")
    return [_convert(name, s) for s in vals]


def parse_grid(text: str) -> dict[str, list]:
    """Parse ``"tau=0,0.5,1,2;delta=0.5,1,2,4"`` into ``{'tau': [...], 'delta': [...]}``.

    Values are converted and range-checked per parameter (numbers, integers, choices);
    ``NAME=START:STOP:NUM`` gives NUM evenly spaced values. Raises :class:`GridError` naming
    the parameter (or 'grid' for a malformed string).
    """
    if not isinstance(text, str) or not text.strip():
        raise GridError("grid", f"empty; expected e.g. {GRID_EXAMPLE!r}")
    grid: dict[str, list] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise GridError("grid", f"expected NAME=V1,V2,... separated by ';', got {part.strip()!r}"
                                    f" (e.g. {GRID_EXAMPLE!r})")
        name, values = part.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in Experiment.param or name == "name":
            raise GridError(name or "grid", f"unknown parameter in the grid; valid names: "
                                            f"{', '.join(n for n in names() if _scalar_param(n))}")
        if not _scalar_param(name):
            raise GridError(name, "only numbers and choices can be swept in a grid string; use "
                                  "the Python API (a list of dicts) for lists and matrices")
        if name in grid:
            raise GridError(name, "given twice in the grid")
        grid[name] = _parse_values(name, values)
    if not grid:
        raise GridError("grid", f"empty; expected e.g. {GRID_EXAMPLE!r}")
    return grid


def _plain(v):
    """numpy scalars -> Python scalars (Experiment.checked wants int/float)."""
    return v.item() if isinstance(v, np.generic) else v


def expand(grid, fixed: dict | None = None) -> tuple[list[dict], list[str]]:
    """Grid points as a list of dicts of grid values, and the grid's parameter names.

    ``grid`` is a dict of lists (Cartesian product, the first parameter varying slowest, i.e.
    row-major for a heatmap ``values.reshape(len(axis0), len(axis1))``), a list of dicts (explicit
    points) or a grid string. Unknown parameter names raise :class:`GridError`; values are
    checked later, per point.
    """
    if isinstance(grid, str):
        grid = parse_grid(grid)
    fixed = dict(fixed or {})
    if isinstance(grid, dict):
        gnames = list(grid)
        lists = []
        for k in gnames:
            vals = grid[k]
            if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
                vals = [vals]
            vals = [_plain(v) for v in vals]
            if not vals:
                raise GridError(k, "no values in the grid")
            lists.append(vals)
        points = [dict(zip(gnames, combo)) for combo in itertools.product(*lists)]
    else:
        points = [{k: _plain(v) for k, v in dict(p).items()} for p in grid]
        gnames = list(dict.fromkeys(k for p in points for k in p))
    for k in list(gnames) + list(fixed):
        if k not in Experiment.param or k == "name":
            raise GridError(k, f"unknown parameter; valid names: {', '.join(names())}")
    both = [k for k in gnames if k in fixed]
    if both:
        raise GridError(both[0], "given both in the grid and as a fixed option")
    return points, gnames


def grid_axes(grid) -> dict[str, list]:
    """The axes of a product grid (dict of lists or grid string), for heatmaps."""
    if isinstance(grid, str):
        grid = parse_grid(grid)
    return {k: [_plain(v) for v in (vs if isinstance(vs, (list, tuple, np.ndarray, range))
                                    else [vs])]
            for k, vs in grid.items()}


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """$SGF_DMFT_CACHE, else $XDG_CACHE_HOME/sgf-dmft, else ~/.cache/sgf-dmft."""
    env = os.environ.get("SGF_DMFT_CACHE")
    if env:
        return os.path.expanduser(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sgf-dmft")


_NOT_SOLVER = {"sweep.py", "sweep_backends.py", "cli.py", "warmup.py"}


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the solver's source files (excluding sweep/cli plumbing), so that a cached point is
    recomputed whenever the numerics change, even without a version bump."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("__", ".")))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or (dirpath == root and fn in _NOT_SOLVER):
                continue
            path = os.path.join(dirpath, fn)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def solver_tag(solve) -> str:
    """Name of a solve function for the cache key ('' for the default engines)."""
    if solve is None:
        return ""
    return f"{getattr(solve, '__module__', '?')}.{getattr(solve, '__qualname__', repr(solve))}"


def point_key(kind: str, config: dict, tag: str = "") -> str:
    """sha256 of (full configuration, engine kind, solve function, package version, code)."""
    from . import __version__

    payload = {"config": config, "kind": kind, "solve": tag, "version": __version__,
               "code": code_fingerprint(), "format": CACHE_FORMAT}
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot encode {type(o).__name__}")


class _Encoder:
    """Nested extras (dicts, tuples, lists, arrays, scalars) -> JSON tree + named arrays."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def enc(self, o):
        if isinstance(o, np.ndarray):
            name = f"a{len(self.arrays)}"
            self.arrays[name] = o
            return {"__nd__": name}
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, dict):
            if not all(isinstance(k, str) for k in o):
                raise TypeError("dict keys must be strings")
            return {"__dict__": {k: self.enc(v) for k, v in o.items()}}
        if isinstance(o, tuple):
            return {"__tuple__": [self.enc(v) for v in o]}
        if isinstance(o, list):
            return [self.enc(v) for v in o]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"cannot cache {type(o).__name__}")


def _dec(o, arrays):
    if isinstance(o, dict):
        if "__nd__" in o:
            return arrays[o["__nd__"]]
        if "__tuple__" in o:
            return tuple(_dec(v, arrays) for v in o["__tuple__"])
        if "__dict__" in o:
            return {k: _dec(v, arrays) for k, v in o["__dict__"].items()}
    if isinstance(o, list):
        return [_dec(v, arrays) for v in o]
    return o


def _num(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class Cache:
    """Results on disk, one JSON file per point (plus an ``.npz`` for array extras).

    Layout: ``DIR/points/<key[:2]>/<key>.json``. JSON keeps float64 exactly (shortest repr),
    arrays are stored without pickle, and writes are atomic (temporary file + rename), so two
    sweeps sharing a directory never see half a file. Delete the directory to clear it.
    """

    def __init__(self, directory: str | None = None):
        self.directory = os.path.abspath(os.path.expanduser(directory or default_cache_dir()))

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, "points", key[:2], key + ".json")

    def get(self, key: str) -> tuple[Result, dict] | None:
        path = self._path(key)
        try:
            with open(path) as fh:
                doc = json.load(fh)
            if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
                return None
            arrays = {}
            if doc.get("npz"):
                with np.load(path[:-5] + ".npz", allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            snaps = [Snapshot(t=s["t"], step=s["step"], epochs=s["epochs"], values=s["values"],
                              se=s["se"], extras=_dec(s.get("extras", {}), arrays),
                              engine=s["engine"], progress=s["progress"])
                     for s in doc["snapshots"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        res = Result(snaps, config=doc["config"], engine=doc["engine"],
                     message=doc["message"], status=doc["status"])
        return res, doc["meta"]

    def put(self, key: str, result: Result, meta: dict) -> bool:
        """Store; returns False (and stores nothing) when the result cannot be encoded."""
        enc = _Encoder()
        try:
            snaps = [{"t": _num(s.t), "step": _num(s.step), "epochs": _num(s.epochs),
                      "values": {k: _num(v) for k, v in s.values.items()},
                      "se": {k: _num(v) for k, v in s.se.items()},
                      "extras": enc.enc(dict(s.extras)), "engine": s.engine,
                      "progress": _num(s.progress)} for s in result.snapshots]
            doc = {"format": CACHE_FORMAT, "key": key, "config": result.config,
                   "engine": result.engine, "status": result.status, "message": result.message,
                   "meta": meta, "npz": bool(enc.arrays), "snapshots": snaps}
            text = json.dumps(doc, default=_json_default)
        except (TypeError, ValueError):
            return False
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if enc.arrays:
            _atomic_write(path[:-5] + ".npz", lambda fh: np.savez(fh, **enc.arrays), binary=True)
        _atomic_write(path, lambda fh: fh.write(text))
        return True

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._path(key))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _atomic_write(path, writer, binary=False):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            writer(fh)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# one point
# --------------------------------------------------------------------------------------------
def default_solver(kind: str) -> Callable:
    """solver.dmft.solve for 'theory', solver.simulate.run for 'simulate' (imported lazily)."""
    if kind == "theory":
        from .dmft import solve
        return solve
    if kind == "simulate":
        from .simulate import run
        return run
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


@dataclass
class Task:
    """One (point, engine) job, picklable for processes and Dask workers."""

    index: int
    kind: str
    config: dict
    solve: Callable | None = None
    key: str = ""
    extras: str = "none"


def trim_extras(result: Result | None, policy: str) -> Result | None:
    """Drop snapshot extras according to ``policy`` (see EXTRAS), in place."""
    if result is None or policy == "all" or not result.snapshots:
        return result
    last = result.extras if policy == "last" else {}
    for s in result.snapshots:
        s.extras = {}
    result.snapshots[-1].extras = last
    return result


def compute(task: Task, cancel: threading.Event | None = None) -> dict:
    """Solve one point; never raises. Returns dict(result, status, message, wall_s)."""
    t0 = time.perf_counter()
    result, status, message = None, "ok", ""
    try:
        solve = task.solve or default_solver(task.kind)
        exp = Experiment.from_dict(task.config)
        result = solve(exp, cancel=cancel)
        if not isinstance(result, Result):
            raise TypeError(f"solve returned {type(result).__name__}, not Result")
        if result.status not in ("ok", ""):
            status = "cancelled" if (cancel is not None and cancel.is_set()) else "diverged"
            message = result.message or f"solver stopped with status {result.status!r}"
    except SolverError as e:
        result, status, message = e.result, "diverged", str(e)
    except Exception as e:  # reported per point; the sweep goes on
        status, message = "error", f"{type(e).__name__}: {e}"
    if result is not None and status == "ok":
        if not result.snapshots:
            status, message = "error", "solver returned no snapshots"
        else:
            last = result.snapshots[-1].values
            bad = [k for k in ("test_loss", "train_loss", "m", "Q")
                   if k in last and not np.isfinite(last[k])]
            if bad:
                status, message = "diverged", f"{bad[0]} is not finite at t={result.snapshots[-1].t:g}"
    return {"result": trim_extras(result, task.extras), "status": status, "message": message,
            "wall_s": time.perf_counter() - t0}


def _final(arr):
    return float(arr[-1]) if len(arr) else math.nan


def _argmin(t, arr):
    if len(arr) == 0 or not np.any(np.isfinite(arr)):
        return math.nan, math.nan
    i = int(np.nanargmin(arr))
    return float(arr[i]), float(t[i])


def summarize(result: Result | None) -> dict:
    """Summary columns of one point from its Result (NaN where absent)."""
    out = {k: math.nan for k in SUMMARY_COLUMNS if k not in
           ("kind", "engine", "status", "message", "cache_hit", "key", "n_records",
            "wall_s", "compute_s")}
    out["n_records"] = 0
    if result is None or not result.snapshots:
        return out
    keys = result.keys()
    t = result.t.astype(float)

    def col(name):
        if name in keys:
            return np.asarray(getattr(result, name), float)
        return np.full(len(t), np.nan)

    se = result.se
    for name in ("test_loss", "test_error", "train_loss", "m", "Q"):
        out[f"{name}_final"] = _final(col(name))
        if f"{name}_final_se" in out:
            out[f"{name}_final_se"] = _final(np.asarray(se.get(name, np.full(len(t), np.nan)), float))
    out["test_loss_min"], out["t_test_loss_min"] = _argmin(t, col("test_loss"))
    out["test_error_min"], out["t_test_error_min"] = _argmin(t, col("test_error"))
    out["cosine_final"] = _final(col("cosine"))
    out["t_final"] = float(t[-1])
    out["n_records"] = len(t)
    return out


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
class PointResult(NamedTuple):
    """What :meth:`Sweep.iter` yields as each (point, engine) completes."""

    index: int            # position in Sweep.points (row-major over a product grid)
    params: dict          # the point's grid values
    row: dict             # the table row (configuration + summaries; row['kind'] = engine kind)
    result: Result | None  # the full curves (None for an invalid configuration)


@dataclass
class Point:
    index: int
    params: dict
    config: dict | None        # Experiment.to_dict() of the checked experiment
    error: str = ""            # ConfigError message for an invalid point
    error_param: str = ""


def _cell(v):
    """Table cell for a configuration value: scalars as is, lists/matrices as JSON text."""
    v = _plain(v)
    if v is None or isinstance(v, (list, tuple, dict, np.ndarray)):
        return json.dumps(v, default=_json_default)
    return v


@dataclass
class SweepResult:
    """The outcome of :meth:`Sweep.run`: summary table, long curve table, full Results."""

    table: Any                       # pandas.DataFrame, one row per (point, kind)
    curves: Any                      # pandas.DataFrame, one row per (point, kind, recorded time)
    results: dict = field(default_factory=dict)   # (index, kind) -> Result
    meta: dict = field(default_factory=dict)

    def result(self, index: int, kind: str = "theory") -> Result | None:
        return self.results.get((index, kind))

    def save(self, path: str) -> list[str]:
        """Write the table (.parquet/.pq or .csv by extension), the curves next to it
        (FILE.curves.parquet / FILE.curves.csv) and a JSON sidecar (FILE.json)."""
        root, ext = os.path.splitext(str(path))
        ext = ext.lower()
        if ext in (".parquet", ".pq"):
            self.table.to_parquet(path, index=False)
            cpath = root + ".curves" + ext
            self.curves.to_parquet(cpath, index=False)
        elif ext == ".csv":
            self.table.to_csv(path, index=False)
            cpath = root + ".curves.csv"
            self.curves.to_csv(cpath, index=False)
        else:
            raise ValueError(f"unknown table format {ext!r}: use .parquet or .csv")
        jpath = root + ".json"
        with open(jpath, "w") as fh:
            json.dump(self.meta, fh, indent=2, default=_json_default)
        return [str(path), cpath, jpath]


class Sweep:
    """A grid of Experiments solved by one or more engines.

    Parameters
    ----------
    grid : dict of lists | list of dicts | str
        Product grid (first parameter slowest), explicit points, or a grid string.
    fixed : dict
        Options shared by every point (the ``theory`` command's options).
    engines : sequence of 'theory' / 'simulate'.
    solve : callable or dict kind -> callable, optional
        ``solve(exp, cancel=None) -> Result``; default solver.dmft.solve / solver.simulate.run.
        Must be a module-level function for process and Dask workers.
    cache : True (default directory), False/None (no cache), a directory, or a :class:`Cache`.
    extras : 'none' (default), 'last' or 'all': which snapshot extras (distributions, kernels)
        the Results keep, in memory and in the cache (see EXTRAS). Tables and curves do not
        depend on it.
    """

    def __init__(self, grid, fixed: dict | None = None, *, engines=("theory",), solve=None,
                 cache=True, extras: str = "none"):
        if extras not in EXTRAS:
            raise ValueError(f"extras must be one of {EXTRAS}, got {extras!r}")
        self.extras = extras
        self.fixed = {k: _plain(v) for k, v in dict(fixed or {}).items()}
        self.axes = grid_axes(grid) if isinstance(grid, (dict, str)) else None
        point_params, self.grid_names = expand(grid, self.fixed)
        if isinstance(engines, str):
            engines = (engines,)
        self.engines = tuple(engines)
        for e in self.engines:
            if e not in KINDS:
                raise ValueError(f"unknown engine {e!r}; expected one of {KINDS}")
        if not isinstance(solve, dict):
            solve = {k: solve for k in self.engines} if solve is not None else {}
        self.solvers = dict(solve)
        if cache is True:
            cache = Cache()
        elif isinstance(cache, (str, os.PathLike)):
            cache = Cache(os.fspath(cache))
        self.cache: Cache | None = cache or None
        defaults = Experiment().to_dict()
        self._defaults = defaults
        self.points: list[Point] = []
        for i, p in enumerate(point_params):
            try:
                exp = Experiment.checked(**{**self.fixed, **p})
                self.points.append(Point(i, p, exp.to_dict()))
            except ConfigError as e:
                self.points.append(Point(i, p, None, str(e), e.param))

    def __len__(self) -> int:
        return len(self.points) * len(self.engines)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Heatmap shape of a product grid (None for explicit points)."""
        return tuple(len(v) for v in self.axes.values()) if self.axes is not None else None

    def coords(self, index: int) -> tuple[int, ...]:
        """Position of point ``index`` on the product grid's axes."""
        return tuple(int(i) for i in np.unravel_index(index, self.shape))

    # --- rows ---------------------------------------------------------------------------------
    def _config_columns(self) -> list[str]:
        return list(self.grid_names) + [k for k in names() if k not in self.grid_names]

    def _row(self, point: Point, kind: str, result, status, message, wall_s, compute_s,
             cache_hit, key) -> dict:
        config = point.config if point.config is not None else \
            {**self._defaults, **self.fixed, **point.params}
        row = {"point": point.index}
        for k in self._config_columns():
            row[k] = _cell(config.get(k))
        summ = summarize(result)
        engine = (result.engine if result is not None else "") or ""
        row.update(kind=kind, engine=engine, status=status, message=message)
        for k in SUMMARY_COLUMNS:
            if k in summ:
                row[k] = summ[k]
        row.update(wall_s=float(wall_s), compute_s=float(compute_s), cache_hit=bool(cache_hit),
                   key=key)
        return row

    def _tasks(self):
        for point in self.points:
            for kind in self.engines:
                if point.config is None:
                    yield point, kind, None
                    continue
                solve = self.solvers.get(kind)
                key = point_key(kind, point.config, solver_tag(solve))
                yield point, kind, Task(point.index, kind, point.config, solve, key, self.extras)

    # --- running ------------------------------------------------------------------------------
    def iter(self, backend: str = "threads", workers: int | None = None,
             scheduler: str | None = None, client=None, cancel: threading.Event | None = None,
             dask_processes: bool = False) -> Iterator[PointResult]:
        """Yield a :class:`PointResult` per (point, engine) as it completes.

        backend: 'serial', 'threads' (default), 'processes' or 'dask'. For 'dask', ``scheduler``
        is None or 'local' (start a LocalCluster, shut down when the iteration ends) or a
        'tcp://host:port' address; or pass a ``distributed.Client``. ``cancel`` stops the sweep
        (running points stop at their next snapshot on the in-process backends). Cached points
        and invalid configurations are yielded first, without touching the backend.
        """
        from .sweep_backends import run_tasks

        by_index = {p.index: p for p in self.points}
        todo = []
        for point, kind, task in self._tasks():
            if cancel is not None and cancel.is_set():
                return
            if task is None:
                yield PointResult(point.index, point.params,
                                  self._row(point, kind, None, "error", point.error, 0.0, 0.0,
                                            False, ""), None)
                continue
            if self.cache is not None:
                t0 = time.perf_counter()
                hit = self._lookup(task.key)
                if hit is not None:
                    res, meta = hit
                    yield PointResult(point.index, point.params,
                                      self._row(point, kind, res, meta["status"], meta["message"],
                                                time.perf_counter() - t0, meta["compute_s"],
                                                True, task.key), res)
                    continue
            todo.append(task)
        if not todo:
            return
        stream = run_tasks(todo, compute, backend=backend, workers=workers, scheduler=scheduler,
                           client=client, cancel=cancel, dask_processes=dask_processes)
        with contextlib.closing(stream):  # leaving early cancels the backend's pending work now
            for task, out in stream:
                point = by_index[task.index]
                res, status, message = out["result"], out["status"], out["message"]
                self._store(task.key, out)
                yield PointResult(point.index, point.params,
                                  self._row(point, task.kind, res, status, message, out["wall_s"],
                                            out["wall_s"], False, task.key), res)

    def _lookup(self, key: str):
        """Cached (Result, meta) holding at least the extras asked for, trimmed to them."""
        hit = self.cache.get(key)
        if hit is None or EXTRAS.index(hit[1].get("extras", "all")) < EXTRAS.index(self.extras):
            return None
        return trim_extras(hit[0], self.extras), hit[1]

    def _store(self, key: str, out: dict) -> None:
        """Cache ok and diverged points (deterministic); not errors or cancelled runs."""
        if self.cache is not None and out["result"] is not None and \
                out["status"] in ("ok", "diverged"):
            self.cache.put(key, out["result"], {"status": out["status"], "message": out["message"],
                                                "compute_s": out["wall_s"], "extras": self.extras})

    def run(self, callback: Callable[[PointResult], None] | None = None, keep_results=True,
            **kw) -> SweepResult:
        """Run the whole sweep (same options as :meth:`iter`); ``callback(point_result)`` per
        completion. Returns the table sorted by point and engine."""
        import pandas as pd

        t0 = time.perf_counter()
        rows, results, curves = [], {}, []
        for pr in self.iter(**kw):
            rows.append(pr.row)
            kind = pr.row["kind"]
            if keep_results and pr.result is not None:
                results[(pr.index, kind)] = pr.result
            if pr.result is not None and pr.result.snapshots:
                f = pr.result.to_frame()
                f.insert(0, "kind", kind)
                f.insert(0, "point", pr.index)
                curves.append(f)
            if callback is not None:
                callback(pr)
        order = {k: i for i, k in enumerate(self.engines)}
        rows.sort(key=lambda r: (r["point"], order[r["kind"]]))
        cols = ["point"] + self._config_columns() + list(SUMMARY_COLUMNS)
        table = pd.DataFrame(rows, columns=cols)
        for k in self._config_columns():  # an invalid value ('x' among numbers): text column
            if table[k].dtype == object and not all(isinstance(v, str) for v in table[k]):
                table[k] = [v if isinstance(v, str) else json.dumps(v, default=_json_default)
                            for v in table[k]]
        if curves:
            curves.sort(key=lambda f: (int(f["point"].iat[0]), order[f["kind"].iat[0]]))
            curve_table = pd.concat(curves, ignore_index=True)
        else:
            curve_table = pd.DataFrame(columns=["point", "kind", "t"])
        from . import __version__

        counts = table["status"].value_counts().to_dict() if len(table) else {}
        meta = {"package": "sgf-dmft", "version": __version__, "grid": self.axes,
                "grid_names": self.grid_names, "fixed": self.fixed, "engines": list(self.engines),
                "points": len(self.points), "rows": len(table), "status_counts": counts,
                "backend": kw.get("backend", "threads"), "wall_s": time.perf_counter() - t0,
                "cache_dir": self.cache.directory if self.cache is not None else None,
                "curves": "one row per (point, kind, recorded time); join on point, kind"}
        return SweepResult(table, curve_table, results, meta)

    def result(self, index: int, kind: str = "theory", compute_if_missing: bool = True):
        """The full Result of one point: from the cache, else computed here (None if invalid)."""
        point = self.points[index]
        if point.config is None:
            return None
        solve = self.solvers.get(kind)
        key = point_key(kind, point.config, solver_tag(solve))
        if self.cache is not None:
            hit = self._lookup(key)
            if hit is not None:
                return hit[0]
        if not compute_if_missing:
            return None
        out = compute(Task(index, kind, point.config, solve, key, self.extras))
        self._store(key, out)
        return out["result"]


def sweep(grid, fixed: dict | None = None, *, engines=("theory",), solve=None, cache=True,
          extras="none", **run_kw) -> SweepResult:
    """One-call form: ``sweep({'tau': [0, 1], 'delta': [1, 2]}, dict(T=5)).table``."""
    return Sweep(grid, fixed, engines=engines, solve=solve, cache=cache,
                 extras=extras).run(**run_kw)


def compare_tables(a, b) -> None:
    """Assert two sweep tables are identical bit for bit, ignoring VOLATILE_COLUMNS."""
    import pandas as pd

    pd.testing.assert_frame_equal(a.drop(columns=list(VOLATILE_COLUMNS)),
                                  b.drop(columns=list(VOLATILE_COLUMNS)),
                                  check_exact=True)


# --------------------------------------------------------------------------------------------
# command line: ``sgf-dmft sweep`` (parser and options built by solver.cli)
# --------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """The sweep-specific options of ``sgf-dmft sweep`` (the fixed Experiment options are added
    by solver.cli, the same as ``theory``'s)."""
    parser.add_argument("--grid", required=True,
                        help=f"grid of parameter values, e.g. {GRID_EXAMPLE!r}; NAME=START:STOP:NUM "
                             "for NUM evenly spaced values; the first parameter varies slowest")
    parser.add_argument("--simulate", action="store_true",
                        help="also run the finite-size simulation at every point (kind=simulate rows)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dask", choices=["local"], default=None,
                       help="run on a Dask LocalCluster started for this sweep")
    where.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                       help="run on an existing Dask cluster (its workers need sgf-dmft installed)")
    where.add_argument("--backend", choices=["serial", "threads", "processes"], default=None,
                       help="in-process execution (default: threads)")
    parser.add_argument("--dask-processes", action="store_true",
                        help="with --dask local: worker processes instead of threads")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="parallel points (default: number of cores)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="result cache (default $SGF_DMFT_CACHE or ~/.cache/sgf-dmft)")
    cache.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--out", required=True,
                        help="table FILE.parquet or FILE.csv; curves go to FILE.curves.parquet/.csv, "
                             "metadata to FILE.json")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


class _CliProgress:
    def __init__(self, total: int, enabled: bool, stream):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.done = self.cached = self.failed = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, pr: PointResult):
        row = pr.row
        self.done += 1
        self.cached += bool(row["cache_hit"])
        self.failed += row["status"] != "ok"
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        left = el * (self.total - self.done) / self.done
        where = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in pr.params.items())
        if row["status"] != "ok":
            self._clear()
            self.stream.write(f"sgf-dmft sweep: point {pr.index} ({where}) {row['kind']}: "
                              f"{row['status']}: {row['message']}\n")
        head = (f"sweep {self.done}/{self.total} ({self.cached} cached, {self.failed} failed) "
                f"{el:6.1f}s elapsed, ~{left:5.1f}s left")
        if self.tty:
            now = time.perf_counter()
            if now - self.last > 0.2 or self.done == self.total:
                self.last = now
                self.stream.write("\r" + head + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(f"{head}  [point {pr.index} {row['kind']} {row['status']}]\n")
        self.stream.flush()

    def _clear(self):
        if self.tty:
            self.stream.write("\r\033[K")


def cli_main(args, option_names) -> int:
    """``sgf-dmft sweep``: 0 when the table was written (failed points are rows with their
    status), 2 for invalid input (one line naming the parameter)."""
    import sys

    err = sys.stderr
    fixed = {k: getattr(args, k) for k in option_names if getattr(args, k, None) is not None}
    try:
        grid = parse_grid(args.grid)
        for k, v in fixed.items():
            if _scalar_param(k):
                check_value(k, v)
        engines = ("theory", "simulate") if args.simulate else ("theory",)
        if args.no_cache:
            cache = None
        else:
            cache = Cache(args.cache_dir) if args.cache_dir else True
        sw = Sweep(grid, fixed, engines=engines, cache=cache)
    except ConfigError as e:
        err.write(f"sgf-dmft: error: {e}\n")
        return 2
    if args.workers is not None and args.workers < 1:
        err.write(f"sgf-dmft: error: workers: must be >= 1, got {args.workers}\n")
        return 2
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".parquet", ".pq", ".csv"):
        err.write(f"sgf-dmft: error: out: use a .parquet or .csv file name, got {args.out!r}\n")
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        err.write(f"sgf-dmft: error: out: directory {out_dir} does not exist\n")
        return 2
    if args.dask or args.scheduler:
        kw = dict(backend="dask", scheduler=args.scheduler or "local",
                  dask_processes=args.dask_processes)
    else:
        kw = dict(backend=args.backend or "threads")
    invalid = sum(p.config is None for p in sw.points)
    if not args.quiet:
        err.write(f"sgf-dmft sweep: {len(sw.points)} points x {len(sw.engines)} engine(s) "
                  f"= {len(sw)} runs on {kw['backend']}"
                  + (f" ({kw['scheduler']})" if kw["backend"] == "dask" else "")
                  + (f"; {invalid} invalid point(s)" if invalid else "")
                  + (f"; cache {sw.cache.directory}" if sw.cache is not None else "; no cache")
                  + "\n")
    progress = _CliProgress(len(sw), not args.quiet, err)
    try:
        out = sw.run(callback=progress, keep_results=False, workers=args.workers, **kw)
    except OSError as e:  # e.g. scheduler unreachable
        err.write(f"\nsgf-dmft: error: scheduler: {e}\n")
        return 2
    except KeyboardInterrupt:
        err.write("\nsgf-dmft sweep: interrupted\n")
        return 130
    paths = out.save(args.out)
    if not args.quiet:
        counts = ", ".join(f"{v} {k}" for k, v in out.meta["status_counts"].items())
        err.write(f"sgf-dmft sweep: {len(out.table)} rows ({counts}) in {out.meta['wall_s']:.1f} s;"
                  f" wrote {', '.join(paths)}\n")
    return 0
