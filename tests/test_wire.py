"""gateway.protocol without sockets: requests parse back to what was built,
and every server message has the shape the README documents."""
from __future__ import annotations

import orjson
import pytest

from gateway import protocol
from gateway.protocol import ClientError, Request, parse_request


@pytest.mark.parametrize("action, symbols, parsed", [
    ("ping", (), Request("ping")),
    ("subscribe", ["aapl", "MSFT", "AAPL"], Request("subscribe", ("AAPL", "MSFT"))),
    ("unsubscribe", ("BRK.B",), Request("unsubscribe", ("BRK.B",))),
])
def test_requests_round_trip(action, symbols, parsed):
    assert parse_request(protocol.request(action, symbols)) == parsed


@pytest.mark.parametrize("data, is_text, kind", [
    (b'{"action":"ping"}', False, "binary_frame"),
    (b"{", True, "invalid_json"),
    (b"[]", True, "not_object"),
    (b"{}", True, "missing_action"),
    (b'{"action":"dance"}', True, "unknown_action"),
    (b'{"action":"subscribe"}', True, "invalid_symbols"),
    (b'{"action":"subscribe","symbols":[]}', True, "invalid_symbols"),
    (b'{"action":"subscribe","symbols":[1]}', True, "invalid_symbols"),
    (b'{"action":"subscribe","symbols":["TOO-LONG-SYMBOL-XX"]}', True, "invalid_symbols"),
    (b'{"action":"subscribe","symbols":["\xc3\xa9"]}', True, "invalid_symbols"),
])
def test_bad_requests_name_the_problem(data, is_text, kind):
    with pytest.raises(ClientError) as info:
        parse_request(data, is_text)
    assert info.value.kind == kind and str(info.value)


def test_server_messages():
    assert orjson.loads(protocol.pong(5)) == {"type": "pong", "timestamp": 5}
    assert orjson.loads(protocol.error("x", 5)) == {"type": "error", "message": "x", "timestamp": 5}
    assert orjson.loads(protocol.gap("AAPL", 3, 5)) == {
        "type": "gap", "data": {"symbol": "AAPL", "skipped": 3}, "timestamp": 5}
    assert orjson.loads(protocol.subscribed(["A"], ["A", "B"], 5)) == {
        "type": "success", "message": "Successfully subscribed to 1 symbol(s)",
        "data": {"subscribed": ["A"], "currentSubscriptions": ["A", "B"]}, "timestamp": 5}
    assert orjson.loads(protocol.unsubscribed([], ["B"], 5))["message"] == \
        "Successfully unsubscribed from 0 symbol(s)"
    welcome = orjson.loads(protocol.welcome("c1", "s1", 5, None, 9))
    assert welcome["data"] == {"connectionId": "c1", "serverId": "s1", "maxSymbolsPerConnection": 5}
    assert orjson.loads(protocol.welcome("c1", "s1", 5, "u", 9))["data"]["userId"] == "u"
    assert protocol.ready_body(None) == {"status": "ready"}
    assert protocol.ready_body("why") == {"status": "not ready", "reason": "why"}
    assert protocol.refusal_body("no") == {"type": "error", "message": "no"}


def test_trade_body_keeps_the_payload_bytes():
    payload = b'{"symbol":"AAPL", "price":1e2,"x":"\xc3\xa9"}'
    body = protocol.trade_body(payload, 1700000000123)
    assert body == b'{"type":"trade","data":' + payload + b',"timestamp":1700000000123}'
    assert orjson.loads(body)["data"] == orjson.loads(payload)


@pytest.mark.parametrize("impl_name", ["_fastpath", "_fastpath_py"])
def test_fast_paths_frame_the_protocol_envelope(impl_name):
    import importlib
    impl = importlib.import_module(f"gateway.{impl_name}")
    frame = impl.encode_trade_frame(b'{"p":1}', 42)
    assert frame[2:] == protocol.trade_body(b'{"p":1}', 42)
