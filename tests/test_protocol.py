"""The client protocol over real WebSocket connections: welcome, subscribe,
unsubscribe, ping, limits, and every kind of bad input.

Each test runs on both event loops and both fast-path implementations
against an in-process gateway and a real redis-server.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until
from test_lifecycle import raw_client

from gateway._testbase import ws as wire


async def connect(gw, **kwargs):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", **kwargs)
    welcome = orjson.loads(await ws.recv())
    return ws, welcome


async def ask(ws, message) -> dict:
    await ws.send(message if isinstance(message, (str, bytes)) else orjson.dumps(message).decode())
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5))


def test_welcome_message(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_symbols=7) as gw:
            before = int(time.time() * 1000)
            ws, welcome = await connect(gw)
            after = int(time.time() * 1000)
            ws2, welcome2 = await connect(gw)
            await ws.close()
            await ws2.close()
        assert set(welcome) == {"type", "message", "data", "timestamp"}
        assert welcome["type"] == "success"
        assert welcome["message"] == "Connected to WebSocket Gateway"
        data = welcome["data"]
        assert uuid.UUID(data["connectionId"]).version == 4
        assert re.fullmatch(r"ws-gateway-[0-9a-f]{8}", data["serverId"])
        assert data["maxSymbolsPerConnection"] == 7
        assert before <= welcome["timestamp"] <= after
        assert welcome2["data"]["connectionId"] != data["connectionId"]
        assert welcome2["data"]["serverId"] == data["serverId"]
    aio(main())


def test_subscribe_unsubscribe_ping(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            ws, _ = await connect(gw)
            r = await ask(ws, {"action": "subscribe", "symbols": ["aapl", "GOOGL", "AAPL"]})
            assert r["type"] == "success"
            assert r["message"] == "Successfully subscribed to 2 symbol(s)"
            assert r["data"] == {"subscribed": ["AAPL", "GOOGL"], "currentSubscriptions": ["AAPL", "GOOGL"]}
            assert isinstance(r["timestamp"], int)

            r = await ask(ws, {"action": "subscribe", "symbols": ["MSFT", "googl"]})
            assert r["message"] == "Successfully subscribed to 1 symbol(s)"
            assert r["data"] == {"subscribed": ["MSFT"], "currentSubscriptions": ["AAPL", "GOOGL", "MSFT"]}
            assert gw.table.subscription_count == 3

            r = await ask(ws, {"action": "unsubscribe", "symbols": ["aapl", "TSLA"]})
            assert r["type"] == "success"
            assert r["message"] == "Successfully unsubscribed from 1 symbol(s)"
            assert r["data"] == {"unsubscribed": ["AAPL"], "currentSubscriptions": ["GOOGL", "MSFT"]}
            assert sorted(gw.table.symbols()) == ["GOOGL", "MSFT"]

            before = int(time.time() * 1000)
            r = await ask(ws, {"action": "ping"})
            assert set(r) == {"type", "timestamp"} and r["type"] == "pong"
            assert before <= r["timestamp"] <= int(time.time() * 1000)
            await ws.close()
            await wait_until(lambda: gw.table.subscription_count == 0)
    aio(main())


def test_symbol_limit_refuses_whole_request(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            ws, welcome = await connect(gw)
            assert welcome["data"]["maxSymbolsPerConnection"] == 5
            await ask(ws, {"action": "subscribe", "symbols": ["A", "B", "C"]})
            r = await ask(ws, {"action": "subscribe", "symbols": ["D", "E", "F"]})
            assert r["type"] == "error"
            assert r["message"] == "Cannot subscribe: would exceed maximum of 5 symbols per connection"
            # Nothing changed: D and E were not half-applied.
            r = await ask(ws, {"action": "subscribe", "symbols": ["A", "D", "E"]})
            assert r["data"]["currentSubscriptions"] == ["A", "B", "C", "D", "E"]
            # At the limit, re-subscribing to what is held is still fine.
            r = await ask(ws, {"action": "subscribe", "symbols": ["a"]})
            assert r["type"] == "success" and r["data"]["subscribed"] == []
            assert gw.table.subscription_count == 5
            await ws.close()
    aio(main())


BAD_INPUTS = [
    ("not json at all", "Invalid JSON"),
    ('{"action": "subscribe", ', "Invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('"ping"', "expected a JSON object"),
    ("42", "expected a JSON object"),
    ("{}", 'missing "action"'),
    ('{"symbols": ["AAPL"]}', 'missing "action"'),
    ('{"action": "dance"}', 'Unknown action "dance"'),
    ('{"action": 5}', "Unknown action 5"),
    ('{"action": null}', "Unknown action null"),
    ('{"action": "subscribe"}', '"symbols" is required'),
    ('{"action": "unsubscribe"}', '"symbols" is required'),
    ('{"action": "subscribe", "symbols": "AAPL"}', "must be a non-empty array"),
    ('{"action": "subscribe", "symbols": {"a": 1}}', "must be a non-empty array"),
    ('{"action": "subscribe", "symbols": []}', "must be a non-empty array"),
    ('{"action": "subscribe", "symbols": ["AAPL", 5]}', "found 5"),
    ('{"action": "subscribe", "symbols": [null]}', "found null"),
    ('{"action": "subscribe", "symbols": [""]}', 'Invalid symbol ""'),
    ('{"action": "subscribe", "symbols": ["AA PL"]}', 'Invalid symbol "AA PL"'),
    ('{"action": "subscribe", "symbols": ["AAPL$"]}', 'Invalid symbol "AAPL$"'),
    ('{"action": "subscribe", "symbols": ["ABCDEFGHIJKLMNOPQ"]}', 'Invalid symbol "ABCDEFGHIJKLMNOPQ"'),
    ('{"action": "subscribe", "symbols": ["stra\u00dfe"]}', "Invalid symbol"),
    ('{"action": "unsubscribe", "symbols": ["*"]}', 'Invalid symbol "*"'),
]


def test_bad_input_gets_error_and_connection_stays(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            ws, _ = await connect(gw)
            await ask(ws, {"action": "subscribe", "symbols": ["KEEP"]})
            for text, expected in BAD_INPUTS:
                r = await ask(ws, text)
                assert r["type"] == "error", text
                assert expected in r["message"], (text, r["message"])
                assert isinstance(r["timestamp"], int)
            r = await ask(ws, b'{"action": "ping"}')  # a binary frame, even of valid JSON
            assert r["type"] == "error" and "Binary" in r["message"]
            # Still usable, and nothing it sent changed its subscriptions.
            r = await ask(ws, {"action": "subscribe", "symbols": ["BRK.B", "BF-A", "x1"]})
            assert r["data"]["currentSubscriptions"] == ["KEEP", "BRK.B", "BF-A", "X1"]
            redis_server.client().publish("channel:trade:BRK.B", b'{"p":1}')
            t = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert t["type"] == "trade" and t["data"] == {"p": 1}
            assert sum(gw.control.errors.values()) == len(BAD_INPUTS) + 1
            await ws.close()
    aio(main())


def test_symbol_length_limits(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            ws, _ = await connect(gw)
            r = await ask(ws, {"action": "subscribe", "symbols": ["A" * 16, "z"]})
            assert r["data"]["subscribed"] == ["A" * 16, "Z"]
            await ws.close()
    aio(main())


def test_message_over_limit_closes_1009(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_message_size=1000) as gw:
            ws, _ = await connect(gw, max_size=None)
            # At the limit: still a normal (if wrong) message.
            r = await ask(ws, '{"action":"ping","pad":"' + "x" * (1000 - 27) + '"}')
            assert r["type"] == "pong"
            await ws.send('{"action":"ping","pad":"' + "x" * 2000 + '"}')
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1009
            await wait_until(lambda: not gw.sessions)
    aio(main())


def test_fragmented_messages(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_message_size=1000) as gw:
            ws, _ = await connect(gw)
            # websockets sends an iterable as one fragmented message.
            await ws.send(iter(['{"action":"sub', 'scribe","symbols":', '["FRAG"]}']))
            r = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert r["data"]["subscribed"] == ["FRAG"]
            # Fragments that add up to more than the limit close with 1009.
            await ws.send(iter(["x" * 600, "y" * 600]))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1009
            await wait_until(lambda: gw.table.subscription_count == 0)
    aio(main())


def test_default_message_limit_is_100kb(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            assert gw.config.max_message_size == 102400
            ws, _ = await connect(gw, max_size=None)
            r = await ask(ws, "x" * 102400)
            assert r["type"] == "error"
            await ws.send("x" * 102401)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1009
    aio(main())


def test_client_close_handshake(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            ws, _ = await connect(gw)
            await ask(ws, {"action": "subscribe", "symbols": ["AAPL"]})
            await ws.close(1000, "bye")
            assert ws.close_code == 1000  # the gateway echoed the close frame
            await wait_until(lambda: gw.table.subscription_count == 0 and not gw.sessions)
    aio(main())


def test_raw_socket_protocol_errors(aio, impl, redis_server):
    """Frames no library would send: unmasked client frame, bad opcode, stray continuation."""
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            for bad in (wire.frame(0x1, b"hi", mask=False),  # unmasked
                        wire.frame(0x3, b"x"),               # reserved opcode
                        wire.frame(0x0, b"x")):              # continuation without a start
                s = await raw_client(gw.port)
                s.send(bad)
                data = await loop.run_in_executor(None, s.read_all)
                s.close()
                # The welcome, then a close frame with 1002 (protocol error).
                assert b"\x88" in data and b"\x03\xea" in data, data[-40:]
            await wait_until(lambda: not gw.sessions)
            # The gateway still serves.
            ws, welcome = await connect(gw)
            assert welcome["type"] == "success"
            await ws.close()
    aio(main())


def test_client_message_rate_limit(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, client_msg_rate=5, client_msg_burst=10) as gw:
            ws, _ = await connect(gw)
            replies = []
            for _ in range(15):
                replies.append(await ask(ws, {"action": "ping"}))
            assert [r["type"] for r in replies] == ["pong"] * 10 + ["error"] * 5
            assert replies[-1]["message"].startswith("Rate limit exceeded: at most 5 messages per second")
            await asyncio.sleep(0.45)  # two tokens back at 5/s
            assert (await ask(ws, {"action": "ping"}))["type"] == "pong"
            assert (await ask(ws, {"action": "ping"}))["type"] == "pong"
            # Keeping on regardless: after a burst's worth of refusals, 1008.
            for _ in range(12):
                await ws.send('{"action":"ping"}')
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1008
            assert info.value.rcvd.reason == "message rate exceeded"
            assert gw.counters.rate_limit_closes == 1
            # Other connections are unaffected.
            ws2, _ = await connect(gw)
            assert (await ask(ws2, {"action": "ping"}))["type"] == "pong"
            await ws2.close()
    aio(main())


@pytest.mark.parametrize("payload,expected", [
    (b"", 1000),                         # empty close: answered with 1000, not 0
    (b"\x03\xe8bye", 1000),
    (b"\x0f\xa0", 4000),                 # application code: echoed
    (b"\x00\x00", 1002),                 # 0 never goes on the wire
    (b"\x03\xee", 1002),                 # 1006 is reserved
])
def test_close_codes_from_client(aio, impl, redis_server, payload, expected):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s = await raw_client(gw.port)
            s.send(wire.frame(wire.OP_CLOSE, payload))
            closing = await loop.run_in_executor(None, s.until_close)
            assert wire.close_code(closing.payload) == expected
            s.close()
    aio(main())


def test_connection_header_token_list_accepted(aio, impl, redis_server):
    import base64
    import os

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          f"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            writer.close()
    aio(main())
