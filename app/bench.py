"""Measure the dashboard's latency: Run -> first theory point -> all curves, real engines.

Headless (default): through the same runner, store and plot-data path as the browser (the
periodic callback is emulated by ticking every 150 ms). ``--browser``: the served app in
headless chromium, timed from the click. ``--jobs``: each engine call alone.

    NUMBA_NUM_THREADS=2 python -m app.bench                       # default preset
    NUMBA_NUM_THREADS=2 python -m app.bench --no-draw             # engines only
    NUMBA_NUM_THREADS=2 python -m app.bench --preset "Online limit: many samples" --repeat 2
    NUMBA_NUM_THREADS=2 python -m app.bench --set dt=0.05 --set samples=2000   # variants
    NUMBA_NUM_THREADS=2 python -m app.bench --jobs                # each engine call alone
    NUMBA_NUM_THREADS=2 python -m app.bench --browser             # served, in headless chromium
    NUMBA_NUM_THREADS=2 python -m app.bench --redraw              # cost of one curve redraw

The kernels are warmed up first (as the server does at start), so the numbers are those of a
Run on a warm server. Prints one line per run and per series, the process CPU time of the run
(user + system, all threads: on a shared machine, CPU time and ratios are steadier than wall
clock) and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover
        return None


def _s(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def parse_sets(items) -> dict:
    """['dt=0.1', 'sims=gd,sgf'] -> {'dt': 0.1, 'sims': ['gd', 'sgf']} (JSON values, else text)."""
    out = {}
    for it in items or ():
        k, _, v = it.partition("=")
        if k == "sims":
            out[k] = [s for s in v.split(",") if s]
            continue
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _configure(d, name: str, sets: dict) -> None:
    d.apply_preset(name)
    sets = dict(sets)
    if "sims" in sets:
        d.sims = sets.pop("sims")
    if "gd_theory" in sets:
        d.gd_theory = bool(sets.pop("gd_theory"))
    if sets:
        d.experiment.param.update(**sets)


def measure(preset: str | None = None, repeat: int = 1, max_workers: int | None = None,
            period: float = 0.15, timeout: float = 600.0, draw: bool = True,
            sets: dict | None = None) -> list[dict]:
    """Time a Run of ``preset`` (with the parameter overrides ``sets``). ``draw``: render the
    curve plots (as a browser session would, server side) so that every redraw costs what it
    costs in the server."""
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
        _configure(d, name, sets or {})
        if draw:
            import holoviews as hv

            d._rebuild_plots()
            hv.renderer("bokeh").get_plot(d.grid.layout)  # subscribes to the plots' Pipe
            grid = d.grid
        load0, c0 = loadavg(), cpu_seconds()
        if not d.run():
            raise SystemExit(f"invalid preset {name!r}: {d.alert.object}")
        ok = d.wait(timeout, poll=period)
        cpu = cpu_seconds() - c0
        if draw and d.grid is not grid:
            print("note: the Run rebuilt the plots; later redraws were not rendered")
        run = d.store.current
        e = d.experiment
        rec = {"preset": name, "repeat": i, "warmup_s": warm, "finished": ok,
               "first_theory_s": run.t_first_theory, "all_curves_s": run.t_all,
               "cpu_s": cpu, "load_before": load0, "load_after": loadavg(),
               "config": {"dt": e.dt, "T": e.T, "samples": e.samples, "d": e.d,
                          "seeds": e.seeds, "method": e.resolved_method(), "sims": d.sims,
                          "gd_theory": d.gd_theory},
               "draw": draw, "last_redraw_s": d.plot_cost,
               "series": {k: {"engine": s.engine, "label": s.label, "status": s.status,
                              "first_s": s.t_first, "end_s": s.t_end, "points": len(s),
                              "message": s.message}
                          for k, s in run.series.items()}}
        out.append(rec)
        d.close()
    return out


def measure_jobs(preset: str | None = None, sets: dict | None = None) -> list[dict]:
    """Each engine call of a Run, alone and one after the other (wall and CPU seconds): where
    the time of a Run goes."""
    from solver import dmft, simulate
    from solver.warmup import warmup

    from . import presets
    from .dashboard import Dashboard
    from .store import plan_jobs

    warmup()
    d = Dashboard(period_ms=0, sync_url=False)
    _configure(d, preset or presets.default_name(), sets or {})
    jobs = plan_jobs(d.experiment, d.sims, d.gd_theory)
    d.close()
    out = []
    for j in jobs:
        fn = dmft.stream if j.kind == "theory" else simulate.stream
        w0, c0 = time.perf_counter(), cpu_seconds()
        first = None
        n = 0
        for _ in fn(j.exp):
            n += 1
            if first is None:
                first = time.perf_counter() - w0
        e = j.exp
        out.append({"key": j.key, "kind": j.kind, "wall_s": time.perf_counter() - w0,
                    "cpu_s": cpu_seconds() - c0, "first_s": first, "points": n,
                    "what": (f"method={e.resolved_method()} N={e.samples} K={e.steps}"
                             if j.kind == "theory" else
                             f"algo={e.algo} sampling={e.sampling} d={e.d} seeds={e.seeds}")})
    return out


def _truncate(data: dict, k: int) -> dict:
    """The curve data of :func:`app.plots.curve_data` cut to its first ``k`` points."""
    out = {}
    for sid, v in data.items():
        n = min(k, len(v["x"]))
        out[sid] = dict(v, x=v["x"][:n], t=v["t"][:n],
                        values={o: (a[:n], b[:n]) for o, (a, b) in v["values"].items()})
    return out


def measure_redraw(preset: str | None = None, redraws: int = 20, sets: dict | None = None
                   ) -> dict:
    """Server cost of one redraw of the Curves tab, both paths in the same process: the
    HoloViews path (data sent through the DynamicMaps' Pipe) and the direct path (app/draw.py:
    Bokeh sources streamed, ranges set). The page is rendered into a Bokeh document (as a
    served session, without a browser); a Run of ``preset`` is computed first, then its
    curves are replayed growing in ``redraws`` steps through each path. Per redraw: CPU
    seconds (process time of this thread's work) and the bytes of the PATCH-DOC message a
    browser would receive."""
    import bokeh.document
    from bokeh.protocol import Protocol

    from solver.warmup import warmup

    from . import draw, plots, presets
    from .dashboard import Dashboard

    warmup()
    name = preset or presets.default_name()
    d = Dashboard(period_ms=0, sync_url=False)
    _configure(d, name, sets or {})
    doc = bokeh.document.Document()
    d.template().server_doc(doc)
    if not d.run():
        raise SystemExit(f"invalid preset {name!r}: {d.alert.object}")
    if not d.wait(600):
        raise SystemExit("the run did not finish")
    full = plots.curve_data(d._runs_and_styles(), d.xaxis)
    n = max(len(v["x"]) for v in full.values())
    ks = sorted({max(1, round(n * (i + 1) / redraws)) for i in range(redraws)})
    events = []
    doc.on_change(lambda ev: events.append(ev))
    proto = Protocol()

    def nbytes():
        if not events:
            return 0
        msg = proto.create("PATCH-DOC", list(events))
        events.clear()
        return len(msg.content_json) + sum(len(b.to_bytes()) for b in msg.buffers)

    out = {"preset": name, "points": n, "redraws": len(ks), "load_before": loadavg()}
    for path in ("holoviews", "direct"):
        d.curve_pipe.send({})
        events.clear()
        cpu, sent = [], []
        for k in ks:
            data = _truncate(full, k)
            c0 = time.process_time()
            if path == "direct":
                if not draw.send_curves(d.grid, d.curves_pane, data):
                    raise SystemExit("direct path not available")
            else:
                d.curve_pipe.send(data)
            cpu.append(time.process_time() - c0)
            sent.append(nbytes())
        out[path] = {"cpu_s_mean": sum(cpu) / len(cpu), "cpu_s_max": max(cpu),
                     "bytes_mean": sum(sent) / len(sent), "bytes_last": sent[-1]}
    out["load_after"] = loadavg()
    out["direct_stats"] = draw.stats(d.grid)
    d.close()
    return out


#: Where the browser mode looks for chromium (as tests/conftest.py).
CHROMIUM = os.environ.get("SGF_DMFT_CHROMIUM", "/usr/bin/chromium")
_FIRST_POINT_JS = """() => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
    for (const m of doc._all_models.values()) {
      const d = m.data;
      if (!d) continue;
      const v = d.get ? d.get('train_loss') : d['train_loss'];
      if (v && v.length) return true;
    }
  }
  return false;
}"""


def _draw_stats(d, t0: float | None = None) -> dict:
    """How the session drew its curves: direct updates, HoloViews fallbacks, sources
    streamed/replaced (cumulative for its current plots), redraws skipped by backpressure;
    with ``t0`` (perf_counter of the click) the seconds from it to the first direct draw."""
    from . import draw

    dc = getattr(d.grid, "_direct", None)
    out = draw.stats(d.grid)
    if t0 is not None and dc is not None:
        after = [t - t0 for t in dc.times if t >= t0]
        out["click_to_first_direct_draw_s"] = round(after[0], 3) if after else None
    bp = draw._BACKPRESSURE.get(d.curves_pane)
    out["skipped_backlog"] = bp.skipped if bp else 0
    return out


def measure_browser(preset: str | None = None, repeat: int = 2, timeout: float = 300.0,
                    screenshot: str | None = None) -> list[dict]:
    """The Done-when measurement: serve the app as ``sgf-dmft serve`` does (warm-up at start,
    Panel thread pool of 2), open it in headless chromium (Playwright), choose ``preset``,
    press Run and time, from the click, the first plotted point in the browser's Bokeh data
    and the "Done" status text; the server's own timings of the session come with them.
    ``repeat`` Runs in the same page (the first may include loading the kernels' cache)."""
    import socket

    import panel as pn
    from playwright.sync_api import sync_playwright

    from . import dashboard, presets
    from .main import create, extensions
    from .setup import start_warmup

    extensions()
    pn.config.nthreads = 2
    start_warmup()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = pn.serve({"/": create}, port=port, address="127.0.0.1", threaded=True, show=False,
                      websocket_origin=[f"127.0.0.1:{port}"])
    out = []
    name = preset or presets.default_name()
    try:
        with sync_playwright() as pw:
            br = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu",
                                          "--disable-dev-shm-usage"])
            page = br.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("button", name="▶ Run").wait_for(timeout=timeout * 1000)
            deadline = time.monotonic() + 60
            while not list(dashboard.SESSIONS) and time.monotonic() < deadline:
                time.sleep(0.1)
            d = list(dashboard.SESSIONS)[-1]
            from solver.warmup import warmup
            warmup()  # wait for the server's warm-up (returns at once when done)
            if d.preset_select.value != name:  # choose it in the page, as a user would
                page.locator("select").first.select_option(name)
                deadline = time.monotonic() + 30
                while d.preset_select.value != name and time.monotonic() < deadline:
                    time.sleep(0.1)
            for i in range(repeat):
                btn = page.get_by_role("button", name="▶ Run again" if i else "▶ Run")
                time.sleep(1.0)
                old = d.store.current
                load0, c0 = loadavg(), cpu_seconds()
                t0 = time.perf_counter()
                btn.click()
                first = None
                while time.perf_counter() - t0 < timeout:
                    run = d.store.current
                    new = run is not None and run is not old
                    # the first Run only: later ones start with the old curves in the page
                    if first is None and new and i == 0 and page.evaluate(_FIRST_POINT_JS):
                        first = time.perf_counter() - t0
                    if new and run.finished and page.get_by_text("Done in").count():
                        break
                    time.sleep(0.1)
                done = time.perf_counter() - t0
                run = d.store.current
                out.append({"preset": name, "repeat": i, "click_to_first_point_s": first,
                            "click_to_run_start_s": run.t_start - t0,
                            "click_to_done_text_s": done, "first_theory_s": run.t_first_theory,
                            "all_curves_s": run.t_all, "cpu_s": cpu_seconds() - c0,
                            "load_before": load0, "load_after": loadavg(),
                            "curve_draws": _draw_stats(d, t0),
                            "series": {k: {"label": s.label, "status": s.status,
                                           "first_s": s.t_first, "end_s": s.t_end}
                                       for k, s in run.series.items()}})
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            br.close()
    finally:
        for d in list(dashboard.SESSIONS):
            d.close()
        server.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="preset name (default: the default preset)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-workers", type=int, default=None)
    ap.add_argument("--no-draw", action="store_true",
                    help="do not render the plots (engines and bookkeeping only)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a parameter of the preset (JSON value; sims=gd,sgf; "
                         "gd_theory=false); repeatable")
    ap.add_argument("--jobs", action="store_true",
                    help="time each engine call alone, one after the other")
    ap.add_argument("--browser", action="store_true",
                    help="serve the app and time Runs in headless chromium (Playwright; "
                         "SGF_DMFT_CHROMIUM, default /usr/bin/chromium)")
    ap.add_argument("--redraw", action="store_true",
                    help="server cost (CPU, bytes sent) of one redraw of the curves: HoloViews "
                         "path against the direct path (app/draw.py), same process")
    ap.add_argument("--screenshot", default=None, help="with --browser: save a screenshot")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = ap.parse_args(argv)
    sets = parse_sets(a.set)
    if a.browser:
        if sets:
            ap.error("--set is not supported with --browser")
        res = measure_browser(a.preset, max(1, a.repeat if a.repeat > 1 else 2),
                              screenshot=a.screenshot)
        if a.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"cores: {os.cpu_count()}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}"
              f" (browser: served app, headless chromium)")
        for r in res:
            fp = r["click_to_first_point_s"]
            print(f"{r['preset']} #{r['repeat']}: click -> Run starts on the server "
                  f"{r['click_to_run_start_s']:.2f} s, click -> first point in the browser "
                  f"{'-' if fp is None else f'{fp:.2f} s'}, click -> 'Done' shown "
                  f"{r['click_to_done_text_s']:.1f} s; server: first theory point "
                  f"{_s(r['first_theory_s'], 2)} s, all curves {_s(r['all_curves_s'])} s, cpu "
                  f"{r['cpu_s']:.1f} s (load average {r['load_before']:.1f} -> "
                  f"{r['load_after']:.1f})")
            print(f"    curve draws: {r['curve_draws']}")
        return 0
    if a.redraw:
        r = measure_redraw(a.preset, sets=sets)
        if a.json:
            print(json.dumps(r, indent=2))
            return 0
        print(f"{r['preset']}: {r['points']} points per series, {r['redraws']} redraws growing "
              f"to all of them (load average {_s(r['load_before'])} -> {_s(r['load_after'])};"
              f" CPU time of this process)")
        for path in ("holoviews", "direct"):
            p = r[path]
            print(f"    {path:9s} cpu per redraw {p['cpu_s_mean'] * 1e3:7.1f} ms (max "
                  f"{p['cpu_s_max'] * 1e3:.1f}), patch sent {p['bytes_mean'] / 1e3:7.1f} kB "
                  f"(last {p['bytes_last'] / 1e3:.1f} kB)")
        print(f"    ratio holoviews/direct cpu "
              f"{r['holoviews']['cpu_s_mean'] / max(r['direct']['cpu_s_mean'], 1e-9):.1f}x; "
              f"direct path: {r['direct_stats']}")
        return 0
    if a.jobs:
        res = measure_jobs(a.preset, sets)
        if a.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"cores: {os.cpu_count()}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}"
              f", load average {loadavg()}")
        for r in res:
            print(f"    {r['key']:14s} wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                  f"first {r['first_s']:.2f} s  {r['points']} points  {r['what']}")
        print(f"    total cpu {sum(r['cpu_s'] for r in res):.2f} s")
        return 0
    res = measure(a.preset, a.repeat, a.max_workers, draw=not a.no_draw, sets=sets)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"cores: {os.cpu_count()}, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')}, "
          f"warm-up {res[0]['warmup_s']:.1f} s")
    for r in res:
        ft = r["first_theory_s"]
        c = r["config"]
        print(f"{r['preset']} #{r['repeat']} (dt={c['dt']:g}, T={c['T']:g}, N={c['samples']}, "
              f"method {c['method']}, d={c['d']}, seeds={c['seeds']}, sims {c['sims']}, "
              f"tau=0 theory {c['gd_theory']}):")
        print(f"    first theory point {ft:.2f} s, all curves {r['all_curves_s']:.1f} s, "
              f"cpu {r['cpu_s']:.1f} s (plots rendered: {r['draw']}, last redraw "
              f"{r['last_redraw_s']:.2f} s; load average {r['load_before']:.1f} -> "
              f"{r['load_after']:.1f})" if ft is not None and r["all_curves_s"] is not None
              else "    did not finish")
        for k, s in r["series"].items():
            first = f"{s['first_s']:.2f}" if s["first_s"] is not None else "-"
            end = f"{s['end_s']:.1f}" if s["end_s"] is not None else "-"
            print(f"    {k:14s} {s['engine']:12s} {s['status']:8s} first {first:>6s} s  "
                  f"end {end:>6s} s  {s['points']} points  {s['label']} {s['message']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
