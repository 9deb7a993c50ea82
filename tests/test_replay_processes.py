"""Sequence numbers, resume and gap fill against real processes: ``python -m
gateway`` (GatewayProcess), redis-server instances started here, WebSocket
clients of the ``websockets`` library, trades published with
``gateway.sequencing.publish_trade`` through redis-py.

What test_replay.py checks in process, this checks across process deaths and
restarts: a gateway SIGKILLed under a client that moves to another instance,
a Redis restarted without persistence, many clients resuming while trades are
published at full speed, and the gateway refilling its own stream after its
Redis subscription is killed. Every stream is checked seq by seq.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time

import orjson
import pytest
import redis
from conftest import fresh_symbols, needs_redis_server, wait_for
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from gateway._testbase.net import readyz, scrape_metrics
from gateway._testbase.process import GatewayProcess
from gateway.config import Config
from gateway.sequencing import LIBRARY_NAME, load_library, meta_key, publish_trade

pytestmark = needs_redis_server

RECV_TIMEOUT = 10.0
# The gateway's pattern subscriptions: trades, and candles (on by default).
PATTERNS = 2 if Config().candle_intervals else 1




def metric(gw: GatewayProcess, name: str) -> float:
    m = scrape_metrics(gw.port)
    assert m is not None, "no /metrics"
    return m.get(name, 0.0)


def epoch_of(r: redis.Redis, symbol: str) -> str:
    value = r.hget(meta_key(symbol), "epoch")
    assert value is not None, f"no history for {symbol}"
    return value.decode()


def library_loaded(r: redis.Redis) -> bool:
    try:
        return bool(r.function_list(library=LIBRARY_NAME))
    except redis.RedisError:
        return False


# -- a client's stream, checked seq by seq -------------------------------------

class HistoryUnavailable(AssertionError):
    """The gateway answered a resume with an ``unavailable`` gap."""


class Streams:
    """Where one client's stream of each symbol stands. Every trade must be
    the next seq of the expected epoch: a duplicate, a hole, a reorder or an
    unexpected gap notice fails at once, naming the frame."""

    def __init__(self, positions: dict[str, tuple[str | None, int]]):
        self.pos = dict(positions)       # symbol -> (epoch, last seq received)
        self.count = 0

    def since(self) -> dict[str, dict]:
        return {s: {"epoch": e, "seq": q} for s, (e, q) in self.pos.items() if e is not None}

    def take(self, msg: dict, where: str = "") -> None:
        if msg.get("type") == "gap" and msg["data"].get("reason") == "unavailable":
            raise HistoryUnavailable(f"{where}: {msg}")
        assert msg.get("type") == "trade", f"{where}: expected a trade, got {msg}"
        sym = msg["data"]["symbol"]
        assert sym in self.pos, f"{where}: trade of a symbol not subscribed: {msg}"
        epoch, last = self.pos[sym]
        assert "seq" in msg and "epoch" in msg, f"{where}: unsequenced trade {msg}"
        if epoch is not None:
            assert msg["epoch"] == epoch, f"{where}: {sym} epoch {msg['epoch']}, expected {epoch}"
        assert msg["seq"] == last + 1, (
            f"{where}: {sym} got seq {msg['seq']} after {last} "
            f"({'duplicate' if msg['seq'] <= last else 'hole'})")
        assert msg["data"]["n"] == msg["seq"], f"{where}: {sym} seq {msg['seq']} carries {msg['data']}"
        self.pos[sym] = (msg["epoch"], msg["seq"])
        self.count += 1

    def at(self, finals: dict[str, int]) -> bool:
        return all(self.pos[s][1] >= q for s, q in finals.items())


async def recv(ws, timeout: float = RECV_TIMEOUT) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def open_client(url: str):
    ws = await ws_connect(url, compression=None, open_timeout=10, max_queue=None)
    welcome = await recv(ws)
    assert welcome["type"] == "success" and "connectionId" in welcome["data"], welcome
    return ws


async def subscribe(ws, symbols: list[str], **extra) -> dict:
    await ws.send(orjson.dumps({"action": "subscribe", "symbols": symbols, **extra}).decode())
    reply = await recv(ws)
    assert reply["type"] == "success" and reply["data"]["subscribed"] == symbols, (
        f"the subscribe reply must come first, got {reply}")
    return reply


async def read_until(ws, streams: Streams, finals: dict[str, int], timeout: float,
                     where: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not streams.at(finals):
        left = deadline - time.monotonic()
        assert left > 0, f"{where}: stuck at {streams.pos}, expected {finals}"
        streams.take(await recv(ws, left), where)


async def assert_quiet(ws, seconds: float = 0.3) -> None:
    """Nothing more arrives (no duplicate after the last seq)."""
    with contextlib.suppress(TimeoutError):
        msg = await asyncio.wait_for(ws.recv(), seconds)
        raise AssertionError(f"unexpected frame after the end: {msg}")


class Publisher(threading.Thread):
    """Publishes sequenced trades ``{"symbol": S, "n": seq}`` round-robin over
    ``symbols`` with a pause between them, until stop(). ``last`` holds the
    last seq Redis returned per symbol."""

    def __init__(self, client: redis.Redis, symbols: list[str], pause: float):
        super().__init__(daemon=True)
        self.r, self.symbols, self.pause = client, symbols, pause
        self.last = {s: int(client.hget(meta_key(s), "seq") or 0) for s in symbols}
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for s in self.symbols:
                    n = self.last[s] + 1
                    seq = publish_trade(self.r, s, {"symbol": s, "n": n, "price": 1.0})
                    assert seq == n, f"publish_trade gave {seq}, expected {n}"
                    self.last[s] = seq
                self._halt.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join(10)
        assert not self.is_alive(), "publisher did not stop"
        if self.error is not None:
            raise self.error
        return dict(self.last)


def publish(r: redis.Redis, symbol: str, count: int) -> list[int]:
    """``count`` sequenced trades of ``symbol`` in one pipeline, each carrying
    its seq as ``n`` (the seq is read first: nobody else publishes it)."""
    start = int(r.hget(meta_key(symbol), "seq") or 0)
    pipe = r.pipeline(transaction=False)
    for k in range(count):
        publish_trade(pipe, symbol, {"symbol": symbol, "n": start + k + 1, "price": 1.0})
    seqs = pipe.execute()
    assert seqs == list(range(start + 1, start + count + 1)), seqs
    return seqs


# -- 1. resume across a gateway kill -9 -------------------------------------------

@pytest.mark.slow
def test_resume_on_another_instance_after_kill_9(redis_server, gateways):
    syms = fresh_symbols(2)
    gw_a = gateways(redis_server.url)
    gw_b = gateways(redis_server.url)
    r = redis_server.client()

    async def main():
        streams = Streams({s: (None, 0) for s in syms})
        ws = await open_client(gw_a.url)
        await subscribe(ws, syms)
        for s in syms:                    # the histories (and their epochs) start now
            publish(r, s, 1)
        epochs = {s: epoch_of(r, s) for s in syms}
        pub = Publisher(redis_server.client(), syms, pause=0.002)
        pub.start()
        try:
            await read_until(ws, streams, {s: 30 for s in syms}, 10, "on A")
            assert all(streams.pos[s][0] == epochs[s] for s in syms)
            gw_a.send_signal(signal.SIGKILL)
            assert gw_a.wait(10) == -signal.SIGKILL
            # What A wrote before dying and the client has not read yet.
            with contextlib.suppress(ConnectionClosed):
                while True:
                    streams.take(await recv(ws, 5), "draining A")
            await asyncio.sleep(0.3)                   # trades go on meanwhile
            published_before = dict(pub.last)
            assert all(published_before[s] > streams.pos[s][1] for s in syms), (
                published_before, streams.pos)
            ws_b = await open_client(gw_b.url)
            await subscribe(ws_b, syms, since=streams.since())   # reply first, then the rest
            await asyncio.sleep(0.5)                   # live trades on B during and after the replay
        finally:
            finals = pub.stop()
        await read_until(ws_b, streams, finals, 15, "on B")
        await assert_quiet(ws_b)
        assert all(streams.pos[s] == (epochs[s], finals[s]) for s in syms)
        await ws_b.close()

    asyncio.run(main())
    assert metric(gw_b, "gateway_replays_total") >= 1
    assert metric(gw_b, "gateway_replayed_frames_total") >= 1
    assert not gw_b.tracebacks()


# -- 2. Redis restarted without persistence ------------------------------------------

def test_resume_with_the_old_epoch_after_redis_restart(own_redis, gateways):
    own_redis.start()
    sym = fresh_symbols(1)[0]
    gw = gateways(own_redis.url)

    async def main():
        r = own_redis.client()
        ws = await open_client(gw.url)
        await subscribe(ws, [sym])
        publish(r, sym, 5)
        old = epoch_of(r, sym)
        streams = Streams({sym: (old, 0)})
        await read_until(ws, streams, {sym: 5}, 10, "before the restart")
        await ws.close()

        own_redis.kill()
        own_redis.start()                       # same port, nothing kept
        r = own_redis.client()
        # The gateway reconnects by itself and loads the library again.
        wait_for(lambda: metric(gw, "gateway_redis_reconnects_total") >= 1
                 and readyz(gw.port) == 200, 20, "reconnected")
        wait_for(lambda: library_loaded(r), 10, "library reloaded by the gateway")
        publish(r, sym, 3)
        new = epoch_of(r, sym)
        assert new != old

        ws = await open_client(gw.url)
        await subscribe(ws, [sym], since={sym: {"epoch": old, "seq": 5}})
        gap = await recv(ws)
        assert gap["type"] == "gap", gap
        assert gap["data"] == {"symbol": sym, "epoch": new, "from": 1, "to": 0,
                               "reason": "epoch_changed"}, gap
        streams = Streams({sym: (new, 0)})
        await read_until(ws, streams, {sym: 3}, 10, "retained of the new epoch")
        publish(r, sym, 2)                           # then live
        await read_until(ws, streams, {sym: 5}, 10, "live in the new epoch")
        await assert_quiet(ws)
        await ws.close()

    asyncio.run(main())
    assert not gw.tracebacks()


@pytest.mark.slow
def test_live_client_gets_the_new_epoch_from_seq_1_after_redis_restart(own_redis, gateways):
    """A deployment loads the library itself (ws-gateway-functions load) and
    publishes as soon as Redis is back, before the gateway's subscription is:
    the gateway must deliver those trades from the history (or announce them)."""
    own_redis.start()
    sym = fresh_symbols(1)[0]
    gw = gateways(own_redis.url)

    async def main():
        r = own_redis.client()
        ws = await open_client(gw.url)
        await subscribe(ws, [sym])
        publish(r, sym, 5)
        old = epoch_of(r, sym)
        streams = Streams({sym: (old, 0)})
        await read_until(ws, streams, {sym: 5}, 10, "before the restart")

        own_redis.kill()
        time.sleep(1.5)              # the gateway is now backing off (0.1, 0.2, 0.4, 0.8 s, ...)
        own_redis.start()
        r = own_redis.client()
        load_library(r)
        publish(r, sym, 3)           # a few ms after the start: before the gateway is back
        if own_redis.numpat() != 0:
            pytest.skip("the gateway resubscribed before the trades went out (timing)")
        new = epoch_of(r, sym)
        wait_for(lambda: own_redis.numpat() == PATTERNS and readyz(gw.port) == 200, 20, "resubscribed")
        time.sleep(0.5)              # its refill has run
        publish(r, sym, 2)

        got, notices = [], []
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            try:
                msg = await recv(ws, deadline - time.monotonic())
            except TimeoutError:
                break
            if msg["type"] == "gap":
                notices.append(msg["data"])
            else:
                got.append((msg["epoch"], msg["seq"]))
        assert got == [(new, k) for k in range(1, 6)], f"new epoch {new}: got {got}, notices {notices}"
        assert all(n["reason"] == "epoch_changed" for n in notices), notices
        await ws.close()

    asyncio.run(main())


# -- 3. many resumes while publishing at full speed -------------------------------------

N_SYMBOLS = 5
PER_SYMBOL = 1000          # 5,000 sequenced trades in all
N_CLIENTS = 100
SYMS_PER_CLIENT = 3
MIN_ROUNDS = 5


@pytest.mark.slow
def test_resume_storm_while_publishing_at_full_speed(own_redis, gateways):
    own_redis.start()
    syms = fresh_symbols(N_SYMBOLS)
    gw = gateways(own_redis.url)
    r = own_redis.client()
    for s in syms:
        publish(r, s, 1)                     # epochs exist: clients resume from seq 0
    epochs = {s: epoch_of(r, s) for s in syms}
    finals = {s: 1 + PER_SYMBOL for s in syms}
    done = threading.Event()
    pub_error: list[BaseException] = []
    pub_time: list[float] = []

    def publisher():
        try:
            pipe_r = own_redis.client()
            t0 = time.monotonic()
            counts = dict.fromkeys(syms, 1)
            for _ in range(PER_SYMBOL // 10):
                pipe = pipe_r.pipeline(transaction=False)
                for s in syms:
                    for _ in range(10):
                        counts[s] += 1
                        publish_trade(pipe, s, {"symbol": s, "n": counts[s], "price": 1.0})
                pipe.execute()
            pub_time.append(time.monotonic() - t0)
        except BaseException as exc:
            pub_error.append(exc)
        finally:
            done.set()

    stats = {"rounds": 0, "during": 0, "aborts": 0}

    async def client(i: int, start: asyncio.Event) -> Streams:
        rnd = random.Random(i)
        mine = [syms[(i + k) % N_SYMBOLS] for k in range(SYMS_PER_CLIENT)]
        streams = Streams({s: (epochs[s], 0) for s in mine})
        await asyncio.sleep(rnd.uniform(0, 0.2))
        start.set()
        rounds = 0
        while rounds < MIN_ROUNDS or not done.is_set():
            where = f"client {i} round {rounds}"
            if not done.is_set():
                stats["during"] += 1
            ws = await open_client(gw.url)
            await subscribe(ws, mine, since=streams.since())
            deadline = time.monotonic() + rnd.uniform(0.005, 0.1)
            with contextlib.suppress(TimeoutError):
                while (left := deadline - time.monotonic()) > 0:
                    streams.take(await recv(ws, left), where)
            if rnd.random() < 0.5:
                ws.transport.abort()          # gone without a close handshake
                stats["aborts"] += 1
            else:
                await ws.close()
            rounds += 1
            stats["rounds"] += 1
            await asyncio.sleep(rnd.uniform(0, 0.05))
        ws = await open_client(gw.url)
        await subscribe(ws, mine, since=streams.since())
        await read_until(ws, streams, {s: finals[s] for s in mine}, 30, f"client {i} final")
        await assert_quiet(ws, 0.2)
        await ws.close()
        return streams

    async def main():
        started = [asyncio.Event() for _ in range(N_CLIENTS)]
        tasks = [asyncio.create_task(client(i, started[i])) for i in range(N_CLIENTS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), 50)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            thread.join(10)

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert not pub_error, pub_error
    for streams in results:
        for s, (epoch, seq) in streams.pos.items():
            assert (epoch, seq) == (epochs[s], finals[s])
    replays = metric(gw, "gateway_replays_total")
    print(f"\n{N_CLIENTS} clients, {stats['rounds']} rounds ({stats['during']} begun while "
          f"publishing, {stats['aborts']} aborted), {N_SYMBOLS * PER_SYMBOL} trades published in "
          f"{pub_time[0] if pub_time else float('nan'):.2f} s, {replays:.0f} replays, "
          f"{sum(s.count for s in results)} trades checked, {elapsed:.1f} s")
    assert stats["during"] >= N_CLIENTS, stats            # the replays overlapped the publishing
    assert replays >= N_CLIENTS * (MIN_ROUNDS + 1)
    assert not gw.tracebacks()


# -- 3b. more history reads asked for at once than a Redis connection pool holds ------

@pytest.mark.slow
def test_resumes_beyond_100_history_reads_in_flight(own_redis, gateways):
    """Clients resume 5 symbols each while Redis holds every command for a
    moment (CLIENT PAUSE, as a busy Redis would): each symbol's read is
    distinct, so n_clients * 5 reads are in flight at once. Every resume
    must still deliver seq 1 of each symbol, with no gap notice. (Before the
    gateway bounded its reads, more than 100 at once exhausted redis-py's pool
    and were answered with "unavailable" gaps while Redis was up.)"""
    n_clients = 40                                 # 200 distinct reads asked for at once
    own_redis.start()
    syms = fresh_symbols(5 * n_clients)
    gw = gateways(own_redis.url)
    r = own_redis.client()
    pipe = r.pipeline(transaction=False)
    for s in syms:
        publish_trade(pipe, s, {"symbol": s, "n": 1, "price": 1.0})
    assert pipe.execute() == [1] * len(syms)
    epochs = {s: epoch_of(r, s) for s in syms}

    async def main():
        clients = [await open_client(gw.url) for _ in range(n_clients)]
        mine = [syms[5 * i:5 * i + 5] for i in range(n_clients)]
        r.client_pause(1500, all=True)
        try:
            for ws, ss in zip(clients, mine, strict=True):
                await ws.send(orjson.dumps({"action": "subscribe", "symbols": ss, "since": {
                    s: {"epoch": epochs[s], "seq": 0} for s in ss}}).decode())
            for k, (ws, ss) in enumerate(zip(clients, mine, strict=True)):
                reply = await recv(ws)
                assert reply["type"] == "success" and reply["data"]["subscribed"] == ss, reply
                streams = Streams({s: (epochs[s], 0) for s in ss})
                await read_until(ws, streams, dict.fromkeys(ss, 1), 10, f"client {k}")
                await assert_quiet(ws, 0.1)
        finally:
            with contextlib.suppress(redis.RedisError):
                r.client_unpause()
            for ws in clients:
                await ws.close()

    asyncio.run(main())


# -- 4. the gateway's own gap fill after CLIENT KILL TYPE pubsub -------------------------

@pytest.mark.slow
def test_gateway_refills_after_its_subscription_is_killed(own_redis, gateways):
    own_redis.start()
    syms = fresh_symbols(2)
    gw = gateways(own_redis.url)
    r = own_redis.client()
    admin = own_redis.client()
    rnd = random.Random(4)

    async def main():
        ws = await open_client(gw.url)
        await subscribe(ws, syms)
        streams = Streams({s: (None, 0) for s in syms})
        killed_total = 0
        for round_ in range(5):
            wait_for(lambda: own_redis.numpat() == PATTERNS and readyz(gw.port) == 200, 15,
                     f"subscribed again before round {round_}")
            reconnects = metric(gw, "gateway_redis_reconnects_total")
            result: dict[str, object] = {}

            def burst(result=result):
                try:
                    for s in syms:
                        publish(r, s, rnd.randint(1, 100))             # delivered live
                    killed = admin.client_kill_filter(_type="pubsub")
                    result["killed"] = killed
                    for s in syms:
                        publish(r, s, rnd.randint(50, 300))            # while the gateway is away
                    time.sleep(rnd.uniform(0, 0.3))
                    for s in syms:
                        publish(r, s, rnd.randint(1, 100))             # around its return
                except BaseException as exc:
                    result["error"] = exc

            thread = threading.Thread(target=burst, daemon=True)
            thread.start()
            await asyncio.to_thread(thread.join, 15)
            assert "error" not in result, result.get("error")
            assert result["killed"] == 1, result
            killed_total += 1
            finals = {s: int(r.hget(meta_key(s), "seq")) for s in syms}
            await read_until(ws, streams, finals, 15, f"round {round_}")
            await assert_quiet(ws, 0.2)
            wait_for(lambda n=reconnects: metric(gw, "gateway_redis_reconnects_total") > n, 10,
                     "reconnect counted")
        await ws.close()
        return killed_total

    assert asyncio.run(main()) == 5
    assert metric(gw, "gateway_gap_fills_total") >= 5
    assert not gw.tracebacks()
