"""Sequenced trades end to end, in process: the frame, resume with `since`,
snapshots, gap notices (trimmed, epoch_changed), bad `since` forms, the
conflation notice's seqs and the gateway's own gap fill. Real redis-server,
real WebSocket clients, both fast paths and both loops."""
from __future__ import annotations

import asyncio
import itertools
import re

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until

from gateway._testbase.ws import FrameParser
from gateway.sequencing import history_key, meta_key, publish_trade

_names = itertools.count()


def fresh(prefix: str = "S") -> str:
    """A symbol no earlier test published to (the session's Redis keeps histories)."""
    return f"{prefix}{next(_names)}X{id(object()) % 100000}"[:16].upper()


async def connect(gw):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", compression=None)
    assert orjson.loads(await ws.recv())["type"] == "success"
    return ws


async def recv(ws, timeout=5.0):
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def subscribe(ws, symbols, **extra):
    await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols, **extra}).decode())
    reply = await recv(ws)
    assert reply["type"] == "success", reply
    return reply


def publish(r, symbol, n, start=0):
    return [publish_trade(r, symbol, {"symbol": symbol, "n": start + k}) for k in range(n)]


def stored_epoch(r, symbol) -> str:
    """The epoch publish_trade numbers ``symbol``'s trades in now."""
    return r.hget(meta_key(symbol), "epoch").decode()


def decoded(writes: list[bytes]) -> list[dict]:
    """Every message in a sink's writes (each write holds whole frames)."""
    parser = FrameParser()
    return [orjson.loads(f.payload) for w in writes for f in parser.feed(w)]


async def trades(ws, count, timeout=5.0):
    out = []
    while len(out) < count:
        msg = await recv(ws, timeout)
        out.append(msg)
    return out


def test_sequenced_frame_bytes_and_plain_frames_unchanged(aio, impl, redis_server):
    sym = fresh()

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await connect(gw)
            await subscribe(ws, [sym])
            r = redis_server.client()
            seq = publish_trade(r, sym, b'{"price":1.5, "symbol":"X"}')
            raw = await asyncio.wait_for(ws.recv(), 5)
            epoch = gw.fanout.position(gw.table.channel_for(sym))[0]
            expected = ('{"type":"trade","data":{"price":1.5, "symbol":"X"},"seq":' + str(seq)
                        + ',"epoch":"' + epoch + '","timestamp":')
            assert raw.startswith(expected) and re.fullmatch(r"\d+\}", raw[len(expected):]), raw
            r.publish(f"channel:trade:{sym}", b'{"plain":true}')
            raw = await asyncio.wait_for(ws.recv(), 5)
            assert re.fullmatch(r'\{"type":"trade","data":\{"plain":true\},"timestamp":\d+\}', raw)
            publish_trade(r, sym, {})
            assert (await recv(ws))["data"] == {}
            await ws.close()
    aio(main())


def test_resume_after_disconnect_no_duplicate_no_hole(aio, impl, redis_server):
    a, b = fresh("A"), fresh("B")

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            ws = await connect(gw)
            await subscribe(ws, [a, b])
            publish(r, a, 5)
            publish(r, b, 3)
            got = await trades(ws, 8)
            last = {}
            for m in got:
                last[m["data"]["symbol"]] = {"epoch": m["epoch"], "seq": m["seq"]}
            assert last[a]["seq"] == 5 and last[b]["seq"] == 3
            await ws.close()
            publish(r, a, 10, 5)                 # missed: a 6..15, b 4..5
            publish(r, b, 2, 3)
            ws = await connect(gw)
            reply = await subscribe(ws, [a, b], since=last)
            assert reply["data"]["subscribed"] == [a, b]
            publish(r, a, 3, 15)                 # live after the resume: 16..18
            seen = {a: [], b: []}
            for m in await trades(ws, 15):
                assert m["type"] == "trade", m
                seen[m["data"]["symbol"]].append(m["seq"])
            assert seen[a] == list(range(6, 19)) and seen[b] == [4, 5]
            # 16..18 may come from the history or live, never both
            assert gw.replayer.replays == 1 and 12 <= gw.replayer.replayed_frames <= 15
            with pytest.raises(asyncio.TimeoutError):
                await recv(ws, 0.3)
            await ws.close()
    aio(main())


