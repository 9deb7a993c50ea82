"""Live fuzzing: broken and hostile clients against a running gateway.

    .venv/bin/python -m gateway._testbase.fuzz --duration 60 --seed 1
    .venv/bin/python -m gateway._testbase.fuzz --duration 15 --seed 7 --connections 2000
    .venv/bin/python -m gateway._testbase.fuzz --seed 7 --only 123,456 -v   # replay connections

It starts its own redis-server (free loopback port, never 6379) and the gateway
(``python -m gateway``, a subprocess), then:

  watchers   --watchers well-behaved clients subscribed to all --symbols
             symbols, answering pings, checking every trade's seq;
  publisher  --rate trades/s over those symbols, recording what each PUBLISH
             returned;
  fuzzer     up to --connections connections, --concurrency at a time, until
             --duration runs out (cases still running 2 s later are
             cancelled and not counted). Each connection plays one case (below),
             chosen and filled in from its own random generator, seeded with
             "<seed>:<index>": the same seed and index replay the same bytes
             (--only INDEX). Timing between connections is not replayed.

Cases: garbage before the HTTP upgrade, malformed upgrade requests (missing
or bad headers, wrong method/version, huge or binary heads, bad
permessage-deflate offers), a handshake dribbled in pieces, an upgrade with a
frame pipelined behind it, garbage after the upgrade, random JSON control
messages (valid frames, sometimes fragmented with a ping in the middle),
random bytes in text and binary frames, oversized frames and fragmented
messages, huge or non-minimal claimed lengths, bad opcodes, unmasked frames,
reserved bits, bad continuations, malformed close frames, ping floods,
control-message floods over the rate limit, thousands of tiny fragments,
permessage-deflate messages (valid, corrupt, and inflating past the size
limit), plain HTTP requests to the WebSocket port, half-closes, slow heads,
and RSTs at random points.

Where the README or RFC 6455 says what must happen (an error reply and the
connection stays open, close 1002 for protocol violations, 1009 for an
oversized message, one pong per ping, ...), a different outcome is recorded as
a finding, with the seed and index that replay it. Findings are printed; they
do not change the exit status unless --strict is given.

Verdict (exit 0 when all hold, 1 otherwise):
  alive        the gateway process is alive at the end and exits 0 on SIGTERM;
  RSS          its peak RSS during the run stays within --rss-bound-mb of the
               RSS before the fuzzing began;
  watchers     every trade whose PUBLISH returned >= 1 reached every watcher,
               in order, once; no watcher was disconnected;
  connections  after the fuzzer closed its sockets, the gateway holds only the
               watchers' connections: its end of every other connection left
               ESTABLISHED/CLOSE_WAIT (read from /proc/net/tcp), and when
               /metrics answers, gateway_connections equals --watchers;
  still serves a fresh client can connect, subscribe and get a pong;
  no traceback in the gateway log.
Exit 2 when the harness itself cannot start.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing as mp
import os
import random
import statistics
import struct
import sys
import time
import zlib
from collections import Counter

import orjson

from . import soak  # the load, the publisher and the loss accounting
from . import ws as wire
from .loops import run_loop
from .net import HOST, HarnessError, scrape_metrics
from .process import die_with_parent
from .procfs import TCP_CLOSE_WAIT, TCP_ESTABLISHED, tcp_peer_ports
from .soak import run_session, say
from .ws import FrameParser, close_code, frame, split_http_head, text_frame, upgrade_request

MAX_MESSAGE = 102400  # the gateway's WS_MAX_MESSAGE_SIZE; set explicitly below


# ---------------------------------------------------------------------------
# a raw connection that reports what happened instead of raising
# ---------------------------------------------------------------------------

class Conn:
    """One fuzz connection: raw bytes out, frames and outcomes in."""

    def __init__(self, reader, writer, port):
        self.r, self.w, self.port = reader, writer, port
        self.parser = FrameParser()
        self.pending: list = []
        self.headers: dict[str, str] = {}
        self.deflate_agreed = False  # permessage-deflate: RSV1 messages come compressed
        self.inflater = None         # kept across messages unless server_no_context_takeover
        self.trades = 0
        self.frag: list[bytes] | None = None
        self.frag_compressed = False

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        return cls(reader, writer, port)

    def send(self, data: bytes) -> None:
        if not self.w.is_closing():
            self.w.write(data)

    async def send_drain(self, data: bytes, timeout: float = 5) -> None:
        self.send(data)
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self.w.drain(), timeout)

    async def _read(self, timeout: float) -> bytes | str:
        try:
            data = await asyncio.wait_for(self.r.read(65536), timeout)
        except TimeoutError:
            return "open"
        except ConnectionResetError:
            return "reset"
        except OSError as exc:
            return f"error {exc.errno}"
        return data or "eof"

    async def head(self, timeout: float = 7) -> str:
        """Read an HTTP response head: 'http NNN', or how the connection ended."""
        buf = b""
        deadline = time.monotonic() + timeout
        while (parts := split_http_head(buf)) is None:
            got = await self._read(max(0.01, deadline - time.monotonic()))
            if isinstance(got, str):
                return got if not buf else f"{got} after {len(buf)} bytes"
            buf += got
        head, rest = parts
        lines = head.decode("latin-1").split("\r\n")
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        ext = self.headers.get("sec-websocket-extensions", "")
        if "permessage-deflate" in ext:
            self.deflate_agreed = True
            if "server_no_context_takeover" not in ext:
                self.inflater = zlib.decompressobj(-15)
        self.pending.extend(self.parser.feed(rest))
        fields = lines[0].split(" ", 2)
        return f"http {fields[1]}" if len(fields) > 1 else f"http ? {lines[0][:30]!r}"

    async def upgrade(self, request: bytes | None = None, welcome: bool = True) -> str:
        self.send(request or upgrade_request(self.port))
        status = await self.head()
        if status != "http 101" or not welcome:
            return status
        got = await self.message(5)
        if not (isinstance(got, dict) and got.get("type") == "success"):
            return f"no welcome ({got})"
        return status

    async def frame(self, timeout: float):
        """Next frame (fin, opcode, payload, rsv bits), or a string saying how it ended."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            got = await self._read(max(0.01, deadline - time.monotonic()))
            if isinstance(got, str):
                return got
            self.pending.extend(self.parser.feed(got))
        return self.pending.pop(0)

    async def message(self, timeout: float = 3):
        """Next control reply (a dict), skipping trades; or 'close CODE', 'eof', 'reset', 'open'.

        Pings are answered (a fuzz connection that reads is a live client).
        Messages compressed with permessage-deflate are inflated.
        """
        deadline = time.monotonic() + timeout
        while True:
            f = await self.frame(max(0.01, deadline - time.monotonic()))
            if isinstance(f, str):
                return f
            fin, op, payload, rsv = f
            if op == 0x9:
                self.send(frame(0xA, payload))
                continue
            if op == 0x8:
                return f"close {close_code(payload)}"
            if op in (0x1, 0x2) or (op == 0x0 and self.frag is not None):
                if op != 0x0:
                    self.frag, self.frag_compressed = [], bool(rsv & 4)  # RSV1: compressed
                frag = self.frag
                assert frag is not None  # just started, or a continuation of one
                frag.append(payload)
                if not fin:
                    continue
                data, self.frag = b"".join(frag), None
                if self.frag_compressed:
                    if not self.deflate_agreed:
                        return "compressed frame without permessage-deflate"
                    try:
                        inflater = self.inflater or zlib.decompressobj(-15)
                        data = inflater.decompress(data + b"\x00\x00\xff\xff")
                    except zlib.error:
                        return "undecodable compressed frame"
                try:
                    msg = orjson.loads(data)
                except orjson.JSONDecodeError:
                    return f"non-JSON text {data[:40]!r}"
                if isinstance(msg, dict) and msg.get("type") in ("trade", "gap"):
                    self.trades += 1
                    continue
                return msg
            # pongs and anything else: not a reply

    async def outcome(self, timeout: float = 3) -> str:
        """How the gateway ends this connection: 'close CODE', 'eof', 'reset', or 'open'."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.message(max(0.01, deadline - time.monotonic()))
            if isinstance(got, str):
                return got

    async def pongs(self, want: int, timeout: float = 3) -> tuple[list[bytes], str | None]:
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            f = await self.frame(max(0.01, deadline - time.monotonic()))
            if isinstance(f, str):
                return out, f
            if f[1] == 0xA:
                out.append(f[2])
            elif f[1] == 0x8:
                return out, f"close {close_code(f[2])}"
        return out, None

    async def peek_end(self, wait: float = 0.02) -> str | None:
        """Has the gateway ended the connection already? Read what is there
        (keeping the frames) and say 'close CODE', 'eof', 'reset', or None.

        Lets a sender stop as soon as the gateway refused: writing on into a
        closed connection turns its close frame into a RST.
        """
        got = await self._read(wait)
        if isinstance(got, str):
            return None if got == "open" else got
        self.pending.extend(self.parser.feed(got))
        for f in self.pending:
            if f[1] == 0x8:
                return f"close {close_code(f[2])}"
        return None

    def rst(self) -> None:
        wire.rst(self.w)

    def close(self) -> None:
        """Drop the connection now (FIN, or RST if the gateway's bytes are unread)."""
        self.w.transport.abort()


@functools.lru_cache(maxsize=4)
def zeros_deflated(n: int) -> bytes:
    """``n`` zero bytes deflated (cached: the bombs are made once per process)."""
    return deflate(b"\x00" * n)


deflate = wire.deflate_message


# ---------------------------------------------------------------------------
# random input
# ---------------------------------------------------------------------------

WEIRD_SYMBOLS = ["AAPL", "aapl", "BRK.B", "X-Y", "", "A" * 16, "A" * 17, "ÄPFEL", "A B", "A\x00",
                 "\U0001f680", "1", ".", "-", "*", "?", "channel:trade:X", "A" * 5000, " AAPL",
                 "İ", "ß", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]


def rand_string(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 20)))
    if kind == 1:
        return "".join(chr(rng.randrange(0, 0x2FFFF)) for _ in range(rng.randrange(0, 10))
                       ).encode("utf-8", "replace").decode("utf-8", "replace")
    if kind == 2:
        return rng.choice(WEIRD_SYMBOLS)
    return rng.choice(("subscribe", "unsubscribe", "ping", "SUBSCRIBE", "Subscribe ", "pong"))


