# cython: language_level=3, auto_pickle=False, autotestdict=False
"""The gateway's hot path, compiled.

RESP bytes from one Redis connection go into its ``SubscriptionReader``;
trade messages are routed by the process-wide ``FanOut`` to the subscribed
``ClientListener`` objects and leave as WebSocket frames, one write per
client per Redis read. Everything here is per message or per delivery;
everything per connection lifetime or per control message lives in Python
(gateway.session, gateway.control, gateway.frames).

The pure-Python twin, gateway._fastpath_py, has the same public surface
(gateway/_fastpath.pyi; tests/test_fastpath_contract.py holds the two to it)
and is the oracle the tests hold this module to. Change both together.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.math cimport isinf
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

from gateway._picows_adapter cimport release_handshake_state, socket_fd

import asyncio
import logging

import hiredis

from gateway import compression as _compression
from gateway import frames as _frames
from gateway import protocol as _protocol

_log = logging.getLogger("gateway.fastpath")
# The one compressor (gateway.compression): the twin and replays call it too.
cdef object _deflate_payload = _compression.deflate_payload


# Loops start on 32-byte boundaries. The validator's scanning loops are
# most of the per-message cost, and with GCC's default alignment their speed
# varied by a quarter with wherever unrelated code moved them (is_json_object
# on a 200-byte trade: 187 ns or 239 ns with the same instructions).
cdef extern from *:
    """
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC optimize ("align-loops=32")
    #endif
    """


cdef extern from *:
    """
    /* An object's first three cache lines: where both a listener's fields
       and the transport flags it reads (picows' WSTransport) lie. */
    #define _gw_prefetch(p) do { const char* _q = (const char*)(p); \
        __builtin_prefetch(_q); __builtin_prefetch(_q + 64); \
        __builtin_prefetch(_q + 128); } while (0)
    """
    void _prefetch "_gw_prefetch" (const void* p) nogil


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL


cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0


IS_COMPILED = True

# The trade envelope (gateway.protocol): HEAD + payload + MID + ms + TAIL.
cdef bytes _HEAD = _protocol.TRADE_HEAD
cdef bytes _MID = _protocol.TRADE_MID
cdef bytes _TAIL = _protocol.TRADE_TAIL
cdef bytes _SEQ_MID = _protocol.SEQ_MID
cdef bytes _EPOCH_MID = _protocol.EPOCH_MID
cdef bytes _EPOCH_END = _protocol.EPOCH_END
cdef bytes _PUB_SEQ = _protocol.PUBLISHED_SEQ
cdef bytes _PUB_EPOCH = _protocol.PUBLISHED_EPOCH
cdef Py_ssize_t _MAX_EPOCH = _protocol.MAX_EPOCH_LEN
cdef bytes _CANDLE_N = _protocol.CANDLE_N
cdef Py_ssize_t _MAX_CANDLE_N = _protocol.MAX_CANDLE_N_DIGITS
cdef Py_ssize_t _HEAD_LEN = len(_HEAD)
cdef Py_ssize_t _MID_LEN = len(_MID)
cdef Py_ssize_t _TAIL_LEN = len(_TAIL)

cdef enum:
    # Same nesting limit as orjson, so the twin (which uses orjson) and this
    # validator accept the same payloads.
    MAX_DEPTH = 1024
    # Feeding hiredis one huge buffer is quadratic (5.4 s for 100k messages
    # at once, 25 ms in 64 KiB pieces).
    FEED_CHUNK = 65536
    # A client's batch buffer larger than this is released after its write,
    # so a burst does not pin memory on an otherwise quiet connection.
    OUT_KEEP = 65536
    # Fan-out latency histogram: N_BUCKETS bounds, then +Inf.
    N_BUCKETS = 13

# Bounds in ns: 10 us .. 100 ms.
cdef int64_t[13] _BUCKET_NS = [10000, 25000, 50000, 100000, 250000, 500000, 1000000,
                               2500000, 5000000, 10000000, 25000000, 50000000, 100000000]
LATENCY_BUCKETS = tuple(b / 1e9 for b in _BUCKET_NS)
FEED_CHUNK_SIZE = FEED_CHUNK


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


# ---------------------------------------------------------------------------
# Payload validation: is this a JSON object (RFC 8259, UTF-8) that orjson
# would accept? Runs once per Redis message, allocates nothing.
# ---------------------------------------------------------------------------

cdef inline Py_ssize_t _skip_ws(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (p[i] == 0x20 or p[i] == 0x0A or p[i] == 0x0D or p[i] == 0x09):
        i += 1
    return i


cdef inline int _hex(uint8_t c) noexcept nogil:
    if 0x30 <= c <= 0x39:
        return c - 0x30
    c |= 0x20
    if 0x61 <= c <= 0x66:
        return c - 0x61 + 10
    return -1


cdef inline int _u16(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # Four hex digits at p[i:i+4] as a code unit, -1 if malformed.
    if i + 4 > n:
        return -1
    cdef int a = _hex(p[i]), b = _hex(p[i + 1]), c = _hex(p[i + 2]), d = _hex(p[i + 3])
    if a < 0 or b < 0 or c < 0 or d < 0:
        return -1
    return (a << 12) | (b << 8) | (c << 4) | d


cdef Py_ssize_t _scan_string(const uint8_t* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # p[i] is just past the opening quote. Returns the index past the closing
    # quote, or -1 if the string is not valid JSON/UTF-8.
    cdef uint8_t c, c1
    cdef int u, lo
    while i < n:
        c = p[i]
        if c == 0x22:
            return i + 1
        if c == 0x5C:
            if i + 1 >= n:
                return -1
            c1 = p[i + 1]
            if c1 == 0x75:  # \uXXXX
                u = _u16(p, i + 2, n)
                if u < 0:
                    return -1
                i += 6
                if 0xD800 <= u <= 0xDBFF:
                    # A high surrogate must be followed by an escaped low one.
                    if i + 1 >= n or p[i] != 0x5C or p[i + 1] != 0x75:
                        return -1
                    lo = _u16(p, i + 2, n)
                    if lo < 0xDC00 or lo > 0xDFFF:
                        return -1
                    i += 6
                elif 0xDC00 <= u <= 0xDFFF:
                    return -1
                continue
            if (c1 == 0x22 or c1 == 0x5C or c1 == 0x2F or c1 == 0x62 or c1 == 0x66
                    or c1 == 0x6E or c1 == 0x72 or c1 == 0x74):
                i += 2
                continue
            return -1
        if c < 0x20:
            return -1
        if c < 0x80:
            i += 1
            continue
        # Multi-byte UTF-8: no overlongs, no surrogates, nothing above U+10FFFF.
        if 0xC2 <= c <= 0xDF:
            if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                return -1
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= n or (p[i + 1] & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80:
                return -1
            if c == 0xE0 and p[i + 1] < 0xA0:
                return -1
            if c == 0xED and p[i + 1] > 0x9F:
                return -1
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if (i + 3 >= n or (p[i + 1] & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80
                    or (p[i + 3] & 0xC0) != 0x80):
                return -1
            if c == 0xF0 and p[i + 1] < 0x90:
                return -1
            if c == 0xF4 and p[i + 1] > 0x8F:
                return -1
            i += 4
        else:
            return -1
    return -1


cdef Py_ssize_t _scan_number(const uint8_t* p, Py_ssize_t i, Py_ssize_t n):
    # Returns the index past the number, or -1. p must be NUL-terminated at n
    # (bytes objects are), because the rare overflow check reads with strtod.
    cdef Py_ssize_t start = i
    cdef bint check_range = False
    cdef double v
    cdef char* endp
    if p[i] == 0x2D:
        i += 1
    if i >= n:
        return -1
    if p[i] == 0x30:
        i += 1
    elif 0x31 <= p[i] <= 0x39:
        while i < n and 0x30 <= p[i] <= 0x39:
            i += 1
    else:
        return -1
    if i < n and p[i] == 0x2E:
        i += 1
        if i >= n or not (0x30 <= p[i] <= 0x39):
            return -1
        while i < n and 0x30 <= p[i] <= 0x39:
            i += 1
    if i < n and (p[i] == 0x65 or p[i] == 0x45):
        check_range = True
        i += 1
        if i < n and (p[i] == 0x2B or p[i] == 0x2D):
            i += 1
        if i >= n or not (0x30 <= p[i] <= 0x39):
            return -1
        while i < n and 0x30 <= p[i] <= 0x39:
            i += 1
    if check_range or i - start > 300:
        # orjson refuses numbers that overflow a double to infinity. With no
        # overflow exception given, an overflow returns +-HUGE_VAL; endp lets
        # it stop at the number's end instead of requiring the whole rest.
        v = PyOS_string_to_double(<const char*>p + start, &endp, NULL)
        if isinf(v):
            return -1
    return i


cdef bint _is_json_object(const uint8_t* p, Py_ssize_t n) except -1:
    cdef uint8_t stack[MAX_DEPTH]
    cdef Py_ssize_t depth = 0, i
    cdef uint8_t c
    i = _skip_ws(p, 0, n)
    if i >= n or p[i] != 0x7B:
        return False
    # Each loop turn starts where a value is expected (after '{' the key is
    # handled inline, so the state is "value expected" or "after a value").
    stack[0] = 0x7B
    depth = 1
    i += 1
    # After '{': '}' or a key.
    i = _skip_ws(p, i, n)
    if i < n and p[i] == 0x7D:
        depth = 0
        i += 1
        return _skip_ws(p, i, n) == n
    while True:
        # Expecting a member key (top is '{') or a value (top is '[').
        if stack[depth - 1] == 0x7B:
            if i >= n or p[i] != 0x22:
                return False
            i = _scan_string(p, i + 1, n)
            if i < 0:
                return False
            i = _skip_ws(p, i, n)
            if i >= n or p[i] != 0x3A:
                return False
            i = _skip_ws(p, i + 1, n)
        # A value.
        if i >= n:
            return False
        c = p[i]
        if c == 0x7B or c == 0x5B:
            if depth >= MAX_DEPTH:
                return False
            stack[depth] = c
            depth += 1
            i = _skip_ws(p, i + 1, n)
            if i < n and p[i] == (0x7D if c == 0x7B else 0x5D):
                depth -= 1
                i += 1
            else:
                continue
        elif c == 0x22:
            i = _scan_string(p, i + 1, n)
        elif c == 0x74:
            i = i + 4 if i + 4 <= n and memcmp(p + i, b"true", 4) == 0 else -1
        elif c == 0x66:
            i = i + 5 if i + 5 <= n and memcmp(p + i, b"false", 5) == 0 else -1
        elif c == 0x6E:
            i = i + 4 if i + 4 <= n and memcmp(p + i, b"null", 4) == 0 else -1
        elif c == 0x2D or 0x30 <= c <= 0x39:
            i = _scan_number(p, i, n)
        else:
            return False
        if i < 0:
            return False
        # After a value: ',' continues the container, a closer pops it.
        while True:
            i = _skip_ws(p, i, n)
            if i >= n:
                return False
            c = p[i]
            if c == 0x2C:
                i = _skip_ws(p, i + 1, n)
                break
            if (c == 0x7D and stack[depth - 1] == 0x7B) or (c == 0x5D and stack[depth - 1] == 0x5B):
                depth -= 1
                i += 1
                if depth == 0:
                    return _skip_ws(p, i, n) == n
                continue
            return False


cpdef bint is_json_object(bytes payload) except -1:
    """True if ``payload`` is one JSON object in valid UTF-8 (what orjson accepts)."""
    return _is_json_object(<const uint8_t*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))


cpdef str parse_symbol(bytes channel, bytes prefix):
    """The symbol in ``channel`` after ``prefix``, or None if it has no such prefix."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(channel), k = PyBytes_GET_SIZE(prefix)
    if n <= k or memcmp(PyBytes_AS_STRING(channel), PyBytes_AS_STRING(prefix), k) != 0:
        return None
    return PyBytes_AS_STRING(channel)[k:n].decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# Frame encoding
