"""permessage-deflate: each message compressed once, on its own, into bytes
every receiver inflates (the receiver's procedure of RFC 7692, an inflater
kept across messages as browsers keep theirs, websockets); shared by every
deflate client, the same for live and replayed messages, plain below
WS_COMPRESSION_MIN_SIZE; negotiated when offered, and bad compressed input
refused."""
from __future__ import annotations

import asyncio
import os
import random
import zlib

import orjson
import pytest
import websockets
from conftest import running_gateway, wait_until

from gateway._testbase import ws as wire
from gateway.compression import RESPONSE, accept, compress_message, deflate_frame, deflate_payload
from gateway.config import Config

TAIL = b"\x00\x00\xff\xff"
PREFIX = b"channel:trade:"
DEFAULT_MIN_SIZE = Config().compression_min_size


def receiver_inflate(payload: bytes) -> bytes:
    """RFC 7692 7.2.2: append 00 00 ff ff, inflate raw DEFLATE."""
    return zlib.decompressobj(-15).decompress(payload + TAIL)


class KeptInflater:
    """An inflater kept across messages, as a browser keeps its own: each
    message gets 00 00 ff ff appended; at the end of a final block the
    inflater is reset and goes on with the rest of the input. A message's
    bytes must not spill into the next one."""

    def __init__(self):
        self.d = zlib.decompressobj(-15)

    def message(self, payload: bytes) -> bytes:
        out = self.d.decompress(payload + TAIL)
        while self.d.eof:
            rest = self.d.unused_data
            self.d = zlib.decompressobj(-15)
            out += self.d.decompress(rest)
        assert not self.d.unconsumed_tail
        return out


