"""Soak test: the gateway under mixed load for a while, with Redis restarts.

    .venv/bin/python -m gateway._testbase.soak --duration 600
    .venv/bin/python -m gateway._testbase.soak --duration 60 --clients 50 --rate 500   # a quick one

It starts its own redis-server (a free loopback port, never 6379) and the
gateway (``python -m gateway`` as a subprocess, run from the directory that
holds this ``gateway`` package), then
for --duration seconds runs all of this at once:

  healthy    --clients WebSocket clients, each holding --symbols-per-client
             symbols. They check the per-symbol "seq" of every trade (gaps,
             out of order, duplicates), answer the gateway's pings, and
             count deliveries.
  publisher  --rate trades/s spread at random over --symbols symbols, skewed
             like real markets (--zipf); each payload carries its symbol's
             next seq. It records what every PUBLISH returned (Redis's
             receiver count) and when.
  churn      connect / subscribe / disconnect cycles, --churn-rate per second:
             a third end with a close handshake, a third with a bare FIN,
             a third with a RST.
  stalled    --stalled clients with a tiny SO_RCVBUF that subscribe and then
             never read, each replaced as soon as the gateway cuts it off.
             Half are silent (the heartbeat or the slow-consumer rule must
             drop them); half send unsolicited pongs, so only the
             slow-consumer rule (WS_MAX_BUFFERED_BYTES) can.
  Redis      SIGKILLed at 1/3 of the run (and at 2/3 with --redis-restarts 2),
             left down --redis-down seconds, restarted on the same port.

Every --rss-interval seconds it samples the gateway's VmRSS (/proc/PID/status)
and prints it. /metrics and /readyz are used when the gateway answers them,
never required.

Which deliveries are expected
  All healthy clients are subscribed before the first PUBLISH. A trade is
  expected by every healthy client holding its symbol when its PUBLISH
  returned >= 1: Redis handed it to the gateway's pattern subscription.
  Exception: a reply that came less than --kill-grace seconds before a Redis
  kill (or after the kill, from the dying server). Redis counts the receiver
  when it queues the bytes, and SIGKILL may discard that queue before the
  gateway reads it; those trades are "at risk", reported, not required.
  Trades whose PUBLISH returned 0 (Redis back, gateway not re-subscribed yet)
  or failed (Redis down, or killed mid-pipeline) are not expected. They still
  used up a seq, so clients see a gap there; a gap is a loss only where it
  covers an expected trade.

Verdict (exit 0 when all hold, 1 otherwise)
  zero loss   no healthy client misses an expected trade, none arrives out of
              order or twice, no healthy client is disconnected;
  RSS flat    skip a warm-up of max(10 s, 10% of the run), at most a sixth
              of it; the median RSS of the last third exceeds the median of
              the rest of the first third by at most max(--rss-pct % of the
              latter, --rss-mb MB);
  gateway     alive to the end, exits 0 on SIGTERM, no Python traceback in
              its log, re-subscribed after every Redis restart, and no
              stalled client kept past its limit (silent: max(30 s, 4
              heartbeats); pong-only: 120 s, none under the conflate policy).
  Churn errors, latencies and the /metrics connection gauge are reported
  for reading; they do not decide the verdict.

Exit 2 when the harness itself cannot start (bad arguments, no redis-server).
"""
from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import orjson
import redis

from . import ws as wire
from .loops import run_loop
from .net import HOST, HarnessError, readyz, scrape_metrics
from .process import ONE_ADDRESS_ENV, GatewayProcess, die_with_parent
from .procfs import TCP_ESTABLISHED, tcp_peer_ports
from .redis import RedisServer
from .ws import FrameParser, close_code, frame, rst, rst_socket, split_http_head, text_frame, upgrade_request

CHANNEL_PREFIX = "channel:trade:"


def start_gateway(rds: RedisServer, log_path: Path, **env) -> GatewayProcess:
    """The gateway under test: INFO log to ``log_path``, killed if the harness dies."""
    return GatewayProcess(rds.url, log_path=log_path, die_with_parent=True, LOG_LEVEL="INFO",
                          **env).start()


def redis_client(port: int) -> redis.Redis:
    """A publisher's client: short timeouts, and no retries (a retried pipeline
    would publish twice what Redis had already taken before the connection
    dropped)."""
    return RedisServer(port).client(retry=False, socket_timeout=2, socket_connect_timeout=0.5)


# ---------------------------------------------------------------------------
# healthy clients
# ---------------------------------------------------------------------------

# Delivery latency histogram of this process, 1 ms buckets (last one: >= 1 s).
LATENCY_MS = [0] * 1001


@dataclass(slots=True)
class SeqState:
    """A healthy client's accounting for one symbol."""

    last: int = -1              # last seq received
    received: int = 0
    out_of_order: int = 0       # out of order or duplicate
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first, last) missing


