"""Shared fixtures: a real redis-server on a free port, both fast-path
implementations, both event loops, and an in-process gateway.

No Redis is mocked: every server these tests talk to was started here, on a
free loopback port (never 6379), and is stopped by them. The harness code
itself lives in ``gateway._testbase``.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from gateway import _fastpath_py
from gateway._testbase import redis as _redis
from gateway._testbase.inproc import running_gateway, wait_until  # noqa: F401  (for the tests)
from gateway._testbase.loops import LOOP_KINDS, CheckedLoops
from gateway._testbase.process import ONE_ADDRESS_ENV, GatewayProcess, gateway_env  # noqa: F401

try:
    from gateway import _fastpath as _fastpath_c
except ImportError:  # test_fastpath.py::test_compiled_module_loaded reports it
    _fastpath_c = None

ROOT = Path(__file__).resolve().parent.parent

IMPLS = [pytest.param(_fastpath_c, id="compiled",
                      marks=pytest.mark.skipif(_fastpath_c is None, reason="extension not built")),
         pytest.param(_fastpath_py, id="purepy")]

needs_redis_server = pytest.mark.skipif(not _redis.redis_installed(),
                                        reason="redis-server is not installed")


@pytest.fixture(params=IMPLS)
def impl(request):
    """The compiled fast path and its pure-Python twin, in turn."""
    return request.param


class RedisServer(_redis.RedisServer):
    """gateway._testbase's RedisServer; a test skips where there is none."""

    def start(self, timeout: float = 10) -> RedisServer:
        try:
            return super().start(timeout)
        except _redis.RedisNotInstalled:
            pytest.skip("redis-server is not installed")


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


@pytest.fixture
def gateway_process(redis_server):
    """Starts ``python -m gateway`` processes against the session Redis:
    ``gateway_process(**settings)`` gives a started GatewayProcess (not yet
    waited on); each is killed and its log removed after the test."""
    procs = []

    def start(**settings):
        gw = GatewayProcess(redis_server.url, cwd=ROOT, **settings).start()
        procs.append(gw)
        return gw
    yield start
    for gw in procs:
        gw.close()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:g} s")
        time.sleep(interval)


def fresh_symbols(n: int) -> list[str]:
    """Symbols no earlier test published to (the session Redis keeps histories)."""
    return [f"P{k}{uuid.uuid4().hex[:10]}".upper() for k in range(n)]


@pytest.fixture
def gateways():
    """``start(redis_url, **settings)``: a started and ready GatewayProcess;
    every one is killed (and its log removed) after the test."""
    procs: list[GatewayProcess] = []

    def start(redis_url: str, **settings) -> GatewayProcess:
        gw = GatewayProcess(redis_url, cwd=ROOT, die_with_parent=True,
                            **{**ONE_ADDRESS_ENV, **settings}).start()
        procs.append(gw)
        gw.wait_ready(timeout=20)
        return gw
    yield start
    for gw in procs:
        gw.close()


def pytest_configure(config):
    # The quick run (pyproject's default -m 'not slow') also trims the
    # property tests to a quarter of their examples; the full run (test.sh,
    # CI) does them all. The examples are derandomized, so the quick run's
    # are the first of the full run's.
    if config.getoption("markexpr") == "not slow":
        os.environ.setdefault("GATEWAY_QUICK_TESTS", "1")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """Keep the quick run quick without losing a combination's coverage.

    A test that runs on both loops and both fast paths keeps two of its four
    variants in the quick run, uvloop + compiled and asyncio + pure Python,
    so each loop and each implementation is still exercised; a ``heavy``
    test keeps only uvloop + compiled (the twin when the extension is
    missing). The other variants are ``slow``: the full run has them all."""
    primary_impl = _fastpath_c if _fastpath_c is not None else _fastpath_py
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        if "loop_kind" not in params or "impl" not in params:
            if item.get_closest_marker("heavy") is None:
                continue
        primary = (params.get("loop_kind", "uvloop") == "uvloop"
                   and params.get("impl", primary_impl) is primary_impl)
        diagonal = params.get("loop_kind") == "asyncio" and params.get("impl") is _fastpath_py
        if not primary and (item.get_closest_marker("heavy") is not None or not diagonal):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request):
    return request.param


@pytest.fixture
def aio(request, loop_kind):
    """Run a coroutine to completion on uvloop, then (second param) the stdlib
    loop. An exception a callback raised and nobody handled fails the test."""
    loops = CheckedLoops(loop_kind)
    request.node._checked_loops = loops
    return loops.run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    loops = getattr(item, "_checked_loops", None)
    if loops is not None:
        loops.check()  # the test passed until here: the loop's reports fail it
    return result
