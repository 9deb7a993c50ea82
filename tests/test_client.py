"""gateway.client.GatewayClient against real gateways (``python -m gateway``
processes) and a redis-server started here, while trades are published
through ``publish_trade``: gateways killed with SIGKILL, stopped with
SIGTERM (1001), frozen with SIGSTOP (mute), replaced by other instances; a
history too short to cover an outage; refusals at the upgrade (401, 403, 429
with Retry-After); a token that expires; an application that stops reading.

Every stream is checked seq by seq: each sequenced trade exactly once and in
order, or a Gap naming exactly the seqs that are lost.
"""
from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import jwt
import orjson
import pytest
import redis
from conftest import fresh_symbols, needs_redis_server

from gateway.client import (
    Candle,
    Connected,
    Disconnected,
    Forbidden,
    Gap,
    GatewayClient,
    GatewayUnavailable,
    Overflow,
    QueueOverflow,
    ServerError,
    TokenExpired,
    Trade,
    Unauthorized,
    backoff_delay,
    interval_ms,
)
from gateway.sequencing import publish_trade

SECRET = "client-test-secret-of-32-bytes-or-more"


# --- without a gateway: backoff, resume points, candle dedupe ------------------
def test_backoff_full_jitter_stays_under_the_cap():
    rng = random.Random(7)
    for attempt in range(60):
        ceiling = min(30.0, 0.1 * 2 ** attempt)
        delays = [backoff_delay(attempt, 0.1, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8            # the whole range is used: full jitter


def test_interval_ms():
    assert interval_ms("1s") == 1000 and interval_ms("5m") == 300_000 and interval_ms("1d") == 86_400_000
    assert interval_ms("m") is None and interval_ms("1x") is None and interval_ms("-1m") is None


def trade_msg(symbol: str, seq: int | None, epoch: str | None = "e1") -> bytes:
    m: dict = {"type": "trade", "data": {"symbol": symbol, "price": 1.5, "volume": 1,
                                          "timestamp": 1}, "timestamp": 2}
    if seq is not None:
        m.update(seq=seq, epoch=epoch)
    return m


def drain(client: GatewayClient) -> list:
    out = list(client._queue)
    client._queue.clear()
    client._data_queued = 0
    return out


def offline_client(**kw) -> GatewayClient:
    async def make():
        return GatewayClient("ws://127.0.0.1:1", ["AAPL"], **kw)
    return asyncio.run(make())


def test_duplicates_dropped_jumps_reported():
    c = offline_client()
    for seq in (1, 2, 2, 1, 3, 6, 7):
        c._on_trade(trade_msg("AAPL", seq))
    events = drain(c)
    assert [(type(e).__name__, getattr(e, "seq", None)) for e in events] == [
        ("Trade", 1), ("Trade", 2), ("Trade", 3), ("Gap", None), ("Trade", 6), ("Trade", 7)]
    gap = events[3]
    assert (gap.reason, gap.epoch, gap.first, gap.last, gap.from_gateway) == ("missing", "e1", 4, 5, False)
    assert c.duplicates == 2 and c.positions == {"AAPL": ("e1", 7)}
    c._on_trade(trade_msg("AAPL", None))              # unsequenced: delivered, not tracked
    assert [e.seq for e in drain(c)] == [None] and c.positions == {"AAPL": ("e1", 7)}


def test_gateway_gap_notices_move_the_resume_point():
    c = offline_client(since={"aapl": ("e1", 10)})
    assert c._subscribe_message(["AAPL"], None)["since"] == {"AAPL": {"epoch": "e1", "seq": 10}}
    c._on_gap({"symbol": "AAPL", "epoch": "e1", "from": 11, "to": 40, "reason": "trimmed"})
    c._on_trade(trade_msg("AAPL", 41))
    # A new epoch: nothing of it lost; its trades follow from 1, no extra gap.
    c._on_gap({"symbol": "AAPL", "epoch": "e2", "from": 1, "to": 0, "reason": "epoch_changed"})
    c._on_trade(trade_msg("AAPL", 1, "e2"))
    # The history unreadable: where the loss ends is not known; the next trade is the baseline.
    c._on_gap({"symbol": "AAPL", "epoch": "e2", "from": 2, "to": 0, "reason": "unavailable"})
    c._on_trade(trade_msg("AAPL", 9, "e2"))
    # An epoch change nobody announced is reported by the client.
    c._on_trade(trade_msg("AAPL", 3, "e3"))
    kinds = [(type(e).__name__, getattr(e, "reason", None) or getattr(e, "seq", None)) for e in drain(c)]
    assert kinds == [("Gap", "trimmed"), ("Trade", 41), ("Gap", "epoch_changed"), ("Trade", 1),
                     ("Gap", "unavailable"), ("Trade", 9), ("Gap", "epoch_changed"), ("Trade", 3)]
    assert c.positions == {"AAPL": ("e3", 3)}


def candle_msg(start: int, close: float, state: str = "final", interval: str = "1m") -> dict:
    return {"type": "candle", "data": {"symbol": "AAPL", "interval": interval, "start": start,
                                       "open": 1, "high": 2, "low": 0.5, "close": close, "volume": 3,
                                       "trades": 2, "state": state}, "timestamp": 5}


def test_candle_backfill_after_reconnect_delivers_only_what_is_new():
    c = offline_client()
    m = 60_000
    for start in (0, m, 2 * m):
        c._on_candle(candle_msg(start, 1.0))
    c._on_candle(candle_msg(3 * m, 1.1, "update"))
    drain(c)
    c._candles["AAPL@1m"].resumed = True                 # as after a reconnect
    # The backfill: two finals already delivered (one changed meanwhile), then new ones.
    for start, close in ((m, 1.0), (2 * m, 1.2), (3 * m, 1.3), (4 * m, 1.4)):
        c._on_candle(candle_msg(start, close))
    c._on_candle(candle_msg(5 * m, 1.5, "update"))
    got = [(e.start // m, e.state, e.close) for e in drain(c)]
    assert got == [(2, "correction", 1.2), (3, "final", 1.3), (4, "final", 1.4), (5, "update", 1.5)]


def test_candle_finals_missed_beyond_the_backfill_are_a_gap():
    c = offline_client()
    m = 60_000
    c._on_candle(candle_msg(0, 1.0))
    c._candles["AAPL@1m"].resumed = True
    c._on_candle(candle_msg(200 * m, 1.0))
    gap, candle = drain(c)[1:]
    assert isinstance(gap, Gap) and (gap.symbol, gap.reason, gap.first, gap.last) == (
        "AAPL@1m", "candles_missed", m, 199 * m)
    assert isinstance(candle, Candle) and candle.stream == "AAPL@1m"


def test_bad_arguments():
    with pytest.raises(ValueError):
        offline_client(on_overflow="drop")
    with pytest.raises(ValueError):
        offline_client(max_queue=0)


# --- against gateways ---------------------------------------------------------------


class Publisher(threading.Thread):
    """Sequenced trades for ``symbols`` at about ``rate``/s until stop();
    ``published[symbol]`` is the last seq given out."""

    def __init__(self, port: int, symbols: list[str], rate: float = 200.0, pad: int = 0):
        super().__init__(daemon=True)
        self.r = redis.Redis(port=port)
        self.symbols, self.rate, self.pad = symbols, rate, "x" * pad
        self.published = {s: 0 for s in symbols}
        self._halt = threading.Event()

    def publish(self, n: int) -> None:
        for _ in range(n):
            for s in self.symbols:
                trade = {"symbol": s, "price": 10.0, "volume": 1, "timestamp": int(time.time() * 1000)}
                if self.pad:
                    trade["pad"] = self.pad
                self.published[s] = int(publish_trade(self.r, s, trade))

    def run(self) -> None:
        while not self._halt.is_set():
            self.publish(1)
            time.sleep(len(self.symbols) / self.rate)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


class Collector:
    """Iterates a client in a task, keeping every event."""

    def __init__(self, client: GatewayClient):
        self.client = client
        self.events: list = []
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.client:
                self.events.append(event)
        except BaseException as exc:       # kept for the test to look at
            self.error = exc

    def trades(self, symbol: str) -> list[int]:
        return [e.seq for e in self.events if isinstance(e, Trade) and e.symbol == symbol]

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.error is not None:
                raise AssertionError(f"client failed while waiting for {what}: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout:g} s; last events: {self.events[-5:]}")
            await asyncio.sleep(0.02)

    async def reconnected(self, n: int, what: str) -> None:
        """Until the client's n-th reconnect is up; then a moment of live trades."""
        await self.until(lambda: self.client.reconnects >= n and self.client.connected, 10, what)
        await asyncio.sleep(0.3)

    async def publisher_done(self, pub: Publisher) -> None:
        """Stop ``pub`` and wait until every seq it published was delivered or announced lost."""
        pub.stop()
        await self.caught_up(pub)

    async def caught_up(self, pub: Publisher, timeout: float = 20) -> None:
        await self.until(lambda: all(self.covered(s) >= pub.published[s] for s in pub.symbols),
                         timeout, f"caught up with {pub.published}")

    def covered(self, symbol: str) -> int:
        """The highest seq delivered or announced lost."""
        top = 0
        for e in self.events:
            if isinstance(e, Trade) and e.symbol == symbol and e.seq:
                top = max(top, e.seq)
            elif isinstance(e, Gap) and e.symbol == symbol and e.last:
                top = max(top, e.last)
        return top


def exactly_once(col: Collector, symbol: str, last: int) -> None:
    seqs = col.trades(symbol)
    assert seqs == list(range(1, last + 1)), (
        f"{symbol}: {len(seqs)} delivered of {last}; first wrong at "
        f"{next((i for i, (a, b) in enumerate(zip(seqs, range(1, last + 1))) if a != b), len(seqs))}")
    assert not [g for g in col.of(Gap) if g.symbol == symbol]


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture
def publishers():
    """``publishers(port, symbols, **kw)``: a Publisher, stopped after the test."""
    made: list[Publisher] = []

    def make(port: int, symbols: list[str], **kw) -> Publisher:
        made.append(Publisher(port, symbols, **kw))
        return made[-1]
    yield make
    for p in made:
        p.stop()


@needs_redis_server
def test_requests_return_the_gateway_reply(redis_server, gateways):
    gw = gateways(redis_server.url, WS_MAX_SYMBOLS=3)
    a, b = fresh_symbols(2)

    async def main():
        async with GatewayClient(gw.url, [a.lower()]) as client:
            assert client.subscriptions == [a] and client.max_symbols == 3
            reply = await client.subscribe([b, f"{a}@1m"])
            assert reply["subscribed"] == [b, f"{a}@1m"] and reply["currentSubscriptions"] == [a, b, f"{a}@1m"]
            with pytest.raises(ServerError, match="maximum of 3 symbols"):
                await client.subscribe(["ZZZ"])
            assert client.subscriptions == [a, b, f"{a}@1m"]     # the refused one is not kept
            with pytest.raises(ServerError, match="Invalid symbol"):
                await client.subscribe(["not a symbol!"])
            assert await client.ping() > 0
            assert (await client.unsubscribe([b]))["unsubscribed"] == [b]
            col = Collector(client)
            r = redis.Redis(port=redis_server.port)
            seqs = [int(publish_trade(r, a, {"symbol": a, "price": 1, "volume": 2})) for _ in range(3)]
            await col.until(lambda: len(col.trades(a)) == 3, 10, "three trades")
            assert col.trades(a) == seqs
            first = col.of(Trade)[0]
            assert first.price == 1 and first.volume == 2 and first.epoch and first.gateway_time > 0
            assert isinstance(col.events[0], Connected) and not col.events[0].reconnect
        await asyncio.wait_for(col.task, 1)              # iteration ends with the client
        assert col.error is None
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_sigterm_reconnects_at_once_and_resumes(redis_server, gateways, publishers):
    """1001 from a gateway shutting down: the client goes straight to the other
    instance (no backoff) and resumes with nothing lost or repeated."""
    a, b = gateways(redis_server.url), gateways(redis_server.url)
    sym = fresh_symbols(1)
    pub = publishers(redis_server.port, sym, rate=300)

    async def main():
        async with GatewayClient([a.url, b.url], sym, backoff_initial=5.0) as client:
            col = Collector(client)
            pub.start()
            await col.until(lambda: len(col.trades(sym[0])) > 30, 10, "trades")
            await asyncio.to_thread(a.stop)               # SIGTERM: close 1001
            await col.until(lambda: col.of(Connected)[-1:] and col.of(Connected)[-1].reconnect, 10,
                            "reconnected")
            await asyncio.sleep(0.3)
            await col.publisher_done(pub)
            (gone,) = col.of(Disconnected)
            assert (gone.code, gone.retry_in) == (1001, 0.0)
            assert col.of(Connected)[-1].url == b.url and client.reconnects == 1
            exactly_once(col, sym[0], pub.published[sym[0]])
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_killed_restarted_and_replaced_gateways_lose_nothing(redis_server, gateways, publishers):
    """SIGKILL under the client, a new instance on the same port, then the
    other instance replaced: two symbols published throughout, each delivered
    exactly once in order."""
    a = gateways(redis_server.url)
    b = gateways(redis_server.url)
    syms = fresh_symbols(2)
    pub = publishers(redis_server.port, syms, rate=400)

    async def main():
        async with GatewayClient([a.url, b.url], syms, backoff_initial=0.05, backoff_max=0.5) as client:
            col = Collector(client)
            pub.start()
            await col.until(lambda: len(col.trades(syms[0])) > 50, 10, "trades")
            a.send_signal(signal.SIGKILL)                 # no close frame at all
            await col.reconnected(1, "on b")
            a.start()                                     # a new instance on a's port
            await asyncio.to_thread(a.wait_ready)
            b.send_signal(signal.SIGKILL)
            await col.reconnected(2, "back on a")
            b.start()
            await asyncio.to_thread(b.wait_ready)
            await asyncio.to_thread(a.stop)               # replaced: a goes away cleanly (1001)
            await col.reconnected(3, "on b again")
            await col.publisher_done(pub)
            for s in syms:
                exactly_once(col, s, pub.published[s])
            assert [e.url for e in col.of(Connected)] == [a.url, b.url, a.url, b.url]
            assert [d.code for d in col.of(Disconnected)] == [None, None, 1001]
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_outage_longer_than_the_history_is_an_exact_gap(own_redis, gateways, publishers):
    own_redis.start()
    gw = gateways(own_redis.url, WS_HISTORY_SIZE=20)
    sym = fresh_symbols(1)
    pub = publishers(own_redis.port, sym)

    async def main():
        async with GatewayClient(gw.url, sym, backoff_initial=0.05, backoff_max=0.2) as client:
            col = Collector(client)
            pub.publish(5)
            await col.until(lambda: len(col.trades(sym[0])) == 5, 10, "five trades")
            gw.kill()
            await col.until(lambda: col.of(Disconnected), 10, "disconnected")
            pub.publish(200)
            gw.start()
            await asyncio.to_thread(gw.wait_ready)
            await col.caught_up(pub)
            (gap,) = col.of(Gap)
            seqs = col.trades(sym[0])
            assert (gap.reason, gap.first) == ("trimmed", 6) and gap.from_gateway
            assert seqs == [1, 2, 3, 4, 5, *range(gap.last + 1, 206)]
            assert 20 <= 205 - gap.last < 200                 # what the history still held
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_mute_gateway_is_left_for_another(redis_server, gateways, publishers):
    """A gateway frozen with SIGSTOP keeps its TCP connections open and says
    nothing: after mute_timeout the client moves to the other instance."""
    a, b = gateways(redis_server.url), gateways(redis_server.url)
    sym = fresh_symbols(1)
    pub = publishers(redis_server.port, sym, rate=100)

    async def main():
        async with GatewayClient([a.url, b.url], sym, mute_timeout=1.0, open_timeout=1.0,
                                 backoff_initial=0.05, backoff_max=0.2) as client:
            col = Collector(client)
            pub.start()
            await col.until(lambda: len(col.trades(sym[0])) > 20, 10, "trades")
            a.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                await col.until(lambda: client.reconnects >= 1 and client.connected, 10, "on b")
            finally:
                a.send_signal(signal.SIGCONT)
            assert 0.9 < time.monotonic() - t0 < 4
            await asyncio.sleep(0.3)
            await col.publisher_done(pub)
            exactly_once(col, sym[0], pub.published[sym[0]])
            assert col.of(Connected)[-1].url == b.url
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_refusals_are_typed(redis_server, gateways):
    gw = gateways(redis_server.url, WS_JWT_SECRET=SECRET, WS_ALLOWED_ORIGINS="https://desk.example",
                  WS_CONNECT_RATE=1, WS_CONNECT_BURST=1)
    good = jwt.encode({"sub": "u1", "exp": int(time.time()) + 600}, SECRET, "HS256")

    async def main():
        with pytest.raises(Unauthorized) as info:
            await GatewayClient(gw.url, ["AAPL"]).start()
        assert info.value.status == 401 and "token" in info.value.message.lower()
        with pytest.raises(Forbidden):
            await GatewayClient(gw.url, ["AAPL"], token=good,
                                connect_options={"origin": "https://elsewhere.example"}).start()
        # The connect rate (1/s, burst 1) is spent: 429 with Retry-After, waited out.
        t0 = time.monotonic()
        async with GatewayClient(gw.url, ["AAPL"], token=good, backoff_initial=0.01) as client:
            assert client.connected
        assert time.monotonic() - t0 >= 0.9
        with pytest.raises(GatewayUnavailable) as info2:
            async with GatewayClient(gw.url, ["AAPL"], token=good, max_attempts=1):
                pass
        assert info2.value.__cause__.status == 429 and info2.value.__cause__.retry_after >= 1
        # 401 with a refresh callback: it is asked for a token once.
        asked = []

        async def refresh():
            asked.append(1)
            return good
        await asyncio.sleep(1.1)
        async with GatewayClient(gw.url, ["AAPL"], token="bad", token_refresh=refresh) as client:
            assert client.connected and asked == [1]
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_expired_token_is_refreshed_and_the_stream_resumes(redis_server, gateways, publishers):
    gw = gateways(redis_server.url, WS_JWT_SECRET=SECRET)
    sym = fresh_symbols(1)
    pub = publishers(redis_server.port, sym, rate=200)

    def token(seconds: float) -> str:
        return jwt.encode({"sub": "u1", "exp": int(time.time() + seconds)}, SECRET, "HS256")

    async def main():
        async with GatewayClient(gw.url, sym, token=token(1.5)) as client:
            col = Collector(client)
            pub.start()
            await col.until(lambda: col.error is not None, 10, "token expiry")
            assert isinstance(col.error, TokenExpired)
            assert col.trades(sym[0]) == list(range(1, len(col.trades(sym[0])) + 1))
        refreshed = []

        def refresh() -> str:
            refreshed.append(1)
            return token(600)
        async with GatewayClient(gw.url, sym, token=token(1.5), token_refresh=refresh) as client:
            col = Collector(client)
            await col.until(lambda: refreshed and client.reconnects == 1 and client.connected, 10,
                            "refreshed")
            await asyncio.sleep(0.3)
            await col.publisher_done(pub)
            seqs = col.trades(sym[0])
            assert seqs == list(range(seqs[0], pub.published[sym[0]] + 1))
            (gone,) = col.of(Disconnected)
            assert (gone.code, gone.reason, gone.retry_in) == (1008, "token expired", 0.0)
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_application_behind_is_told_and_loses_nothing(redis_server, gateways, publishers):
    """The application stops reading while 30 MB of trades arrive: the client
    queues max_queue, says Overflow, stops reading; the gateway drops it as a
    slow consumer; once the application reads again the client resumes from
    the history. Every trade exactly once."""
    gw = gateways(redis_server.url, WS_MAX_BUFFERED_BYTES=65536)
    sym = fresh_symbols(1)
    pub = publishers(redis_server.port, sym, pad=20_000)

    async def main():
        # Uncompressed: the padding would deflate to nothing.
        async with GatewayClient(gw.url, sym, max_queue=50, backoff_initial=0.05,
                                 compression=False) as client:
            await asyncio.to_thread(pub.publish, 1500)
            await asyncio.sleep(1.0)                      # the application is busy elsewhere
            col = Collector(client)
            await col.caught_up(pub, timeout=30)
            exactly_once(col, sym[0], 1500)
            assert col.of(Overflow) and col.of(Overflow)[0].queued == 50
            # The gateway's close frame (1008 "slow consumer") sits behind the
            # data it could not send; the TCP connection is cut a second later.
            assert len(col.of(Disconnected)) == 1 and client.reconnects == 1
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_overflow_can_raise(redis_server, gateways, publishers):
    gw = gateways(redis_server.url)
    sym = fresh_symbols(1)
    pub = publishers(redis_server.port, sym)

    async def main():
        async with GatewayClient(gw.url, sym, max_queue=10, on_overflow="raise") as client:
            pub.publish(30)
            await asyncio.sleep(0.5)
            with pytest.raises(QueueOverflow):
                async for _ in client:
                    pass
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_unreadable_messages_do_not_end_the_client(redis_server, gateways):
    """A payload the gateway forwards but that is not what the client expects
    (no symbol; a candle missing fields) is delivered or skipped, never fatal."""
    gw = gateways(redis_server.url)
    sym = fresh_symbols(1)

    async def main():
        async with GatewayClient(gw.url, [sym[0], f"{sym[0]}@1m"]) as client:
            col = Collector(client)
            r = redis.Redis(port=redis_server.port)
            r.publish(f"channel:trade:{sym[0]}", orjson.dumps({"price": 1}))
            r.publish(f"channel:candle:1m:{sym[0]}", b'{"_n":1,"symbol":"X"}')
            r.publish(f"channel:trade:{sym[0]}", orjson.dumps({"symbol": sym[0], "price": 2}))
            await col.until(lambda: len(col.of(Trade)) == 2, 10, "two trades")
            assert [t.price for t in col.of(Trade)] == [1, 2] and col.error is None
            assert client.connected
    run(main())


@pytest.mark.slow
@needs_redis_server
def test_redis_restarted_without_persistence_is_an_epoch_change(own_redis, gateways, publishers):
    """The history is lost with Redis: the client is told (epoch_changed), then
    gets the new epoch's trades from seq 1, with no other gap and no duplicate,
    also across its own reconnect right after."""
    own_redis.start()
    gw = gateways(own_redis.url)
    sym = fresh_symbols(1)

    async def main():
        async with GatewayClient(gw.url, sym, backoff_initial=0.05, backoff_max=0.2) as client:
            col = Collector(client)
            pub = publishers(own_redis.port, sym)
            pub.publish(5)
            await col.until(lambda: len(col.trades(sym[0])) == 5, 10, "five trades")
            old_epoch = col.of(Trade)[-1].epoch
            await asyncio.to_thread(own_redis.restart)
            await asyncio.to_thread(gw.wait_ready)
            pub = publishers(own_redis.port, sym)
            await asyncio.to_thread(pub.publish, 5)
            await col.until(lambda: len(col.trades(sym[0])) == 10, 10, "the new epoch's trades")
            (gap,) = col.of(Gap)
            new = [t for t in col.of(Trade) if t.epoch != old_epoch]
            assert gap.reason == "epoch_changed" and gap.epoch == new[0].epoch != old_epoch
            assert [t.seq for t in new] == [1, 2, 3, 4, 5]
            # A reconnect now resumes in the new epoch.
            await asyncio.to_thread(gw.stop)
            gw.start()
            await asyncio.to_thread(gw.wait_ready)
            await asyncio.to_thread(pub.publish, 3)
            await col.until(lambda: len(col.trades(sym[0])) == 13, 10, "after the reconnect")
            assert [t.seq for t in col.of(Trade)][-8:] == [1, 2, 3, 4, 5, 6, 7, 8]
            assert len(col.of(Gap)) == 1 and client.positions == {sym[0]: (new[0].epoch, 8)}
    run(main())