# ---------------------------------------------------------------------------

cdef inline Py_ssize_t _header_size(Py_ssize_t body) noexcept nogil:
    if body < 126:
        return 2
    if body < 65536:
        return 4
    return 10


cdef inline Py_ssize_t _frame_header_len(const char* frame) noexcept nogil:
    # The header length of a server frame written by _write_header.
    cdef uint8_t n = (<const uint8_t*>frame)[1]
    return 2 if n < 126 else (4 if n == 126 else 10)


cdef inline void _write_header(uint8_t* h, Py_ssize_t body) noexcept nogil:
    # Server-to-client text frame, FIN set, unmasked (RFC 6455 5.2).
    cdef int k
    h[0] = 0x81
    if body < 126:
        h[1] = <uint8_t>body
    elif body < 65536:
        h[1] = 126
        h[2] = <uint8_t>(body >> 8)
        h[3] = <uint8_t>body
    else:
        h[1] = 127
        for k in range(8):
            h[2 + k] = <uint8_t>((<uint64_t>body) >> (56 - 8 * k))


cdef inline Py_ssize_t _trade_frame_size(Py_ssize_t plen, Py_ssize_t tslen) noexcept nogil:
    cdef Py_ssize_t body = _HEAD_LEN + plen + _MID_LEN + tslen + _TAIL_LEN
    return _header_size(body) + body


