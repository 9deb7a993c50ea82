# ws-gateway: the gateway, the candle service and the demo feed in one image.
#
#   docker build -f Dockerfile.ws -t ws-gateway .
#   docker run --rm -p 8080:8080 -e REDIS_URL=redis://redis.internal:6379 ws-gateway
#   docker run --rm --entrypoint ws-gateway-candles -e WS_PORT=8081 ws-gateway
#
# BASE must be a Debian (bookworm) image with Python 3.11 and its venv module:
# the official python:3.11-slim-bookworm, or a local Debian image with
# python3 and python3-venv (the container test builds on one).
ARG BASE=python:3.11-slim-bookworm

# --- build: the binary wheel (Cython fast path compiled here, and only here) ---
FROM ${BASE} AS build
# A C compiler, and the Python headers where the base lacks them (the
# official image ships its own in /usr/local/include; a plain Debian one does not).
RUN set -eux; \
    set -- gcc libc6-dev; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || set -- "$@" python3-dev; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; \
    rm -rf /var/lib/apt/lists/*
# pip's isolated build installs the build requirements pinned in
# pyproject.toml (Cython, and the exact picows the fast path binds to).
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY gateway/ gateway/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps -w /dist . \
    && ls -l /dist

# --- runtime: the wheel and its dependencies in a virtual environment; no compiler ---
FROM ${BASE} AS runtime
# The wheel's dependencies (picows, hiredis, orjson, uvloop, cryptography...)
# come from PyPI as binary wheels: nothing is compiled here.
COPY --from=build /dist/ /tmp/dist/
RUN python3 -m venv /opt/ws-gateway \
    && /opt/ws-gateway/bin/pip install --no-cache-dir /tmp/dist/ws_gateway-*.whl \
    && rm -rf /tmp/dist \
    && groupadd --system --gid 10001 ws-gateway \
    && useradd --system --uid 10001 --gid ws-gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ws-gateway

ENV PATH=/opt/ws-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WS_HOST=0.0.0.0 \
    WS_PORT=8080 \
    REDIS_URL=redis://redis:6379

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# Ready = listening and the Redis subscription live (503 otherwise, which
# urlopen raises on). It asks the port in WS_PORT, so the same check serves
# the candle service run from this image with its own WS_PORT. Plain HTTP:
# with WS_TLS_CERT set, give the container a healthcheck of its own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('WS_PORT', '8080') + '/readyz', timeout=2)"]

# The gateway is PID 1 and handles SIGTERM itself: it closes every client with
# 1001 within about 2 s and exits 0. Exec form, so no shell stands in between.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ws-gateway"]