class HealthyClient(asyncio.Protocol):
    """Subscribes, then checks every trade's per-symbol seq and answers pings.

    Per symbol it keeps the last seq, a count, out-of-order/duplicate count
    and the missing ranges (gaps), which is all the loss accounting needs.
    """

    MAX_GAPS = 10000  # per symbol; more means something is badly wrong anyway

    def __init__(self, index: int, symbols: list[str], port: int):
        self.index = index
        self.symbols = symbols
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.upgraded = False
        self.parser = FrameParser()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.seqs = {s: SeqState() for s in symbols}
        self.gap_overflow = False
        self.other: list[Any] = []        # unexpected messages (errors...), first few
        self.disconnected: str | None = None  # why, if the gateway dropped us
        self.pings = 0
        self.closing = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(upgrade_request(self.port))

    def data_received(self, data):
        if not self.upgraded:
            parts = split_http_head(self.head + data)
            if parts is None:
                self.head += data
                return
            head, data = parts
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(f"upgrade refused: {head[:60]!r}")
                return
            self.upgraded = True
        for f in self.parser.feed(data):
            opcode, payload = f.opcode, f.payload
            if opcode == 0x1:
                self._on_text(payload)
            elif opcode == 0x9:
                self.pings += 1
                assert self.transport is not None
                self.transport.write(frame(0xA, payload))
            elif opcode == 0x8 and not self.closing:
                self.disconnected = f"close {close_code(payload)} {payload[2:60]!r}"

    def _on_text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        kind = msg.get("type")
        if kind == "trade":
            data = msg["data"]
            st = self.seqs.get(data["symbol"])
            if st is None:
                self._note(msg)
                return
            seq = data["seq"]
            last = st.last
            if seq == last + 1:
                st.last = seq
            elif seq > last:
                if len(st.gaps) < self.MAX_GAPS:
                    st.gaps.append((last + 1, seq - 1))
                else:
                    self.gap_overflow = True
                st.last = seq
            else:
                st.out_of_order += 1
            st.received += 1
            ms = int((time.time_ns() // 1000 - data["pub_us"]) // 1000)
            LATENCY_MS[ms if 0 <= ms < 1000 else 1000] += 1
        elif kind == "success":
            data = msg.get("data") or {}
            if "connectionId" in data:
                assert self.transport is not None
                self.transport.write(text_frame({"action": "subscribe", "symbols": self.symbols}))
            elif "subscribed" in data and not self.subscribed.done():
                self.subscribed.set_result(True)
            else:
                self._note(msg)
        elif kind != "pong":
            self._note(msg)

    def _note(self, msg) -> None:
        if len(self.other) < 5:
            self.other.append(msg)

    def _fail(self, why: str) -> None:
        self.disconnected = why
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        assert self.transport is not None
        self.transport.abort()

    def connection_lost(self, exc):
        if not self.closing and self.disconnected is None:
            self.disconnected = f"connection lost ({exc or 'EOF'})"
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(self.disconnected or "lost"))

    def close(self) -> None:
        """Clean close at the end of the run."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(0x8, struct.pack("!H", 1000)))
            self.transport.close()

    def result(self) -> dict:
        return {"index": self.index, "symbols": self.symbols,
                "seqs": {s: (st.last, st.received, st.out_of_order, st.gaps)
                         for s, st in self.seqs.items()},
                "gap_overflow": self.gap_overflow, "other": self.other,
                "disconnected": self.disconnected, "pings": self.pings}


def assign_symbols(index: int, names: list[str], per_client: int) -> list[str]:
    """Round robin: every symbol gets the same number of healthy subscribers."""
    return [names[(index * per_client + j) % len(names)] for j in range(per_client)]


async def open_healthy(port: int, indices, names, per_client, timeout=30.0):
    loop = asyncio.get_running_loop()
    clients = []
    batch = 50  # connect in batches: a burst of hundreds of SYNs is not the test
    idx = list(indices)
    for start in range(0, len(idx), batch):
        group = []
        for i in idx[start:start + batch]:
            def make(i: int = i) -> HealthyClient:
                return HealthyClient(i, assign_symbols(i, names, per_client), port)
            _, c = await loop.create_connection(make, HOST, port)
            group.append(c)
        await asyncio.wait_for(asyncio.gather(*(c.subscribed for c in group)), timeout)
        clients.extend(group)
    return clients


def healthy_process(port, indices, names, per_client, ready_q, stop_evt, result_q):
    """Child process: hold the healthy clients until told to stop."""
    die_with_parent()

    async def main():
        try:
            clients = await open_healthy(port, indices, names, per_client)
        except Exception as exc:
            ready_q.put(("error", f"healthy clients could not subscribe: {exc!r}"))
            return
        ready_q.put(("ready", len(clients)))
        wall0, cpu0 = time.monotonic(), time.process_time()
        while not stop_evt.is_set():
            await asyncio.sleep(0.2)
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        results = [c.result() for c in clients]
        for c in clients:
            c.close()
        await asyncio.sleep(0.2)
        result_q.put({"clients": results, "latency_ms": LATENCY_MS, "cpu_share": cpu / wall})

    run_loop(main())


# ---------------------------------------------------------------------------
# publisher
# ---------------------------------------------------------------------------

EXCHANGES = ("NASDAQ", "NYSE", "ARCA", "BATS", "IEX")

# What a PUBLISH came back with, per trade (status arrays).
PUB_FAILED = -1   # the pipeline raised: Redis down or killed mid-way; unknown


def trade_payload(rng: random.Random, symbol: str, seq: int) -> bytes:
    """A realistic trade plus the two fields the checks need: seq and pub_us."""
    now_us = time.time_ns() // 1000
    return orjson.dumps({
        "symbol": symbol, "seq": seq, "price": round(rng.uniform(10, 900), 2),
        "volume": rng.choice((1, 10, 100, 100, 200, 500)), "timestamp": now_us // 1000,
        "conditions": ["@"], "exchange": rng.choice(EXCHANGES), "pub_us": now_us})


def symbol_weights(n: int, zipf: float) -> list[float]:
    """Cumulative weights: symbol i gets a share proportional to 1/(i+1)^zipf.

    Market data is skewed (a few tickers trade most); 0 makes it uniform.
    """
    cum, total = [], 0.0
    for i in range(n):
        total += 1 / (i + 1) ** zipf
        cum.append(total)
    return [c / total for c in cum]


def publisher_process(redis_port, names, rate, zipf, t0, duration, seed, result_q, stop_evt=None):
    """Child process: publish ``rate`` trades/s from t0 for ``duration`` s
    (or until ``stop_evt`` is set).

    Trades go out in a pipeline every 10 ms (the due count since t0, so the
    average rate holds even after a stall). For every trade it records what
    PUBLISH returned (receivers, or PUB_FAILED) and when the reply came
    (monotonic clock, shared by all processes on Linux).
    """
    die_with_parent()
    r = redis_client(redis_port)
    rng = random.Random(seed)
    channels = [(CHANNEL_PREFIX + s).encode() for s in names]
    cum = symbol_weights(len(names), zipf)
    status = [array.array("b") for _ in names]
    acked_at = [array.array("d") for _ in names]
    next_seq = [0] * len(names)
    sent = failures = 0
    while time.monotonic() < t0:
        time.sleep(0.001)
    end = t0 + duration
    while True:
        now = time.monotonic()
        if now >= end or (stop_evt is not None and stop_evt.is_set()):
            break
        due = int((now - t0) * rate)
        if due > sent:
            picks = [min(bisect.bisect(cum, rng.random()), len(names) - 1)
                     for _ in range(due - sent)]
            pipe = r.pipeline(transaction=False)
            for s in picks:
                pipe.publish(channels[s], trade_payload(rng, names[s], next_seq[s]))
                next_seq[s] += 1
            try:
                replies = [min(int(x), 100) for x in pipe.execute()]
            except (redis.RedisError, OSError):
                replies = [PUB_FAILED] * len(picks)
                failures += 1
            t_ack = time.monotonic()
            for s, rep in zip(picks, replies, strict=False):
                status[s].append(rep)
                acked_at[s].append(t_ack)
            sent = due
        time.sleep(max(0.0, 0.01 - (time.monotonic() - now)))
    result_q.put({"names": names, "status": status, "acked_at": acked_at,
                  "published": sent, "pipeline_failures": failures})


# ---------------------------------------------------------------------------
# churn and stalled clients
# ---------------------------------------------------------------------------

def is_reply(kind):
    def want(f):
        return f.opcode == 0x1 and orjson.loads(f.payload).get("type") in kind
    return want


async def churn_cycle(port, rng, names, counts):
    reader, writer, parser, rest = await wire.open_async(port)
    try:
        welcome = parser.feed(rest)
        if not welcome:
            await wire.read_frames(reader, parser, lambda f: True, 5)
        syms = rng.sample(names, rng.randint(1, min(5, len(names))))
        writer.write(text_frame({"action": "subscribe", "symbols": syms}))
        await wire.read_frames(reader, parser, is_reply(("success", "error")), 5)
        # Take some trades for a moment, so the gateway writes to this one.
        linger = rng.uniform(0, 0.3)
        with contextlib.suppress(asyncio.TimeoutError):
            await wire.read_frames(reader, parser, lambda f: False, linger)
        mode = rng.choice(("close", "fin", "rst"))
        if mode == "close":
            writer.write(frame(0x8, struct.pack("!H", 1000)))
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await wire.read_frames(reader, parser, lambda f: f.opcode == 0x8, 2)
            writer.close()
        elif mode == "fin":
            writer.close()
        else:
            rst(writer)
        counts[mode] = counts.get(mode, 0) + 1
    except BaseException:
        writer.transport.abort()
        raise


def open_stalled(port: int, symbols: list[str], rcvbuf: int = 2048) -> socket.socket:
    """Blocking: a client with a tiny receive buffer that subscribes, then never reads."""
    client = wire.connect(port, rcvbuf=rcvbuf)
    client.send_text({"action": "subscribe", "symbols": symbols})
    return client.sock


def gateway_side_established(gw_port: int, states=(TCP_ESTABLISHED,)) -> set[int]:
    """Client ports of loopback connections whose gateway end is in ``states``:
    it leaves ESTABLISHED when the gateway closes it (or CLOSE_WAIT, when the
    client closed first and the gateway followed)."""
    return tcp_peer_ports(gw_port, states)


class StalledCounts(TypedDict):
    """What happened to the stalled clients of one kind."""

    opened: int
    cut_off: int              # by the gateway
    cutoff_s: list[float]     # each one's age when cut off
    stuck: int                # kept past the limit: never cut off


def churn_process(port, names, rate, concurrency, stalled, heartbeat, policy, seed, stop_evt,
                  result_q):
    """Child process: churn cycles at ``rate``/s and ``stalled`` never-reading clients."""
    die_with_parent()
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    stall: dict[str, StalledCounts] = {
        kind: {"opened": 0, "cut_off": 0, "cutoff_s": [], "stuck": 0}
        for kind in ("silent", "pong-only")}
    open_errors = 0  # stalled clients that failed to open
    # Past these ages a stalled client counts as never cut off. Silent ones
    # miss a ping within two heartbeats; pong-only ones need the kernel's send
    # buffer (about 2 MB on loopback) and the gateway's limit filled first.
    # Under the conflate policy the gateway keeps slow consumers on purpose.
    stall_limit = {"silent": max(30.0, 4 * heartbeat),
                   "pong-only": float("inf") if policy == "conflate" else 120.0}

    async def worker(wid):
        rng = random.Random(seed * 1000 + wid)
        interval = concurrency / rate  # each worker's share of the rate
        next_at = time.monotonic() + rng.uniform(0, interval)
        while not stop_evt.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic() - interval)
            try:
                await asyncio.wait_for(churn_cycle(port, rng, names, counts), 15)
            except Exception as exc:
                key = type(exc).__name__ + (f": {exc}"[:60] if str(exc) else "")
                errors[key] = errors.get(key, 0) + 1

    async def stalled_keeper():
        """Keep ``stalled`` never-reading clients open, half of each kind:

        silent     never reads, never writes: the heartbeat (no pong) or the
                   slow-consumer rule must cut it off;
        pong-only  never reads but sends an unsolicited pong every half
                   heartbeat (allowed by RFC 6455), so only the slow-consumer
                   rule can cut it off. It holds the busiest symbols.
        """
        nonlocal open_errors
        loop = asyncio.get_running_loop()
        rng = random.Random(seed + 7)
        socks: dict[int, list] = {}  # local port -> [socket, kind, opened, last pong]
        n_kind = {"silent": 0, "pong-only": 0}
        try:
            while not stop_evt.is_set():
                while len(socks) < stalled and not stop_evt.is_set():
                    kind = min(n_kind, key=lambda k: n_kind[k])
                    syms = (names[:5] if kind == "pong-only"
                            else rng.sample(names, min(5, len(names))))
                    try:
                        s = await loop.run_in_executor(None, open_stalled, port, syms)
                    except Exception:
                        open_errors += 1
                        await asyncio.sleep(0.5)
                        continue
                    n_kind[kind] += 1
                    stall[kind]["opened"] += 1
                    socks[s.getsockname()[1]] = [s, kind, time.monotonic(), 0.0]
                # The client side cannot see the cut-off: the gateway's FIN
                # (or RST) waits behind the bytes the full window holds back.
                # The kernel's table shows it: the gateway's end of the
                # connection leaves ESTABLISHED the moment it closes it.
                open_now = gateway_side_established(port)
                now = time.monotonic()
                for lport, entry in list(socks.items()):
                    s, kind, since, pong_at = entry
                    st = stall[kind]
                    if lport not in open_now:
                        st["cut_off"] += 1
                        st["cutoff_s"].append(round(now - since, 2))
                    elif now - since > stall_limit[kind]:
                        st["stuck"] += 1  # the gateway kept a client that never reads
                    else:
                        if kind == "pong-only" and now - pong_at >= heartbeat / 2:
                            entry[3] = now
                            with contextlib.suppress(OSError):
                                s.send(frame(0xA, b""))
                        continue
                    del socks[lport]
                    n_kind[kind] -= 1
                    rst_socket(s)
                await asyncio.sleep(0.25)
        finally:
            for entry in socks.values():
                rst_socket(entry[0])

    async def main():
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        if stalled:
            tasks.append(asyncio.create_task(stalled_keeper()))
        await asyncio.gather(*tasks)
        result_q.put({"cycles": counts, "errors": errors,
                      "stalled": {**stall, "open_errors": open_errors}})

    run_loop(main())


# ---------------------------------------------------------------------------
# Redis restarts (a thread of the harness)
# ---------------------------------------------------------------------------

@dataclass
class Restart:
    kill_at: float                       # monotonic, just before SIGKILL
    up_at: float = 0.0                   # redis-server answering again
    resubscribed_at: float | None = None  # PUBSUB NUMPAT back to 1
    readyz_down: int | None = None       # /readyz while Redis was down
    readyz_after: int | None = None      # /readyz once re-subscribed


def restart_redis(redis_proc, gw_port, when, down, out: list, done: threading.Event,
                  stop: threading.Event):
    """Kill and restart Redis at the times in ``when``; set ``done`` after the last.

    The thread then waits for ``stop``: redis-server is started with
    PR_SET_PDEATHSIG, which fires when the *thread* that started it exits.
    """
    try:
        _restart_redis(redis_proc, gw_port, when, down, out, stop)
    finally:
        done.set()
    stop.wait()


def _restart_redis(redis_proc, gw_port, when, down, out, stop):
    for at in when:
        while time.monotonic() < at:
            if stop.wait(0.05):
                return
        r = Restart(kill_at=time.monotonic())
        redis_proc.kill()
        out.append(r)
        time.sleep(min(0.5, down / 2))
        r.readyz_down = readyz(gw_port)
        time.sleep(max(0.0, down - min(0.5, down / 2)))
        redis_proc.start()
        r.up_at = time.monotonic()
        deadline = r.up_at + 30
        while time.monotonic() < deadline and not stop.is_set():
            if redis_proc.numpat() >= 1:
                r.resubscribed_at = time.monotonic()
                break
            time.sleep(0.02)
        # /readyz turns 200 on the PSUBSCRIBE confirmation, a moment after NUMPAT.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            r.readyz_after = readyz(gw_port)
            if r.readyz_after in (None, 200):
                break
            time.sleep(0.05)


# ---------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------

EXPECTED, AT_RISK, NOT_EXPECTED = 0, 1, 2


def classify(pub: dict, restarts: list[Restart], grace: float) -> dict[str, bytearray]:
    """Per symbol, per seq: EXPECTED, AT_RISK or NOT_EXPECTED (see the module doc)."""
    windows = sorted((r.kill_at - grace, r.up_at or float("inf")) for r in restarts)
    starts = [w[0] for w in windows]
    out = {}
    for name, status, acked in zip(pub["names"], pub["status"], pub["acked_at"], strict=False):
        cls = bytearray(len(status))
        for i, (st, t) in enumerate(zip(status, acked, strict=False)):
            if st < 1:
                cls[i] = NOT_EXPECTED
            else:
                k = bisect.bisect_right(starts, t) - 1
                cls[i] = AT_RISK if k >= 0 and t < windows[k][1] else EXPECTED
        out[name] = cls
    return out


def prefix_counts(cls: bytearray, which: int) -> array.array:
    """p[i] = how many of cls[:i] are ``which``: counts over a range in O(1)."""
    p = array.array("l", [0]) * (len(cls) + 1)
    total = 0
    for i, c in enumerate(cls):
        total += c == which
        p[i + 1] = total
    return p


def account(clients: list[dict], cls: dict[str, bytearray]) -> list[dict]:
    """Expected / received / lost per healthy client."""
    pre = {s: (prefix_counts(c, EXPECTED), prefix_counts(c, AT_RISK)) for s, c in cls.items()}
    rows = []
    for c in clients:
        row = dict(index=c["index"], symbols=c["symbols"], expected=0, received=0, lost=0,
                   at_risk=0, at_risk_lost=0, gaps=0, ooo=0, disconnected=c["disconnected"],
                   gap_overflow=c["gap_overflow"], other=c["other"], lost_ranges=[])
        for sym, (last, received, ooo, gaps) in c["seqs"].items():
            pe, pr = pre.get(sym, (array.array("l", [0]), array.array("l", [0])))
            n = len(pe) - 1
            # Missing: the gaps seen, plus everything after the last seq received.
            missing = list(gaps) + ([(last + 1, n - 1)] if last + 1 <= n - 1 else [])
            row["expected"] += pe[n]
            row["at_risk"] += pr[n]
            row["received"] += received
            row["gaps"] += len(gaps)
            row["ooo"] += ooo
            for a, b in missing:
                a, b = max(a, 0), min(b, n - 1)
                if a > b:
                    continue
                lost = pe[b + 1] - pe[a]
                row["lost"] += lost
                row["at_risk_lost"] += pr[b + 1] - pr[a]
                if lost and len(row["lost_ranges"]) < 5:
                    row["lost_ranges"].append((sym, a, b, lost))
        rows.append(row)
    return rows


def percentile_ms(hist: list[int], q: float) -> int | None:
    total = sum(hist)
    if not total:
        return None
    rank, seen = q * total, 0
    for ms, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return ms
    return len(hist) - 1


def rss_verdict(samples, duration, warmup, pct, mb):
    """(flat?, first-third median KB, last-third median KB, text)."""
    first = [kb for t, kb in samples if warmup <= t < duration / 3]
    last = [kb for t, kb in samples if t >= 2 * duration / 3]
    if not first or not last:
        return False, None, None, "too few RSS samples to judge"
    f, lt = statistics.median(first), statistics.median(last)
    limit = max(f * pct / 100, mb * 1024)
    grow = lt - f
    text = (f"first third median {f / 1024:.1f} MB (t {warmup:.0f}-{duration / 3:.0f} s, "
            f"{len(first)} samples), last third {lt / 1024:.1f} MB ({len(last)} samples): "
            f"{grow / 1024:+.1f} MB ({100 * grow / f:+.1f}%), "
            f"limit +{limit / 1024:.1f} MB = max({pct:g}%, {mb:g} MB)")
    return grow <= limit, f, lt, text


STATS_RE = re.compile(r"stats: (.*)$")


def last_stats(log: str) -> dict[str, str]:
    lines = [m.group(1) for m in map(STATS_RE.search, log.splitlines()) if m]
    return dict(kv.split("=", 1) for kv in lines[-1].split() if "=" in kv) if lines else {}


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Soak the gateway: healthy clients, churn, stalled clients and Redis "
                    "restarts at once; RSS over time; loss accounting. Exit 0 pass, 1 fail.",
        epilog="See the module docstring (gateway/_testbase/soak.py) for what is expected and "
               "the verdict.")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=200, help="healthy clients (default 200)")
    p.add_argument("--symbols", type=int, default=50, help="symbols published (default 50)")
    p.add_argument("--symbols-per-client", type=int, default=2, help="per healthy client (1-5)")
    p.add_argument("--rate", type=float, default=2000, help="trades published per second")
    p.add_argument("--zipf", type=float, default=1.0,
                   help="symbol popularity skew: symbol i gets 1/(i+1)^zipf of the trades; 0 = uniform")
    p.add_argument("--churn-rate", type=float, default=50, help="churn cycles per second")
    p.add_argument("--churn-concurrency", type=int, default=16, help="churn cycles in flight")
    p.add_argument("--stalled", type=int, default=2, help="never-reading clients kept open")
    p.add_argument("--redis-restarts", type=int, default=2, choices=(0, 1, 2),
                   help="Redis kills: at 1/3, and 2/3 of the run (default 2)")
    p.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis stays down")
    p.add_argument("--kill-grace", type=float, default=0.25,
                   help="trades acknowledged this long before a kill are at risk, not expected")
    p.add_argument("--rss-interval", type=float, default=None,
                   help="seconds between RSS samples (default: duration/30, 1 to 5 s)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds excluded from the RSS baseline "
                        "(default max(10 s, 10%% of the run), at most 1/6 of it)")
    p.add_argument("--rss-pct", type=float, default=10.0, help="RSS growth allowed, percent")
    p.add_argument("--rss-mb", type=float, default=5.0, help="RSS growth allowed, MB (the larger wins)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="gateway WS_HEARTBEAT_INTERVAL")
    p.add_argument("--max-buffered-bytes", type=int, default=65536,
                   help="gateway WS_MAX_BUFFERED_BYTES (small, so stalled clients hit it)")
    p.add_argument("--drain", type=float, default=3.0, help="seconds for the last trades to arrive")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra gateway environment (repeatable), e.g. WS_SLOW_CLIENT_POLICY=conflate")
    p.add_argument("--per-client", choices=("all", "worst", "none"), default="all",
                   help="per-client table: every client, the 10 worst, or none")
    p.add_argument("--keep-logs", action="store_true", help="keep the gateway log even on pass")
    args = p.parse_args(argv)
    if not 1 <= args.symbols_per_client <= 5 or args.symbols_per_client > args.symbols:
        p.error("--symbols-per-client must be 1-5 and at most --symbols")
    if args.duration < 15:
        p.error("--duration must be at least 15 s (thirds, warm-up, restarts)")
    for kv in args.gateway_env:
        if "=" not in kv:
            p.error(f"--gateway-env wants KEY=VALUE, got {kv!r}")
    if args.rss_interval is None:
        args.rss_interval = min(5.0, max(1.0, args.duration / 30))
    if args.warmup is None:
        args.warmup = min(max(10.0, args.duration / 10), args.duration / 6)
    return args


def slow_client_policy(args) -> str:
    given = dict(kv.split("=", 1) for kv in args.gateway_env).get("WS_SLOW_CLIENT_POLICY")
    return (given or os.environ.get("WS_SLOW_CLIENT_POLICY") or "disconnect").strip().lower()


def say(*a) -> None:
    print(*a, flush=True)


def run_session(tool: str, args, env: dict, body, finally_last=None) -> int:
    """Start redis-server and the gateway (``env``, then --gateway-env), call
    ``body(rds, gw, children, workdir)`` and return what it returns; 2 when
    the harness cannot start. Child processes ``body`` appends to
    ``children``, the gateway and Redis are stopped on the way out, then
    ``finally_last()`` runs.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"gateway-{tool}-"))
    # SIGTERM (e.g. from a test runner) unwinds through the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rds = gw = None
    children: list[mp.Process] = []
    try:
        rds = RedisServer(die_with_parent=True).start()
        env = {**env, **ONE_ADDRESS_ENV, **dict(kv.split("=", 1) for kv in args.gateway_env)}
        gw = start_gateway(rds, workdir / "gateway.log", **env)
        gw.wait_ready()
        return body(rds, gw, children, workdir)
    except HarnessError as exc:
        say(f"{tool}: cannot run: {exc}")
        return 2
    finally:
        for c in children:
            if c.is_alive():
                c.terminate()
                c.join(5)
        if gw is not None:
            gw.kill()
        if rds is not None:
            rds.stop()
        if finally_last is not None:
            finally_last()


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_restarts = threading.Event()  # set last: the restart thread owns redis-server
    env = {"WS_HEARTBEAT_INTERVAL": args.heartbeat, "WS_STATS_INTERVAL": 10,
           "WS_MAX_BUFFERED_BYTES": args.max_buffered_bytes}
    return run_session(
        "soak", args, env,
        lambda rds, gw, children, workdir: run(args, rds, gw, children, stop_restarts, workdir),
        finally_last=stop_restarts.set)


