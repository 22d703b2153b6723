"""Load test of the dashboard server: K concurrent browser sessions, then open/close cycles.

Run:  NUMBA_NUM_THREADS=2 .venv/bin/python benchmarks/load.py [--sessions 10] [--cycles 50]
      [--timeout 900] [--json out.json]

Loopback only (127.0.0.1). Starts the server with the Docker entry command (read from the
Dockerfile's CMD, run with this venv's ``sgf-dmft``; the address becomes 127.0.0.1 and the port
a free one) and the image's memory-allocator settings (the Dockerfile's ENV, where the preloaded
library is installed here; ``--no-image-env`` without them; the figures name them), then with a
headless chromium (Playwright; ``/usr/bin/chromium`` or ``$SGF_DMFT_CHROMIUM``, same flags as
tests/conftest.py; ``--page-nice N`` starts it at niceness N):

1. baseline: one session opened and closed (imports done), server threads and RSS once Bokeh
   has destroyed it;
2. K sessions at once, each opens the dashboard's default preset (``--config preset``, the
   default: theory, GD theory, GD, SGF and SGD simulations; or ``--config small``: T=2, d=300,
   2 seeds, 600 Monte Carlo samples, theory + SGF + SGD) and presses Run. While the runs go
   on, each session changes a numeric input (delta) twice and times how long the page takes
   to show the
   dependent text (the "epochs / SGD steps / n = δd" line); the best place in the server's
   queue each session's status line showed is recorded. Measured: every run completes ("Done
   in"), the time to completion, the widget latencies, server threads and RSS before, peak
   (sampled every 0.2 s) and after the sessions are closed and destroyed. Each widget latency
   is also split into ``typing`` (Playwright's ``fill``, which waits for a busy page to render
   the input stably) and ``response``, from the end of the typing (the value is committed) to
   the text seen. Every edit types a δ of its own (2.1 + 0.2 i, then 2.2 + 0.2 i for session
   i), so the server's log of each update, which names its "n = δd", tells which edit it
   answered: the response is split into ``to_server`` (typing done to the message's arrival),
   ``server`` (arrival to update sent) and ``page`` (update sent to text seen: the browser's
   share), ``runs.{to_server,server,page}_s_median`` / ``_max``;
3. ``--cycles`` open/close cycles (a page loads the dashboard, then closes): threads and RSS
   after they are destroyed, against the baseline.

One chromium process serves every session (one browser context each; each page still gets a
renderer process, i.e. a main thread, of its own: ``renderers``). Chromium sets its processes'
priorities itself: the browser and GPU processes run at nice -8 and the pages' renderers at 0
whatever niceness it was started at (``browser_nice``), so ``--page-nice`` does not lower the
pages' priority where chromium may raise it (root). The browser pages run on
the same cores as the server, so the latencies seen in the pages are split with the server's
own figures (``SGF_DMFT_LATENCY_LOG``, app/setup.py): ``server_ws_ms``, from the browser's new
value arriving at the server to the server sending the dependent "n = δd" update, and
``loop_lag_ms``, the delay of a callback on the server's event loop sampled every 0.25 s (the
least time any browser event waits), each while the pages load and while the runs go on.

``--no-settle`` (A/B runs of the runs' figures) skips the 45 s waits for closed sessions to be
destroyed: no memory or thread figures after the sessions and cycles.

Bounded: at most 40 sessions and 500 cycles; every wait has a timeout and the whole run stops
at ``--timeout`` seconds; the server is killed (its process group) on exit.

``--page-metrics`` also records each page's main-thread time over its Run (CDP
``Performance.getMetrics``: TaskDuration, ScriptDuration, LayoutDuration, RecalcStyleDuration;
``page_metrics`` per session, ``page_metrics_median``). Always recorded: ``renderers``, the
browser's renderer processes during the runs (count, and each one's CPU seconds), which tells
whether each page had its own main thread; ``app_env``, the ``SGF_DMFT_*`` settings the server
got (for A/B runs).

``--trace`` (diagnosis; slows the server a little) also sets ``SGF_DMFT_LATENCY_TRACE``: the
stages of each widget change on the server and the tasks of Panel's thread pool are summarised
(``stages_ms_*``, ``pool_*``, ``slow_sends_*``), and every thread's Python stack is sampled
every 20 ms into ``<latency_log>.prof.json`` (the log is kept; its path is in the output).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SGF_DMFT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
SMALL = '?T=2&d=300&seeds=2&samples=600&sims=["sgf","sgd-fresh"]&gd_theory=false'
#: what each session runs (``--config``): query string and d (the "n = δd" readout needs it).
#: "preset" is the dashboard's default preset (the page as it opens: theory, GD theory, GD,
#: SGF and SGD simulations, d = 1000, 4 seeds, T = 10, dt = 0.1), as the issue asks; "small"
#: the lighter configuration of the figures before session 5.
CONFIGS = {"preset": ("", 1000), "small": (SMALL, 300)}
MAX_SESSIONS, MAX_CYCLES = 40, 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_cmd() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    if not m:
        raise SystemExit("Dockerfile has no exec-form CMD")
    return json.loads(m.group(1))


def dockerfile_env() -> dict:
    """The Dockerfile's ENV settings (``KEY=VALUE`` forms, continuation lines joined)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict = {}
    for m in re.finditer(r"^ENV\s+(.*)$", text, re.M):
        env.update(re.findall(r"(\w+)=(\S*)", m.group(1)))
    return env


