"""Sessions without sockets: the per-connection policies driven directly,
with the twin's listener over a recording stand-in for picows' transport."""
from __future__ import annotations

import asyncio
import zlib

import orjson
import pytest

from gateway import _fastpath_py as P
from gateway._testbase.ws import FrameParser
from gateway.access import AccessPolicy, Admission
from gateway.config import Config
from gateway.control import ControlHandler
from gateway.counters import Counters
from gateway.session import Hub, Session, SessionPolicy, on_slow_consumer


class Underlying:
    def __init__(self):
        self.written: list[bytes] = []
        self.buffered = 0
        self.aborted = False
        self.limits = None

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name):
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = high

    def abort(self) -> None:
        self.aborted = True


class Transport:
    """What a session and the twin listener use of picows' WSTransport."""

    def __init__(self):
        self.underlying_transport = Underlying()
        self.is_disconnected = False
        self.is_close_frame_sent = False
        self.closes: list[tuple[int, bytes]] = []

    def send_close(self, code, reason=b""):
        self.is_close_frame_sent = True
        self.closes.append((int(code), reason))

    def disconnect(self, graceful=True):
        self.is_disconnected = True

    @property
    def pings(self) -> int:
        # The heartbeat's pings go through the listener like every other write.
        parser = FrameParser()
        return sum(f.opcode == 0x9 for w in self.underlying_transport.written for f in parser.feed(w))


def messages(t: Transport) -> list[dict]:
    parser = FrameParser()
    return [orjson.loads(f.payload) for w in t.underlying_transport.written for f in parser.feed(w)
            if f.opcode == 0x1]


def make(policy: SessionPolicy | None = None, admission: Admission | None = None, max_symbols=5):
    table = P.SymbolTable()
    fanout = P.FanOut(table, slow_consumer_callback=on_slow_consumer)
    access = AccessPolicy(Config(redis_url="redis://127.0.0.1:1"))
    sessions: set = set()
    counters = Counters(fanout, table, sessions, access.refusals)
    control = ControlHandler(table, clock=lambda: 7)
    control.errors = counters.errors
    hub = Hub(policy or SessionPolicy(), "ws-gateway-test", table, fanout, control, access, counters,
              sessions)
    session = Session(hub, admission or Admission(ip="127.0.0.1"), max_symbols)
    listener = P.ClientListener(session)
    t = Transport()
    return hub, session, listener, t


def connect(listener, t):
    asyncio.run(_connect(listener, t))


async def _connect(listener, t):
    listener.on_ws_connected(t)


def test_welcome_and_registration():
    hub, session, listener, t = make(admission=Admission(ip="10.0.0.1", user_id="alice"), max_symbols=3)
    connect(listener, t)
    [welcome] = messages(t)
    assert welcome["type"] == "success" and welcome["message"] == "Connected to WebSocket Gateway"
    assert welcome["data"] == {"connectionId": session.connection_id, "serverId": "ws-gateway-test",
                               "maxSymbolsPerConnection": 3, "userId": "alice"}
    assert session in hub.sessions and hub.counters.connections_total == 1
    assert hub.access.per_ip == {"10.0.0.1": 1} and hub.access.per_user == {"alice": 1}
    listener.on_ws_disconnected(t)
    assert not hub.sessions and hub.access.per_ip == {} and hub.access.per_user == {}


def test_closing_hub_turns_new_connections_away():
    hub, session, listener, t = make()
    hub.closing = True
    connect(listener, t)
    assert t.closes == [(1001, b"server shutting down")] and t.is_disconnected
    assert not hub.sessions and messages(t) == []


def test_small_buffer_limit_lowers_the_high_water_mark():
    _, _, listener, t = make(SessionPolicy(max_buffered_bytes=4096))
    connect(listener, t)
    assert t.underlying_transport.limits == 4096


def test_messages_go_to_the_control_handler_with_the_session_limit():
    hub, session, listener, t = make(max_symbols=2)
    connect(listener, t)
    session.on_message(listener, b'{"action":"subscribe","symbols":["aapl","msft"]}', True)
    session.on_message(listener, b'{"action":"subscribe","symbols":["TSLA"]}', True)
    replies = messages(t)[1:]
    assert replies[0]["data"] == {"subscribed": ["AAPL", "MSFT"], "currentSubscriptions": ["AAPL", "MSFT"]}
    assert replies[1]["type"] == "error" and "maximum of 2 symbols" in replies[1]["message"]
    assert hub.counters.client_messages == 2 and hub.counters.errors == {"symbol_limit": 1}
    listener.on_ws_disconnected(t)
    assert hub.table.subscription_count == 0


