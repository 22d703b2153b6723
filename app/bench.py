"""Measure the dashboard's latency headless: time from Run to the first theory point and to
the end of every curve, with the real engines, through the same runner, store and plot-data
path as the browser (the periodic callback is emulated by ticking every 150 ms).

    NUMBA_NUM_THREADS=2 python -m app.bench                       # default preset
    NUMBA_NUM_THREADS=2 python -m app.bench --no-draw             # engines only
    NUMBA_NUM_THREADS=2 python -m app.bench --preset "Online limit: many samples" --repeat 2

The kernels are warmed up first (as the server does at start), so the numbers are those of a
Run on a warm server. Prints one line per run and per series.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def measure(preset: str | None = None, repeat: int = 1, max_workers: int | None = None,
            period: float = 0.15, timeout: float = 600.0, draw: bool = True) -> list[dict]:
    """Time a Run of ``preset``. ``draw``: render the curve plots (as a browser session would,
    server side) so that every redraw costs what it costs in the server."""
    from solver.warmup import warmup

    from . import presets
    from .dashboard import Dashboard

    t0 = time.perf_counter()
    warmup()
    warm = time.perf_counter() - t0
    name = preset or presets.default_name()
    out = []
    for i in range(repeat):
        d = Dashboard(period_ms=0, max_workers=max_workers, sync_url=False)
        d.apply_preset(name)
        if draw:
            import holoviews as hv

            hv.renderer("bokeh").get_plot(d.grid.layout)  # subscribes to the plots' Pipe
            grid = d.grid
        if not d.run():
            raise SystemExit(f"invalid preset {name!r}: {d.alert.object}")
        ok = d.wait(timeout, poll=period)
        if draw and d.grid is not grid:
            print("note: the Run rebuilt the plots; later redraws were not rendered")
        run = d.store.current
        rec = {"preset": name, "repeat": i, "warmup_s": warm, "finished": ok,
               "first_theory_s": run.t_first_theory, "all_curves_s": run.t_all,
               "draw": draw, "last_redraw_s": d.plot_cost,
               "series": {k: {"engine": s.engine, "status": s.status, "first_s": s.t_first,
                              "end_s": s.t_end, "points": len(s), "message": s.message}
                          for k, s in run.series.items()}}
        out.append(rec)
        d.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="preset name (default: the default preset)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-workers", type=int, default=None)
    ap.add_argument("--no-draw", action="store_true",
                    help="do not render the plots (engines and bookkeeping only)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = ap.parse_args(argv)
    res = measure(a.preset, a.repeat, a.max_workers, draw=not a.no_draw)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"cores: {os.cpu_count()}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}, "
          f"warm-up {res[0]['warmup_s']:.1f} s")
    for r in res:
        ft = r["first_theory_s"]
        print(f"{r['preset']} #{r['repeat']}: first theory point {ft:.2f} s, "
              f"all curves {r['all_curves_s']:.1f} s (plots rendered: {r['draw']}, last redraw "
              f"{r['last_redraw_s']:.2f} s)" if ft is not None and r["all_curves_s"]
              is not None else f"{r['preset']} #{r['repeat']}: did not finish")
        for k, s in r["series"].items():
            first = f"{s['first_s']:.2f}" if s["first_s"] is not None else "-"
            end = f"{s['end_s']:.1f}" if s["end_s"] is not None else "-"
            print(f"    {k:14s} {s['engine']:12s} {s['status']:8s} first {first:>6s} s  "
                  f"end {end:>6s} s  {s['points']} points {s['message']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
