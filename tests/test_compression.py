"""permessage-deflate with real clients: negotiated when offered, one
compression per trade shared by every deflate client, plain frames for the
others, and bad compressed input refused."""
from __future__ import annotations

import asyncio
import zlib

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until

from gateway._testbase import ws as wire
from gateway.compression import RESPONSE, accept


async def ws_client(gw, symbols, compression):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", compression=compression)
    await ws.recv()
    await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols}).decode())
    await ws.recv()
    return ws


def browser_like(port: int, extensions: str | None, timeout: float = 5.0) -> wire.RawSocket:
    """A raw client that offers what Chrome and Firefox offer; its
    ``headers`` are the response's."""
    headers = {"Origin": "http://127.0.0.1"}
    if extensions:
        headers["Sec-WebSocket-Extensions"] = extensions
    return wire.connect(port, headers=headers, timeout=timeout)


def compressed(payload: bytes, rsv: int = wire.RSV1) -> bytes:
    """A text frame with RSV1 (or ``rsv``) set: what a client that compressed sends."""
    return wire.frame(wire.OP_TEXT, payload, rsv=rsv)


def test_negotiation_rules():
    assert accept(["permessage-deflate; client_max_window_bits"]) == RESPONSE      # browsers
    assert accept(["permessage-deflate"]) == RESPONSE
    assert accept(["x-webkit-deflate-frame", "permessage-deflate; server_no_context_takeover"]) == RESPONSE
    assert accept(["permessage-deflate; server_max_window_bits=10, permessage-deflate"]) == RESPONSE
    assert accept(["permessage-deflate; server_max_window_bits=10"]) is None
    assert accept(["permessage-deflate; client_max_window_bits=7"]) is None
    assert accept(["permessage-deflate; unknown_param"]) is None
    assert accept(["permessage-deflate; server_no_context_takeover; server_no_context_takeover"]) is None
    assert accept(["x-webkit-deflate-frame"]) is None


def test_deflate_and_plain_clients_share_one_compression(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            z1 = await ws_client(gw, ["ZIP"], "deflate")
            z2 = await ws_client(gw, ["ZIP"], "deflate")
            plain = await ws_client(gw, ["ZIP"], None)
            assert z1.protocol.extensions and z2.protocol.extensions
            assert not plain.protocol.extensions
            assert z1.response.headers["Sec-WebSocket-Extensions"] == RESPONSE
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(
                None, browser_like, gw.port, "permessage-deflate; client_max_window_bits")
            assert s.headers["sec-websocket-extensions"] == RESPONSE
            await loop.run_in_executor(None, s.text)  # welcome (sent uncompressed)
            s.send_text(b'{"action":"subscribe","symbols":["ZIP"]}')
            await loop.run_in_executor(None, s.text)
            await wait_until(lambda: gw.table.subscription_count == 4)
            payloads = [b'{"n":%d,"pad":"%s"}' % (n, b"abc" * (n * 40)) for n in range(5)]
            for p in payloads:
                redis_server.client().publish("channel:trade:ZIP", p)
            for ws in (z1, z2, plain):
                for p in payloads:
                    msg = await asyncio.wait_for(ws.recv(), 5)
                    assert msg.startswith('{"type":"trade","data":' + p.decode() + ',"timestamp":')
            # The browser-like client sees RSV1 frames, each inflatable on its
            # own (server_no_context_takeover), with a fresh inflater each time.
            for p in payloads:
                f = await loop.run_in_executor(None, s.frame)
                assert (f.fin, f.opcode, f.rsv) == (True, wire.OP_TEXT, wire.RSV1)
                text = zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff")
                assert text.startswith(b'{"type":"trade","data":' + p + b',"timestamp":')
            assert gw.fanout.compressed_messages == len(payloads)  # once per trade, not per client
            s.close()
            for ws in (z1, z2, plain):
                await ws.close()
    aio(main())


def test_compression_off_and_declined_offers(aio, impl, redis_server):
    async def main():
        loop = asyncio.get_running_loop()
        async with running_gateway(impl, redis_server.url, compression=False) as gw:
            ws = await ws_client(gw, ["OFF"], "deflate")
            assert not ws.protocol.extensions
            await ws.close()
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            s = await loop.run_in_executor(
                None, browser_like, gw.port, "permessage-deflate; server_max_window_bits=9")
            assert "sec-websocket-extensions" not in s.headers
            await loop.run_in_executor(None, s.text)
            s.send_text(b'{"action":"subscribe","symbols":["OFF"]}')
            await loop.run_in_executor(None, s.text)
            redis_server.client().publish("channel:trade:OFF", b'{"plain":1}')
            f = await loop.run_in_executor(None, s.frame)
            assert (f.fin, f.opcode, f.rsv) == (True, wire.OP_TEXT, 0)
            assert b'"data":{"plain":1}' in f.payload
            s.close()
    aio(main())


@pytest.mark.parametrize("ext,frame,code", [
    # RSV1 without having negotiated the extension
    (None, compressed(zlib.compress(b'{"action":"ping"}')[2:-4]), 1002),
    # negotiated, but the data is not deflate
    ("permessage-deflate", compressed(b"\xff\xff\xff\xff garbage"), 1007),
    # negotiated, and it inflates past the 100 KB limit (a small "bomb")
    ("permessage-deflate", None, 1009),
    # RSV2 is never valid here
    ("permessage-deflate", compressed(b'{"action":"ping"}', rsv=wire.RSV2), 1002),
])
def test_bad_compressed_input_closes(aio, impl, redis_server, ext, frame, code):
    if frame is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = c.compress(b'{"action":"ping","pad":"' + b"a" * 200_000 + b'"}') + c.flush(zlib.Z_SYNC_FLUSH)
        frame = compressed(bomb[:-4])

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, browser_like, gw.port, ext)
            await loop.run_in_executor(None, s.text)
            s.send(frame)
            closing = await loop.run_in_executor(None, s.until_close)
            assert wire.close_code(closing.payload) == code
            s.close()
            await wait_until(lambda: not gw.sessions)
    aio(main())


def test_compressed_control_messages_are_understood(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, browser_like, gw.port, "permessage-deflate")
            await loop.run_in_executor(None, s.text)
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            z = c.compress(b'{"action":"subscribe","symbols":["dfl"]}') + c.flush(zlib.Z_SYNC_FLUSH)
            s.send(compressed(z[:-4]))
            reply = await loop.run_in_executor(None, s.text)
            assert reply["data"]["subscribed"] == ["DFL"]
            s.close()
    aio(main())
