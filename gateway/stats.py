"""The periodic statistics log line, read from gateway.counters."""
from __future__ import annotations

import asyncio
import logging

from .counters import Counters

log = logging.getLogger("gateway.stats")


class Stats:
    def __init__(self, counters: Counters, server_id: str):
        self.counters = counters
        self.server_id = server_id

    def snapshot(self) -> dict:
        return {"server_id": self.server_id, **self.counters.snapshot()}

    def log_now(self) -> None:
        s = self.snapshot()
        log.info(
            "stats: connections=%d subscriptions=%d symbols=%d redis_messages=%d frames_sent=%d "
            "client_messages=%d client_errors=%d dropped_payloads=%d unrouted=%d redis_ready=%s "
            "redis_reconnects=%d heartbeat_timeouts=%d slow_consumers=%d",
            s["connections"], s["subscriptions"], s["symbols"], s["redis_messages"],
            s["frames_sent"], s["client_messages"], s["errors"], s["dropped_payloads"],
            s["unrouted_messages"], s["redis_ready"], s["redis_reconnects"],
            s["heartbeat_timeouts"], s["slow_consumers"])

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.log_now()
