"""Every count the gateway keeps, in one object for the stats line and /metrics.

Control-plane counts are plain integers that sessions and the gateway bump.
The fan-out's counts are C integers in the FanOut, read through it only
when a stats line or a scrape asks, so counting costs the hot path nothing.
Gauges (connections, subscriptions, Redis state) are read live the same way.
"""
from __future__ import annotations

from typing import Any


class Counters:
    __slots__ = ("fanout", "table", "sessions", "refusals", "redis", "replayer", "connections_total",
                 "client_messages", "heartbeat_timeouts", "rate_limit_closes", "slow_consumers",
                 "errors")

    def __init__(self, fanout, table, sessions: set, refusals: dict[str, int]):
        self.fanout = fanout
        self.table = table
        self.sessions = sessions            # the live sessions (gateway.session.Hub.sessions)
        self.refusals = refusals            # upgrades refused, by reason (gateway.access)
        self.redis: Any = None              # the Redis subscriber: .ready, .reconnects
        self.replayer: Any = None           # gateway.replay.Replayer: replays, fills
        self.connections_total = 0
        self.client_messages = 0
        self.heartbeat_timeouts = 0
        self.rate_limit_closes = 0
        self.slow_consumers: dict[str, int] = {}
        self.errors: dict[str, int] = {}    # client errors by kind (shared with ControlHandler)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_slow(self, action: str) -> None:
        self.slow_consumers[action] = self.slow_consumers.get(action, 0) + 1

    def error_counts(self) -> dict[str, int]:
        """Client errors by kind, plus fan-out failures as "dispatch"."""
        counts = dict(self.errors)
        if self.fanout.dispatch_errors:
            counts["dispatch"] = self.fanout.dispatch_errors
        return counts

    @property
    def redis_ready(self) -> bool:
        return bool(self.redis is not None and self.redis.ready)

    @property
    def redis_reconnects(self) -> int:
        return self.redis.reconnects if self.redis is not None else 0

    def snapshot(self) -> dict[str, Any]:
        f = self.fanout
        errors = self.error_counts()
        return {
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "subscriptions": self.table.subscription_count,
            "symbols": self.table.symbol_count,
            "redis_ready": self.redis_ready,
            "redis_reconnects": self.redis_reconnects,
            "redis_messages": f.redis_messages,
            "frames_sent": f.frames_sent,
            "bytes_sent": f.bytes_sent,
            "writes": f.writes,
            "dropped_payloads": f.dropped_payloads,
            "unrouted_messages": f.unrouted_messages,
            "dispatch_errors": f.dispatch_errors,
            "client_messages": self.client_messages,
            "errors": sum(errors.values()),
            "errors_by_kind": errors,
            "heartbeat_timeouts": self.heartbeat_timeouts,
            "slow_consumers": sum(self.slow_consumers.values()),
        }
