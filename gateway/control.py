"""Client control messages: subscribe, unsubscribe, ping.

``ControlHandler.handle(conn, data, is_text, max_symbols)`` takes one client
message and returns the reply bytes; it never raises on client input. It
needs no socket: ``conn`` is any ClientListener (compiled or twin), the
symbol table does the bookkeeping, and gateway.protocol parses the request
and spells the reply.
"""
from __future__ import annotations

from collections.abc import Callable

from . import protocol
from .protocol import ClientError


class ControlHandler:
    """Answers control messages and keeps the symbol table in step."""

    def __init__(self, table, clock: Callable[[], int] = protocol.now_ms):
        self.table = table
        self.clock = clock
        self.errors: dict[str, int] = {}

    def handle(self, conn, data: bytes, is_text: bool = True, max_symbols: int = 5) -> bytes:
        ts = self.clock()
        try:
            request = protocol.parse_request(data, is_text)
            if request.action == "ping":
                return protocol.pong(ts)
            if request.action == "subscribe":
                return self._subscribe(conn, request.symbols, max_symbols, ts)
            return self._unsubscribe(conn, request.symbols, ts)
        except ClientError as exc:
            self.count_error(exc.kind)
            return protocol.error(str(exc), ts)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def _subscribe(self, conn, symbols: tuple[str, ...], max_symbols: int, ts: int) -> bytes:
        current = conn.symbols
        new = [s for s in symbols if s not in current]
        if len(current) + len(new) > max_symbols:
            # All or nothing: a refused request changes no subscription.
            raise protocol.symbol_limit_error(max_symbols)
        for s in new:
            self.table.subscribe(conn, s)
        return protocol.subscribed(new, list(conn.symbols), ts)

    def _unsubscribe(self, conn, symbols: tuple[str, ...], ts: int) -> bytes:
        removed = [s for s in symbols if self.table.unsubscribe(conn, s)]
        return protocol.unsubscribed(removed, list(conn.symbols), ts)
