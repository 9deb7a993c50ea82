"""Property tests: the compiled fast path and its pure-Python twin agree.

The twin (gateway._fastpath_py) is the oracle; on any input the compiled module
(gateway._fastpath) must give the same answer, the same bytes and the same
table state. The control handler is checked for its own invariants on both.

Hypothesis runs derandomized with no example database, so a run is
reproducible and writes nothing to the tree.
"""
from __future__ import annotations

import os
import re
import struct

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import _fastpath_py as P
from gateway.control import ControlHandler
from gateway.protocol import SYMBOL_RE

try:
    from gateway import _fastpath as C
except ImportError:  # test_fastpath.py::test_compiled_module_loaded fails in this case
    C = None

needs_compiled = pytest.mark.skipif(C is None, reason="extension not built")


QUICK = os.environ.get("GATEWAY_QUICK_TESTS") == "1"   # set by conftest for the quick run


def props(max_examples: int):
    if QUICK:
        max_examples = max(10, max_examples // 4)
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def ref_is_object(x: bytes) -> bool:
    try:
        return type(orjson.loads(x)) is dict
    except orjson.JSONDecodeError:
        return False


def agree_is_object(x: bytes) -> bool:
    expected = ref_is_object(x)
    assert P.is_json_object(x) is expected
    assert C.is_json_object(x) is expected, x
    return expected


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=5)
object_docs = json_objects.map(orjson.dumps)

WHITESPACE = [b"", b" ", b"\n", b"\t", b"\r", b"  \r\n\t"]
STRUCTURAL = frozenset(b"{}[],:")


def token_boundaries(doc: bytes) -> list[int]:
    """Offsets between tokens of compact JSON (outside strings)."""
    cuts = {0, len(doc)}
    in_str = esc = False
    for i, c in enumerate(doc):
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
                cuts.add(i + 1)
        elif c == 0x22:
            in_str = True
            cuts.add(i)
        elif c in STRUCTURAL:
            cuts.update((i, i + 1))
    return sorted(cuts)


def with_whitespace(doc: bytes, ws: list[bytes]) -> bytes:
    if not ws:
        return doc
    out, last = [], 0
    for k, cut in enumerate(token_boundaries(doc)):
        out.append(doc[last:cut])
        out.append(ws[k % len(ws)])
        last = cut
    out.append(doc[last:])
    return b"".join(out)


number_tokens = st.one_of(
    st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    st.from_regex(r"-?[1-9][0-9]{295,320}(\.[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[-+]?[0-9.eE+\-]{1,10}", fullmatch=True),                   # mostly invalid
    st.sampled_from(["1e308", "1e309", "1.7976931348623157e308", "1.7976931348623159e308",
                     "-1e-400", "0e99999", "1e-99999", "NaN", "-Infinity", "01", "-0", "1."]),
)

STRING_PIECES = [b"a", b"Z", b" ", b"\x7f", b"\\n", b"\\\"", b"\\\\", b"\\/", b"\\u00e9", b"\\u0000",
                 b"\\ud83d", b"\\ude00", b"\\uD800\\uDC00", b"\\uDBFF\\uDFFF", b"\\u12", b"\\x",
                 b"\\", b'"', b"\xc3\xa9", b"\xe6\x97\xa5", b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf",
                 b"\xc3", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\x9f\xbf",
                 b"\xf4\x90\x80\x80", b"\xf5", b"\xff", b"\x00", b"\x1f", b"\t"]
string_bodies = st.lists(st.sampled_from(STRING_PIECES), max_size=6).map(b"".join)


