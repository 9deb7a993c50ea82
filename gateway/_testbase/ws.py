"""A raw WebSocket client, for tests and harness code that must send what no
library would (unmasked frames, lies about lengths, reserved bits), never
read, or vanish with a RST.

Pieces, from the bottom:

- upgrade_request(), split_http_head(), parse_http_head(): the handshake;
- apply_mask(), frame(), text_frame(), close_frame(), close_code(): frames;
- FrameParser: server frames from bytes fed in any split;
- RawSocket (blocking, ``connect()``) and ``open_async()`` (asyncio streams).

Nothing here checks what the server sends beyond framing; the caller asserts.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import time
import zlib
from typing import NamedTuple

import orjson

from .net import HOST

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 4, 2, 1  # the ``rsv`` bits as frame() and Frame.rsv number them


# -- handshake -------------------------------------------------------------------

def upgrade_request(port: int, path: str = "/", key: str | None = None, *,
                    host: str | None = None, headers: dict[str, str] | None = None) -> bytes:
    """A client's HTTP upgrade request. ``headers`` are added after the
    required ones (e.g. Origin, Sec-WebSocket-Extensions). ``host`` is the
    Host header (default 127.0.0.1:port)."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"GET {path} HTTP/1.1\r\nHost: {host or f'{HOST}:{port}'}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def split_http_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """(status line + headers, rest) once a full HTTP head is in ``buf``, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    return buf[:end], buf[end + 4:]


def parse_http_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status code, lower-cased headers) of a response head without its
    blank line. A status line that is not HTTP gives status 0."""
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


# -- frames ------------------------------------------------------------------------

def apply_mask(payload: bytes, key: bytes | bytearray) -> bytes:
    """XOR with the 4-byte key, as one big-integer operation (fast for 100 KB)."""
    n = len(payload)
    if n == 0:
        return b""
    k = (bytes(key) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None, key: bytes | None = None) -> bytes:
    """One frame, masked (a client's) unless ``mask=False`` (a server's).

    ``rsv`` sets the three reserved bits (RSV1 = 4: compressed); ``length``
    overrides the length field, to lie about it; ``key`` fixes the mask key
    (random otherwise). Any opcode is accepted, valid or not.
    """
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, mbit | 127]) + (n & (2**64 - 1)).to_bytes(8, "big")
    if not mask:
        return head + payload
    key = key or os.urandom(4)
    return head + key + apply_mask(payload, key)


def text_frame(message, **kw) -> bytes:
    """A text frame of ``message``: bytes as they are, str encoded, anything
    else as JSON. ``kw`` goes to frame()."""
    if isinstance(message, str):
        message = message.encode()
    elif not isinstance(message, (bytes, bytearray)):
        message = orjson.dumps(message)
    return frame(OP_TEXT, bytes(message), **kw)


def close_frame(code: int | None = 1000, reason: bytes = b"", **kw) -> bytes:
    """A close frame; ``code=None`` sends it empty."""
    body = b"" if code is None else struct.pack("!H", code) + reason
    return frame(OP_CLOSE, body, **kw)


def deflate_message(data: bytes, level: int = 9) -> bytes:
    """One message body as permessage-deflate sends it with no context
    takeover: raw deflate, sync-flushed, the final 00 00 ff ff dropped
    (RFC 7692 7.2.1). Send it in a frame with ``rsv=RSV1``."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out


def close_code(payload: bytes) -> int | None:
    """The code in a close frame's payload; None when it has none."""
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes
    rsv: int  # the three reserved bits, RSV1 = 4

    def json(self):
        return orjson.loads(self.payload)


