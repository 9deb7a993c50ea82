"""``ws-gateway-tail`` as a person meets it: the installed console script run
against a real gateway, its output read line by line, Ctrl-C (SIGINT) to
stop it; and its line formats on their own."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import redis
from conftest import ROOT, fresh_symbols, needs_redis_server

from gateway.client import Candle, Connected, Disconnected, Gap, Trade
from gateway.sequencing import publish_trade
from gateway.tail import Printer, describe_gap

SCRIPT = Path(sys.executable).parent / "ws-gateway-tail"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gateway.tail"]


def trade(symbol="AAPL", price=150.25, volume=100, seq=42, exchange="NYSE", ts=1_795_673_796_074):
    return Trade(symbol, {"symbol": symbol, "price": price, "volume": volume, "timestamp": ts,
                          "exchange": exchange}, seq, "e1" if seq else None, ts + 3, ts + 5)


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.extend(s.splitlines())

    def flush(self) -> None:
        pass


def test_trade_lines_line_up():
    out = Lines()
    p = Printer(out, out, json=False, utc=True)
    p.header()
    for t in (trade(), trade("BRK.B", 412345.5, 7, 1_000_042, "NASDAQ"), trade("X", 0.0123, 5, None, "")):
        p.show(t)
    header, *rows = out.lines
    assert rows[0] == "06:16:36.074  AAPL             150.25       100  NYSE            #42      5 ms"
    assert rows[1].split() == ["06:16:36.074", "BRK.B", "412345.50", "7", "NASDAQ", "#1000042", "5", "ms"]
    assert rows[2].split() == ["06:16:36.074", "X", "0.0123", "5", "-", "5", "ms"]
    # Price, size and seq end in the same column on every row, under their headings.
    for heading in ("price", "size", "seq"):
        end = header.index(heading) + len(heading)
        assert all(r[end - 1] != " " and (len(r) == end or r[end] == " ") for r in rows), heading


def test_candle_and_notice_lines():
    out = Lines()
    p = Printer(out, out, json=False, utc=True)
    p.show(Candle("AAPL", "1m", 1_795_673_760_000, 150.25, 150.9, 150.1, 150.5, 12400, 87, "final", 0))
    p.show(Connected("ws://h:8080", "6f0c1234-aaaa", "ws-gateway-3f9c", True, ("AAPL", "AAPL@1m")))
    p.show(Disconnected("ws://h:8080", 1001, "server shutting down", 0.0))
    p.show(Disconnected("ws://h:8080", None, "ConnectionRefusedError: refused", 0.4, False))
    assert out.lines == [
        "06:16:00.000  AAPL@1m    O     150.25 H     150.90 L     150.10 C     150.50  V     12400  n    87  final",
        "-- reconnected to ws://h:8080 (server ws-gateway-3f9c, connection 6f0c1234); streams AAPL AAPL@1m",
        "-- disconnected from ws://h:8080 (1001 server shutting down); retrying in 0.00 s",
        "-- cannot connect to ws://h:8080 (ConnectionRefusedError: refused); retrying in 0.40 s",
    ]


def test_gap_descriptions():
    assert describe_gap(Gap("AAPL", "trimmed", "e1", 6, 40)) == "gap in AAPL: seqs 6-40 lost (epoch e1, trimmed)"
    assert describe_gap(Gap("AAPL", "missing", "e1", 7, 7, from_gateway=False)) == (
        "gap in AAPL: seq 7 lost (epoch e1, missing)")
    assert describe_gap(Gap("AAPL", "unavailable", "e1", 9, 0)) == (
        "gap in AAPL: from seq 9, end not known (epoch e1, unavailable)")
    assert describe_gap(Gap("AAPL", "slow_consumer", skipped=12)) == "gap in AAPL: 12 skipped (slow_consumer)"
    assert describe_gap(Gap("AAPL@1m", "unavailable")) == "gap in AAPL@1m: unavailable"
    assert describe_gap(Gap("AAPL@1m", "candles_missed", None, 60_000, 180_000, from_gateway=False)) == (
        "gap in AAPL@1m: finals from 00:01:00.000 to 00:03:00.000 UTC missed (candles_missed)")


# --- the console script against a gateway ---------------------------------------
class Tail:
    """The console script in a process; its stdout read by a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(f, to), daemon=True)
                        for f, to in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))]
        for r in self.readers:
            r.start()

    @staticmethod
    def _read(f, to: list[str]) -> None:
        for line in f:
            to.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 10, what: str = "output", stderr: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.errors if stderr else self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {what}: {self.lines[-10:]} {self.errors[-10:]}")
            time.sleep(0.02)

    def exit(self, timeout: float = 10) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        for r in self.readers:
            r.join(2)
        return code, "\n".join(self.errors)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        return self.exit(5)


