"""The pure-Python twin of gateway._fastpath.

Same classes, same functions, same behaviour, written plainly. It is the
oracle the tests hold the compiled module to, the baseline the micro
benchmarks compare against, and what runs with GATEWAY_NO_EXTENSIONS=1.
Change both together.
"""
from __future__ import annotations

import logging
import time
import zlib

import hiredis
import orjson
from picows import WSCloseCode, WSListener, WSMsgType

IS_COMPILED = False
_log = logging.getLogger("gateway.fastpath")

LATENCY_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                   25e-3, 50e-3, 100e-3)
_BUCKET_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)

_HEAD = b'{"type":"trade","data":'
_MID = b',"timestamp":'
FEED_CHUNK = 65536


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


def _header(n: int) -> bytes:
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big")
    return bytes((0x81, 127)) + n.to_bytes(8, "big")


def encode_text_frame(body: bytes) -> bytes:
    """A server-to-client text frame around ``body``."""
    return _header(len(body)) + body


def encode_trade_frame(payload: bytes, timestamp_ms: int) -> bytes:
    """The complete WebSocket frame that carries ``payload`` as a trade."""
    return encode_text_frame(b"".join((_HEAD, payload, _MID, str(timestamp_ms).encode(), b"}")))


class ClientListener(WSListener):
    """One WebSocket client; see gateway._fastpath.ClientListener."""

    def __init__(self, control=None, connection_id: str = "", max_symbols: int = 5, peer=None):
        self.control = control
        self.connection_id = connection_id
        self.max_symbols = max_symbols
        self.peer = peer
        self.user = None
        self.symbols: list[str] = []
        self.transport = None
        self.sink = None
        self.paused = False
        self.awaiting_pong = False
        self.conflating = False
        self.conflated: dict[bytes, list] = {}
        self.connected_at = 0.0
        self.tokens = 0.0
        self.tokens_at = 0.0
        self.strikes = 0
        self.out = bytearray()
        self.in_batch = False
        self.frag: bytearray | None = None
        self.frag_type = WSMsgType.TEXT
        self.frag_compressed = False
        self.deflate = False

    def on_ws_connected(self, transport):
        self.transport = transport
        if self.control is not None:
            self.control.on_connected(self)

    def on_ws_frame(self, transport, frame):
        t = frame.msg_type
        if transport.is_close_frame_sent:
            return
        if frame.rsv2 or frame.rsv3 or (frame.rsv1 and not (
                self.deflate and (t == WSMsgType.TEXT or t == WSMsgType.BINARY))):
            self._fail(1002, "unexpected reserved bits")
            return
        if t == WSMsgType.TEXT or t == WSMsgType.BINARY:
            if self.frag is not None:
                self._fail(1002, "new message inside a fragmented one")
                return
            if frame.fin:
                self.control.on_message(self, frame.get_payload_as_bytes(), t == WSMsgType.TEXT,
                                        bool(frame.rsv1))
            else:
                self.frag = bytearray(frame.get_payload_as_memoryview())
                self.frag_type = t
                self.frag_compressed = bool(frame.rsv1)
                self._check_frag_size()
        elif t == WSMsgType.CONTINUATION:
            if self.frag is None:
                self._fail(1002, "continuation without a message")
                return
            self.frag += frame.get_payload_as_memoryview()
            if not self._check_frag_size():
                return
            if frame.fin:
                data = bytes(self.frag)
                self.frag = None
                self.control.on_message(self, data, self.frag_type == WSMsgType.TEXT,
                                        self.frag_compressed)
        elif t == WSMsgType.PONG:
            self.awaiting_pong = False
        elif t == WSMsgType.CLOSE:
            code = frame.get_close_code() if frame.payload_size else 1000
            if code < 1000 or code in (1005, 1006, 1015):
                transport.send_close(WSCloseCode.PROTOCOL_ERROR, b"invalid close code")
            else:
                transport.send_close(WSCloseCode(code), frame.get_close_message())
            transport.disconnect()

    def _check_frag_size(self) -> bool:
        if len(self.frag) > self.control.max_message_size:
            self.frag = None
            self._fail(1009, "message too big")
            return False
        return True

    def fail(self, code: int, reason: str) -> None:
        self._fail(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        self.frag = None
        self.transport.send_close(WSCloseCode(code), reason.encode())
        self.transport.disconnect()

    def on_ws_disconnected(self, transport):
        self.conflating = False
        self.conflated.clear()
        self.out = bytearray()
        if self.control is not None:
            self.control.on_disconnected(self)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.conflating and self.control is not None:
            self.control.on_drained(self)

    def conflate(self, channel: bytes, frame: bytes) -> None:
        entry = self.conflated.get(channel)
        if entry is None:
            self.conflated[channel] = [frame, 0]
        else:
            entry[0] = frame
            entry[1] += 1

    def take_conflated(self) -> list[tuple[bytes, bytes, int]]:
        held = [(k, v[0], v[1]) for k, v in self.conflated.items()]
        self.conflated.clear()
        return held

    def send_text(self, data: bytes) -> None:
        """Send one text message now (control replies)."""
        self.send_frame(encode_text_frame(data))

    def send_frame(self, frame: bytes) -> None:
        """Send one complete, already framed message now."""
        t = self.transport
        if t is not None:
            if not (t.is_disconnected or t.is_close_frame_sent):
                t.underlying_transport.write(frame)
        elif self.sink is not None:
            self.sink(frame)

    @property
    def pending(self) -> int:
        return len(self.out)

    def write_buffer_size(self) -> int:
        if self.transport is None:
            return 0
        return self.transport.underlying_transport.get_write_buffer_size()

    def flush(self, max_buffered: int) -> bool:
        """Write the batch in one go; True if now over ``max_buffered``."""
        self.in_batch = False
        if not self.out:
            return False
        t = self.transport
        if t is not None:
            if not (t.is_disconnected or t.is_close_frame_sent):
                t.underlying_transport.write(bytes(self.out))
        elif self.sink is not None:
            self.sink(bytes(self.out))
        self.out = bytearray()
        if self.paused and t is not None and not t.is_disconnected:
            return t.underlying_transport.get_write_buffer_size() > max_buffered
        return False


class SymbolTable:
    """symbol -> subscribed clients, keyed by the full channel name."""

    def __init__(self, prefix: bytes = b"channel:trade:"):
        self.prefix = prefix
        self.channels: dict[bytes, list[ClientListener]] = {}
        self.subscription_count = 0

    def channel_for(self, symbol: str) -> bytes:
        return self.prefix + symbol.encode("utf-8")

    def subscribe(self, conn, symbol: str) -> bool:
        if symbol in conn.symbols:
            return False
        self.channels.setdefault(self.channel_for(symbol), []).append(conn)
        conn.symbols.append(symbol)
        self.subscription_count += 1
        return True

    def unsubscribe(self, conn, symbol: str) -> bool:
        if symbol not in conn.symbols:
            return False
        conn.symbols.remove(symbol)
        key = self.channel_for(symbol)
        subs = self.channels[key]
        subs.remove(conn)
        if not subs:
            del self.channels[key]
        self.subscription_count -= 1
        return True

    def remove_connection(self, conn) -> int:
        return sum(self.unsubscribe(conn, s) for s in list(conn.symbols))

    def subscribers(self, symbol: str) -> list:
        return list(self.channels.get(self.channel_for(symbol), ()))

    def lookup(self, channel: bytes) -> list | None:
        """The live subscriber list for a channel, or None (the dispatcher's lookup)."""
        return self.channels.get(channel)

    def symbols(self) -> list[str]:
        k = len(self.prefix)
        return sorted(key[k:].decode() for key in self.channels)

    @property
    def symbol_count(self) -> int:
        return len(self.channels)

    def __len__(self) -> int:
        return len(self.channels)


def _is_pmessage(reply) -> bool:
    return type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage"


class Dispatcher:
    """Parses the Redis subscription stream and fans trades out; see gateway._fastpath."""

    def __init__(self, table: SymbolTable, reply_callback=None, max_buffered: int = 1 << 20,
                 slow_consumer_callback=None):
        self.table = table
        self.reply_callback = reply_callback
        self.max_buffered = max_buffered
        self.slow_consumer_callback = slow_consumer_callback
        self.touched: list[ClientListener] = []
        self.reader = hiredis.Reader()
        self.redis_messages = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.writes = 0
        self.dropped_payloads = 0
        self.unrouted_messages = 0
        self.batches = 0
        self.dispatch_errors = 0
        self.conflated_messages = 0
        self.compressed_messages = 0
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.latency_counts = [0] * (len(_BUCKET_NS) + 1)
        self.latency_sum_ns = 0

    def reset(self) -> None:
        self.reader = hiredis.Reader()

    def feed(self, data, nbytes: int = -1) -> None:
        t0 = time.monotonic_ns()
        ts = str(time.time_ns() // 1_000_000).encode()
        reader = self.reader
        n = len(data) if nbytes < 0 else nbytes
        try:
            for off in range(0, n, FEED_CHUNK):
                reader.feed(data, off, min(FEED_CHUNK, n - off))
                while (reply := reader.gets()) is not False:
                    self._handle(reply, ts)
        finally:
            self._flush()
            self._observe(time.monotonic_ns() - t0)

    def _observe(self, elapsed_ns: int) -> None:
        b = 0
        while b < len(_BUCKET_NS) and elapsed_ns > _BUCKET_NS[b]:
            b += 1
        self.latency_counts[b] += 1
        self.latency_sum_ns += elapsed_ns

    def latency_histogram(self):
        """(upper bounds in seconds, counts per bucket incl. +Inf, sum in seconds)."""
        return list(LATENCY_BUCKETS), list(self.latency_counts), self.latency_sum_ns / 1e9

    def dispatch(self, replies: list) -> None:
        ts = str(time.time_ns() // 1_000_000).encode()
        try:
            for reply in replies:
                self._handle(reply, ts)
        finally:
            self._flush()

    def _handle(self, reply, ts: bytes) -> None:
        try:
            if _is_pmessage(reply):
                self._route(reply[2], reply[3], ts)
            elif self.reply_callback is not None:
                self.reply_callback(reply)
        except Exception:
            self.dispatch_errors += 1
            if self.dispatch_errors <= 10 or self.dispatch_errors % 10000 == 0:
                _log.exception("message dispatch failed (%d so far); continuing",
                               self.dispatch_errors)

    def _route(self, channel, payload, ts: bytes) -> None:
        self.redis_messages += 1
        if type(payload) is not bytes or not is_json_object(payload):
            self.dropped_payloads += 1
            return
        subs = self.table.channels.get(channel) if type(channel) is bytes else None
        if subs is None:
            self.unrouted_messages += 1
            return
        body = b"".join((_HEAD, payload, _MID, ts, b"}"))
        frame = encode_text_frame(body)
        zframe = None
        held = 0
        for conn in subs:
            f = frame
            if conn.deflate:
                if zframe is None:
                    zframe = self._deflate_frame(body)
                f = zframe
            if conn.conflating:
                conn.conflate(channel, f)
                held += 1
                continue
            conn.out += f
            if not conn.in_batch:
                conn.in_batch = True
                self.touched.append(conn)
        self.frames_sent += len(subs) - held
        self.conflated_messages += held
        self.bytes_sent += (len(subs) - held) * len(frame)

    def _deflate_frame(self, body: bytes) -> bytes:
        z = self.compressor.compress(body) + self.compressor.flush(zlib.Z_FULL_FLUSH)
        z = z[:-4]  # RFC 7692 7.2.1: drop the trailing 00 00 ff ff
        self.compressed_messages += 1
        return bytes((0xC1,)) + _header(len(z))[1:] + z

    def _flush(self) -> None:
        touched, self.touched = self.touched, []
        if not touched:
            return
        self.batches += 1
        slow = [conn for conn in touched if conn.flush(self.max_buffered)]
        self.writes += len(touched)
        if slow and self.slow_consumer_callback is not None:
            for conn in slow:
                self.slow_consumer_callback(conn)
