"""CandleBook (gateway.candles) against an independent computation.

The book is incremental: it updates a candle per trade, keyed by (timestamp,
seq). The reference here is batch arithmetic over sorted lists: every trade
that was not too late, grouped by interval, sorted, first/last/max/min/sum,
empty intervals carrying the previous close. A simulated trading day mixes
on-time, out-of-order, late (corrected) and too-late (dropped) trades; the
last final or correction of every interval must equal the reference, and the
lifecycle rules must hold on the way.
"""
from __future__ import annotations

import random
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._testbase.candles import Sim, as_tuple, reference
from gateway.candles import Candle, CandleBook, Settings, Trade, parse_trade

DAY_START = 1_767_600_000_000 - 1_767_600_000_000 % 86_400_000 + 14 * 3_600_000 + 1_800_000  # 14:30 UTC
INTERVALS = (("1s", 1000), ("1m", 60_000), ("5m", 300_000))
GRACE = 2000
LATE = 900_000
TICK = 250


def simulate_day(rng: random.Random, symbols=("AAPL", "MSFT"), seconds=6.5 * 3600, rate=1.0,
                 fractional=False) -> list[Sim]:
    """Trades over a trading day: most arrive within 200 ms, some out of
    order within the grace, some late (corrections), some past the window."""
    out: list[Sim] = []
    price = {s: rng.uniform(50, 500) for s in symbols}
    t = float(DAY_START)
    end = DAY_START + seconds * 1000
    while True:
        t += rng.expovariate(rate) * 1000
        if t >= end:
            break
        s = rng.choice(symbols)
        price[s] = max(0.01, price[s] * (1 + rng.gauss(0, 0.001)))
        ts = int(t)
        r = rng.random()
        if r < 0.90:
            delay = rng.randint(0, 200)
        elif r < 0.96:
            delay = rng.randint(200, 1800)          # out of order, inside the grace
        elif r < 0.99:
            delay = rng.randint(3000, 800_000)      # late: a correction
        else:
            delay = rng.randint(1_000_000, 2_000_000)  # past the late window
        volume: int | float = rng.choice((1, 10, 100, 250, 1000))
        if fractional:
            volume = round(rng.uniform(0, 3), rng.randint(1, 6))
        out.append(Sim(s, ts, ts + delay, round(price[s], 2), volume, too_late=delay >= 1_000_000))
    out.sort(key=lambda x: x.arrival)
    seqs: dict[str, int] = {}
    for x in out:          # Redis numbers trades in the order they are published
        seqs[x.symbol] = x.seq = seqs.get(x.symbol, 0) + 1
    return out


def run_book(trades: list[Sim], book: CandleBook | None = None, until: int | None = None,
             start_now: int | None = None, messages: list | None = None):
    """Feed trades in arrival order with a tick every TICK ms; returns the book and messages."""
    book = book or CandleBook(Settings(INTERVALS, GRACE, LATE))
    messages = [] if messages is None else messages
    now = start_now if start_now is not None else (trades[0].arrival if trades else DAY_START)
    now -= now % TICK
    i = 0
    last = until if until is not None else max(x.arrival for x in trades) + LATE + 400_000
    while now <= last:
        while i < len(trades) and trades[i].arrival <= now:
            x = trades[i]
            book.add(x.symbol, Trade(x.price, x.volume if type(x.volume) is int else Decimal(repr(x.volume)),
                                     x.ts, x.seq, "e1"), now)
            i += 1
        for out in book.tick(now):
            messages.append((now, out))
        now += TICK
    return book, messages


def last_finals(messages) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for _, m in messages:
        if m.kind != "update":
            d = orjson.loads(m.body)["data"]
            out.setdefault((d["symbol"], d["interval"]), {})[d["start"]] = d
    return out


def check_against_reference(trades, messages, symbols, upto_now):
    finals = last_finals(messages)
    for symbol in symbols:
        for name, length in INTERVALS:
            got = finals.get((symbol, name), {})
            # Every interval that ended (plus grace) by the end was finalised.
            upto = (upto_now - GRACE) // length * length - length + length
            ref = reference(trades, symbol, length, upto)
            assert sorted(got) == sorted(ref), (symbol, name, set(got) ^ set(ref))
            for start, want in ref.items():
                have = as_tuple(got[start])
                if type(want[4]) is Decimal or type(have[4]) is Decimal:
                    assert float(have[4]) == float(want[4])
                    have, want = have[:4] + have[5:], want[:4] + want[5:]
                assert have == want, (symbol, name, start)


