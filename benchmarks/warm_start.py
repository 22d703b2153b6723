"""Warm start: seconds from the first Run to the first theory point, in a fresh server process.

Run:  NUMBA_NUM_THREADS=2 .venv/bin/python benchmarks/warm_start.py [--repeats 3] [--json out]

Each repeat starts a fresh Python process (a cold start of the server: nothing imported, nothing
compiled in memory) with the numba cache as it is (warm once ``python -m solver.warmup`` or any
earlier run has filled it), does what the server does at start (``app.setup.start_warmup()``,
the background warm-up of the kernels), builds one session's Dashboard with the default preset
and the real engines, and presses Run:

* ``immediate``: Run right after the page is built, while the background warm-up may still run;
* ``after_warmup``: Run once the background warm-up has finished (a user arriving a few seconds
  after the server started).

The figure is the runner's own ``t_first_theory`` (perf_counter from Run to the first theory
snapshot arriving in the session's queue, what the status line shows as "first theory point
after ... s"), plus the process's wall time from start to the page built. About 1 minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
t_proc = time.perf_counter()
sys.path.insert(0, os.environ["SGF_ROOT"])
import app.main as m
m.extensions()
from app.setup import start_warmup
start_warmup()
from app.dashboard import Dashboard
d = Dashboard(period_ms=0, sync_url=False)
t_page = time.perf_counter() - t_proc
mode = sys.argv[1]
if mode == "after_warmup":
    from solver.warmup import _done
    _done.wait(300)
t_wait = time.perf_counter() - t_proc
assert d.run(), d.alert.object
ok = d.wait(timeout=300, poll=0.01)
run = d.store.current
print(json.dumps({"mode": mode, "t_first_theory_s": run.t_first_theory, "t_all_s": run.t_all,
                  "page_built_s": t_page, "run_pressed_s": t_wait, "finished": ok,
                  "preset": d.preset_select.value}))
d.close()
os._exit(0)
"""


def one(mode: str) -> dict:
    env = dict(os.environ, SGF_ROOT=str(ROOT))
    env.setdefault("NUMBA_NUM_THREADS", "2")
    env.pop("SGF_DMFT_NO_WARMUP", None)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"load_before": os.getloadavg(), "runs": []}
    for _ in range(max(1, min(10, args.repeats))):
        for mode in ("immediate", "after_warmup"):
            r = one(mode)
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
    for mode in ("immediate", "after_warmup"):
        ts = [r["t_first_theory_s"] for r in res["runs"] if r["mode"] == mode]
        res[mode] = {"t_first_theory_s_median": statistics.median(ts), "max": max(ts),
                     "n": len(ts)}
    res["load_after"] = os.getloadavg()
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
