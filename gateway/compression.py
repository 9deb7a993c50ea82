"""permessage-deflate (RFC 7692): negotiation, compression of the gateway's
messages and inflation of client messages.

The gateway always answers with ``server_no_context_takeover`` and
``client_no_context_takeover``: each trade is compressed once and the same
bytes go to every client that negotiated the extension (gateway._fastpath),
and each client message can be inflated on its own, with no per-connection
zlib state (tens of KB per connection otherwise).
"""
from __future__ import annotations

import zlib

from isal.isal_zlib import compress as _isal_compress

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


# Each message is compressed on its own, in one call, by ISA-L (the ``isal``
# package) at its level 1. Measured on trade messages as the gateway sends
# them (bench/compressors.py, bench/RESULTS.md "Compression, second round"):
# it makes the same wire bytes as zlib at level 6 (0.71 of the plain frame) in
# about half the time of the zlib stream with a full flush per message that it
# replaces. libdeflate (the ``deflate`` package) and one-shot zlib spend more
# on a 250-byte message than the stream did (per-call set-up of their hash
# tables); zlib-ng at level 1 is a third cheaper again but sends 14% more bytes
# (fixed Huffman codes only).
_LEVEL = 1


def deflate_payload(body: bytes) -> bytes:
    """``body`` as the payload of a compressed message (RFC 7692 7.2.1), on
    its own: decodable with no earlier message (server_no_context_takeover).

    A one-shot compressor ends its data with a final block (BFINAL=1, 7.2.3.4).
    The data does not end with an empty stored block, so one is appended (its
    header bits, zero padding, then 00 00 ff ff) and the 00 00 ff ff dropped:
    one 00 byte follows the compressed data. A receiver that appends
    00 00 ff ff and inflates gets the message and then that empty block; one
    that keeps its inflater across messages (browsers) resets it at the final
    block and consumes the empty block whole, so nothing spills into the next
    message. The compiled fast path, its twin and replays all call this, so
    the same message is the same bytes on every path."""
    return _isal_compress(body, _LEVEL, -15) + b"\x00"


def compress_message(body: bytes, min_size: int = 0) -> bytes:
    """The text frame carrying ``body`` for a client that negotiated the
    extension: compressed (RSV1 set), or plain when ``body`` is shorter than
    ``min_size`` (WS_COMPRESSION_MIN_SIZE; a plain frame is valid on a
    deflate connection)."""
    if len(body) < min_size:
        return frame_header(0x81, len(body)) + body
    z = deflate_payload(body)
    return frame_header(0xC1, len(z)) + z  # FIN + RSV1 (compressed) + text


def frame_header(b0: int, size: int) -> bytes:
    """A server frame's header (unmasked): first byte ``b0`` (0x81 text,
    0xC1 compressed text), then the payload length as RFC 6455 5.2 spells it."""
    if size < 126:
        return bytes((b0, size))
    if size < 65536:
        return bytes((b0, 126)) + size.to_bytes(2, "big")
    return bytes((b0, 127)) + size.to_bytes(8, "big")


def deflate_frame(frame: bytes, min_size: int = 0) -> bytes:
    """A server text frame (unmasked, FIN) as the same message for a client
    that negotiated the extension (replays, not the hot path): the same bytes
    the fast path sends for it live."""
    n = frame[1]
    return compress_message(frame[2 if n < 126 else (4 if n == 126 else 10):], min_size)


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
