"""Command line: ``sgf-dmft simulate | theory | sweep | serve``.

Options are generated from :class:`solver.config.Experiment` (same names, ``_`` spelled ``-``),
so the CLI, the dashboard and the solvers cannot disagree about a parameter. Invalid input exits
with status 2 and one line on stderr naming the parameter; never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import param

from .config import ConfigError, Experiment, parameter_help

#: Experiment parameters that each subcommand exposes (others keep their defaults).
SIM_PARAMS = ("loss", "teacher", "noise", "flip", "delta", "tau", "eta", "batch", "lam", "rho",
              "q0", "m0", "T", "dt", "record_every", "d", "seeds", "algo", "sampling", "seed",
              "model", "k", "kstar", "activation", "v")
THEORY_PARAMS = SIM_PARAMS + ("samples", "method")


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + traceback."""

    def error(self, message):
        raise _ArgError(message)


def _type_for(name, p):
    def conv(text):
        try:
            if isinstance(p, param.Integer):
                v = float(text)
                if not v.is_integer():
                    raise ValueError
                return int(v)
            v = float(text)
        except ValueError:
            kind = "an integer" if isinstance(p, param.Integer) else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        return v

    return conv


def _add_experiment_options(parser, names):
    for name in names:
        p = Experiment.param[name]
        flag = "--" + name.replace("_", "-")
        kw = dict(dest=name, default=None, help=parameter_help(name))
        if isinstance(p, param.Selector):
            kw["choices"] = list(p.objects)
        elif isinstance(p, param.List):
            kw["metavar"] = "V1,V2,..."
        elif isinstance(p, (param.Number, param.Integer)):
            kw["type"] = _type_for(name, p)
            kw["metavar"] = name.upper() if len(name) > 1 else name
        parser.add_argument(flag, **kw)


def experiment_from_args(args, names) -> Experiment:
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return Experiment.checked(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgf-dmft", description="DMFT of the stochastic gradient flow, and "
                     "finite-size simulation of SGD / SGF / gradient flow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="finite-size simulation (mean and SE over seeds)")
    _add_experiment_options(sim, SIM_PARAMS)
    sim.add_argument("--out", required=True, help="output CSV (a JSON sidecar goes next to it)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")

    th = sub.add_parser("theory", help="DMFT prediction")
    _add_experiment_options(th, THEORY_PARAMS)
    th.add_argument("--out", required=True, help="output CSV (a JSON sidecar goes next to it)")
    th.add_argument("--quiet", action="store_true", help="no progress bar")

    sw = sub.add_parser("sweep", help="grid of theory (and simulation) runs -> summary table "
                        "(docs/sweeps.md)")
    _add_experiment_options(sw, THEORY_PARAMS)
    from .sweep import add_arguments as _add_sweep_arguments

    _add_sweep_arguments(sw)

    srv = sub.add_parser("serve", help="start the dashboard")
    srv.add_argument("--port", type=int, default=5006)
    srv.add_argument("--address", default=None)
    srv.add_argument("--allow-websocket-origin", action="append", default=None)
    srv.add_argument("--show", action="store_true")
    srv.add_argument("--num-threads", type=int, default=None)
    srv.add_argument("--liveness", action="store_true", help="serve /liveness for health checks")
    return parser


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal or forced)."""

    def __init__(self, label, enabled=True):
        self.label = label
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, frac):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.2 and frac < 1.0:
            return
        self.last = now
        el = now - self.t0
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}%  "
                         f"{el:6.1f}s elapsed, ~{eta:5.1f}s left")
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _run_engine(kind, exp, out, quiet):
    from .snapshot import Result, SolverError

    if kind == "simulate":
        from .simulate import stream
    else:
        from .dmft import stream
    bar = Progress(kind, enabled=not quiet)
    res = Result(config=exp.to_dict())
    status = 0
    try:
        for snap in stream(exp):
            res.append(snap)
            bar(snap.progress)
    except ConfigError as e:  # a setting this engine cannot handle (found when it starts)
        sys.stderr.write(f"sgf-dmft: error: {e}\n")
        return 2
    except SolverError as e:
        res.status, res.message = "stopped", str(e)
        sys.stderr.write(f"\nsgf-dmft {kind}: {e}\n")
        status = 3
    if res.snapshots:
        res.engine = res.snapshots[0].engine
    bar(1.0) if status == 0 else None
    res.write(out)
    return status


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgError as e:
        sys.stderr.write(f"sgf-dmft: error: {e}\n")
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.command == "serve":
        return serve(args)
    if args.command == "sweep":
        from .sweep import cli_main as _sweep_main

        return _sweep_main(args, THEORY_PARAMS)
    names = SIM_PARAMS if args.command == "simulate" else THEORY_PARAMS
    try:
        exp = experiment_from_args(args, names)
    except ConfigError as e:
        sys.stderr.write(f"sgf-dmft: error: {e}\n")
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        sys.stderr.write(f"sgf-dmft: error: out: directory {out_dir} does not exist\n")
        return 2
    return _run_engine(args.command, exp, args.out, args.quiet)


def serve_command(args) -> list[str]:
    """The ``panel serve`` command line for the dashboard with the given network options."""
    from app import main as app_main  # cheap: the page is only built inside panel serve
    from app import setup as app_setup

    cmd = [sys.executable, "-m", "panel", "serve", app_main.__file__, "--port", str(args.port),
           "--index", app_main.__file__, "--setup", app_setup.__file__]
    if args.address:
        cmd += ["--address", args.address]
    for origin in args.allow_websocket_origin or []:
        cmd += ["--allow-websocket-origin", origin]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    if args.liveness:
        cmd += ["--liveness"]
    if args.show:
        cmd += ["--show"]
    return cmd


def serve(args) -> int:
    """Replace this process by ``panel serve`` (so signals from Docker reach the server)."""
    cmd = serve_command(args)
    # numba's OpenMP threads sleep between parallel regions instead of spinning: the server
    # runs several sessions' kernels at once, and spinning threads took the cores from the
    # working ones, the event loop and each other (docs/deploy.md, "Session 5")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
