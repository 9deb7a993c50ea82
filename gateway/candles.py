"""Candle aggregation: trades in, candle messages out. No I/O, no clock.

A ``CandleBook`` holds one ``Stream`` per (symbol, interval). Every trade is
bucketed by its own ``timestamp`` into intervals aligned to UTC multiples of
the interval's length. The caller passes the time with every call, so a
simulated day runs in milliseconds and the service and the tests drive the
same code.

A candle's life:

- ``update`` while its interval is open: ``tick`` reports every candle that
  changed since the last tick (the service ticks every WS_CANDLE_UPDATE_MS);
- ``final`` once, at the first tick after ``end + grace``. An interval without
  trades still gets one (no trades, no volume, all four prices the previous
  close) once the stream has begun, so a chart has no holes;
- ``correction`` when a trade lands in an interval already final, up to
  ``late_window`` after its end: the whole corrected candle. Empty finals that
  carried the old close forward are corrected too, so the series stays
  consistent. Later trades are counted (``too_late``) and not applied.

Open and close are the prices of the first and last trade by (timestamp,
seq), not by arrival, so out-of-order trades land where they belong; trades
published without a seq order by arrival among equal timestamps. Volume is
summed exactly (integers as integers, other numbers as decimals), so the
result does not depend on the order trades arrive in.

Everything the book knows about a candle fits in ``Candle.state()``, which
the service stores beside each message so that a standby can take over from
the stored state (``CandleBook.restore``) and replay only the trades after
the stored watermark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

FUTURE_TOLERANCE_MS = 60_000      # trades stamped further ahead than this are not aggregated
Volume = int | Decimal

UPDATE, FINAL, CORRECTION = "update", "final", "correction"


def bucket(ts: int, length: int) -> int:
    """The start of the interval of ``length`` ms that holds ``ts`` (UTC-aligned)."""
    return ts - ts % length


def exact_volume(v: int | float) -> Volume:
    return v if type(v) is int else Decimal(repr(v))


def volume_out(v: Volume) -> int | float:
    return v if type(v) is int else float(v)


@dataclass(slots=True)
class Trade:
    """The fields a candle needs, checked. ``seq`` is 0 for unsequenced
    trades; among equal timestamps it orders trades (else their arrival)."""
    price: float
    volume: Volume
    ts: int
    seq: int = 0
    epoch: str = ""


def parse_trade(payload: bytes | dict) -> Trade | None:
    """A Trade from a published payload (JSON object) or its decoded dict;
    None when price, volume or timestamp is missing or not a usable number."""
    if isinstance(payload, dict):
        obj = payload
    else:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if type(obj) is not dict:
            return None
    price: Any = obj.get("price")
    volume: Any = obj.get("volume")
    ts: Any = obj.get("timestamp")
    if type(price) not in (int, float) or not math.isfinite(price):
        return None
    if type(volume) not in (int, float) or not math.isfinite(volume) or volume < 0:
        return None
    if type(ts) is float and ts.is_integer():
        ts = int(ts)
    if type(ts) is not int or ts <= 0:
        return None
    seq = obj.get("_seq", 0)
    epoch = obj.get("_epoch", "")
    if type(seq) is not int or seq < 0 or type(epoch) is not str:
        seq, epoch = 0, ""
    return Trade(float(price), exact_volume(volume), ts, seq, epoch)


class Candle:
    __slots__ = ("start", "open", "high", "low", "close", "volume", "trades", "first", "last",
                 "final", "sent_final")

    def __init__(self, start: int, price: float = 0.0):
        self.start = start
        self.open = self.high = self.low = self.close = price
        self.volume: Volume = 0
        self.trades = 0
        self.first: tuple[int, int] = (0, 0)   # (ts, order) of the open trade
        self.last: tuple[int, int] = (0, 0)    # (ts, order) of the close trade
        self.final = False                     # its interval has ended (+ grace)
        self.sent_final = False                # a final has gone out for it

    def add(self, price: float, volume: Volume, key: tuple[int, int]) -> None:
        if self.trades == 0:
            self.open = self.high = self.low = self.close = price
            self.first = self.last = key
        else:
            if key < self.first:
                self.first = key
                self.open = price
            if key >= self.last:
                self.last = key
                self.close = price
            if price > self.high:
                self.high = price
            if price < self.low:
                self.low = price
        self.volume += volume
        self.trades += 1

    def carry(self, price: float) -> bool:
        """An empty candle takes the previous close; True if that changed it."""
        if self.trades or self.close == price:
            return False
        self.open = self.high = self.low = self.close = price
        return True

    def data(self, symbol: str, interval: str, state: str) -> dict[str, Any]:
        return {"symbol": symbol, "interval": interval, "start": self.start, "open": self.open,
                "high": self.high, "low": self.low, "close": self.close,
                "volume": volume_out(self.volume), "trades": self.trades, "state": state}

    def state(self) -> bytes:
        """Everything needed to continue this candle elsewhere (see restore)."""
        return orjson.dumps([self.start, self.open, self.high, self.low, self.close, str(self.volume),
                             self.trades, list(self.first), list(self.last), self.final])

    @classmethod
    def from_state(cls, raw: bytes | str) -> Candle:
        start, o, h, lo, c, v, n, first, last, final = orjson.loads(raw)
        candle = cls(int(start))
        candle.open, candle.high, candle.low, candle.close = float(o), float(h), float(lo), float(c)
        candle.volume = int(v) if v.lstrip("-").isdigit() else Decimal(v)
        candle.trades = int(n)
        candle.first, candle.last = (first[0], first[1]), (last[0], last[1])
        candle.final = candle.sent_final = bool(final)
        return candle


@dataclass(slots=True)
class Out:
    """One candle message to publish, and what to store with it."""
    symbol: str
    interval: str
    start: int
    kind: str            # update, final, correction
    body: bytes          # the client message
    stored: bytes        # for final/correction: the message as backfill serves it (state final)
    state: bytes         # Candle.state()


@dataclass
class Counters:
    trades: int = 0          # trades applied
    invalid: int = 0         # no numeric price/volume/timestamp
    too_late: int = 0        # for an interval past the late window
    future: int = 0          # stamped too far ahead
    duplicates: int = 0      # a (epoch, seq) already applied
    corrections: int = 0
    finals: int = 0
    updates: int = 0
    skipped_intervals: int = 0   # finals never sent: older than the late window at catch-up


class Stream:
    """The candles of one symbol at one interval."""

    __slots__ = ("symbol", "interval", "length", "candles", "next_final", "series_start",
                 "last_close", "dirty")

    def __init__(self, symbol: str, interval: str, length: int):
        self.symbol = symbol
        self.interval = interval
        self.length = length
        self.candles: dict[int, Candle] = {}
        self.next_final: int | None = None   # the oldest interval not final yet
        self.series_start: int | None = None  # the oldest interval kept (finals are contiguous from it)
        self.last_close: float | None = None  # of the newest final candle
        self.dirty: set[int] = set()


@dataclass
class Settings:
    intervals: tuple[tuple[str, int], ...]   # (name, length ms), shortest first
    grace_ms: int = 2000
    late_window_ms: int = 900_000


class CandleBook:
    """Every stream's candles; see the module docstring."""

    def __init__(self, settings: Settings, counters: Counters | None = None):
        self.settings = settings
        self.streams: dict[str, list[Stream]] = {}
        self.watermarks: dict[str, tuple[str, int]] = {}     # symbol -> (epoch, last seq applied)
        self.changed_watermarks: set[str] = set()
        self.counters = counters or Counters()
        self._arrival = 0
        self.late_log: list[tuple[str, int, int]] = []       # (symbol, ts, now) of recent too-late trades
        self.forgotten: list[tuple[str, str, int]] = []      # (symbol, interval, start) dropped since taken

    def _streams(self, symbol: str) -> list[Stream]:
        streams = self.streams.get(symbol)
        if streams is None:
            streams = self.streams[symbol] = [Stream(symbol, name, length)
                                              for name, length in self.settings.intervals]
        return streams

    # --- trades ---------------------------------------------------------------
    def seen(self, symbol: str, trade: Trade) -> bool:
        """True if this sequenced trade (or a later one of its epoch) was applied."""
        if not trade.seq:
            return False
        mark = self.watermarks.get(symbol)
        return mark is not None and mark[0] == trade.epoch and trade.seq <= mark[1]

    def add(self, symbol: str, trade: Trade, now: int) -> bool:
        """Apply one trade at time ``now`` (ms); False if it was not applied."""
        c = self.counters
        if trade.seq:
            if self.seen(symbol, trade):
                c.duplicates += 1
                return False
            self.watermarks[symbol] = (trade.epoch, trade.seq)
            self.changed_watermarks.add(symbol)
        if trade.ts > now + FUTURE_TOLERANCE_MS:
            c.future += 1
            return False
        late_window = self.settings.late_window_ms
        streams = self._streams(symbol)
        # The same verdict for every interval: a trade is too late when the
        # shortest interval holding it ended more than the late window ago.
        if now - (bucket(trade.ts, streams[0].length) + streams[0].length) > late_window:
            c.too_late += 1
            if len(self.late_log) < 1000:
                self.late_log.append((symbol, trade.ts, now))
            return False
        self._arrival += 1
        key = (trade.ts, trade.seq or self._arrival)
        for s in streams:
            self._apply(s, trade, key, now)
        c.trades += 1
        return True

    def _apply(self, s: Stream, trade: Trade, key: tuple[int, int], now: int) -> None:
        length = s.length
        start = bucket(trade.ts, length)
        grace = self.settings.grace_ms
        if s.next_final is None:
            s.next_final = s.series_start = start
        candle = s.candles.get(start)
        if candle is None:
            candle = s.candles[start] = Candle(start)
            assert s.series_start is not None
            if start < s.next_final:
                ended = start + length + grace <= now
                if start < s.series_start:
                    # Before the series began: the ended intervals between
                    # it and the old beginning join the series as empty
                    # finals carrying this candle's close (_cascade below).
                    for t in range(start + length, s.series_start, length):
                        if t + length + grace > now:
                            # Not ended: _finalise makes it (and what follows) when due.
                            s.next_final = min(s.next_final, t)
                            break
                        gap = s.candles[t] = Candle(t)
                        gap.final = True
                        s.dirty.add(t)
                    s.series_start = start
                if ended:
                    candle.final = True      # its final goes out at the next tick
                else:
                    # Not ended yet (so nothing after it has ended either):
                    # it is simply open, and the series' finals start here.
                    s.next_final = start
        candle.add(trade.price, trade.volume, key)
        s.dirty.add(start)
        if candle.final:
            self._cascade(s, start)

    def _cascade(self, s: Stream, start: int) -> None:
        # Empty final candles after a changed final one carry its close.
        close = s.candles[start].close
        t = start + s.length
        while True:
            nxt = s.candles.get(t)
            if nxt is None or not nxt.final or nxt.trades:
                return
            if nxt.carry(close):
                s.dirty.add(t)
            t += s.length

    # --- time -----------------------------------------------------------------
    def tick(self, now: int, timestamp: int | None = None) -> list[Out]:
        """Finalise what is due at ``now``, and report every candle that
        changed: messages in order of interval start within each stream."""
        ts = now if timestamp is None else timestamp
        outs: list[Out] = []
        for streams in self.streams.values():
            for s in streams:
                self._finalise(s, now)
                if s.dirty:
                    self._report(s, ts, outs)
                self._prune(s, now)
        return outs

    def _finalise(self, s: Stream, now: int) -> None:
        if s.next_final is None:
            return
        length, grace = s.length, self.settings.grace_ms
        oldest = bucket(now - self.settings.late_window_ms, length)
        if s.next_final < oldest - length:
            # Far behind (the service was away): no final for what is older
            # than the late window, which could not be corrected any more.
            skipped = (oldest - length - s.next_final) // length
            self.counters.skipped_intervals += skipped
            prev = s.candles.get(s.next_final - length)
            for t in range(s.next_final, oldest - length, length):
                c = s.candles.pop(t, None)
                if c is not None:
                    self.forgotten.append((s.symbol, s.interval, t))
                    if c.trades:
                        prev = c
                s.dirty.discard(t)
            if prev is not None:
                s.last_close = prev.close
            s.next_final = oldest - length
        while s.next_final + length + grace <= now:
            t = s.next_final
            candle = s.candles.get(t)
            if candle is None:
                prev = s.candles.get(t - length)
                close = prev.close if prev is not None else s.last_close
                if close is None:          # cannot happen once the series began
                    s.next_final = t + length
                    continue
                candle = s.candles[t] = Candle(t, close)
            candle.final = True
            s.last_close = candle.close
            s.dirty.add(t)
            s.next_final = t + length

    def _report(self, s: Stream, ts: int, outs: list[Out]) -> None:
        c = self.counters
        for start in sorted(s.dirty):
            candle = s.candles.get(start)
            if candle is None:
                continue
            if not candle.final:
                kind = UPDATE
                c.updates += 1
            elif candle.sent_final:
                kind = CORRECTION
                c.corrections += 1
            else:
                kind = FINAL
                candle.sent_final = True
                c.finals += 1
            body = orjson.dumps({"type": "candle", "data": candle.data(s.symbol, s.interval, kind),
                                 "timestamp": ts})
            stored = body if kind != CORRECTION else orjson.dumps(
                {"type": "candle", "data": candle.data(s.symbol, s.interval, FINAL), "timestamp": ts})
            outs.append(Out(s.symbol, s.interval, start, kind, body, stored, candle.state()))
        s.dirty.clear()

    def _prune(self, s: Stream, now: int) -> None:
        # Candles past the late window can change no more: forget them, but
        # keep the newest final one (its close carries forward). The finals
        # are contiguous from series_start, so this walks up from the oldest.
        if s.next_final is None or s.series_start is None:
            return
        limit = now - self.settings.late_window_ms
        t = s.series_start
        while t + s.length < limit and t + s.length < s.next_final:
            if s.candles.pop(t, None) is not None:
                self.forgotten.append((s.symbol, s.interval, t))
            t += s.length
        s.series_start = t

    def take_forgotten(self) -> list[tuple[str, str, int]]:
        """Candles dropped from memory since the last call (their stored state can go)."""
        out, self.forgotten = self.forgotten, []
        return out

    # --- hand-over --------------------------------------------------------------
    def restore(self, symbol: str, watermark: tuple[str, int] | None,
                per_interval: dict[str, tuple[tuple[int, float] | None, list[Candle]]]) -> None:
        """Take over a symbol from stored state: for each interval, the
        (start, close) of its newest final candle (None if none yet) and the
        candles kept (open ones and finals still inside the late window)."""
        if watermark is not None:
            self.watermarks[symbol] = watermark
        for s in self._streams(symbol):
            last_final, candles = per_interval.get(s.interval, (None, []))
            s.candles = {c.start: c for c in candles}
            s.dirty.clear()
            for c in candles:
                c.sent_final = c.final = last_final is not None and c.start <= last_final[0]
            starts = sorted(s.candles)
            if last_final is not None:
                s.next_final = last_final[0] + s.length
                s.last_close = last_final[1]
            elif starts:
                s.next_final = starts[0]
            else:
                s.next_final = None
            s.series_start = starts[0] if starts else s.next_final


def interval_settings(names: tuple[str, ...], grace: float, late_window: float) -> Settings:
    from .config import interval_ms
    return Settings(tuple((n, interval_ms(n)) for n in names), round(grace * 1000),
                    round(late_window * 1000))