def test_rate_limit_errors_then_closes():
    hub, session, listener, t = make(SessionPolicy(msg_rate=0.001, msg_burst=2))
    connect(listener, t)
    ping = b'{"action":"ping"}'
    for _ in range(2):
        session.on_message(listener, ping, True)
    assert [m["type"] for m in messages(t)[1:]] == ["pong", "pong"]
    for _ in range(2):                      # a burst's worth of refusals: errors only
        session.on_message(listener, ping, True)
    refusals = messages(t)[3:]
    assert [m["type"] for m in refusals] == ["error", "error"]
    assert refusals[0]["message"].startswith("Rate limit exceeded: at most 0.001 messages per second")
    assert not t.closes
    session.on_message(listener, ping, True)  # one more: closed
    assert t.closes == [(1008, b"message rate exceeded")] and t.is_disconnected
    assert hub.counters.rate_limit_closes == 1 and hub.counters.errors["rate_limited"] == 3


def test_no_rate_limit_when_rate_is_zero():
    _, session, listener, t = make(SessionPolicy(msg_rate=0.0, msg_burst=1))
    connect(listener, t)
    for _ in range(50):
        session.on_message(listener, b'{"action":"ping"}', True)
    assert len(messages(t)) == 51 and session.bucket is None


def deflated(data: bytes) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize("data, code, kind", [
    (b"\xff\xff\xff", 1007, "bad_compression"),
    (deflated(b"[" * 200_000), 1009, "too_big"),
])
def test_bad_compressed_message_closes(data, code, kind):
    hub, session, listener, t = make(SessionPolicy(max_message_size=1000))
    listener.deflate = True
    connect(listener, t)
    session.on_message(listener, data, True, compressed=True)
    assert t.closes and t.closes[0][0] == code and hub.counters.errors == {kind: 1}


def test_heartbeat_pings_then_drops_a_silent_client():
    hub, session, listener, t = make()
    connect(listener, t)
    session.on_message(listener, b'{"action":"subscribe","symbols":["AAPL"]}', True)
    session.heartbeat(30)
    assert t.pings == 1 and session.awaiting_pong
    session.on_pong()
    session.heartbeat(30)
    assert t.pings == 2 and not t.closes
    session.heartbeat(30)                  # no pong since the last ping
    assert t.closes == [(1001, b"heartbeat timeout")] and t.underlying_transport.aborted
    assert hub.counters.heartbeat_timeouts == 1 and hub.table.subscription_count == 0


def test_token_expiry_closes_1008():
    _, session, listener, t = make(admission=Admission(ip="127.0.0.1", user_id="bob"))
    connect(listener, t)
    session.token_expired()
    assert t.closes == [(1008, b"token expired")] and t.is_disconnected


def test_token_expiry_is_scheduled_and_cancelled():
    import time

    async def run():
        _, session, listener, t = make(admission=Admission(ip="127.0.0.1", user_id="bob",
                                                           expires_at=time.time() + 3600))
        listener.on_ws_connected(t)
        assert session.expiry is not None
        listener.on_ws_disconnected(t)
        assert session.expiry is None
    asyncio.run(run())


def test_slow_consumer_conflates_then_sends_gap_and_latest():
    hub, session, listener, t = make(SessionPolicy(slow_client_policy="conflate"))
    connect(listener, t)
    session.on_message(listener, b'{"action":"subscribe","symbols":["AAPL"]}', True)
    on_slow_consumer(listener)
    assert listener.conflating and hub.counters.slow_consumers == {"conflate": 1}
    for n in range(3):  # the fan-out holds the newest frame per channel while conflating
        hub.fanout.dispatch([[b"pmessage", b"channel:trade:*", b"channel:trade:AAPL",
                                       b'{"n":%d}' % n]])
    before = len(t.underlying_transport.written)
    listener.resume_writing()
    sent = messages(t)[before:]
    assert sent[0] == {"type": "gap", "data": {"symbol": "AAPL", "skipped": 2}, "timestamp": sent[0]["timestamp"]}
    assert sent[1]["data"] == {"n": 2} and not listener.conflating


def test_slow_consumer_disconnect_policy():
    async def run():
        hub, session, listener, t = make(SessionPolicy(slow_client_policy="disconnect"))
        listener.on_ws_connected(t)
        on_slow_consumer(listener)
        assert t.closes == [(1008, b"slow consumer")]
        assert hub.counters.slow_consumers == {"disconnect": 1}
        on_slow_consumer(listener)           # already closing: counted once
        assert hub.counters.slow_consumers == {"disconnect": 1}
    asyncio.run(run())


def test_disconnect_lets_go_of_the_listener():
    """No listener <-> session cycle outlives the connection: closed
    connections are freed by reference counting, not by the cycle collector."""
    hub, session, listener, t = make()
    connect(listener, t)
    listener.on_ws_disconnected(t)
    assert session.listener is None and listener.session is session
    session.heartbeat(30)          # late timers find nothing to act on
    session.token_expired()
    assert t.pings == 0 and not t.closes
