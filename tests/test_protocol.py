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
                        wire.frame(0x9, b"x", rsv=4),        # a ping marked compressed
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


def test_client_pings_get_pongs(aio, impl, redis_server):
    """The gateway answers a client's ping with its payload, between messages."""
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s = await raw_client(gw.port)
            assert (await loop.run_in_executor(None, s.text))["type"] == "success"
            for payload in (b"", b"hello", bytes(range(125))):
                s.send(wire.frame(wire.OP_PING, payload))
                f = await loop.run_in_executor(None, s.frame)
                assert (f.opcode, f.payload, f.fin, f.rsv) == (wire.OP_PONG, payload, True, 0)
            s.send_text(b'{"action":"ping"}')
            assert (await loop.run_in_executor(None, s.text))["type"] == "pong"
            s.close()
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


# ---------------------------------------------------------------------------
# Candle streams: "SYMBOL@interval" entries
# ---------------------------------------------------------------------------

INTERVALS = ("1s", "1m", "5m")


def parse(message, intervals=INTERVALS):
    from gateway.protocol import parse_request
    return parse_request(orjson.dumps(message), True, intervals)


def parse_error(message, intervals=INTERVALS) -> str:
    from gateway.protocol import ClientError
    with pytest.raises(ClientError) as info:
        parse(message, intervals)
    assert info.value.kind in ("invalid_symbols", "invalid_since")
    return str(info.value)


def test_candle_entries_are_normalised_and_interned():
    import sys
    req = parse({"action": "subscribe", "symbols": ["AAPL", "aapl@1m", "AAPL@1m", "brk.b@5m", "X@1s"]})
    assert req.symbols == ("AAPL", "AAPL@1m", "BRK.B@5m", "X@1s")
    assert all(s is sys.intern(s) for s in req.symbols)
    req = parse({"action": "unsubscribe", "symbols": ["aapl@1m", "MSFT"]})
    assert req.action == "unsubscribe" and req.symbols == ("AAPL@1m", "MSFT")
    # A symbol of 16 characters is still one with an interval after it.
    assert parse({"action": "subscribe", "symbols": ["A" * 16 + "@5m"]}).symbols == ("A" * 16 + "@5m",)


@pytest.mark.parametrize("entry, message", [
    ("AAPL@2m", 'Invalid candle interval "2m" in "AAPL@2m": must be one of 1s, 1m, 5m'),
    ("AAPL@1M", 'Invalid candle interval "1M" in "AAPL@1M": must be one of 1s, 1m, 5m'),
    ("AAPL@", 'Invalid candle interval "" in "AAPL@": must be one of 1s, 1m, 5m'),
    ("AAPL@1m@1m", 'Invalid candle interval "1m@1m" in "AAPL@1m@1m"'),
    ("@1m", 'Invalid symbol "" in "@1m": must be 1-16 characters'),
    ("AA PL@1m", 'Invalid symbol "AA PL" in "AA PL@1m"'),
    ("ABCDEFGHIJKLMNOPQ@1m", 'Invalid symbol "ABCDEFGHIJKLMNOPQ" in "ABCDEFGHIJKLMNOPQ@1m"'),
    ("stra\u00dfe@1m", "Invalid symbol"),
])
def test_bad_candle_entries_name_the_problem(entry, message):
    for action in ("subscribe", "unsubscribe"):
        assert message in parse_error({"action": action, "symbols": ["OK", entry]})


def test_candle_entries_when_candles_are_off():
    text = parse_error({"action": "subscribe", "symbols": ["AAPL@1m"]}, ())
    assert text == 'Invalid symbol "AAPL@1m": candle streams are not enabled on this server'
    # The default is off: callers that do not know about candles refuse them.
    from gateway.protocol import ClientError, parse_request
    with pytest.raises(ClientError, match="not enabled"):
        parse_request(b'{"action":"subscribe","symbols":["AAPL@1m"]}')
    assert parse({"action": "subscribe", "symbols": ["AAPL"]}, ()).symbols == ("AAPL",)


def test_since_applies_to_trade_symbols_only():
    text = parse_error({"action": "subscribe", "symbols": ["AAPL@1m"],
                        "since": {"AAPL@1m": {"epoch": "e", "seq": 1}}})
    assert "candle stream" in text and '"AAPL@1m"' in text
    req = parse({"action": "subscribe", "symbols": ["AAPL", "AAPL@1m"],
                 "since": {"aapl": {"epoch": "e", "seq": 1}}, "snapshot": True})
    assert req.symbols == ("AAPL", "AAPL@1m") and req.since[0][0] == "AAPL" and req.snapshot


