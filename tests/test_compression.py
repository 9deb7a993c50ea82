"""permessage-deflate with real clients: negotiated when offered, one
compression per trade shared by every deflate client, plain frames for the
others, and bad compressed input refused."""
from __future__ import annotations

import asyncio
import base64
import os
import socket
import zlib

import orjson
import pytest
import websockets

from conftest import running_gateway, wait_until
from gateway.compression import RESPONSE, accept
from test_operations import FrameReader


async def ws_client(gw, symbols, compression):
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}", compression=compression)
    await ws.recv()
    await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols}).decode())
    await ws.recv()
    return ws


def browser_like(port: int, extensions: str | None, timeout: float = 5.0):
    """A raw client that offers what Chrome and Firefox offer, and returns the
    response headers and a frame reader."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    s.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Origin: http://127.0.0.1\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"{ext}\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101")
    headers = {k.lower(): v.strip() for k, v in
               (line.split(":", 1) for line in head.decode().split("\r\n")[1:])}
    reader = FrameReader(s)
    reader.buf = rest
    return s, headers, reader


def masked(first_byte: int, payload: bytes) -> bytes:
    mask = b"\x05\x06\x07\x08"
    n = len(payload)
    head = bytes([first_byte, 0x80 | n]) if n < 126 else bytes([first_byte, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_frame(reader: FrameReader) -> tuple[int, bytes]:
    """(first byte, payload) of the next frame."""
    b0, b1 = reader._need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(reader._need(2), "big")
    elif n == 127:
        n = int.from_bytes(reader._need(8), "big")
    return b0, reader._need(n)


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
            s, headers, reader = await loop.run_in_executor(
                None, browser_like, gw.port, "permessage-deflate; client_max_window_bits")
            assert headers["sec-websocket-extensions"] == RESPONSE
            await loop.run_in_executor(None, reader.text)  # welcome (sent uncompressed)
            s.sendall(masked(0x81, b'{"action":"subscribe","symbols":["ZIP"]}'))
            await loop.run_in_executor(None, reader.text)
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
                b0, body = await loop.run_in_executor(None, raw_frame, reader)
                assert b0 == 0xC1
                text = zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff")
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
            s, headers, reader = await loop.run_in_executor(
                None, browser_like, gw.port, "permessage-deflate; server_max_window_bits=9")
            assert "sec-websocket-extensions" not in headers
            await loop.run_in_executor(None, reader.text)
            s.sendall(masked(0x81, b'{"action":"subscribe","symbols":["OFF"]}'))
            await loop.run_in_executor(None, reader.text)
            redis_server.client().publish("channel:trade:OFF", b'{"plain":1}')
            b0, body = await loop.run_in_executor(None, raw_frame, reader)
            assert b0 == 0x81 and b'"data":{"plain":1}' in body
            s.close()
    aio(main())


@pytest.mark.parametrize("ext,frame,code", [
    # RSV1 without having negotiated the extension
    (None, masked(0xC1, zlib.compress(b'{"action":"ping"}')[2:-4]), 1002),
    # negotiated, but the data is not deflate
    ("permessage-deflate", masked(0xC1, b"\xff\xff\xff\xff garbage"), 1007),
    # negotiated, and it inflates past the 100 KB limit (a small "bomb")
    ("permessage-deflate", None, 1009),
    # RSV2 is never valid here
    ("permessage-deflate", masked(0xA1, b'{"action":"ping"}'), 1002),
])
def test_bad_compressed_input_closes(aio, impl, redis_server, ext, frame, code):
    if frame is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = c.compress(b'{"action":"ping","pad":"' + b"a" * 200_000 + b'"}') + c.flush(zlib.Z_SYNC_FLUSH)
        frame = masked(0xC1, bomb[:-4])

    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s, _, reader = await loop.run_in_executor(None, browser_like, gw.port, ext)
            await loop.run_in_executor(None, reader.text)
            s.sendall(frame)
            while True:
                b0, body = await loop.run_in_executor(None, raw_frame, reader)
                if b0 & 0x0F == 0x8:
                    break
            assert int.from_bytes(body[:2], "big") == code
            s.close()
            await wait_until(lambda: not gw.sessions)
    aio(main())


def test_compressed_control_messages_are_understood(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            loop = asyncio.get_running_loop()
            s, _, reader = await loop.run_in_executor(None, browser_like, gw.port, "permessage-deflate")
            await loop.run_in_executor(None, reader.text)
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            z = c.compress(b'{"action":"subscribe","symbols":["dfl"]}') + c.flush(zlib.Z_SYNC_FLUSH)
            s.sendall(masked(0xC1, z[:-4]))
            reply = await loop.run_in_executor(None, reader.text)
            assert reply["data"]["subscribed"] == ["DFL"]
            s.close()
    aio(main())