def image_env() -> dict:
    """The Dockerfile's memory-allocator settings (``ENV`` lines: LD_PRELOAD, PYTHONMALLOC,
    MALLOC_CONF), which the server gets as in the image; {} where the preloaded library does
    not load on this machine (then the server runs with Python's allocator: say so)."""
    env = dockerfile_env()
    alloc = {k: env[k] for k in ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF") if env.get(k)}
    if alloc.get("LD_PRELOAD"):
        r = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True,
                           env=dict(os.environ, LD_PRELOAD=alloc["LD_PRELOAD"]))
        if r.returncode or "cannot be preloaded" in r.stderr:
            return {}
    return alloc


def proc_status(pid: int) -> dict:
    """Threads and RSS (MiB) of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser_pids() -> list[int]:
    """Processes of the chromium that drives the pages (every chromium of this user)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as fh:
                    if fh.read().startswith(("chromium", "chrome", "headless_shell")):
                        out.append(int(d))
            except OSError:
                pass
    return out


def renderer_processes() -> list[dict]:
    """The browser's renderer processes (``--type=renderer`` in the command line): pid, CPU
    seconds, and whether it is a page's renderer (not an extension/utility one)."""
    out = []
    for pid in browser_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()  # chromium rewrites its title: one string, or NUL-separated
            if b"--type=renderer" not in cmd:
                continue
            out.append({"pid": pid, "cpu_s": round(cpu_seconds(pid), 2),
                        "nice": os.getpriority(os.PRIO_PROCESS, pid),
                        "webui": b"--top-chrome-webui" in cmd,
                        "extension": b"--extension-process" in cmd})
        except (OSError, IndexError, ValueError):
            continue
    return out


def browser_kinds() -> dict:
    """The browser's processes by ``--type`` (browser, renderer, gpu-process, ...)."""
    out: dict = {}
    for pid in browser_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                m = re.search(rb"--type=([a-z-]+)", fh.read())
        except OSError:
            continue
        out.setdefault(m.group(1).decode() if m else "browser", []).append(pid)
    return out


#: CDP Performance.getMetrics entries recorded per page with ``--page-metrics`` (seconds)
PAGE_METRICS = ("TaskDuration", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration",
                "LayoutCount", "RecalcStyleCount")


