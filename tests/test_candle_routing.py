"""Candle streams in the fast path, compiled and pure-Python: the symbol
table's candle channels, cutting ``{"_n":<n>,`` off what the candle service
publishes, and the fan-out's candle branch (verbatim frames, deflate once,
holds and floors by n, conflation, unrouted and bad payloads).

Every test that takes ``impl`` runs on gateway._fastpath and on its twin.
No sockets: listeners write to sinks (or a recording transport, for the
conflation notice a session sends).
"""
from __future__ import annotations

import zlib

import orjson
import pytest

from gateway import protocol
from gateway._testbase.ws import FrameParser

CANDLE = (b'{"type":"candle","data":{"symbol":"AAPL","interval":"1m","start":1700000040000,'
          b'"open":1.5,"high":2,"low":1.25,"close":1.75,"volume":300,"trades":3,"state":"update"},'
          b'"timestamp":1700000061234}')
CH = b"channel:candle:1m:AAPL"
PATTERN = b"channel:candle:*"


def published(body: bytes, n: int) -> bytes:
    return protocol.candle_published_form(body, n)


def pm(payload: bytes, channel: bytes = CH) -> list:
    return [b"pmessage", PATTERN, channel, payload]


def frames_of(writes: list[bytes]) -> list:
    parser = FrameParser()
    return [f for w in writes for f in parser.feed(w)]


def bodies(writes: list[bytes]) -> list[bytes]:
    out = []
    for f in frames_of(writes):
        assert f.fin and f.opcode == 1 and f.rsv == 0
        out.append(f.payload)
    return out


def setup(impl, *symbols, deflate=False, **table_kw):
    table = impl.SymbolTable(**table_kw)
    fanout = impl.FanOut(table)
    conn = impl.ClientListener()
    out: list[bytes] = []
    conn.sink = out.append
    conn.deflate = deflate
    for s in symbols or ("AAPL@1m",):
        table.subscribe(conn, s)
    return table, fanout, conn, out


# ---------------------------------------------------------------------------
# The symbol table
# ---------------------------------------------------------------------------

def test_channels_of_candle_streams(impl):
    t = impl.SymbolTable()
    assert t.prefix == b"channel:trade:" and t.candle_prefix == b"channel:candle:"
    assert t.channel_for("AAPL") == b"channel:trade:AAPL"
    assert t.channel_for("AAPL@1m") == CH
    assert t.channel_for("BRK.B@5m") == b"channel:candle:5m:BRK.B"
    for name in ("AAPL", "AAPL@1m", "BRK.B@5m", "X@1d", "日本@1s"):
        assert t.symbol_for(t.channel_for(name)) == name
    with pytest.raises(ValueError):
        t.symbol_for(b"elsewhere:AAPL")
    t = impl.SymbolTable(b"md.t.", b"md.c.")
    assert t.channel_for("AAPL@1m") == b"md.c.1m:AAPL" and t.channel_for("AAPL") == b"md.t.AAPL"
    assert t.symbol_for(b"md.c.1m:AAPL") == "AAPL@1m" and t.symbol_for(b"md.t.AAPL") == "AAPL"
    assert impl.SymbolTable(candle_prefix=b"cc:").candle_prefix == b"cc:"


def test_symbols_are_listed_in_client_form(impl):
    t = impl.SymbolTable()
    a, b = impl.ClientListener(), impl.ClientListener()
    for s in ("MSFT", "AAPL@5m", "AAPL", "AAPL@1m"):
        assert t.subscribe(a, s)
    assert t.subscribe(b, "AAPL@1m") and not t.subscribe(b, "AAPL@1m")
    assert t.symbols() == ["AAPL", "AAPL@1m", "AAPL@5m", "MSFT"]
    assert t.subscribers("AAPL@1m") == [a, b] and t.lookup(CH) == [a, b]
    assert t.subscription_count == 5 and t.symbol_count == 4
    assert t.unsubscribe(a, "AAPL@1m") and t.lookup(CH) == [b]
    assert t.remove_connection(b) == 1 and t.lookup(CH) is None
    assert t.symbols() == ["AAPL", "AAPL@5m", "MSFT"]


# ---------------------------------------------------------------------------
# Cutting the counter off
# ---------------------------------------------------------------------------

