"""Sessions: the control-plane state of one connection and the policies that act on it.

A ClientListener (the fast path) holds what each delivery touches and one
slot for its Session; everything else about the connection lives here: its
id, its admission (user, token expiry), its symbol limit, its control-message
token bucket, heartbeat bookkeeping and what happens to it when it reads too
slowly. The listener calls ``on_connected``, ``on_message``, ``on_pong``,
``on_drained`` and ``on_disconnected``; the gateway's heartbeat calls
``heartbeat``; the fan-out reports a slow consumer through
``on_slow_consumer``.

What all sessions share (policy numbers, the symbol table, the control
handler, access bookkeeping, counters, the set of live sessions) is one
``Hub``, so a session can be exercised without a server.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from picows import WSCloseCode

from . import compression, frames, protocol
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .access import AccessPolicy, Admission
    from .config import Config
    from .control import ControlHandler
    from .counters import Counters

log = logging.getLogger("gateway")

# The heartbeat pings 1/HEARTBEAT_SLICES of the connections at a time, each
# connection once per interval (see Gateway._heartbeat).
HEARTBEAT_SLICES = 32
_heartbeat_slots = itertools.count()
PING_FRAME = b"\x89\x00"      # the heartbeat's ping: empty, unmasked (RFC 6455 5.5.2)
SLOW_CONSUMER_GRACE = 1.0      # seconds a slow consumer gets to take its close frame


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """The numbers every session applies, taken from Config once."""
    max_message_size: int = 102400
    max_buffered_bytes: int = 1 << 20
    slow_client_policy: str = "disconnect"
    msg_rate: float = 20.0
    msg_burst: int = 40

    @classmethod
    def from_config(cls, config: Config) -> SessionPolicy:
        return cls(config.max_message_size, config.max_buffered_bytes, config.slow_client_policy,
                   config.client_msg_rate, config.client_msg_burst)


class Hub:
    """What every session of one gateway shares."""

    __slots__ = ("policy", "server_id", "table", "fanout", "control", "access", "counters",
                 "sessions", "closing", "replayer")

    def __init__(self, policy: SessionPolicy, server_id: str, table, fanout, control: ControlHandler,
                 access: AccessPolicy, counters: Counters, sessions: set[Session]):
        self.policy = policy
        self.server_id = server_id
        self.table = table
        self.fanout = fanout
        self.control = control
        self.access = access
        self.counters = counters
        self.sessions = sessions
        self.closing = False
        self.replayer: Any = None       # gateway.replay.Replayer, when history is on


class Session:
    """One connection's control-plane state; see the module docstring."""

    __slots__ = ("hub", "listener", "admission", "connection_id", "max_symbols", "bucket",
                 "strikes", "awaiting_pong", "expiry", "heartbeat_slot")

    def __init__(self, hub: Hub, admission: Admission, max_symbols: int):
        self.hub = hub
        self.listener: Any = None
        self.admission = admission
        self.connection_id = ""
        self.max_symbols = max_symbols
        self.bucket: TokenBucket | None = None
        self.strikes = 0
        self.awaiting_pong = False
        self.expiry: asyncio.TimerHandle | None = None
        # Which of the heartbeat's slices pings this connection (Gateway._heartbeat).
        self.heartbeat_slot = next(_heartbeat_slots) % HEARTBEAT_SLICES

    @property
    def max_message_size(self) -> int:
        return self.hub.policy.max_message_size

    @property
    def user_id(self) -> str | None:
        return self.admission.user_id

    # --- listener callbacks -------------------------------------------------
    def on_connected(self, listener) -> None:
        hub = self.hub
        self.listener = listener
        t = listener.transport
        if hub.closing:
            t.send_close(WSCloseCode(protocol.SHUTTING_DOWN.code), protocol.SHUTTING_DOWN.reason)
            t.disconnect()
            return
        self.connection_id = str(uuid.uuid4())
        if hub.policy.msg_rate:
            self.bucket = TokenBucket(hub.policy.msg_burst, time.monotonic())
        hub.sessions.add(self)
        hub.counters.connections_total += 1
        hub.access.connected(self.admission)
        expires_at = self.admission.expires_at
        if expires_at is not None:
            self.expiry = asyncio.get_running_loop().call_later(
                max(0.0, expires_at - time.time()), self.token_expired)
        if hub.policy.max_buffered_bytes < 65536:
            # The over-limit check runs once the transport reports its
            # high-water mark (64 KiB by default): keep that below the limit.
            t.underlying_transport.set_write_buffer_limits(high=hub.policy.max_buffered_bytes)
        listener.send_text(protocol.welcome(self.connection_id, hub.server_id, self.max_symbols,
                                            self.admission.user_id, protocol.now_ms()))
        user = self.admission.user_id
        log.info("connection %s from %s%s", self.connection_id, _address(self.peer()),
                 f" (user {user})" if user is not None else "")

    def on_message(self, listener, data: bytes, is_text: bool, compressed: bool = False) -> None:
        hub = self.hub
        hub.counters.client_messages += 1
        if self.bucket is not None and not self._take_token():
            return
        if compressed:
            try:
                data = compression.inflate(data, hub.policy.max_message_size)
            except compression.InflateError as exc:
                hub.counters.count_error("bad_compression" if exc.code == 1007 else "too_big")
                frames.fail(listener, exc.code, exc.reason)
                return
        reply, resume = hub.control.process(listener, data, is_text, self.max_symbols)
        if resume and hub.replayer is not None:
            # Holds the listener's live frames now, before the loop can run
            # a fan-out, so the reply and the replay come first.
            hub.replayer.resume(listener, resume)
        listener.send_text(reply)
        if listener.paused and listener.write_buffer_size() > hub.policy.max_buffered_bytes:
            # Requests sent faster than their replies are read: replies
            # cannot be conflated, so whatever the policy, this one is closed.
            self.disconnect_slow()

    def on_pong(self) -> None:
        self.awaiting_pong = False

    def on_drained(self, listener) -> None:
        """A conflating client drained: per stream, a gap notice naming it and
        what it skipped, then the latest message; then it resumes."""
        listener.conflating = False
        table = self.hub.table
        fanout = self.hub.fanout
        ts = protocol.now_ms()
        for channel, frame, skipped, first, last in listener.take_conflated():
            position = fanout.position(channel) if first else None
            # "AAPL", or "AAPL@1m" for a candle stream (always a plain notice)
            listener.send_text(protocol.gap(table.symbol_for(channel), skipped, ts,
                                            epoch=position[0] if position else None,
                                            from_seq=first, to_seq=last))
            listener.send_frame(frame)

    def on_disconnected(self, listener) -> None:
        hub = self.hub
        hub.table.remove_connection(listener)
        if self in hub.sessions:
            hub.sessions.discard(self)
            hub.access.disconnected(self.admission)
            log.info("connection %s closed", self.connection_id)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        # The listener keeps its session; the session lets go of the
        # listener, so the pair is freed by reference counting at once
        # instead of waiting for the cycle collector (10,000 closed
        # connections held ~18 MB until then).
        self.listener = None

    # --- policies -------------------------------------------------------------
    def _take_token(self) -> bool:
        """The control-message token bucket: ``msg_rate`` per second, ``msg_burst`` at once."""
        policy = self.hub.policy
        assert self.bucket is not None
        if self.bucket.take(policy.msg_rate, policy.msg_burst, time.monotonic()) == 0.0:
            self.strikes = 0
            return True
        self.strikes += 1
        self.hub.counters.count_error("rate_limited")
        if self.strikes > policy.msg_burst:
            # Still sending after a burst's worth of refusals: abuse, not a hiccup.
            self.hub.counters.rate_limit_closes += 1
            log.warning("connection %s (%s) keeps exceeding %g messages/s; closing",
                        self.connection_id, self.peer(), policy.msg_rate)
            self.evict(protocol.RATE_EXCEEDED)
            self.listener.transport.disconnect()
        else:
            self.listener.send_text(protocol.rate_limited(policy.msg_rate, policy.msg_burst,
                                                          protocol.now_ms()))
        return False

    def heartbeat(self, interval: float) -> None:
        """One heartbeat tick: ping, or drop a client that did not answer the last ping."""
        t = self.listener.transport if self.listener is not None else None
        if t is None or t.is_disconnected:
            return
        if self.awaiting_pong:
            # No pong since the last ping: the client or its network is gone.
            self.hub.counters.heartbeat_timeouts += 1
            log.info("connection %s did not answer ping within %.1f s; terminating",
                     self.connection_id, interval)
            self.evict(protocol.HEARTBEAT_TIMEOUT)
            abort(t)
            return
        self.awaiting_pong = True
        self.listener.send_frame(PING_FRAME)

    def token_expired(self) -> None:
        self.expiry = None
        t = self.listener.transport if self.listener is not None else None
        if t is not None and not t.is_disconnected:
            log.info("connection %s (user %s): token expired; closing", self.connection_id,
                     self.admission.user_id)
            self.evict(protocol.TOKEN_EXPIRED)
            t.disconnect()

    def slow_consumer(self) -> None:
        """The fan-out left this client over max_buffered_bytes after a write."""
        listener = self.listener
        if self.hub.policy.slow_client_policy == "conflate":
            if not listener.conflating:
                self.hub.counters.count_slow("conflate")
                listener.conflating = True
                log.info("slow consumer %s (%s): %d bytes queued; conflating until it drains",
                         self.connection_id, self.peer(), listener.write_buffer_size())
            return
        self.disconnect_slow()

    def disconnect_slow(self) -> None:
        # Stop feeding it now, tell it why, and cut it off if it does not
        # take the close frame within the grace period.
        t = self.listener.transport
        if t.is_close_frame_sent:
            return
        self.hub.counters.count_slow("disconnect")
        log.warning("slow consumer %s (%s): %d bytes queued over the %d limit; closing",
                    self.connection_id, self.peer(), self.listener.write_buffer_size(),
                    self.hub.policy.max_buffered_bytes)
        self.evict(protocol.SLOW_CONSUMER)
        asyncio.get_running_loop().call_later(SLOW_CONSUMER_GRACE, abort, t)

    def evict(self, close: protocol.Close) -> None:
        """Stop feeding this client at once and send it a close frame; the
        caller decides how long the connection may take to go."""
        self.hub.table.remove_connection(self.listener)
        if close is not protocol.SLOW_CONSUMER:
            # Trades waiting for a coalesced write go before the close frame.
            self.listener.flush_pending()
        self.listener.transport.send_close(WSCloseCode(close.code), close.reason)

    def peer(self):
        t = self.listener.transport if self.listener is not None else None
        return t.underlying_transport.get_extra_info("peername") if t is not None else None


def _address(peer) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer)


def on_slow_consumer(listener) -> None:
    """The fan-out's slow_consumer_callback."""
    listener.session.slow_consumer()


def abort(transport) -> None:
    """Drop the TCP connection now, without a close handshake."""
    if not transport.is_disconnected:
        transport.underlying_transport.abort()
