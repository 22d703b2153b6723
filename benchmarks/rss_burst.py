"""Server RSS after bursts of sessions, and CPU per page build, per memory allocator (no browser).

Compare allocator configurations (each in fresh processes, alternating; about 15 minutes for the
default four configurations on 2 cores):

    NUMBA_NUM_THREADS=2 .venv/bin/python benchmarks/rss_burst.py \
        --compare pymalloc,malloc,jemalloc,mimalloc

    --repeats R  processes per configuration for the CPU measurement (3); --builds K page builds
    per process (4); --cycles C open/close cycles after the burst (10) of --batch B pages (2);
    --json PATH  every figure; --libdir DIR where libjemalloc.so.2 / libmimalloc.so.2 are
    (/usr/lib/x86_64-linux-gnu; Debian packages libjemalloc2, libmimalloc2.0).

One burst process alone (what earlier sessions ran; the allocator from the environment):

    .venv/bin/python benchmarks/rss_burst.py [N=10] [LIFETIME_S=8] [--cycles C]
    PYTHONMALLOC=malloc LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
        .venv/bin/python benchmarks/rss_burst.py

Burst: serves the page script with ``pn.serve`` on 127.0.0.1 (Bokeh destroys a session
LIFETIME_S after it was built, as no browser connects), builds 2 pages (the baseline), then N
pages at once (HTTP GETs in threads), then C cycles of B pages at once; after each wave waits
until the sessions are destroyed, collects garbage and calls :func:`app.cleanup.trim` (as the
server's post-session collection does), and prints RSS (MiB), threads and the Dashboards alive.
CPU: process CPU time (all threads, ``time.process_time``) per page build in-process (Dashboard
+ template + Bokeh document, as ``app.main.serve_page``), after one warm-up build; the machine
may be shared, so compare the medians of configurations alternated in one run. See
docs/deploy.md, "Session 5: memory".
"""
import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBDIR = "/usr/lib/x86_64-linux-gnu"

# name -> environment of the measured process ({lib} = --libdir)
CONFIGS = {
    "pymalloc": {},
    "malloc": {"PYTHONMALLOC": "malloc"},
    # what the Docker image ships (Dockerfile): every Python object from jemalloc
    "jemalloc": {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "{lib}/libjemalloc.so.2",
                 "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"},
    "jemalloc-10s": {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "{lib}/libjemalloc.so.2",
                     "MALLOC_CONF": "background_thread:true,max_background_threads:1,"
                                    "dirty_decay_ms:10000,muzzy_decay_ms:0"},
    "jemalloc-default": {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "{lib}/libjemalloc.so.2"},
    "pymalloc+jemalloc": {"LD_PRELOAD": "{lib}/libjemalloc.so.2",
                          "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,"
                                         "muzzy_decay_ms:0"},
    "mimalloc": {"PYTHONMALLOC": "malloc", "LD_PRELOAD": "{lib}/libmimalloc.so.2"},
    "tunables": {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072:"
                                   "glibc.malloc.mmap_threshold=131072"},
}


