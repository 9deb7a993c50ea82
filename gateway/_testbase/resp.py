"""RESP (the Redis protocol) bytes, built by hand for harness code and tests.

These build what Redis or a client would put on the wire; they check nothing.
"""
from __future__ import annotations

PATTERN = b"channel:trade:*"


def _as_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def bulk(value) -> bytes:
    """One bulk string: ``$<len>\\r\\n<bytes>\\r\\n`` (str and numbers are encoded)."""
    b = _as_bytes(value)
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode_command(*args) -> bytes:
    """A command as a client sends it: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def pmessage(channel: bytes, payload: bytes, pattern: bytes = PATTERN) -> bytes:
    """What Redis pushes to a PSUBSCRIBEd connection for one PUBLISH."""
    return b"*4\r\n" + bulk(b"pmessage") + bulk(pattern) + bulk(channel) + bulk(payload)
