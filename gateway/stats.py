"""Counters and the periodic statistics log line.

The hot-path counters live in the Dispatcher (C integers in the compiled
module); this module only reads them, so logging costs the fan-out nothing.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("gateway.stats")


class Stats:
    def __init__(self, gateway):
        self.gateway = gateway

    def snapshot(self) -> dict:
        g = self.gateway
        d = g.dispatcher
        return {
            "server_id": g.server_id,
            "connections": len(g.connections),
            "connections_total": g.connections_total,
            "subscriptions": g.table.subscription_count,
            "symbols": g.table.symbol_count,
            "redis_ready": g.redis.ready,
            "redis_reconnects": g.redis.reconnects,
            "redis_messages": d.redis_messages,
            "frames_sent": d.frames_sent,
            "bytes_sent": d.bytes_sent,
            "writes": d.writes,
            "dropped_payloads": d.dropped_payloads,
            "unrouted_messages": d.unrouted_messages,
            "dispatch_errors": d.dispatch_errors,
            "client_messages": g.client_messages,
            "errors": sum(g.error_counts().values()),
            "errors_by_kind": g.error_counts(),
            "heartbeat_timeouts": g.heartbeat_timeouts,
            "slow_consumers": sum(g.slow_consumers.values()),
        }

    def log_now(self) -> None:
        s = self.snapshot()
        log.info(
            "stats: connections=%d subscriptions=%d symbols=%d redis_messages=%d frames_sent=%d "
            "client_messages=%d errors=%d dropped_payloads=%d unrouted=%d redis_ready=%s "
            "redis_reconnects=%d heartbeat_timeouts=%d slow_consumers=%d",
            s["connections"], s["subscriptions"], s["symbols"], s["redis_messages"],
            s["frames_sent"], s["client_messages"], s["errors"], s["dropped_payloads"],
            s["unrouted_messages"], s["redis_ready"], s["redis_reconnects"],
            s["heartbeat_timeouts"], s["slow_consumers"])

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.log_now()
