"""Wiring and lifecycle: the picows server, the Redis subscriber, heartbeat,
stats, signals and shutdown.

The Gateway builds the pieces and connects them: a symbol table and a
FanOut (the compiled hot path), a RedisSubscriber that feeds the fan-out,
the access policy that admits upgrades, and one Session per connection
(gateway.session) that owns the connection's control-plane state. Trades
and candles never pass through any of this Python.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import signal
import sys
import time
from typing import Any

from picows import WSCloseCode, WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from . import candle_store, compression, fastpath, metrics, picows_adapter, protocol, sequencing
from .access import AccessPolicy, Refusal
from .config import Config, RedisTarget, listen_backlog
from .control import ControlHandler
from .counters import Counters
from .endpoints import Endpoints, http_answer, is_upgrade
from .redis_reader import RedisSubscriber
from .replay import Replayer
from .sentinel import SentinelMaster
from .session import HEARTBEAT_SLICES, Hub, Session, SessionPolicy, abort, on_slow_consumer
from .stats import Stats
from .supervisor import WorkerInfo

log = logging.getLogger("gateway")

# A freshly accepted connection needs little read buffer: clients only send
# small control messages. picows grows it when a bigger one arrives.
READ_BUFFER_INIT_SIZE = 256
SHUTDOWN_GRACE = 2.0           # seconds clients get to answer our close on shutdown


def new_server_id() -> str:
    return "ws-gateway-" + secrets.token_hex(4)


class Gateway:
    def __init__(self, config: Config, impl=None):
        self.config = config
        self.impl = impl or fastpath.impl
        self.server_id = new_server_id()
        # One of several processes on the port (ws-gateway --workers N)?
        self.worker = WorkerInfo.from_env()
        if self.worker is not None:
            self.server_id += f"-w{self.worker.index}"
        self.table = self.impl.SymbolTable(config.channel_prefix.encode(),
                                           config.candle_channel_prefix.encode())
        self.fanout = self.impl.FanOut(self.table, max_buffered=config.max_buffered_bytes,
                                       slow_consumer_callback=on_slow_consumer)
        self.fanout.compression_min_size = config.compression_min_size
        self.fanout.write_delay = config.write_delay_us / 1e6
        self.access = AccessPolicy(config)
        self.sessions: set[Session] = set()
        self.counters = Counters(self.fanout, self.table, self.sessions, self.access.refusals)
        self.control = ControlHandler(self.table, intervals=config.candle_intervals)
        self.control.errors = self.counters.errors
        self.hub = Hub(SessionPolicy.from_config(config), self.server_id, self.table, self.fanout,
                       self.control, self.access, self.counters, self.sessions)
        # Trades, and with candle streams on, candles: one PSUBSCRIBE.
        patterns: tuple[str, ...] = (config.channel_prefix + "*",)
        if config.candle_intervals:
            patterns += (config.candle_channel_prefix + "*",)
        # Behind Sentinel: one view of where the master is, for both connections.
        self.sentinel = SentinelMaster(config.redis) if config.redis.sentinels else None
        self.redis = RedisSubscriber(config.redis, patterns,
                                     lambda on_reply: self.impl.SubscriptionReader(self.fanout, on_reply),
                                     on_state=self._on_redis_state, sentinel=self.sentinel)
        # A second connection for commands: history reads, loading the library.
        self.history = history_client(config.redis, self.sentinel)
        self.replayer = Replayer(
            self.impl, self.fanout, self.table,
            lambda symbol, after, count: sequencing.read_history(self.history, symbol, after, count),
            functools.partial(compression.deflate_frame, min_size=config.compression_min_size),
            read_backfill=lambda symbol, interval, count: candle_store.read_backfill(
                self.history, symbol, interval, count),
            backfill=config.candle_backfill)
        self.fanout.gap_callback = self.replayer.on_gap
        self.hub.replayer = self.replayer
        self.counters.replayer = self.replayer
        self.counters.redis = self.redis
        self.worker_metrics: metrics.WorkersCollector | None = None
        if self.worker is not None:
            registry, self.worker_metrics = metrics.make_worker_registry(
                self.counters, self.worker.index, self.worker.directory)
        else:
            registry = metrics.make_registry(self.counters)
        self.stats = Stats(self.counters, self.server_id)
        self.endpoints = Endpoints(self.server_id, self._not_ready, registry, web_ui=config.web_ui)
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def closing(self) -> bool:
        return self.hub.closing

    # listener factory -------------------------------------------------------
    def _listener_factory(self, request: WSUpgradeRequest, peer_ip: str) -> Any:
        path = request.path.split(b"?", 1)[0]
        answer = self.endpoints.answer(path, is_upgrade(request.headers))
        if answer is not None:
            return answer
        _normalize_connection_header(request.headers)
        decision = self.access.admit(request, peer_ip)
        if isinstance(decision, Refusal):
            # Logged without the token or any header values.
            log.info("refused %s: %d %s", peer_ip, decision.status, decision.reason)
            return http_answer(decision.status, decision.body(), decision.headers)
        session = Session(self.hub, decision, decision.max_symbols or self.config.max_symbols)
        listener = self.impl.ClientListener(session)
        if self.config.compression:
            offers = request.headers.getall("Sec-WebSocket-Extensions", ())
            agreed = compression.accept(offers) if offers else None
            if agreed:
                listener.deflate = True
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_101_response({"Sec-WebSocket-Extensions": agreed}),
                    listener)
        return listener

    def _on_redis_state(self, ready: bool, reason: str) -> None:
        if ready and self.redis.connects > 1:
            # Back after a drop: deliver what was published meanwhile before
            # anything newer, and load the library again (a Redis restarted
            # without persistence has lost it). After refused attempts only,
            # both find nothing to do.
            self.replayer.refill()
            task = asyncio.get_running_loop().create_task(self._load_library())
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    async def _load_library(self) -> None:
        c = self.config
        try:
            await asyncio.wait_for(sequencing.aload_library(self.history, c.channel_prefix,
                                                            c.history_size), 5.0)
        except Exception as exc:
            log.warning("could not load the publish_trade Redis Function library (%s); sequenced "
                        "publishing needs it loaded once: ws-gateway-functions load", exc)
        else:
            log.info("Redis Function library ws_gateway loaded (history of %d trades per symbol)",
                     c.history_size)
        if c.candle_intervals:
            # The candle service loads it too; whoever comes first serves the backfills.
            try:
                await asyncio.wait_for(candle_store.aload_library(self.history), 5.0)
            except Exception as exc:
                log.warning("could not load the %s Redis Function library (%s); candle backfills "
                            "fail until the candle service loads it", candle_store.LIBRARY_NAME, exc)

    def _not_ready(self) -> str | None:
        if self.hub.closing:
            return "shutting down"
        if not self.redis.ready:
            return self.redis.reason
        return None

    # lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        backlog = listen_backlog(c.backlog)
        self.server = await picows_adapter.create_server(
            self._listener_factory, c.host, c.port,
            ssl=c.ssl_context(),
            max_frame_size=c.max_message_size,
            read_buffer_init_size=READ_BUFFER_INIT_SIZE,
            backlog=backlog,
            reuse_port=self.worker is not None,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.sentinel is not None:
            self.sentinel.start()
        await self._load_library()
        self.redis.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat(), name="heartbeat"))
        self._tasks.append(loop.create_task(self.stats.run(c.stats_interval), name="stats"))
        if self.worker_metrics is not None:
            self._tasks.append(loop.create_task(self._write_worker_metrics(), name="worker-metrics"))
        log.info("%s listening on %s://%s:%d (backlog %d, fast path: %s), Redis %s, patterns %s%s",
                 self.server_id, "wss" if c.tls_cert else "ws", c.host, self.port, backlog,
                 "compiled" if self.impl.IS_COMPILED else "pure Python",
                 c.redis.describe(), " ".join(self.redis.patterns),
                 f" (candles: {', '.join(c.candle_intervals)})" if c.candle_intervals else "")

    async def _write_worker_metrics(self) -> None:
        assert self.worker_metrics is not None
        while True:
            try:
                self.worker_metrics.write()
            except OSError as exc:           # the supervisor's directory went away
                log.warning("cannot write this worker's metrics: %s", exc)
            await asyncio.sleep(metrics.WorkersCollector.INTERVAL)

    async def _heartbeat(self) -> None:
        # One timer for every connection, not a task each. Each tick pings
        # one slice of the connections, so each is pinged once per interval
        # (never sooner: a pong has the whole interval) and the pings are
        # spread over it: all at once, 1,000 connections held the trade
        # stream for milliseconds of sends, and their pongs as long again.
        interval = self.config.heartbeat_interval
        slot = 0
        while True:
            await asyncio.sleep(interval / HEARTBEAT_SLICES)
            for session in [s for s in self.sessions if s.heartbeat_slot == slot]:
                session.heartbeat(interval)
            slot = (slot + 1) % HEARTBEAT_SLICES

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, close Redis."""
        if self.hub.closing:
            return
        self.hub.closing = True
        log.info("shutting down: closing %d client connection(s)", len(self.sessions))
        if self.server is not None:
            self.server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        transports = []
        for s in list(self.sessions):
            s.listener.flush_pending()       # coalesced trades go before the 1001
            transports.append(s.listener.transport)
        for t in transports:
            t.send_close(WSCloseCode(protocol.SHUTTING_DOWN.code), protocol.SHUTTING_DOWN.reason)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while any(not t.is_disconnected for t in transports) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for t in transports:
            abort(t)
        # Let the cancelled tasks finish (a library load in flight, say), so
        # none is left pending when the loop closes.
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.redis.stop()
        if self.sentinel is not None:
            await self.sentinel.stop()
        await self.replayer.close()
        await self.history.aclose()
        self.stats.log_now()
        log.info("stopped")