def rand_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([
            None, True, False, 0, -1, 1.5, -0.0, 1e308, 5e-324, 2**53 + 1, 2**63, -2**63 - 1,
            10**40, rand_string(rng), rand_string(rng), rng.randrange(-1000, 1000)])
    if r < 0.75:
        return [rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {rand_string(rng): rand_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def dumps(rng: random.Random, value) -> bytes:
    """JSON text of ``value``: the stdlib, because it writes integers of any
    size (orjson stops at 64 bits); ASCII-escaped or raw UTF-8 at random."""
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8", "replace")


def control_message(rng: random.Random, symbols: list[str]) -> bytes:
    """A control message: mostly near the schema, sometimes far from it."""
    pool = symbols + WEIRD_SYMBOLS
    r = rng.random()
    if r < 0.35:  # well-formed action, random symbols
        action = rng.choice(("subscribe", "unsubscribe", "ping"))
        msg: dict[str, object] = {"action": action}
        if action != "ping" or rng.random() < 0.3:
            msg["symbols"] = [rng.choice(pool) for _ in range(rng.randrange(0, 8))]
        if rng.random() < 0.2:
            msg[rand_string(rng)] = rand_value(rng)
        return dumps(rng, msg)
    if r < 0.55:  # right keys, wrong types
        return dumps(rng, {"action": rng.choice(["subscribe", rand_value(rng)]),
                           "symbols": rand_value(rng)})
    if r < 0.70:  # any JSON value at all
        return dumps(rng, rand_value(rng))
    if r < 0.80:  # deep nesting, around and past parser limits
        depth = rng.choice((100, 1023, 1024, 1025, 5000, 15000))  # 15000 levels: < 100 KB
        inner = rng.choice(("[", '{"a":'))
        close = "]" if inner == "[" else "}"
        return (inner * depth + "1" + close * depth).encode()
    if r < 0.90:  # almost JSON
        base = orjson.dumps({"action": "subscribe", "symbols": [rng.choice(symbols)]}).decode()
        return rng.choice([
            base[:rng.randrange(len(base))], base + rng.choice(("x", ",", "}", " {}")),
            "\ufeff" + base, base.replace('"', "'"), '{"action":"ping",}', "NaN", "[1,2",
            '{"action":"subscribe","action":"ping"}', '{"action":"ping"} {"action":"ping"}',
            '{"action":"subscribe","symbols":["' + "A" * 90000 + '"]}',
            '{"action":"\\ud800"}', "", " ", "null", "/*c*/{}",
        ]).encode("utf-8", "surrogatepass")
    # valid UTF-8 text that is not JSON
    return rand_string(rng).encode("utf-8", "replace")


# ---------------------------------------------------------------------------
# the cases: each returns (variant, outcome, finding or None)
# ---------------------------------------------------------------------------

class Case:
    def __init__(self, rng, port, symbols):
        self.rng, self.port, self.symbols = rng, port, symbols
        self.conns: list[Conn] = []

    async def open(self) -> Conn:
        """A connection this case owns: aborted when the case ends, however it ends."""
        conn = await Conn.open(self.port)
        self.conns.append(conn)
        return conn

    def release(self) -> None:
        for conn in self.conns:
            if not conn.w.is_closing():
                conn.close()


def expect(outcome: str, allowed: tuple[str, ...], what: str) -> str | None:
    return None if outcome in allowed else f"{what}: expected {' or '.join(allowed)}, got {outcome}"


async def case_garbage_preupgrade(c: Case):
    """Random bytes where the HTTP request belongs."""
    conn = await c.open()
    rng = c.rng
    data = rng.randbytes(rng.randrange(1, 4096))
    variant = "random"
    if rng.random() < 0.4:
        data += b"\r\n\r\n"  # a complete (garbage) head: the parser must answer now
        variant = "random+crlfcrlf"
    conn.send(data)
    if rng.random() < 0.3:
        await asyncio.sleep(rng.uniform(0, 0.2))
        conn.rst()
        return variant + "+rst", "abandoned", None
    out = await conn.head(timeout=8)  # the handshake timeout is 5 s
    conn.close()
    if out == "http 101":
        return variant, out, "garbage request upgraded to WebSocket"
    if out == "open":
        return variant, out, "garbage request still open after 8 s (handshake timeout not applied)"
    return variant, out, None


def _request(port, *, method="GET", path="/", version="HTTP/1.1", headers=None, drop=(),
             key=None, lower_names=False) -> bytes:
    key = key if key is not None else "dGhlIHNhbXBsZSBub25jZQ=="
    h = {"Host": f"{HOST}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
         "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
    for d in drop:
        h.pop(d, None)
    h.update(headers or {})
    lines = [f"{method} {path} {version}"] + [
        f"{k.lower() if lower_names else k}: {v}" for k, v in h.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


# Upgrade requests RFC 6455 section 4.2.1 says a server must refuse, and ones
# it must accept. ``None`` marks requests whose fate the RFC leaves open.
def bad_upgrades(port, rng):
    return [
        ("no Upgrade", _request(port, drop=("Upgrade",)), False),
        ("Upgrade: h2c", _request(port, headers={"Upgrade": "h2c"}), False),
        ("no Connection", _request(port, drop=("Connection",)), False),
        ("no key", _request(port, drop=("Sec-WebSocket-Key",)), False),
        ("short key", _request(port, key="c2hvcnQ="), False),
        ("key not base64", _request(port, key="!!!not base64!!!"), False),
        ("version 8", _request(port, headers={"Sec-WebSocket-Version": "8"}), False),
        ("no version", _request(port, drop=("Sec-WebSocket-Version",)), False),
        ("POST", _request(port, method="POST"), False),
        ("HTTP/1.0", _request(port, version="HTTP/1.0"), False),
        ("no Host", _request(port, drop=("Host",)), None),
        ("lower-case header names", _request(port, lower_names=True), True),
        ("Upgrade: WebSocket", _request(port, headers={"Upgrade": "WebSocket"}), True),
        ("Connection: keep-alive, Upgrade",
         _request(port, headers={"Connection": "keep-alive, Upgrade"}), True),
        ("path with query", _request(port, path="/?token=" + "x" * 100), True),
        ("8 KB path", _request(port, path="/" + "a" * 8192), None),
        ("64 KB header", _request(port, headers={"X-Big": "b" * 65536}), None),
        ("1000 headers", _request(port, headers={f"X-{i}": "v" for i in range(1000)}), None),
        ("NUL in header", _request(port, headers={"X-Nul": "a\x00b"}), None),
        ("bytes 0x80-0xff in head", _request(port, headers={"X-Bin": bytes(range(128, 256)).decode(
            "latin-1")}), None),
        ("LF line ends", _request(port).replace(b"\r\n", b"\n"), None),
        ("header without colon", _request(port).replace(b"Connection: Upgrade\r\n",
                                                         b"Connection: Upgrade\r\nnocolon\r\n"), None),
        ("duplicate key", _request(port).replace(
            b"\r\n\r\n", b"\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n"), None),
        ("deflate offer", _request(port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"}), True),
        ("deflate, bad params", _request(port, headers={"Sec-WebSocket-Extensions":
                                                        "permessage-deflate; server_max_window_bits=99; "
                                                        "client_max_window_bits=x; foo"}), None),
        ("deflate, repeated param", _request(port, headers={"Sec-WebSocket-Extensions":
                                                            "permessage-deflate; server_no_context_takeover; "
                                                            "server_no_context_takeover"}), None),
        ("deflate, window 8", _request(port, headers={"Sec-WebSocket-Extensions":
                                                      "permessage-deflate; client_max_window_bits=8"}), None),
        ("unknown extension", _request(port, headers={"Sec-WebSocket-Extensions": "x-made-up; a=1"}), True),
        ("subprotocol offer", _request(port, headers={"Sec-WebSocket-Protocol": "chat, superchat"}), True),
        ("Origin evil", _request(port, headers={"Origin": "https://evil.example"}), None),
        ("X-Forwarded-For garbage", _request(port, headers={"X-Forwarded-For": "1.2.3.4, ::zz, ;"}), True),
        ("Authorization garbage", _request(port, headers={"Authorization": "Bearer " + "A" * 300}), None),
        ("random header bytes", _request(port, headers={"X-R": rng.randbytes(200).decode("latin-1")
                                                        .replace("\r", "").replace("\n", "")}), None),
    ]


async def case_bad_upgrade(c: Case):
    """A malformed (or unusual but valid) upgrade request."""
    name, request, must_accept = c.rng.choice(bad_upgrades(c.port, c.rng))
    conn = await c.open()
    conn.send(request)
    out = await conn.head(timeout=8)
    finding = None
    if must_accept is False and out == "http 101":
        finding = f"invalid upgrade accepted ({name})"
    elif must_accept is True and out != "http 101":
        finding = f"valid upgrade refused ({name}): {out}"
    elif out in ("open",) or out.startswith("open after"):
        finding = f"no answer within 8 s ({name})"
    if out == "http 101" and name.startswith("deflate") and conn.deflate_agreed:
        # Agreed on compression: a compressed ping must get a pong.
        reply = await conn.message(3)  # the welcome
        conn.send(frame(0x1, deflate(b'{"action":"ping"}'), rsv=4))
        reply = await conn.message(3)
        if not (isinstance(reply, dict) and reply.get("type") == "pong"):
            finding = f"compressed ping after '{name}' got {reply}"
    conn.close()
    return name, out, finding


async def case_slow_handshake(c: Case):
    """A valid upgrade request in small pieces: must still upgrade and serve."""
    conn = await c.open()
    req = upgrade_request(c.port)
    cuts = sorted(c.rng.sample(range(1, len(req)), c.rng.randrange(2, 8)))
    for a, b in zip([0, *cuts], [*cuts, len(req)], strict=True):
        conn.send(req[a:b])
        await asyncio.sleep(c.rng.uniform(0, 0.3))
    out = await conn.head()
    if out != "http 101":
        conn.close()
        return "pieces", out, f"valid upgrade in pieces: {out}"
    await conn.message(3)  # welcome
    conn.send(text_frame({"action": "ping"}))
    reply = await conn.message(3)
    conn.close()
    ok = isinstance(reply, dict) and reply.get("type") == "pong"
    return "pieces", "pong" if ok else str(reply), None if ok else f"no pong after slow upgrade: {reply}"


async def case_pipelined(c: Case):
    """Upgrade request and a subscribe frame in one write."""
    conn = await c.open()
    conn.send(upgrade_request(c.port) + text_frame({"action": "subscribe", "symbols": c.symbols[:2]}))
    out = await conn.head()
    if out != "http 101":
        conn.close()
        return "pipelined", out, f"upgrade with a pipelined frame: {out}"
    replies = [await conn.message(3), await conn.message(3)]
    conn.close()
    kinds = [r.get("type") if isinstance(r, dict) else r for r in replies]
    ok = kinds == ["success", "success"]
    return "pipelined", "+".join(map(str, kinds)), None if ok else f"pipelined subscribe: {kinds}"


async def ws(c: Case) -> Conn:
    conn = await c.open()
    out = await conn.upgrade()
    if out != "http 101":
        conn.close()
        raise ConnectionError(f"upgrade failed: {out}")
    return conn


async def case_garbage_after_upgrade(c: Case):
    conn = await ws(c)
    conn.send(c.rng.randbytes(c.rng.randrange(1, 2048)))
    if c.rng.random() < 0.3:
        conn.rst()
        return "random", "abandoned", None
    out = await conn.outcome(2)
    conn.close()
    return "random", out, None


async def case_json_control(c: Case):
    """Random control messages in valid frames: one reply each, connection stays open."""
    conn = await ws(c)
    rng = c.rng
    n = rng.randrange(1, 16)  # below the gateway's per-connection burst allowance
    sent_fragmented = False
    for _ in range(n):
        payload = control_message(rng, c.symbols)
        if rng.random() < 0.2 and len(payload) > 2:
            # Fragmented, sometimes with a ping between the fragments (allowed).
            cut = rng.randrange(1, len(payload))
            conn.send(frame(0x1, payload[:cut], fin=False))
            if rng.random() < 0.5:
                conn.send(frame(0x9, b"mid"))
            conn.send(frame(0x0, payload[cut:]))
            sent_fragmented = True
        else:
            conn.send(frame(0x1, payload))
    conn.send(text_frame({"action": "ping"}))
    kinds: Counter[object] = Counter()
    finding = None
    for i in range(n + 1):
        reply = await conn.message(5)
        if not isinstance(reply, dict):
            finding = f"reply {i + 1} of {n + 1} to control messages: {reply}"
            break
        kinds[reply.get("type")] += 1
        if reply.get("type") not in ("success", "error", "pong"):
            finding = f"unexpected reply type: {str(reply)[:80]}"
            break
    else:
        if kinds["pong"] < 1:
            finding = f"no pong at the end of {n} control messages ({dict(kinds)})"
    conn.rst() if rng.random() < 0.5 else conn.close()
    variant = "fragmented" if sent_fragmented else "whole"
    return variant, "replied" if finding is None else "broken", finding


async def case_random_text(c: Case):
    """Random bytes (mostly invalid UTF-8) in a text frame."""
    conn = await ws(c)
    conn.send(frame(0x1, c.rng.randbytes(c.rng.randrange(1, 600))))
    reply = await conn.message(3)
    conn.close()
    if isinstance(reply, dict):
        ok = reply.get("type") == "error"
        return "bytes", f"reply {reply.get('type')}", None if ok else f"random bytes got {reply}"
    # RFC 6455 8.1: invalid UTF-8 in a text message closes with 1007.
    return "bytes", reply, expect(reply, ("close 1007",), "random bytes in a text frame")


async def case_binary(c: Case):
    conn = await ws(c)
    conn.send(frame(0x2, c.rng.randbytes(c.rng.randrange(0, 600))))
    reply = await conn.message(3)
    conn.close()
    out = f"reply {reply.get('type')}" if isinstance(reply, dict) else reply
    return "binary", out, expect(out, ("reply error",), "binary frame (README: error reply)")


async def case_oversized(c: Case):
    """A message over WS_MAX_MESSAGE_SIZE, whole or in fragments: close 1009."""
    conn = await ws(c)
    rng = c.rng
    size = MAX_MESSAGE + rng.randrange(1, 60000)
    body = b'{"action":"ping","pad":"' + b"x" * size + b'"}'
    if rng.random() < 0.5:
        # The header alone says too big; the rest follows only if the gateway
        # has not refused by then.
        variant = "one frame"
        whole = frame(0x1, body)
        await conn.send_drain(whole[:1024])
        if await conn.peek_end(0.5) is None:
            await conn.send_drain(whole[1024:])
    else:
        # Fragments up to the one that crosses the limit; then wait: the
        # gateway must refuse without waiting for the final fragment.
        variant = "fragments"
        step = len(body) // rng.randrange(2, 12) + 1
        sent = 0
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            await conn.send_drain(frame(0x1 if i == 0 else 0x0, chunk, fin=i + step >= len(body)))
            sent += len(chunk)
            if sent > MAX_MESSAGE or await conn.peek_end() is not None:
                break
    out = await conn.outcome(3)
    conn.close()
    return variant, out, expect(out, ("close 1009",), f"oversized message ({variant})")


async def case_claimed_length(c: Case):
    """A frame header claiming a huge or malformed length."""
    conn = await ws(c)
    rng = c.rng
    variant, length, want = rng.choice([
        ("64-bit max+1", MAX_MESSAGE + 1, "close 1009"),
        ("64-bit 2^31", 2**31, "close 1009"),
        ("64-bit 2^40", 2**40, "close 1009"),
        ("64-bit 2^63-1", 2**63 - 1, "close 1009"),
        ("64-bit MSB set", 2**63 + 5, "close 1002"),
        ("64-bit non-minimal 100", 100, "close 1002"),
        ("16-bit non-minimal 5", 5, "close 1002"),
    ])
    b0 = 0x81
    if variant.startswith("16-bit"):
        head = bytes([b0, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([b0, 0x80 | 127]) + length.to_bytes(8, "big")
    conn.send(head + os.urandom(4) + rng.randbytes(rng.randrange(0, 200)))
    out = await conn.outcome(3)
    conn.close()
    allowed = (want, "close 1002") if want == "close 1009" else (want,)
    return variant, out, expect(out, allowed, f"claimed length {variant}")


async def case_bad_opcode(c: Case):
    conn = await ws(c)
    op = c.rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
    conn.send(frame(op, c.rng.randbytes(c.rng.randrange(0, 50))))
    out = await conn.outcome(3)
    conn.close()
    return f"opcode {op:#x}", out, expect(out, ("close 1002",), f"opcode {op:#x}")


async def case_unmasked(c: Case):
    conn = await ws(c)
    conn.send(frame(0x1, b'{"action":"ping"}', mask=False))
    out = await conn.outcome(3)
    conn.close()
    return "unmasked text", out, expect(out, ("close 1002",), "unmasked client frame")


async def case_reserved_bits(c: Case):
    """RSV bits set with no extension agreed (RFC 6455 5.2: fail the connection)."""
    conn = await ws(c)
    rsv = c.rng.randrange(1, 8)
    conn.send(frame(0x1, b'{"action":"ping"}', rsv=rsv))
    got = await conn.message(3)
    out = f"reply {got.get('type')}" if isinstance(got, dict) else got
    if isinstance(got, dict):
        out = f"{out}, then {await conn.outcome(1)}"
    conn.close()
    return f"rsv {rsv:03b}", out, expect(out, ("close 1002",), f"RSV bits {rsv:03b} without an extension")


async def case_bad_sequence(c: Case):
    """Bad continuations and malformed control frames; one valid interleaving."""
    conn = await ws(c)
    rng = c.rng
    ping = b'{"action":"ping"}'
    variant, frames, want = rng.choice([
        ("continuation first", [frame(0x0, ping)], ("close 1002",)),
        ("text inside fragmented text", [frame(0x1, ping[:5], fin=False), frame(0x1, ping)],
         ("close 1002",)),
        ("binary inside fragmented text", [frame(0x1, ping[:5], fin=False), frame(0x2, ping)],
         ("close 1002",)),
        ("fragmented ping", [frame(0x9, b"a", fin=False)], ("close 1002",)),
        ("ping over 125 bytes", [frame(0x9, b"p" * 126)], ("close 1002",)),
        ("close with 1-byte body", [frame(0x8, b"\x03")], ("close 1002",)),
        ("close code 0", [frame(0x8, struct.pack("!H", 0))], ("close 1002",)),
        ("close code 999", [frame(0x8, struct.pack("!H", 999))], ("close 1002",)),
        ("close code 1015", [frame(0x8, struct.pack("!H", 1015))], ("close 1002",)),
        ("close code 1005", [frame(0x8, struct.pack("!H", 1005))], ("close 1002",)),
        ("close code 1006", [frame(0x8, struct.pack("!H", 1006))], ("close 1002",)),
        ("close code 2999", [frame(0x8, struct.pack("!H", 2999))], ("close 1002",)),
        ("close, invalid UTF-8 reason", [frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe")],
         ("close 1007", "close 1002")),
        ("close code 1000", [frame(0x8, struct.pack("!H", 1000))], ("close 1000",)),
        ("close code 4321", [frame(0x8, struct.pack("!H", 4321) + b"bye")], ("close 4321",)),
        # RFC 6455 5.5.1/7.4: echo the close; 1005 and 0 never go on the wire.
        ("empty close", [frame(0x8, b"")], ("close None", "close 1000")),
        ("valid fragments + ping", [frame(0x1, ping[:3], fin=False), frame(0x9, b"x"),
                                    frame(0x0, ping[3:9], fin=False), frame(0x0, ping[9:])],
         ("reply pong",)),
        # Reassembly cost: thousands of 1-byte fragments of one small message.
        ("3000 one-byte fragments", [frame(0x1, b" ", fin=False)]
         + [frame(0x0, b" ", fin=False) for _ in range(3000)] + [frame(0x0, ping)],
         ("reply pong",)),
    ])
    conn.send(b"".join(frames))
    got = await conn.message(3)
    out = f"reply {got.get('type')}" if isinstance(got, dict) else got
    conn.close()
    return variant, out, expect(out, want, variant)


async def case_msg_flood(c: Case):
    """Control messages far faster than the per-connection rate allows.

    Each gets a pong or an error; the gateway may end it with 1008 (its
    documented answer to a client that keeps going over the rate).
    """
    conn = await ws(c)
    n = c.rng.randrange(30, 300)
    conn.send(b"".join(text_frame({"action": "ping"}) for _ in range(n)))
    kinds: Counter[object] = Counter()
    end = None
    for _ in range(n):
        got = await conn.message(3)
        if not isinstance(got, dict):
            end = got
            break
        kinds[got.get("type")] += 1
    end = end or await conn.outcome(0.5)
    conn.close()
    odd = set(kinds) - {"pong", "error"}
    shape = ("all pongs" if kinds["pong"] == n else
             "pongs then errors" if kinds["error"] else f"{sum(kinds.values())}/{n} replies")
    out = f"{shape}, {end}"
    finding = None
    if odd:
        finding = f"message flood got replies of type {sorted(map(str, odd))}"
    elif end not in ("open", "close 1008", "reset"):
        # "reset": the gateway closed with our flood still unread in its
        # socket, so the kernel sent a RST, which can overtake its close frame.
        finding = f"message flood ended with {end}"
    elif end == "open" and sum(kinds.values()) != n:
        finding = f"message flood: {sum(kinds.values())} replies to {n} messages, still open"
    return f"{n // 100 * 100}+ msgs", out, finding


async def case_ping_flood(c: Case):
    """Many pings: one pong each, same payload (RFC 6455 5.5.3)."""
    conn = await ws(c)
    n = c.rng.randrange(5, 200)
    payloads = [c.rng.randbytes(c.rng.randrange(0, 126)) for _ in range(n)]
    conn.send(b"".join(frame(0x9, p) for p in payloads))
    got, ended = await conn.pongs(n, 5)
    conn.close()
    ok = got == payloads
    out = f"{len(got)}/{n} pongs" + (f", {ended}" if ended else "")
    return "pings", "all pongs" if ok else out, None if ok else f"ping flood: {out}"


async def case_deflate(c: Case):
    """permessage-deflate: valid, corrupt, and inflating past the size limit."""
    conn = await c.open()
    out = await conn.upgrade(_request(c.port, headers={"Sec-WebSocket-Extensions": "permessage-deflate"}))
    if out != "http 101":
        conn.close()
        return "offer", out, f"deflate offer refused: {out}"
    if not conn.deflate_agreed:
        conn.close()
        return "not agreed", "plain", None  # compression off: nothing to test
    rng = c.rng
    variant, body, want = rng.choice([
        ("valid ping", deflate(b'{"action":"ping"}'), ("reply pong",)),
        ("valid subscribe", deflate(orjson.dumps({"action": "subscribe", "symbols": c.symbols[:1]})),
         ("reply success",)),
        ("valid, fragmented", None, ("reply pong",)),
        ("corrupt", rng.randbytes(rng.randrange(1, 300)), ("close 1007", "close 1002", "reply error")),
        ("bomb just over the limit", deflate(b" " * (MAX_MESSAGE + 1)), ("close 1009",)),
        ("bomb 64 MB", zeros_deflated(64 << 20), ("close 1009", "close 1007")),
        ("bomb 1 GB in fragments", None, ("close 1009", "close 1007")),
    ])
    if body is not None:
        await conn.send_drain(frame(0x1, body, rsv=4))
    elif variant == "valid, fragmented":
        z = deflate(b'{"action":"ping","pad":"' + b"p" * 3000 + b'"}')
        cut = rng.randrange(1, len(z))
        conn.send(frame(0x1, z[:cut], fin=False, rsv=4) + frame(0x0, z[cut:]))
    else:
        # 16 MB of zeros per fragment (about 16 KB deflated), RSV1 on the
        # first frame only, 64 of them, until the gateway stops it. Copies
        # of a sync-flushed block of zeros chain into one valid stream.
        chunk = zeros_deflated(16 << 20)
        await conn.send_drain(frame(0x1, chunk, fin=False, rsv=4))
        for _ in range(63):
            if await conn.peek_end() is not None:
                break
            await conn.send_drain(frame(0x0, chunk, fin=False), timeout=1)
    got = await conn.message(3)
    out = f"reply {got.get('type')}" if isinstance(got, dict) else got
    conn.close()
    return variant, out, expect(out, want, f"deflate {variant}")


async def case_http(c: Case):
    """Plain HTTP on the WebSocket port: an answer, then the connection closes."""
    rng = c.rng
    method = rng.choice(("GET", "GET", "HEAD", "POST", "OPTIONS", "BREW"))
    path = rng.choice(("/metrics", "/healthz", "/readyz", "/readyz?x=" + "y" * 2000, "/nope",
                       "/metrics/../metrics", "*", "http://evil/x", "/%00"))
    conn = await c.open()
    conn.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    out = await conn.head(timeout=8)
    conn.close()
    finding = None if out.startswith("http ") else f"{method} {path}: {out}"
    return f"{method} {path[:20]}", out, finding


async def case_half_close(c: Case):
    """Upgrade, then shut down the write side: the gateway must let go."""
    conn = await ws(c)
    if c.rng.random() < 0.5:
        conn.send(text_frame({"action": "subscribe", "symbols": c.symbols[:3]}))
    conn.w.write_eof()
    out = await conn.outcome(3)
    conn.close()
    return "shutdown(WR)", out, expect(out, ("eof", "close 1000", "close 1001", "close 1006", "reset"),
                                       "half-closed client")


async def case_slow_head(c: Case):
    """A head trickling in a byte at a time, then abandoned."""
    conn = await c.open()
    req = upgrade_request(c.port)
    for i in range(c.rng.randrange(1, 12)):
        conn.send(req[i:i + 1])
        await asyncio.sleep(0.25)
    conn.rst()
    return "trickle", "abandoned", None


async def case_abrupt(c: Case):
    """Subscribe to the watchers' symbols, take or ignore trades, then RST mid-stream."""
    conn = await ws(c)
    rng = c.rng
    conn.send(text_frame({"action": "subscribe", "symbols": rng.sample(c.symbols, rng.randrange(1, 4))}))
    if rng.random() < 0.5:
        await conn.message(2)  # read the reply, then stop reading
    await asyncio.sleep(rng.uniform(0, 2))
    variant = "rst"
    if rng.random() < 0.5:
        # Half a frame, then gone.
        conn.send(frame(0x1, b'{"action":"ping"}' * 10)[:rng.randrange(1, 20)])
        variant = "rst mid-frame"
    conn.rst()
    return variant, "abandoned", None


CASES = {  # name: (weight, coroutine)
    "garbage_preupgrade": (6, case_garbage_preupgrade),
    "bad_upgrade": (10, case_bad_upgrade),
    "slow_handshake": (3, case_slow_handshake),
    "pipelined": (3, case_pipelined),
    "garbage_after_upgrade": (8, case_garbage_after_upgrade),
    "json_control": (16, case_json_control),
    "random_text": (5, case_random_text),
    "binary": (3, case_binary),
    "oversized": (4, case_oversized),
    "claimed_length": (5, case_claimed_length),
    "bad_opcode": (3, case_bad_opcode),
    "unmasked": (2, case_unmasked),
    "reserved_bits": (3, case_reserved_bits),
    "bad_sequence": (8, case_bad_sequence),
    "ping_flood": (3, case_ping_flood),
    "msg_flood": (3, case_msg_flood),
    "deflate": (5, case_deflate),
    "http": (3, case_http),
    "half_close": (3, case_half_close),
    "slow_head": (2, case_slow_head),
    "abrupt": (6, case_abrupt),
}


def pick_case(seed: int, index: int) -> tuple[str, random.Random]:
    rng = random.Random(f"{seed}:{index}")
    names = list(CASES)
    name = rng.choices(names, weights=[CASES[n][0] for n in names])[0]
    return name, rng


# ---------------------------------------------------------------------------
# the fuzzer process
# ---------------------------------------------------------------------------

def fuzzer_process(port, symbols, seed, connections, concurrency, deadline, only, verbose,
                   halt, started_q, result_q):
    """Child process: play the cases; ``halt`` (the gateway died) stops new ones."""
    die_with_parent()
    results = []  # (index, case, variant, outcome, finding, started, ended)

    async def one(index):
        name, rng = pick_case(seed, index)
        case = Case(rng, port, symbols)
        started = time.monotonic()
        try:
            variant, outcome, finding = await asyncio.wait_for(CASES[name][1](case), 20)
        except asyncio.CancelledError:
            case.release()  # cut at the deadline: no outcome to record
            raise
        except TimeoutError:
            variant, outcome, finding = "?", "case timeout", None
        except (ConnectionError, OSError) as exc:
            # The gateway hung up before the case could do its part (e.g.
            # refused the upgrade); the outcome is that, not a harness error.
            variant, outcome, finding = "?", f"{type(exc).__name__}: {str(exc)[:60]}", None
        except Exception as exc:  # a bug in this script: report it, keep fuzzing
            variant, outcome, finding = "?", f"HARNESS ERROR {type(exc).__name__}: {exc}", None
        finally:
            case.release()
        results.append((index, name, variant, outcome, finding, started, time.monotonic()))
        if verbose:
            say(f"  #{index} {name} [{variant}] -> {outcome}" + (f"  FINDING: {finding}" if finding else ""))

    async def main():
        indices = iter(only if only else range(connections))

        async def worker():
            for index in indices:
                if time.monotonic() >= deadline or halt.is_set():
                    return
                await one(index)

        started_q.put(time.monotonic())
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        # No new case starts after the deadline; cases still running 2 s
        # later (some wait up to 8 s for the gateway) are cancelled and not
        # counted, so a run lasts at most --duration + 2 s.
        _, late = await asyncio.wait(workers, timeout=max(0.0, deadline + 2 - time.monotonic()))
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        # Every socket of ours is closed by now; give the kernel a moment.
        await asyncio.sleep(0.2)
        result_q.put(results)

    run_loop(main())


async def sanity_probe(port: int, symbol: str) -> str | None:
    """None if a fresh client can connect, subscribe and get a pong; else what failed."""
    try:
        conn = await Conn.open(port)
        out = await conn.upgrade()
        if out != "http 101":
            return f"upgrade: {out}"
        conn.send(text_frame({"action": "subscribe", "symbols": [symbol]}))
        r1 = await conn.message(5)
        conn.send(text_frame({"action": "ping"}))
        r2 = await conn.message(5)
        conn.send(frame(0x8, struct.pack("!H", 1000)))
        conn.close()
        if not (isinstance(r1, dict) and r1.get("type") == "success"):
            return f"subscribe reply: {r1}"
        if not (isinstance(r2, dict) and r2.get("type") == "pong"):
            return f"ping reply: {r2}"
        return None
    except Exception as exc:  # report, never crash the verdict
        return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fuzz a live gateway with broken and hostile clients while well-behaved "
                    "watchers check delivery. Exit 0 pass, 1 fail.",
        epilog="See the module docstring (gateway/_testbase/fuzz.py) for the cases and the "
               "verdict.")
    p.add_argument("--duration", type=float, default=60, help="seconds of fuzzing (default 60)")
    p.add_argument("--connections", type=int, default=100000, help="fuzz connections at most")
    p.add_argument("--concurrency", type=int, default=40, help="fuzz connections at a time")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--only", default="", help="comma-separated connection indices to replay")
    p.add_argument("--watchers", type=int, default=4, help="well-behaved clients")
    p.add_argument("--symbols", type=int, default=5, help="symbols published (1-5)")
    p.add_argument("--rate", type=float, default=200, help="trades published per second")
    p.add_argument("--rss-bound-mb", type=float, default=32,
                   help="peak RSS may exceed the pre-fuzz RSS by this much (default 32)")
    p.add_argument("--heartbeat", type=float, default=5, help="gateway WS_HEARTBEAT_INTERVAL")
    p.add_argument("--strict", action="store_true", help="findings fail the run too")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra gateway environment (repeatable)")
    p.add_argument("--keep-logs", action="store_true", help="keep the gateway log even on pass")
    p.add_argument("-v", "--verbose", action="store_true", help="print every connection's outcome")
    args = p.parse_args(argv)
    if not 1 <= args.symbols <= 5:
        p.error("--symbols must be 1-5 (one watcher holds them all)")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10**6)
    try:
        args.only = [int(x) for x in args.only.split(",") if x.strip()]
    except ValueError:
        p.error("--only wants comma-separated integers")
    for kv in args.gateway_env:
        if "=" not in kv:
            p.error(f"--gateway-env wants KEY=VALUE, got {kv!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = {"WS_HEARTBEAT_INTERVAL": args.heartbeat, "WS_MAX_MESSAGE_SIZE": MAX_MESSAGE,
           "WS_STATS_INTERVAL": 5}
    return run_session("fuzz_live", args, env,
                       lambda rds, gw, children, workdir: run(args, rds, gw, children, workdir))


def run(args, rds, gw, children, workdir) -> int:
    ctx = mp.get_context("fork")
    names = [f"FZ{i}" for i in range(args.symbols)]
    say(f"fuzz_live: seed {args.seed}; gateway pid {gw.pid} on ws://{HOST}:{gw.port}, "
        f"redis-server on port {rds.port}, log {gw.log_path}")
    say(f"fuzz_live: {args.duration:g} s, at most {args.connections} connections, "
        f"{args.concurrency} at a time, {args.watchers} watchers, {args.rate:g} trades/s")

    ready_q, watch_q, stop_watch = ctx.Queue(), ctx.Queue(), ctx.Event()
    wp = ctx.Process(target=soak.healthy_process, daemon=True, name="watchers",
                     args=(gw.port, range(args.watchers), names, len(names), ready_q, stop_watch,
                           watch_q))
    wp.start()
    children.append(wp)
    kind, detail = ready_q.get(timeout=60)
    if kind != "ready":
        raise HarnessError(detail)

    pub_q, stop_pub = ctx.Queue(), ctx.Event()
    t0 = time.monotonic() + 0.3
    pp = ctx.Process(target=soak.publisher_process, daemon=True, name="publisher",
                     args=(rds.port, names, args.rate, 0.0, t0, 10 * args.duration + 60, args.seed,
                           pub_q, stop_pub))
    pp.start()
    children.append(pp)

    baseline_samples = []
    for _ in range(5):  # a second of steady state: watchers subscribed, trades flowing
        time.sleep(0.2)
        baseline_samples.append(gw.rss_kb() or 0)
    baseline = statistics.median(baseline_samples)

    started_q, fuzz_q, halt = ctx.Queue(), ctx.Queue(), ctx.Event()
    deadline = time.monotonic() + args.duration
    fp = ctx.Process(target=fuzzer_process, daemon=True, name="fuzzer",
                     args=(gw.port, names, args.seed, args.connections, args.concurrency, deadline,
                           args.only, args.verbose, halt, started_q, fuzz_q))
    fp.start()
    children.append(fp)
    started_q.get(timeout=30)

    samples = []
    fuzz_results = None
    died_at = None
    t_start = time.monotonic()
    next_print = t_start
    while fuzz_results is None:
        rss = gw.rss_kb()
        t = time.monotonic() - t_start
        if rss is not None:
            samples.append((t, rss))
        if died_at is None and not gw.alive():
            # Keep the fuzzer's results: they say which cases were in flight.
            died_at = time.monotonic()
            halt.set()
            say(f"  t={t:5.1f}s the gateway exited with {gw.proc.returncode}")
        if time.monotonic() >= next_print and died_at is None:
            next_print += 5
            say(f"  t={t:5.1f}s RSS {rss / 1024 if rss else 0:6.1f} MB")
        try:
            fuzz_results = fuzz_q.get(timeout=0.1 if died_at is None else 1.0)
        except Exception:  # queue.Empty: still fuzzing
            if not fp.is_alive() and fuzz_q.empty():
                break
            if time.monotonic() > deadline + 60:
                break
    fuzz_elapsed = time.monotonic() - t_start
    fp.join(5)

    stop_pub.set()
    pub = pub_q.get(timeout=30)
    pp.join(5)
    time.sleep(1.0)  # the last trades reach the watchers

    # The gateway should now hold exactly the watchers' connections.
    alive = gw.alive()
    held, gauge, metrics_served = None, None, False
    deadline2 = time.monotonic() + 15
    while alive and time.monotonic() < deadline2:
        held = len(tcp_peer_ports(gw.port, (TCP_ESTABLISHED, TCP_CLOSE_WAIT)))
        m = scrape_metrics(gw.port)
        metrics_served = metrics_served or m is not None
        gauge = m.get("gateway_connections") if m else None
        if held == args.watchers and gauge in (None, args.watchers):
            break
        time.sleep(0.25)
    probe = asyncio.run(sanity_probe(gw.port, names[0])) if gw.alive() else "gateway not running"

    stop_watch.set()
    watched = watch_q.get(timeout=30)
    wp.join(5)

    rss_end = gw.rss_kb()
    alive = gw.alive()
    exit_code = gw.stop()
    log = gw.log_text()
    return report(args, fuzz_results or [], fuzz_elapsed, samples, baseline, rss_end, alive,
                  exit_code, log, pub, watched, held, gauge, metrics_served, probe, gw.log_path,
                  died_at)


def report(args, results, elapsed, samples, baseline, rss_end, alive, exit_code, log, pub,
           watched, held, gauge, metrics_served, probe, log_path, died_at) -> int:
    failures = []

    say(f"\n== Fuzz connections: {len(results)} in {elapsed:.1f} s (seed {args.seed}) ==")
    by_case: dict[str, Counter] = {}
    for _, name, _variant, outcome, *_ in results:
        by_case.setdefault(name, Counter())[outcome] += 1
    for name in CASES:
        if name in by_case:
            outs = by_case[name]
            top = ", ".join(f"{o} x{n}" for o, n in outs.most_common(6))
            more = f", +{len(outs) - 6} more" if len(outs) > 6 else ""
            say(f"  {name:<22}{sum(outs.values()):>6}  {top}{more}")

    findings: dict[str, list[int]] = {}
    for index, name, _variant, _outcome, finding, *_ in results:
        if finding:
            findings.setdefault(f"{name}: {finding}", []).append(index)
    say(f"\n== Findings: {len(findings)} kind(s) ==")
    for text, idx in sorted(findings.items(), key=lambda kv: -len(kv[1])):
        say(f"  x{len(idx):<4} {text}")
        say(f"        replay: python -m gateway._testbase.fuzz --seed {args.seed} --only "
            f"{','.join(map(str, idx[:3]))} -v")
    harness = sum(1 for r in results if r[3].startswith("HARNESS ERROR"))
    if harness:
        say(f"  ({harness} connection(s) hit a bug in this script: see HARNESS ERROR above)")
    if args.strict and findings:
        failures.append(f"{len(findings)} kind(s) of findings (--strict)")

    say("\n== Gateway RSS (MB) ==")
    peak = max((kb for _, kb in samples), default=0)
    shown = samples[::max(1, len(samples) // 30)]  # about 30 of the half-second samples
    for i in range(0, len(shown), 10):
        say("  " + "  ".join(f"{t:5.1f}s {kb / 1024:5.1f}" for t, kb in shown[i:i + 10]))
    say(f"  before fuzzing {baseline / 1024:.1f}, peak {peak / 1024:.1f}, at the end "
        f"{(rss_end or 0) / 1024:.1f} (bound: before + {args.rss_bound_mb:g} MB)")
    if peak > baseline + args.rss_bound_mb * 1024:
        failures.append(f"RSS peaked at {peak / 1024:.1f} MB, over {baseline / 1024:.1f} + "
                        f"{args.rss_bound_mb:g} MB")

    cls = soak.classify(pub, [], 0.0)
    rows = soak.account(watched["clients"], cls)
    statuses = [s for arr in pub["status"] for s in arr]
    say("\n== Watchers ==")
    say(f"  published {pub['published']} trades, PUBLISH >= 1 for {sum(s >= 1 for s in statuses)} "
        f"(all expected by every watcher)")
    for r in rows:
        say(f"  w{r['index']}: expected {r['expected']}, received {r['received']}, lost {r['lost']}, "
            f"out of order {r['ooo']}, disconnected: {r['disconnected'] or 'no'}")
        if r["lost"] or r["ooo"] or r["disconnected"] or r["gap_overflow"]:
            failures.append(f"watcher w{r['index']}: lost {r['lost']}, out of order {r['ooo']}, "
                            f"disconnected: {r['disconnected'] or 'no'}")
    if not statuses or not any(s >= 1 for s in statuses):
        failures.append("nothing was published successfully: the watchers checked nothing")

    say("\n== After the fuzzing ==")
    say(f"  connections the gateway still holds (its end ESTABLISHED or CLOSE_WAIT): {held} "
        f"(watchers: {args.watchers})")
    if held != args.watchers:
        failures.append(f"gateway holds {held} connections after the fuzzing, not {args.watchers}")
    if metrics_served:
        say(f"  /metrics gateway_connections: {gauge}")
        if gauge != args.watchers:
            failures.append(f"gateway_connections gauge is {gauge}, not {args.watchers}")
    else:
        say("  /metrics not served: gauge not checked")
    say(f"  fresh client connect/subscribe/ping: {probe or 'ok'}")
    if probe:
        failures.append(f"a fresh client could not be served: {probe}")
    tracebacks = log.count("Traceback (most recent call last)")
    errors = sum(1 for line in log.splitlines() if " ERROR " in line)
    say(f"  gateway alive: {alive}; exit code on SIGTERM: {exit_code}; ERROR lines in log: {errors}; "
        f"tracebacks: {tracebacks}; log: {log_path}")
    if not alive:
        failures.append("the gateway process died")
    if died_at is not None:
        # Whatever killed it was running then (or had just finished). The
        # first connection refused started after the death: a closer bound
        # than when the harness noticed.
        refused = [r for r in results if "ConnectionRefused" in r[3]]
        died_at = min([died_at] + [r[5] for r in refused])
        suspects = [r for r in results if r[5] <= died_at <= r[6] + 0.2 and r not in refused]
        say(f"  the gateway died with {len(suspects)} fuzz connection(s) in flight:")
        for index, name, variant, outcome, *_ in sorted(suspects)[:20]:
            say(f"    #{index} {name} [{variant}] -> {outcome}")
        if suspects:
            say(f"    replay: python -m gateway._testbase.fuzz --seed {args.seed} --only "
                f"{','.join(str(r[0]) for r in sorted(suspects)[:20])} -v")
    elif exit_code != 0:
        failures.append(f"gateway exit code on SIGTERM was {exit_code}")
    if tracebacks:
        failures.append(f"{tracebacks} traceback(s) in the gateway log")
        for block in log.split("Traceback (most recent call last)")[1:3]:
            say("  traceback:" + "\n    ".join(block.splitlines()[:14]))

    return soak.verdict(
        f"{len(results)} fuzz connections, "
        f"gateway {'alive' if alive else 'DEAD'}, RSS peak +{(peak - baseline) / 1024:.1f} MB "
        f"(bound {args.rss_bound_mb:g}), watchers lost {sum(r['lost'] for r in rows)}, "
        f"{len(findings)} finding kind(s)", failures, args, log_path)


if __name__ == "__main__":
    sys.exit(main())
