"""Server RSS after a burst of sessions alive at once, in-process (no browser).

Run:  .venv/bin/python benchmarks/rss_burst.py [N=10] [LIFETIME_S=8]
      PYTHONMALLOC=malloc .venv/bin/python benchmarks/rss_burst.py     # glibc for every object

Serves the page script with ``pn.serve`` on 127.0.0.1 (Bokeh destroys a session LIFETIME_S
after it was built, as no browser connects), builds 2 pages, then N pages at once (HTTP GETs in
threads), and after each wave waits for the sessions to be destroyed, collects garbage and
calls ``malloc_trim``: prints RSS (MiB) and the Dashboards still alive. About 3 minutes on 2
cores (docs/deploy.md, "Memory kept after a burst of sessions").
"""
import gc
import os
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("SGF_DMFT_NO_WARMUP", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import panel as pn  # noqa: E402

import app.main as main  # noqa: E402
from app import cleanup  # noqa: E402


def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
LIFE = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
main.extensions()
port = free_port()
url = f"http://127.0.0.1:{port}/app"
server = pn.serve({"app": main.__file__}, port=port, address="127.0.0.1", threaded=True, show=False,
                  start=True, websocket_origin=f"127.0.0.1:{port}",
                  unused_session_lifetime_milliseconds=int(LIFE*1000), check_unused_sessions_milliseconds=500,
                  liveness=True)
time.sleep(2)


def get():
    with urllib.request.urlopen(url, timeout=300) as r:
        r.read()


def settle(wait):
    time.sleep(wait)
    gc.collect()
    cleanup.trim()
    time.sleep(1)
    from app.dashboard import Dashboard
    return cleanup.count_live(Dashboard)
print("start", round(rss()), flush=True)
get()
get()
print("two pages built", round(rss()), "live", settle(LIFE + 7), "rss", round(rss()), flush=True)
import tracemalloc
if os.environ.get("TRACE"):
    tracemalloc.start(12)
    snap0 = tracemalloc.take_snapshot()
base = rss()
t0 = time.time()
ths = [threading.Thread(target=get) for _ in range(N)]
for t in ths:
    t.start()
for t in ths:
    t.join()
print(f"{N} pages built in {time.time()-t0:.0f}s", round(rss()), flush=True)
live = settle(LIFE + 7)
print("after destroy live", live, "rss", round(rss()), "delta", round(rss() - base), flush=True)
for i in range(2):
    get()
    get()
    live = settle(LIFE + 7)
    print("after 2 more pages live", live, "rss", round(rss()), flush=True)
if os.environ.get("TRACE"):
    snap1 = tracemalloc.take_snapshot()
    st = snap1.compare_to(snap0, "traceback")
    tot = sum(s.size_diff for s in st)
    print("traced diff MiB", tot / 2**20)
    for s in st[:8]:
        print(round(s.size_diff/2**20, 2), "MiB", s.count_diff)
        for line in s.traceback.format()[-12:]:
            print("   ", line)
sys.stdout.flush()
os._exit(0)
