"""The wire protocol: every message the gateway sends or accepts, in one place.

Client requests are parsed here (``parse_request``), every reply, notice and
error is built here, and so are the JSON bodies of the plain HTTP answers
(refusals, health). The fast path's trade envelope is written out of the
byte constants below (``TRADE_HEAD``, ``TRADE_MID``, ``TRADE_TAIL``), so the
compiled module, its twin and anything else that frames trades agree on one
spelling. Candle streams (``SYMBOL@interval``) are named and their
published form is cut apart here too (``CANDLE_N``, ``split_candle``).
Nothing here touches a socket: bytes or dicts in, bytes or dicts out.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

# --- trades ----------------------------------------------------------------
# A trade frame's body is TRADE_HEAD + <payload as published> + TRADE_MID +
# <milliseconds> + TRADE_TAIL, byte for byte: the payload is never re-encoded.
TRADE_HEAD = b'{"type":"trade","data":'
TRADE_MID = b',"timestamp":'
TRADE_TAIL = b"}"


# A sequenced trade (published through the publish_trade Redis Function,
# gateway/trades.lua) carries its position after the data:
# TRADE_HEAD + data + SEQ_MID + seq + EPOCH_MID + epoch + EPOCH_END + ms + TRADE_TAIL.
SEQ_MID = b',"seq":'
EPOCH_MID = b',"epoch":"'
EPOCH_END = b'","timestamp":'
# On Redis, the function publishes PUBLISHED_SEQ + seq + PUBLISHED_EPOCH + epoch + '"'
# followed by ',' + the rest of the trade object (or '}' for an empty one), so
# plain subscribers still get one JSON object and the gateway can cut the
# position off without parsing JSON.
PUBLISHED_SEQ = b'{"_seq":'
PUBLISHED_EPOCH = b',"_epoch":"'
MAX_EPOCH_LEN = 32


def trade_body(payload: bytes, timestamp_ms: int) -> bytes:
    """The text of a trade message around ``payload`` (a JSON object, as published)."""
    return b"".join((TRADE_HEAD, payload, TRADE_MID, str(timestamp_ms).encode(), TRADE_TAIL))


def sequenced_trade_body(data: bytes, seq: int, epoch: bytes, timestamp_ms: int) -> bytes:
    """The text of a sequenced trade message: ``data`` is the trade object as published."""
    return b"".join((TRADE_HEAD, data, SEQ_MID, str(seq).encode(), EPOCH_MID, epoch, EPOCH_END,
                     str(timestamp_ms).encode(), TRADE_TAIL))


def published_form(data: bytes, seq: int, epoch: bytes) -> bytes:
    """What publish_trade puts on the channel for trade object ``data`` (trimmed)."""
    head = b"".join((PUBLISHED_SEQ, str(seq).encode(), PUBLISHED_EPOCH, epoch, b'"'))
    inner = data[1:]
    return head + (b"}" if inner.strip() == b"}" else b"," + inner)


def split_published(payload: bytes) -> tuple[int, bytes, bytes] | None:
    """(seq, epoch, data) of a sequenced message, or None for a plain one.
    The reference the fast paths are tested against."""
    if not payload.startswith(PUBLISHED_SEQ):
        return None
    i = len(PUBLISHED_SEQ)
    j = i
    while j < len(payload) and 0x30 <= payload[j] <= 0x39:
        j += 1
    digits = payload[i:j]
    if not 1 <= len(digits) <= 18 or (digits[0] == 0x30) or not payload.startswith(PUBLISHED_EPOCH, j):
        return None
    k = j + len(PUBLISHED_EPOCH)
    end = payload.find(b'"', k)
    epoch = payload[k:end] if end > 0 else b""
    if not 1 <= len(epoch) <= MAX_EPOCH_LEN or not all(
            c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-" for c in epoch):
        return None
    rest = payload[end + 1:]
    if rest[:1] == b",":
        return int(digits), epoch, b"{" + rest[1:]
    if rest[:1] == b"}":
        return int(digits), epoch, b"{}"
    return None


# --- candles -------------------------------------------------------------------
# A candle message reaches clients exactly as the candle service built it:
# {"type":"candle","data":{"symbol":..,"interval":..,"start":..,...,"state":..},"timestamp":..}.
# On Redis it travels on <candle prefix><interval>:<SYMBOL> as CANDLE_N + n + ','
# + the client message without its leading '{', n being the stream's message
# counter (1-18 digits, no leading zero). The gateway cuts CANDLE_N + n + ','
# off (keeping the '{') and forwards the rest byte for byte; a payload on a
# candle channel without that head is forwarded whole, with n = 0.
CANDLE_N = b'{"_n":'
MAX_CANDLE_N_DIGITS = 18
STREAM_SEP = "@"


def candle_published_form(body: bytes, n: int) -> bytes:
    """What the candle service puts on the channel for client message ``body`` (a JSON
    object that is not empty) as message ``n`` of its stream."""
    return CANDLE_N + str(n).encode() + b"," + body[1:]


def split_candle(payload: bytes) -> tuple[int, bytes]:
    """(n, client message) of a payload on a candle channel; (0, payload) when it
    does not start with CANDLE_N + digits + ','. The reference the fast paths are
    tested against."""
    if not payload.startswith(CANDLE_N):
        return 0, payload
    i = j = len(CANDLE_N)
    while j < len(payload) and 0x30 <= payload[j] <= 0x39:
        j += 1
    digits = payload[i:j]
    if (not 1 <= len(digits) <= MAX_CANDLE_N_DIGITS or digits[0] == 0x30
            or payload[j:j + 1] != b","):
        return 0, payload
    return int(digits), b"{" + payload[j + 1:]


def stream_name(symbol: str, interval: str) -> str:
    """The client's name of a candle stream: "AAPL@1m"."""
    return f"{symbol}{STREAM_SEP}{interval}"


