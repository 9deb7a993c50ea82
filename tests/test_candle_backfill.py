"""A candle stream's backfill and its seam with the live stream.

First the Replayer alone (both fast paths, a backfill reader written here,
no Redis): the order of what a subscriber gets, held candles the backfill
covered dropped at the release, the floor, shared reads framed once, a read
that fails, two resumes of one client at once. Then the gateway against a
real redis-server, candles stored and published through gateway.candle_store
(the ws_gateway_candles library): backfill then live, in order, with no
duplicate and no hole, while a publisher publishes without pause.
"""
from __future__ import annotations

import asyncio
import itertools
import zlib

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until

from gateway import candle_store, protocol
from gateway._testbase.ws import FrameParser
from gateway.candle_store import Backfill
from gateway.candles import Out
from gateway.compression import deflate_frame
from gateway.replay import Replayer

_names = itertools.count()


def fresh() -> str:
    return f"CB{next(_names)}X{id(object()) % 100000}"[:16]


def candle(symbol: str, start: int, k: int, state: str = "update", interval: str = "1m") -> bytes:
    """A candle message; ``k`` tells the test which message it is."""
    return orjson.dumps({"type": "candle", "data": {
        "symbol": symbol, "interval": interval, "start": start, "open": 1.0, "high": 2.0, "low": 0.5,
        "close": 1.5, "volume": k, "trades": k, "k": k, "state": state}, "timestamp": 1700000000000 + k})


def decoded(writes: list[bytes]) -> list[dict]:
    parser = FrameParser()
    out = []
    for w in writes:
        for f in parser.feed(w):
            payload = zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") if f.rsv else f.payload
            out.append(orjson.loads(payload))
    return out


# ---------------------------------------------------------------------------
# The Replayer alone
# ---------------------------------------------------------------------------

class Store:
    """A backfill reader: what read_backfill would answer, and every call."""

    def __init__(self, n: int, finals: list[bytes], open_: list[bytes], fail: Exception | None = None):
        self.b = Backfill(n, finals, open_)
        self.fail = fail
        self.calls: list[tuple[str, str, int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, symbol: str, interval: str, count: int) -> Backfill:
        self.calls.append((symbol, interval, count))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return Backfill(self.b.n, self.b.finals[-count:] if count else [], self.b.open)


def no_history(symbol, after, count):
    raise AssertionError("no trade history is read for candle streams")


def make(impl, store: Store, count: int = 2, deflates: list | None = None):
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)

    def deflate(frame: bytes) -> bytes:
        if deflates is not None:
            deflates.append(frame)
        return deflate_frame(frame)
    replayer = Replayer(impl, fanout, table, no_history, deflate, read_backfill=store, backfill=count)
    return table, fanout, replayer


def client(impl, table, *streams, deflate=False):
    conn = impl.ClientListener()
    out: list[bytes] = []
    conn.sink = out.append
    conn.deflate = deflate
    for s in streams:
        table.subscribe(conn, s)
    return conn, out


def live(table, stream: str, k: int, n: int | None = None) -> list:
    symbol, interval = protocol.split_stream(stream)
    payload = protocol.candle_published_form(candle(symbol, 60000, k, interval=interval),
                                             k if n is None else n)
    return [b"pmessage", b"channel:candle:*", table.channel_for(stream), payload]


