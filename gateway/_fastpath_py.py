"""The pure-Python twin of gateway._fastpath.

Same classes, same functions, same behaviour, written plainly. It is the
oracle the tests hold the compiled module to, the baseline the micro
benchmarks compare against, and what runs with GATEWAY_NO_EXTENSIONS=1.
Its public surface is gateway/_fastpath.pyi, as the compiled module's is;
tests/test_fastpath_contract.py fails when the two differ. Names with a
leading underscore are what the compiled module keeps at C level.
Change both together.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import hiredis
import orjson
from picows import WSListener, WSMsgType

from . import frames as _frames
from . import protocol as _protocol
from .compression import compress_message, frame_header
from .protocol import TRADE_HEAD, TRADE_MID, TRADE_TAIL

IS_COMPILED = False
_log = logging.getLogger("gateway.fastpath")

LATENCY_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                   25e-3, 50e-3, 100e-3)
_BUCKET_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)
FEED_CHUNK_SIZE = 65536
_OUT_KEEP = 65536
_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE


def is_json_object(payload: bytes) -> bool:
    """True if ``payload`` is one JSON object in valid UTF-8 (what orjson accepts)."""
    try:
        return type(orjson.loads(payload)) is dict
    except orjson.JSONDecodeError:
        return False


def parse_symbol(channel: bytes, prefix: bytes) -> str | None:
    """The symbol in ``channel`` after ``prefix``, or None if it has no such prefix."""
    if len(channel) <= len(prefix) or not channel.startswith(prefix):
        return None
    return channel[len(prefix):].decode("utf-8", "replace")


def encode_text_frame(body: bytes) -> bytes:
    """A server-to-client text frame around ``body``."""
    return frame_header(0x81, len(body)) + body


def _trade_body(payload: bytes, ts: bytes) -> bytes:
    return b"".join((TRADE_HEAD, payload, TRADE_MID, ts, TRADE_TAIL))


def encode_sequenced_frame(data: bytes, seq: int, epoch: bytes, timestamp_ms: int) -> bytes:
    """The complete frame of a sequenced trade (``data``: the trade object as published)."""
    return encode_text_frame(_protocol.sequenced_trade_body(data, seq, epoch, timestamp_ms))


def split_published(payload: bytes) -> tuple[int, bytes, bytes] | None:
    """(seq, epoch, data) if ``payload`` is a message publish_trade made, else None."""
    return _protocol.split_published(payload)


def split_candle(payload: bytes) -> tuple[int, bytes]:
    """(n, client message) of a payload on a candle channel: ``{"_n":<n>,`` cut
    off; (0, payload) when it does not start that way."""
    return _protocol.split_candle(payload)


def encode_trade_frame(payload: bytes, timestamp_ms: int) -> bytes:
    """The complete WebSocket frame that carries ``payload`` as a trade."""
    return encode_text_frame(_trade_body(payload, str(timestamp_ms).encode()))


class ClientListener(WSListener):
    """One WebSocket client; see gateway._fastpath.ClientListener."""

    __slots__ = ("session", "sink", "conflating", "holding", "frag", "deflate", "_transport",
                 "_symbols", "_paused", "_conflated", "_held", "_floors", "_out", "_in_batch")

    transport = property(attrgetter("_transport"))
    symbols = property(attrgetter("_symbols"))
    paused = property(attrgetter("_paused"))
    conflated = property(attrgetter("_conflated"))

    def __init__(self, session: Any = None):
        self.session = session
        self.sink: Callable[[bytes], Any] | None = None
        self.conflating = False
        self.holding = False
        self._held: list[tuple[bytes, int, bytes]] = []
        self._floors: dict[bytes, list] | None = None
        self.frag: _frames.Reassembly | None = None
        self.deflate = False
        self._transport: Any = None
        self._symbols: list[str] = []
        self._paused = False
        self._conflated: dict[bytes, list] = {}
        self._out = bytearray()
        self._in_batch = False

    def on_ws_connected(self, transport):
        self._transport = transport
        if self.session is not None:
            self.session.on_connected(self)

    def on_ws_frame(self, transport, frame):
        t = frame.msg_type
        if transport.is_close_frame_sent:
            if t == _CLOSE:        # the handshake is done: close TCP (RFC 6455 7.1.1)
                transport.disconnect()
            return
        if ((t in (_TEXT, _BINARY)) and frame.fin and self.frag is None
                and not frame.rsv2 and not frame.rsv3 and (self.deflate or not frame.rsv1)):
            self.session.on_message(self, frame.get_payload_as_bytes(), t == _TEXT, bool(frame.rsv1))
        elif t == _PONG and not (frame.rsv1 or frame.rsv2 or frame.rsv3):
            self.session.on_pong()
        else:
            _frames.on_rare_frame(self, transport, frame)

    def on_ws_disconnected(self, transport):
        self.conflating = False
        self._conflated.clear()
        self.holding = False
        self._held = []
        self._floors = None
        self._out = bytearray()
        if self.session is not None:
            self.session.on_disconnected(self)

    def pause_writing(self):
        self._paused = True

    def resume_writing(self):
        self._paused = False
        if self.conflating and self.session is not None:
            self.session.on_drained(self)

    def _conflate(self, channel: bytes, frame: bytes, seq: int) -> None:
        entry = self._conflated.get(channel)
        if entry is None:
            self._conflated[channel] = [frame, 0, 0, 0, seq]
        else:
            if entry[4]:
                if not entry[2]:
                    entry[2] = entry[4]
                entry[3] = entry[4]
            entry[0] = frame
            entry[1] += 1
            entry[4] = seq

    def take_conflated(self) -> list[tuple[bytes, bytes, int, int, int]]:
        """[(channel, latest frame, skipped count, first skipped seq, last skipped seq)]
        in first-held order (seqs 0 for unsequenced trades); clears them."""
        held = [(k, v[0], v[1], v[2], v[3]) for k, v in self._conflated.items()]
        self._conflated.clear()
        return held

    def set_floor(self, channel: bytes, epoch: bytes, seq: int) -> None:
        """Skip live trades of ``channel`` in ``epoch`` up to ``seq`` (already sent)."""
        if self._floors is None:
            self._floors = {}
        self._floors[channel] = [epoch, seq]

    def _below_floor(self, channel: bytes, epoch: bytes, seq: int) -> bool:
        if not seq or self._floors is None:
            return False
        floor = self._floors.get(channel)
        if floor is None:
            return False
        if floor[0] == epoch and seq <= floor[1]:
            return True
        del self._floors[channel]
        if not self._floors:
            self._floors = None
        return False

    def take_held(self) -> list[tuple[bytes, int, bytes]]:
        """[(channel, seq, frame)] held while ``holding`` was set, in arrival order
        (seq 0 for unsequenced trades); clears them."""
        held, self._held = self._held, []
        return held

    def send_text(self, data: bytes) -> None:
        """Send one text message now (control replies)."""
        self.send_frame(encode_text_frame(data))

    def send_frame(self, frame: bytes) -> None:
        """Send one complete, already framed message now (after any trades
        still waiting in this client's batch: order is kept)."""
        self.flush_pending()
        t = self._transport
        if t is not None:
            if not (t.is_disconnected or t.is_close_frame_sent):
                t.underlying_transport.write(frame)
        elif self.sink is not None:
            self.sink(frame)

    @property
    def pending(self) -> int:
        """Bytes waiting in this client's batch buffer (tests)."""
        return len(self._out)

    def write_buffer_size(self) -> int:
        """Bytes the transport holds for this client, not yet taken by the kernel."""
        if self._transport is None:
            return 0
        return self._transport.underlying_transport.get_write_buffer_size()

    def flush_pending(self) -> None:
        """Write the frames waiting in this client's batch now (before the
        gateway closes the connection, with write coalescing on)."""
        if self._out:
            listed = self._in_batch
            self._flush(1 << 62)
            # Still in the fan-out's list for its coalesced write (see the compiled module).
            self._in_batch = listed

    def _flush(self, max_buffered: int) -> bool:
        # Write the batch in one go; True if now over ``max_buffered``.
        self._in_batch = False
        if not self._out:
            return False
        t = self._transport
        if t is not None:
            if not (t.is_disconnected or t.is_close_frame_sent):
                t.underlying_transport.write(bytes(self._out))
        elif self.sink is not None:
            self.sink(bytes(self._out))
        if len(self._out) > _OUT_KEEP:
            self._out = bytearray()
        else:
            self._out.clear()
        if self._paused and t is not None and not t.is_disconnected:
            return t.underlying_transport.get_write_buffer_size() > max_buffered
        return False


class SymbolTable:
    """symbol -> subscribed clients, keyed by the full channel name; see
    gateway._fastpath.SymbolTable."""

    __slots__ = ("_prefix", "_candle_prefix", "_channels", "_positions", "_subscription_count")

    prefix = property(attrgetter("_prefix"))
    candle_prefix = property(attrgetter("_candle_prefix"))
    subscription_count = property(attrgetter("_subscription_count"))

    def __init__(self, prefix: bytes = b"channel:trade:", candle_prefix: bytes = b"channel:candle:"):
        self._prefix = prefix
        self._candle_prefix = candle_prefix
        self._channels: dict[bytes, list[ClientListener]] = {}
        self._positions: dict[bytes, list] = {}     # see the compiled SymbolTable
        self._subscription_count = 0

    def channel_for(self, symbol: str) -> bytes:
        """The Redis channel of ``symbol``, or of candle stream "SYMBOL@interval"."""
        i = symbol.find("@")
        if i < 0:
            return self._prefix + symbol.encode("utf-8")
        return b"".join((self._candle_prefix, symbol[i + 1:].encode("utf-8"), b":",
                         symbol[:i].encode("utf-8")))

    def symbol_for(self, channel: bytes) -> str:
        """The inverse of channel_for: "AAPL", or "AAPL@1m" for a candle channel.
        ValueError for a channel under neither prefix."""
        cp = self._candle_prefix
        if cp and channel.startswith(cp):
            interval, sep, symbol = channel[len(cp):].partition(b":")
            if sep:
                return (symbol + b"@" + interval).decode("utf-8", "replace")
        if channel.startswith(self._prefix):
            return channel[len(self._prefix):].decode("utf-8", "replace")
        raise ValueError(f"not a channel of this table: {channel!r}")

    def subscribe(self, conn: ClientListener, symbol: str) -> bool:
        """Add ``symbol`` for ``conn``; False if it was already there."""
        if symbol in conn.symbols:
            return False
        self._channels.setdefault(self.channel_for(symbol), []).append(conn)
        conn.symbols.append(symbol)
        self._subscription_count += 1
        return True

    def unsubscribe(self, conn: ClientListener, symbol: str) -> bool:
        """Remove ``symbol`` for ``conn``; False if it was not there."""
        if symbol not in conn.symbols:
            return False
        conn.symbols.remove(symbol)
        key = self.channel_for(symbol)
        subs = self._channels[key]
        subs.remove(conn)
        if not subs:
            del self._channels[key]
            self._positions.pop(key, None)
        self._subscription_count -= 1
        return True

    def remove_connection(self, conn: ClientListener) -> int:
        """Drop every subscription of ``conn``; returns how many."""
        return sum(self.unsubscribe(conn, s) for s in list(conn.symbols))

    def subscribers(self, symbol: str) -> list[ClientListener]:
        """The clients holding ``symbol``, as a new list."""
        return list(self._channels.get(self.channel_for(symbol), ()))

    def lookup(self, channel: bytes) -> list[ClientListener] | None:
        """The live subscriber list for a channel, or None (the fan-out's lookup)."""
        return self._channels.get(channel)

    def symbols(self) -> list[str]:
        """Every symbol and candle stream ("AAPL@1m") with at least one subscriber, sorted."""
        return sorted(self.symbol_for(key) for key in self._channels)

    @property
    def symbol_count(self) -> int:
        return len(self._channels)

    def __len__(self) -> int:
        return len(self._channels)


def _is_pmessage(reply) -> bool:
    return type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage"


class FanOut:
    """Routes trade messages to subscribers and writes each client's batch;
    see gateway._fastpath.FanOut."""

    __slots__ = ("_table", "max_buffered", "slow_consumer_callback", "_touched",
                 "_latency_counts", "_latency_sum_ns", "_redis_messages", "_frames_sent",
                 "_bytes_sent", "_writes", "_dropped_payloads", "_unrouted_messages", "_batches",
                 "_dispatch_errors", "_conflated_messages", "_compressed_messages",
                 "_sequenced_messages", "_duplicate_messages", "_candle_messages", "_holds",
                 "gap_callback", "compression_min_size", "write_delay", "_flush_handle")

    # Read-only from outside, as in the compiled module.
    table = property(attrgetter("_table"))
    redis_messages = property(attrgetter("_redis_messages"))
    frames_sent = property(attrgetter("_frames_sent"))
    bytes_sent = property(attrgetter("_bytes_sent"))
    writes = property(attrgetter("_writes"))
    dropped_payloads = property(attrgetter("_dropped_payloads"))
    unrouted_messages = property(attrgetter("_unrouted_messages"))
    batches = property(attrgetter("_batches"))
    dispatch_errors = property(attrgetter("_dispatch_errors"))
    conflated_messages = property(attrgetter("_conflated_messages"))
    compressed_messages = property(attrgetter("_compressed_messages"))
    sequenced_messages = property(attrgetter("_sequenced_messages"))
    duplicate_messages = property(attrgetter("_duplicate_messages"))
    candle_messages = property(attrgetter("_candle_messages"))

    def __init__(self, table: SymbolTable, max_buffered: int = 1 << 20,
                 slow_consumer_callback: Callable[[ClientListener], Any] | None = None):
        self._table = table
        self.max_buffered = max_buffered
        self.slow_consumer_callback = slow_consumer_callback
        self._touched: list[ClientListener] = []
        self._latency_counts = [0] * (len(_BUCKET_NS) + 1)
        self._latency_sum_ns = 0
        self._redis_messages = self._frames_sent = self._bytes_sent = self._writes = 0
        self._dropped_payloads = self._unrouted_messages = self._batches = 0
        self._dispatch_errors = self._conflated_messages = self._compressed_messages = 0
        self._sequenced_messages = self._duplicate_messages = self._candle_messages = 0
        self._holds: dict[bytes, list[bytes]] = {}
        self.gap_callback: Callable[[bytes, str, int, int], Any] | None = None
        self.compression_min_size = 0
        self.write_delay = 0.0          # s a client's frames may wait to share a write (0: none)
        self._flush_handle: Any = None

    def dispatch(self, replies: list) -> None:
        """Route already-parsed Redis replies (pmessages; others are ignored)
        and flush: benchmarks and tests."""
        ts = str(time.time_ns() // 1_000_000).encode()
        try:
            for reply in replies:
                if _is_pmessage(reply):
                    self._route(reply[2], reply[3], ts)
        finally:
            self._flush()

    def position(self, channel: bytes) -> tuple[str, int] | None:
        """(epoch, last seq routed) of a sequenced channel with subscribers, or None."""
        pos = self._table._positions.get(channel)
        return None if pos is None else (pos[0].decode(), pos[1])

    def forget(self, channel: bytes) -> None:
        """Drop ``channel``'s position: its next sequenced trade starts it anew."""
        self._table._positions.pop(channel, None)

    def hold(self, channel: bytes) -> None:
        """Hold every message for ``channel`` (in order) until ``release``."""
        self._holds.setdefault(channel, [])

    def release(self, channel: bytes) -> list[bytes]:
        """Stop holding ``channel``; the payloads held, in arrival order."""
        return self._holds.pop(channel, [])

    def holding(self, channel: bytes) -> bool:
        return channel in self._holds

    def latency_histogram(self) -> tuple[list[float], list[int], float]:
        """(upper bounds in seconds, counts per bucket incl. +Inf, sum in seconds)."""
        return list(LATENCY_BUCKETS), list(self._latency_counts), self._latency_sum_ns / 1e9

    def _observe(self, elapsed_ns: int) -> None:
        b = 0
        while b < len(_BUCKET_NS) and elapsed_ns > _BUCKET_NS[b]:
            b += 1
        self._latency_counts[b] += 1
        self._latency_sum_ns += elapsed_ns

    def _route(self, channel, payload, ts: bytes) -> None:
        self._redis_messages += 1
        if type(payload) is not bytes or not is_json_object(payload):
            self._dropped_payloads += 1
            return
        if self._holds and channel in self._holds:
            self._holds[channel].append(payload)
            return
        subs = self._table.lookup(channel) if type(channel) is bytes else None
        if subs is None:
            self._unrouted_messages += 1
            return
        cp = self._table._candle_prefix
        if cp and channel.startswith(cp):
            self._route_candle(channel, payload, subs)
            return
        sequenced = split_published(payload)
        seq = 0
        epoch = b""
        if sequenced is not None:
            seq, epoch, data = sequenced
            self._sequenced_messages += 1
            pos = self._table._positions.get(channel)
            if pos is None:
                self._table._positions[channel] = [epoch, seq]
            elif pos[0] == epoch:
                if seq <= pos[1]:
                    self._duplicate_messages += 1
                    return
                if seq > pos[1] + 1 and self.gap_callback is not None:
                    self._holds[channel] = [payload]
                    self.gap_callback(channel, pos[0].decode(), pos[1], seq)
                    return
                pos[1] = seq
            elif self.gap_callback is not None:
                # A new epoch (see the compiled module): hold, let the
                # control plane announce it and deliver it from its start.
                self._holds[channel] = [payload]
                self.gap_callback(channel, pos[0].decode(), pos[1], 0)
                return
            else:
                pos[0], pos[1] = epoch, seq
            body = b"".join((TRADE_HEAD, data, _protocol.SEQ_MID, str(seq).encode(),
                             _protocol.EPOCH_MID, epoch, _protocol.EPOCH_END, ts, TRADE_TAIL))
        else:
            body = _trade_body(payload, ts)
        self._deliver(channel, subs, body, epoch, seq, seq)

    def _route_candle(self, channel: bytes, payload: bytes, subs: list[ClientListener]) -> None:
        # The candle service built the client message: it goes out verbatim
        # once "_n" is cut off, with no envelope and no position. Its n
        # orders it against a backfill (holds, floors); a conflating client
        # keeps the latest candle message with seq 0 (a plain gap notice).
        self._candle_messages += 1
        n, body = split_candle(payload)
        self._deliver(channel, subs, body, b"", n, 0)

    def _deliver(self, channel: bytes, subs: list[ClientListener], body: bytes, epoch: bytes,
                 seq: int, conflate_seq: int) -> None:
        # One message to every subscriber: skipped below its floor, held (by
        # seq) or conflated (by conflate_seq), or appended to its batch;
        # framed once, compressed once for the deflate clients.
        frame = encode_text_frame(body)
        zframe = None
        # A message shorter than compression_min_size goes plain to everyone.
        small = len(body) < self.compression_min_size
        held = skipped = 0
        for conn in subs:
            if conn._floors is not None and conn._below_floor(channel, epoch, seq):
                skipped += 1
                continue
            f = frame
            if conn.deflate and not small:
                if zframe is None:
                    zframe = self._deflate_frame(body)
                f = zframe
            if conn.holding:
                conn._held.append((channel, seq, f))
                held += 1
                continue
            if conn.conflating:
                conn._conflate(channel, f, conflate_seq)
                held += 1
                continue
            conn._out += f
            if not conn._in_batch:
                conn._in_batch = True
                self._touched.append(conn)
        self._frames_sent += len(subs) - held - skipped
        self._conflated_messages += held
        self._bytes_sent += (len(subs) - held - skipped) * len(frame)

    def _deflate_frame(self, body: bytes) -> bytes:
        self._compressed_messages += 1
        # compression.deflate_payload inside: what the compiled module calls.
        return compress_message(body)

    def _end_of_read(self) -> None:
        """After a Redis read: write every client's batch now, or with
        ``write_delay`` set, at most that much later (one timer for all)."""
        if self.write_delay <= 0 or not self._touched:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self.write_delay,
                                                                       self._timer_flush)

    def _timer_flush(self) -> None:
        self._flush_handle = None
        self._flush()

    def _flush(self) -> None:
        touched, self._touched = self._touched, []
        if not touched:
            return
        self._batches += 1
        slow = [conn for conn in touched if conn._flush(self.max_buffered)]
        self._writes += len(touched)
        if slow and self.slow_consumer_callback is not None:
            for conn in slow:
                self.slow_consumer_callback(conn)


class SubscriptionReader:
    """Parses the RESP stream of one Redis subscription connection; see
    gateway._fastpath.SubscriptionReader."""

    __slots__ = ("_fanout", "reply_callback", "_reader", "_messages")

    fanout = property(attrgetter("_fanout"))
    messages = property(attrgetter("_messages"))

    def __init__(self, fanout: FanOut, reply_callback: Callable[[Any], Any] | None = None):
        self._fanout = fanout
        self.reply_callback = reply_callback
        self._reader = hiredis.Reader()
        self._messages = 0

    def feed(self, data, nbytes: int = -1) -> None:
        """Parse ``data[:nbytes]`` (bytes-like; all of it by default), route, flush."""
        t0 = time.monotonic_ns()
        ts = str(time.time_ns() // 1_000_000).encode()
        reader = self._reader
        n = len(data) if nbytes < 0 else nbytes
        try:
            for off in range(0, n, FEED_CHUNK_SIZE):
                reader.feed(data, off, min(FEED_CHUNK_SIZE, n - off))
                while (reply := reader.gets()) is not False:
                    self._handle(reply, ts)
        finally:
            self._fanout._end_of_read()
            self._fanout._observe(time.monotonic_ns() - t0)

    def _handle(self, reply, ts: bytes) -> None:
        fanout = self._fanout
        try:
            if _is_pmessage(reply):
                self._messages += 1
                fanout._route(reply[2], reply[3], ts)
            elif self.reply_callback is not None:
                self.reply_callback(reply)
        except Exception:
            fanout._dispatch_errors += 1
            if fanout._dispatch_errors <= 10 or fanout._dispatch_errors % 10000 == 0:
                _log.exception("message dispatch failed (%d so far); continuing",
                               fanout._dispatch_errors)