class FrameParser:
    """Incremental RFC 6455 frame parser: feed() bytes split anywhere, get
    the whole frames so far. Masked frames are unmasked. It trusts the length
    fields: a frame that claims 2**63 bytes waits forever."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self.buf
        buf += data
        out = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, hdr = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hdr = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hdr = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            masked = b1 & 0x80
            if masked:
                hdr += 4
            if n - pos < hdr + length:
                break
            payload = bytes(buf[pos + hdr:pos + hdr + length])
            if masked:
                payload = apply_mask(payload, buf[pos + hdr - 4:pos + hdr])
            out.append(Frame(bool(b0 >> 7), b0 & 0x0F, payload, (b0 >> 4) & 7))
            pos += hdr + length
        if pos:
            del buf[:pos]
        return out


# -- a blocking client --------------------------------------------------------------

class RawSocket:
    """A blocking WebSocket client that does only what the caller tells it.

    connect() makes one. frame() and text() block (the socket's timeout
    applies: socket.timeout when it passes; EOFError when the server closed).
    From asyncio, call them through ``loop.run_in_executor``.
    """

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], rest: bytes = b""):
        self.sock = sock
        self.status = status
        self.headers = headers
        self.parser = FrameParser()
        self.pending: list[Frame] = list(self.parser.feed(rest))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, message) -> None:
        self.sock.sendall(text_frame(message))

    def frame(self) -> Frame:
        """The next frame from the server."""
        while not self.pending:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.pending.extend(self.parser.feed(chunk))
        return self.pending.pop(0)

    def text(self):
        """The next text frame's JSON, skipping other frames."""
        while True:
            f = self.frame()
            if f.opcode == OP_TEXT:
                return f.json()

    def until_close(self) -> Frame:
        """Read up to and including the server's close frame."""
        while True:
            f = self.frame()
            if f.opcode == OP_CLOSE:
                return f

    def read_all(self) -> bytes:
        """Every byte until the server closes (or the socket errors or times out)."""
        data = b""
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                data += chunk
        return data

    def rst(self) -> None:
        rst_socket(self.sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(port: int, path: str = "/", *, rcvbuf: int | None = None, timeout: float = 5.0,
            headers: dict[str, str] | None = None, host: str | None = None,
            expect: int | None = 101) -> RawSocket:
    """Open a TCP connection and upgrade it; a RawSocket.

    ``rcvbuf`` sets SO_RCVBUF before connecting (a tiny one makes a client
    that stops reading fill up fast). ``headers`` go into the request.
    Raises ConnectionError when the status is not ``expect`` (None: any).
    """
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    s.settimeout(timeout)
    try:
        s.connect((HOST, port))
        s.sendall(upgrade_request(port, path, host=host, headers=headers))
        buf = b""
        while (parts := split_http_head(buf)) is None:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError(f"EOF during upgrade after {len(buf)} bytes")
            buf += chunk
        status, hdrs = parse_http_head(parts[0])
        if expect is not None and status != expect:
            raise ConnectionError(f"upgrade answered {parts[0][:60]!r}")
    except BaseException:
        s.close()
        raise
    return RawSocket(s, status, hdrs, parts[1])


def rst_socket(s: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): no FIN, no close frame."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# -- asyncio streams ---------------------------------------------------------------------

async def open_async(port: int, path: str = "/", timeout: float = 5.0,
                     headers: dict[str, str] | None = None):
    """(reader, writer, parser, bytes after the head) after a 101.

    Feed the trailing bytes to the parser first: the welcome may have come
    with the head. Raises ConnectionError on another status or EOF.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    writer.write(upgrade_request(port, path, headers=headers))
    head = b""
    deadline = time.monotonic() + timeout
    try:
        while (parts := split_http_head(head)) is None:
            data = await asyncio.wait_for(reader.read(4096), max(0.01, deadline - time.monotonic()))
            if not data:
                raise ConnectionError("EOF during upgrade")
            head += data
        if not parts[0].startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"upgrade refused: {parts[0][:40]!r}")
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer, FrameParser(), parts[1]


async def read_frames(reader: asyncio.StreamReader, parser: FrameParser, want, timeout: float) -> Frame:
    """Read until ``want(frame)`` is true for a frame; that frame. Raises
    ConnectionError on EOF, asyncio.TimeoutError after ``timeout``."""
    async def go():
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("EOF")
            for f in parser.feed(data):
                if want(f):
                    return f
    return await asyncio.wait_for(go(), timeout)


def rst(writer: asyncio.StreamWriter) -> None:
    """Drop an asyncio stream connection with a RST: no FIN, no close frame."""
    sock = writer.get_extra_info("socket")  # None once the transport is closed
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