async def page_metrics(cdp) -> dict:
    got = await cdp.send("Performance.getMetrics")
    return {m["name"]: m["value"] for m in got["metrics"] if m["name"] in PAGE_METRICS}


class Sampler:
    """Samples a process's RSS and threads every ``period`` s in a thread; keeps the peak.
    Also the CPU seconds the server and the browser's processes use while it runs
    (``cpu_s()``; a browser process that ends between two samples loses its last 0.2 s)."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.peak_rss = 0.0
        self.peak_threads = 0
        self._cpu0: dict = {}
        self._cpu1: dict = {}
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _cpu(self):
        for pid in [self.pid] + browser_pids():
            try:
                c = cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                continue
            # a browser process first seen after the start counts from its birth
            self._cpu0.setdefault(pid, c if not self._cpu1 or pid == self.pid else 0.0)
            self._cpu1[pid] = c

    def reset_cpu(self) -> None:
        """Count CPU from now on."""
        self._cpu()
        self._cpu0 = dict(self._cpu1)

    def cpu_s(self) -> dict:
        used = {p: self._cpu1[p] - self._cpu0[p] for p in self._cpu1}
        return {"server": round(used.pop(self.pid, 0.0), 1),
                "browser": round(sum(used.values()), 1)}

    def _run(self):
        while not self._stop.is_set():
            try:
                st = proc_status(self.pid)
            except OSError:
                return
            self.peak_rss = max(self.peak_rss, st["rss_mib"])
            self.peak_threads = max(self.peak_threads, st["threads"])
            self._cpu()
            self._stop.wait(self.period)

    def __enter__(self):
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join(5)


def start_server(port: int, latency_log: str | None = None, trace: bool = False,
                 env_extra: dict | None = None) -> subprocess.Popen:
    cmd = dockerfile_cmd()
    exe = Path(sys.executable).parent / cmd[0]
    if not exe.exists():
        raise SystemExit(f"{exe} not found: pip install -e . in this venv")
    cmd = [str(exe)] + cmd[1:]
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--address") + 1] = "127.0.0.1"  # loopback only
    env = dict(os.environ, BOKEH_ALLOW_WS_ORIGIN=f"127.0.0.1:{port}")
    env.setdefault("NUMBA_NUM_THREADS", "2")
    env.update(env_extra or {})
    if latency_log:
        env["SGF_DMFT_LATENCY_LOG"] = latency_log
        if trace:
            env["SGF_DMFT_LATENCY_TRACE"] = "1"
    log = open(ROOT / "test-results" / "load-server.log", "w") if (
        ROOT / "test-results").is_dir() else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"server did not answer {url} within {timeout} s")


async def settle(pid: int, target_threads: int | None, min_wait: float = 45.0,
                 timeout: float = 90.0) -> tuple[dict, float]:
    """Wait ``min_wait`` s (Bokeh destroys a closed session within its unused-session check,
    17 s, plus its lifetime, 15 s; the server collects garbage 5 s later), then until the server has at most ``target_threads``
    threads (idle pool workers end after 5 s); returns (status, seconds waited)."""
    t0 = time.monotonic()
    await asyncio.sleep(min_wait)
    st = proc_status(pid)
    while target_threads is not None and time.monotonic() - t0 < timeout:
        st = proc_status(pid)
        if st["threads"] <= target_threads:
            break
        await asyncio.sleep(1.0)
    return st, time.monotonic() - t0


def read_latency_log(path: str) -> list | None:
    """The server's latency log (``SGF_DMFT_LATENCY_LOG``, JSON lines); None if unreadable."""
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return None