cdef inline void _write_trade_frame(char* out, const char* payload, Py_ssize_t plen,
                                    const char* ts, Py_ssize_t tslen) noexcept:
    cdef Py_ssize_t body = _HEAD_LEN + plen + _MID_LEN + tslen + _TAIL_LEN
    cdef Py_ssize_t h = _header_size(body)
    _write_header(<uint8_t*>out, body)
    out += h
    memcpy(out, PyBytes_AS_STRING(_HEAD), _HEAD_LEN)
    out += _HEAD_LEN
    memcpy(out, payload, plen)
    out += plen
    memcpy(out, PyBytes_AS_STRING(_MID), _MID_LEN)
    out += _MID_LEN
    memcpy(out, ts, tslen)
    out += tslen
    memcpy(out, PyBytes_AS_STRING(_TAIL), _TAIL_LEN)


cdef struct Sequenced:
    # Where the parts of a message publish_trade made lie in its payload.
    int64_t seq
    Py_ssize_t digits_len        # the seq's digits start right after PUBLISHED_SEQ
    Py_ssize_t epoch_off
    Py_ssize_t epoch_len
    Py_ssize_t rest_off          # ',' (more fields follow) or '}' (empty trade)


cdef inline bint _epoch_char(char c) noexcept nogil:
    return (b'0' <= c <= b'9') or (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or c == b'_' or c == b'-'


cdef bint _split_sequenced(const char* p, Py_ssize_t n, Sequenced* out) noexcept:
    # True if the (already validated) payload starts the way publish_trade
    # writes it: {"_seq":<1-18 digits>,"_epoch":"<1-32 of [0-9A-Za-z_-]>" then ',' or '}'.
    cdef Py_ssize_t k = PyBytes_GET_SIZE(_PUB_SEQ), e = PyBytes_GET_SIZE(_PUB_EPOCH), i, start
    cdef int64_t seq = 0
    if n < k + e + 4 or memcmp(p, PyBytes_AS_STRING(_PUB_SEQ), k) != 0:
        return False
    i = start = k
    while i < n and b'0' <= p[i] <= b'9' and i - start < 18:
        seq = seq * 10 + (p[i] - 48)
        i += 1
    if i == start or p[start] == b'0' or n - i < e or memcmp(p + i, PyBytes_AS_STRING(_PUB_EPOCH), e) != 0:
        return False
    out.digits_len = i - start
    i += e
    start = i
    while i < n and i - start <= _MAX_EPOCH and _epoch_char(p[i]):
        i += 1
    if i == start or i - start > _MAX_EPOCH or i + 1 >= n or p[i] != b'"':
        return False
    if p[i + 1] != b',' and p[i + 1] != b'}':
        return False
    out.seq = seq
    out.epoch_off = start
    out.epoch_len = i - start
    out.rest_off = i + 1
    return True


cdef inline Py_ssize_t _seq_data_len(const char* p, Py_ssize_t n, Sequenced* sq) noexcept nogil:
    # data = '{' + what follows the ',' (n - rest_off bytes in all), or '{}'.
    return 2 if p[sq.rest_off] == b'}' else n - sq.rest_off


cdef inline Py_ssize_t _seq_body_len(const char* p, Py_ssize_t n, Sequenced* sq,
                                     Py_ssize_t tslen) noexcept:
    return (_HEAD_LEN + _seq_data_len(p, n, sq) + PyBytes_GET_SIZE(_SEQ_MID) + sq.digits_len
            + PyBytes_GET_SIZE(_EPOCH_MID) + sq.epoch_len + PyBytes_GET_SIZE(_EPOCH_END) + tslen
            + _TAIL_LEN)


cdef inline char* _put(char* out, bytes b) noexcept:
    memcpy(out, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
    return out + PyBytes_GET_SIZE(b)


cdef void _write_seq_frame(char* out, const char* p, Py_ssize_t n, Sequenced* sq,
                           const char* ts, Py_ssize_t tslen) noexcept:
    cdef Py_ssize_t body = _seq_body_len(p, n, sq, tslen)
    _write_header(<uint8_t*>out, body)
    out += _header_size(body)
    out = _put(out, _HEAD)
    out[0] = b'{'
    if p[sq.rest_off] == b'}':
        out[1] = b'}'
        out += 2
    else:
        memcpy(out + 1, p + sq.rest_off + 1, n - sq.rest_off - 1)
        out += n - sq.rest_off
    out = _put(out, _SEQ_MID)
    memcpy(out, p + PyBytes_GET_SIZE(_PUB_SEQ), sq.digits_len)
    out += sq.digits_len
    out = _put(out, _EPOCH_MID)
    memcpy(out, p + sq.epoch_off, sq.epoch_len)
    out += sq.epoch_len
    out = _put(out, _EPOCH_END)
    memcpy(out, ts, tslen)
    out += tslen
    _put(out, _TAIL)


cpdef bytes encode_sequenced_frame(bytes data, long long seq, bytes epoch, long long timestamp_ms):
    """The complete frame of a sequenced trade (``data``: the trade object as published)."""
    return encode_text_frame(_protocol.sequenced_trade_body(data, seq, epoch, timestamp_ms))


cpdef object split_published(bytes payload):
    """(seq, epoch, data) if ``payload`` is a message publish_trade made, else None."""
    cdef Sequenced sq
    cdef const char* p = PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    if not _split_sequenced(p, n, &sq):
        return None
    data = b"{}" if p[sq.rest_off] == b'}' else b"{" + payload[sq.rest_off + 1:]
    return sq.seq, payload[sq.epoch_off:sq.epoch_off + sq.epoch_len], data


cdef Py_ssize_t _split_candle(const char* p, Py_ssize_t n, int64_t* out) noexcept:
    # The index of the ',' that ends {"_n":<1-18 digits, no leading zero>, at
    # the head of a candle payload (its n in *out), or -1 when it has no such head.
    cdef Py_ssize_t k = PyBytes_GET_SIZE(_CANDLE_N), i
    cdef int64_t v = 0
    if n < k + 2 or memcmp(p, PyBytes_AS_STRING(_CANDLE_N), k) != 0 or p[k] == b'0':
        return -1
    i = k
    while i < n and b'0' <= p[i] <= b'9' and i - k < _MAX_CANDLE_N:
        v = v * 10 + (p[i] - 48)
        i += 1
    if i == k or i >= n or p[i] != b',':
        return -1
    out[0] = v
    return i


cpdef object split_candle(bytes payload):
    """(n, client message) of a payload on a candle channel: ``{"_n":<n>,`` cut
    off; (0, payload) when it does not start that way."""
    cdef int64_t v = 0
    cdef const char* p = PyBytes_AS_STRING(payload)
    cdef Py_ssize_t i = _split_candle(p, PyBytes_GET_SIZE(payload), &v)
    if i < 0:
        return 0, payload
    return v, b"{" + payload[i + 1:]


cpdef bytes encode_trade_frame(bytes payload, long long timestamp_ms):
    """The complete WebSocket frame that carries ``payload`` as a trade."""
    cdef char ts[24]
    cdef Py_ssize_t tslen = snprintf(ts, sizeof(ts), "%lld", timestamp_ms)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, _trade_frame_size(plen, tslen))
    _write_trade_frame(PyBytes_AS_STRING(out), PyBytes_AS_STRING(payload), plen, ts, tslen)
    return out


cpdef bytes encode_text_frame(bytes body):
    """A server-to-client text frame around ``body``."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), h = _header_size(n)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    _write_header(<uint8_t*>PyBytes_AS_STRING(out), n)
    memcpy(PyBytes_AS_STRING(out) + h, PyBytes_AS_STRING(body), n)
    return out


# ---------------------------------------------------------------------------
# The per-connection listener
# ---------------------------------------------------------------------------

@cython.final
cdef class ClientListener(WSListener):
    """One WebSocket client. picows calls it without Python overhead.

    It holds what the fan-out touches per delivery (transport, batch buffer,
    conflation state) and one slot for its ``session`` (gateway.session),
    which owns everything else about the connection. Trade frames are
    appended during a fan-out and leave in one write at its flush. A plain
    text or binary message goes to ``session.on_message``; every rarer
    frame (fragments, close, bad bits) to gateway.frames.
    """

    def __init__(self, session=None):
        self.session = session
        self.symbols = []
        self.transport = None
        self._sink = None
        self.frag = None
        self.conflated = {}
        self.held = []

    def __dealloc__(self):
        free(self.out)

    property sink:
        # Without a transport, frames go to sink(bytes): tests and benchmarks.
        def __get__(self):
            return self._sink
        def __set__(self, value):
            self._sink = value

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        self.fd = socket_fd(transport)
        self.wclean = False          # the 101 response went through the transport
        if self.session is not None:
            self.session.on_connected(self)
        release_handshake_state(transport)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        if transport.is_close_frame_sent:
            # Closing: picows still hands over whatever else was in the read
            # buffer (a flood can be megabytes); none of it gets an answer.
            # The client's close completes the handshake: the server closes
            # TCP then (RFC 6455 7.1.1), not after the shutdown grace.
            if t == WSMsgType.CLOSE:
                transport.disconnect()
            return
        if ((t == WSMsgType.TEXT or t == WSMsgType.BINARY) and frame.fin and self.frag is None
                and not frame.rsv2 and not frame.rsv3 and (self.deflate or not frame.rsv1)):
            self.session.on_message(self, frame.get_payload_as_bytes(), t == WSMsgType.TEXT,
                                    frame.rsv1)
        elif t == WSMsgType.PONG and not (frame.rsv1 or frame.rsv2 or frame.rsv3):
            self.session.on_pong()
        else:
            _frames.on_rare_frame(self, transport, frame)

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.conflating = False
        self.conflated.clear()
        self.holding = False
        self.held = []
        self.floors = None
        free(self.out)
        self.out = NULL
        self.out_len = self.out_cap = 0
        if self.session is not None:
            self.session.on_disconnected(self)

    cpdef pause_writing(self):
        self.paused = True

    cpdef resume_writing(self):
        self.paused = False
        if self.conflating and self.session is not None:
            # Drained below the low-water mark: the session sends what was
            # held back (gap notices + latest trades) and ends conflation.
            self.session.on_drained(self)

    cdef int conflate(self, object channel, const char* frame, Py_ssize_t size, int64_t seq) except -1:
        # Keep only the newest frame per channel; count the ones it replaces
        # and, for sequenced trades, the first and last seq replaced.
        entry = self.conflated.get(channel)
        if entry is None:
            self.conflated[channel] = [PyBytes_FromStringAndSize(frame, size), 0, 0, 0, seq]
        else:
            if (<list>entry)[4]:
                if not (<list>entry)[2]:
                    (<list>entry)[2] = (<list>entry)[4]
                (<list>entry)[3] = (<list>entry)[4]
            (<list>entry)[0] = PyBytes_FromStringAndSize(frame, size)
            (<list>entry)[1] += 1
            (<list>entry)[4] = seq
        return 0

    def take_conflated(self):
        """[(channel, latest frame, skipped count, first skipped seq, last skipped seq)]
        in first-held order (seqs 0 for unsequenced trades); clears them."""
        held = [(k, v[0], v[1], v[2], v[3]) for k, v in self.conflated.items()]
        self.conflated.clear()
        return held

    cdef int hold(self, object channel, int64_t seq, const char* frame, Py_ssize_t size) except -1:
        self.held.append((channel, seq, PyBytes_FromStringAndSize(frame, size)))
        return 0

    def set_floor(self, bytes channel, bytes epoch, long long seq):
        """Skip live trades of ``channel`` in ``epoch`` up to ``seq`` (already sent)."""
        if self.floors is None:
            self.floors = {}
        self.floors[channel] = [epoch, seq]

    cdef bint below_floor(self, object channel, const char* epoch, Py_ssize_t elen, int64_t seq) except -1:
        if seq == 0:
            return False                     # unsequenced trades have no position
        cdef PyObject* found = PyDict_GetItem(self.floors, channel)
        if found == NULL:
            return False
        floor = <list>found
        if (PyBytes_GET_SIZE(floor[0]) == elen
                and memcmp(PyBytes_AS_STRING(floor[0]), epoch, elen) == 0
                and seq <= <int64_t>floor[1]):
            return True
        # Past the floor (or another epoch): the live stream has caught up.
        del self.floors[channel]
        if not self.floors:
            self.floors = None
        return False

    def take_held(self):
        """[(channel, seq, frame)] held while ``holding`` was set, in arrival order
        (seq 0 for unsequenced trades); clears them."""
        held, self.held = self.held, []
        return held

    cpdef send_text(self, bytes data):
        """Send one text message now (control replies)."""
        # Framed here rather than by picows, so its per-connection buffer
        # does not grow to the size of the largest reply.
        self.send_frame(encode_text_frame(data))

    cpdef send_frame(self, bytes frame):
        """Send one complete, already framed message now (after any trades
        still waiting in this client's batch: order is kept)."""
        cdef WSTransport t = self.transport
        self.flush_pending()
        if t is not None:
            if not (t.is_disconnected or t.is_close_frame_sent):
                self.write_out(t, PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame))
        elif self._sink is not None:
            self._sink(frame)

    cpdef flush_pending(self):
        """Write the frames waiting in this client's batch now (before the
        gateway closes the connection, with write coalescing on)."""
        cdef bint listed = self.in_batch
        if self.out_len:
            self.flush(PY_SSIZE_T_MAX)
            # Still in the fan-out's list for its coalesced write: frames
            # that come before it go with it, not on a second entry.
            self.in_batch = listed

    @property
    def pending(self):
        """Bytes waiting in this client's batch buffer (tests)."""
        return self.out_len

    def write_buffer_size(self):
        """Bytes the transport holds for this client, not yet taken by the kernel."""
        if self.transport is None:
            return 0
        return self.transport.underlying_transport.get_write_buffer_size()

    cdef int append_frame(self, const char* frame, Py_ssize_t size) except -1:
        cdef Py_ssize_t need = self.out_len + size, cap
        cdef char* grown
        if need > self.out_cap:
            cap = self.out_cap * 2 if self.out_cap else 4096
            while cap < need:
                cap *= 2
            grown = <char*>realloc(self.out, cap)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
            self.out_cap = cap
        memcpy(self.out + self.out_len, frame, size)
        self.out_len = need
        return 0

    cdef int write_out(self, WSTransport t, const char* data, Py_ssize_t size) except -1:
        # Straight to the socket while the transport holds nothing, so the
        # bytes cannot overtake queued ones; whatever the kernel does not
        # take goes to the transport, which sends it when the socket drains.
        # This is picows' own zero-copy write without the per-write Python
        # call that asks the transport for its buffer size: that is asked
        # only after a write that left something queued.
        cdef ssize_t n
        if not self.wclean:
            if self.fd < 0 or t.underlying_transport.get_write_buffer_size():
                t.underlying_transport.write(PyBytes_FromStringAndSize(data, size))
                return 0
            self.wclean = True
        n = send(self.fd, data, size, MSG_NOSIGNAL)
        if n == size:
            return 0
        # Socket full (EAGAIN), a partial write, or an error: the transport
        # queues the rest, or meets the error and closes the connection.
        self.wclean = False
        if n < 0:
            n = 0
        t.underlying_transport.write(PyBytes_FromStringAndSize(data + n, size - n))
        return 0

    cdef int flush(self, Py_ssize_t max_buffered) except -1:
        # Returns 1 if the client is over its outbound limit after the write.
        cdef WSTransport t = self.transport
        self.in_batch = False
        if self.out_len == 0:
            return 0
        if t is not None:
            # A closing or closed client gets nothing more; picows' own send
            # paths check the same flags.
            if not (t.is_disconnected or t.is_close_frame_sent):
                self.write_out(t, self.out, self.out_len)
        elif self._sink is not None:
            self._sink(PyBytes_FromStringAndSize(self.out, self.out_len))
        self.out_len = 0
        if self.out_cap > OUT_KEEP:
            free(self.out)
            self.out = NULL
            self.out_cap = 0
        if self.paused and t is not None and not t.is_disconnected:
            if t.underlying_transport.get_write_buffer_size() > max_buffered:
                return 1
        return 0


# ---------------------------------------------------------------------------
# Symbol table
# ---------------------------------------------------------------------------

@cython.final
cdef class SymbolTable:
    """symbol -> subscribed clients, keyed by the full channel name.

    Keying by channel bytes lets the fan-out look up the channel object
    hiredis already made, with no slicing or decoding per message. A trade
    symbol "AAPL" is keyed <prefix>AAPL, a candle stream "AAPL@1m"
    <candle_prefix>1m:AAPL (the channel the candle service publishes on).
    """

    def __init__(self, bytes prefix=b"channel:trade:", bytes candle_prefix not None=b"channel:candle:"):
        self.prefix = prefix
        self.candle_prefix = candle_prefix
        self.channels = {}
        self.positions = {}
        self.subscription_count = 0

    cpdef bytes channel_for(self, str symbol):
        """The Redis channel of ``symbol``, or of candle stream "SYMBOL@interval"."""
        cdef Py_ssize_t i = symbol.find("@")
        if i < 0:
            return self.prefix + symbol.encode("utf-8")
        return b"".join((self.candle_prefix, symbol[i + 1:].encode("utf-8"), b":",
                         symbol[:i].encode("utf-8")))

    cpdef str symbol_for(self, bytes channel):
        """The inverse of channel_for: "AAPL", or "AAPL@1m" for a candle channel.
        ValueError for a channel under neither prefix."""
        cdef bytes cp = self.candle_prefix
        if cp and channel.startswith(cp):
            interval, sep, symbol = channel[len(cp):].partition(b":")
            if sep:
                return (symbol + b"@" + interval).decode("utf-8", "replace")
        if channel.startswith(self.prefix):
            return channel[len(self.prefix):].decode("utf-8", "replace")
        raise ValueError(f"not a channel of this table: {channel!r}")

    cpdef bint subscribe(self, ClientListener conn, str symbol) except -1:
        """Add ``symbol`` for ``conn``; False if it was already there."""
        if symbol in conn.symbols:
            return False
        key = self.channel_for(symbol)
        subs = self.channels.get(key)
        if subs is None:
            subs = self.channels[key] = []
        subs.append(conn)
        conn.symbols.append(symbol)
        self.subscription_count += 1
        return True

    cpdef bint unsubscribe(self, ClientListener conn, str symbol) except -1:
        """Remove ``symbol`` for ``conn``; False if it was not there."""
        if symbol not in conn.symbols:
            return False
        conn.symbols.remove(symbol)
        key = self.channel_for(symbol)
        subs = <list>self.channels[key]
        subs.remove(conn)
        if not subs:
            del self.channels[key]
            # Nobody follows it now: a later subscriber starts from whatever
            # comes next, not from a stale position that would look like a gap.
            self.positions.pop(key, None)
        self.subscription_count -= 1
        return True

    cpdef int remove_connection(self, ClientListener conn) except -1:
        """Drop every subscription of ``conn``; returns how many."""
        cdef int n = 0
        for symbol in list(conn.symbols):
            n += self.unsubscribe(conn, symbol)
        return n

    def subscribers(self, str symbol):
        """The clients holding ``symbol``, as a new list."""
        return list(self.channels.get(self.channel_for(symbol), ()))

    cpdef list lookup(self, bytes channel):
        """The live subscriber list for a channel, or None (the fan-out's lookup)."""
        cdef PyObject* found = PyDict_GetItem(self.channels, channel)
        return None if found == NULL else <list>found

    def symbols(self):
        """Every symbol and candle stream ("AAPL@1m") with at least one subscriber, sorted."""
        return sorted([self.symbol_for(key) for key in self.channels])

    @property
    def symbol_count(self):
        return len(self.channels)

    def __len__(self):
        return len(self.channels)


# ---------------------------------------------------------------------------
# Fan-out: trade messages in, batched frames out (one per process)
# ---------------------------------------------------------------------------

cdef inline bint _is_pmessage(object reply) noexcept:
    if type(reply) is not list or PyList_GET_SIZE(reply) != 4:
        return False
    head = <object>PyList_GET_ITEM(reply, 0)
    return (type(head) is bytes and PyBytes_GET_SIZE(head) == 8
            and memcmp(PyBytes_AS_STRING(head), b"pmessage", 8) == 0)


@cython.final
cdef class FanOut:
    """Routes trade messages to subscribers and writes each client's batch.

    Fed by one or more SubscriptionReader objects (one per Redis
    connection). Each trade is validated, framed once, copied into every
    subscriber's batch; at the end of a read, every client with frames
    pending gets them in one write, and a client left over ``max_buffered``
    outbound bytes is passed to ``slow_consumer_callback(conn)``.
    """

    def __init__(self, SymbolTable table, Py_ssize_t max_buffered=1 << 20,
                 slow_consumer_callback=None):
        self.table = table
        self.max_buffered = max_buffered
        self.slow_consumer_callback = slow_consumer_callback
        self.touched = []
        self.holds = {}
        self.gap_callback = None
        self.compression_min_size = 0
        self.write_delay = 0.0
        self.flush_handle = None

    def __dealloc__(self):
        free(self.scratch)

    def dispatch(self, list replies):
        """Route already-parsed Redis replies (pmessages; others are ignored)
        and flush: benchmarks and tests."""
        cdef char ts[24]
        cdef Py_ssize_t tslen = snprintf(ts, sizeof(ts), "%lld", <long long>now_ms())
        try:
            for reply in replies:
                if _is_pmessage(reply):
                    self.route(<object>PyList_GET_ITEM(reply, 2), <object>PyList_GET_ITEM(reply, 3),
                               ts, tslen)
        finally:
            self.flush()

    def position(self, bytes channel):
        """(epoch, last seq routed) of a sequenced channel with subscribers, or None."""
        pos = self.table.positions.get(channel)
        return None if pos is None else (pos[0].decode(), pos[1])

    def forget(self, bytes channel):
        """Drop ``channel``'s position: its next sequenced trade starts it anew."""
        self.table.positions.pop(channel, None)

    def hold(self, bytes channel):
        """Hold every message for ``channel`` (in order) until ``release``."""
        if channel not in self.holds:
            self.holds[channel] = []

    def release(self, bytes channel):
        """Stop holding ``channel``; the payloads held, in arrival order."""
        return self.holds.pop(channel, [])

    def holding(self, bytes channel):
        return channel in self.holds

    def latency_histogram(self):
        """(upper bounds in seconds, counts per bucket incl. +Inf, sum in seconds)."""
        bounds = [_BUCKET_NS[b] / 1e9 for b in range(N_BUCKETS)]
        counts = [self.latency_counts[b] for b in range(N_BUCKETS + 1)]
        return bounds, counts, self.latency_sum_ns / 1e9

    cdef void observe(self, int64_t elapsed_ns) noexcept:
        # Fan-out latency: from the Redis read to the last client write.
        cdef int b = 0
        while b < N_BUCKETS and elapsed_ns > _BUCKET_NS[b]:
            b += 1
        self.latency_counts[b] += 1
        self.latency_sum_ns += elapsed_ns

    cdef int route(self, object channel, object payload, const char* ts, Py_ssize_t tslen) except -1:
        cdef PyObject* found
        cdef list subs, pos
        cdef bytes cp
        cdef Py_ssize_t plen, size
        cdef const char* p
        cdef Sequenced sq
        cdef int64_t seq = 0
        self.redis_messages += 1
        if type(payload) is not bytes or not _is_json_object(
                <const uint8_t*>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload)):
            self.dropped_payloads += 1
            return 0
        if self.holds:
            found = PyDict_GetItem(self.holds, channel)
            if found != NULL:
                (<list>found).append(payload)
                return 0
        found = PyDict_GetItem(self.table.channels, channel)
        if found == NULL:
            self.unrouted_messages += 1
            return 0
        subs = <list>found
        # A candle channel: the one test the trade path pays for candles.
        cp = self.table.candle_prefix
        size = PyBytes_GET_SIZE(cp)
        if (size and type(channel) is bytes and PyBytes_GET_SIZE(channel) > size
                and memcmp(PyBytes_AS_STRING(channel), PyBytes_AS_STRING(cp), size) == 0):
            return self._route_candle(channel, subs, payload)
        p = PyBytes_AS_STRING(payload)
        plen = PyBytes_GET_SIZE(payload)
        if _split_sequenced(p, plen, &sq):
            seq = sq.seq
            self.sequenced_messages += 1
            found = PyDict_GetItem(self.table.positions, channel)
            if found == NULL:
                self.table.positions[channel] = [PyBytes_FromStringAndSize(p + sq.epoch_off, sq.epoch_len), seq]
            else:
                pos = <list>found
                if (PyBytes_GET_SIZE(pos[0]) == sq.epoch_len
                        and memcmp(PyBytes_AS_STRING(pos[0]), p + sq.epoch_off, sq.epoch_len) == 0):
                    if seq <= <int64_t>pos[1]:
                        # Already routed (a history fill overlapping the live
                        # stream): each (epoch, seq) goes out once.
                        self.duplicate_messages += 1
                        return 0
                    if seq > <int64_t>pos[1] + 1 and self.gap_callback is not None:
                        # The gateway missed trades on this channel: hold it
                        # and let the control plane fill the gap first.
                        self.holds[channel] = [payload]
                        self.gap_callback(channel, pos[0].decode(), pos[1], seq)
                        return 0
                    pos[1] = seq
                elif self.gap_callback is not None:
                    # A new epoch: the history started anew (Redis lost it,
                    # or a failover to a replica that lacked some of it).
                    # Hold the channel; the control plane announces the
                    # change and delivers the new epoch from its start.
                    self.holds[channel] = [payload]
                    self.gap_callback(channel, pos[0].decode(), pos[1], 0)
                    return 0
                else:
                    pos[0] = PyBytes_FromStringAndSize(p + sq.epoch_off, sq.epoch_len)
                    pos[1] = seq
            size = _seq_body_len(p, plen, &sq, tslen)
            size += _header_size(size)
            if size > self.scratch_cap:
                self._grow_scratch(size)
            _write_seq_frame(self.scratch, p, plen, &sq, ts, tslen)
        else:
            # The envelope is encoded once per message, then copied per client.
            size = _trade_frame_size(plen, tslen)
            if size > self.scratch_cap:
                self._grow_scratch(size)
            _write_trade_frame(self.scratch, p, plen, ts, tslen)
        return self._deliver(channel, subs, size, p + sq.epoch_off if seq else NULL,
                             sq.epoch_len if seq else 0, seq, seq)

    cdef int _route_candle(self, object channel, list subs, object payload) except -1:
        # The candle service built the client message: it goes out verbatim
        # once {"_n":<n>, is cut off (the '{' kept), with no envelope and no
        # position. n orders it against a backfill (holds, floors with an
        # empty epoch); a conflating client keeps the latest candle message
        # with seq 0, so its notice is a plain gap.
        cdef const char* p = PyBytes_AS_STRING(payload)
        cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload), blen, h, size
        cdef int64_t n = 0
        cdef Py_ssize_t comma = _split_candle(p, plen, &n)
        self.candle_messages += 1
        blen = plen if comma < 0 else plen - comma
        h = _header_size(blen)
        size = h + blen
        if size > self.scratch_cap:
            self._grow_scratch(size)
        _write_header(<uint8_t*>self.scratch, blen)
        if comma < 0:
            memcpy(self.scratch + h, p, plen)
        else:
            self.scratch[h] = b'{'
            memcpy(self.scratch + h + 1, p + comma + 1, plen - comma - 1)
        return self._deliver(channel, subs, size, p, 0, n, 0)

    cdef int _deliver(self, object channel, list subs, Py_ssize_t size, const char* epoch,
                      Py_ssize_t elen, int64_t seq, int64_t conflate_seq) except -1:
        # The frame in scratch (``size`` bytes) to every subscriber: skipped
        # below its floor, held (by seq) or conflated (by conflate_seq), or
        # appended to its batch. Compressed once, for the deflate clients.
        cdef Py_ssize_t j, nsubs = PyList_GET_SIZE(subs), fsize, held = 0, skipped = 0
        cdef const char* fptr
        cdef ClientListener conn
        # A message shorter than compression_min_size goes plain to everyone.
        cdef bint small = size - _frame_header_len(self.scratch) < self.compression_min_size
        zframe = None
        for j in range(nsubs):
            conn = <ClientListener>PyList_GET_ITEM(subs, j)
            if conn.floors is not None and conn.below_floor(channel, epoch, elen, seq):
                skipped += 1
                continue
            if conn.deflate and not small:
                # Compressed once per message, for every client that
                # negotiated permessage-deflate (server_no_context_takeover).
                if zframe is None:
                    zframe = self._deflate_frame(size)
                fptr = PyBytes_AS_STRING(zframe)
                fsize = PyBytes_GET_SIZE(zframe)
            else:
                fptr = self.scratch
                fsize = size
            if conn.holding:
                conn.hold(channel, seq, fptr, fsize)
                held += 1
                continue
            if conn.conflating:
                conn.conflate(channel, fptr, fsize, conflate_seq)
                held += 1
                continue
            conn.append_frame(fptr, fsize)
            if not conn.in_batch:
                conn.in_batch = True
                self.touched.append(conn)
        self.frames_sent += nsubs - held - skipped
        self.conflated_messages += held
        self.bytes_sent += <uint64_t>((nsubs - held - skipped) * size)
        return 0

    cdef bytes _deflate_frame(self, Py_ssize_t size):
        # The plain frame in scratch -> the same message as a compressed frame,
        # by gateway.compression.deflate_payload (RFC 7692 framing included).
        cdef Py_ssize_t h = _frame_header_len(self.scratch)
        cdef bytes z = _deflate_payload(PyBytes_FromStringAndSize(self.scratch + h, size - h))
        cdef Py_ssize_t zn = PyBytes_GET_SIZE(z)
        cdef Py_ssize_t zh = _header_size(zn)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, zh + zn)
        cdef char* o = PyBytes_AS_STRING(out)
        _write_header(<uint8_t*>o, zn)
        o[0] = <char>0xC1  # FIN + RSV1 (compressed) + text
        memcpy(o + zh, PyBytes_AS_STRING(z), zn)
        self.compressed_messages += 1
        return out

    cdef int _grow_scratch(self, Py_ssize_t size) except -1:
        cdef char* grown = <char*>realloc(self.scratch, size)
        if grown == NULL:
            raise MemoryError()
        self.scratch = grown
        self.scratch_cap = size
        return 0

    cdef int end_of_read(self) except -1:
        # After a Redis read: every client's batch goes now, or with
        # write_delay set, at most that much later (one timer for all), so
        # frames of several reads share a write.
        if self.write_delay <= 0.0 or PyList_GET_SIZE(self.touched) == 0:
            return self.flush()
        if self.flush_handle is None:
            self.flush_handle = asyncio.get_running_loop().call_later(self.write_delay,
                                                                      self._timer_flush)
        return 0

    def _timer_flush(self):
        self.flush_handle = None
        self.flush()

    cdef int flush(self) except -1:
        cdef list touched = self.touched
        cdef Py_ssize_t j, n = PyList_GET_SIZE(touched)
        cdef ClientListener conn
        cdef list slow = None
        if n == 0:
            return 0
        self.batches += 1
        self.touched = []
        if n > 1:
            _prefetch(PyList_GET_ITEM(touched, 1))
        for j in range(n):
            conn = <ClientListener>PyList_GET_ITEM(touched, j)
            # Each send takes microseconds in the kernel, time enough to bring
            # the next clients' objects into cache: a listener two ahead, and
            # the transport of the one after this (its listener now cached).
            if j + 2 < n:
                _prefetch(PyList_GET_ITEM(touched, j + 2))
            if j + 1 < n:
                _prefetch(<void*>(<ClientListener>PyList_GET_ITEM(touched, j + 1)).transport)
            if conn.flush(self.max_buffered):
                if slow is None:
                    slow = []
                slow.append(conn)
        self.writes += n
        if slow is not None and self.slow_consumer_callback is not None:
            for conn in slow:
                self.slow_consumer_callback(conn)
        return 0