@st.composite
def mutated_docs(draw):
    doc = bytearray(draw(object_docs | st.sampled_from(
        [b'{"a":[1,{"b":null}],"c":"\\u00e9"}', b'{"px":1.5e3,"q":-0.25,"s":"BTC"}'])))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "replace", "duplicate"]))
        pos = draw(st.integers(0, len(doc)))
        if kind == "flip" and doc:
            doc[min(pos, len(doc) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del doc[pos:]
        elif kind == "insert":
            doc[pos:pos] = draw(st.sampled_from([b",", b":", b"{", b"}", b"[", b"]", b'"', b"\\", b" ",
                                                 b"1", b"e", b"-", b".", b"\x00", b"\xff", b"\xed\xa0\x80",
                                                 b"null", b"tru"]))
        elif kind == "delete" and doc:
            del doc[min(pos, len(doc) - 1)]
        elif kind == "replace" and doc:
            doc[min(pos, len(doc) - 1)] = draw(st.integers(0, 255))
        elif kind == "duplicate":
            doc[pos:pos] = doc[pos:pos + draw(st.integers(1, 8))]
    return bytes(doc)


# ---------------------------------------------------------------------------
# (a) is_json_object
# ---------------------------------------------------------------------------

@needs_compiled
@props(300)
@given(st.binary(max_size=48) | st.binary(max_size=16).map(lambda b: b"{" + b + b"}"))
def test_is_json_object_random_bytes(data):
    agree_is_object(data)


@needs_compiled
@props(250)
@given(json_values | json_objects, st.lists(st.sampled_from(WHITESPACE), max_size=6))
def test_is_json_object_random_values(value, ws):
    doc = with_whitespace(orjson.dumps(value), ws)
    assert agree_is_object(doc) is (type(value) is dict)


@needs_compiled
@props(250)
@given(number_tokens, st.sampled_from([b"", b" ", b"]"]))
def test_is_json_object_numbers(token, tail):
    agree_is_object(b'{"n":' + token.encode() + b"}")
    agree_is_object(b'{"n":[' + token.encode() + tail + b"]}")


@needs_compiled
@props(250)
@given(string_bodies, st.booleans())
def test_is_json_object_strings(body, as_key):
    agree_is_object(b'{"' + body + b'":1}' if as_key else b'{"k":"' + body + b'"}')


@needs_compiled
@props(300)
@given(mutated_docs())
def test_is_json_object_mutations(doc):
    agree_is_object(doc)


# ---------------------------------------------------------------------------
# (b) parse_symbol, (c) frame encoding
# ---------------------------------------------------------------------------

@st.composite
def channels_and_prefixes(draw):
    prefix = draw(st.sampled_from([b"channel:trade:", b"t.", b""]) | st.binary(max_size=6))
    channel = draw(st.one_of(st.binary(max_size=20), st.binary(max_size=12).map(lambda s: prefix + s),
                             st.integers(0, len(prefix)).map(lambda k: prefix[:k])))
    return channel, prefix


@needs_compiled
@props(300)
@given(channels_and_prefixes())
def test_parse_symbol_agrees(cp):
    channel, prefix = cp
    got = C.parse_symbol(channel, prefix)
    assert got == P.parse_symbol(channel, prefix)
    if got is not None:
        assert channel.startswith(prefix) and len(channel) > len(prefix)


def rfc6455_frame(body: bytes) -> bytes:
    n = len(body)
    if n < 126:
        return bytes((0x81, n)) + body
    if n < 65536:
        return bytes((0x81, 126)) + struct.pack(">H", n) + body
    return bytes((0x81, 127)) + struct.pack(">Q", n) + body


payloads = st.one_of(st.binary(max_size=200),
                     st.integers(0, 200).map(lambda k: b"p" * (65536 - 60 + k)),
                     st.integers(0, 120).map(lambda k: b"q" * (126 - 60 + k)))


@needs_compiled
@props(150)
@given(payloads, st.integers(-(2**63), 2**63 - 1))
def test_encode_trade_frame_agrees(payload, ts):
    frame = C.encode_trade_frame(payload, ts)
    assert frame == P.encode_trade_frame(payload, ts)
    assert frame == rfc6455_frame(b'{"type":"trade","data":' + payload + b',"timestamp":'
                                  + str(ts).encode() + b"}")
    assert C.encode_text_frame(payload) == P.encode_text_frame(payload) == rfc6455_frame(payload)


# ---------------------------------------------------------------------------
# (d) SymbolTable against a model
# ---------------------------------------------------------------------------

TABLE_SYMBOLS = ["BTC", "ETH", "SOL", "btc", "日本", "A.B-1", "BTC@1m", "BTC@5m", "ETH@1m"]
table_ops = st.lists(st.tuples(st.sampled_from(["sub", "sub", "unsub", "remove"]), st.integers(0, 3),
                               st.sampled_from(TABLE_SYMBOLS)), max_size=60)


def table_state(table, conns):
    return {
        "count": table.subscription_count,
        "symbol_count": table.symbol_count,
        "len": len(table),
        "symbols": table.symbols(),
        "subscribers": {s: [conns.index(c) for c in table.subscribers(s)] for s in TABLE_SYMBOLS},
        "conn_symbols": [list(c.symbols) for c in conns],
    }


@needs_compiled
@props(200)
@given(st.sampled_from([b"channel:trade:", b"x.", b""]), table_ops)
def test_symbol_table_agrees_with_model(prefix, ops):
    tables = {m: m.SymbolTable(prefix) for m in (C, P)}
    conns = {m: [m.ClientListener() for i in range(4)] for m in (C, P)}
    model: dict[int, set[str]] = {i: set() for i in range(4)}
    for op, i, s in ops:
        results = {}
        for m in (C, P):
            t, conn = tables[m], conns[m][i]
            if op == "sub":
                results[m] = t.subscribe(conn, s)
            elif op == "unsub":
                results[m] = t.unsubscribe(conn, s)
            else:
                results[m] = t.remove_connection(conn)
        if op == "sub":
            expected = s not in model[i]
            model[i].add(s)
        elif op == "unsub":
            expected = s in model[i]
            model[i].discard(s)
        else:
            expected = len(model[i])
            model[i].clear()
        assert results[C] == results[P] == expected
        state = table_state(tables[C], conns[C])
        assert state == table_state(tables[P], conns[P])
        by_symbol = {s2: {j for j in model if s2 in model[j]} for s2 in TABLE_SYMBOLS}
        assert state["count"] == sum(len(v) for v in model.values())
        assert state["symbols"] == sorted(s2 for s2, js in by_symbol.items() if js)
        assert state["symbol_count"] == state["len"] == len(state["symbols"])
        assert {s2: set(v) for s2, v in state["subscribers"].items()} == by_symbol
        assert [set(v) for v in state["conn_symbols"]] == [model[j] for j in range(4)]
    for m in (C, P):
        for conn in conns[m]:
            tables[m].remove_connection(conn)
        assert len(tables[m]) == 0 and tables[m].subscription_count == 0


# ---------------------------------------------------------------------------
# (e) SubscriptionReader + FanOut: random RESP streams, random splits
# ---------------------------------------------------------------------------

DISPATCH_SYMBOLS = ["BTC", "ETH", "SOL", "日本"]
PREFIX = b"channel:trade:"
CONFIRM = b"*3\r\n$10\r\npsubscribe\r\n$15\r\nchannel:trade:*\r\n:1\r\n"


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pmessage(channel: bytes, payload: bytes) -> bytes:
    return b"*4\r\n" + bulk(b"pmessage") + bulk(PREFIX + b"*") + bulk(channel) + bulk(payload)


@st.composite
def channel_choices(draw):
    k = draw(st.integers(0, 9))     # mostly symbols someone may be subscribed to
    if k < 7:
        return PREFIX + draw(st.sampled_from(DISPATCH_SYMBOLS)).encode()
    if k < 9:
        return draw(st.sampled_from([PREFIX + b"XRP", b"other:BTC", b"", PREFIX]))
    return PREFIX + draw(st.binary(max_size=8))


payload_choices = st.one_of(object_docs, object_docs, object_docs, object_docs, mutated_docs(), st.binary(max_size=24),
                            st.sampled_from([b"[]", b"null", b"{}", b' {"a":1} ', b'{"a":"\xff"}']))
stream_items = st.one_of(
    st.tuples(st.just("pm"), channel_choices(), payload_choices),
    st.tuples(st.just("pm"), channel_choices(), payload_choices),
    st.tuples(st.just("raw"), st.sampled_from([CONFIRM, b"+OK\r\n", b"-ERR x\r\n", b":3\r\n", b"$-1\r\n"]),
              st.just(b"")),
)


@st.composite
def dispatch_cases(draw):
    nconns = draw(st.integers(1, 4))
    subs = [draw(st.lists(st.sampled_from(DISPATCH_SYMBOLS), unique=True, min_size=2 if k == 0 else 0,
                          max_size=4)) for k in range(nconns)]
    items = draw(st.lists(stream_items, min_size=3, max_size=30))
    stream = b"".join(pmessage(a, b) if kind == "pm" else a for kind, a, b in items)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))))
    chunks = [stream[i:j] for i, j in zip([0] + cuts, cuts + [len(stream)])]
    return subs, items, chunks


