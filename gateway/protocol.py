"""The wire protocol: every message the gateway sends or accepts, in one place.

Client requests are parsed here (``parse_request``), every reply, notice and
error is built here, and so are the JSON bodies of the plain HTTP answers
(refusals, health). The fast path's trade envelope is written out of the
byte constants below (``TRADE_HEAD``, ``TRADE_MID``, ``TRADE_TAIL``), so the
compiled module, its twin and anything else that frames trades agree on one
spelling. Nothing here touches a socket: bytes or dicts in, bytes or dicts out.
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


def trade_body(payload: bytes, timestamp_ms: int) -> bytes:
    """The text of a trade message around ``payload`` (a JSON object, as published)."""
    return b"".join((TRADE_HEAD, payload, TRADE_MID, str(timestamp_ms).encode(), TRADE_TAIL))


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
class Request:
    """One parsed client request. ``symbols`` is upper-cased, de-duplicated,
    in the client's order, and empty for ``ping``."""
    action: str
    symbols: tuple[str, ...] = ()


def parse_request(data: bytes, is_text: bool = True) -> Request:
    """Parse one client message; raises ClientError with the reply text."""
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
    return Request(action, _symbols(msg, action))


def request(action: str, symbols: list[str] | tuple[str, ...] = ()) -> bytes:
    """A client request as a client sends it (client libraries, tools, tests)."""
    if action == "ping":
        return encode({"action": "ping"})
    return encode({"action": action, "symbols": list(symbols)})


def _symbols(msg: dict, action: str) -> tuple[str, ...]:
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
        # ASCII only, so upper-casing cannot turn a foreign letter into A-Z.
        if not SYMBOL_RE.fullmatch(item):
            raise ClientError(f"Invalid symbol {_show(item)}: must be {SYMBOL_RULE}",
                              "invalid_symbols")
        # Interned: thousands of connections share one string per symbol.
        symbol = sys.intern(item.upper())
        if symbol not in out:
            out.append(symbol)
    return tuple(out)


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


def gap(symbol: str, skipped: int, timestamp: int) -> bytes:
    """Sent to a conflating client before the latest trade it was held back on."""
    return encode({"type": "gap", "data": {"symbol": symbol, "skipped": skipped},
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