def test_resume_while_publishing_has_a_clean_seam(aio, impl, redis_server):
    """Trades published while the history is read come out once, in order."""
    sym = fresh()

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            publish(r, sym, 50)
            epoch = stored_epoch(r, sym)
            stop = asyncio.Event()

            async def publisher():
                k = 50
                while not stop.is_set():
                    pipe = r.pipeline(transaction=False)
                    for _ in range(20):
                        publish_trade(pipe, sym, {"symbol": sym, "n": k})
                        k += 1
                    pipe.execute()
                    await asyncio.sleep(0.002)
            task = asyncio.create_task(publisher())
            clients = []
            for i in range(10):
                ws = await connect(gw)
                await subscribe(ws, [sym], since={sym: {"epoch": epoch, "seq": 10 + i}})
                clients.append((ws, 10 + i))
            await asyncio.sleep(0.3)
            stop.set()
            await task
            final = int(r.hget(meta_key(sym), "seq"))
            for ws, after in clients:
                seqs = [m["seq"] for m in await trades(ws, final - after, timeout=10)]
                assert seqs == list(range(after + 1, final + 1))
                await ws.close()
    aio(main(), timeout=90)


def test_snapshot_then_live(aio, impl, redis_server):
    sym, empty = fresh(), fresh()

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            publish(r, sym, 7)
            ws = await connect(gw)
            await subscribe(ws, [sym, empty], snapshot=True)
            first = await recv(ws)
            assert first["seq"] == 7 and first["data"]["n"] == 6
            publish(r, sym, 2, 7)
            assert [m["seq"] for m in await trades(ws, 2)] == [8, 9]
            with pytest.raises(asyncio.TimeoutError):   # nothing for a symbol without history
                await recv(ws, 0.3)
            await ws.close()
    aio(main())


def test_trimmed_history_gives_an_exact_gap(aio, impl, redis_server):
    sym = fresh()

    async def main():
        async with running_gateway(impl, redis_server.url, history_size=5) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            publish(r, sym, 400)
            epoch = stored_epoch(r, sym)
            first = int(r.xrange(history_key(sym), count=1)[0][0].split(b"-")[0])
            assert first > 3
            ws = await connect(gw)
            await subscribe(ws, [sym], since={sym: {"epoch": epoch, "seq": 2}})
            gap = await recv(ws)
            assert gap["type"] == "gap"
            assert gap["data"] == {"symbol": sym, "epoch": epoch, "from": 3, "to": first - 1,
                                   "reason": "trimmed"}
            seqs = [m["seq"] for m in await trades(ws, 400 - first + 1)]
            assert seqs == list(range(first, 401))
            await ws.close()
    aio(main())