def latency_summary(path: str, windows: dict) -> dict:
    """Server-side latencies (ms) logged in each wall-clock window: median, p90, max, n."""
    rows = read_latency_log(path)
    if rows is None:
        return {}
    out = {}
    live = [r for r in rows if r["kind"] == "live"]
    if live:  # Dashboards alive after the server's last garbage collection
        out["live_dashboards_last"] = live[-1]["dashboards"]
        out["live_dashboards_max"] = max(r["dashboards"] for r in live)
    def stats(ms):
        ms = sorted(ms)
        return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
                "max": ms[-1], "n": len(ms)}

    for name, (t0, t1) in windows.items():
        for kind, label in (("ws", "server_ws_ms"), ("lag", "loop_lag_ms")):
            ms = [r["ms"] for r in rows if r["kind"] == kind and t0 <= r["t"] <= t1]
            if ms:
                out[f"{label}_{name}"] = stats(ms)
        # --trace: stages of the widget change (ms after the message arrived) and the tasks
        # of Panel's thread pool (app/setup.py _install_stage_trace)
        st = [r for r in rows if r["kind"] == "stage" and t0 <= r["t"] <= t1]
        if st:
            keys = sorted({k for r in st for k in r} - {"kind", "t"})
            out[f"stages_ms_{name}"] = {k: stats([r[k] for r in st if k in r]) for k in keys}
        sends = [r for r in rows if r["kind"] == "send" and t0 <= r["t"] <= t1]
        if sends:  # writes that waited >= 5 ms for the browser to read
            out[f"slow_sends_{name}"] = dict(stats([r["ms"] for r in sends]),
                                             total_s=round(sum(r["ms"] for r in sends) / 1e3, 2))
        pool = [r for r in rows if r["kind"] == "pool" and t0 <= r["t"] <= t1]
        if pool:
            by: dict = {}
            for r in pool:
                by.setdefault(r["fn"], []).append(r)
            out[f"pool_{name}"] = {
                fn: {"n": len(rs), "run_ms_sum": round(sum(r["ms"] for r in rs), 1),
                     "cpu_ms_sum": round(sum(r["cpu_ms"] for r in rs), 1),
                     "run_ms": stats([r["ms"] for r in rs]),
                     "wait_ms": stats([r["wait_ms"] for r in rs])}
                for fn, rs in by.items()}
    return out


def split_latencies(path: str, recs: list) -> dict:
    """Each widget change during the runs split into its three legs, matched to the server's
    log by the "n = δd" it sent (every edit types its own δ): ``to_server`` (end of the typing
    to the message's arrival at the server), ``server`` (arrival to the update sent) and
    ``page`` (update sent to the text seen in the page: the browser's share). Medians and max,
    seconds."""
    rows = read_latency_log(path)
    if rows is None:
        return {}
    sent = {}
    for r in rows:
        if r["kind"] == "ws" and r.get("n") is not None:
            sent.setdefault(r["n"], r)
    legs: dict = {"to_server": [], "server": [], "page": []}  # + page_send (below)
    for rec in recs:
        for m, during, n in zip(rec.get("marks", []), rec["during_run"], rec.get("n", [])):
            r = sent.get(n)
            if not during or r is None:
                continue
            t_out = r["t"]
            t_in = t_out - r["ms"] / 1e3
            legs["to_server"].append(t_in - m[1])
            legs["server"].append(r["ms"] / 1e3)
            legs["page"].append(m[3] - t_out)
            rec.setdefault("legs_s", []).append(  # this edit's (to_server, server, page)
                [round(t_in - m[1], 3), round(r["ms"] / 1e3, 3), round(m[3] - t_out, 3)])
            # --page-metrics: the to_server leg split at the page's send of the value
            ts = [t for t in rec.get("value_sent", []) if m[1] - 0.005 <= t <= t_in + 0.05]
            if ts:
                legs.setdefault("page_send", []).append(ts[0] - m[1])
                rec["legs_s"][-1].append(round(ts[0] - m[1], 3))
    out = {"split_n": len(legs["page"])}
    for k, v in legs.items():
        if v:
            out[f"{k}_s_median"] = round(statistics.median(v), 3)
            out[f"{k}_s_max"] = round(max(v), 3)
    return out