def test_backfill_then_held_live_minus_what_it_covered(impl):
    """Finals, then the open candle, then what arrived live meanwhile and is
    newer than the read; later live candles at or below n are skipped."""
    finals = [candle("AAPL", 60000 * s, s, "final") for s in range(4)]   # k 0..3
    store = Store(5, finals, [candle("AAPL", 240000, 5)])

    async def main():
        table, fanout, replayer = make(impl, store)
        store.gate = asyncio.Event()
        conn, out = client(impl, table, "AAPL@1m", "AAPL")
        replayer.resume(conn, [("AAPL@1m", None)])
        await asyncio.sleep(0)
        # While the read is on: n 4..6 of the stream, and a trade.
        fanout.dispatch([live(table, "AAPL@1m", k) for k in (4, 5)]
                        + [[b"pmessage", b"channel:trade:*", b"channel:trade:AAPL", b'{"p":1}']]
                        + [live(table, "AAPL@1m", 6)])
        assert out == [] and conn.holding
        store.gate.set()
        await wait_until(lambda: not conn.holding, 2)
        # Live again: n 5 arrives late (covered by the backfill), 7 is new.
        fanout.dispatch([live(table, "AAPL@1m", 5), live(table, "AAPL@1m", 7), live(table, "AAPL@1m", 5)])
        await replayer.close()
        return decoded(out)
    got = asyncio.run(main())
    assert [(m["type"], m["data"].get("k")) for m in got] == [
        ("candle", 2), ("candle", 3), ("candle", 5), ("trade", None), ("candle", 6), ("candle", 7),
        ("candle", 5)]
    assert [m["data"]["state"] for m in got[:3]] == ["final", "final", "update"]
    assert store.calls == [("AAPL", "1m", 2)]


def test_reads_of_one_stream_are_shared_and_framed_once(impl):
    store = Store(9, [candle("AAPL", 0, 8, "final")], [candle("AAPL", 60000, 9)])
    deflates: list[bytes] = []

    async def main():
        table, fanout, replayer = make(impl, store, deflates=deflates)
        plain = [client(impl, table, "AAPL@1m") for _ in range(3)]
        zipped = [client(impl, table, "AAPL@1m", deflate=True) for _ in range(3)]
        other, other_out = client(impl, table, "AAPL@5m")
        for conn, _ in plain + zipped:
            replayer.resume(conn, [("AAPL@1m", None)])
        replayer.resume(other, [("AAPL@5m", None)])
        await wait_until(lambda: not any(c.holding for c, _ in plain + zipped + [(other, 0)]), 2)
        await replayer.close()
        return table, plain, zipped, other_out, replayer
    table, plain, zipped, other_out, replayer = asyncio.run(main())
    assert sorted(store.calls) == [("AAPL", "1m", 2), ("AAPL", "5m", 2)]
    assert len(deflates) == 2                     # two candles, compressed once for three clients
    assert all(out == plain[0][1] for _, out in plain) and all(out == zipped[0][1] for _, out in zipped)
    assert [m["data"]["k"] for m in decoded(zipped[0][1])] == [8, 9] == \
        [m["data"]["k"] for m in decoded(plain[0][1])]
    assert replayer.backfills == 7 and replayer.backfill_frames == 14 and replayer.replays == 0
    # Each client now skips live candles up to the n read.
    assert [conn for conn, _ in plain + zipped if conn.holding] == []


def test_a_backfill_that_cannot_be_read_is_announced_and_live_follows(impl):
    store = Store(0, [], [], fail=ConnectionError("Redis is down"))

    async def main():
        table, fanout, replayer = make(impl, store)
        conn, out = client(impl, table, "AAPL@1m")
        replayer.resume(conn, [("AAPL@1m", None)])
        fanout.dispatch([live(table, "AAPL@1m", 3)])
        await wait_until(lambda: not conn.holding, 2)
        fanout.dispatch([live(table, "AAPL@1m", 1)])      # no floor: everything live goes out
        await replayer.close()
        return decoded(out), replayer
    got, replayer = asyncio.run(main())
    assert got[0] == {"type": "gap", "data": {"symbol": "AAPL@1m", "reason": "unavailable"},
                      "timestamp": got[0]["timestamp"]}
    assert [m["data"]["k"] for m in got[1:]] == [3, 1]
    assert replayer.backfill_errors == 1 and replayer.backfills == 0


