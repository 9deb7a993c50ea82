"""Micro-benchmarks of each hot-path piece, compiled vs pure-Python twin.

Run:  .venv/bin/python -m pytest bench/test_micro.py --benchmark-enable \
          --benchmark-json=bench/micro.json && .venv/bin/python bench/micro_report.py bench/micro.json

Each benchmark also checks its result, so a fast wrong answer cannot pass.
Inputs are fixed (seeded), so runs are comparable.
"""
from __future__ import annotations

import random

import hiredis
import orjson
import pytest

PREFIX = b"channel:trade:"
PATTERN = PREFIX + b"*"


def trade(rng: random.Random, symbol: str, seq: int) -> bytes:
    # ~170 bytes, the seed's fields: what the market-like workload publishes.
    return orjson.dumps({
        "symbol": symbol, "price": round(rng.uniform(10, 900), 2),
        "volume": rng.choice((100, 200, 500)), "timestamp": 1795673796074 + seq,
        "conditions": ["@", "T"], "exchange": "NASDAQ", "seq": seq,
        "ts": 1795673796074123456 + seq,
    })


def resp_pmessage(channel: bytes, payload: bytes) -> bytes:
    parts = [b"pmessage", PATTERN, channel, payload]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@pytest.fixture(scope="module")
def payload():
    return trade(random.Random(1), "AAPL", 1)


def test_parse_symbol(benchmark, impl):
    benchmark.group = "parse_symbol"
    channel = PREFIX + b"AAPL"
    assert benchmark(impl.parse_symbol, channel, PREFIX) == "AAPL"


def test_is_json_object(benchmark, impl, payload):
    benchmark.group = "validate payload (~170 B)"
    assert benchmark(impl.is_json_object, payload) is True


def test_subscription_lookup(benchmark, impl):
    benchmark.group = "subscription lookup"
    table = impl.SymbolTable(PREFIX)
    conns = [impl.ClientListener() for _ in range(1000)]
    for i, c in enumerate(conns):
        for k in range(5):
            table.subscribe(c, f"S{(i + k * 7) % 100}")
    channel = PREFIX + b"S42"
    subs = benchmark(table.lookup, channel)
    assert len(subs) == 50


def test_encode_trade_frame(benchmark, impl, payload):
    benchmark.group = "envelope + frame encoding"
    frame = benchmark(impl.encode_trade_frame, payload, 1795673796074)
    body = b'{"type":"trade","data":' + payload + b',"timestamp":1795673796074}'
    assert frame.endswith(body) and len(frame) == len(body) + (2 if len(body) < 126 else 4)


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
def test_dispatch_batch_100_messages_500_clients(benchmark, impl, deflate):
    """One hiredis-parsed read of 100 pmessages fanned out to 500 clients
    (with ``deflate``, every client negotiated permessage-deflate: each trade
    is compressed once, then copied like a plain one)."""
    benchmark.group = "dispatch 100 pmessages -> 500 clients" + (" (deflate)" if deflate else "")
    rng = random.Random(7)
    table = impl.SymbolTable(PREFIX)
    writes: list[int] = []
    record = writes.append
    clients = []
    symbols = [f"S{i}" for i in range(20)]
    for i in range(500):
        c = impl.ClientListener()
        c.sink = lambda data, record=record: record(len(data))  # recording transport stub
        c.deflate = deflate
        for k in range(5):
            table.subscribe(c, symbols[(i + k * 3) % 20])
        clients.append(c)
    stream = b"".join(resp_pmessage(PREFIX + symbols[n % 20].encode(), trade(rng, symbols[n % 20], n))
                      for n in range(100))
    reader = hiredis.Reader()
    reader.feed(stream)
    batch = []
    while (reply := reader.gets()) is not False:
        batch.append(reply)
    fanout = impl.FanOut(table)
    expected = sum(len(table.lookup(r[2])) for r in batch)

    def run():
        writes.clear()
        fanout.dispatch(batch)
    benchmark(run)
    assert len(writes) == 500                    # one write per client
    assert fanout.dropped_payloads == 0
    assert fanout.frames_sent == expected * (fanout.batches)
    assert fanout.compressed_messages == (100 * fanout.batches if deflate else 0)
    benchmark.extra_info["deliveries_per_round"] = expected