def check_lifecycle(messages):
    seen: dict[tuple, str] = {}
    last_update: dict[tuple, tuple[int, bytes]] = {}
    for now, m in messages:
        d = orjson.loads(m.body)["data"]
        key = (d["symbol"], d["interval"], d["start"])
        length = dict(INTERVALS)[d["interval"]]
        assert d["state"] == m.kind
        before = seen.get(key)
        if m.kind == "update":
            assert before in (None, "update"), key
            # only when something changed
            prev = last_update.get(key)
            assert prev is None or prev[1] != orjson.dumps(d), key
            assert prev is None or now - prev[0] >= TICK
            last_update[key] = (now, orjson.dumps(d))
            seen[key] = "update"
        elif m.kind == "final":
            assert before in (None, "update"), key
            assert now >= d["start"] + length + GRACE, key
            seen[key] = "final"
        else:
            assert before in ("final", "correction"), key
            assert now - (d["start"] + length) <= LATE + length, key
            seen[key] = "correction"


# ~1.4 s and ~4 s: both in the full suite; the quick tier has the other candle tests.
@pytest.mark.parametrize("hours", [pytest.param(2, id="2h", marks=pytest.mark.slow),
                                   pytest.param(6.5, id="day", marks=pytest.mark.slow)])
def test_a_simulated_day_matches_the_reference(hours):
    rng = random.Random(7)
    trades = simulate_day(rng, seconds=hours * 3600)
    book, messages = run_book(trades)
    end = max(x.arrival for x in trades) + LATE + 400_000
    end -= end % TICK
    check_lifecycle(messages)
    check_against_reference(trades, messages, ("AAPL", "MSFT"), end)
    c = book.counters
    assert c.too_late == sum(x.too_late for x in trades) > 0
    assert c.corrections > 0 and c.trades == len(trades) - c.too_late
    assert c.invalid == c.duplicates == 0


def test_fractional_volumes_are_summed_exactly_whatever_the_order():
    rng = random.Random(11)
    trades = simulate_day(rng, symbols=("BTC-USD",), seconds=1800, rate=5.0, fractional=True)
    _, messages = run_book(trades)
    end = max(x.arrival for x in trades) + LATE + 400_000
    check_against_reference(trades, messages, ("BTC-USD",), end - end % TICK)