TS_TAIL = re.compile(rb'"timestamp":\d+\}\Z')


def parse_text_frames(buf: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(buf):
        assert buf[i] == 0x81 and not buf[i + 1] & 0x80
        n = buf[i + 1] & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack_from(">H", buf, i)
            i += 2
        elif n == 127:
            (n,) = struct.unpack_from(">Q", buf, i)
            i += 8
        assert i + n <= len(buf)
        out.append(buf[i:i + n])
        i += n
    return out


def run_dispatch(m, subs, chunks):
    table = m.SymbolTable()
    replies: list = []
    d = m.FanOut(table)
    reader = m.SubscriptionReader(d, replies.append)
    sinks: list[list[bytes]] = []
    for symbols in subs:
        conn = m.ClientListener()
        sink: list[bytes] = []
        conn.sink = sink.append
        sinks.append(sink)
        for s in symbols:
            table.subscribe(conn, s)
    for chunk in chunks:
        reader.feed(chunk)
    writes = [[[TS_TAIL.sub(b'"timestamp":0}', body) for body in parse_text_frames(w)] for w in sink]
              for sink in sinks]
    counters = {k: getattr(d, k) for k in ("redis_messages", "frames_sent", "bytes_sent", "writes",
                                           "dropped_payloads", "unrouted_messages", "batches")}
    replies = [(type(r).__name__, str(r)) if isinstance(r, Exception) else r for r in replies]
    return writes, counters, replies


@needs_compiled
@props(120)
@given(dispatch_cases())
def test_dispatch_agrees(case):
    subs, items, chunks = case
    got_c = run_dispatch(C, subs, chunks)
    got_p = run_dispatch(P, subs, chunks)
    assert got_c == got_p
    # And both match a direct model of the stream.
    writes, counters, replies = got_c
    for k, symbols in enumerate(subs):
        channels = {PREFIX + s.encode() for s in symbols}
        expected = [b'{"type":"trade","data":' + payload + b',"timestamp":0}'
                    for kind, channel, payload in items
                    if kind == "pm" and channel in channels and ref_is_object(payload)]
        assert [body for w in writes[k] for body in w] == expected
        assert len(writes[k]) <= len(chunks)
    pms = [(ch, p) for kind, ch, p in items if kind == "pm"]
    assert counters["redis_messages"] == len(pms)
    assert counters["dropped_payloads"] == sum(not ref_is_object(p) for _, p in pms)
    assert len(replies) == len(items) - len(pms)


# ---------------------------------------------------------------------------
# (f) ControlHandler on both implementations
# ---------------------------------------------------------------------------

VALID_SYMBOLS = ["BTC", "btc", "ETH", "eth", "SOL", "A.B", "x-1", "0", "X" * 16, "q"]
BAD_SYMBOLS = ["", "X" * 17, "日本", "BTC ", "B$C", "İ", "ı", "ſ", "\u212a"]   # U+212A: Kelvin sign
good_control = st.fixed_dictionaries(
    {"action": st.sampled_from(["subscribe", "subscribe", "subscribe", "unsubscribe", "unsubscribe", "ping"]),
     "symbols": st.lists(st.sampled_from(VALID_SYMBOLS), min_size=1, max_size=4)})
noisy_control = st.fixed_dictionaries(
    {"action": st.sampled_from(["subscribe", "unsubscribe", "ping", "SUBSCRIBE", "", "pong"]) | json_values},
    optional={"symbols": st.lists(st.sampled_from(VALID_SYMBOLS + BAD_SYMBOLS), max_size=7)
              | st.lists(st.sampled_from(VALID_SYMBOLS) | json_values, max_size=3) | json_values,
              "extra": json_values})
control_messages = st.one_of(
    good_control.map(orjson.dumps), good_control.map(orjson.dumps), good_control.map(orjson.dumps),
    noisy_control.map(orjson.dumps), noisy_control.map(orjson.dumps),
    json_values.map(orjson.dumps), st.binary(max_size=40), mutated_docs(),
    st.sampled_from([b"", b"{}", b"[]", b'{"action":null}', b'{"action":"subscribe"}',
                     b'{"action":"subscribe","symbols":[]}', b'{"action":"subscribe","symbols":"BTC"}']))
control_ops = st.lists(st.tuples(st.integers(0, 2), control_messages, st.sampled_from([True] * 7 + [False]),
                                 st.integers(0, 12)), min_size=1, max_size=30)


def check_control_state(table, conns, limits) -> None:
    union: dict[str, int] = {}
    for conn, limit in zip(conns, limits):
        assert len(conn.symbols) <= limit
        assert len(set(conn.symbols)) == len(conn.symbols)
        for s in conn.symbols:
            assert SYMBOL_RE.fullmatch(s) and s == s.upper() and s.isascii(), s
            union[s] = union.get(s, 0) + 1
            assert conn in table.subscribers(s)
    assert table.symbols() == sorted(union)
    assert table.subscription_count == sum(union.values())
    for s, n in union.items():
        assert len(table.subscribers(s)) == n


@props(150)
@given(st.lists(st.integers(0, 6), min_size=3, max_size=3), control_ops)
@example([5, 5, 0], [(0, b'{"action":"subscribe","symbols":["a","b","c","d","e","f"]}', True, 0),
                     (0, b'{"action":"subscribe","symbols":["a","b","c","d","e"]}', True, 0),
                     (0, b'{"action":"subscribe","symbols":["F"]}', True, 0),
                     (1, b'{"action":"subscribe","symbols":["a","A","a"]}', True, 0),
                     (0, b'{"action":"unsubscribe","symbols":["A","Q"]}', True, 12)])
def test_control_handler_never_raises_and_keeps_table_consistent(impl, limits, ops):
    table = impl.SymbolTable()
    handler = ControlHandler(table, clock=lambda: 1234)
    conns = [impl.ClientListener() for i in range(3)]
    for i, data, is_text, disconnect in ops:
        conn = conns[i]
        before = list(conn.symbols)
        reply = handler.handle(conn, data, is_text, limits[i])
        assert type(reply) is bytes
        msg = orjson.loads(reply)
        assert type(msg) is dict and msg["type"] in ("success", "error", "pong")
        assert msg["timestamp"] == 1234
        if msg["type"] == "success":
            assert msg["data"]["currentSubscriptions"] == conn.symbols
            added = msg["data"].get("subscribed", [])
            removed = msg["data"].get("unsubscribed", [])
            assert conn.symbols == [s for s in before if s not in removed] + added
        else:
            assert conn.symbols == before       # errors and pongs change nothing
            if msg["type"] == "error":
                assert isinstance(msg["message"], str) and msg["message"]
        check_control_state(table, conns, limits)
        if disconnect == 12:
            had = len(conn.symbols)
            assert table.remove_connection(conn) == had
            assert conn.symbols == []
            check_control_state(table, conns, limits)
    for conn in conns:
        table.remove_connection(conn)
    assert len(table) == 0 and table.subscription_count == 0


@pytest.mark.parametrize("depth", [200, 300, 1000])
@pytest.mark.parametrize("where", ["action", "symbol"])
def test_control_handler_deeply_nested_values(impl, depth, where):
    """Valid JSON nested deeper than orjson.dumps allows (255) is still answered with an error."""
    nested = b"[" * depth + b"]" * depth
    data = (b'{"action":' + nested + b"}" if where == "action"
            else b'{"action":"subscribe","symbols":[' + nested + b"]}")
    assert type(orjson.loads(data)) is dict
    table = impl.SymbolTable()
    conn = impl.ClientListener()
    reply = orjson.loads(ControlHandler(table).handle(conn, data, True, 5))
    assert reply["type"] == "error"
    assert conn.symbols == [] and len(table) == 0


# ---------------------------------------------------------------------------
# (g) Sequenced trades: what publish_trade puts on the channel, cut apart
# ---------------------------------------------------------------------------

from gateway import protocol  # noqa: E402

epochs = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-",
                 min_size=1, max_size=32).map(str.encode)
