"""Client frames the listener's common path does not take, handled once for
both fast-path implementations.

A ClientListener (compiled or twin) passes a plain, unfragmented text or
binary message to its session and a pong to the session's heartbeat; every
other frame comes here: fragments and their reassembly, pings (answered
here rather than by picows, so that every write to a client goes through its
listener), close frames, and protocol violations. These are rare, so plain
Python is fast enough, and one copy means the two implementations cannot
drift apart.
"""
from __future__ import annotations

from picows import WSCloseCode, WSMsgType

from gateway.compression import frame_header

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE
# Codes that must never be on the wire (RFC 6455 7.4.1).
_RESERVED_CLOSE_CODES = frozenset((1005, 1006, 1015))


class Reassembly:
    """A fragmented client message, collected until its final frame."""
    __slots__ = ("data", "is_text", "compressed")

    def __init__(self, first: memoryview, is_text: bool, compressed: bool):
        self.data = bytearray(first)
        self.is_text = is_text
        self.compressed = compressed


def fail(conn, code: int, reason: str) -> None:
    """Close ``conn`` with ``code`` and drop it: the client broke the protocol."""
    conn.frag = None
    conn.transport.send_close(WSCloseCode(code), reason.encode())
    conn.transport.disconnect()


def on_rare_frame(conn, transport, frame) -> None:
    """Handle any frame the listener's common path passed over."""
    t = frame.msg_type
    if frame.rsv2 or frame.rsv3 or (frame.rsv1 and not (conn.deflate and (t in (_TEXT, _BINARY)))):
        # RSV1 marks a compressed message, and only where permessage-deflate
        # was negotiated; nothing defines RSV2/RSV3 here (RFC 6455 5.2).
        fail(conn, 1002, "unexpected reserved bits")
    elif t in (_TEXT, _BINARY):
        if conn.frag is not None:
            fail(conn, 1002, "new message inside a fragmented one")
        elif frame.fin:
            conn.session.on_message(conn, frame.get_payload_as_bytes(), t == _TEXT, bool(frame.rsv1))
        else:
            conn.frag = Reassembly(frame.get_payload_as_memoryview(), t == _TEXT, bool(frame.rsv1))
            _check_size(conn)
    elif t == _CONTINUATION:
        frag = conn.frag
        if frag is None:
            fail(conn, 1002, "continuation without a message")
            return
        frag.data += frame.get_payload_as_memoryview()
        if _check_size(conn) and frame.fin:
            conn.frag = None
            conn.session.on_message(conn, bytes(frag.data), frag.is_text, frag.compressed)
    elif t == _PING:
        payload = frame.get_payload_as_bytes()      # picows checked: at most 125 bytes
        conn.send_frame(frame_header(0x8A, len(payload)) + payload)
    elif t == _PONG:
        conn.session.on_pong()
    elif t == _CLOSE:
        # Echo the close (RFC 6455 5.5.1) and let the client close TCP. An
        # empty close has no code (answer 1000); 0, 1005, 1006 and 1015 must
        # never be on the wire, so they are a violation.
        code = frame.get_close_code() if frame.payload_size else 1000
        if code < 1000 or code in _RESERVED_CLOSE_CODES:
            transport.send_close(WSCloseCode.PROTOCOL_ERROR, b"invalid close code")
        else:
            transport.send_close(WSCloseCode(code), frame.get_close_message())
        transport.disconnect()


def _check_size(conn) -> bool:
    if len(conn.frag.data) > conn.session.max_message_size:
        fail(conn, 1009, "message too big")
        return False
    return True