def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def threads():
    return threading.active_count(), len(os.listdir("/proc/self/task"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")
    sys.path.insert(0, str(ROOT))
    import app.main as main

    main.extensions()
    return main


def child_build(k: int) -> dict:
    """Process CPU per page build, in-process (no server)."""
    _setup()
    from bokeh.document import Document

    from app.dashboard import Dashboard

    def build():
        doc = Document()
        with doc.models.freeze():
            d = Dashboard(period_ms=0)
            d.template().server_doc(doc)
        d.close()

    build()
    ts = []
    for _ in range(k):
        c0 = time.process_time()
        build()
        ts.append(time.process_time() - c0)
    return {"cpu_per_build": ts, "median": statistics.median(ts)}


def child_burst(n: int, life: float, cycles: int, batch: int) -> dict:
    main = _setup()
    import panel as pn

    from app import cleanup
    from app.dashboard import Dashboard

    port = free_port()
    url = f"http://127.0.0.1:{port}/app"
    pn.serve({"app": main.__file__}, port=port, address="127.0.0.1", threaded=True, show=False,
             start=True, websocket_origin=f"127.0.0.1:{port}",
             unused_session_lifetime_milliseconds=int(life * 1000),
             check_unused_sessions_milliseconds=500, liveness=True)
    time.sleep(2)
    out = {"rss_start": rss()}

    def get():
        with urllib.request.urlopen(url, timeout=300) as r:
            r.read()

    def wave(k):
        ths = [threading.Thread(target=get) for _ in range(k)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()

    def settle():
        time.sleep(life)
        deadline = time.time() + 120
        while True:
            gc.collect()
            live = cleanup.count_live(Dashboard)
            if live == 0 or time.time() > deadline:
                break
            time.sleep(1)
        time.sleep(1)
        gc.collect()
        cleanup.trim()
        time.sleep(1)
        return live

    wave(2)
    live = settle()
    out["rss_base"] = base = rss()
    print(f"two pages built: live {live} rss {base:.0f} threads {threads()}", flush=True)
    t0 = time.time()
    wave(n)
    out["rss_peak"] = rss()
    out["burst_s"] = time.time() - t0
    print(f"{n} pages built in {out['burst_s']:.0f}s rss {out['rss_peak']:.0f}", flush=True)
    live = settle()
    out["rss_after_burst"] = rss()
    print(f"after the burst: live {live} rss {rss():.0f} (+{rss() - base:.0f}) "
          f"threads {threads()}", flush=True)
    out["rss_cycles"] = []
    for i in range(cycles):
        wave(batch)
        live = settle()
        out["rss_cycles"].append(rss())
        print(f"cycle {i + 1}: live {live} rss {rss():.0f} (+{rss() - base:.0f})", flush=True)
    out["live_end"] = live
    out["threads_end"] = threads()
    out["cpu_s"] = time.process_time()
    return out


def run_child(cfg: str, args, mode: str) -> dict:
    env = dict(os.environ)
    env.setdefault("NUMBA_NUM_THREADS", "2")
    for k in ("PYTHONMALLOC", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES"):
        env.pop(k, None)
    env.update({k: v.format(lib=args.libdir) for k, v in CONFIGS[cfg].items()})
    cmd = [sys.executable, __file__, "--child", mode, "--builds", str(args.builds),
           "--cycles", str(args.cycles), "--batch", str(args.batch), str(args.n), str(args.life)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        raise SystemExit(f"{cfg} {mode} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(args):
    cfgs = args.compare.split(",")
    for c in cfgs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}: {', '.join(CONFIGS)}")
    res = {c: {"build": [], "burst": None, "env": CONFIGS[c]} for c in cfgs}
    for rep in range(args.repeats):  # alternate, so that other load hits every one alike
        for c in cfgs:
            r = run_child(c, args, "build")
            res[c]["build"].append(r)
            print(f"[{time.strftime('%H:%M:%S')}] build {c} rep {rep}: median "
                  f"{r['median']:.2f} s CPU ({', '.join(f'{t:.2f}' for t in r['cpu_per_build'])})",
                  flush=True)
    if args.n > 0:
        for c in cfgs:
            r = run_child(c, args, "burst")
            res[c]["burst"] = r
            end = (r["rss_cycles"] or [r["rss_after_burst"]])[-1]
            print(f"[{time.strftime('%H:%M:%S')}] burst {c}: base {r['rss_base']:.0f} after burst "
                  f"+{r['rss_after_burst'] - r['rss_base']:.0f} after cycles "
                  f"+{end - r['rss_base']:.0f} MiB, threads {r['threads_end']}", flush=True)
    def med(c):
        return statistics.median(x["median"] for x in res[c]["build"]) if res[c]["build"] else 0

    def paired(c):  # median over repeats of (c's median / the first configuration's, same repeat)
        r = [a["median"] / b["median"] for a, b in zip(res[c]["build"], res[cfgs[0]]["build"])]
        return statistics.median(r) if r else float("nan")

    ref = med(cfgs[0]) or float("nan")
    print(f"\n| configuration | CPU/build, median of process medians (s) | vs {cfgs[0]} "
          f"(paired by repeat) "
          f"| RSS base (MiB) | after burst of {args.n} "
          f"| after {args.cycles} cycles of {args.batch} | peak |")
    print("|---|---|---|---|---|---|---|")
    for c in cfgs:
        m = med(c)
        b = res[c]["burst"]
        tail = (f"{b['rss_base']:.0f} | +{b['rss_after_burst'] - b['rss_base']:.0f} | "
                f"+{(b['rss_cycles'] or [b['rss_after_burst']])[-1] - b['rss_base']:.0f} | "
                f"{b['rss_peak']:.0f}") if b else "- | - | - | -"
        print(f"| {c} | {m:.2f} | {100 * (m / ref - 1):+.0f}% ({100 * (paired(c) - 1):+.0f}%) "
              f"| {tail} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", nargs="?", type=int, default=10, help="pages in the burst (0: CPU only)")
    p.add_argument("life", nargs="?", type=float, default=None,
                   help="unused-session lifetime, seconds (8; 4 with --compare)")
    p.add_argument("--cycles", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--compare", default="")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--builds", type=int, default=4)
    p.add_argument("--libdir", default=LIBDIR)
    p.add_argument("--json", default="")
    p.add_argument("--child", choices=["build", "burst"], default="")
    args = p.parse_args()
    if args.life is None and not args.compare:
        args.life = 8.0
    if args.compare:
        if "--cycles" not in sys.argv:
            args.cycles = 10
        args.life = 4.0 if args.life is None else args.life
        compare(args)
    elif args.child == "build":
        print(json.dumps(child_build(args.builds)), flush=True)
    else:
        r = child_burst(args.n, args.life, args.cycles, args.batch)
        print(json.dumps(r), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the server's threads


if __name__ == "__main__":
    main()
