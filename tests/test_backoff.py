"""gateway/redis_reader's Backoff and encode_command, without Redis or a loop."""
from __future__ import annotations

import random

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.redis_reader import Backoff, encode_command


@pytest.fixture
def no_jitter(monkeypatch):
    """random.uniform(lo, hi) -> hi: the delay before jitter."""
    monkeypatch.setattr(random, "uniform", lambda lo, hi: hi)


@pytest.fixture
def low_jitter(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda lo, hi: lo)


def delays(b: Backoff, n: int) -> list[float]:
    return [b.next_delay() for _ in range(n)]


def test_defaults():
    b = Backoff()
    assert (b.base, b.cap, b.attempt) == (0.1, 5.0, 0)


def test_doubles_from_base_up_to_cap(no_jitter):
    assert delays(Backoff(), 9) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_custom_base_and_cap(no_jitter):
    assert delays(Backoff(base=1, cap=60), 8) == [1, 2, 4, 8, 16, 32, 60, 60]


def test_cap_below_base(no_jitter):
    assert delays(Backoff(base=10, cap=1), 3) == [1, 1, 1]


def test_jitter_takes_up_to_a_fifth_off(low_jitter):
    assert delays(Backoff(), 8) == pytest.approx([0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 4.0, 4.0])


def test_jitter_asks_for_0_8_to_1(monkeypatch):
    calls = []
    monkeypatch.setattr(random, "uniform", lambda lo, hi: calls.append((lo, hi)) or hi)
    Backoff().next_delay()
    assert calls == [(0.8, 1.0)]


def test_real_jitter_stays_in_bounds_and_varies():
    random.seed(1234)
    b = Backoff()
    seen = []
    for attempt in range(40):
        undithered = min(5.0, 0.1 * 2 ** min(attempt, 30))
        d = b.next_delay()
        assert 0.8 * undithered <= d <= undithered
        seen.append(d / undithered)
    assert len(set(seen)) > 30      # actually jittered, not a constant factor


def test_attempt_counter_stops_at_30(no_jitter):
    b = Backoff(base=1e-12, cap=1e9)
    for _ in range(1000):
        d = b.next_delay()
    assert b.attempt == 30
    assert d == pytest.approx(1e-12 * 2 ** 30)   # no overflow, no runaway exponent


def test_reset(no_jitter):
    b = Backoff()
    delays(b, 10)
    assert b.attempt == 10
    b.reset()
    assert b.attempt == 0
    assert delays(b, 2) == pytest.approx([0.1, 0.2])


def test_backoffs_are_independent(no_jitter):
    a, b = Backoff(), Backoff()
    delays(a, 5)
    assert b.next_delay() == pytest.approx(0.1)


# --- encode_command ----------------------------------------------------------------------

@pytest.mark.parametrize("args, wire", [
    (("PING",), b"*1\r\n$4\r\nPING\r\n"),
    ((b"PING",), b"*1\r\n$4\r\nPING\r\n"),
    (("AUTH", "pw"), b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"),
    (("AUTH", "user", b"pw"), b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$2\r\npw\r\n"),
    (("SELECT", "12"), b"*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n"),
    (("PSUBSCRIBE", "channel:trade:*"),
     b"*2\r\n$10\r\nPSUBSCRIBE\r\n$15\r\nchannel:trade:*\r\n"),
    (("SET", "k", ""), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"),
    (("ECHO", "é€"), b"*2\r\n$4\r\nECHO\r\n$5\r\n\xc3\xa9\xe2\x82\xac\r\n"),  # bytes, not chars
    (("ECHO", b"a\r\nb\x00"), b"*2\r\n$4\r\nECHO\r\n$5\r\na\r\nb\x00\r\n"),
    ((), b"*0\r\n"),
])
def test_encode_command(args, wire):
    assert encode_command(*args) == wire


def test_str_and_bytes_encode_alike():
    assert encode_command("AUTH", "ü") == encode_command(b"AUTH", "ü".encode())


def test_long_argument():
    arg = b"x" * 100_000
    assert encode_command(arg) == b"*1\r\n$100000\r\n" + arg + b"\r\n"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=32)), max_size=8))
def test_resp_parses_back(args):
    reader = hiredis.Reader()
    reader.feed(encode_command(*args))
    expected = [a.encode() if isinstance(a, str) else a for a in args]
    assert reader.gets() == expected
    assert reader.gets() is False   # exactly one value, nothing left over
