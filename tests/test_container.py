"""Dockerfile.ws for real: podman builds it on a Debian bookworm base made
here with debootstrap (no registry needed), runs it against a redis-server
on a free port, and a WebSocket client gets a trade through it; the image's
healthcheck says healthy; `podman stop` (SIGTERM to the gateway as PID 1)
closes the client with 1001 and the container exits 0.

Needs root, podman, runc and debootstrap (scripts/test.sh installs them with
apt-get) and network access to the Debian mirror and PyPI. The base image is
cached as localhost/ws-gateway-test-base:bookworm-<date>; a new day makes a
new one and removes the older. The test removes every container and other
image it made. WS_GATEWAY_CONTAINER_TESTS=0 skips it.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT

from gateway._testbase.net import free_port, try_http_get

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE_REPO = "localhost/ws-gateway-test-base"
# Debian bookworm's python3 is 3.11, as on the official python:3.11-slim-bookworm.
BASE_PACKAGES = "python3,python3-venv,ca-certificates"


def _missing() -> str | None:
    if os.environ.get("WS_GATEWAY_CONTAINER_TESTS") == "0":
        return "WS_GATEWAY_CONTAINER_TESTS=0"
    if os.geteuid() != 0:
        return "needs root (debootstrap, and podman with --network host as here)"
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc debootstrap)"
    return None


if _missing():
    pytestmark.append(pytest.mark.skip(reason=_missing()))


def podman_opts() -> list[str]:
    """What podman needs on a machine like the CI's: runc (crun refuses a
    hybrid cgroup layout), limits within what the sandbox may set, and the
    host's network (no bridge, and the test's Redis is on loopback)."""
    opts = ["--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
    if shutil.which("runc"):
        opts[:0] = ["--runtime", "runc"]
    return opts


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (WS_GATEWAY_DEBIAN_MIRROR wins)."""
    if os.environ.get("WS_GATEWAY_DEBIAN_MIRROR"):
        return os.environ["WS_GATEWAY_DEBIAN_MIRROR"]
    for path in [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            m = (re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M)
                 or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+\S", text, re.M))
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def image_ids() -> set[str]:
    return set(podman("images", "-a", "-q", "--no-trunc").stdout.split())


def base_image() -> str:
    """Today's Debian bookworm base (made once a day): minbase with python3,
    venv and CA certificates. The host's CA bundle replaces the base's, so a
    build behind a TLS-inspecting proxy reaches PyPI as the host does."""
    tag = f"{BASE_REPO}:bookworm-{datetime.date.today():%Y%m%d}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory(prefix="ws-gateway-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                               "bookworm", str(rootfs), debian_mirror()],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / leftover).glob("*"):
                if p.is_file():
                    p.unlink()
        host_cas = Path("/etc/ssl/certs/ca-certificates.crt")
        if host_cas.exists():
            shutil.copyfile(host_cas, rootfs / "etc/ssl/certs/ca-certificates.crt")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                              "-", tag], stdin=tar.stdout, capture_output=True, text=True, timeout=300)
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and imp.returncode == 0, imp.stderr
    # Earlier days' bases are stale: keep one.
    for line in podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPO).stdout.split():
        if line != tag:
            podman("rmi", line, check=False)
    return tag


@pytest.fixture(scope="module")
def image():
    """Dockerfile.ws built as `docker build -f Dockerfile.ws .` would, on the
    local base; yields (tag, build seconds). Removes the image and the build
    stage's images afterwards."""
    base = base_image()
    before = image_ids()
    tag = f"localhost/ws-gateway-test:{uuid.uuid4().hex[:10]}"
    start = time.monotonic()
    # docker format: the OCI format has no HEALTHCHECK (podman drops it).
    podman("build", "--format", "docker", *podman_opts(), "-f", "Dockerfile.ws",
           "--build-arg", f"BASE={base}", "-t", tag, str(ROOT), timeout=900)
    took = time.monotonic() - start
    print(f"\nimage {tag} built in {took:.0f} s on {base}")
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)
        for made in image_ids() - before:
            podman("rmi", "-f", made, check=False)


def run_in_image(image: str, *argv: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    ep = ["--entrypoint", entrypoint] if entrypoint else []
    return podman("run", "--rm", *podman_opts(), *ep, image, *argv, check=False, timeout=60)


def test_image_runs_unprivileged_without_compiler_and_carries_every_command(image):
    got = run_in_image(image, "-c", "id -u; command -v gcc cc cython || true; "
                                    "python3 -c 'import gateway.fastpath as f; print(f.IS_COMPILED)'",
                       entrypoint="/bin/sh")
    assert got.returncode == 0, got.stderr
    uid, *rest = got.stdout.split()
    assert uid != "0"
    assert rest == ["True"]          # no compiler on the PATH, and the compiled fast path
    for command in ("ws-gateway", "ws-gateway-candles", "ws-gateway-feed", "ws-gateway-tail"):
        got = run_in_image(image, "--help", entrypoint=command)
        assert got.returncode == 0 and "usage:" in got.stdout, (command, got.stderr)


def test_container_serves_is_healthy_and_stops_on_sigterm(image, redis_server):
    port = free_port()
    name = f"ws-gateway-test-{uuid.uuid4().hex[:10]}"
    podman("run", "-d", "--name", name, *podman_opts(),
           "-e", f"REDIS_URL={redis_server.url}", "-e", f"WS_PORT={port}", image)
    try:
        deadline = time.monotonic() + 30
        while (got := try_http_get(port, "/readyz", timeout=1.0)) is None or got[0] != 200:
            state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
            assert state == "running" and time.monotonic() < deadline, \
                podman("logs", name, check=False).stderr[-3000:]
            time.sleep(0.2)

        # The image's HEALTHCHECK (podman runs it on demand: no systemd timers here).
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        assert podman("inspect", name, "--format", "{{.State.Health.Status}}").stdout.strip() == "healthy"

        import websockets

        async def client() -> tuple[int | None, str]:
            ws = await websockets.connect(f"ws://127.0.0.1:{port}")
            await ws.recv()                                     # welcome
            await ws.send('{"action":"subscribe","symbols":["CTR"]}')
            await ws.recv()                                     # subscribed
            r = redis_server.client()
            deadline = time.monotonic() + 10
            while r.publish("channel:trade:CTR", b'{"price":1.5}') == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            trade = await asyncio.wait_for(ws.recv(), 5)
            # SIGTERM through podman: the gateway, PID 1, closes us with 1001.
            stop = asyncio.get_running_loop().run_in_executor(
                None, lambda: podman("stop", "--time", "10", name, timeout=30))
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            await stop
            return ws.close_code, str(trade)

        close_code, trade = asyncio.run(client())
        assert '"type":"trade"' in trade and '"data":{"price":1.5}' in trade
        assert close_code == 1001
        state = podman("inspect", name, "--format", "{{.State.Status}} {{.State.ExitCode}}").stdout.split()
        assert state == ["exited", "0"]
        logs = podman("logs", name).stderr
        assert "received SIGTERM" in logs and "Traceback" not in logs
    finally:
        podman("rm", "-f", name, check=False)
