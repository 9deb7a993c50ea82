"""Client control messages: subscribe, unsubscribe, ping.

``ControlHandler.handle(conn, data, is_text, max_symbols)`` takes one client
message and returns the reply bytes; it never raises on client input. It
needs no socket: ``conn`` is any ClientListener (compiled or twin), the
symbol table does the bookkeeping, and gateway.protocol parses the request
and spells the reply. A candle stream ("AAPL@1m", one of ``intervals``) is
subscribed like a symbol and counts against the same limit.
"""
from __future__ import annotations

from collections.abc import Callable

from . import protocol
from .protocol import ClientError, Position

# What a subscribe asks to be put in front of the live stream, per newly
# subscribed symbol: trades after a Position, or the latest one (None); for
# every newly subscribed candle stream ("AAPL@1m", None): its backfill.
Resume = list[tuple[str, Position | None]]


class ControlHandler:
    """Answers control messages and keeps the symbol table in step."""

    def __init__(self, table, clock: Callable[[], int] = protocol.now_ms,
                 intervals: tuple[str, ...] = ()):
        self.table = table
        self.clock = clock
        self.intervals = intervals      # candle intervals clients may name (Config.candle_intervals)
        self.errors: dict[str, int] = {}

    def handle(self, conn, data: bytes, is_text: bool = True, max_symbols: int = 5) -> bytes:
        return self.process(conn, data, is_text, max_symbols)[0]

    def process(self, conn, data: bytes, is_text: bool = True, max_symbols: int = 5
                ) -> tuple[bytes, Resume]:
        """The reply, and for a subscribe what to replay before the live stream
        of each newly subscribed symbol (symbols already held replay nothing):
        trades for ``since`` and ``snapshot``, and every new candle stream's
        backfill."""
        ts = self.clock()
        try:
            request = protocol.parse_request(data, is_text, self.intervals)
            if request.action == "ping":
                return protocol.pong(ts), []
            if request.action == "subscribe":
                new = self._new_symbols(conn, request.symbols, max_symbols)
                reply = self._subscribe(conn, new, ts)
                since = dict(request.since)
                resume: Resume = [(s, since[s]) for s in new if s in since]
                if request.snapshot:
                    resume += [(s, None) for s in new
                               if s not in since and not protocol.is_candle_stream(s)]
                resume += [(s, None) for s in new if protocol.is_candle_stream(s)]
                return reply, resume
            return self._unsubscribe(conn, request.symbols, ts), []
        except ClientError as exc:
            self.count_error(exc.kind)
            return protocol.error(str(exc), ts), []

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @staticmethod
    def _new_symbols(conn, symbols: tuple[str, ...], max_symbols: int) -> list[str]:
        current = conn.symbols
        new = [s for s in symbols if s not in current]
        if len(current) + len(new) > max_symbols:
            # All or nothing: a refused request changes no subscription.
            raise protocol.symbol_limit_error(max_symbols)
        return new

    def _subscribe(self, conn, new: list[str], ts: int) -> bytes:
        for s in new:
            self.table.subscribe(conn, s)
        return protocol.subscribed(new, list(conn.symbols), ts)

    def _unsubscribe(self, conn, symbols: tuple[str, ...], ts: int) -> bytes:
        removed = [s for s in symbols if self.table.unsubscribe(conn, s)]
        return protocol.unsubscribed(removed, list(conn.symbols), ts)