def run(args, rds, gw, children, stop_restarts, workdir) -> int:
    ctx = mp.get_context("fork")  # forked before any thread exists in this process
    names = [f"S{i:03d}" for i in range(args.symbols)]
    D = args.duration
    say(f"soak: gateway pid {gw.pid} on ws://{HOST}:{gw.port}, redis-server on port {rds.port}, "
        f"log {gw.log_path}")
    say(f"soak: {D:g} s, {args.clients} healthy clients x {args.symbols_per_client} of "
        f"{args.symbols} symbols, {args.rate:g} trades/s, churn {args.churn_rate:g}/s, "
        f"{args.stalled} stalled, {args.redis_restarts} Redis restart(s), seed {args.seed}")

    ready_q, healthy_q = ctx.Queue(), ctx.Queue()
    stop_healthy = ctx.Event()
    hp = ctx.Process(target=healthy_process, daemon=True, name="healthy",
                     args=(gw.port, range(args.clients), names, args.symbols_per_client,
                           ready_q, stop_healthy, healthy_q))
    hp.start()
    children.append(hp)
    kind, detail = ready_q.get(timeout=120)
    if kind != "ready":
        raise HarnessError(detail)
    say(f"soak: {detail} healthy clients subscribed")

    churn_q, stop_churn = ctx.Queue(), ctx.Event()
    cp = ctx.Process(target=churn_process, daemon=True, name="churn",
                     args=(gw.port, names, args.churn_rate, args.churn_concurrency, args.stalled,
                           args.heartbeat, slow_client_policy(args), args.seed, stop_churn,
                           churn_q))
    cp.start()
    children.append(cp)

    pub_q = ctx.Queue()
    t0 = time.monotonic() + 0.5
    pp = ctx.Process(target=publisher_process, daemon=True, name="publisher",
                     args=(rds.port, names, args.rate, args.zipf, t0, D, args.seed, pub_q))
    pp.start()
    children.append(pp)

    restarts: list[Restart] = []
    restarts_done = threading.Event()
    when = [t0 + D * k / 3 for k in range(1, args.redis_restarts + 1)]
    rt = threading.Thread(target=restart_redis, daemon=True,
                          args=(rds, gw.port, when, args.redis_down, restarts, restarts_done,
                                stop_restarts))
    rt.start()

    # Sample RSS (and, when served, /metrics) until the publisher is done.
    samples: list[tuple[float, int]] = []
    gw_died_at = None
    cpu_prev, t_prev = gw.cpu_seconds(), time.monotonic()
    next_sample = t0
    say(f"{'t':>7}  {'RSS MB':>7}  {'gw CPU':>6}  {'conns':>5}  {'redis':>5}")
    while time.monotonic() < t0 + D:
        time.sleep(max(0.0, next_sample - time.monotonic()))
        next_sample += args.rss_interval
        t = time.monotonic() - t0
        if not gw.alive():
            gw_died_at = t
            say(f"{t:7.1f}  gateway exited with {gw.proc.returncode}")
            break
        rss, cpu, now = gw.rss_kb(), gw.cpu_seconds(), time.monotonic()
        share = (cpu - cpu_prev) / (now - t_prev) if cpu is not None and cpu_prev is not None else 0
        cpu_prev, t_prev = cpu, now
        if rss is not None:
            samples.append((t, rss))
        m = scrape_metrics(gw.port)
        conns = f"{m['gateway_connections']:.0f}" if m and "gateway_connections" in m else "-"
        ready = ("yes" if m["gateway_redis_ready"] else "no") if m and "gateway_redis_ready" in m else "-"
        say(f"{t:7.1f}  {rss / 1024 if rss else 0:7.1f}  {100 * share:5.0f}%  {conns:>5}  {ready:>5}")

    pub = pub_q.get(timeout=60)
    pp.join(10)
    restarts_done.wait(40)
    time.sleep(args.drain)  # the last trades are in flight

    stop_churn.set()
    churn = churn_q.get(timeout=60)
    cp.join(10)

    # With churn and stalled clients gone, the gauge should count the healthy ones.
    gauge = None
    if gw.alive() and scrape_metrics(gw.port) is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = scrape_metrics(gw.port) or {}
            gauge = m.get("gateway_connections")
            if gauge == args.clients:
                break
            time.sleep(0.2)
    metrics_end = scrape_metrics(gw.port) if gw.alive() else None

    stop_healthy.set()
    healthy = healthy_q.get(timeout=60)
    hp.join(10)

    alive_at_end = gw.alive()
    exit_code = gw.stop()
    log = gw.log_text()
    return report(args, samples, gw_died_at, alive_at_end, exit_code, log, pub, healthy, churn,
                  restarts, t0, gauge, metrics_end, gw.log_path)


