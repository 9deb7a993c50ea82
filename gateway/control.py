"""Client control messages: subscribe, unsubscribe, ping.

``ControlHandler.handle(conn, data, is_text)`` takes one client message and
returns the reply bytes; it never raises on client input. It needs no socket:
``conn`` is any ClientListener (compiled or twin), and the symbol table does
the bookkeeping.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Any, Callable

import orjson

SYMBOL_RE = re.compile(r"[A-Za-z0-9.\-]{1,16}")
SYMBOL_RULE = "1-16 characters of A-Z, 0-9, '.', '-'"
ACTIONS = ("subscribe", "unsubscribe", "ping")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def error_reply(message: str, timestamp: int) -> bytes:
    return encode({"type": "error", "message": message, "timestamp": timestamp})


class ClientError(Exception):
    """Bad client input; the text goes back to the client. ``kind`` labels the error count."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _show(value: Any) -> str:
    # Quote what the client sent, bounded so a huge value cannot bloat the reply.
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # nested deeper than orjson writes (it reads deeper)
        return "<deeply nested value>"
    return text if len(text) <= 40 else text[:37] + "..."


class ControlHandler:
    """Answers control messages and keeps the symbol table in step."""

    def __init__(self, table, clock: Callable[[], int] = now_ms):
        self.table = table
        self.clock = clock
        self.errors: dict[str, int] = {}

    def handle(self, conn, data: bytes, is_text: bool = True) -> bytes:
        ts = self.clock()
        try:
            if not is_text:
                raise ClientError("Binary messages are not supported: send JSON text", "binary_frame")
            msg = self._parse(data)
            action = msg["action"]
            if action == "ping":
                return encode({"type": "pong", "timestamp": ts})
            symbols = self._symbols(msg, action)
            if action == "subscribe":
                return self._subscribe(conn, symbols, ts)
            return self._unsubscribe(conn, symbols, ts)
        except ClientError as exc:
            self.count_error(exc.kind)
            return error_reply(str(exc), ts)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @staticmethod
    def _parse(data: bytes) -> dict:
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
        return msg

    @staticmethod
    def _symbols(msg: dict, action: str) -> list[str]:
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
        return out

    def _subscribe(self, conn, symbols: list[str], ts: int) -> bytes:
        current = conn.symbols
        new = [s for s in symbols if s not in current]
        if len(current) + len(new) > conn.max_symbols:
            raise ClientError(
                f"Cannot subscribe: would exceed maximum of {conn.max_symbols} symbols per connection",
                "symbol_limit")
        for s in new:
            self.table.subscribe(conn, s)
        return encode({
            "type": "success",
            "message": f"Successfully subscribed to {len(new)} symbol(s)",
            "data": {"subscribed": new, "currentSubscriptions": list(conn.symbols)},
            "timestamp": ts,
        })

    def _unsubscribe(self, conn, symbols: list[str], ts: int) -> bytes:
        removed = [s for s in symbols if self.table.unsubscribe(conn, s)]
        return encode({
            "type": "success",
            "message": f"Successfully unsubscribed from {len(removed)} symbol(s)",
            "data": {"unsubscribed": removed, "currentSubscriptions": list(conn.symbols)},
            "timestamp": ts,
        })
