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
# aborts when two sessions run parallel kernels at once).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
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

USER 10001
EXPOSE 5006
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5006/liveness', timeout=4)"]
# CI runs exactly this command (tests/test_deploy.py reads it from here).
CMD ["sgf-dmft", "serve", "--address", "0.0.0.0", "--port", "5006", "--num-threads", "2", "--liveness"]
