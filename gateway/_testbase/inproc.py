"""The gateway inside the test's own event loop, and waiting on its state."""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from .net import HOST


@contextlib.asynccontextmanager
async def running_gateway(impl, redis_url: str, **config_overrides):
    """An in-process Gateway on a free loopback port, stopped on exit.

    ``impl`` is the fast-path module (compiled or its pure-Python twin);
    ``config_overrides`` are Config fields. Must run inside a running loop.
    """
    from gateway.config import Config
    from gateway.server import Gateway
    settings: dict[str, Any] = dict(host=HOST, port=0, redis_url=redis_url, stats_interval=3600.0)
    settings.update(config_overrides)
    gw = Gateway(Config(**settings), impl=impl)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate()`` until true; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