@pytest.fixture
def tails():
    running: list[Tail] = []

    def start(*args: str) -> Tail:
        t = Tail(*args)
        running.append(t)
        return t
    yield start
    for t in running:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def trade_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3}  ", ln)]


@pytest.mark.slow
@needs_redis_server
def test_tail_prints_trades_and_reconnects_and_ctrl_c_exits_0(redis_server, gateways, tails):
    gw = gateways(redis_server.url)
    sym = fresh_symbols(1)[0]
    r = redis.Redis(port=redis_server.port)
    t = tails(gw.url, sym.lower())
    t.wait_for(lambda ls: any(ln.startswith("-- connected") for ln in ls), what="connected line")
    assert t.lines[0].split() == ["time", "symbol", "price", "size", "exchange", "seq", "lag"]
    for k in range(3):
        publish_trade(r, sym, {"symbol": sym, "price": 10.5 + k, "volume": 100, "exchange": "IEX",
                               "timestamp": int(time.time() * 1000)})
    t.wait_for(lambda ls: len(trade_lines(ls)) == 3, what="three trades")
    assert [ln.split()[1:6] for ln in trade_lines(t.lines)] == [
        [sym, f"{10.5 + k:.2f}", "100", "IEX", f"#{k + 1}"] for k in range(3)]
    gw.stop()
    gw.start()
    gw.wait_ready()
    t.wait_for(lambda ls: any(ln.startswith("-- reconnected") for ln in ls), what="reconnected line")
    publish_trade(r, sym, {"symbol": sym, "price": 20, "volume": 1})
    t.wait_for(lambda ls: len(trade_lines(ls)) == 4, what="the fourth trade")
    assert any("(1001 server shutting down)" in ln for ln in t.lines)
    code, err = t.interrupt()
    assert code == 0 and "Traceback" not in err


@pytest.mark.slow
@needs_redis_server
def test_tail_json_prints_what_the_gateway_sent(redis_server, gateways, tails):
    gw = gateways(redis_server.url)
    sym = fresh_symbols(1)[0]
    t = tails("--json", gw.url, sym)
    t.wait_for(lambda ls: any(ln.startswith("-- connected") for ln in ls), what="connected", stderr=True)
    r = redis.Redis(port=redis_server.port)
    for _ in range(3):
        publish_trade(r, sym, {"symbol": sym, "price": 1.25, "volume": 3})
    t.wait_for(lambda ls: len(ls) == 3, what="JSON lines")
    messages = [orjson.loads(ln) for ln in t.lines]
    assert all(m["type"] == "trade" and m["data"]["symbol"] == sym for m in messages)
    assert [m["seq"] for m in messages] == [1, 2, 3]
    assert messages[0]["data"] == {"symbol": sym, "price": 1.25, "volume": 3}
    code, err = t.interrupt()
    assert code == 0 and "-- connected to" in err       # the story goes to stderr


@pytest.mark.slow
@needs_redis_server
def test_tail_bad_input_is_one_line_and_exit_2(redis_server, gateways, tails):
    gw = gateways(redis_server.url)
    bad_symbol = tails(gw.url, "AAPL", "no such!")
    code, err = bad_symbol.exit()
    assert code == 2 and err.startswith("ws-gateway-tail: error: Invalid symbol") and "\n" not in err
    code, err = tails("http://127.0.0.1:1", "AAPL").exit()
    assert code == 2 and "not a ws:// or wss:// URL" in err
    code, err = tails(gw.url).exit()
    assert code == 2 and "the following arguments are required: STREAM" in err