def browser_exe(nice: int) -> str:
    """The chromium to launch; with ``nice > 0`` a wrapper that starts it (and so every page's
    renderer, which inherit it) at that niceness: the pages then stand in for remote clients,
    which in a deployment do not take the server's cores (``--page-nice``)."""
    if nice <= 0:
        return CHROMIUM
    import tempfile

    fd, path = tempfile.mkstemp(prefix="chromium-nice-", suffix=".sh")
    with os.fdopen(fd, "w") as fh:
        fh.write(f'#!/bin/sh\nexec nice -n {int(nice)} {CHROMIUM} "$@"\n')
    os.chmod(path, 0o755)
    return path


async def open_page(browser, url: str, timeout_ms: int = 120_000):
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await ctx.new_page()
    await page.goto(url, timeout=timeout_ms)
    await page.get_by_role("button", name="▶ Run").wait_for(timeout=timeout_ms)
    return ctx, page


# The text of an element and of every shadow root below it (Bokeh renders each pane in its own
# shadow root). The harness reads the two texts it waits for through handles on their panes'
# hosts with this: Playwright's text and CSS engines search the whole page (11 600 nodes, every
# shadow root) on each poll, which measured 2.1 s of the page's 5 s of CPU over one Run.
DEEP_TEXT = """(el) => { const out = []; const walk = (n) => { if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.childNodes) { if (c.nodeType === 3) out.push(c.data);
    else if (c.nodeName !== 'STYLE' && c.nodeName !== 'SCRIPT') walk(c); } };
  walk(el); return out.join(' '); }"""


async def pane_host(page, css: str):
    """Handle on the Bokeh view (shadow host) that renders the element ``css``: stays the
    same element when the pane's text changes."""
    loc = page.locator(css).first
    await loc.wait_for()
    return await loc.evaluate_handle("el => el.getRootNode().host || el.parentElement")


async def pane_text(host) -> str:
    return await host.evaluate(DEEP_TEXT)


async def wait_text(page, host, text: str, timeout_ms: int = 60_000) -> None:
    await page.wait_for_function(f"([el, t]) => ({DEEP_TEXT})(el).includes(t)", arg=[host, text],
                                 polling=50, timeout=timeout_ms)


async def widget_latency(page, delta: float, marks: list | None = None, d: int = 300) -> float:
    """Seconds from typing delta into its input to the page showing the new n = δd.
    ``marks`` gets the wall-clock times (time.time()) of the start, the end of the typing and
    of Enter, and the text seen (to set against the server's log)."""
    n = max(1, int(round(delta * d)))
    box = page.locator("input.bk-input").first
    host = await pane_host(page, ".sgf-derived")
    t0 = time.perf_counter()
    w = [time.time()]
    await box.fill(f"{delta:g}")
    w.append(time.time())
    await box.press("Enter")
    w.append(time.time())
    await wait_text(page, host, f"n = δd = {n:,} samples")
    w.append(time.time())
    if marks is not None:
        marks.append([round(x, 3) for x in w])
    return time.perf_counter() - t0