# ---------------------------------------------------------------------------
# Subscription reader: RESP in from one Redis connection
# ---------------------------------------------------------------------------

@cython.final
cdef class SubscriptionReader:
    """Parses the RESP stream of one Redis subscription connection.

    ``feed(data, nbytes)`` takes whatever the socket delivered, in any split.
    Trade messages (pmessage replies) go to the shared ``fanout``; every
    other reply (subscribe confirmations, pongs, errors) goes to
    ``reply_callback(reply)``. The fan-out flushes at the end of each feed.
    Make a new reader for each new connection: a partial reply must never be
    completed by another connection's bytes. Raises hiredis.ProtocolError on
    bytes that are not RESP; the connection is then unusable.
    """

    def __init__(self, FanOut fanout, reply_callback=None):
        self.fanout = fanout
        self.reply_callback = reply_callback
        self.reader = hiredis.Reader()

    def feed(self, data, Py_ssize_t nbytes=-1):
        """Parse ``data[:nbytes]`` (bytes-like; all of it by default), route, flush."""
        cdef Py_ssize_t n = len(data) if nbytes < 0 else nbytes, off = 0, k
        cdef char ts[24]
        cdef Py_ssize_t tslen = snprintf(ts, sizeof(ts), "%lld", <long long>now_ms())
        cdef int64_t t0 = now_ns()
        cdef FanOut fanout = self.fanout
        reader = self.reader
        gets = reader.gets
        try:
            while off < n:
                k = n - off if n - off < FEED_CHUNK else FEED_CHUNK
                reader.feed(data, off, k)
                off += k
                while True:
                    reply = gets()
                    if reply is False:
                        break
                    self._handle(reply, ts, tslen)
        finally:
            fanout.end_of_read()
            fanout.observe(now_ns() - t0)

    cdef int _handle(self, object reply, const char* ts, Py_ssize_t tslen) except -1:
        # A failure on one message (a bug, never bad input) is counted and
        # logged; the stream goes on with the next message.
        cdef FanOut fanout = self.fanout
        try:
            if _is_pmessage(reply):
                self.messages += 1
                fanout.route(<object>PyList_GET_ITEM(<list>reply, 2),
                             <object>PyList_GET_ITEM(<list>reply, 3), ts, tslen)
            elif self.reply_callback is not None:
                self.reply_callback(reply)
        except Exception:
            fanout.dispatch_errors += 1
            if fanout.dispatch_errors <= 10 or fanout.dispatch_errors % 10000 == 0:
                _log.exception("message dispatch failed (%d so far); continuing",
                               fanout.dispatch_errors)
        return 0
