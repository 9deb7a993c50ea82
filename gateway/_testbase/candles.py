"""An independent computation of candles, for tests and benchmarks.

gateway.candles updates candles one trade at a time; this computes them
again in one batch over the same trades (group by interval, sort by
(timestamp, seq), first/last/max/min/sum, empty intervals carrying the
previous close), so the two agree only if both are right.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass
class Sim:
    """A trade as a test generated it: when it happened (ts) and arrived."""
    symbol: str
    ts: int
    arrival: int
    price: float
    volume: int | float
    seq: int = 0
    too_late: bool = False     # the generator meant it to arrive past the late window


def reference(trades: list[Sim], symbol: str, length: int, upto: int) -> dict[int, tuple]:
    """start -> (open, high, low, close, volume, trades) of ``symbol``'s
    intervals of ``length`` ms from its first trade's up to ``upto``."""
    applied = sorted((x for x in trades if x.symbol == symbol and not x.too_late),
                     key=lambda x: (x.ts, x.seq))
    if not applied:
        return {}
    groups: dict[int, list[Sim]] = {}
    for x in applied:
        groups.setdefault(x.ts // length * length, []).append(x)
    out: dict[int, tuple] = {}
    close = None
    for start in range(min(groups), upto, length):
        g = groups.get(start)
        if g:
            prices = [x.price for x in g]
            vol = sum(Decimal(repr(x.volume)) if type(x.volume) is float else x.volume for x in g)
            close = prices[-1]
            out[start] = (prices[0], max(prices), min(prices), close, vol, len(g))
        else:
            out[start] = (close, close, close, close, 0, 0)
    return out


def as_tuple(d: dict) -> tuple:
    """A candle message's data as reference() spells it."""
    v = d["volume"]
    return (d["open"], d["high"], d["low"], d["close"], v if type(v) is int else Decimal(repr(v)),
            d["trades"])
