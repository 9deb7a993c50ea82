"""Shared fixtures: a real redis-server on a free port, both fast-path
implementations, both event loops, and an in-process gateway.

No Redis is mocked: every server these tests talk to was started here, on a
free loopback port (never 6379), and is stopped by them.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import _fastpath_py
from gateway.config import Config

try:
    from gateway import _fastpath as _fastpath_c
except ImportError:  # test_fastpath.py::test_compiled_module_loaded reports it
    _fastpath_c = None

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

IMPLS = [pytest.param(_fastpath_c, id="compiled",
                      marks=pytest.mark.skipif(_fastpath_c is None, reason="extension not built")),
         pytest.param(_fastpath_py, id="purepy")]


@pytest.fixture(params=IMPLS)
def impl(request):
    """The compiled fast path and its pure-Python twin, in turn."""
    return request.param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process this test session owns."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        assert self.port != 6379
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        if not os.path.exists(REDIS_SERVER):
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port)


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the session (tests must not restart it)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def own_redis():
    """A redis-server for one test, free to kill and restart."""
    server = RedisServer()
    yield server
    server.stop()


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request):
    return request.param


@pytest.fixture
def aio(loop_kind):
    """Run a coroutine to completion on uvloop, then (second param) the stdlib loop."""
    def run(coro, timeout: float = 60):
        loop = _new_loop(loop_kind)
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    return run


@contextlib.asynccontextmanager
async def running_gateway(impl, redis_url: str, **overrides):
    """An in-process Gateway on a free loopback port, stopped on exit."""
    from gateway.server import Gateway
    settings = dict(host="127.0.0.1", port=0, redis_url=redis_url, stats_interval=3600.0)
    settings.update(overrides)
    gw = Gateway(Config(**settings), impl=impl)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


def gateway_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("GATEWAY_NO_EXTENSIONS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn_gateway(env: dict) -> subprocess.Popen:
    """``python -m gateway`` as a separate process (signals, CLI, multi-instance)."""
    return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