def test_control_handler_counts_candle_streams_against_the_limit():
    """Each entry is one subscription; the resume asks for every new candle
    stream's backfill, and snapshot/since stay with trade symbols."""
    from gateway import _fastpath_py as P
    from gateway.control import ControlHandler
    table = P.SymbolTable()
    handler = ControlHandler(table, clock=lambda: 1, intervals=INTERVALS)
    conn = P.ClientListener()

    def process(msg, limit=3):
        reply, resume = handler.process(conn, orjson.dumps(msg), True, limit)
        return orjson.loads(reply), resume
    reply, resume = process({"action": "subscribe", "symbols": ["aapl", "aapl@1m"], "snapshot": True})
    assert reply["data"] == {"subscribed": ["AAPL", "AAPL@1m"], "currentSubscriptions": ["AAPL", "AAPL@1m"]}
    assert resume == [("AAPL", None), ("AAPL@1m", None)]
    assert table.subscribers("AAPL@1m") == [conn] and table.symbols() == ["AAPL", "AAPL@1m"]
    assert table.lookup(b"channel:candle:1m:AAPL") == [conn]
    reply, resume = process({"action": "subscribe", "symbols": ["AAPL@5m", "AAPL@1s"]})
    assert reply["type"] == "error" and "maximum of 3 symbols" in reply["message"] and resume == []
    reply, resume = process({"action": "subscribe", "symbols": ["AAPL@1m", "AAPL@5m"]})
    assert reply["data"]["subscribed"] == ["AAPL@5m"] and resume == [("AAPL@5m", None)]
    reply, resume = process({"action": "unsubscribe", "symbols": ["aapl@1m", "AAPL@1s"]})
    assert reply["data"] == {"unsubscribed": ["AAPL@1m"], "currentSubscriptions": ["AAPL", "AAPL@5m"]}
    assert table.lookup(b"channel:candle:1m:AAPL") is None
    reply, _ = process({"action": "subscribe", "symbols": ["AAPL@2m"]})
    assert reply["message"] == 'Invalid candle interval "2m" in "AAPL@2m": must be one of 1s, 1m, 5m'
    assert handler.errors == {"symbol_limit": 1, "invalid_symbols": 1}


def test_candle_subscriptions_over_a_socket(aio, impl, redis_server):
    """Replies list candle entries normalised; bad intervals name the
    configured ones; the limit counts every entry; unsubscribe works. (ZQP:
    a symbol no candles are stored for, so no backfill comes between replies.)"""
    async def main():
        async with running_gateway(impl, redis_server.url, candle_intervals=("1m", "5m"),
                                   max_symbols=3) as gw:
            ws, _ = await connect(gw)
            r = await ask(ws, {"action": "subscribe", "symbols": ["zqp", "zqp@1m"]})
            assert r["data"] == {"subscribed": ["ZQP", "ZQP@1m"],
                                 "currentSubscriptions": ["ZQP", "ZQP@1m"]}
            r = await ask(ws, {"action": "subscribe", "symbols": ["ZQP@1s"]})
            assert r == {"type": "error", "timestamp": r["timestamp"],
                         "message": 'Invalid candle interval "1s" in "ZQP@1s": must be one of 1m, 5m'}
            r = await ask(ws, {"action": "subscribe", "symbols": ["msft@5m", "MSFT"]})
            assert "maximum of 3 symbols" in r["message"]
            r = await ask(ws, {"action": "unsubscribe", "symbols": ["ZQP@1m", "ZQP@5m"]})
            assert r["data"] == {"unsubscribed": ["ZQP@1m"], "currentSubscriptions": ["ZQP"]}
            assert gw.table.symbols() == ["ZQP"]
            await ws.close()
        async with running_gateway(impl, redis_server.url, candle_intervals=()) as gw:
            assert gw.redis.patterns == ("channel:trade:*",)
            ws, _ = await connect(gw)
            r = await ask(ws, {"action": "subscribe", "symbols": ["AAPL@1m"]})
            assert r["type"] == "error" and "candle streams are not enabled" in r["message"]
            await ws.close()
    aio(main())
