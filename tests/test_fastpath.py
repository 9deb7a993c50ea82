"""The fast path, compiled and pure-Python, against fixed cases.

Every test that takes ``impl`` runs once on gateway._fastpath (compiled) and
once on gateway._fastpath_py (its twin). The reference for payload validation
is orjson itself: a payload is valid iff ``type(orjson.loads(x)) is dict``.
Frames are checked with a small RFC 6455 parser written here, independent of
the code under test.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import hiredis
import orjson
import pytest
from conftest import wait_until

from gateway._testbase import ws as wire

ROOT = Path(__file__).resolve().parent.parent

HEAD = b'{"type":"trade","data":'
MID = b',"timestamp":'
PREFIX = b"channel:trade:"
PATTERN = b"channel:trade:*"


# ---------------------------------------------------------------------------
# Helpers independent of the code under test
# ---------------------------------------------------------------------------

def ref_is_object(x: bytes) -> bool:
    try:
        return type(orjson.loads(x)) is dict
    except orjson.JSONDecodeError:
        return False


def parse_frames(buf: bytes, rsv: int = 0) -> list[tuple[bool, int, bytes]]:
    """Split ``buf`` into server-to-client frames (RFC 6455 5.2); all must be whole
    and carry exactly the ``rsv`` bits given (0x40: compressed)."""
    expected_rsv = rsv
    frames = []
    i, n = 0, len(buf)
    while i < n:
        assert n - i >= 2, "truncated frame header"
        b0, b1 = buf[i], buf[i + 1]
        fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        masked, length = bool(b1 & 0x80), b1 & 0x7F
        assert rsv == expected_rsv, "unexpected RSV bits"
        assert not masked, "server frames must not be masked"
        i += 2
        if length == 126:
            assert n - i >= 2
            (length,) = struct.unpack_from(">H", buf, i)
            assert length >= 126, "16-bit length used for a short frame"
            i += 2
        elif length == 127:
            assert n - i >= 8
            (length,) = struct.unpack_from(">Q", buf, i)
            assert length >> 63 == 0, "64-bit length with the top bit set"
            assert length >= 65536, "64-bit length used for a medium frame"
            i += 8
        assert n - i >= length, "truncated frame body"
        frames.append((fin, opcode, buf[i:i + length]))
        i += length
    return frames


def text_bodies(buf: bytes) -> list[bytes]:
    out = []
    for fin, opcode, body in parse_frames(buf):
        assert fin and opcode == 0x1
        out.append(body)
    return out


TRADE_RE = re.compile(rb'\A\{"type":"trade","data":(.*),"timestamp":(-?\d+)\}\Z', re.S)


def split_trade(body: bytes) -> tuple[bytes, int]:
    m = TRADE_RE.match(body)
    assert m, body[:80]
    return m.group(1), int(m.group(2))


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pmessage(channel: bytes, payload: bytes, pattern: bytes = PATTERN) -> bytes:
    return b"*4\r\n" + bulk(b"pmessage") + bulk(pattern) + bulk(channel) + bulk(payload)


def ch(symbol: str) -> bytes:
    return PREFIX + symbol.encode()


def obj_of_size(n: int, fill: bytes = b"x") -> bytes:
    """A valid JSON object of exactly ``n`` bytes (n >= 8)."""
    assert n >= 8
    out = b'{"p":"' + fill * (n - 8) + b'"}'
    assert len(out) == n
    return out


# ---------------------------------------------------------------------------
# Module selection
# ---------------------------------------------------------------------------

def test_compiled_module_loaded():
    """Not parametrized: a missing or unselected extension is a failure, not a skip."""
    try:
        from gateway import _fastpath
    except ImportError as exc:
        pytest.fail(f"gateway._fastpath (the compiled fast path) cannot be imported: {exc}")
    assert _fastpath.IS_COMPILED is True
    assert _fastpath.__file__.endswith((".so", ".pyd")), _fastpath.__file__
    from gateway import fastpath
    if os.environ.get("GATEWAY_NO_EXTENSIONS", "") in ("", "0"):
        assert fastpath.IS_COMPILED is True, "selector fell back to the pure-Python twin"
        assert fastpath.impl is _fastpath
        assert fastpath.FanOut is _fastpath.FanOut
        assert fastpath.SubscriptionReader is _fastpath.SubscriptionReader
        assert fastpath.is_json_object is _fastpath.is_json_object


SELECTOR_PROBE = ("import gateway.fastpath as f; "
                  "print(f.IS_COMPILED, f.impl.__name__, f.SymbolTable.__module__)")


@pytest.mark.parametrize("value, compiled", [("1", False), ("yes", False), (None, True), ("0", True),
                                             ("", True)])
def test_selector_in_subprocess(value, compiled):
    env = dict(os.environ)
    env.pop("GATEWAY_NO_EXTENSIONS", None)
    if value is not None:
        env["GATEWAY_NO_EXTENSIONS"] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", SELECTOR_PROBE], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    name = "gateway._fastpath" if compiled else "gateway._fastpath_py"
    assert res.stdout.split() == [str(compiled), name, name], (res.stdout, res.stderr)
    if compiled:
        assert "not available" not in res.stderr


# ---------------------------------------------------------------------------
# is_json_object
# ---------------------------------------------------------------------------

ACCEPT = [
    b"{}",
    b' \t\r\n{ } \n',
    b'{"a":1}',
    b'{"a":[1,2,{"b":[[],{}]}],"c":{"d":{"e":null}}}',
    b'{ "a" : [ 1 , 2 ] , "b" : { } }',
    b'{"a":true,"b":false,"c":null}',
    b'{"":""}',
    b'{"a":"\\"\\\\\\/\\b\\f\\n\\r\\t"}',
    b'{"a":"\\u0041\\u00e9\\uFFFF"}',
    b'{"a":"\\ud83d\\ude00"}',               # surrogate pair
    b'{"a":"\\uD83D\\uDE00"}',
    b'{"\\ud83d\\ude00":1}',                  # pair in a key
    '{"a":"é日本😀"}'.encode(),             # 2-, 3- and 4-byte UTF-8
    b'{"a":"\xed\x9f\xbf"}',                  # U+D7FF, just below the surrogates
    b'{"a":"\xee\x80\x80"}',                  # U+E000, just above
    b'{"a":"\xf4\x8f\xbf\xbf"}',              # U+10FFFF
    b'{"a":"\x7f"}',                          # DEL is not a control character in JSON
    b'{"a":0}', b'{"a":-0}', b'{"a":-1}', b'{"a":0.5}', b'{"a":-0.0}',
    b'{"a":1e5}', b'{"a":1E5}', b'{"a":1e+5}', b'{"a":1e-5}', b'{"a":1.5e10}', b'{"a":-2.5E-3}',
    b'{"a":0e999}', b'{"a":1e-400}',          # underflow to zero is fine
    b'{"a":1.7976931348623157e308}',          # DBL_MAX
    b'{"a":18446744073709551616}', b'{"a":-9223372036854775809}',
    b'{"a":' + b"1" * 300 + b"}",             # huge, still finite
    b'{"a":' + b"1" * 309 + b"}",
    b'{"a":0.' + b"0" * 400 + b"1}",
    b'{"a":1,"a":2}',                         # duplicate keys
    b'{"a":{"a":{"a":[]}}}',
]

REJECT = [
    b"", b" ", b"\n", b"{", b"}", b"{{}}", b"{}}", b"{}x", b"{}{}", b"{} []",
    b"[]", b"[{}]", b'"s"', b'"{}"', b"1", b"-1", b"true", b"false", b"null",   # not objects
    b"\xef\xbb\xbf{}",                        # BOM
    b"\x0c{}", b'{"a":\x0c1}',                # form feed is not JSON whitespace
    b'{"a":1}\x00',
    b'{"a":1,}', b'{"a":[1,2,]}', b'{"a":[,]}', b'{,}', b'{"a":1,,"b":2}',  # commas
    b'{"a" 1}', b'{"a"}', b'{"a":}', b'{"a"::1}', b'{1:2}', b"{'a':1}", b"{a:1}",
    b'{"a":1 "b":2}', b'{"a":[1 2]}', b'{"a":[}', b'{"a":]}', b'{"a":[1}', b'{"a":{]}',
    b'{"a":tru}', b'{"a":nul}', b'{"a":fals}', b'{"a":True}', b'{"a":NULL}', b'{"a":t}',
    b'{"a":truee}', b'{"a":nulll}',
    b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":nan}',
    b'{"a":01}', b'{"a":-01}', b'{"a":00}', b'{"a":1.}', b'{"a":.5}', b'{"a":-}', b'{"a":+1}',
    b'{"a":1e}', b'{"a":1e+}', b'{"a":1e-}', b'{"a":1.e5}', b'{"a":0x10}', b'{"a":1_000}',
    b'{"a":- 1}', b'{"a":1.5.5}', b'{"a":1e5e5}',
    b'{"a":1e999}', b'{"a":-1e999}', b'{"a":1E400}', b'{"a":2e308}',   # overflow to infinity
    b'{"a":1.7976931348623159e308}',
    b'{"a":' + b"1" * 310 + b"}", b'{"a":-' + b"9" * 400 + b"}",
    b'{"a":"\\ud800"}', b'{"a":"\\udc00"}', b'{"a":"\\ud800x"}', b'{"a":"\\ud800\\u0041"}',
    b'{"a":"\\udc00\\ud800"}', b'{"a":"\\ud800\\ud800"}', b'{"\\ud800":1}',     # lone surrogates
    b'{"a":"\xed\xa0\x80"}', b'{"a":"\xed\xbf\xbf"}',                        # raw surrogates
    b'{"a":"\xc0\x80"}', b'{"a":"\xc1\xbf"}', b'{"a":"\xe0\x80\x80"}',       # overlong
    b'{"a":"\xe0\x9f\xbf"}', b'{"a":"\xf0\x80\x80\x80"}', b'{"a":"\xf0\x8f\xbf\xbf"}',
    b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\xf5\x80\x80\x80"}', b'{"a":"\xff"}', b'{"a":"\xfe"}',
    b'{"a":"\x80"}', b'{"a":"\xc3"}', b'{"a":"\xe6\x97"}', b'{"a":"\xf0\x9f\x98"}',  # truncated
    b'{"a":"\xc3\x28"}', b'{"\xff":1}', b'{"a":1}\xff', b'\xff{}',
    b'{"a":"\x00"}', b'{"a":"\x1f"}', b'{"a":"\t"}', b'{"a":"\n"}', b'{"a\n":1}',       # controls
    b'{"a":"\\x"}', b'{"a":"\\u12"}', b'{"a":"\\uzzzz"}', b'{"a":"\\U0041"}', b'{"a":"\\\'"}',
    b'{"a":"\\', b'{"a":"\\u', b'{"a":"abc', b'{"a":"abc}',
]


@pytest.mark.parametrize("payload", ACCEPT, ids=lambda x: repr(x[:40]))
def test_is_json_object_accepts(impl, payload):
    assert ref_is_object(payload) is True, "the table disagrees with orjson"
    assert impl.is_json_object(payload) is True


@pytest.mark.parametrize("payload", REJECT, ids=lambda x: repr(x[:40]))
def test_is_json_object_rejects(impl, payload):
    assert ref_is_object(payload) is False, "the table disagrees with orjson"
    assert impl.is_json_object(payload) is False


def _orjson_depth_limit() -> int:
    """The deepest container nesting orjson accepts, found by trying."""
    d = 1
    while _loads_ok(b"[" * (d + 1) + b"]" * (d + 1)):
        d += 1
        assert d < 100_000
    return d


def _loads_ok(x: bytes) -> bool:
    try:
        orjson.loads(x)
    except orjson.JSONDecodeError:
        return False
    return True


ORJSON_DEPTH = _orjson_depth_limit()


def _nested(depth: int, kind: str) -> bytes:
    """A top-level object holding ``depth`` containers in all (the object included)."""
    inner = depth - 1
    if kind == "arrays":
        return b'{"a":' + b"[" * inner + b"]" * inner + b"}"
    if kind == "arrays_scalar":
        return b'{"a":' + b"[" * inner + b"1" + b"]" * inner + b"}"
    if kind == "objects":
        return b'{"a":' * inner + b"{}" + b"}" * inner
    if kind == "objects_scalar":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "mixed":
        opens = [b"[" if j % 2 == 0 else b'{"k":' for j in range(inner)]
        closes = [b"]" if j % 2 == 0 else b"}" for j in range(inner)]
        return b'{"a":' + b"".join(opens) + b"0" + b"".join(reversed(closes)) + b"}"
    raise AssertionError(kind)


def test_orjson_depth_limit_found():
    assert 64 <= ORJSON_DEPTH < 100_000
    assert type(orjson.loads(b"[" * ORJSON_DEPTH + b"]" * ORJSON_DEPTH)) is list
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * (ORJSON_DEPTH + 1) + b"]" * (ORJSON_DEPTH + 1))


@pytest.mark.parametrize("kind", ["arrays", "arrays_scalar", "objects", "objects_scalar", "mixed"])
@pytest.mark.parametrize("delta", [-2, -1, 0, 1, 2])
def test_is_json_object_depth_limit(impl, kind, delta):
    doc = _nested(ORJSON_DEPTH + delta, kind)
    # The accept/reject edge is the same for every shape: exactly at the limit is fine.
    assert ref_is_object(doc) is (delta <= 0)
    assert impl.is_json_object(doc) is ref_is_object(doc)


def test_is_json_object_very_deep_and_long(impl):
    for doc in (b"{" * 200_000, b'{"a":' + b"[" * 200_000, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                b'{"a":[' + b"1," * 100_000 + b"1]}", b'{"a":"' + b"x" * 1_000_000 + b'"}'):
        assert impl.is_json_object(doc) is ref_is_object(doc)


PREFIX_DOCS = [
    b'{"a":[1,-2.5e3,{"b":"\\u00e9\\ud83d\\ude00"}],"t":true,"f":false,"n":null}',
    ' {"sym" : "BTC", "px": 0.5, "q":[ ], "o":{ }, "s":"日本😀"} '.encode(),
    b'{"x":1E-7,"y":"\\\\\\"","z":[[[]]]}',
]


@pytest.mark.parametrize("doc", PREFIX_DOCS, ids=range(len(PREFIX_DOCS)))
def test_is_json_object_every_prefix(impl, doc):
    assert ref_is_object(doc)
    stripped_len = len(doc.rstrip())
    for k in range(len(doc) + 1):
        prefix = doc[:k]
        expected = k >= stripped_len   # only the whole (trailing whitespace aside)
        assert ref_is_object(prefix) is expected, k
        assert impl.is_json_object(prefix) is expected, (k, prefix)


# ---------------------------------------------------------------------------
# parse_symbol
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("channel, prefix, expected", [
    (b"channel:trade:BTC", PREFIX, "BTC"),
    (b"channel:trade:BTC-USD.X", PREFIX, "BTC-USD.X"),
    (b"channel:trade:" + "日本".encode(), PREFIX, "日本"),
    (b"channel:trade:\xff", PREFIX, "\ufffd"),
    (b"channel:trade:", PREFIX, None),          # empty remainder
    (b"channel:trad", PREFIX, None),
    (b"channel:quote:BTC", PREFIX, None),
    (b"xchannel:trade:BTC", PREFIX, None),
    (b"", PREFIX, None),
    (b"BTC", PREFIX, None),
    (b"t.ETH", b"t.", "ETH"),                    # custom prefix
    (b"t.", b"t.", None),
    (b"channel:trade:ETH", b"t.", None),
    (b"ABC", b"", "ABC"),
    (b"", b"", None),
])
def test_parse_symbol(impl, channel, prefix, expected):
    assert impl.parse_symbol(channel, prefix) == expected


# ---------------------------------------------------------------------------
# Frame encoding
# ---------------------------------------------------------------------------

TS = 1_700_000_000_123
TRADE_OVERHEAD = len(HEAD) + len(MID) + len(str(TS)) + 1


def expected_frame(body: bytes) -> bytes:
    n = len(body)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + struct.pack(">H", n)
    else:
        header = bytes((0x81, 127)) + struct.pack(">Q", n)
    return header + body


@pytest.mark.parametrize("body_len, header_len", [
    (60, 2), (124, 2), (125, 2), (126, 4), (127, 4), (255, 4), (256, 4), (65534, 4), (65535, 4),
    (65536, 10), (65537, 10), (200_000, 10)])
def test_encode_trade_frame_lengths(impl, body_len, header_len):
    payload = obj_of_size(body_len - TRADE_OVERHEAD)
    frame = impl.encode_trade_frame(payload, TS)
    body = HEAD + payload + MID + str(TS).encode() + b"}"
    assert len(body) == body_len
    assert frame == expected_frame(body)
    assert len(frame) == header_len + body_len
    assert frame[0] == 0x81
    if header_len == 2:
        assert frame[1] == body_len
    elif header_len == 4:
        assert frame[1] == 126 and frame[2:4] == body_len.to_bytes(2, "big")
    else:
        assert frame[1] == 127 and frame[2:10] == body_len.to_bytes(8, "big")
    [(fin, opcode, got)] = parse_frames(frame)
    assert fin and opcode == 1 and got == body
    assert orjson.loads(got) == {"type": "trade", "data": orjson.loads(payload), "timestamp": TS}


@pytest.mark.parametrize("ts", [0, 1, -1, 999, TS, 2**53 + 1, 2**63 - 1, -(2**63)])
def test_encode_trade_frame_timestamps(impl, ts):
    frame = impl.encode_trade_frame(b'{"p":1}', ts)
    [(_, _, body)] = parse_frames(frame)
    assert body == b'{"type":"trade","data":{"p":1},"timestamp":' + str(ts).encode() + b"}"


def test_encode_trade_frame_passes_payload_verbatim(impl):
    # No re-encoding: whitespace and escapes in the payload survive byte for byte.
    payload = b' { "a" : "\\u00e9" , "b":[ 1 ,2 ] } '
    [(_, _, body)] = parse_frames(impl.encode_trade_frame(payload, 5))
    assert body == HEAD + payload + MID + b"5}"


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_text_frame(impl, n):
    body = random.Random(n).randbytes(n)
    frame = impl.encode_text_frame(body)
    assert frame == expected_frame(body)
    assert parse_frames(frame) == [(True, 1, body)]


# ---------------------------------------------------------------------------
# SymbolTable
# ---------------------------------------------------------------------------

def check_table(impl, table, conns) -> None:
    """The table agrees with every conn.symbols, through the public interface only."""
    expected: dict[str, list] = {}
    for conn in conns:
        assert len(set(conn.symbols)) == len(conn.symbols)
        for s in conn.symbols:
            expected.setdefault(s, []).append(conn)
    assert table.symbols() == sorted(expected)
    assert table.symbol_count == len(expected) == len(table)
    assert table.subscription_count == sum(len(c.symbols) for c in conns)
    for s, subs in expected.items():
        got = table.subscribers(s)
        assert sorted(map(id, got)) == sorted(map(id, subs))


def test_symbol_table_bookkeeping(impl):
    t = impl.SymbolTable()
    a, b, c = impl.ClientListener(), impl.ClientListener(), \
        impl.ClientListener()
    assert t.prefix == PREFIX
    assert t.subscription_count == 0 and t.symbol_count == 0 and len(t) == 0
    assert t.symbols() == [] and t.subscribers("BTC") == []

    assert t.subscribe(a, "BTC") is True
    assert t.subscribe(a, "BTC") is False            # duplicate
    assert t.subscribe(b, "BTC") is True
    assert t.subscribe(a, "ETH") is True
    assert t.subscribe(c, "BTC") is True
    assert t.subscription_count == 4 and t.symbol_count == 2 and len(t) == 2
    assert t.symbols() == ["BTC", "ETH"]
    assert t.subscribers("BTC") == [a, b, c]          # subscription order
    assert t.subscribers("ETH") == [a]
    assert a.symbols == ["BTC", "ETH"] and b.symbols == ["BTC"]
    subs = t.subscribers("BTC")
    subs.clear()                                      # a copy, not the table's list
    assert t.subscribers("BTC") == [a, b, c]

    assert t.unsubscribe(b, "BTC") is True
    assert t.unsubscribe(b, "BTC") is False
    assert t.unsubscribe(b, "ETH") is False           # never had it
    assert t.unsubscribe(c, "DOGE") is False
    assert t.subscribers("BTC") == [a, c]
    assert t.subscribe(b, "BTC") is True              # re-subscribe goes to the end
    assert t.subscribers("BTC") == [a, c, b]
    assert t.subscription_count == 4
    check_table(impl, t, [a, b, c])

    assert t.unsubscribe(a, "ETH") is True
    assert t.symbols() == ["BTC"] and t.symbol_count == 1   # empty channel dropped
    assert t.subscribers("ETH") == []

    assert t.remove_connection(a) == 1
    assert t.remove_connection(a) == 0
    assert a.symbols == []
    assert t.remove_connection(c) == 1
    assert t.remove_connection(b) == 1
    assert t.subscription_count == 0 and t.symbol_count == 0 and t.symbols() == []
    check_table(impl, t, [a, b, c])


def test_symbol_table_symbol_order_and_case(impl):
    t = impl.SymbolTable()
    a = impl.ClientListener()
    for s in ["ZZ", "aa", "AA", "M.1", "日本"]:
        assert t.subscribe(a, s)
    assert a.symbols == ["ZZ", "aa", "AA", "M.1", "日本"]   # insertion order, case-sensitive
    assert t.symbols() == sorted(["ZZ", "aa", "AA", "M.1", "日本"])
    assert t.remove_connection(a) == 5
    assert len(t) == 0


def test_symbol_table_custom_prefix(impl):
    t = impl.SymbolTable(b"md.t.")
    assert t.prefix == b"md.t."
    assert t.channel_for("BTC") == b"md.t.BTC"
    assert t.channel_for("日本") == "md.t.日本".encode()
    assert t.channel_for("") == b"md.t."
    assert impl.SymbolTable().channel_for("ETH") == b"channel:trade:ETH"
    a = impl.ClientListener()
    t.subscribe(a, "BTC")
    assert t.symbols() == ["BTC"]
    # The fan-out routes by the full channel name under the custom prefix.
    d = impl.FanOut(t)
    sink: list[bytes] = []
    a.sink = sink.append
    impl.SubscriptionReader(d).feed(pmessage(b"md.t.BTC", b'{"p":1}', b"md.t.*") + pmessage(b"channel:trade:BTC", b'{"p":2}'))
    assert [split_trade(b)[0] for w in sink for b in text_bodies(w)] == [b'{"p":1}']
    assert d.unrouted_messages == 1


def test_symbol_table_random_cycles_end_empty(impl):
    rng = random.Random(20240611)
    t = impl.SymbolTable()
    conns = [impl.ClientListener() for i in range(8)]
    symbols = [f"S{i}" for i in range(12)]
    model: dict[int, set[str]] = {i: set() for i in range(len(conns))}
    for step in range(6000):
        op = rng.random()
        i = rng.randrange(len(conns))
        conn, s = conns[i], rng.choice(symbols)
        if op < 0.55:
            assert t.subscribe(conn, s) is (s not in model[i])
            model[i].add(s)
        elif op < 0.95:
            assert t.unsubscribe(conn, s) is (s in model[i])
            model[i].discard(s)
        else:
            assert t.remove_connection(conn) == len(model[i])
            model[i].clear()
        assert set(conn.symbols) == model[i]
        if step % 97 == 0:
            check_table(impl, t, conns)
            for sym in symbols:
                assert {id(c) for c in t.subscribers(sym)} == \
                    {id(conns[j]) for j in model if sym in model[j]}
    check_table(impl, t, conns)
    for conn in conns:
        t.remove_connection(conn)
    assert t.subscription_count == 0 and t.symbol_count == 0 and len(t) == 0
    assert t.symbols() == [] and all(c.symbols == [] for c in conns)
    assert all(t.subscribers(s) == [] for s in symbols)


# ---------------------------------------------------------------------------
# Subscription reader + fan-out
# ---------------------------------------------------------------------------

class Rig:
    """A table, a fan-out, a reader and sink-backed clients, all from one implementation."""

    def __init__(self, impl, subscriptions: dict[str, list[str]], prefix: bytes = PREFIX,
                 with_callback: bool = True):
        self.table = impl.SymbolTable(prefix)
        self.replies: list = []
        self.impl = impl
        self.fanout = impl.FanOut(self.table)
        self.reader = impl.SubscriptionReader(
            self.fanout, self.replies.append if with_callback else None)
        self.conns = {}
        self.sinks: dict[str, list[bytes]] = {}
        for name, symbols in subscriptions.items():
            conn = impl.ClientListener()
            sink: list[bytes] = []
            conn.sink = sink.append
            for s in symbols:
                assert self.table.subscribe(conn, s)
            self.conns[name] = conn
            self.sinks[name] = sink

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.reader.feed(chunk)

    def reconnect(self) -> None:
        """A new Redis connection: a new reader, the same fan-out."""
        self.reader = self.impl.SubscriptionReader(self.fanout, self.reader.reply_callback)

    def payloads(self, name: str) -> list[bytes]:
        return [split_trade(b)[0] for w in self.sinks[name] for b in text_bodies(w)]

    def counters(self) -> dict[str, int]:
        d = self.fanout
        return {k: getattr(d, k) for k in ("redis_messages", "frames_sent", "bytes_sent", "writes",
                                           "dropped_payloads", "unrouted_messages", "batches")}

    def normalized(self) -> dict[str, list[bytes]]:
        """Every client's frame bodies, in order, with the timestamp blanked."""
        return {name: [re.sub(rb'"timestamp":\d+\}\Z', b'"timestamp":0}', b)
                       for w in sink for b in text_bodies(w)]
                for name, sink in self.sinks.items()}

    def replies_normalized(self) -> list:
        return [(type(r).__name__, str(r)) if isinstance(r, Exception) else r for r in self.replies]