def test_epoch_changed_after_history_loss(aio, impl, own_redis):
    sym = fresh()

    async def main():
        own_redis.start()
        async with running_gateway(impl, own_redis.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = own_redis.client()
            publish(r, sym, 5)
            old = stored_epoch(r, sym)
            r.flushall()                           # the history is gone, the library stays
            publish(r, sym, 3)
            new = stored_epoch(r, sym)
            assert new != old
            ws = await connect(gw)
            await subscribe(ws, [sym], since={sym: {"epoch": old, "seq": 5}})
            gap = await recv(ws)
            assert gap["data"] == {"symbol": sym, "epoch": new, "from": 1, "to": 0,
                                   "reason": "epoch_changed"}
            msgs = await trades(ws, 3)
            assert [(m["epoch"], m["seq"]) for m in msgs] == [(new, 1), (new, 2), (new, 3)]
            await ws.close()
    aio(main())


def test_live_epoch_change_is_announced(aio, impl, own_redis):
    """The history starts anew while the gateway's subscription stays up (a
    failover to a replica that lacked it, or its keys lost): a subscribed
    client gets the epoch_changed notice, then the new epoch from seq 1."""
    sym = fresh()

    async def main():
        own_redis.start()
        async with running_gateway(impl, own_redis.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = own_redis.client()
            ws = await connect(gw)
            await subscribe(ws, [sym])
            publish(r, sym, 4)
            old = [(m["epoch"], m["seq"]) for m in await trades(ws, 4)]
            r.delete(meta_key(sym), history_key(sym))
            publish(r, sym, 3)
            new = stored_epoch(r, sym)
            assert new != old[0][0]
            gap = await recv(ws)
            assert gap["type"] == "gap" and gap["data"] == {
                "symbol": sym, "epoch": new, "from": 1, "to": 0, "reason": "epoch_changed"}
            msgs = await trades(ws, 3)
            assert [(m["epoch"], m["seq"]) for m in msgs] == [(new, 1), (new, 2), (new, 3)]
            assert gw.replayer.fills >= 1
            await ws.close()
    aio(main())


def test_a_new_epoch_holds_the_channel(impl):
    """A trade of another epoch than the channel's position is held and
    reported with seq 0 (no Redis needed)."""
    fanout, ch, frames, gaps, msg = one_subscriber(impl)
    fanout.dispatch([msg(1, b"e1"), msg(2, b"e1"), msg(1, b"e2"), msg(2, b"e2")])
    assert gaps == [(ch, "e1", 2, 0)] and fanout.holding(ch)
    assert fanout.release(ch) == [msg(1, b"e2")[3], msg(2, b"e2")[3]]
    assert [m["seq"] for m in decoded(frames)] == [1, 2]


BAD_SINCE = [
    ({"since": []}, 'Invalid "since": expected an object'),
    ({"since": {"MSFT": {"epoch": "e", "seq": 1}}}, "is not a symbol of this request"),
    ({"since": {"AAPL": 5}}, 'Invalid "since" for AAPL: expected'),
    ({"since": {"AAPL": {"seq": 1}}}, '"epoch" must be a non-empty string'),
    ({"since": {"AAPL": {"epoch": 7, "seq": 1}}}, '"epoch" must be a non-empty string'),
    ({"since": {"AAPL": {"epoch": "", "seq": 1}}}, '"epoch" must be a non-empty string'),
    ({"since": {"AAPL": {"epoch": "e", "seq": -1}}}, '"seq" must be a non-negative integer'),
    ({"since": {"AAPL": {"epoch": "e", "seq": 1.0}}}, '"seq" must be a non-negative integer'),
    ({"since": {"AAPL": {"epoch": "e", "seq": True}}}, '"seq" must be a non-negative integer'),
    ({"since": {"AAPL": {"epoch": "e"}}}, '"seq" must be a non-negative integer'),
    ({"snapshot": "yes"}, 'Invalid "snapshot"'),
]


def test_bad_since_is_an_error_and_changes_nothing(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await connect(gw)
            for extra, text in BAD_SINCE:
                await ws.send(orjson.dumps({"action": "subscribe", "symbols": ["AAPL"], **extra}).decode())
                reply = await recv(ws)
                assert reply["type"] == "error" and text in reply["message"], (extra, reply)
            assert gw.table.subscription_count == 0
            await ws.send(orjson.dumps({"action": "ping"}).decode())
            assert (await recv(ws))["type"] == "pong"    # still connected
            await ws.close()
    aio(main())


def test_gateway_fills_its_own_gap_after_losing_redis(aio, impl, redis_server):
    sym = fresh()

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            ws = await connect(gw)
            await subscribe(ws, [sym])
            publish(r, sym, 5)
            assert [m["seq"] for m in await trades(ws, 5)] == [1, 2, 3, 4, 5]
            reconnects = gw.redis.reconnects
            r.client_kill_filter(_type="pubsub")
            publish(r, sym, 20, 5)                 # while the gateway is away
            await wait_until(lambda: gw.redis.reconnects > reconnects and gw.redis.ready, 10)
            publish(r, sym, 5, 25)
            seqs = [m["seq"] for m in await trades(ws, 25, timeout=10)]
            assert seqs == list(range(6, 31))
            assert gw.replayer.fills >= 1
            await ws.close()
    aio(main())


def one_subscriber(impl):
    """A fan-out with one client on AAPL, no Redis: (fanout, channel, the
    client's writes, the gap callback's calls, msg(seq, epoch))."""
    from gateway import protocol
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    conn = impl.ClientListener()
    frames: list[bytes] = []
    conn.sink = frames.append
    table.subscribe(conn, "AAPL")
    ch = table.channel_for("AAPL")
    gaps: list[tuple] = []
    fanout.gap_callback = lambda *a: gaps.append(a)

    def msg(seq, epoch=b"ep"):
        return [b"pmessage", b"channel:trade:*", ch, protocol.published_form(b'{"n":%d}' % seq, seq, epoch)]
    return fanout, ch, frames, gaps, msg


def test_gap_in_the_live_stream_is_filled(impl):
    """A sequenced message that skips ahead holds the channel until the
    control plane fills the gap; duplicates are dropped (no Redis needed)."""
    fanout, ch, frames, gaps, msg = one_subscriber(impl)
    fanout.dispatch([msg(1), msg(2), msg(2), msg(5), msg(6)])
    assert gaps == [(ch, "ep", 2, 5)] and fanout.holding(ch)
    assert fanout.duplicate_messages == 1 and len(frames) == 1
    held = fanout.release(ch)
    assert held == [msg(5)[3], msg(6)[3]]
    fanout.dispatch([msg(3), msg(4)] + [[b"pmessage", b"channel:trade:*", ch, p] for p in held] + [msg(4)])
    bodies = frames[1]
    assert [m["seq"] for m in decoded([bodies])] == [3, 4, 5, 6]
    assert fanout.position(ch) == ("ep", 6) and fanout.duplicate_messages == 2


def test_conflation_gap_names_the_skipped_seqs(impl):
    from gateway import protocol
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    conn = impl.ClientListener()
    table.subscribe(conn, "AAPL")
    ch = table.channel_for("AAPL")
    conn.conflating = True
    fanout.dispatch([[b"pmessage", b"p", ch, protocol.published_form(b"{}", s, b"ep")] for s in (1, 2, 3, 4)])
    [(channel, frame, skipped, first, last)] = conn.take_conflated()
    assert (channel, skipped, first, last) == (ch, 3, 1, 3)
    assert orjson.loads(frame[2:])["seq"] == 4


@pytest.mark.parametrize("failure", ["unavailable", "trimmed"])
def test_a_gap_that_cannot_be_filled_is_announced_once(impl, failure):
    """History down or trimmed: subscribers get one notice, the held trades
    follow, and the fill is not asked for again and again."""
    from gateway import protocol
    from gateway.compression import deflate_frame
    from gateway.replay import Replayer
    from gateway.sequencing import HistoryRead

    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    conn = impl.ClientListener()
    frames: list[bytes] = []
    conn.sink = frames.append
    table.subscribe(conn, "AAPL")
    ch = table.channel_for("AAPL")
    reads = []

    async def read_history(symbol, after, count):
        reads.append((symbol, after))
        if failure == "unavailable":
            raise ConnectionError("Redis is down")
        return HistoryRead("ep", 8, 9, [(8, b'{"n":8}'), (9, b'{"n":9}')])

    def msg(seq):
        return [b"pmessage", b"channel:trade:*", ch, protocol.published_form(b'{"n":%d}' % seq, seq, b"ep")]

    async def main():
        replayer = Replayer(impl, fanout, table, read_history, deflate_frame)
        fanout.gap_callback = replayer.on_gap
        fanout.dispatch([msg(1), msg(2), msg(9), msg(10)])
        await wait_until(lambda: not fanout.holding(ch), 2)
        await asyncio.sleep(0.05)
        await replayer.close()
    asyncio.run(main())
    bodies = decoded(frames)
    gaps = [b["data"] for b in bodies if b["type"] == "gap"]
    seqs = [b["seq"] for b in bodies if b["type"] == "trade"]
    assert len(reads) == 1
    if failure == "unavailable":
        assert gaps == [{"symbol": "AAPL", "epoch": "ep", "from": 3, "to": 8, "reason": "unavailable"}]
        assert seqs == [1, 2, 9, 10]
    else:
        assert gaps == [{"symbol": "AAPL", "epoch": "ep", "from": 3, "to": 7, "reason": "trimmed"}]
        assert seqs == [1, 2, 8, 9, 10]


def test_resume_for_a_permessage_deflate_client(aio, impl, redis_server):
    sym = fresh("Z")

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            r = redis_server.client()
            publish(r, sym, 6)
            epoch = stored_epoch(r, sym)
            ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}")   # offers deflate
            assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
            await ws.recv()
            await subscribe(ws, [sym], since={sym: {"epoch": epoch, "seq": 2}})
            publish(r, sym, 2, 6)
            assert [m["seq"] for m in await trades(ws, 6)] == [3, 4, 5, 6, 7, 8]
            await ws.close()
    aio(main())


def test_a_channel_nobody_follows_forgets_its_position(impl):
    """After its last subscriber leaves, a channel's next subscriber starts
    from what comes next: the trades nobody followed are no gap to fill."""
    from gateway import protocol
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    gaps = []
    fanout.gap_callback = lambda *a: gaps.append(a)
    ch = table.channel_for("AAPL")

    def msg(seq):
        return [b"pmessage", b"p", ch, protocol.published_form(b"{}", seq, b"ep")]
    a, b = impl.ClientListener(), impl.ClientListener()
    frames: list[bytes] = []
    b.sink = frames.append
    table.subscribe(a, "AAPL")
    fanout.dispatch([msg(1), msg(2)])
    assert fanout.position(ch) == ("ep", 2)
    table.remove_connection(a)
    assert fanout.position(ch) is None
    fanout.dispatch([msg(3), msg(4)])               # unrouted
    table.subscribe(b, "AAPL")
    fanout.dispatch([msg(5)])
    assert gaps == [] and fanout.position(ch) == ("ep", 5) and len(frames) == 1


@pytest.mark.slow
@pytest.mark.heavy
def test_slow_consumer_gap_names_sequenced_seqs(aio, impl, redis_server):
    """Conflation over a real socket with sequenced trades: each gap notice
    says which seqs were skipped, and they are exactly the ones missing."""
    from test_lifecycle import raw_client
    sym = fresh("C")

    async def main():
        async with running_gateway(impl, redis_server.url, max_buffered_bytes=128 * 1024,
                                   slow_client_policy="conflate") as gw:
            await wait_until(lambda: gw.redis.ready)
            loop = asyncio.get_running_loop()
            slow = await raw_client(gw.port, 4096)
            slow.send_text(orjson.dumps({"action": "subscribe", "symbols": [sym]}))
            await wait_until(lambda: gw.table.subscription_count == 1)
            r = redis_server.client()
            pad = "x" * 150
            total = 20000

            def burst(start, stop):
                pipe = r.pipeline(transaction=False)
                for n in range(start, stop):
                    publish_trade(pipe, sym, {"n": n, "pad": pad})
                pipe.execute()
            for start in range(0, total, 2000):
                await loop.run_in_executor(None, burst, start, start + 2000)
            await wait_until(lambda: gw.counters.slow_consumers.get("conflate", 0) >= 1, 10)
            slow.sock.settimeout(10)
            last, gaps, pending = 0, 0, None
            while last < total:
                msg = await loop.run_in_executor(None, slow.text)
                if msg["type"] == "success":
                    continue
                if msg["type"] == "gap":
                    d = msg["data"]
                    assert d["reason"] == "slow_consumer" and d["from"] == last + 1
                    assert d["skipped"] == d["to"] - d["from"] + 1 and d["epoch"]
                    pending = d
                    gaps += 1
                    continue
                assert msg["type"] == "trade"
                expected = pending["to"] + 1 if pending else last + 1
                assert msg["seq"] == expected, (msg["seq"], last, pending)
                last, pending = msg["seq"], None
            assert gaps >= 1
            slow.close()
    aio(main(), timeout=120)
