"""The Redis side: one connection, one PSUBSCRIBE (of one or more patterns),
reconnect forever.

A plain asyncio Protocol writes AUTH/SELECT/PSUBSCRIBE and hands every byte
it receives to its own SubscriptionReader (gateway._fastpath), which parses
RESP with hiredis and passes trades to the process-wide FanOut. Each
connection gets a new reader, so a reconnect never mixes two streams and
never touches routing; several subscribers can feed one fan-out. redis-py's
PubSub is ~10x slower at this and stays off the hot path. Redis disconnects
a subscriber that lags by 32 MB, so nothing here waits on clients:
buffer_updated returns as soon as the bytes are written or queued.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import hiredis

from .config import RedisTarget

if TYPE_CHECKING:
    from .sentinel import SentinelMaster

log = logging.getLogger("gateway.redis")


def encode_command(*args: str | bytes) -> bytes:
    """One RESP command (array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


REPEAT_LOG_INTERVAL = 30.0     # seconds between warnings while Redis stays unreachable


class Failures:
    """A run of failed attempts, for logging it as a person can read it: the
    first failure, then one line per REPEAT_LOG_INTERVAL, not one per attempt."""

    def __init__(self) -> None:
        self.count = 0
        self._warned_at = 0.0

    def failed(self) -> bool:
        """Count one failure; True when this one should be logged."""
        self.count += 1
        now = time.monotonic()
        if self.count == 1 or now - self._warned_at >= REPEAT_LOG_INTERVAL:
            self._warned_at = now
            return True
        return False

    def reset(self) -> None:
        self.count = 0


class Backoff:
    """Capped exponential backoff with jitter: 0.1 s, 0.2 s, ... up to ``cap``."""

    def __init__(self, base: float = 0.1, cap: float = 5.0):
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class _SubscriptionProtocol(asyncio.BufferedProtocol):
    # Reads land in one preallocated buffer, larger than the loop's default
    # read size: under load one read then carries more messages, and each
    # client gets more frames per write (the per-write cost is mostly kernel).
    READ_BUFFER_SIZE = 1 << 20
    transport: asyncio.Transport    # set by connection_made, before anything else runs

    def __init__(self, owner: RedisSubscriber):
        self.owner = owner
        self.reader = owner.make_reader(owner._on_reply)
        self.closed = asyncio.get_running_loop().create_future()
        self.buffer = bytearray(self.READ_BUFFER_SIZE)
        self.view = memoryview(self.buffer)

    def connection_made(self, transport):
        self.transport = transport  # an asyncio.Transport for a stream connection
        self.owner._on_connected(self)

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        try:
            self.reader.feed(self.buffer, nbytes)
        except hiredis.ProtocolError as exc:
            log.error("Redis sent bytes that are not RESP (%s); reconnecting", exc)
            self.transport.abort()
        except Exception:
            # A bug, not bad input: log it and reconnect rather than stall.
            log.exception("fan-out failed; reconnecting to Redis")
            self.transport.abort()

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(exc)


class RedisSubscriber:
    """Keeps ``PSUBSCRIBE <pattern> ...`` alive and feeds the fan-out.

    ``patterns`` is one pattern or a tuple of them (trades' ``<prefix>*`` and,
    with candle streams on, ``<candle prefix>*``), subscribed in one command.

    ``make_reader(reply_callback)`` returns a new reader for each connection
    (``SubscriptionReader(fanout, reply_callback)``): it takes the bytes,
    routes trades and hands every other reply back to this subscriber.
    ``ready`` is True only while every pattern's subscription is confirmed
    on the current connection. ``reason`` says why not, for /readyz and the
    logs.

    With ``sentinel`` (REDIS_URL redis+sentinel://, gateway.sentinel) it
    connects where the sentinels say the master is, sends ``ROLE`` first and
    subscribes only once that server answers ``master``; a replica (a stale
    answer during a switch) is dropped and the sentinels are asked again with
    backoff. A failover the sentinels announce moves it at once, and while
    they hold the master down it is not ready. The reader and everything
    after the connect step are the same.
    """

    def __init__(self, target: RedisTarget, patterns: str | tuple[str, ...],
                 make_reader: Callable[[Callable], Any], *,
                 keepalive_interval: float = 15.0, connect_timeout: float = 5.0,
                 backoff: Backoff | None = None,
                 on_state: Callable[[bool, str], None] | None = None,
                 sentinel: SentinelMaster | None = None):
        self.target = target
        self.sentinel = sentinel
        self.address: tuple[str, int] | None = None     # the master connected to (sentinel)
        self._role_ok = sentinel is None                # ROLE answered master on this connection
        self._live = False                              # every pattern confirmed here
        self._moving_to: tuple[str, int] | None = None  # the sentinels moved the master
        self._not_master = False                        # this connection's server is a replica
        self._wake = asyncio.Event()
        if sentinel is not None:
            sentinel.on_switch(self._on_switch)
            sentinel.on_odown(self._on_odown)
        # In order, once each: Redis confirms a pattern named twice twice.
        self.patterns: tuple[str, ...] = tuple(dict.fromkeys(
            (patterns,) if isinstance(patterns, str) else patterns))
        if not self.patterns:
            raise ValueError("RedisSubscriber needs at least one pattern")
        self._confirmed: set[bytes] = set()     # patterns Redis confirmed on this connection
        self.make_reader = make_reader
        self.keepalive_interval = keepalive_interval
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.on_state = on_state
        self.ready = False
        self.reason = "not connected yet"
        self.connects = 0
        self.reconnects = 0
        self.subscribed_at: float | None = None
        self._proto: _SubscriptionProtocol | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_reply = 0.0
        self._refused = False
        self._failures = Failures()  # connection attempts failed in a row

    # lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-subscriber")

    async def stop(self) -> None:
        self._stopping = True
        if self.sentinel is not None:
            self.sentinel.remove(self._on_switch, self._on_odown)
        if self._proto is not None:
            self._proto.transport.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._set_state(False, "stopped")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                proto = await asyncio.wait_for(self._connect(loop), self.connect_timeout)
            except (TimeoutError, OSError) as exc:
                why = str(exc) or type(exc).__name__
                if self.sentinel is None:
                    self._set_state(False, f"cannot connect to {self.target.describe()}: {why}")
                elif self.address is None:          # no sentinel named a master
                    self._set_state(False, why)
                else:
                    self._set_state(False, f"cannot connect to the master {_where(self.address)} "
                                           f"of {self.target.master_name}: {why}")
                    self.sentinel.stale(self.address)
                if self._failures.failed():
                    n = self._failures.count
                    more = f"; {n} attempts so far" if n > 1 else ""
                    log.warning("Redis %s unreachable (%s)%s; retrying with backoff up to %g s",
                                self.target.describe(), why, more, self.backoff.cap)
            else:
                keepalive = loop.create_task(self._keepalive(proto))
                try:
                    lost = await proto.closed
                finally:
                    keepalive.cancel()
                    self._proto = None
                if self._stopping:
                    break
                self.reconnects += 1
                self._live = False
                if self._moving_to is not None or self._not_master:
                    # A failover: the reason says so; the next attempt goes
                    # where the sentinels now say.
                    self._set_state(False, self.reason)
                elif self._refused:
                    # Keep the refusal as the reason: it is what an operator must fix.
                    self._set_state(False, self.reason)
                else:
                    was = self.reason
                    if self.sentinel is not None:
                        self._set_state(False, "redis failover in progress: connection to the "
                                               f"master {_where(self.address)} lost")
                    else:
                        self._set_state(False, "connection to Redis lost")
                    log.warning("Redis connection lost (%s); clients stay connected, reconnecting",
                                lost or was)
            if self._moving_to is not None and not self._stopping:
                self._moving_to = None
                continue                 # to the new master at once
            delay = self.backoff.next_delay()
            log.debug("next Redis connection attempt in %.2f s", delay)
            self._wake.clear()
            try:
                # A failover the sentinels announce ends the wait early.
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def _connect(self, loop) -> _SubscriptionProtocol:
        t = self.target
        ctx = ssl.create_default_context() if t.tls else None
        self._moving_to = None
        self._not_master = False
        if self.sentinel is not None:
            self.address = None
            address = await self.sentinel.discover()
            self.address = address
            _, proto = await loop.create_connection(
                lambda: _SubscriptionProtocol(self), address[0], address[1])
            return proto
        if t.unix_path:
            _, proto = await loop.create_unix_connection(lambda: _SubscriptionProtocol(self), t.unix_path)
        else:
            _, proto = await loop.create_connection(
                lambda: _SubscriptionProtocol(self), t.host, t.port, ssl=ctx)
        return proto

    async def _keepalive(self, proto: _SubscriptionProtocol) -> None:
        # A PING on the subscribed connection proves Redis still answers; a
        # silent peer (hung server, dropped route) is dropped and retried.
        while True:
            await asyncio.sleep(self.keepalive_interval)
            if time.monotonic() - self._last_reply > 2 * self.keepalive_interval:
                log.warning("Redis did not answer PING for %.0f s; reconnecting",
                            2 * self.keepalive_interval)
                proto.transport.abort()
                return
            proto.transport.write(encode_command("PING"))

    # protocol callbacks ---------------------------------------------------
    def _on_connected(self, proto: _SubscriptionProtocol) -> None:
        # Replies can arrive before _run resumes from the connect, so the
        # protocol is recorded here, not there.
        self._proto = proto
        self._refused = False
        if self._failures.count > 1:
            log.info("Redis %s reachable again after %d failed attempts", self.target.describe(),
                     self._failures.count)
        self._failures.reset()
        self.connects += 1
        self._last_reply = time.monotonic()
        cmds = []
        t = self.target
        if t.password is not None:
            user = [t.username] if t.username else []
            cmds.append(encode_command("AUTH", *user, t.password))
        if t.db:
            cmds.append(encode_command("SELECT", str(t.db)))
        self._confirmed = set()
        self._live = False
        if self.sentinel is not None:
            # Subscribe only once this server says it is the master (_on_role).
            self._role_ok = False
            cmds.append(encode_command("ROLE"))
        else:
            cmds.append(encode_command("PSUBSCRIBE", *self.patterns))
        proto.transport.write(b"".join(cmds))
        if not self.reason.startswith("Redis error"):
            # After a refusal, keep saying why until an attempt succeeds:
            # that is what /readyz should tell an operator.
            self._set_state(False, "subscribing")

    def _on_reply(self, reply) -> None:
        """Every reply that is not a trade message: confirmations, errors, pongs."""
        self._last_reply = time.monotonic()
        if isinstance(reply, hiredis.ReplyError):
            if self._refused:  # the pipelined commands after a refusal fail too
                return
            self._refused = True
            text = str(reply)
            if text.startswith(("NOAUTH", "WRONGPASS", "NOPERM", "ERR AUTH", "ERR invalid password")):
                log.error("Redis refused the gateway (%s): check the user, password and its "
                          "pub/sub permissions in REDIS_URL", text)
            else:
                log.error("Redis replied with an error: %s", text)
            self._set_state(False, f"Redis error: {text}")
            if self._proto is not None:
                self._proto.transport.close()
            return
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"psubscribe":
                # One confirmation per pattern; ready once all are in.
                if len(reply) > 1 and isinstance(reply[1], bytes):
                    self._confirmed.add(reply[1])
                if (self._live or not self._role_ok
                        or not self._confirmed.issuperset(p.encode() for p in self.patterns)):
                    return
                self._live = True
                self.backoff.reset()
                self.subscribed_at = time.time()
                if self.sentinel is not None:
                    log.info("subscribed to %s on the master %s of %s", " ".join(self.patterns),
                             _where(self.address), self.target.describe())
                    if self.sentinel.odown:
                        self._set_state(False, self._odown_reason())
                        return
                else:
                    log.info("subscribed to %s on %s", " ".join(self.patterns), self.target.describe())
                self._set_state(True, "subscribed")
            elif kind in (b"master", b"slave", b"sentinel") and self.sentinel is not None:
                self._on_role(kind.decode())
            elif kind == b"pong":
                pass
            elif kind == b"punsubscribe":
                if len(reply) > 1 and isinstance(reply[1], bytes):
                    self._confirmed.discard(reply[1])
                self._set_state(False, "unsubscribed")
            else:
                log.debug("unexpected reply from Redis: %r", reply[:2])
        elif reply == b"OK":
            pass
        else:
            log.debug("unexpected reply from Redis: %r", reply)

    # sentinel ---------------------------------------------------------------
    def _on_role(self, role: str) -> None:
        if self._proto is None:
            return
        if role == "master":
            self._role_ok = True
            self._proto.transport.write(encode_command("PSUBSCRIBE", *self.patterns))
            return
        assert self.sentinel is not None and self.address is not None
        self._not_master = True
        self.sentinel.stale(self.address)
        log.info("%s is a %s, not the master of %s (a switch in progress); asking the sentinels "
                 "again", _where(self.address), role, self.target.master_name)
        self._set_state(False, f"redis failover in progress: {_where(self.address)} is a {role}, "
                               "not the master")
        self._proto.transport.close()

    def _on_switch(self, address: tuple[str, int]) -> None:
        """The sentinels moved the master: leave the old one now."""
        if self._stopping:
            return
        if self._proto is not None and self.address != address:
            self._moving_to = address
            self._live = False
            log.warning("leaving %s: the sentinels moved the master of %s to %s",
                        _where(self.address), self.target.master_name, _where(address))
            self._set_state(False, f"redis failover in progress: the master moved to {_where(address)}")
            self._proto.transport.abort()
        elif self._proto is None:
            self._wake.set()        # waiting to retry: retry now

    def _on_odown(self, down: bool) -> None:
        if self._stopping or not self._live:
            return
        if down:
            self._set_state(False, self._odown_reason())
        else:
            self._set_state(True, "subscribed")

    def _odown_reason(self) -> str:
        return (f"redis failover in progress: the sentinels hold the master {_where(self.address)} "
                "down")

    def _set_state(self, ready: bool, reason: str) -> None:
        changed = ready != self.ready
        self.ready = ready
        self.reason = reason
        if changed and self.on_state is not None:
            self.on_state(ready, reason)


def _where(address: tuple[str, int] | None) -> str:
    if address is None:
        return "(unknown)"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