async def one_session(browser, base: str, i: int, start: asyncio.Event, ready: list,
                      out: list, run_timeout_s: float, config: str = "preset",
                      metrics: bool = False):
    rec = {"session": i, "latencies_s": [], "during_run": [], "queue_place_max": 0}
    ctx = None
    try:
        query, d = CONFIGS[config]
        ctx, page = await open_page(browser, base + "/" + query)
        status = await pane_host(page, ".sgf-status")
        cdp = m0 = None
        frames = [0, 0]  # websocket frames and bytes the page received during its Run
        if metrics:  # the page's main-thread time during its Run (CDP)
            cdp = await ctx.new_cdp_session(page)
            await cdp.send("Performance.enable")
            await cdp.send("Network.enable")

            def on_frame(ev, frames=frames):
                if m0 is not None:
                    frames[0] += 1
                    frames[1] += len(ev["response"].get("payloadData", ""))
            cdp.on("Network.webSocketFrameReceived", on_frame)

            def on_sent(ev, sent=rec.setdefault("value_sent", [])):
                # when the page's renderer handed a widget's new value to the network (the
                # event reaches this process a little later: an upper bound)
                if '"value"' in ev["response"].get("payloadData", ""):
                    sent.append(round(time.time(), 3))
            cdp.on("Network.webSocketFrameSent", on_sent)
        ready.append(i)
        await start.wait()
        if cdp is not None:
            m0 = await page_metrics(cdp)
        t0 = time.perf_counter()
        await page.get_by_role("button", name="▶ Run").click()
        # a δ of its own for every edit of every session (never the preset's 2.0), so that
        # the server's log of each update (its "n = δd") tells which edit it answered
        for k, delta in enumerate((round(2.1 + 0.2 * i, 1), round(2.2 + 0.2 * i, 1))):
            await asyncio.sleep(0.5 + 0.3 * (i % 4))
            done = "Done in" in await pane_text(status)
            rec["latencies_s"].append(await widget_latency(page, delta,
                                                           rec.setdefault("marks", []), d))
            rec.setdefault("n", []).append(max(1, int(round(delta * d))))
            rec["during_run"].append(not done)
        deadline = time.monotonic() + run_timeout_s
        while time.monotonic() < deadline:
            text = await pane_text(status)
            m = re.search(r"place in the server's queue: (\d+)", text)
            if m:
                rec["queue_place_max"] = max(rec["queue_place_max"], int(m.group(1)))
            if "Done in" in text or "Stopped" in text:
                rec["done"] = "Done in" in text
                rec["status"] = text.strip().splitlines()[0]
                break
            await asyncio.sleep(0.25)
        else:
            rec["done"] = False
        rec["run_s"] = time.perf_counter() - t0
        if m0 is not None:
            m1 = await page_metrics(cdp)
            rec["page_metrics"] = {k: round(m1[k] - m0[k], 3) for k in m0 if k in m1}
            rec["page_metrics"].update(ws_frames=frames[0], ws_kib=round(frames[1] / 1024, 1))
    except Exception as e:  # noqa: BLE001 - recorded, counted as not completed
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        out.append(rec)
        if ctx is not None:
            await ctx.close()


