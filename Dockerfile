# sgf-dmft dashboard for a lab server.  Build: docker build -t sgf-dmft .
# Run:   docker run -p 5006:5006 -e BOKEH_ALLOW_WS_ORIGIN=myhost:5006 sgf-dmft
# See docs/deploy.md (authentication, reverse proxy, upgrades).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/sgf-dmft/numba \
    BOKEH_ALLOW_WS_ORIGIN=localhost:5006

# libgomp1: numba's OpenMP threading layer (without it numba falls back to 'workqueue', which
# aborts when two sessions run parallel kernels at once). libjemalloc2: the server's memory
# allocator (ENV below).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 sgf
WORKDIR /opt/sgf-dmft

# Dependencies first (cached layer), pinned by the constraints file that CI and the README use.
COPY constraints.txt pyproject.toml README.md ./
COPY solver ./solver
COPY app ./app
COPY assets ./assets
RUN pip install -c constraints.txt -e . \
 && mkdir -p "$NUMBA_CACHE_DIR" \
 && python -m solver.warmup \
 && chown -R sgf:sgf "$NUMBA_CACHE_DIR"

# Memory (docs/deploy.md, "Session 5: memory"): every Python object from jemalloc, which gives
# closed sessions' memory back to the system. Load test, 3 sessions then 20 open/close cycles:
# RSS +165 then +282 MiB over the baseline with Python's allocator, +7 then +18 MiB with
# jemalloc; CPU per page build about +5% (glibc malloc instead: +15%). Turn it off with
# docker run -e LD_PRELOAD= -e PYTHONMALLOC=pymalloc ...
ENV PYTHONMALLOC=malloc \
    LD_PRELOAD=libjemalloc.so.2 \
    MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0

USER 10001
EXPOSE 5006
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5006/liveness', timeout=4)"]
# CI runs exactly this command (tests/test_deploy.py reads it from here).
CMD ["sgf-dmft", "serve", "--address", "0.0.0.0", "--port", "5006", "--num-threads", "2", "--liveness"]