@pytest.mark.slow
def test_a_takeover_from_stored_state_changes_nothing():
    """A second book restored from what the first one stored (each candle's
    state, the newest final, the watermark), fed the trades after the
    watermark, ends exactly where one uninterrupted book does."""
    rng = random.Random(3)
    trades = simulate_day(rng, seconds=3600, rate=2.0)
    whole, messages = run_book(trades)
    cut = trades[len(trades) // 2].arrival + 123
    cut -= cut % TICK
    first, before = run_book([x for x in trades if x.arrival <= cut], until=cut)
    second = CandleBook(Settings(INTERVALS, GRACE, LATE))
    for symbol, streams in first.streams.items():
        per = {}
        for s in streams:
            finals = [c for c in s.candles.values() if c.sent_final]
            newest = max(finals, key=lambda c: c.start) if finals else None
            last = (newest.start, newest.close) if newest else None
            per[s.interval] = (last, [Candle.from_state(c.state()) for c in s.candles.values()])
        second.restore(symbol, first.watermarks.get(symbol), per)
    # The service dies before its last tick's messages went out: the
    # stored state is the previous tick's, and the watermark too.
    after = [x for x in trades if x.arrival > cut]
    _, rest = run_book(after, book=second, start_now=cut + TICK)
    merged = before + rest
    check_lifecycle(merged)
    end = max(x.arrival for x in trades) + LATE + 400_000
    check_against_reference(trades, merged, ("AAPL", "MSFT"), end - end % TICK)
    assert last_finals(merged) == last_finals(messages)


def test_an_empty_interval_gets_a_final_carrying_the_previous_close():
    book = CandleBook(Settings((("1s", 1000),), 2000, LATE))
    t0 = DAY_START
    book.add("X", Trade(10.0, 1, t0 + 100, 1, "e"), t0 + 150)
    book.add("X", Trade(12.0, 1, t0 + 5100, 2, "e"), t0 + 5150)
    outs = book.tick(t0 + 8000)
    finals = [orjson.loads(o.body)["data"] for o in outs if o.kind == "final"]
    assert [f["start"] for f in finals] == [t0 + k * 1000 for k in range(6)]
    assert [f["trades"] for f in finals] == [1, 0, 0, 0, 0, 1]
    assert all(f["open"] == f["high"] == f["low"] == f["close"] == 10.0 and f["volume"] == 0
               for f in finals[1:5])


def test_a_late_trade_corrects_its_candle_and_the_empty_finals_after_it():
    book = CandleBook(Settings((("1s", 1000),), 2000, LATE))
    t0 = DAY_START
    book.add("X", Trade(10.0, 1, t0 + 100, 1, "e"), t0 + 150)
    book.add("X", Trade(12.0, 1, t0 + 4100, 2, "e"), t0 + 4150)
    book.tick(t0 + 7000)
    book.add("X", Trade(11.0, 3, t0 + 900, 3, "e"), t0 + 7100)      # late, and the newest in its second
    outs = book.tick(t0 + 7250)
    got = [(o.kind, orjson.loads(o.body)["data"]) for o in outs]
    assert [(k, d["start"]) for k, d in got] == [("correction", t0 + k * 1000) for k in range(4)]
    assert got[0][1]["close"] == 11.0 and got[0][1]["volume"] == 4 and got[0][1]["open"] == 10.0
    assert all(d["close"] == 11.0 and d["trades"] == 0 for _, d in got[1:])
    assert all(o.stored != o.body and b'"state":"final"' in o.stored for o in outs)


def test_trades_past_the_window_in_the_future_or_malformed_are_not_applied():
    book = CandleBook(Settings((("1s", 1000),), 2000, 10_000))
    t0 = DAY_START
    assert not book.add("X", Trade(1.0, 1, t0, 1, "e"), t0 + 12_000)          # too late
    assert not book.add("X", Trade(1.0, 1, t0 + 70_000, 2, "e"), t0)          # from the future
    assert book.add("X", Trade(1.0, 1, t0, 3, "e"), t0 + 100)
    assert not book.add("X", Trade(1.0, 1, t0, 3, "e"), t0 + 100)              # a duplicate
    assert (book.counters.too_late, book.counters.future, book.counters.duplicates) == (1, 1, 1)
    for bad in (b"{}", b'{"price":"1","volume":1,"timestamp":1}', b'{"price":1,"volume":-1,"timestamp":1}',
                b'{"price":1,"volume":1,"timestamp":true}', b'{"price":1e999,"volume":1,"timestamp":1}',
                b'{"price":1,"volume":1,"timestamp":1.5}', b"[]", b"nope", b'{"price":true,"volume":1,"timestamp":1}'):
        assert parse_trade(bad) is None, bad
    t = parse_trade(b'{"_seq":4,"_epoch":"ab","price":1.5,"volume":2,"timestamp":1700000000000.0}')
    assert t == Trade(1.5, 2, 1_700_000_000_000, 4, "ab")


def test_a_trade_before_the_series_began_extends_it_backwards():
    book = CandleBook(Settings((("1s", 1000),), 2000, LATE))
    t0 = DAY_START
    book.add("X", Trade(10.0, 1, t0 + 5100, 1, "e"), t0 + 5150)
    book.tick(t0 + 9000)
    book.add("X", Trade(9.0, 1, t0 + 1100, 2, "e"), t0 + 9100)
    outs = book.tick(t0 + 9250)
    got = [(o.kind, orjson.loads(o.body)["data"]) for o in outs]
    assert [(k, d["start"], d["close"]) for k, d in got] == [
        ("final", t0 + 1000, 9.0), ("final", t0 + 2000, 9.0), ("final", t0 + 3000, 9.0),
        ("final", t0 + 4000, 9.0)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 5000), st.sampled_from([1.0, 2.5, 3.0, 0.5]),
                          st.integers(1, 50)), min_size=1, max_size=40))
def test_any_arrival_order_within_the_window_ends_at_the_reference(raw):
    trades = [Sim("X", DAY_START + ts, DAY_START + ts + delay, price, vol)
              for ts, delay, price, vol in raw]
    trades.sort(key=lambda x: x.arrival)
    for k, x in enumerate(trades, 1):
        x.seq = k
    _, messages = run_book(trades, until=max(x.arrival for x in trades) + 400_000)
    check_lifecycle(messages)
    end = max(x.arrival for x in trades) + 400_000
    check_against_reference(trades, messages, ("X",), end - end % TICK)


@pytest.mark.parametrize("volume", [1, 2.5])
def test_state_round_trips(volume):
    c = Candle(DAY_START)
    c.add(1.25, 3 if volume == 1 else Decimal("2.5"), (DAY_START + 1, 4))
    c.add(1.5, 1, (DAY_START, 5))
    r = Candle.from_state(c.state())
    assert r.state() == c.state()
    assert (r.open, r.close, r.first, r.last) == (1.5, 1.25, (DAY_START, 5), (DAY_START + 1, 4))


def test_a_late_first_trade_before_the_series_leaves_no_hole():
    # The series began at t0+2s; a trade for t0 arrives when t0 has ended
    # but t0+1s is still inside its grace: t0+1s must still get its final.
    book = CandleBook(Settings((("1s", 1000),), 500, LATE))
    t0 = DAY_START
    book.add("X", Trade(10.0, 1, t0 + 2000, 1, "e"), t0 + 2010)
    book.add("X", Trade(9.0, 1, t0 + 500, 2, "e"), t0 + 2200)
    finals = []
    for now in range(t0 + 2250, t0 + 4000, 250):
        finals += [orjson.loads(o.body)["data"]["start"] - t0 for o in book.tick(now) if o.kind == "final"]
    assert finals == [0, 1000, 2000]