async def main_async(args) -> dict:
    from playwright.async_api import async_playwright

    res: dict = {"sessions": args.sessions, "cycles": args.cycles, "config": args.config,
                 "command": None, "cores": os.cpu_count(), "page_nice": args.page_nice,
                 "app_env": {k: v for k, v in os.environ.items() if k.startswith("SGF_DMFT_")}}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    import tempfile

    lat_log = tempfile.NamedTemporaryFile(prefix="sgf-latency-", suffix=".jsonl",
                                          delete=False).name
    res["server_env"] = {} if args.no_image_env else image_env()
    proc = start_server(port, lat_log, trace=args.trace, env_extra=res["server_env"])
    windows: dict = {}
    res["command"] = " ".join(dockerfile_cmd())
    t_all = time.monotonic()
    try:
        wait_http(base + "/liveness", proc)
        pid = proc.pid  # sgf-dmft serve execs panel serve: same process
        res["server_start"] = proc_status(pid)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=browser_exe(args.page_nice),
                                               headless=True, args=CHROMIUM_ARGS)
            # 1. baseline after one session (imports, warm-up and first page build done)
            ctx, page = await open_page(browser, base + "/")
            await ctx.close()
            base_st, _ = await settle(pid, None, min_wait=0.0 if args.no_settle else 45.0)
            res["baseline"] = base_st
            # 2. K concurrent sessions running
            recs: list = []
            start = asyncio.Event()
            with Sampler(pid) as smp:
                ready: list = []
                tasks = [asyncio.create_task(one_session(browser, base, i, start, ready, recs,
                                                         args.timeout / 2, args.config,
                                                         args.page_metrics))
                         for i in range(args.sessions)]
                # every page loaded (or failed) before the runs start together
                t_load = time.monotonic()
                while (len(ready) < args.sessions and not all(t.done() for t in tasks)
                       and time.monotonic() - t_load < 120 + 10 * args.sessions):
                    await asyncio.sleep(0.2)
                res["load_s"] = round(time.monotonic() - t_load, 1)
                windows["load"] = (time.time() - (time.monotonic() - t_load), time.time())
                res["loaded"] = proc_status(pid)
                rend0 = {r["pid"]: r for r in renderer_processes()}
                kinds0 = browser_kinds()
                smp.reset_cpu()
                start.set()
                t_runs = time.time()
                await asyncio.gather(*tasks, return_exceptions=True)
                windows["runs"] = (t_runs, time.time())
                smp._cpu()
                # how many renderer processes (main threads) the pages had, and the CPU each
                # used during the runs: one per page, or pages sharing one main thread?
                # (each renderer's last CPU reading while it lived: the Sampler's, every 0.2 s;
                # the pages close their contexts as they finish)
                res["renderers"] = {
                    "pages": args.sessions, "processes": len(rend0),
                    "webui_processes": sum(r["webui"] for r in rend0.values()),
                    "extension_processes": sum(r["extension"] for r in rend0.values()),
                    "nice": sorted({r["nice"] for r in rend0.values()}),
                    "cpu_s_during_runs": sorted(
                        (round(smp._cpu1.get(p, 0.0) - smp._cpu0.get(p, 0.0), 2)
                         for p in rend0), reverse=True)}
                used = {p: smp._cpu1.get(p, 0.0) - smp._cpu0.get(p, 0.0) for p in smp._cpu1}
                res["browser_cpu_s_by_kind"] = {
                    (kind if kind != "renderer" else "renderer (pages)"): round(
                        sum(used.get(p, 0.0) for p in pids
                            if kind != "renderer" or not rend0.get(p, {}).get("webui")), 1)
                    for kind, pids in kinds0.items() if pids}
                res["browser_cpu_s_by_kind"]["renderer (webui)"] = round(
                    sum(used.get(p, 0.0) for p, r in rend0.items() if r["webui"]), 1)
                # chromium sets its processes' priorities itself (browser and GPU process
                # raised, page renderers reset to 0), whatever --page-nice started it at
                res["browser_nice"] = {
                    kind: sorted({os.getpriority(os.PRIO_PROCESS, p) for p in pids})
                    for kind, pids in browser_kinds().items()}
                # where the machine's cores went during the runs
                res["runs_cpu_s"] = dict(smp.cpu_s(), wall=round(time.time() - t_runs, 1))
            res["peak"] = {"rss_mib": smp.peak_rss, "threads": smp.peak_threads}
            # Panel's --num-threads executor may keep its (at most 2) threads once started
            if not args.no_settle:
                after, waited = await settle(pid, base_st["threads"] + 2, timeout=90.0)
                res["after_sessions"] = dict(after, settle_s=round(waited, 1))
            lat = [x for r in recs for x, d in zip(r["latencies_s"], r["during_run"]) if d]
            # split: typing (Playwright's fill, which waits for the busy page) and the response
            # from the end of the typing (the value is committed) to the text seen
            marks = [m for r in recs for m, d in zip(r.get("marks", []), r["during_run"]) if d]
            typing = [m[1] - m[0] for m in marks]
            resp = [m[3] - m[1] for m in marks]
            res["runs"] = {
                "completed": sum(bool(r.get("done")) for r in recs),
                "run_s_median": statistics.median(r["run_s"] for r in recs if "run_s" in r),
                "run_s_max": max(r["run_s"] for r in recs if "run_s" in r),
                "queue_place_max": max(r["queue_place_max"] for r in recs),
                "latency_during_runs_n": len(lat),
                "latency_s_median": statistics.median(lat) if lat else None,
                "latency_s_max": max(lat) if lat else None,
                "typing_s_median": statistics.median(typing) if typing else None,
                "response_s_median": statistics.median(resp) if resp else None,
                "response_s_max": max(resp) if resp else None,
            }
            res["runs"].update(split_latencies(lat_log, recs))
            res["per_session"] = sorted(recs, key=lambda r: r["session"])
            pm = [r["page_metrics"] for r in recs if "page_metrics" in r]
            if pm:  # --page-metrics: each page's main-thread seconds over its Run
                res["page_metrics_median"] = {k: round(statistics.median(m[k] for m in pm), 3)
                                              for k in pm[0]}
            # 3. open/close cycles, --batch (5) at a time
            t0 = time.monotonic()
            done_cycles = 0
            while done_cycles < args.cycles and time.monotonic() - t_all < args.timeout:
                n = min(args.batch, args.cycles - done_cycles)
                pages = await asyncio.gather(*[open_page(browser, base + "/")
                                               for _ in range(n)])
                for ctx, _ in pages:
                    await ctx.close()
                done_cycles += n
            res["cycles_done"] = done_cycles
            res["cycles_s"] = round(time.monotonic() - t0, 1)
            if not args.no_settle:
                after, waited = await settle(pid, base_st["threads"] + 2, timeout=90.0)
                res["after_cycles"] = dict(after, settle_s=round(waited, 1))
            await browser.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    res["server_latency"] = latency_summary(lat_log, windows)
    if args.trace:  # the rows stay for a closer look
        res["latency_log"] = lat_log
        res["windows"] = windows
    else:
        try:
            os.unlink(lat_log)
        except OSError:
            pass
    res["total_s"] = round(time.monotonic() - t_all, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=900.0, help="overall bound, seconds")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--batch", type=int, default=5,
                    help="pages opened at once in the open/close cycles (1 with "
                         "PYTHONTRACEMALLOC, whose slow page builds time out in batches)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="preset",
                    help="what each session runs: the default preset (as the page opens) or "
                         "the small configuration of the figures before session 5")
    ap.add_argument("--no-image-env", action="store_true",
                    help="start the server without the Docker image's allocator settings "
                         "(LD_PRELOAD, PYTHONMALLOC, MALLOC_CONF from the Dockerfile's ENV)")
    ap.add_argument("--page-nice", type=int, default=0,
                    help="start the browser (all pages) at this niceness, so that the pages, "
                         "which stand in for remote clients, yield the cores to the server "
                         "(0: same priority as the server, as before)")
    ap.add_argument("--no-settle", action="store_true",
                    help="diagnosis runs (A/B of the runs' figures): no 45 s waits for Bokeh "
                         "to destroy closed sessions, so no memory or thread figures")
    ap.add_argument("--page-metrics", action="store_true",
                    help="record each page's main-thread time over its Run (CDP "
                         "Performance.getMetrics: TaskDuration, ScriptDuration, "
                         "LayoutDuration, ...; page_metrics per session and their median)")
    ap.add_argument("--trace", action="store_true",
                    help="also time the stages of each widget change and Panel's thread-pool "
                         "tasks (SGF_DMFT_LATENCY_TRACE, app/setup.py)")
    args = ap.parse_args(argv)
    args.sessions = max(1, min(MAX_SESSIONS, args.sessions))
    args.cycles = max(0, min(MAX_CYCLES, args.cycles))
    args.batch = max(1, min(10, args.batch))
    res = asyncio.run(asyncio.wait_for(main_async(args), args.timeout + 120))
    text = json.dumps(res, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    r = res.get("runs", {})
    return 0 if r.get("completed") == args.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