def split_stream(name: str) -> tuple[str, str | None]:
    """(symbol, interval) of a subscription name; interval None for a trade symbol."""
    symbol, sep, interval = name.partition(STREAM_SEP)
    return (symbol, interval) if sep else (name, None)


def is_candle_stream(name: str) -> bool:
    return STREAM_SEP in name


# --- client requests -------------------------------------------------------
SYMBOL_RE = re.compile(r"[A-Za-z0-9.\-]{1,16}")
SYMBOL_RULE = "1-16 characters of A-Z, 0-9, '.', '-'"
ACTIONS = ("subscribe", "unsubscribe", "ping")


class ClientError(Exception):
    """Bad client input; the text goes back to the client. ``kind`` labels the error count."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client's stream of one symbol stopped: the last (epoch, seq) it got."""
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed client request. ``symbols`` is upper-cased, de-duplicated,
    in the client's order, and empty for ``ping``; a candle stream is there
    as "SYMBOL@interval" (symbol upper-cased, interval as configured).
    ``since`` (symbol -> Position) and ``snapshot`` are the optional members
    of ``subscribe``."""
    action: str
    symbols: tuple[str, ...] = ()
    since: tuple[tuple[str, Position], ...] = ()
    snapshot: bool = False


def parse_request(data: bytes, is_text: bool = True, intervals: tuple[str, ...] = ()) -> Request:
    """Parse one client message; raises ClientError with the reply text.
    ``intervals`` are the candle intervals clients may name as
    "SYMBOL@interval" (Config.candle_intervals; empty: candles are off)."""
    if not is_text:
        raise ClientError("Binary messages are not supported: send JSON text", "binary_frame")
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"Invalid JSON: {exc}", "invalid_json") from None
    if not isinstance(msg, dict):
        raise ClientError("Invalid message: expected a JSON object", "not_object")
    if "action" not in msg:
        raise ClientError('Invalid message: missing "action"', "missing_action")
    action = msg["action"]
    if action not in ACTIONS:
        raise ClientError(
            f"Unknown action {_show(action)}: expected subscribe, unsubscribe or ping",
            "unknown_action")
    if action == "ping":
        return Request("ping")
    symbols = _symbols(msg, action, intervals)
    if action != "subscribe":
        return Request(action, symbols)
    return Request(action, symbols, _since(msg, symbols), _snapshot(msg))


SINCE_FORM = '{"SYMBOL": {"epoch": "<epoch>", "seq": <last seq received>}}'


def _since(msg: dict, symbols: tuple[str, ...]) -> tuple[tuple[str, Position], ...]:
    if "since" not in msg:
        return ()
    raw = msg["since"]
    if not isinstance(raw, dict):
        raise ClientError(f'Invalid "since": expected an object like {SINCE_FORM}', "invalid_since")
    out: list[tuple[str, Position]] = []
    for key, value in raw.items():
        if STREAM_SEP in key:
            raise ClientError(f'Invalid "since": {_show(key)} is a candle stream; "since" applies '
                              'to trade symbols only', "invalid_since")
        symbol = key.upper() if SYMBOL_RE.fullmatch(key) else None
        if symbol is None or symbol not in symbols:
            raise ClientError(f'Invalid "since": {_show(key)} is not a symbol of this request',
                              "invalid_since")
        if not isinstance(value, dict):
            raise ClientError(f'Invalid "since" for {symbol}: expected {{"epoch": ..., "seq": ...}}',
                              "invalid_since")
        epoch = value.get("epoch")
        if not isinstance(epoch, str) or not epoch or len(epoch) > MAX_EPOCH_LEN:
            raise ClientError(f'Invalid "since" for {symbol}: "epoch" must be a non-empty string '
                              f'of at most {MAX_EPOCH_LEN} characters', "invalid_since")
        seq = value.get("seq")
        if type(seq) is not int or seq < 0:
            raise ClientError(f'Invalid "since" for {symbol}: "seq" must be a non-negative integer',
                              "invalid_since")
        out.append((sys.intern(symbol), Position(epoch, seq)))
    return tuple(out)


def _snapshot(msg: dict) -> bool:
    value = msg.get("snapshot", False)
    if type(value) is not bool:
        raise ClientError('Invalid "snapshot": expected true or false', "invalid_snapshot")
    return value


def request(action: str, symbols: list[str] | tuple[str, ...] = ()) -> bytes:
    """A client request as a client sends it (client libraries, tools, tests)."""
    if action == "ping":
        return encode({"action": "ping"})
    return encode({"action": action, "symbols": list(symbols)})


def _symbols(msg: dict, action: str, intervals: tuple[str, ...]) -> tuple[str, ...]:
    if "symbols" not in msg:
        raise ClientError(f'Invalid message: "symbols" is required for {action}', "invalid_symbols")
    raw = msg["symbols"]
    if not isinstance(raw, list) or not raw:
        raise ClientError('Invalid message: "symbols" must be a non-empty array of strings',
                          "invalid_symbols")
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str):
            raise ClientError(
                f'Invalid message: "symbols" must be an array of strings, found {_show(item)}',
                "invalid_symbols")
        if STREAM_SEP in item:
            symbol = _candle_stream(item, intervals)
        # ASCII only, so upper-casing cannot turn a foreign letter into A-Z.
        elif not SYMBOL_RE.fullmatch(item):
            raise ClientError(f"Invalid symbol {_show(item)}: must be {SYMBOL_RULE}",
                              "invalid_symbols")
        else:
            # Interned: thousands of connections share one string per symbol.
            symbol = sys.intern(item.upper())
        if symbol not in out:
            out.append(symbol)
    return tuple(out)


def _candle_stream(item: str, intervals: tuple[str, ...]) -> str:
    """"aapl@1m" -> "AAPL@1m" (interned), or ClientError naming what is wrong."""
    symbol, _, interval = item.partition(STREAM_SEP)
    if not intervals:
        raise ClientError(f"Invalid symbol {_show(item)}: candle streams are not enabled on this "
                          "server", "invalid_symbols")
    if not SYMBOL_RE.fullmatch(symbol):
        raise ClientError(f"Invalid symbol {_show(symbol)} in {_show(item)}: must be {SYMBOL_RULE}",
                          "invalid_symbols")
    if interval not in intervals:
        raise ClientError(f"Invalid candle interval {_show(interval)} in {_show(item)}: must be "
                          f"one of {', '.join(intervals)}", "invalid_symbols")
    return sys.intern(stream_name(symbol.upper(), interval))


def _show(value: Any) -> str:
    # Quote what the client sent, bounded so a huge value cannot bloat the reply.
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # nested deeper than orjson writes (it reads deeper)
        return "<deeply nested value>"
    return text if len(text) <= 40 else text[:37] + "..."


# --- server messages -------------------------------------------------------
def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def welcome(connection_id: str, server_id: str, max_symbols: int, user_id: str | None,
            timestamp: int) -> bytes:
    data: dict[str, Any] = {
        "connectionId": connection_id,
        "serverId": server_id,
        "maxSymbolsPerConnection": max_symbols,
    }
    if user_id is not None:
        data["userId"] = user_id
    return encode({"type": "success", "message": "Connected to WebSocket Gateway", "data": data,
                   "timestamp": timestamp})


def subscribed(new: list[str], current: list[str], timestamp: int) -> bytes:
    return encode({
        "type": "success",
        "message": f"Successfully subscribed to {len(new)} symbol(s)",
        "data": {"subscribed": new, "currentSubscriptions": current},
        "timestamp": timestamp,
    })


def unsubscribed(removed: list[str], current: list[str], timestamp: int) -> bytes:
    return encode({
        "type": "success",
        "message": f"Successfully unsubscribed from {len(removed)} symbol(s)",
        "data": {"unsubscribed": removed, "currentSubscriptions": current},
        "timestamp": timestamp,
    })


def pong(timestamp: int) -> bytes:
    return encode({"type": "pong", "timestamp": timestamp})


def error(message: str, timestamp: int) -> bytes:
    return encode({"type": "error", "message": message, "timestamp": timestamp})


def symbol_limit_error(max_symbols: int) -> ClientError:
    return ClientError(
        f"Cannot subscribe: would exceed maximum of {max_symbols} symbols per connection",
        "symbol_limit")


def rate_limited(rate: float, burst: int, timestamp: int) -> bytes:
    return error(f"Rate limit exceeded: at most {rate:g} messages per second "
                 f"(burst {burst}); message ignored", timestamp)


def gap(symbol: str, skipped: int, timestamp: int, *, epoch: str | None = None,
        from_seq: int = 0, to_seq: int = 0) -> bytes:
    """Sent to a conflating client before the latest trade (or candle: ``symbol``
    is then "AAPL@1m") it was held back on; ``from``/``to`` name the skipped
    seqs when the trades were sequenced."""
    data: dict[str, Any] = {"symbol": symbol, "skipped": skipped}
    if from_seq:
        data.update(epoch=epoch, **{"from": from_seq, "to": to_seq}, reason="slow_consumer")
    return encode({"type": "gap", "data": data, "timestamp": timestamp})


GAP_TRIMMED = "trimmed"                 # the history no longer holds them
GAP_EPOCH_CHANGED = "epoch_changed"     # the history was started anew
GAP_UNAVAILABLE = "unavailable"         # the history could not be read


def history_gap(symbol: str, epoch: str | None, from_seq: int, to_seq: int, reason: str,
                timestamp: int) -> bytes:
    """Trades ``from_seq``..``to_seq`` of ``epoch`` cannot be delivered."""
    return encode({"type": "gap", "data": {"symbol": symbol, "epoch": epoch, "from": from_seq,
                                           "to": to_seq, "reason": reason},
                   "timestamp": timestamp})


def backfill_unavailable(stream: str, timestamp: int) -> bytes:
    """The candles of ``stream`` before the live ones could not be read (Redis
    down or refusing): the client gets the live stream only."""
    return encode({"type": "gap", "data": {"symbol": stream, "reason": GAP_UNAVAILABLE},
                   "timestamp": timestamp})


# --- close frames ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: bytes


SHUTTING_DOWN = Close(1001, b"server shutting down")
HEARTBEAT_TIMEOUT = Close(1001, b"heartbeat timeout")
SLOW_CONSUMER = Close(1008, b"slow consumer")
TOKEN_EXPIRED = Close(1008, b"token expired")
RATE_EXCEEDED = Close(1008, b"message rate exceeded")
MESSAGE_TOO_BIG = Close(1009, b"message too big")
BAD_COMPRESSION = Close(1007, b"invalid compressed data")


# --- plain HTTP answers on the WebSocket port --------------------------------
def refusal_body(message: str) -> dict[str, Any]:
    """The JSON body of a refused upgrade (401, 403, 429)."""
    return {"type": "error", "message": message}


def health_body(server_id: str) -> dict[str, Any]:
    return {"status": "ok", "serverId": server_id}


def ready_body(reason: str | None) -> dict[str, Any]:
    """/readyz: ``reason`` is None when ready."""
    if reason is None:
        return {"status": "ready"}
    return {"status": "not ready", "reason": reason}