P1, P2, P3, P5 = b'{"px":1}', b'{"px":2,"q":[1,2]}', b' {"px":3} ', b'{"s":"\\u00e9"}'
BAD_ARRAY = b"[1,2]"
BAD_UTF8 = b'{"a":"\xff"}'


def basic_stream() -> bytes:
    return b"".join([
        pmessage(ch("BTC"), P1), pmessage(ch("ETH"), P2), pmessage(ch("BTC"), P3),
        pmessage(ch("DOGE"), b'{"unrouted":1}'), pmessage(ch("BTC"), BAD_ARRAY),
        pmessage(ch("BTC"), BAD_UTF8), pmessage(ch("ETH"), P5),
    ])


def test_dispatch_basic(impl):
    rig = Rig(impl, {"a": ["BTC", "ETH"], "b": ["BTC"], "c": [], "d": ["XRP"]})
    t0 = time.time() * 1000
    rig.feed(basic_stream())
    t1 = time.time() * 1000
    assert len(rig.sinks["a"]) == 1 and len(rig.sinks["b"]) == 1   # one write per feed
    assert rig.sinks["c"] == [] and rig.sinks["d"] == []
    assert rig.payloads("a") == [P1, P2, P3, P5]
    assert rig.payloads("b") == [P1, P3]
    for name in ("a", "b"):
        bodies = text_bodies(rig.sinks[name][0])
        stamps = {split_trade(b)[1] for b in bodies}
        assert len(stamps) == 1                     # one clock reading per feed
        for body in bodies:
            msg = orjson.loads(body)
            assert list(msg) == ["type", "data", "timestamp"] and msg["type"] == "trade"
    frame_bytes = sum(len(w) for w in rig.sinks["a"] + rig.sinks["b"])
    assert rig.counters() == {"redis_messages": 7, "frames_sent": 6, "bytes_sent": frame_bytes,
                              "writes": 2, "dropped_payloads": 2, "unrouted_messages": 1,
                              "batches": 1}
    assert rig.replies == []
    assert all(c.pending == 0 for c in rig.conns.values())
    ts = split_trade(text_bodies(rig.sinks["a"][0])[0])[1]
    assert int(t0) - 2 <= ts <= t1 + 2


