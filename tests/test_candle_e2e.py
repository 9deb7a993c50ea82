"""Candles as a client meets them: gateway + candle services + publisher, all real.

A client subscribed before the trades start sees every interval's final
once, in order, equal to the independent computation, across a kill -9 of
the leading candle service. A client that subscribes mid-stream gets the
backfill, then the open candle, then live, with no interval missing or
repeated at the seam.
"""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import websockets

from gateway import sequencing
from gateway._testbase.candles import TradePublisher, as_tuple, reference
from gateway._testbase.process import CandleProcess, GatewayProcess
from gateway._testbase.redis import RedisServer

CANDLES = dict(WS_CANDLE_INTERVALS="1s,5s,10s", WS_CANDLE_BACKFILL="50")
SERVICE = dict(CANDLES, WS_CANDLE_GRACE="0.5", WS_CANDLE_UPDATE_MS="100", WS_CANDLE_LATE_WINDOW="60",
               WS_CANDLE_LEASE="1")
LENGTH = {"1s": 1000, "5s": 5000, "10s": 10_000}


async def collect(url: str, streams: list[str], until: float, out: list[dict]) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()                                          # welcome
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": streams}).decode())
        reply = orjson.loads(await ws.recv())
        assert reply["type"] == "success", reply
        assert reply["data"]["subscribed"] == streams
        while time.monotonic() < until:
            try:
                raw = await asyncio.wait_for(ws.recv(), max(0.01, until - time.monotonic()))
            except TimeoutError:
                break
            out.append(orjson.loads(raw))


def candles_of(messages: list[dict], symbol: str, interval: str) -> list[dict]:
    return [m["data"] for m in messages if m["type"] == "candle"
            and m["data"]["symbol"] == symbol and m["data"]["interval"] == interval]


def check_series(data: list[dict], length: int) -> dict[int, dict]:
    """Finals once each, contiguous, in order; updates only for open
    intervals; corrections only after a final. Returns start -> last final view."""
    finals = [d["start"] for d in data if d["state"] == "final"]
    assert len(finals) == len(set(finals)), "a final came twice"
    assert sorted(finals) == list(range(min(finals), min(finals) + length * len(finals), length)), finals
    # In order, except that a late trade from before the series' first
    # interval extends the series backwards: those finals come later.
    newest = finals[0]
    for start in finals[1:]:
        assert start > newest or start < finals[0], finals
        newest = max(newest, start)
    final_seen: set[int] = set()
    view: dict[int, dict] = {}
    for d in data:
        if d["state"] == "update":
            assert d["start"] not in final_seen, d
        elif d["state"] == "final":
            final_seen.add(d["start"])
            view[d["start"]] = d
        else:
            assert d["start"] in final_seen, d
            view[d["start"]] = d
    return view


@pytest.mark.slow
def test_clients_see_every_final_once_across_a_candle_service_failover():
    server = RedisServer()
    server.start()
    import redis
    client = redis.Redis(port=server.port)
    sequencing.load_library(client)
    a = CandleProcess(server.url, **SERVICE).start()
    b = CandleProcess(server.url, **SERVICE)
    gw = GatewayProcess(server.url, **CANDLES).start()
    try:
        a.wait_role("leader")
        b.start()
        b.wait_role("standby")
        gw.wait_ready()

        async def scenario():
            early: list[dict] = []
            late: list[dict] = []
            t0 = time.monotonic()
            end = t0 + 10 + 11.5
            first = asyncio.create_task(collect(gw.url, ["AAPL@1s", "AAPL@5s", "AAPL@10s", "AAPL"],
                                                end, early))
            await asyncio.sleep(0.5)
            pub = TradePublisher(server.port, ("AAPL", "MSFT"), rate=200, seconds=10, seed=5)
            pub.start()
            await asyncio.sleep(3.5)
            a.kill()
            await asyncio.sleep(3.5)
            second = asyncio.create_task(collect(gw.url, ["AAPL@1s", "AAPL@5s"], end, late))
            await asyncio.gather(first, second)
            pub.join()
            return pub.trades, early, late

        trades, early, late = asyncio.run(scenario())
        assert b.role() == "leader"
        assert gw.stop() == 0 and not gw.tracebacks(), gw.log_tail()
        assert b.stop() == 0 and not b.tracebacks(), b.log_tail()
    finally:
        gw.close()
        a.close()
        b.close()
        client.close()
        server.stop()

    # The early client: every interval of the run, final once, equal to the reference.
    for interval, length in LENGTH.items():
        view = check_series(candles_of(early, "AAPL", interval), length)
        ref = reference(trades, "AAPL", length, max(view) + length)
        assert sorted(view) == sorted(ref)
        for start, want in ref.items():
            assert as_tuple(view[start]) == want, (interval, start)
    assert sum(m["type"] == "trade" for m in early) == sum(t.symbol == "AAPL" for t in trades)

    # The late client: backfill (finals, then the open candle), then live: the
    # same series as the early client's, from wherever its backfill began.
    for interval in ("1s", "5s"):
        data = candles_of(late, "AAPL", interval)
        view = check_series(data, LENGTH[interval])
        early_view = check_series(candles_of(early, "AAPL", interval), LENGTH[interval])
        assert max(view) == max(early_view)
        for start, d in view.items():
            assert as_tuple(d) == as_tuple(early_view[start]), (interval, start)