def server_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of each unmasked server frame in ``buf``."""
    out, i = [], 0
    while i < len(buf):
        b0, n = buf[i], buf[i + 1]
        i += 2
        if n == 126:
            n, i = int.from_bytes(buf[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(buf[i:i + 8], "big"), i + 8
        out.append((b0, buf[i:i + n]))
        i += n
    return out


class Pair:
    """One fan-out with a deflate client and a plain client on ZIP (sinks)."""

    def __init__(self, impl, min_size: int):
        self.table = impl.SymbolTable(PREFIX)
        self.fanout = impl.FanOut(self.table)
        self.fanout.compression_min_size = min_size
        self.out = {}
        for name, deflate in (("z", True), ("plain", False)):
            conn = impl.ClientListener()
            conn.deflate = deflate
            sink: list[bytes] = []
            conn.sink = sink.append
            assert self.table.subscribe(conn, "ZIP")
            self.out[name] = sink

    def send(self, payload: bytes) -> tuple[bytes, bytes]:
        """The frames the deflate client and the plain client got for ``payload``."""
        for sink in self.out.values():
            sink.clear()
        self.fanout.dispatch([[b"pmessage", PREFIX + b"*", PREFIX + b"ZIP", payload]])
        z, plain = b"".join(self.out["z"]), b"".join(self.out["plain"])
        assert len(server_frames(z)) == len(server_frames(plain)) == 1
        return z, plain


def payload_for_body(body_len: int, ts_digits: int = 13) -> bytes:
    """A trade payload whose live frame body (envelope included) is ``body_len`` bytes."""
    envelope = len(b'{"type":"trade","data":') + len(b',"timestamp":') + ts_digits + 1
    if body_len == envelope + 2:
        return b"{}"                               # the smallest trade message: 52 bytes
    assert body_len >= envelope + 8
    return b'{"p":"' + b"a" * (body_len - envelope - 8) + b'"}'


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
        async with running_gateway(impl, redis_server.url, compression_min_size=0) as gw:
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


# --- what is sent: one compressor, its bytes on every path -------------------------------

def messages() -> list[bytes]:
    rng = random.Random(5)
    out = [b"", b"{", b"{}", b'{"a":1}']
    for n in (16, 60, 125, 126, 127, 200, 250, 1000, 65535, 65536, 70_000):
        out.append(b'{"pad":"' + bytes(rng.choice(b"0123456789abc,:") for _ in range(n)) + b'"}')
    out.append(os.urandom(70_000))                 # incompressible: stored blocks
    out.append(b"x" * 200_000)                     # long runs
    return out


@pytest.mark.parametrize("message", messages(), ids=lambda m: f"{len(m)}B")
def test_each_message_inflates_on_its_own(message):
    z = deflate_payload(message)
    assert receiver_inflate(z) == message
    frame = compress_message(message)
    assert frame[0] == 0xC1                        # FIN + RSV1 + text
    assert server_frames(frame) == [(0xC1, z)]


def test_an_inflater_kept_across_messages_reads_each_one():
    inflater = KeptInflater()
    for message in messages() * 2:
        assert inflater.message(deflate_payload(message)) == message


@pytest.mark.parametrize("body_len", [52, 60, 127, 128, 129, 200, 300, 4096, 65535, 65536, 80_000])
def test_live_frames_inflate_to_the_plain_message(impl, body_len):
    pair = Pair(impl, min_size=0)
    z, plain = pair.send(payload_for_body(body_len))
    [(b0, body)] = server_frames(plain)
    assert b0 == 0x81 and len(body) == body_len
    [(zb0, zpayload)] = server_frames(z)
    assert zb0 == 0xC1
    assert receiver_inflate(zpayload) == body
    assert KeptInflater().message(zpayload) == body
    # The one compressor: the compiled module and the twin send what it makes,
    # and a replay of the same message is the same frame.
    assert z == compress_message(body) == deflate_frame(plain)
    assert pair.fanout.compressed_messages == 1


@pytest.mark.parametrize("delta, compressed", [(-1, False), (0, True), (1, True)])
def test_min_size_boundary(impl, delta, compressed):
    """With the threshold at T, a message of T-1 bytes goes plain, T and T+1 compressed."""
    threshold = 200
    pair = Pair(impl, min_size=threshold)
    z, plain = pair.send(payload_for_body(threshold + delta))
    [(_, body)] = server_frames(plain)
    assert len(body) == threshold + delta
    if compressed:
        assert z[0] == 0xC1 and receiver_inflate(server_frames(z)[0][1]) == body
        assert pair.fanout.compressed_messages == 1
    else:
        assert z == plain and z[0] == 0x81        # RSV1 clear: a plain frame
        assert pair.fanout.compressed_messages == 0
    # A replay decides the same way and sends the same bytes.
    assert deflate_frame(plain, threshold) == z == compress_message(body, threshold)


def test_min_size_zero_compresses_everything_and_the_default_spares_small_messages(impl):
    pair = Pair(impl, min_size=0)
    z, _ = pair.send(b"{}")
    assert z[0] == 0xC1
    pair = Pair(impl, min_size=DEFAULT_MIN_SIZE)
    z, plain = pair.send(b"{}")
    assert z == plain
    z, plain = pair.send(payload_for_body(DEFAULT_MIN_SIZE))
    assert z[0] == 0xC1


def test_websockets_client_gets_the_exact_messages_either_side_of_the_threshold(aio, impl, redis_server):
    """Through a real gateway at the default threshold: small trades arrive
    plain, larger ones compressed, and the deflate clients read exactly what
    the plain client reads."""
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            z = await ws_client(gw, ["THR"], "deflate")
            plain = await ws_client(gw, ["THR"], None)
            loop = asyncio.get_running_loop()
            s = await loop.run_in_executor(None, browser_like, gw.port, "permessage-deflate")
            await loop.run_in_executor(None, s.text)
            s.send_text(b'{"action":"subscribe","symbols":["THR"]}')
            await loop.run_in_executor(None, s.text)
            await wait_until(lambda: gw.table.subscription_count == 3)
            lengths = [DEFAULT_MIN_SIZE - 30, DEFAULT_MIN_SIZE - 1, DEFAULT_MIN_SIZE,
                       DEFAULT_MIN_SIZE + 1, 1000, 70_000]
            for n in lengths:
                redis_server.client().publish("channel:trade:THR", payload_for_body(n))
            for n in lengths:
                expected = await asyncio.wait_for(plain.recv(), 5)
                assert len(expected.encode()) == n
                assert await asyncio.wait_for(z.recv(), 5) == expected
                f = await loop.run_in_executor(None, s.frame)
                if n < DEFAULT_MIN_SIZE:
                    assert f.rsv == 0 and f.payload == expected.encode()
                else:
                    assert f.rsv == wire.RSV1 and receiver_inflate(f.payload) == expected.encode()
            assert gw.fanout.compressed_messages == sum(n >= DEFAULT_MIN_SIZE for n in lengths)
            s.close()
            for ws in (z, plain):
                await ws.close()
    aio(main())
