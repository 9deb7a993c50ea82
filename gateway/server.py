"""Wiring and lifecycle: the picows server, the Redis subscriber, heartbeat,
stats, signals and shutdown.

The Gateway object is the control plane every ClientListener talks to
(``on_connected``, ``on_message``, ``on_disconnected``); trades never pass
through it.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
import time
import uuid

import orjson
from picows import WSCloseCode, WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from . import compression, fastpath, metrics, wsserver
from .access import AccessPolicy, Refusal
from .config import Config
from .control import ControlHandler, encode, error_reply, now_ms
from .redis_reader import RedisSubscriber
from .stats import Stats

log = logging.getLogger("gateway")

# A freshly accepted connection needs little read buffer: clients only send
# small control messages. picows grows it when a bigger one arrives.
READ_BUFFER_INIT_SIZE = 256
SLOW_CONSUMER_GRACE = 1.0      # seconds a slow consumer gets to take its close frame
SHUTDOWN_GRACE = 2.0           # seconds clients get to answer our close on shutdown


def new_server_id() -> str:
    return "ws-gateway-" + secrets.token_hex(4)


class Gateway:
    def __init__(self, config: Config, impl=None):
        self.config = config
        self.impl = impl or fastpath.impl
        self.server_id = new_server_id()
        self.table = self.impl.SymbolTable(config.channel_prefix.encode())
        self.dispatcher = self.impl.Dispatcher(
            self.table, max_buffered=config.max_buffered_bytes,
            slow_consumer_callback=self._on_slow_consumer)
        self.control = ControlHandler(self.table)
        self.access = AccessPolicy(config)
        self.max_message_size = config.max_message_size
        self.redis = RedisSubscriber(config.redis, config.channel_prefix + "*", self.dispatcher)
        self.stats = Stats(self)
        self.connections: set = set()
        self.server: asyncio.base_events.Server | None = None
        self.port: int | None = None
        self.started_at = time.time()
        self.client_messages = 0
        self.connections_total = 0
        self.heartbeat_timeouts = 0
        self.rate_limit_closes = 0
        self._rate = config.client_msg_rate
        self._burst = config.client_msg_burst
        self.slow_consumers: dict[str, int] = {}
        self.registry = metrics.make_registry(self)
        self._http_routes = {b"/healthz": self._healthz, b"/readyz": self._readyz,
                             b"/metrics": self._metrics}
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # control plane callbacks (called by ClientListener) ---------------------
    def on_connected(self, conn) -> None:
        if self._closing:
            conn.transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
            conn.transport.disconnect()
            return
        conn.connection_id = str(uuid.uuid4())
        conn.tokens = float(self._burst)
        conn.tokens_at = time.monotonic()
        conn.connected_at = time.monotonic()
        self.connections.add(conn)
        self.connections_total += 1
        admission = conn.user
        self.access.connected(admission)
        if admission.expires_at is not None:
            admission.timer = asyncio.get_running_loop().call_later(
                max(0.0, admission.expires_at - time.time()), self._token_expired, conn)
        if self.config.max_buffered_bytes < 65536:
            # The over-limit check runs once the transport reports its
            # high-water mark (64 KiB by default): keep that below the limit.
            conn.transport.underlying_transport.set_write_buffer_limits(
                high=self.config.max_buffered_bytes)
        data = {
            "connectionId": conn.connection_id,
            "serverId": self.server_id,
            "maxSymbolsPerConnection": conn.max_symbols,
        }
        if admission.user_id is not None:
            data["userId"] = admission.user_id
        conn.send_text(encode({
            "type": "success",
            "message": "Connected to WebSocket Gateway",
            "data": data,
            "timestamp": now_ms(),
        }))

    def _evict(self, conn, code: WSCloseCode, reason: bytes) -> None:
        """Stop feeding ``conn`` at once and send it a close frame; the
        caller decides how long the connection may take to go."""
        self.table.remove_connection(conn)
        conn.transport.send_close(code, reason)

    def _token_expired(self, conn) -> None:
        t = conn.transport
        if t is not None and not t.is_disconnected:
            log.info("connection %s (user %s): token expired; closing", conn.connection_id,
                     conn.user.user_id)
            self._evict(conn, WSCloseCode.POLICY_VIOLATION, b"token expired")
            t.disconnect()

    def on_message(self, conn, data: bytes, is_text: bool, compressed: bool = False) -> None:
        self.client_messages += 1
        if self._rate and not self._take_token(conn):
            return
        if compressed:
            try:
                data = compression.inflate(data, self.max_message_size)
            except compression.InflateError as exc:
                self.control.count_error("bad_compression" if exc.code == 1007 else "too_big")
                conn.fail(exc.code, exc.reason)
                return
        conn.send_text(self.control.handle(conn, data, is_text))
        if conn.paused and conn.write_buffer_size() > self.config.max_buffered_bytes:
            # Requests sent faster than their replies are read: replies
            # cannot be conflated, so whatever the policy, this one is closed.
            self._disconnect_slow(conn)

    def on_disconnected(self, conn) -> None:
        self.table.remove_connection(conn)
        if conn in self.connections:
            self.connections.discard(conn)
            admission = conn.user
            self.access.disconnected(admission)
            if admission.timer is not None:
                admission.timer.cancel()
                admission.timer = None

    def _take_token(self, conn) -> bool:
        """Token bucket per connection: ``rate`` per second, ``burst`` at once."""
        now = time.monotonic()
        tokens = min(float(self._burst), conn.tokens + (now - conn.tokens_at) * self._rate)
        conn.tokens_at = now
        if tokens >= 1.0:
            conn.tokens = tokens - 1.0
            conn.strikes = 0
            return True
        conn.tokens = tokens
        conn.strikes += 1
        self.control.count_error("rate_limited")
        if conn.strikes > self._burst:
            # Still sending after a burst's worth of refusals: abuse, not a hiccup.
            self.rate_limit_closes += 1
            log.warning("connection %s (%s) keeps exceeding %g messages/s; closing",
                        conn.connection_id, _peer(conn.transport), self._rate)
            self._evict(conn, WSCloseCode.POLICY_VIOLATION, b"message rate exceeded")
            conn.transport.disconnect()
        else:
            conn.send_text(error_reply(
                f"Rate limit exceeded: at most {self._rate:g} messages per second "
                f"(burst {self._burst}); message ignored", now_ms()))
        return False

    def error_counts(self) -> dict[str, int]:
        counts = dict(self.control.errors)
        if self.dispatcher.dispatch_errors:
            counts["dispatch"] = self.dispatcher.dispatch_errors
        return counts

    def _on_slow_consumer(self, conn) -> None:
        """A client is over max_buffered_bytes after a write."""
        t = conn.transport
        if self.config.slow_client_policy == "conflate":
            if not conn.conflating:
                self._count_slow("conflate")
                conn.conflating = True
                log.info("slow consumer %s (%s): %d bytes queued; conflating until it drains",
                         conn.connection_id, _peer(t), conn.write_buffer_size())
            return
        self._disconnect_slow(conn)

    def _disconnect_slow(self, conn) -> None:
        # Stop feeding it now, tell it why, and cut it off if it does not
        # take the close frame within the grace period.
        t = conn.transport
        if t.is_close_frame_sent:
            return
        self._count_slow("disconnect")
        log.warning("slow consumer %s (%s): %d bytes queued over the %d limit; closing",
                    conn.connection_id, _peer(t), conn.write_buffer_size(),
                    self.config.max_buffered_bytes)
        self._evict(conn, WSCloseCode.POLICY_VIOLATION, b"slow consumer")
        asyncio.get_running_loop().call_later(SLOW_CONSUMER_GRACE, _abort, t)

    def _count_slow(self, action: str) -> None:
        self.slow_consumers[action] = self.slow_consumers.get(action, 0) + 1

    def on_drained(self, conn) -> None:
        """A conflating client drained: send what it missed, then resume."""
        conn.conflating = False
        prefix = self.table.prefix
        ts = now_ms()
        for channel, frame, skipped in conn.take_conflated():
            symbol = channel[len(prefix):].decode()
            conn.send_text(encode({"type": "gap", "data": {"symbol": symbol, "skipped": skipped},
                                   "timestamp": ts}))
            conn.send_frame(frame)

    # listener factory -------------------------------------------------------
    def _listener_factory(self, request: WSUpgradeRequest, peer_ip: str):
        path = request.path.split(b"?", 1)[0]
        if path in self._http_routes:
            return self._http_routes[path]()
        _normalize_connection_header(request.headers)
        decision = self.access.admit(request, peer_ip)
        if isinstance(decision, Refusal):
            # Logged without the token or any header values.
            log.info("refused %s: %d %s", peer_ip, decision.status, decision.reason)
            return _http(decision.status, decision.body(), decision.headers)
        listener = self.impl.ClientListener(self, "", decision.max_symbols or self.config.max_symbols)
        listener.user = decision
        if self.config.compression:
            offers = request.headers.getall("Sec-WebSocket-Extensions", ())
            agreed = compression.accept(offers) if offers else None
            if agreed:
                listener.deflate = True
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_101_response({"Sec-WebSocket-Extensions": agreed}),
                    listener)
        return listener

    # plain HTTP on the WebSocket port ------------------------------------------
    def _healthz(self):
        return _http(200, {"status": "ok", "serverId": self.server_id})

    def _readyz(self):
        if self._closing:
            return _http(503, {"status": "not ready", "reason": "shutting down"})
        if not self.redis.ready:
            return _http(503, {"status": "not ready", "reason": self.redis.reason})
        return _http(200, {"status": "ready"})

    def _metrics(self):
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_ok_response(metrics.render(self.registry),
                                                 {"Content-Type": metrics.CONTENT_TYPE}), None)

    # lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self.server = await wsserver.create_server(
            self._listener_factory, c.host, c.port,
            ssl=c.ssl_context(),
            max_frame_size=c.max_message_size,
            read_buffer_init_size=READ_BUFFER_INIT_SIZE,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.redis.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeat(), name="heartbeat"))
        self._tasks.append(loop.create_task(self.stats.run(c.stats_interval), name="stats"))
        log.info("%s listening on %s://%s:%d (fast path: %s), Redis %s, pattern %s*",
                 self.server_id, "wss" if c.tls_cert else "ws", c.host, self.port,
                 "compiled" if self.impl.IS_COMPILED else "pure Python",
                 c.redis.describe(), c.channel_prefix)

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections):
                t = conn.transport
                if t is None or t.is_disconnected:
                    continue
                if conn.awaiting_pong:
                    # No pong since the last ping: the client or its network is gone.
                    self.heartbeat_timeouts += 1
                    log.info("connection %s did not answer ping within %.1f s; terminating",
                             conn.connection_id, interval)
                    self._evict(conn, WSCloseCode.GOING_AWAY, b"heartbeat timeout")
                    _abort(t)
                    continue
                conn.awaiting_pong = True
                t.send_ping()

    async def stop(self) -> None:
        """Stop accepting, close every client with 1001, close Redis."""
        if self._closing:
            return
        self._closing = True
        log.info("shutting down: closing %d client connection(s)", len(self.connections))
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()
        conns = list(self.connections)
        for conn in conns:
            conn.transport.send_close(WSCloseCode.GOING_AWAY, b"server shutting down")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while any(not c.transport.is_disconnected for c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in conns:
            if not conn.transport.is_disconnected:
                _abort(conn.transport)
        await self.redis.stop()
        self.stats.log_now()
        log.info("stopped")


def _normalize_connection_header(headers) -> None:
    # RFC 7230: Connection is a token list, and Firefox sends
    # "keep-alive, Upgrade". picows 2.3.1 accepts only the bare "Upgrade",
    # and validates after this factory returns, so present it that way.
    value = headers.get("Connection")
    if value and "," in value and any(t.strip().lower() == "upgrade" for t in value.split(",")):
        headers["Connection"] = "Upgrade"


def _http(status: int, body: dict, extra_headers: dict | None = None):
    """A plain HTTP answer to an upgrade request (endpoints, refusals)."""
    data = orjson.dumps(body)
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(data, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, data, headers)
    return WSUpgradeResponseWithListener(response, None)


def _peer(transport):
    return transport.underlying_transport.get_extra_info("peername")


def _abort(transport) -> None:
    if not transport.is_disconnected:
        transport.underlying_transport.abort()


async def serve(config: Config, ready: asyncio.Future | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: stop.done() or stop.set_result(s))
    await gateway.start()
    if ready is not None:
        ready.set_result(gateway)
    sig = await stop
    log.info("received %s", signal.Signals(sig).name)
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