SPLITS = [
    (published(CANDLE, 1), (1, CANDLE)),
    (published(CANDLE, 42), (42, CANDLE)),
    (published(CANDLE, 10**18 - 1), (10**18 - 1, CANDLE)),
    (b'{"_n":7, "a" : [1]}', (7, b'{ "a" : [1]}')),
    (b'{"_n":7,"_n":8,"x":1}', (7, b'{"_n":8,"x":1}')),
    # Not the service's head: forwarded whole, n = 0.
    (CANDLE, (0, CANDLE)),
    (b"{}", (0, b"{}")),
    (b'{"_n":5}', (0, b'{"_n":5}')),
    (b'{"_n":0,"x":1}', (0, b'{"_n":0,"x":1}')),
    (b'{"_n":01,"x":1}', (0, b'{"_n":01,"x":1}')),
    (b'{"_n":-1,"x":1}', (0, b'{"_n":-1,"x":1}')),
    (b'{"_n":1.5,"x":1}', (0, b'{"_n":1.5,"x":1}')),
    (b'{"_n":1e3,"x":1}', (0, b'{"_n":1e3,"x":1}')),
    (b'{"_n":"1","x":1}', (0, b'{"_n":"1","x":1}')),
    (b'{"_n" :1,"x":1}', (0, b'{"_n" :1,"x":1}')),
    (b'{ "_n":1,"x":1}', (0, b'{ "_n":1,"x":1}')),
    (b'{"_n":1 ,"x":1}', (0, b'{"_n":1 ,"x":1}')),
    (b'{"_n":' + b"1" * 19 + b',"x":1}', (0, b'{"_n":' + b"1" * 19 + b',"x":1}')),
    (b'{"_n":', (0, b'{"_n":')),
    (b'{"_n":1', (0, b'{"_n":1')),
    (b'{"_n":1,', (1, b"{")),
]


@pytest.mark.parametrize("payload, expected", SPLITS)
def test_split_candle_matches_the_reference(impl, payload, expected):
    assert protocol.split_candle(payload) == expected
    assert impl.split_candle(payload) == expected


# ---------------------------------------------------------------------------
# The fan-out's candle branch
# ---------------------------------------------------------------------------

def test_candles_go_out_verbatim_without_the_counter(impl):
    table, fanout, conn, out = setup(impl, "AAPL@1m", "AAPL")
    odd = '{"type":"candle", "data":{"symbol":"AAPL","x":"é\\u00e9","v":1E+2} ,"timestamp":1}'.encode()
    big = b'{"type":"candle","data":{"pad":"' + b"x" * 70000 + b'"},"timestamp":1}'
    fanout.dispatch([pm(published(CANDLE, 1)), pm(published(odd, 2)), pm(CANDLE), pm(published(big, 3))])
    assert bodies(out) == [CANDLE, odd, CANDLE, big]
    assert fanout.candle_messages == 4 and fanout.frames_sent == 4
    assert fanout.bytes_sent == sum(len(impl.encode_text_frame(b)) for b in (CANDLE, odd, CANDLE, big))
    # Trades beside them keep their envelope; candle channels never count as sequenced.
    fanout.dispatch([[b"pmessage", b"channel:trade:*", b"channel:trade:AAPL", b'{"p":1}']])
    [trade] = bodies(out[-1:])
    assert trade.startswith(b'{"type":"trade","data":{"p":1},"timestamp":')
    assert fanout.sequenced_messages == 0 and fanout.position(CH) is None
    assert fanout.candle_messages == 4


def test_candle_frames_agree_between_implementations():
    from gateway import _fastpath_py as P
    try:
        from gateway import _fastpath as C
    except ImportError:
        pytest.skip("extension not built")
    payloads = [p for p, _ in SPLITS if P.is_json_object(p)]
    outs = []
    for m in (C, P):
        _, fanout, _, out = setup(m)
        fanout.dispatch([pm(p) for p in payloads])
        outs.append(b"".join(out))
    assert outs[0] == outs[1]
    assert bodies([outs[0]]) == [protocol.split_candle(p)[1] for p in payloads]


def test_bad_candle_payloads_are_dropped_and_unsubscribed_streams_unrouted(impl):
    table, fanout, conn, out = setup(impl)
    fanout.dispatch([pm(b'{"_n":1,'), pm(b'{"_n":1,"x":}'), pm(b"[1]"), pm(b'{"_n":2,"x":1}x'),
                     pm(b'{"_n":1,"x":"\xff"}'), pm("not bytes")])
    assert out == [] and fanout.dropped_payloads == 6 and fanout.candle_messages == 0
    fanout.dispatch([pm(published(CANDLE, 1), b"channel:candle:5m:AAPL"),
                     pm(published(CANDLE, 1), b"channel:candle:1m:MSFT")])
    assert out == [] and fanout.unrouted_messages == 2 and fanout.candle_messages == 0
    assert fanout.redis_messages == 8


def test_deflate_clients_get_one_compressed_frame(impl):
    table, fanout, z1, out1 = setup(impl, deflate=True)
    z2, plain = impl.ClientListener(), impl.ClientListener()
    out2: list[bytes] = []
    out3: list[bytes] = []
    z2.deflate, z2.sink, plain.sink = True, out2.append, out3.append
    table.subscribe(z2, "AAPL@1m")
    table.subscribe(plain, "AAPL@1m")
    fanout.dispatch([pm(published(CANDLE, 7))])
    assert fanout.compressed_messages == 1 and out1 == out2
    [f] = frames_of(out1)
    assert f.fin and f.opcode == 1 and f.rsv == 4
    assert zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") == CANDLE
    assert bodies(out3) == [CANDLE]