def history_client(target: RedisTarget, sentinel: SentinelMaster | None = None):
    """A redis.asyncio client for commands on the same Redis as the subscription
    (behind Sentinel: on the master ``sentinel`` points at)."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    # Replays run at most a handful of reads at once (gateway.replay); a
    # blocking pool makes any excess wait for a connection instead of failing.
    # A pooled connection that Redis closed (a restart) is retried on a new
    # one: without a Retry, a pool built by hand makes none.
    kwargs: dict = dict(username=target.username, password=target.password, db=target.db,
                        max_connections=16, timeout=10,
                        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    if target.sentinels:
        from .sentinel import command_client
        return command_client(sentinel or SentinelMaster(target), **kwargs)
    if target.unix_path:
        pool = aredis.BlockingConnectionPool(connection_class=aredis.UnixDomainSocketConnection,
                                             path=target.unix_path, **kwargs)
    else:
        pool = aredis.BlockingConnectionPool(
            connection_class=aredis.SSLConnection if target.tls else aredis.Connection,
            host=target.host, port=target.port, **kwargs)
    return aredis.Redis(connection_pool=pool)


def _normalize_connection_header(headers) -> None:
    # RFC 7230: Connection is a token list, and Firefox sends
    # "keep-alive, Upgrade". picows 2.3.1 accepts only the bare "Upgrade",
    # and validates after this factory returns, so present it that way.
    value = headers.get("Connection")
    if value and "," in value and any(t.strip().lower() == "upgrade" for t in value.split(",")):
        headers["Connection"] = "Upgrade"


def stop_signal() -> asyncio.Future[int]:
    """A future that SIGTERM or SIGINT completes with the signal's number."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()

    def on_signal(sig: int) -> None:
        if not stop.done():
            stop.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def serve(config: Config, ready: asyncio.Future | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    gateway = Gateway(config)
    stop = stop_signal()
    await gateway.start()
    if ready is not None:
        ready.set_result(gateway)
    received = await stop
    log.info("received %s", signal.Signals(received).name)
    await gateway.stop()


def run(config: Config) -> int:
    import uvloop
    try:
        uvloop.run(serve(config))
    except OSError as exc:
        # Typically the port is taken: one clear line, not a traceback.
        print(f"ws-gateway: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