seqs = st.integers(1, 10**18 - 1)


@needs_compiled
@props(300)
@given(object_docs, seqs, epochs)
def test_sequenced_split_and_frame_agree(doc, seq, epoch):
    published = protocol.published_form(doc, seq, epoch)
    assert P.is_json_object(published)
    expected = (seq, epoch, doc if doc != b"{}" else b"{}")
    assert C.split_published(published) == P.split_published(published) == expected
    frame = C.encode_sequenced_frame(doc, seq, epoch, 1234)
    assert frame == P.encode_sequenced_frame(doc, seq, epoch, 1234)
    # The fan-out frames the published form exactly as the encoder does.
    for m in (C, P):
        table = m.SymbolTable()
        conn = m.ClientListener()
        out: list[bytes] = []
        conn.sink = out.append
        table.subscribe(conn, "X")
        m.FanOut(table).dispatch([[b"pmessage", b"p", b"channel:trade:X", published]])
        [routed] = parse_text_frames(out[0])
        [encoded] = parse_text_frames(frame)
        assert TS_TAIL.sub(b'"timestamp":0}', routed) == TS_TAIL.sub(b'"timestamp":0}', encoded)


@needs_compiled
@props(300)
@given(object_docs, seqs, epochs, st.integers(0, 60), st.binary(min_size=1, max_size=3))
def test_sequenced_split_survives_damage(doc, seq, epoch, at, junk):
    """A damaged prefix is either still a sequenced message or a plain one,
    and both implementations say the same."""
    published = protocol.published_form(doc, seq, epoch)
    damaged = published[:at] + junk + published[at + len(junk):]
    assert C.split_published(damaged) == P.split_published(damaged) == protocol.split_published(damaged)