def report(args, samples, gw_died_at, alive_at_end, exit_code, log, pub, healthy, churn,
           restarts, t0, gauge, metrics_end, log_path) -> int:
    D = args.duration
    failures: list[str] = []

    say("\n== RSS over time (MB) ==")
    for i in range(0, len(samples), 10):
        say("  " + "  ".join(f"{t:5.0f}s {kb / 1024:5.1f}" for t, kb in samples[i:i + 10]))

    say("\n== Redis restarts ==")
    for k, r in enumerate(restarts, 1):
        resub = (f"re-subscribed {r.resubscribed_at - r.up_at:.2f} s after restart"
                 if r.resubscribed_at else "NOT re-subscribed within 30 s")
        say(f"  #{k}: killed at t={r.kill_at - t0:.1f} s, up after {r.up_at - r.kill_at:.2f} s, "
            f"{resub}; /readyz while down: {r.readyz_down or 'not served'}, "
            f"after: {r.readyz_after or 'not served'}")
        if not r.resubscribed_at:
            failures.append(f"gateway did not re-subscribe after Redis restart #{k}")
    if len(restarts) < args.redis_restarts:
        failures.append(f"only {len(restarts)} of {args.redis_restarts} Redis restarts happened")

    cls = classify(pub, restarts, args.kill_grace)
    statuses = [s for arr in pub["status"] for s in arr]
    n_exp = sum(c.count(EXPECTED) for c in cls.values())
    n_risk = sum(c.count(AT_RISK) for c in cls.values())
    say("\n== Publisher ==")
    say(f"  published {pub['published']} trades: PUBLISH returned >=1 for "
        f"{sum(s >= 1 for s in statuses)}, 0 for {statuses.count(0)} (gateway not subscribed), "
        f"failed for {statuses.count(PUB_FAILED)} (Redis down or killed mid-pipeline)")
    say(f"  expected: {n_exp} trades (PUBLISH >= 1, not within {args.kill_grace:g} s before a "
        f"kill); at risk: {n_risk} (PUBLISH >= 1 from {args.kill_grace:g} s before a kill "
        f"until the restart)")

    rows = account(healthy["clients"], cls)
    say("\n== Healthy clients ==")
    if args.per_client != "none":
        show = rows if args.per_client == "all" else sorted(
            rows, key=lambda r: (-r["lost"], -r["ooo"], r["received"]))[:10]
        say(f"  {'client':<7}{'symbols':<14}{'expected':>9}{'received':>9}{'lost':>6}"
            f"{'at risk rcvd/lost':>19}{'gaps':>6}{'ooo':>5}  disconnected")
        for r in show:
            risk = f"{r['at_risk'] - r['at_risk_lost']}/{r['at_risk_lost']}"
            say(f"  c{r['index']:<6}{','.join(r['symbols']):<14}{r['expected']:>9}"
                f"{r['received']:>9}{r['lost']:>6}{risk:>19}"
                f"{r['gaps']:>6}{r['ooo']:>5}  {r['disconnected'] or 'no'}")
    tot = {k: sum(r[k] for r in rows) for k in ("expected", "received", "lost", "at_risk",
                                                "at_risk_lost", "gaps", "ooo")}
    recv = sorted(r["received"] for r in rows)
    say(f"  deliveries per client: min {recv[0]}, median {statistics.median(recv):.0f}, "
        f"max {recv[-1]}")
    say(f"  total: expected {tot['expected']}, received {tot['received']} "
        f"(includes at-risk and failed-PUBLISH trades that did arrive), lost {tot['lost']}, "
        f"at risk {tot['at_risk']} (lost {tot['at_risk_lost']}), gaps seen {tot['gaps']}, "
        f"out of order/duplicate {tot['ooo']}")
    lat = healthy["latency_ms"]
    worst = max((i for i, n in enumerate(lat) if n), default="-")
    say(f"  delivery latency: p50 {percentile_ms(lat, .5)} ms, p99 {percentile_ms(lat, .99)} ms, "
        f"p99.9 {percentile_ms(lat, .999)} ms, max bucket {worst} ms; "
        f"healthy-client process CPU {100 * healthy['cpu_share']:.0f}% of one core")
    if healthy["cpu_share"] > 0.85:
        say("  WARNING: the healthy-client process is near one core; it may be the bottleneck")
    for r in rows:
        for sym, a, b, n in r["lost_ranges"]:
            say(f"  LOST: c{r['index']} {sym} seq {a}..{b}: {n} expected trade(s)")
        if r["other"]:
            say(f"  c{r['index']} unexpected messages: {r['other'][:2]}")
    disconnected = [r for r in rows if r["disconnected"]]
    if tot["lost"]:
        failures.append(f"{tot['lost']} expected deliveries lost")
    if tot["ooo"]:
        failures.append(f"{tot['ooo']} deliveries out of order or duplicated")
    if disconnected:
        failures.append(f"{len(disconnected)} healthy client(s) disconnected, e.g. "
                        f"c{disconnected[0]['index']}: {disconnected[0]['disconnected']}")
    if any(r["gap_overflow"] for r in rows):
        failures.append("a client saw over 10000 gaps on one symbol")

    say("\n== Churn and stalled clients ==")
    cyc = churn["cycles"]
    total_cycles = sum(cyc.values())
    say(f"  churn cycles: {total_cycles} ({', '.join(f'{k} {v}' for k, v in sorted(cyc.items()))}); "
        f"errors: {sum(churn['errors'].values())} {churn['errors'] or ''}")
    for kind in ("silent", "pong-only"):
        st = churn["stalled"][kind]
        cut = st["cutoff_s"]
        say(f"  stalled clients, {kind}: opened {st['opened']}, cut off by the gateway "
            f"{st['cut_off']}"
            + (f" (after {min(cut):.1f}-{max(cut):.1f} s, median {statistics.median(cut):.1f} s)"
               if cut else "")
            + f", never cut off {st['stuck']}")
        if st["stuck"]:
            failures.append(f"{st['stuck']} {kind} stalled client(s) never cut off")
    if churn["stalled"]["open_errors"]:
        say(f"  stalled clients that failed to open: {churn['stalled']['open_errors']}")
    stats = last_stats(log)
    if stats:
        say(f"  gateway's final stats line: slow_consumers={stats.get('slow_consumers')} "
            f"heartbeat_timeouts={stats.get('heartbeat_timeouts')} "
            f"redis_reconnects={stats.get('redis_reconnects')} "
            f"redis_messages={stats.get('redis_messages')} frames_sent={stats.get('frames_sent')}")
    if metrics_end:
        keys = ("gateway_connections_accepted_total", "gateway_heartbeat_timeouts_total",
                'gateway_slow_consumers_total{action="disconnect"}',
                'gateway_slow_consumers_total{action="conflate"}', "gateway_redis_reconnects_total")
        say("  /metrics at the end: " + ", ".join(
            f"{k.replace('gateway_', '')}={metrics_end[k]:.0f}" for k in keys if k in metrics_end))
    if gauge is not None:
        say(f"  /metrics gateway_connections after churn stopped: {gauge:.0f} "
            f"(healthy clients: {args.clients})"
            + ("" if gauge == args.clients else "  <- does not match"))

    say("\n== Gateway process ==")
    tracebacks = log.count("Traceback (most recent call last)")
    say(f"  alive at the end: {alive_at_end}; exit code on SIGTERM: {exit_code}; "
        f"tracebacks in log: {tracebacks}; log: {log_path}")
    if gw_died_at is not None or not alive_at_end:
        failures.append("gateway died during the run")
    elif exit_code != 0:
        failures.append(f"gateway exit code on SIGTERM was {exit_code}")
    if tracebacks:
        failures.append(f"{tracebacks} traceback(s) in the gateway log")
        for block in log.split("Traceback (most recent call last)")[1:3]:
            say("  traceback:" + "\n    ".join(block.splitlines()[:12]))

    flat, f_kb, l_kb, rss_text = rss_verdict(samples, D, args.warmup, args.rss_pct, args.rss_mb)
    say(f"\n  RSS: {rss_text}")
    if not flat:
        failures.append(f"RSS not flat: {rss_text}")

    loss_text = (f"{tot['lost']} of {tot['expected']} expected deliveries lost, "
                 f"{tot['ooo']} out of order, {len(disconnected)} healthy disconnects "
                 f"(at risk: {tot['at_risk'] - tot['at_risk_lost']} delivered, "
                 f"{tot['at_risk_lost']} lost, not counted)")
    rss_short = (f"RSS {'flat' if flat else 'NOT flat'} "
                 f"({f_kb / 1024:.1f} -> {l_kb / 1024:.1f} MB)" if f_kb else "RSS unknown")
    return verdict(f"{rss_short}; {loss_text}", failures, args, log_path)


def verdict(headline: str, failures: list[str], args, log_path: Path) -> int:
    """Print the VERDICT line and each failure; on a pass remove the run's
    directory (the log's) unless --keep-logs. The exit status: 0 pass, 1 fail."""
    passed = not failures
    say(f"\nVERDICT: {'PASS' if passed else 'FAIL'}: {headline}")
    for f in failures:
        say(f"  FAIL: {f}")
    if passed and not args.keep_logs:
        with contextlib.suppress(OSError):
            shutil.rmtree(log_path.parent)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