def test_holding_keeps_candles_with_their_n(impl):
    table, fanout, conn, out = setup(impl, "AAPL@1m", "AAPL")
    conn.holding = True
    fanout.dispatch([pm(published(CANDLE, 3)), pm(CANDLE),
                     [b"pmessage", b"channel:trade:*", b"channel:trade:AAPL",
                      protocol.published_form(b'{"p":1}', 9, b"ep")],
                     pm(published(CANDLE, 4))])
    assert out == []
    held = conn.take_held()
    assert [(ch, n) for ch, n, _ in held] == [(CH, 3), (CH, 0), (b"channel:trade:AAPL", 9), (CH, 4)]
    assert bodies([held[0][2]]) == [CANDLE] and held[0][2] == held[1][2]
    assert fanout.conflated_messages == 4 and fanout.frames_sent == 0


def test_floors_skip_candles_the_backfill_covered(impl):
    table, fanout, conn, out = setup(impl, "AAPL@1m", "AAPL@5m")
    ch5 = table.channel_for("AAPL@5m")
    conn.set_floor(CH, b"", 5)
    conn.set_floor(ch5, b"", 2)

    def body(n):
        return CANDLE.replace(b'"trades":3', b'"trades":%d' % n)
    # n = 0 (no counter) is not ordered: it passes and leaves the floor be.
    fanout.dispatch([pm(published(body(4), 4)), pm(published(body(5), 5)), pm(body(0)),
                     pm(published(body(1), 1), ch5)])
    assert bodies(out) == [body(0)]
    fanout.dispatch([pm(published(body(6), 6)), pm(published(body(3), 3)),
                     pm(published(body(3), 3), ch5)])
    # Past the floor once: it is gone, and what follows is not judged by it.
    assert bodies(out)[1:] == [body(6), body(3), body(3)]
    assert fanout.frames_sent == 4


def test_conflated_candles_get_a_plain_gap_naming_the_stream(impl):
    """A conflating client keeps the newest candle message per stream with
    seq 0; the session's drain notice names the stream in client form."""
    table, fanout, conn, out = setup(impl, "AAPL@1m", "AAPL")
    conn.conflating = True
    fanout.dispatch([pm(published(CANDLE, n)) for n in (1, 2, 3)])
    fanout.dispatch([[b"pmessage", b"channel:trade:*", b"channel:trade:AAPL",
                      protocol.published_form(b"{}", s, b"ep")] for s in (7, 8)])
    c = conn.take_conflated()
    assert [(ch, skipped, first, last) for ch, _, skipped, first, last in c] == [
        (CH, 2, 0, 0), (b"channel:trade:AAPL", 1, 7, 7)]
    assert bodies([c[0][1]]) == [CANDLE] and out == []


def test_drained_session_names_the_candle_stream():
    from test_session import connect, make, messages

    from gateway.session import SessionPolicy, on_slow_consumer
    hub, session, listener, t = make(SessionPolicy(slow_client_policy="conflate"))
    hub.control.intervals = ("1m",)
    connect(listener, t)
    session.on_message(listener, b'{"action":"subscribe","symbols":["aapl@1m"]}', True)
    on_slow_consumer(listener)
    hub.fanout.dispatch([pm(published(CANDLE.replace(b"300", b"%d" % n), n)) for n in (1, 2, 3)])
    before = len(t.underlying_transport.written)
    listener.resume_writing()
    sent = messages(t)[before:]
    assert sent[0] == {"type": "gap", "data": {"symbol": "AAPL@1m", "skipped": 2},
                       "timestamp": sent[0]["timestamp"]}
    assert sent[1] == orjson.loads(CANDLE.replace(b"300", b"3")) and not listener.conflating


def test_subscription_reader_routes_candles(impl):
    """RESP from a connection subscribed to both patterns."""
    from gateway._testbase.resp import pmessage
    table, fanout, conn, out = setup(impl, "AAPL@1m", "AAPL")
    reader = impl.SubscriptionReader(fanout)
    data = (pmessage(CH, published(CANDLE, 1), PATTERN)
            + pmessage(b"channel:trade:AAPL", b'{"p":1}', b"channel:trade:*")
            + pmessage(CH, published(CANDLE, 2), PATTERN))
    for cut in (len(data) // 3, 2 * len(data) // 3):
        reader.feed(data[:cut])
        reader.feed(data[cut:])
    got = bodies(out)
    assert [b[:18] for b in got] == [b'{"type":"candle","', b'{"type":"trade","d', b'{"type":"candle","'] * 2
    assert got[0] == got[2] == CANDLE and reader.messages == 6 and fanout.candle_messages == 4


def test_an_empty_candle_prefix_turns_the_branch_off(impl):
    table, fanout, conn, out = setup(impl, "AAPL", candle_prefix=b"")
    fanout.dispatch([[b"pmessage", b"p", b"channel:trade:AAPL", published(CANDLE, 1)]])
    [body] = bodies(out)
    assert body.startswith(b'{"type":"trade","data":{"_n":1,') and fanout.candle_messages == 0