def test_an_empty_stream_sets_no_floor(impl):
    store = Store(0, [], [])

    async def main():
        table, fanout, replayer = make(impl, store)
        conn, out = client(impl, table, "AAPL@1m")
        replayer.resume(conn, [("AAPL@1m", None)])
        await wait_until(lambda: not conn.holding, 2)
        fanout.dispatch([live(table, "AAPL@1m", 1), live(table, "AAPL@1m", 0, n=0)])
        await replayer.close()
        return decoded(out)
    assert [m["data"]["k"] for m in asyncio.run(main())] == [1, 0]


def test_two_resumes_of_one_client_release_together_in_request_order(impl):
    """A client that subscribes twice in quick succession: the second read
    finishing first must not let its live candles (or the first stream's)
    out ahead of the first stream's backfill."""
    first, second = Store(2, [], [candle("AAPL", 0, 2)]), Store(7, [], [candle("MSFT", 0, 7)])

    async def main():
        table = impl.SymbolTable()
        fanout = impl.FanOut(table)

        async def read(symbol, interval, count):
            return await (first if symbol == "AAPL" else second)(symbol, interval, count)
        replayer = Replayer(impl, fanout, table, no_history, deflate_frame, read_backfill=read)
        first.gate = asyncio.Event()
        conn, out = client(impl, table, "AAPL@1m", "MSFT@1m")
        replayer.resume(conn, [("AAPL@1m", None)])
        replayer.resume(conn, [("MSFT@1m", None)])
        fanout.dispatch([live(table, "AAPL@1m", 3), live(table, "MSFT@1m", 8)])
        await wait_until(lambda: second.calls != [], 2)
        await asyncio.sleep(0.02)
        assert out == [] and conn.holding        # MSFT's read is done; AAPL's is not
        first.gate.set()
        await wait_until(lambda: not conn.holding, 2)
        await replayer.close()
        return decoded(out)
    got = asyncio.run(main())
    assert [(m["data"]["symbol"], m["data"]["k"]) for m in got] == [
        ("AAPL", 2), ("MSFT", 7), ("AAPL", 3), ("MSFT", 8)]


# ---------------------------------------------------------------------------
# The gateway and a real Redis
# ---------------------------------------------------------------------------

PREFIX = "channel:candle:"
LENGTH = 60000


class Publisher:
    """Candles of one stream through the library, as the candle service
    publishes them: per candle, ``updates`` updates then its final. Every
    message carries k, its place in the stream from 1."""

    def __init__(self, r, symbol: str, keep: int = 50, updates: int = 3):
        candle_store.load_library(r)
        self.r = r
        self.symbol = symbol
        self.keep = keep
        self.updates = updates
        self.token = candle_store.acquire_lease(r, "test-" + symbol, 60000)
        assert self.token is not None
        self.k = 0

    def items(self, count: int) -> list[Out]:
        out = []
        for _ in range(count):
            self.k += 1
            start = (self.k - 1) // (self.updates + 1) * LENGTH
            final = self.k % (self.updates + 1) == 0
            body = candle(self.symbol, start, self.k, "final" if final else "update")
            out.append(Out(self.symbol, "1m", start, "final" if final else "update", body, b"", b"{}"))
        return out

    def publish(self, count: int = 1) -> None:
        candle_store.publish_candles(self.r, self.token, self.items(count), PREFIX, {"1m": self.keep})