def test_dispatch_frames_are_exact(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    rig.feed(pmessage(ch("BTC"), P1) + pmessage(ch("BTC"), P2))
    [write] = rig.sinks["a"]
    bodies = text_bodies(write)
    ts = split_trade(bodies[0])[1]
    assert write == (impl.encode_trade_frame(P1, ts) + impl.encode_trade_frame(P2, ts))
    assert write == (expected_frame(HEAD + P1 + MID + str(ts).encode() + b"}")
                     + expected_frame(HEAD + P2 + MID + str(ts).encode() + b"}"))


def test_dispatch_one_write_per_feed(impl):
    rig = Rig(impl, {"a": ["BTC"], "b": ["ETH"]})
    for k in range(5):
        rig.feed(pmessage(ch("BTC"), b'{"n":%d}' % k) * 3 + pmessage(ch("ETH"), b'{"n":%d}' % k))
        assert len(rig.sinks["a"]) == k + 1 and len(rig.sinks["b"]) == k + 1
        assert len(text_bodies(rig.sinks["a"][-1])) == 3
    rig.feed(pmessage(ch("ETH"), b'{"n":9}'))
    assert len(rig.sinks["a"]) == 5 and len(rig.sinks["b"]) == 6
    c = rig.counters()
    assert c["writes"] == 11 and c["batches"] == 6 and c["frames_sent"] == 21
    rig.feed(b"")                        # nothing read, nothing written
    rig.feed(pmessage(ch("ETH"), b'{"n":9}')[:10])   # partial: nothing yet
    assert rig.counters() == c
    assert len(rig.sinks["b"]) == 6


@pytest.mark.parametrize("bad", [
    BAD_ARRAY, BAD_UTF8, b"", b"null", b'"str"', b"42", b"{", b'{"a":1', b"not json",
    b'{"a":"\xed\xa0\x80"}', b'{"a":"\\ud800"}', b'{"a":NaN}', b'{"a":1e999}', b"{}{}",
])
def test_dispatch_drops_bad_payloads(impl, bad):
    rig = Rig(impl, {"a": ["BTC"]})
    rig.feed(pmessage(ch("BTC"), bad))
    assert rig.sinks["a"] == []
    assert rig.counters() == {"redis_messages": 1, "frames_sent": 0, "bytes_sent": 0, "writes": 0,
                              "dropped_payloads": 1, "unrouted_messages": 0, "batches": 0}
    # Later messages still flow, in the same read and in the next one.
    rig.feed(pmessage(ch("BTC"), bad) + pmessage(ch("BTC"), P1) + pmessage(ch("BTC"), bad))
    rig.feed(pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P1, P2]
    assert len(rig.sinks["a"]) == 2
    assert rig.fanout.dropped_payloads == 3 and rig.fanout.redis_messages == 5


@pytest.mark.parametrize("raw_payload", [
    b"$-1\r\n",            # nil
    b":42\r\n",            # integer
    b"*1\r\n$2\r\n{}\r\n", # array
    b"-ERR {}\r\n",        # error
])
def test_dispatch_drops_non_string_payloads(impl, raw_payload):
    rig = Rig(impl, {"a": ["BTC"]})
    head = b"*4\r\n" + bulk(b"pmessage") + bulk(PATTERN) + bulk(ch("BTC"))
    rig.feed(head + raw_payload + pmessage(ch("BTC"), P1))
    assert rig.payloads("a") == [P1]
    assert rig.fanout.dropped_payloads == 1 and rig.fanout.redis_messages == 2


def test_dispatch_payload_as_status_string(impl):
    # A simple string is bytes too, so it is validated and routed like a bulk string.
    rig = Rig(impl, {"a": ["BTC"]})
    rig.feed(b"*4\r\n" + bulk(b"pmessage") + bulk(PATTERN) + b"+channel:trade:BTC\r\n+{}\r\n")
    assert rig.payloads("a") == [b"{}"]


def test_dispatch_unrouted(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    rig.feed(pmessage(ch("ETH"), P1) + pmessage(b"other:BTC", P1) + pmessage(ch("btc"), P1)
             + pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P2]
    assert rig.fanout.unrouted_messages == 3 and rig.fanout.redis_messages == 4
    assert rig.fanout.frames_sent == 1
    # Invalid payload on an unrouted channel counts as dropped (validation comes first).
    rig.feed(pmessage(ch("ETH"), b"[]"))
    assert rig.fanout.dropped_payloads == 1 and rig.fanout.unrouted_messages == 3


def test_dispatch_after_unsubscribe(impl):
    rig = Rig(impl, {"a": ["BTC"], "b": ["BTC"]})
    rig.table.unsubscribe(rig.conns["a"], "BTC")
    rig.feed(pmessage(ch("BTC"), P1))
    assert rig.sinks["a"] == [] and rig.payloads("b") == [P1]
    rig.table.remove_connection(rig.conns["b"])
    rig.feed(pmessage(ch("BTC"), P2))
    assert rig.payloads("b") == [P1] and rig.fanout.unrouted_messages == 1


def test_dispatch_array_channel_does_not_raise(impl):
    """A pmessage whose channel is not a string (malformed stream) is unrouted, not a crash."""
    rig = Rig(impl, {"a": ["BTC"]})
    head = b"*4\r\n" + bulk(b"pmessage") + bulk(PATTERN)
    rig.feed(head + b"*0\r\n" + bulk(P1) + head + b":5\r\n" + bulk(P1) + pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P2]
    assert rig.fanout.unrouted_messages == 2


def test_dispatch_non_pmessage_replies(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    confirm = b"*3\r\n$10\r\npsubscribe\r\n$15\r\nchannel:trade:*\r\n:1\r\n"
    message3 = b"*3\r\n" + bulk(b"message") + bulk(ch("BTC")) + bulk(P1)     # plain SUBSCRIBE form
    four_not_p = b"*4\r\n" + bulk(b"pmessagE") + bulk(PATTERN) + bulk(ch("BTC")) + bulk(P1)
    five = b"*5\r\n" + bulk(b"pmessage") + bulk(PATTERN) + bulk(ch("BTC")) + bulk(P1) + bulk(b"x")
    rig.feed(confirm + pmessage(ch("BTC"), P1) + b"-ERR x\r\n" + b"+OK\r\n" + message3
             + pmessage(ch("BTC"), P2) + four_not_p + five + b":7\r\n" + b"$-1\r\n" + b"*-1\r\n")
    assert rig.payloads("a") == [P1, P2]
    assert len(rig.sinks["a"]) == 1
    r = rig.replies
    assert r[0] == [b"psubscribe", PATTERN, 1]
    assert isinstance(r[1], hiredis.ReplyError) and str(r[1]) == "ERR x"
    assert r[2:] == [b"OK", [b"message", ch("BTC"), P1],
                     [b"pmessagE", PATTERN, ch("BTC"), P1],
                     [b"pmessage", PATTERN, ch("BTC"), P1, b"x"], 7, None, None]
    assert rig.fanout.redis_messages == 2 and rig.fanout.frames_sent == 2


def test_dispatch_without_reply_callback(impl):
    rig = Rig(impl, {"a": ["BTC"]}, with_callback=False)
    rig.feed(b"+OK\r\n-ERR x\r\n" + pmessage(ch("BTC"), P1) + b"*3\r\n$10\r\npsubscribe\r\n$1\r\np\r\n:1\r\n")
    assert rig.payloads("a") == [P1]


def test_dispatch_reply_callback_sees_replies_in_order_with_routing(impl):
    # Replies arrive in stream order, and frames before a reply are not yet flushed
    # (the flush happens once, after the whole read).
    seen = []
    rig = Rig(impl, {"a": ["BTC"]})
    rig.reader.reply_callback = lambda r: seen.append((r, len(rig.sinks["a"])))
    rig.feed(pmessage(ch("BTC"), P1) + b"+A\r\n" + pmessage(ch("BTC"), P2) + b"+B\r\n")
    assert seen == [(b"A", 0), (b"B", 0)]
    assert rig.payloads("a") == [P1, P2] and len(rig.sinks["a"]) == 1


def test_dispatch_failure_on_one_message_is_counted_and_stream_goes_on(impl, caplog):
    rig = Rig(impl, {"a": ["BTC"]})

    def explode(reply):
        raise RuntimeError("bug in a reply handler")
    rig.reader.reply_callback = explode
    with caplog.at_level("ERROR", logger="gateway.fastpath"):
        rig.feed(pmessage(ch("BTC"), P1) + b"+OK\r\n" + pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P1, P2]
    assert rig.fanout.dispatch_errors == 1
    assert "message dispatch failed" in caplog.text


def test_dispatch_protocol_error_raises_and_flushes(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    with pytest.raises(hiredis.ProtocolError):
        rig.feed(pmessage(ch("BTC"), P1) + b"?garbage\r\n")
    assert rig.payloads("a") == [P1]       # what was parsed before the error still leaves
    rig.reconnect()
    rig.feed(pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P1, P2]


def test_dispatch_reset_forgets_partial_reply(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    whole = pmessage(ch("BTC"), P1)
    rig.feed(whole[:17])
    rig.reconnect()
    rig.feed(pmessage(ch("BTC"), P2))
    assert rig.payloads("a") == [P2]


def test_dispatch_method_with_parsed_replies(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    rig.fanout.dispatch([[b"pmessage", PATTERN, ch("BTC"), P1], b"OK",
                         [b"pmessage", PATTERN, ch("BTC"), b"[]"],
                         [b"pmessage", PATTERN, ch("BTC"), P2]])
    assert rig.payloads("a") == [P1, P2] and len(rig.sinks["a"]) == 1
    # The fan-out only routes; other replies belong to a reader's callback.
    assert rig.replies == [] and rig.fanout.dropped_payloads == 1


SPLIT_SUBS = {"a": ["BTC", "ETH"], "b": ["BTC"], "c": ["ETH", "日本"], "d": []}


def split_stream() -> bytes:
    return b"".join([
        b"*3\r\n$10\r\npsubscribe\r\n$15\r\nchannel:trade:*\r\n:1\r\n",
        pmessage(ch("BTC"), P1),
        pmessage(ch("ETH"), BAD_UTF8),
        pmessage(ch("ETH"), P2),
        b"+OK\r\n",
        pmessage(ch("SOL"), P1),
        pmessage(ch("日本"), '{"名":"値"}'.encode()),
        b"-ERR x\r\n",
        pmessage(ch("BTC"), obj_of_size(300)),
        pmessage(ch("BTC"), BAD_ARRAY),
        pmessage(ch("ETH"), P3),
        pmessage(ch("BTC"), P5),
    ])


def _run_split(impl, chunks: list[bytes]) -> Rig:
    rig = Rig(impl, SPLIT_SUBS)
    rig.feed(*chunks)
    for name, sink in rig.sinks.items():
        assert len(sink) <= len(chunks)
        for write in sink:
            assert write and text_bodies(write)   # every write is whole frames
    return rig


def _outcome(rig: Rig):
    counters = rig.counters()
    # writes, batches and bytes_sent depend on how the stream was cut (and the clock's
    # digit count never changes within a test run, so bytes_sent does not either).
    for k in ("writes", "batches"):
        counters.pop(k)
    return rig.normalized(), rig.replies_normalized(), counters


def test_dispatch_split_at_every_position(impl):
    stream = split_stream()
    whole = _run_split(impl, [stream])
    expected = _outcome(whole)
    assert whole.payloads("a")[:2] == [P1, P2] and whole.payloads("d") == []
    assert len(expected[1]) == 3
    for k in range(1, len(stream)):
        rig = _run_split(impl, [stream[:k], stream[k:]])
        assert _outcome(rig) == expected, k


@pytest.mark.parametrize("seed", range(6))
def test_dispatch_random_chunks(impl, seed):
    rng = random.Random(seed)
    stream = split_stream() * 5
    expected = _outcome(_run_split(impl, [stream]))
    for _ in range(20):
        chunks, i = [], 0
        max_size = rng.choice([1, 2, 7, 40, 300])
        while i < len(stream):
            k = rng.randint(1, max_size)
            chunks.append(stream[i:i + k])
            i += k
        assert _outcome(_run_split(impl, chunks)) == expected


def test_dispatch_one_feed_larger_than_64k(impl):
    rig = Rig(impl, {"a": ["BTC"], "b": ["ETH"]})
    parts, want_a, want_b = [], [], []
    for k in range(3000):
        p = b'{"n":%d,"pad":"%s"}' % (k, b"x" * (k % 50))
        if k % 3 == 0:
            parts.append(pmessage(ch("ETH"), p))
            want_b.append(p)
        else:
            parts.append(pmessage(ch("BTC"), p))
            want_a.append(p)
        if k == 1500:
            big = obj_of_size(150_000, b"y")     # spans several 64 KiB slices
            parts.append(pmessage(ch("BTC"), big))
            want_a.append(big)
    stream = b"".join(parts)
    assert len(stream) > 3 * 65536
    rig.feed(stream)
    assert len(rig.sinks["a"]) == 1 and len(rig.sinks["b"]) == 1
    assert rig.payloads("a") == want_a and rig.payloads("b") == want_b
    assert rig.fanout.redis_messages == 3001 and rig.fanout.frames_sent == 3001
    # Same stream as a memoryview and a bytearray (feed takes any bytes-like object).
    for data in (memoryview(stream), bytearray(stream)):
        rig2 = Rig(impl, {"a": ["BTC"], "b": ["ETH"]})
        rig2.feed(data)
        assert rig2.payloads("a") == want_a and rig2.payloads("b") == want_b


def test_dispatch_large_frame_header(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    big = obj_of_size(70_000)
    rig.feed(pmessage(ch("BTC"), big) + pmessage(ch("BTC"), obj_of_size(200)) + pmessage(ch("BTC"), P1))
    [write] = rig.sinks["a"]
    assert write[:2] == b"\x81\x7f"
    assert rig.payloads("a") == [big, obj_of_size(200), P1]
    # A later small batch after a big one (the compiled buffer is released and regrown).
    rig.feed(pmessage(ch("BTC"), P2))
    assert rig.payloads("a")[-1] == P2 and len(rig.sinks["a"]) == 2


def test_dispatch_timestamp_is_now(impl):
    rig = Rig(impl, {"a": ["BTC"]})
    for _ in range(20):
        before = time.time() * 1000
        rig.feed(pmessage(ch("BTC"), P1))
        after = time.time() * 1000
        ts = split_trade(text_bodies(rig.sinks["a"][-1])[0])[1]
        assert before - 3 <= ts <= after + 3, (before, ts, after)
        time.sleep(0.001)


def test_dispatch_exponent_payload(impl):
    """Trades with exponent numbers are valid JSON and must be delivered, not crash the feed."""
    rig = Rig(impl, {"a": ["BTC"]})
    good = [b'{"px":1e5}', b'{"px":1.5E-3}', b'{"q":' + b"1" * 305 + b"}"]
    rig.feed(b"".join(pmessage(ch("BTC"), p) for p in good + [b'{"px":1e999}']) + pmessage(ch("BTC"), P1))
    assert rig.payloads("a") == good + [P1]
    assert rig.fanout.dropped_payloads == 1


def test_client_listener_defaults_and_send_text(impl):
    session = object()
    conn = impl.ClientListener(session)
    assert conn.session is session and impl.ClientListener().session is None
    assert conn.symbols == [] and conn.transport is None and conn.sink is None
    assert conn.pending == 0 and conn.write_buffer_size() == 0
    conn.send_text(b"dropped: no transport and no sink")
    sink: list[bytes] = []
    conn.sink = sink.append
    conn.send_text(b'{"type":"pong"}')
    assert sink == [expected_frame(b'{"type":"pong"}')]


def test_dispatch_deflate_clients_same_bytes_in_both_implementations():
    """Compressed trade frames: RSV1 set, inflatable alone, and identical in both."""
    import zlib

    from gateway import _fastpath, _fastpath_py
    outputs = []
    for mod in (_fastpath, _fastpath_py):
        rig = Rig(mod, {"z": ["BTC"], "p": ["BTC"]})
        rig.conns["z"].deflate = True
        rig.feed(pmessage(ch("BTC"), P1) + pmessage(ch("BTC"), P2))
        assert rig.fanout.compressed_messages == 2
        assert rig.payloads("p") == [P1, P2]
        frames = parse_frames(b"".join(rig.sinks["z"]), rsv=0x40)
        bodies = []
        for fin, opcode, payload in frames:
            bodies.append(zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff"))
        assert [split_trade(b)[0] for b in bodies] == [P1, P2]
        raw = b"".join(rig.sinks["z"])
        assert raw[0] == 0xC1
        outputs.append(re.sub(rb'"timestamp":\d+', b"", b"".join(bodies)))
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------------
# Write coalescing (WS_WRITE_DELAY_US)
# ---------------------------------------------------------------------------

def test_write_delay_coalesces_reads_and_keeps_order(impl):
    """With write_delay set, the frames of several Redis reads leave in one
    write once the delay has passed; a control reply or a close first
    flushes what waits, so nothing overtakes a trade."""
    async def main():
        table = impl.SymbolTable()
        fanout = impl.FanOut(table)
        fanout.write_delay = 0.02
        conn = impl.ClientListener()
        writes: list[bytes] = []
        conn.sink = writes.append
        table.subscribe(conn, "AAPL")
        reader = impl.SubscriptionReader(fanout)
        reader.feed(pmessage(b"channel:trade:AAPL", b'{"n":1}'))
        reader.feed(pmessage(b"channel:trade:AAPL", b'{"n":2}'))
        assert writes == [] and conn.pending > 0
        await asyncio.sleep(0.05)
        assert len(writes) == 1 and len(parse_frames(writes[0])) == 2
        assert writes[0].index(b'"n":1') < writes[0].index(b'"n":2') and fanout.writes == 1
        # A reply sent while a trade waits goes after it, in order.
        reader.feed(pmessage(b"channel:trade:AAPL", b'{"n":3}'))
        conn.send_text(b'{"type":"pong"}')
        assert len(writes) == 3 and b'"n":3' in writes[1] and writes[2].endswith(b'{"type":"pong"}')
        # Before a close: flush_pending writes what waits.
        reader.feed(pmessage(b"channel:trade:AAPL", b'{"n":4}'))
        conn.flush_pending()
        assert len(writes) == 4 and b'"n":4' in writes[3] and conn.pending == 0
        await asyncio.sleep(0.05)                 # the timer finds nothing left to write
        assert len(writes) == 4
        # The client stayed listed once for the timer's write: two timed writes, not three.
        assert fanout.writes == 2
        # Off (0): every read is written at once.
        fanout.write_delay = 0.0
        reader.feed(pmessage(b"channel:trade:AAPL", b'{"n":5}'))
        assert len(writes) == 5
    asyncio.run(main())


def test_write_never_overtakes_bytes_the_transport_holds(aio, impl):
    """Once the kernel has refused bytes, the transport holds them until the
    loop next runs, even after the peer has read and the socket has room
    again. A write in that window must queue behind them, not go straight to
    the socket (the compiled listener writes directly only while it knows
    the transport holds nothing)."""
    from picows.picows import WSTransport

    async def main():
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        conn = impl.ClientListener()
        conn.on_ws_connected(WSTransport(False, transport, logging.getLogger("test"), loop))

        def frame(n: int) -> bytes:
            return impl.encode_text_frame(b"%08d" % n + b"x" * 500)
        sent = 0
        while conn.write_buffer_size() == 0:
            conn.send_frame(frame(sent))
            sent += 1
        conn.send_frame(frame(sent))            # queued behind the first refusal
        sent += 1
        received = peer.recv(1 << 20)           # room in the socket; the loop has not run
        assert received
        conn.send_frame(frame(sent))            # must not overtake what is queued
        sent += 1
        parser = wire.FrameParser()
        got = [f.payload[:8] for f in parser.feed(received)]
        while len(got) < sent:
            got += [f.payload[:8] for f in parser.feed(await loop.sock_recv(peer, 1 << 20))]
        assert got == [b"%08d" % n for n in range(sent)]
        # Drained: later writes arrive (straight from the socket again).
        await wait_until(lambda: conn.write_buffer_size() == 0)
        conn.send_frame(frame(sent))
        assert [f.payload[:8] for f in parser.feed(await loop.sock_recv(peer, 1 << 20))] == [b"%08d" % sent]
        transport.close()
        peer.close()
    aio(main())
