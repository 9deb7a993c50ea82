"""Prometheus metrics, read at scrape time.

The hot path only bumps C counters in the FanOut; this collector reads them
(through gateway.counters) when /metrics is fetched, so serving metrics costs
the fan-out nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .counters import Counters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every reason gateway.access refuses an upgrade for, and every kind of error
# counted in gateway_errors_total: their series exist at 0 from the start, so
# rate() and increase() see the first event (a series that appears at 1 hides
# it) and alerts match before anything went wrong. tests/test_operations.py
# holds both lists to the sources.
REFUSAL_REASONS = ("origin", "ip_limit", "connect_rate", "user_limit", "auth_missing", "auth_expired",
                   "auth_not_yet_valid", "auth_bad_signature", "auth_bad_algorithm", "auth_bad_claims",
                   "auth_malformed", "auth_invalid")
ERROR_KINDS = (
    # clients' bad messages (gateway.protocol.ClientError kinds) and frames
    "binary_frame", "invalid_json", "not_object", "missing_action", "unknown_action", "invalid_since",
    "invalid_snapshot", "invalid_symbols", "symbol_limit", "too_big", "bad_compression", "rate_limited",
    # the fan-out failing to deliver: the gateway's fault, not a client's
    "dispatch")


class GatewayCollector:
    def __init__(self, counters: Counters):
        self.counters = counters

    def collect(self):
        c = self.counters
        d = c.fanout

        def gauge(name, doc, value):
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("gateway_connections", "Open WebSocket connections", len(c.sessions))
        yield gauge("gateway_subscriptions", "Symbol subscriptions over all connections",
                    c.table.subscription_count)
        yield gauge("gateway_symbols", "Distinct symbols with at least one subscriber",
                    c.table.symbol_count)
        yield gauge("gateway_redis_ready", "1 while the Redis subscription is live", int(c.redis_ready))
        yield counter("gateway_connections_accepted", "Connections accepted", c.connections_total)
        yield counter("gateway_redis_messages", "Messages received from Redis", d.redis_messages)
        yield counter("gateway_frames_sent", "Trade frames delivered to clients", d.frames_sent)
        yield counter("gateway_bytes_sent", "Trade frame bytes delivered to clients (before compression)",
                      d.bytes_sent)
        yield counter("gateway_compressed_messages", "Trades compressed (once each) for deflate clients",
                      d.compressed_messages)
        yield counter("gateway_writes", "Batched socket writes to clients", d.writes)
        yield counter("gateway_client_messages", "Messages received from clients", c.client_messages)
        yield counter("gateway_dropped_payloads", "Redis payloads dropped (not a JSON object)",
                      d.dropped_payloads)
        yield counter("gateway_unrouted_messages", "Redis messages for symbols nobody holds",
                      d.unrouted_messages)
        yield counter("gateway_conflated_messages",
                      "Trade deliveries held back (conflating slow consumers, clients being resumed)",
                      d.conflated_messages)
        yield counter("gateway_sequenced_messages", "Sequenced trades received from Redis",
                      d.sequenced_messages)
        yield counter("gateway_duplicate_messages",
                      "Sequenced trades dropped as already routed (history fill overlapping live)",
                      d.duplicate_messages)
        yield counter("gateway_candle_messages", "Candle messages received for streams with subscribers",
                      d.candle_messages)
        r = c.replayer
        if r is not None:
            yield counter("gateway_replays", "Client resumes and snapshots served", r.replays)
            yield counter("gateway_replayed_frames", "Trades sent to clients from the history",
                          r.replayed_frames)
            yield counter("gateway_gap_fills", "Gaps in the gateway's own stream filled from the history",
                          r.fills)
            yield counter("gateway_history_errors", "History reads that failed", r.history_errors)
            yield counter("gateway_candle_backfills", "Candle streams served a backfill on subscribe",
                          r.backfills)
            yield counter("gateway_candle_backfill_frames", "Candles sent to clients from backfills",
                          r.backfill_frames)
            yield counter("gateway_candle_backfill_errors", "Candle backfill reads that failed",
                          r.backfill_errors)
        yield counter("gateway_redis_reconnects", "Times the Redis connection was lost and retried",
                      c.redis_reconnects)
        yield counter("gateway_rate_limit_closes", "Connections closed for exceeding the message rate",
                      c.rate_limit_closes)
        yield counter("gateway_heartbeat_timeouts", "Connections dropped for not answering ping",
                      c.heartbeat_timeouts)

        errors = CounterMetricFamily("gateway_errors", "Errors by kind", labels=["kind"])
        for kind, n in sorted({**dict.fromkeys(ERROR_KINDS, 0), **c.error_counts()}.items()):
            errors.add_metric([kind], n)
        yield errors

        refused = CounterMetricFamily("gateway_refused_connections", "Upgrades refused, by reason",
                                      labels=["reason"])
        for reason, n in sorted({**dict.fromkeys(REFUSAL_REASONS, 0), **c.refusals}.items()):
            refused.add_metric([reason], n)
        yield refused

        slow = CounterMetricFamily("gateway_slow_consumers", "Slow-consumer events by action",
                                   labels=["action"])
        for action in ("disconnect", "conflate"):
            slow.add_metric([action], c.slow_consumers.get(action, 0))
        yield slow

        bounds, counts, total = d.latency_histogram()
        buckets, running = [], 0
        for le, n in zip([*map(repr, bounds), "+Inf"], counts, strict=True):
            running += n
            buckets.append((le, running))
        yield HistogramMetricFamily(
            "gateway_fanout_latency_seconds",
            "From one Redis read to the last client write it caused",
            buckets=buckets, sum_value=total)


def make_registry(counters: Counters) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(counters))
    return registry


class WorkersCollector:
    """With ``--workers``: every worker's series on every worker's /metrics,
    each labelled ``worker``.

    A scrape reaches whichever worker the kernel hands the connection to, and
    /metrics is answered synchronously in the upgrade handler, so workers do
    not ask each other: each writes its own exposition to the shared
    directory once a second (and when scraped), and a scrape merges the
    files. Another worker's figures are therefore up to about a second old;
    ``gateway_worker_metrics_age_seconds`` says how old.
    """

    INTERVAL = 1.0

    def __init__(self, own: CollectorRegistry, index: int, directory: str):
        self.own, self.index, self.directory = own, index, Path(directory)

    def path(self, index: int) -> Path:
        return self.directory / f"worker-{index}.prom"

    def write(self) -> None:
        """This worker's metrics to its file (atomically: readers never see half)."""
        tmp = self.directory / f".worker-{self.index}.{os.getpid()}.tmp"
        tmp.write_bytes(generate_latest(self.own))
        tmp.replace(self.path(self.index))

    def collect(self):
        self.write()
        merged: dict[str, Metric] = {}
        ages = GaugeMetricFamily("gateway_worker_metrics_age_seconds",
                                 "Age of each worker's figures in this answer", labels=["worker"])
        now = time.time()
        for path in sorted(self.directory.glob("worker-*.prom")):
            worker = path.stem.removeprefix("worker-")
            try:
                text = path.read_text()
                mtime = path.stat().st_mtime
            except OSError:                         # a worker replacing its file just now
                continue
            ages.add_metric([worker], max(0.0, now - mtime))
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value)
        yield from merged.values()
        yield ages


def make_worker_registry(counters: Counters, index: int, directory: str
                         ) -> tuple[CollectorRegistry, WorkersCollector]:
    """The registry /metrics renders in a worker, and the collector whose
    write() the worker calls every WorkersCollector.INTERVAL."""
    workers = WorkersCollector(make_registry(counters), index, directory)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(workers)
    return registry, workers


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