def check_stream(msgs: list[dict], backfill: int, last_k: int, updates: int = 3) -> int:
    """A subscriber's candle messages: the backfill's finals (the last
    ``backfill`` of those published before the read, ascending), then the
    open candle's latest update, then every later message once, in order, up
    to ``last_k``. Returns how many finals came first."""
    data = [m["data"] for m in msgs]
    finals = []
    while data and data[0]["state"] == "final":
        finals.append(data.pop(0))
    assert finals, "the stream had finals when the client subscribed"
    starts = [f["start"] for f in finals]
    assert all(b - a == LENGTH for a, b in itertools.pairwise(starts)), starts
    assert len(finals) == min(backfill, finals[-1]["k"] // (updates + 1))
    # Then the open candle (the newest update of the candle after the last
    # final: earlier updates of it are superseded), and from there no hole
    # and no duplicate.
    ks = [d["k"] for d in data]
    assert 1 <= ks[0] - finals[-1]["k"] <= updates and data[0]["start"] == starts[-1] + LENGTH
    assert ks == list(range(ks[0], last_k + 1)), (finals[-1]["k"], ks[:5], ks[-5:])
    return len(finals)


@pytest.mark.heavy
def test_backfill_then_live_while_publishing(aio, impl, own_redis):
    """Clients subscribe, some at the same moment, some offering deflate,
    while a publisher sends candles without pause: each gets its subscribe
    reply, the last finals and the open candle, then every later message
    once, in order. A trade symbol on the same connection is unaffected."""
    own_redis.start()
    sym = fresh()
    backfill = 5

    async def main():
        r = own_redis.client()
        pub = Publisher(r, sym)
        pub.publish(30)                          # 7 finals and an open candle to start with
        async with running_gateway(impl, own_redis.url, candle_intervals=("1m", "5m"),
                                   candle_backfill=backfill) as gw:
            await wait_until(lambda: gw.redis.ready)
            assert gw.redis.patterns == ("channel:trade:*", "channel:candle:*")
            stop = asyncio.Event()

            async def publishing():
                while not stop.is_set():
                    pub.publish(2)
                    await asyncio.sleep(0.001)
            task = asyncio.create_task(publishing())
            clients = []

            async def subscriber(compression):
                ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", compression=compression)
                await ws.recv()
                await ws.send(orjson.dumps({"action": "subscribe", "symbols": [sym.lower() + "@1m", sym]}).decode())
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                assert reply["type"] == "success", reply
                assert reply["data"]["subscribed"] == [sym + "@1m", sym]
                clients.append(ws)
            for wave in range(4):
                await asyncio.gather(*(subscriber("deflate" if i % 2 else None) for i in range(4)))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            stop.set()
            await task
            last_k = pub.k
            r.publish(f"channel:trade:{sym}", b'{"p":1}')
            counts = []
            for ws in clients:
                msgs: list[dict] = []
                trade = 0
                while not msgs or msgs[-1]["data"].get("k") != last_k:
                    m = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                    if m["type"] == "trade":
                        trade += 1
                        continue
                    assert m["type"] == "candle", m
                    msgs.append(m)
                if not trade:
                    m = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert m["type"] == "trade" and m["data"] == {"p": 1}
                counts.append(check_stream(msgs, backfill, last_k))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.05)
                await ws.close()
            assert all(c == backfill for c in counts)
            assert gw.replayer.backfills == len(clients) and gw.replayer.backfill_errors == 0
            # Every message published while the gateway ran: routed, or unrouted before
            # the first subscriber.
            f = gw.fanout
            assert f.candle_messages + f.unrouted_messages == last_k - 30
            assert f.dropped_payloads == 0 and f.sequenced_messages == 0
        return last_k
    last_k = aio(main())
    assert last_k > 100


def test_backfill_unavailable_over_a_real_redis(aio, impl, own_redis):
    """The library gone from Redis: the subscriber is told, and live
    candles (published plainly here) still reach it."""
    own_redis.start()
    sym = fresh()

    async def main():
        r = own_redis.client()
        async with running_gateway(impl, own_redis.url, candle_intervals=("1m",)) as gw:
            await wait_until(lambda: gw.redis.ready)
            r.function_delete(candle_store.LIBRARY_NAME)
            ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", compression=None)
            await ws.recv()
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": [sym + "@1m"]}).decode())
            assert orjson.loads(await ws.recv())["type"] == "success"
            gap = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert gap["type"] == "gap" and gap["data"] == {"symbol": sym + "@1m", "reason": "unavailable"}
            body = candle(sym, 0, 1)
            r.publish(f"{PREFIX}1m:{sym}", protocol.candle_published_form(body, 1))
            assert await asyncio.wait_for(ws.recv(), 5) == body.decode()
            assert gw.replayer.backfill_errors == 1
            await ws.close()
    aio(main())
