"""Trades from Redis to the right clients, byte for byte, in order, and
nothing else: real redis-server, real WebSocket clients (websockets, picows'
client, and several gateway processes)."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until


async def client(gw, symbols):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}")
    await ws.recv()
    if symbols:
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols}).decode())
        reply = orjson.loads(await ws.recv())
        assert reply["type"] == "success"
    return ws


async def recv_json(ws, timeout=5.0):
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def assert_silent(ws, wait=0.3):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.recv(), wait)


@pytest.mark.heavy
def test_trades_go_only_to_subscribers(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            a = await client(gw, ["AAPL"])
            b = await client(gw, ["AAPL", "MSFT"])
            c = await client(gw, ["TSLA"])
            d = await client(gw, [])
            r = redis_server.client()
            payload = b'{"symbol":"AAPL","price":150.25,"volume":100,"timestamp":1234567890,"conditions":["@","T"],"exchange":"NASDAQ"}'
            before = int(time.time() * 1000)
            assert r.publish("channel:trade:AAPL", payload) == 1
            r.publish("channel:trade:MSFT", b'{"symbol":"MSFT"}')
            raw_a = await asyncio.wait_for(a.recv(), 5)
            # The envelope, byte for byte, with the payload untouched.
            assert raw_a.startswith('{"type":"trade","data":' + payload.decode() + ',"timestamp":')
            env = orjson.loads(raw_a)
            assert set(env) == {"type", "data", "timestamp"}
            assert before <= env["timestamp"] <= int(time.time() * 1000)
            assert (await recv_json(b))["data"]["symbol"] == "AAPL"
            assert (await recv_json(b))["data"]["symbol"] == "MSFT"
            await assert_silent(a)
            await assert_silent(c)
            await assert_silent(d)
            assert gw.fanout.frames_sent == 3
            for ws in (a, b, c, d):
                await ws.close()
    aio(main())


def test_bad_payloads_dropped_counted_stream_continues(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await client(gw, ["BAD"])
            r = redis_server.client()
            bad = [b"", b"not json", b"[1,2]", b'"str"', b"42", b'{"a":1', b'{"a":1}}',
                   b'{"a":"\xff"}', b'{"a":NaN}', b"null", b'{"a":1}{"b":2}']
            for i, p in enumerate(bad):
                r.publish("channel:trade:BAD", p)
                r.publish("channel:trade:BAD", b'{"seq":%d}' % i)
            for i in range(len(bad)):
                assert (await recv_json(ws))["data"] == {"seq": i}
            await assert_silent(ws)
            assert gw.fanout.dropped_payloads == len(bad)
            assert gw.stats.snapshot()["dropped_payloads"] == len(bad)
            await ws.close()
    aio(main())


@pytest.mark.heavy
def test_order_and_completeness_many_clients(aio, impl, redis_server):
    """200 clients x 5 of 20 symbols; 2,000 pipelined trades; all arrive in order."""
    async def main():
        # All from 127.0.0.1: lift the per-address limit (default 100).
        async with running_gateway(impl, redis_server.url, max_connections_per_ip=0) as gw:
            await wait_until(lambda: gw.redis.ready)
            symbols = [f"S{i}" for i in range(20)]
            subs = [[symbols[(k + j * 3) % 20] for j in range(5)] for k in range(200)]
            clients = [await client(gw, s) for s in subs]
            r = redis_server.client()
            pipe = r.pipeline(transaction=False)
            for n in range(2000):
                sym = symbols[n % 20]
                pipe.publish(f"channel:trade:{sym}", b'{"symbol":"%s","seq":%d}' % (sym.encode(), n // 20))
            pipe.execute()

            async def drain(ws, mine):
                seen = {s: 0 for s in mine}
                for _ in range(100 * len(mine)):
                    d = (await recv_json(ws))["data"]
                    assert seen[d["symbol"]] == d["seq"]
                    seen[d["symbol"]] += 1
                return seen
            results = await asyncio.gather(*(drain(ws, s) for ws, s in zip(clients, subs)))
            assert all(v == 100 for res in results for v in res.values())
            assert gw.fanout.frames_sent == 200 * 5 * 100
            # Batching: far fewer writes than frames.
            assert gw.fanout.writes < gw.fanout.frames_sent
            for ws in clients:
                await ws.close()
    aio(main(), timeout=120)


def test_large_payload_frames(aio, impl, redis_server):
    """Payloads around the 126 and 65536 frame-length boundaries."""
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", max_size=None)
            await ws.recv()
            await ws.send('{"action":"subscribe","symbols":["BIG"]}')
            await ws.recv()
            r = redis_server.client()
            sizes = [10, 60, 80, 100, 65400, 65600, 300_000]
            for n in sizes:
                r.publish("channel:trade:BIG", b'{"x":"' + b"a" * n + b'"}')
            for n in sizes:
                assert len((await recv_json(ws))["data"]["x"]) == n
            await ws.close()
    aio(main())


def test_picows_client_receives(aio, impl, redis_server):
    from picows import WSListener, WSMsgType, ws_connect

    class Collect(WSListener):
        def __init__(self):
            self.messages: asyncio.Queue = asyncio.Queue()

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.TEXT:
                self.messages.put_nowait(frame.get_payload_as_bytes())

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            transport, listener = await ws_connect(Collect, f"ws://127.0.0.1:{gw.port}/")
            welcome = orjson.loads(await listener.messages.get())
            assert welcome["message"] == "Connected to WebSocket Gateway"
            transport.send(WSMsgType.TEXT, b'{"action":"subscribe","symbols":["PX"]}')
            assert orjson.loads(await listener.messages.get())["type"] == "success"
            redis_server.client().publish("channel:trade:PX", b'{"n":1}')
            msg = orjson.loads(await asyncio.wait_for(listener.messages.get(), 5))
            assert msg["data"] == {"n": 1}
            transport.send_close()
            transport.disconnect()
    aio(main())


def test_custom_channel_prefix(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, channel_prefix="md:t:") as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await client(gw, ["AAPL"])
            r = redis_server.client()
            r.publish("channel:trade:AAPL", b'{"n":0}')
            r.publish("md:t:AAPL", b'{"n":1}')
            assert (await recv_json(ws))["data"] == {"n": 1}
            await assert_silent(ws)
            await ws.close()
    aio(main())


def test_two_instances_each_serve_their_own_clients(redis_server, gateway_process):
    """Two gateway processes on one Redis: each delivers to its own clients."""
    procs = [gateway_process(), gateway_process()]
    for gw in procs:
        gw.wait_listening()

    async def main():
        conns = []
        for gw in procs:
            ws = await websockets.connect(gw.url)
            welcome = orjson.loads(await ws.recv())
            await ws.send('{"action":"subscribe","symbols":["MULTI"]}')
            await ws.recv()
            conns.append((ws, welcome["data"]["serverId"]))
        assert conns[0][1] != conns[1][1]
        r = redis_server.client()
        deadline = time.monotonic() + 10
        while r.publish("channel:trade:MULTI", b'{"warmup":true}') < 2:  # both subscribed
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        r.publish("channel:trade:MULTI", b'{"n":7}')
        for ws, _ in conns:
            while (d := (await recv_json(ws))["data"]) == {"warmup": True}:
                pass
            assert d == {"n": 7}
            await ws.close()
    asyncio.run(main())
    for gw in procs:
        assert gw.stop() == 0


def test_write_delay_shares_writes_and_delivers_everything(redis_server, gateway_process):
    """WS_WRITE_DELAY_US: trades of separate Redis reads share writes; every
    one arrives, in order."""
    import redis as redis_py
    from websockets.sync.client import connect as sync_connect

    from gateway._testbase.net import scrape_metrics
    gw = gateway_process(WS_WRITE_DELAY_US=20000)
    gw.wait_ready()
    r = redis_py.Redis(port=redis_server.port)
    with sync_connect(gw.url) as ws:
        ws.recv()
        ws.send(orjson.dumps({"action": "subscribe", "symbols": ["WDLY"]}).decode())
        ws.recv()
        for n in range(200):
            r.publish("channel:trade:WDLY", orjson.dumps({"symbol": "WDLY", "n": n}))
        got = [orjson.loads(ws.recv(timeout=5))["data"]["n"] for _ in range(200)]
    assert got == list(range(200))
    m = scrape_metrics(gw.port)
    assert m is not None and m["gateway_frames_sent_total"] == 200
    assert m["gateway_writes_total"] < 100, m["gateway_writes_total"]
