"""Redis behind Sentinel, with real processes: a master, a replica and three
sentinels (gateway._testbase.sentinel), the gateway on
``redis+sentinel://...``, a publisher through gateway.sentinel.redis_client
that retries on connection errors, and plain ``websockets`` clients.

What must hold through a failover (the master SIGKILLed, frozen, or moved
by SENTINEL FAILOVER): delivery resumes within 10 s; /readyz, polled
throughout, is never 200 while the gateway has no subscription on the
master the sentinels name (and is 200 again after); every client gets every
sequenced trade once, in order, or an exact gap / epoch change, and never a
different trade under an (epoch, seq) it already saw, even when the failover
lost writes the old master had acknowledged.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson
import pytest
import redis
from conftest import ROOT
from websockets.asyncio.client import connect as ws_connect

from gateway import sequencing
from gateway._testbase.net import HOST, try_http_get
from gateway._testbase.process import ONE_ADDRESS_ENV, GatewayProcess
from gateway._testbase.redis import command
from gateway._testbase.sentinel import SentinelCluster, sentinel_mode_available
from gateway.sentinel import redis_client

pytestmark = pytest.mark.slow

RESUME_WITHIN = 10.0


@pytest.fixture(scope="module")
def sentinel_ok():
    reason = sentinel_mode_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def cluster(sentinel_ok):
    with SentinelCluster() as rs:
        yield rs


@pytest.fixture
def gateway(cluster):
    gw = GatewayProcess(cluster.url, cwd=ROOT, die_with_parent=True, WS_CANDLE_INTERVALS="",
                        WS_STATS_INTERVAL=3600, **ONE_ADDRESS_ENV).start()
    try:
        gw.wait_ready(timeout=20)
        yield gw
    finally:
        gw.close()


def fresh(n: int) -> list[str]:
    return [f"F{k}{uuid.uuid4().hex[:8]}".upper() for k in range(n)]


# --- the publisher -----------------------------------------------------------------------

@dataclass
class Ack:
    t: float
    n: int
    symbol: str
    seq: int


class Publisher(threading.Thread):
    """Publishes trades {"symbol", "n", ...} through publish_trade on the
    master the sentinels name; a call that fails on the connection is
    retried (so a trade may go out twice, under two seqs: at least once)."""

    def __init__(self, url: str, symbols: list[str], interval: float = 0.01):
        super().__init__(daemon=True)
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        self.client = redis_client(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                   retry=Retry(NoBackoff(), 0))
        self.symbols = symbols
        self.interval = interval
        self.acks: list[Ack] = []
        self.errors: list[str] = []
        self.n = 0
        self.halt = threading.Event()
        self.paused = threading.Event()

    def publish(self, symbol: str, n: int) -> int | None:
        trade = {"symbol": symbol, "n": n, "price": 100 + n % 7, "volume": 1,
                 "timestamp": time.time_ns() // 1_000_000}
        while not self.halt.is_set():
            try:
                seq = sequencing.publish_trade(self.client, symbol, trade)
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
                self.errors.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue
            self.acks.append(Ack(time.monotonic(), n, symbol, seq))
            return seq
        return None

    def run(self) -> None:
        while not self.halt.is_set():
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            self.n += 1
            self.publish(self.symbols[self.n % len(self.symbols)], self.n)
            time.sleep(self.interval)

    def stop(self) -> None:
        self.halt.set()
        if self.ident is not None:
            self.join(10)
        self.client.close()


# --- readiness ---------------------------------------------------------------------------

class ReadyPoller(threading.Thread):
    """Polls /readyz every 50 ms; at each 200 after ``watch_from`` it checks
    that the master the sentinels name has the gateway's pattern
    subscription (PUBSUB NUMPAT: the sentinels subscribe to channels, never
    patterns), and records a violation when it has not."""

    def __init__(self, gw: GatewayProcess, rs: SentinelCluster):
        super().__init__(daemon=True)
        self.gw = gw
        self.rs = rs
        self.polls: list[tuple[float, int | None, str]] = []
        self.violations: list[str] = []
        self.watch_from: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t = time.monotonic()
            got = try_http_get(self.gw.port, "/readyz", timeout=1.0)
            status = got[0] if got else None
            reason = json.loads(got[1]).get("reason", "") if got else ""
            self.polls.append((t, status, reason))
            if status == 200 and self.watch_from is not None and t >= self.watch_from:
                try:
                    port = self.rs.master_port()
                    ok = (self.rs.role(port, timeout=0.3) == "master"
                          and int(command(port, "PUBSUB", "NUMPAT", timeout=0.3)) >= 1)
                except Exception as exc:   # a sentinel mid-switch: ask another time
                    ok, port = True, f"? ({exc})"
                if not ok:
                    self.violations.append(f"200 at {t:.3f} without a subscription on master {port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)

    def first_200_after(self, t0: float) -> float | None:
        return next((t for t, s, _ in self.polls if t > t0 and s == 200), None)

    def reasons_after(self, t0: float) -> set[str]:
        return {r for t, s, r in self.polls if t > t0 and s == 503}


# --- clients -----------------------------------------------------------------------------

@dataclass
class Client:
    messages: list[tuple[float, dict]] = field(default_factory=list)


async def run_client(port: int, symbols: list[str], out: Client, ready: asyncio.Event,
                     stop: asyncio.Event, since: dict | None = None) -> None:
    async with ws_connect(f"ws://{HOST}:{port}", max_size=None) as ws:
        orjson.loads(await ws.recv())                      # welcome
        req: dict = {"action": "subscribe", "symbols": symbols}
        if since:
            req["since"] = since
        await ws.send(orjson.dumps(req).decode())
        reply = orjson.loads(await ws.recv())
        assert reply["type"] == "success", reply
        ready.set()
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.2)
            except TimeoutError:
                continue
            out.messages.append((time.monotonic(), orjson.loads(raw)))


def follow(messages: list[tuple[float, dict]], symbol: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """What one client got for ``symbol``: (epoch, seq, n) per trade, and
    every break of "once, in order, or announced"."""
    got: list[tuple[str, int, int]] = []
    problems: list[str] = []
    epoch: str | None = None
    last: int | None = 0
    for _, m in messages:
        d = m.get("data") or {}
        if d.get("symbol") != symbol:
            continue
        if m["type"] == "gap":
            reason = d.get("reason")
            if reason == "epoch_changed":
                epoch, last = d["epoch"], d["to"]
            elif reason in ("trimmed", "unavailable"):
                if epoch is not None and d.get("epoch") not in (None, epoch):
                    problems.append(f"{reason} notice for epoch {d.get('epoch')} while in {epoch}")
                if last is not None and d["from"] != last + 1:
                    problems.append(f"{reason} notice from {d['from']} after seq {last}")
                last = d["to"] or None              # 0: the end is not known
            else:
                problems.append(f"unexpected gap notice {d}")
        elif m["type"] == "trade" and "seq" in m:
            e, s = m["epoch"], m["seq"]
            got.append((e, s, d["n"]))
            if epoch is None:
                epoch, last = e, s                  # the first trade: the baseline
            elif e != epoch:
                if s != 1:
                    problems.append(f"epoch {epoch} -> {e} at seq {s} without a notice")
                epoch, last = e, s
            elif last is None or s == last + 1:
                last = s
            elif s <= last:
                problems.append(f"({e}, {s}) again after {last}")
            else:
                problems.append(f"({e}) seqs {last + 1}..{s - 1} missing without a notice")
    return got, problems


def names_one_trade(observed: list[list[tuple[str, int, int]]]) -> list[str]:
    """Every (epoch, seq) seen with one n only, across all observers."""
    seen: dict[tuple[str, int], int] = {}
    bad = []
    for obs in observed:
        for e, s, n in obs:
            if seen.setdefault((e, s), n) != n:
                bad.append(f"({e}, {s}) named trade {seen[(e, s)]} and trade {n}")
    return bad


def history_of(rs: SentinelCluster, symbol: str) -> list[tuple[str, int, int]]:
    c = rs.master().client()
    try:
        h = sequencing.parse_history(c.fcall_ro("trade_history", 1, symbol, 0, 1_000_000))
    finally:
        c.close()
    return [(h.epoch or "", seq, orjson.loads(d)["n"]) for seq, d in h.entries]


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def received_ns(client: Client, symbol: str) -> set[int]:
    return {m["data"]["n"] for _, m in client.messages
            if m["type"] == "trade" and m["data"].get("symbol") == symbol}


# --- the scenarios ---------------------------------------------------------------------

async def failover_scenario(rs: SentinelCluster, gw: GatewayProcess, action, *, clients: int = 3,
                            known_at_once: bool = True, new_publisher: bool = False) -> dict:
    """Clients and a publisher run; ``action(rs, master port)`` (in a thread)
    starts the failover; then the checks common to every scenario. Returns
    what the caller may check further.

    ``known_at_once``: the gateway can tell at once that the master is gone
    (its connection closes), so from then on a 200 from /readyz must mean a
    subscription on the master the sentinels name. A frozen master closes
    nothing: no one can tell it from a slow one until the sentinels hold it
    down; readiness is checked from the switch on.

    ``new_publisher``: after the switch a new publisher (asking the sentinels
    afresh) takes over from the first, which may still be writing to the old
    master: a healthy master moved by SENTINEL FAILOVER keeps taking writes
    until the sentinels turn it into a replica (some seconds later), and those
    writes are lost. Only the new publisher's trades must arrive."""
    symbols = fresh(2)
    pub = Publisher(rs.url, symbols)
    first = pub
    poller = ReadyPoller(gw, rs)
    stop = asyncio.Event()
    outs = [Client() for _ in range(clients)]
    readies = [asyncio.Event() for _ in outs]
    tasks = [asyncio.create_task(run_client(gw.port, symbols, o, r, stop))
             for o, r in zip(outs, readies, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 10)
        poller.start()
        pub.start()
        await asyncio.sleep(1.5)
        old = rs.master_port()
        t_action = time.monotonic()
        if known_at_once:
            poller.watch_from = t_action + 0.1
        await asyncio.to_thread(action, rs, old)
        new = await asyncio.to_thread(rs.wait_failover, old)
        t_failover = time.monotonic()
        if not known_at_once:
            poller.watch_from = t_failover
        if new_publisher:
            first.halt.set()
            pub = Publisher(rs.url, symbols)
            pub.n = 1_000_000
            pub.start()
        # Delivery resumes: a trade published after the failover reaches everyone.
        await wait_for(lambda: any(a.t > t_failover for a in pub.acks), RESUME_WITHIN, "a publish")
        after = next(a for a in pub.acks if a.t > t_failover)
        await wait_for(lambda: all(after.n in received_ns(o, after.symbol) for o in outs),
                       RESUME_WITHIN - (time.monotonic() - t_action) + 2, "delivery to resume")
        t_resumed = time.monotonic()
        await asyncio.sleep(1.5)
        first.stop()
        pub.stop()
        final = pub.acks[-1]
        await wait_for(lambda: all(final.n in received_ns(o, final.symbol) for o in outs), 10,
                       "the last trade")
        await asyncio.sleep(0.3)
        poller.stop()
    finally:
        first.halt.set()
        pub.halt.set()
        poller.halt.set()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    observed = []
    for k, o in enumerate(outs):
        for s in symbols:
            got, problems = follow(o.messages, s)
            assert not problems, f"client {k} {s}: {problems}"
            observed.append(got)
    history = [history_of(rs, s) for s in symbols]
    assert not names_one_trade(observed + history)
    # Every trade acknowledged well before the failover, and every one after
    # the gateway was back, reached every client.
    must = [a for a in first.acks if a.t < t_action - 0.5]
    must += [a for a in pub.acks if a.t > t_resumed or (pub is not first and a.t > t_failover)]
    for a in must:
        for k, o in enumerate(outs):
            assert a.n in received_ns(o, a.symbol), f"client {k} lacks trade {a.n} ({a})"
    assert t_resumed - t_action < RESUME_WITHIN + 2, f"resumed after {t_resumed - t_action:.1f} s"
    assert not poller.violations, poller.violations
    back = poller.first_200_after(t_action)
    assert back is not None, "never ready again"
    assert poller.polls[-1][1] == 200
    return dict(old=old, new=new, outs=outs, symbols=symbols, pub=pub, poller=poller,
                t_action=t_action, history=history)


def kill(rs: SentinelCluster, port: int) -> None:
    rs.servers[port].kill()


def test_master_killed_while_publishing(cluster, gateway):
    r = asyncio.run(failover_scenario(cluster, gateway, kill))
    reasons = r["poller"].reasons_after(r["t_action"])
    assert reasons, "readyz never said why it was not ready"
    assert all("failover" in x or "no master" in x or "cannot connect" in x for x in reasons), reasons
    # The new master made a new epoch: every client was told (a notice or seq 1 of it).
    new_epoch = r["history"][0][0][0]
    for o in r["outs"]:
        assert any(m["type"] == "trade" and m.get("epoch") == new_epoch for _, m in o.messages)
    assert gateway.stop() == 0 and not gateway.tracebacks()


def test_frozen_master_is_left_on_switch_master(cluster, gateway):
    """SIGSTOP keeps the gateway's TCP connection to the old master open and
    silent: without the sentinels' +switch-master it would wait for its
    keepalive (30 s) to notice."""
    def freeze(rs, port):
        rs.freeze(port)
    try:
        r = asyncio.run(failover_scenario(cluster, gateway, freeze, known_at_once=False))
    finally:
        for port, server in cluster.servers.items():
            if server.proc is not None:
                cluster.thaw(port)
    log = gateway.log_text()
    assert "the sentinels moved the master" in log, log[-3000:]
    reasons = r["poller"].reasons_after(r["t_action"])
    assert any("failover" in x for x in reasons), reasons
    assert gateway.stop() == 0 and not gateway.tracebacks()


def test_sentinel_failover_command_moves_the_gateway(cluster, gateway):
    """SENTINEL FAILOVER on a healthy master: the sentinels promote the
    replica and announce it; the old master goes on answering as a master
    for some seconds (until they turn it into a replica). The gateway leaves
    it on the announcement, not when the old master is reconfigured."""
    def failover(rs, port):
        rs.failover()
    asyncio.run(failover_scenario(cluster, gateway, failover, known_at_once=False,
                                  new_publisher=True))
    assert "the sentinels moved the master" in gateway.log_text()
    assert gateway.stop() == 0 and not gateway.tracebacks()


def test_lost_writes_never_reuse_an_epoch_and_seq(cluster, gateway):
    """Writes the old master acknowledged that never reached the replica (cut
    off first) are lost in the failover. Clients saw them; the new master must
    not number other trades with their (epoch, seq): its trades come in a new
    epoch, announced."""
    async def run():
        rs = cluster
        symbol = fresh(1)[0]
        out, late = Client(), Client()
        pub = Publisher(rs.url, [symbol])
        stop = asyncio.Event()
        ready = asyncio.Event()
        task = asyncio.create_task(run_client(gateway.port, [symbol], out, ready, stop))
        await asyncio.wait_for(ready.wait(), 10)
        old = rs.master_port()
        replica = next(p for p in rs.servers if p != old)
        for n in range(1, 21):
            pub.publish(symbol, n)
        master = rs.servers[old].client()
        assert master.wait(1, 5000) == 1
        # Cut the replica off for good: it cannot AUTH back in.
        r = rs.servers[replica].client()
        r.config_set("masteruser", "nobody-here")
        r.config_set("masterauth", "wrong")
        r.execute_command("CLIENT", "KILL", "TYPE", "master")
        for n in range(21, 31):                          # acknowledged, never replicated
            pub.publish(symbol, n)
        await wait_for(lambda: 30 in received_ns(out, symbol), 5, "trades 21..30 live")
        seen_before = follow(out.messages, symbol)[0]
        epoch1 = seen_before[0][0]
        assert [s for e, s, n in seen_before] == list(range(1, 31))
        await asyncio.to_thread(rs.servers[old].kill)
        master.close()
        new = await asyncio.to_thread(rs.wait_failover, old)
        assert new == replica
        r.config_set("masteruser", "")
        r.config_set("masterauth", "")
        r.close()
        for n in range(31, 51):
            assert pub.publish(symbol, n) is not None
        await wait_for(lambda: 50 in received_ns(out, symbol), RESUME_WITHIN, "trades 31..50")
        # A client that comes later and resumes from (epoch1, 30) is told too.
        late_ready = asyncio.Event()
        late_task = asyncio.create_task(run_client(
            gateway.port, [symbol], late, late_ready, stop, since={symbol: {"epoch": epoch1, "seq": 30}}))
        await asyncio.wait_for(late_ready.wait(), 10)
        await wait_for(lambda: 50 in received_ns(late, symbol), 5, "the late client's replay")
        stop.set()
        await asyncio.gather(task, late_task, return_exceptions=True)
        pub.stop()
        return out, late, symbol, epoch1

    out, late, symbol, epoch1 = asyncio.run(run())
    got, problems = follow(out.messages, symbol)
    assert not problems, problems
    history = history_of(cluster, symbol)
    epoch2 = history[0][0]
    assert epoch2 != epoch1
    assert [(s, n) for e, s, n in history] == [(k, 30 + k) for k in range(1, 21)]
    late_got, late_problems = follow(late.messages, symbol)
    assert not late_problems, late_problems
    notice = next(m for _, m in late.messages if m["type"] == "gap")
    assert notice["data"]["reason"] == "epoch_changed" and notice["data"]["epoch"] == epoch2
    assert [(e, s, n) for e, s, n in late_got] == history
    assert not names_one_trade([got, late_got, history])
    assert [n for e, s, n in got] == list(range(1, 51))
    assert gateway.stop() == 0 and not gateway.tracebacks()


def test_candle_service_follows_the_master(cluster):
    """The candle service behind Sentinel: it leads on the master, and after
    the master is killed it leads again on the new one (taking over from
    what that one holds) and publishes candles there."""
    from gateway._testbase.process import CandleProcess
    svc = CandleProcess(cluster.url, cwd=ROOT, die_with_parent=True, WS_CANDLE_INTERVALS="1s",
                        WS_CANDLE_LEASE="1", WS_CANDLE_GRACE="0.2").start()
    try:
        svc.wait_role("leader", timeout=20)
        symbol = fresh(1)[0]
        pub = Publisher(cluster.url, [symbol])
        sequencing.load_library(pub.client)      # no gateway here to load it
        for n in range(1, 6):
            pub.publish(symbol, n)
        old = cluster.master_port()
        cluster.servers[old].kill()
        new = cluster.wait_failover(old)
        sub = cluster.servers[new].client().pubsub()
        sub.subscribe(f"channel:candle:1s:{symbol}")
        deadline = time.monotonic() + RESUME_WITHIN
        got = None
        n = 5
        while got is None and time.monotonic() < deadline:
            n += 1
            pub.publish(symbol, n)
            msg = sub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                got = orjson.loads(msg["data"])
        assert got is not None, svc.log_tail()
        assert got["data"]["symbol"] == symbol
        svc._wait(lambda: svc.role() == "leader" and try_http_get(svc.port, "/readyz")[0] == 200,
                  10, "leading again")
        sub.close()
        pub.stop()
        assert svc.stop() == 0 and not svc.tracebacks(), svc.log_tail()
    finally:
        svc.close()
