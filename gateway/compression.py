"""permessage-deflate (RFC 7692) negotiation and inflation of client messages.

The gateway always answers with ``server_no_context_takeover`` and
``client_no_context_takeover``: each trade is compressed once and the same
bytes go to every client that negotiated the extension (gateway._fastpath),
and each client message can be inflated on its own, with no per-connection
zlib state (tens of KB per connection otherwise).
"""
from __future__ import annotations

import zlib

EXTENSION = "permessage-deflate"
RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
_PARAMS = {"server_no_context_takeover", "client_no_context_takeover",
           "server_max_window_bits", "client_max_window_bits"}


class InflateError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept(offers: list[str]) -> str | None:
    """The Sec-WebSocket-Extensions response for the client's offers, or None."""
    for header in offers:
        for offer in header.split(","):
            if _acceptable(offer):
                return RESPONSE
    return None


def _acceptable(offer: str) -> bool:
    name, *params = [p.strip() for p in offer.split(";")]
    if name.lower() != EXTENSION:
        return False
    seen = set()
    for param in params:
        key, _, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"')
        if key not in _PARAMS or key in seen:
            return False  # RFC 7692 7: decline offers with unknown or repeated parameters
        seen.add(key)
        if key == "server_max_window_bits":
            # We compress with a 32 KiB window; a client that can only take
            # less gets plain frames rather than a second compressor.
            if not _digits(value) or int(value) != 15:
                return False
        elif key == "client_max_window_bits":
            if value and (not _digits(value) or not 8 <= int(value) <= 15):
                return False
        elif value:
            return False
    return True


# One raw-deflate stream; a full flush after each message makes every
# message decodable on its own (server_no_context_takeover), whoever got
# the ones before, so one stream serves every client.
_compressor = zlib.compressobj(6, zlib.DEFLATED, -15)


def compress_message(body: bytes) -> bytes:
    """The compressed text frame (RSV1 set) carrying ``body``: the pure-Python
    fast path and replays use it; the compiled fast path has its own copy in C."""
    z = _compressor.compress(body) + _compressor.flush(zlib.Z_FULL_FLUSH)
    z = z[:-4]  # RFC 7692 7.2.1: drop the trailing 00 00 ff ff
    size = len(z)
    if size < 126:
        head = bytes((0xC1, size))
    elif size < 65536:
        head = bytes((0xC1, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0xC1, 127)) + size.to_bytes(8, "big")
    return head + z


def deflate_frame(frame: bytes) -> bytes:
    """A server text frame (unmasked, FIN) as the same message compressed
    for a client that negotiated the extension (replays, not the hot path)."""
    n = frame[1]
    return compress_message(frame[2 if n < 126 else (4 if n == 126 else 10):])


def _digits(value: str) -> bool:
    # str.isdigit() also takes superscripts that int() refuses.
    return value.isascii() and value.isdigit()


def inflate(data: bytes, limit: int) -> bytes:
    """One client message, decompressed; at most ``limit`` bytes."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(data + b"\x00\x00\xff\xff", limit + 1)
    except zlib.error:
        raise InflateError(1007, "invalid compressed data") from None
    if len(out) > limit or d.unconsumed_tail:
        raise InflateError(1009, "message too big")
    return out