candle_ns = st.integers(1, 10**18 - 1)


@needs_compiled
@props(300)
@given(object_docs.filter(lambda d: d != b"{}"), candle_ns, st.integers(0, 30),
       st.binary(min_size=1, max_size=3))
def test_candle_split_and_route_agree(doc, n, at, junk):
    """What the candle service publishes comes apart to (n, the client
    message) in the reference and both fast paths, also when its head is
    damaged; the fan-out forwards exactly that client message."""
    published = protocol.candle_published_form(doc, n)
    assert C.split_candle(published) == P.split_candle(published) == protocol.split_candle(published) \
        == (n, doc)
    damaged = published[:at] + junk + published[at + len(junk):]
    assert C.split_candle(damaged) == P.split_candle(damaged) == protocol.split_candle(damaged)
    for payload in (published, damaged):
        sent = []
        for m in (C, P):
            table = m.SymbolTable()
            conn = m.ClientListener()
            out: list[bytes] = []
            conn.sink = out.append
            table.subscribe(conn, "X@1m")
            m.FanOut(table).dispatch([[b"pmessage", b"p", b"channel:candle:1m:X", payload]])
            sent.append(b"".join(out))
        assert sent[0] == sent[1]
        if P.is_json_object(payload):
            assert parse_text_frames(sent[0]) == [protocol.split_candle(payload)[1]]
        else:
            assert sent[0] == b""
