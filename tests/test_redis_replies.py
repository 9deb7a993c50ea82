"""The Redis subscriber's reply handling without sockets: the commands it
sends on connect, and the state it reaches for each reply, fed as RESP bytes
through a real SubscriptionReader of each fast-path implementation."""
from __future__ import annotations

import logging

import pytest

from gateway.config import parse_redis_url
from gateway.redis_reader import Backoff, RedisSubscriber, encode_command

PATTERN = "channel:trade:*"


class Recorder:
    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


class Proto:
    """The part of the subscription protocol the subscriber drives."""

    def __init__(self, reader):
        self.transport = Recorder()
        self.reader = reader


def connected(impl, url="redis://127.0.0.1:6390"):
    """A subscriber that has just connected, and the fan-out its reader feeds."""
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    states: list[tuple[bool, str]] = []
    sub = RedisSubscriber(parse_redis_url(url), PATTERN,
                          lambda on_reply: impl.SubscriptionReader(fanout, on_reply),
                          backoff=Backoff(), on_state=lambda r, why: states.append((r, why)))
    proto = Proto(sub.make_reader(sub._on_reply))
    sub._on_connected(proto)
    return sub, proto, fanout, states


def resp_array(*items: bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        out.append(b":%d\r\n" % item if isinstance(item, int) else b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


@pytest.mark.parametrize("url, commands", [
    ("redis://h:1", [("PSUBSCRIBE", PATTERN)]),
    ("redis://:s3cret@h:1/2", [("AUTH", "s3cret"), ("SELECT", "2"), ("PSUBSCRIBE", PATTERN)]),
    ("redis://gw:pw@h:1", [("AUTH", "gw", "pw"), ("PSUBSCRIBE", PATTERN)]),
])
def test_commands_on_connect(impl, url, commands):
    sub, proto, _, _ = connected(impl, url)
    assert proto.transport.written == [b"".join(encode_command(*c) for c in commands)]
    assert not sub.ready and sub.reason == "subscribing" and sub.connects == 1


def test_confirmation_makes_it_ready_and_resets_backoff(impl):
    sub, proto, _, states = connected(impl)
    sub.backoff.next_delay()
    sub.backoff.next_delay()
    proto.reader.feed(b"+OK\r\n" + resp_array(b"psubscribe", PATTERN.encode(), 1))
    assert sub.ready and sub.reason == "subscribed" and sub.subscribed_at is not None
    assert sub.backoff.attempt == 0 and states == [(True, "subscribed")]
    proto.reader.feed(resp_array(b"pong", b""))          # keepalive answers change nothing
    assert sub.ready
    proto.reader.feed(resp_array(b"punsubscribe", PATTERN.encode(), 0))
    assert not sub.ready and states[-1] == (False, "unsubscribed")


@pytest.mark.parametrize("error, operator_hint", [
    (b"-WRONGPASS invalid username-password pair or user is disabled.\r\n", True),
    (b"-NOAUTH Authentication required.\r\n", True),
    (b"-NOPERM this user has no permissions to access one of the channels\r\n", True),
    (b"-ERR unknown command\r\n", False),
])
def test_refusal_closes_and_stays_the_reason(impl, caplog, error, operator_hint):
    sub, proto, _, _ = connected(impl)
    with caplog.at_level(logging.ERROR, logger="gateway.redis"):
        # The pipelined commands after a refusal fail too; only the first counts.
        proto.reader.feed(error + b"-NOAUTH Authentication required.\r\n")
    text = error[1:-2].decode()
    assert not sub.ready and sub.reason == f"Redis error: {text}" and proto.transport.closed
    assert ("check the user, password" in caplog.text) is operator_hint
    assert len(caplog.records) == 1
    # The next connection keeps that reason until Redis confirms a subscription.
    proto2 = Proto(sub.make_reader(sub._on_reply))
    sub._on_connected(proto2)
    assert sub.reason == f"Redis error: {text}"
    proto2.reader.feed(resp_array(b"psubscribe", PATTERN.encode(), 1))
    assert sub.ready


def test_trades_go_to_the_fanout_not_the_subscriber(impl):
    sub, proto, fanout, states = connected(impl)
    conn = impl.ClientListener()
    frames: list[bytes] = []
    conn.sink = frames.append
    fanout.table.subscribe(conn, "AAPL")
    proto.reader.feed(resp_array(b"psubscribe", PATTERN.encode(), 1)
                      + resp_array(b"pmessage", PATTERN.encode(), b"channel:trade:AAPL", b'{"p":1}'))
    assert len(frames) == 1 and fanout.frames_sent == 1 and proto.reader.messages == 1
    assert states == [(True, "subscribed")]


def test_a_new_connection_gets_a_new_reader(impl):
    """A reply cut off by a dropped connection is never completed by the next one."""
    sub, proto, fanout, _ = connected(impl)
    whole = resp_array(b"pmessage", PATTERN.encode(), b"channel:trade:AAPL", b'{"p":1}')
    proto.reader.feed(whole[:20])
    proto2 = Proto(sub.make_reader(sub._on_reply))
    assert proto2.reader is not proto.reader and proto2.reader.fanout is fanout
    proto2.reader.feed(whole)
    assert fanout.redis_messages == 1


CANDLES = "channel:candle:*"


def test_several_patterns_in_one_psubscribe_ready_when_all_confirmed(impl):
    table = impl.SymbolTable()
    fanout = impl.FanOut(table)
    states: list[tuple[bool, str]] = []
    sub = RedisSubscriber(parse_redis_url("redis://:pw@h:1"), (PATTERN, CANDLES, PATTERN),
                          lambda on_reply: impl.SubscriptionReader(fanout, on_reply),
                          on_state=lambda r, why: states.append((r, why)))
    assert sub.patterns == (PATTERN, CANDLES)            # each once, in order
    proto = Proto(sub.make_reader(sub._on_reply))
    sub._on_connected(proto)
    assert proto.transport.written == [encode_command("AUTH", "pw")
                                       + encode_command("PSUBSCRIBE", PATTERN, CANDLES)]
    proto.reader.feed(b"+OK\r\n" + resp_array(b"psubscribe", PATTERN.encode(), 1))
    assert not sub.ready and states == []
    proto.reader.feed(resp_array(b"psubscribe", CANDLES.encode(), 2))
    assert sub.ready and states == [(True, "subscribed")]
    proto.reader.feed(resp_array(b"punsubscribe", CANDLES.encode(), 1))
    assert not sub.ready and states[-1] == (False, "unsubscribed")
    # A new connection starts over: one confirmation is not enough.
    proto2 = Proto(sub.make_reader(sub._on_reply))
    sub._on_connected(proto2)
    proto2.reader.feed(resp_array(b"psubscribe", CANDLES.encode(), 1))
    assert not sub.ready
    proto2.reader.feed(resp_array(b"psubscribe", PATTERN.encode(), 2))
    assert sub.ready
    with pytest.raises(ValueError):
        RedisSubscriber(parse_redis_url("redis://h:1"), (), lambda on_reply: None)


def test_two_patterns_against_a_real_redis(aio, impl, redis_server):
    """Both patterns confirmed by a real Redis; each channel's messages reach
    its subscribers once (trades framed, candles forwarded verbatim)."""
    import asyncio

    from conftest import wait_until

    from gateway._testbase.ws import FrameParser

    async def main():
        table = impl.SymbolTable()
        fanout = impl.FanOut(table)
        conn = impl.ClientListener()
        out: list[bytes] = []
        conn.sink = out.append
        table.subscribe(conn, "RRTWO")
        table.subscribe(conn, "RRTWO@1m")
        sub = RedisSubscriber(parse_redis_url(redis_server.url), (PATTERN, CANDLES),
                              lambda on_reply: impl.SubscriptionReader(fanout, on_reply))
        sub.start()
        try:
            await wait_until(lambda: sub.ready)
            r = redis_server.client()
            assert r.publish("channel:trade:RRTWO", b'{"p":1}') == 1
            assert r.publish("channel:candle:1m:RRTWO", b'{"_n":3,"type":"candle"}') == 1
            assert r.publish("channel:candle:5m:RRTWO", b'{"_n":1,"type":"candle"}') == 1
            await wait_until(lambda: fanout.redis_messages == 3)
            await asyncio.sleep(0.05)
        finally:
            await sub.stop()
        parser = FrameParser()
        got = [f.payload for w in out for f in parser.feed(w)]
        assert len(got) == 2 and got[0].startswith(b'{"type":"trade","data":{"p":1},')
        assert got[1] == b'{"type":"candle"}' and fanout.unrouted_messages == 1
    aio(main())


def test_an_unreachable_redis_is_one_warning_not_two_lines_per_attempt(caplog):
    """While Redis stays away the subscriber retries every few ms here, yet
    logs one warning (then one per REPEAT_LOG_INTERVAL), and a line when it
    is back; the per-attempt delay is DEBUG only."""
    import asyncio

    from gateway._testbase.net import free_port

    async def main():
        sub = RedisSubscriber(parse_redis_url(f"redis://127.0.0.1:{free_port()}"), PATTERN,
                              lambda on_reply: None, backoff=Backoff(base=0.001, cap=0.005))
        sub.start()
        await asyncio.sleep(0.5)
        attempts = sub._failures.count
        await sub.stop()
        return attempts

    with caplog.at_level(logging.INFO, logger="gateway.redis"):
        attempts = asyncio.run(main())
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert attempts > 10
    assert len(warnings) == 1
    assert not [r for r in caplog.records if "next Redis connection attempt" in r.getMessage()]
