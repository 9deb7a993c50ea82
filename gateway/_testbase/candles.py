"""An independent computation of candles, for tests and benchmarks.

gateway.candles updates candles one trade at a time; this computes them
again in one batch over the same trades (group by interval, sort by
(timestamp, seq), first/last/max/min/sum, empty intervals carrying the
previous close), so the two agree only if both are right.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

import redis

from .. import sequencing


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


class TradePublisher(threading.Thread):
    """Sequenced trades through publish_trade at about ``rate``/s: most on
    time, some out of order within the grace, some late (corrections)."""

    def __init__(self, port: int, symbols: tuple[str, ...], rate: float, seconds: float, seed: int):
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port)
        self.symbols, self.rate, self.seconds = symbols, rate, seconds
        self.rng = random.Random(seed)
        self.trades: list[Sim] = []

    def run(self):
        price = {s: 100.0 for s in self.symbols}
        end = time.time() + self.seconds
        nxt = time.time()
        while time.time() < end:
            nxt += self.rng.expovariate(self.rate)
            time.sleep(max(0.0, nxt - time.time()))
            s = self.rng.choice(self.symbols)
            price[s] = round(max(1.0, price[s] + self.rng.gauss(0, 0.05)), 2)
            now = int(time.time() * 1000)
            r = self.rng.random()
            delay = (self.rng.randint(0, 150) if r < 0.9 else self.rng.randint(150, 450) if r < 0.96
                     else self.rng.randint(1500, 6000))
            ts = now - delay
            volume = self.rng.choice((1, 10, 100, 500))
            seq = sequencing.publish_trade(self.client, s, {"symbol": s, "price": price[s],
                                                            "volume": volume, "timestamp": ts})
            self.trades.append(Sim(s, ts, now, price[s], volume, seq=int(seq)))
        self.client.close()
