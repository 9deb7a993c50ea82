"""ws-gateway-candles as a process: real redis-server, real publishers, kill -9.

Every check compares the candles published on Redis with an independent
computation (sorted-list arithmetic, tests/test_candles.py's reference) over
the trades the test itself published.
"""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import orjson
import pytest
import redis
from conftest import wait_for

from gateway import candle_store, sequencing
from gateway._testbase.candles import TradePublisher as Publisher
from gateway._testbase.candles import as_tuple, reference
from gateway._testbase.net import parse_metrics, try_http_get
from gateway._testbase.process import CandleProcess
from gateway._testbase.redis import RedisServer

INTERVALS = (("1s", 1000), ("5s", 5000), ("10s", 10_000))
FAST = dict(WS_CANDLE_INTERVALS="1s,5s,10s", WS_CANDLE_GRACE="0.5", WS_CANDLE_UPDATE_MS="100",
            WS_CANDLE_LATE_WINDOW="60", WS_CANDLE_LEASE="1", WS_CANDLE_BACKFILL="50")


@pytest.fixture
def rds():
    server = RedisServer()
    server.start()
    client = redis.Redis(port=server.port)
    sequencing.load_library(client)
    yield server, client
    client.close()
    server.stop()


class Recorder:
    """Every candle message Redis delivers, as (channel, payload)."""

    def __init__(self, port: int):
        self.client = redis.Redis(port=port)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("channel:candle:*")
        self.messages: list[tuple[str, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            m = self.pubsub.get_message(timeout=0.1)
            if m and m["type"] == "pmessage":
                self.messages.append((m["channel"].decode(), m["data"]))

    def close(self):
        self._stop.set()
        self._thread.join()
        self.pubsub.close()
        self.client.close()

    def decoded(self):
        out = []
        for channel, payload in self.messages:
            assert payload.startswith(b'{"_n":')
            n, rest = payload[6:].split(b",", 1)
            out.append((channel, int(n), orjson.loads(b"{" + rest)))
        return out


def final_view(decoded) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for _, _, msg in decoded:
        d = msg["data"]
        if d["state"] != "update":
            out.setdefault((d["symbol"], d["interval"]), {})[d["start"]] = d
    return out


def check(trades, decoded, symbols, intervals=INTERVALS):
    views = final_view(decoded)
    finals: dict[tuple, int] = {}
    for _, _, msg in decoded:
        d = msg["data"]
        if d["state"] == "final":
            key = (d["symbol"], d["interval"], d["start"])
            finals[key] = finals.get(key, 0) + 1
    assert set(finals.values()) == {1}, "a final went out twice"
    for symbol in symbols:
        for name, length in intervals:
            got = views[(symbol, name)]
            last = max(got)
            ref = reference(trades, symbol, length, last + length)
            assert sorted(got) == sorted(ref), (symbol, name, sorted(set(got) ^ set(ref))[:5])
            assert max(x.ts for x in trades if x.symbol == symbol) < last + length
            for start, want in ref.items():
                have = as_tuple(got[start])
                if isinstance(want[4], Decimal):
                    want = want[:4] + (int(want[4]),) + want[5:]
                assert have == want, (symbol, name, start, have, want)
    # Per stream, the message counter never repeats or goes back.
    ns: dict[str, int] = {}
    for channel, n, _ in decoded:
        assert n > ns.get(channel, 0), channel
        ns[channel] = n




@pytest.mark.slow
def test_the_service_publishes_candles_equal_to_the_reference(rds):
    server, client = rds
    rec = Recorder(server.port)
    quick = (("1s", 1000),)
    with CandleProcess(server.url, **dict(FAST, WS_CANDLE_INTERVALS="1s")) as svc:
        svc.wait_role("leader")
        client.publish("channel:trade:AAPL", b'{"price":"1","volume":1,"timestamp":1}')   # not numeric
        client.publish("channel:trade:AAPL", b"not json")
        pub = Publisher(server.port, ("AAPL", "MSFT"), rate=150, seconds=1.5, seed=1)
        pub.start()
        pub.join()
        time.sleep(1 + 0.5 + 0.6)        # every interval the trades touched has ended, plus grace
        status, body = try_http_get(svc.port, "/metrics")
        m = parse_metrics(body.decode())
        assert svc.stop() == 0 and not svc.tracebacks(), svc.log_tail()
    rec.close()
    check(pub.trades, rec.decoded(), ("AAPL", "MSFT"), quick)
    assert m["candles_trades_applied_total"] == len(pub.trades)
    assert m["candles_trades_invalid_total"] == 2
    assert m["candles_leader"] == 1 and m["candles_finals_total"] > 0
    bf = candle_store.parse_backfill(client.fcall_ro("candle_backfill", 0, "AAPL", "1s", 2))
    assert len(bf.finals) == 2 and all(b'"state":"final"' in b for b in bf.finals)


@pytest.mark.slow
def test_a_leader_killed_during_a_busy_minute_loses_nothing(rds):
    """Two services (intervals 1s, 10s, 1m); the leader is SIGKILLed in the
    middle of a minute of trades at 300/s; every interval's final candle,
    the minute's included, still equals the reference, no final goes out
    twice, none is missing, and the standby leads within WS_CANDLE_LEASE."""
    server, client = rds
    rec = Recorder(server.port)
    settings = dict(FAST, WS_CANDLE_INTERVALS="1s,10s,1m")
    a = CandleProcess(server.url, **settings).start()
    b = CandleProcess(server.url, **settings)
    try:
        a.wait_role("leader")
        b.start()
        b.wait_role("standby")
        pub = Publisher(server.port, ("AAPL", "MSFT", "TSLA"), rate=300, seconds=40, seed=2)
        pub.start()
        time.sleep(17.3)
        a.kill()
        killed = time.monotonic()
        wait_for(lambda: b.role() == "leader", 5, "leading")
        took = time.monotonic() - killed
        pub.join()
        # Until the minute the last trade belongs to has ended, plus grace.
        last = max(x.ts for x in pub.trades)
        time.sleep(max(0.0, (last // 60_000 + 1) * 60_000 / 1000 - time.time()) + 0.5 + 0.6)
        status, body = try_http_get(b.port, "/metrics")
        m = parse_metrics(body.decode())
        assert b.stop() == 0 and not b.tracebacks(), b.log_tail()
    finally:
        a.close()
        b.close()
    rec.close()
    decoded = rec.decoded()
    check(pub.trades, decoded, ("AAPL", "MSFT", "TSLA"), (("1s", 1000), ("10s", 10_000), ("1m", 60_000)))
    assert took < 1.0 + 0.5, f"took {took:.2f} s to lead"
    assert m["candles_takeovers_total"] == 1 and m["candles_trades_lost_total"] == 0
    # The backfill a gateway would serve now is the same series.
    for symbol in ("AAPL", "MSFT", "TSLA"):
        bf = candle_store.parse_backfill(client.fcall_ro("candle_backfill", 0, symbol, "1s", 50))
        starts = [orjson.loads(x)["data"]["start"] for x in bf.finals]
        assert starts == list(range(starts[0], starts[0] + 1000 * len(starts), 1000))
        view = final_view(decoded)[(symbol, "1s")]
        for raw in bf.finals:
            d = orjson.loads(raw)["data"]
            assert as_tuple(d) == as_tuple(view[d["start"]])


@pytest.mark.slow
def test_bad_configuration_is_one_line_and_exit_2():
    import subprocess
    import sys
    for args in (["--candle-intervals", "7m"], ["--lease", "0.1"], ["--update-ms", "x"],
                 ["--candle-intervals", ""], ["--candle-channel-prefix", "channel:trade:x"]):
        p = subprocess.run([sys.executable, "-m", "gateway.candle_service", *args],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("ws-gateway-candles: error: "), p.stderr


@pytest.mark.slow
def test_the_service_survives_a_redis_restart(rds):
    """Redis dies and comes back empty: the leader stands down, takes the
    lease again and carries on publishing; nothing crashes."""
    server, client = rds
    with CandleProcess(server.url, **dict(FAST, WS_CANDLE_INTERVALS="1s")) as svc:
        svc.wait_role("leader")
        server.kill()
        wait_for(lambda: svc.role() == "standby", 5, "standing by")
        server.start()
        wait_for(lambda: svc.role() == "leader", 10, "leading again")
        client2 = redis.Redis(port=server.port)
        sequencing.load_library(client2)
        rec = Recorder(server.port)
        pub = Publisher(server.port, ("AAPL",), rate=100, seconds=1.5, seed=3)
        pub.start()
        pub.join()
        time.sleep(1 + 0.5 + 0.6)
        rec.close()
        client2.close()
        assert svc.stop() == 0 and not svc.tracebacks(), svc.log_tail()
        assert "standing by" in svc.log_text()
    check(pub.trades, rec.decoded(), ("AAPL",), (("1s", 1000),))


def test_publishing_is_chunked_by_whole_symbols_with_their_watermarks():
    from gateway.candle_service import CHUNK, chunks
    from gateway.candles import Out
    items = [Out(f"S{k % 40}", "1s", k, "update", b"{}", b"{}", b"[]") for k in range(400)]
    marks = {f"S{k}": ("e", k) for k in range(45)}          # S40..S44: a watermark alone
    got = list(chunks(items, marks))
    assert sum(len(i) for i, _ in got) == 400
    assert [x for i, _ in got for x in i] != items           # grouped by symbol ...
    for i, m in got:
        assert len(i) <= CHUNK
        assert {x.symbol for x in i} <= set(m)              # ... each with its watermark
    seen = [s for i, m in got for s in {x.symbol for x in i}]
    assert len(seen) == len(set(seen)) == 40                 # a symbol never split
    assert {s for _, m in got for s in m} == set(marks)
    for s in ("S3", "S17"):                                  # order kept within a symbol
        starts = [x.start for i, _ in got for x in i if x.symbol == s]
        assert starts == sorted(starts)
