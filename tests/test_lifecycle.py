"""Connections, Redis and the process over time: heartbeat, churn, slow
consumers, Redis going away, signals, configuration and stats."""
from __future__ import annotations

import asyncio
import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import time

import orjson
import pytest
import websockets
from conftest import ROOT, gateway_env, running_gateway, wait_until

from gateway._testbase import ws as wire


async def client(port, symbols=(), **kwargs):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}", **kwargs)
    await ws.recv()
    if symbols:
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": list(symbols)}).decode())
        assert orjson.loads(await ws.recv())["type"] == "success"
    return ws


async def raw_client(port, rcvbuf: int | None = None) -> wire.RawSocket:
    """A WebSocket client that does only what the test tells it (here: nothing)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(wire.connect, port, rcvbuf=rcvbuf))


# -- heartbeat ---------------------------------------------------------------

@pytest.mark.heavy
def test_heartbeat_keeps_answering_clients_drops_silent_ones(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, heartbeat_interval=0.2) as gw:
            # websockets answers pings by itself; its own keepalive is off so
            # only the gateway's pings are in play.
            good = await client(gw.port, ["HB"], ping_interval=None)
            silent = await raw_client(gw.port)
            silent.send_text(b'{"action":"subscribe","symbols":["HB"]}')
            await wait_until(lambda: gw.table.subscription_count == 2)
            await wait_until(lambda: len(gw.sessions) == 1, timeout=3)
            assert gw.counters.heartbeat_timeouts == 1
            assert gw.table.subscribers("HB") and gw.table.subscription_count == 1
            await asyncio.sleep(0.6)  # three more heartbeats
            assert len(gw.sessions) == 1
            await good.send('{"action":"ping"}')
            assert orjson.loads(await good.recv())["type"] == "pong"
            # The silent one saw pings, then the connection end.
            silent.sock.settimeout(2)
            data = silent.read_all()
            assert b"\x89" in data  # a ping frame reached it
            silent.close()
            await good.close()
    aio(main())


@pytest.mark.heavy
@pytest.mark.slow      # ~1 s of heartbeat rounds; the quick tier keeps the heartbeat test
def test_heartbeat_spreads_pings_over_the_interval(aio, impl, monkeypatch, redis_server):
    """Each connection is pinged once per interval, never sooner, and the
    connections are pinged a slice at a time, not all in one burst."""
    from gateway import session as session_module
    calls: list[tuple[object, float]] = []
    real = session_module.Session.heartbeat

    def recording(self, interval):
        calls.append((self, time.monotonic()))
        real(self, interval)
    monkeypatch.setattr(session_module.Session, "heartbeat", recording)
    interval = 0.32

    async def main():
        async with running_gateway(impl, redis_server.url, heartbeat_interval=interval) as gw:
            clients = [await client(gw.port, ping_interval=None) for _ in range(32)]
            await asyncio.sleep(3 * interval)
            assert len(gw.sessions) == 32 and gw.counters.heartbeat_timeouts == 0
            for ws in clients:
                await ws.close()
    aio(main())
    by_session: dict[object, list[float]] = {}
    for s, t in calls:
        by_session.setdefault(s, []).append(t)
    assert len(by_session) == 32
    for times in by_session.values():
        assert all(b - a >= interval * 0.95 for a, b in itertools.pairwise(times)), times
    # 32 connections made one after another fall in 32 slices: no two are
    # pinged in the same tick, so one round is spread over the interval.
    first_round = sorted(times[0] for times in by_session.values())
    assert first_round[-1] - first_round[0] >= interval / 2, first_round


# -- churn ---------------------------------------------------------------------

@pytest.mark.heavy
@pytest.mark.slow
def test_connect_subscribe_disconnect_churn_leaves_table_empty(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_connections_per_ip=0) as gw:
            async def cycle(i):
                ws = await client(gw.port, [f"C{i % 37}", f"C{(i * 7) % 37}", "ALL"])
                if i % 3 == 0:
                    await ws.close()
                else:  # vanish without a close handshake
                    ws.transport.abort()
            for start in range(0, 2000, 50):
                await asyncio.gather(*(cycle(i) for i in range(start, start + 50)))
            await wait_until(lambda: not gw.sessions and gw.table.subscription_count == 0, 10)
            assert len(gw.table) == 0 and gw.table.symbols() == []
            assert gw.counters.connections_total == 2000
    aio(main(), timeout=180)


# -- slow consumers ------------------------------------------------------------

@pytest.mark.heavy
def test_slow_consumer_is_disconnected_others_unaffected(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_buffered_bytes=256 * 1024) as gw:
            await wait_until(lambda: gw.redis.ready)
            loop = asyncio.get_running_loop()
            stalled = await raw_client(gw.port, 4096)
            stalled.send_text(b'{"action":"subscribe","symbols":["FLOOD"]}')
            healthy = await client(gw.port, ["FLOOD"], max_queue=None)
            await wait_until(lambda: gw.table.subscription_count == 2)
            r = redis_server.client()
            total = 30000
            payload = b'{"symbol":"FLOOD","seq":%d,"pad":"' + b"x" * 150 + b'"}'

            def publish():
                for start in range(0, total, 1000):
                    pipe = r.pipeline(transaction=False)
                    for n in range(start, start + 1000):
                        pipe.publish("channel:trade:FLOOD", payload % n)
                    pipe.execute()
            pub = loop.run_in_executor(None, publish)
            for n in range(total):
                msg = orjson.loads(await asyncio.wait_for(healthy.recv(), 10))
                assert msg["data"]["seq"] == n
            await pub
            assert gw.counters.slow_consumers == {"disconnect": 1}
            await wait_until(lambda: len(gw.sessions) == 1, timeout=5)
            assert gw.table.subscription_count == 1
            stalled.close()
            await healthy.close()
    aio(main(), timeout=120)


@pytest.mark.heavy
@pytest.mark.slow      # ~1 s; test_fastpath covers the ordering rule without sockets filling
def test_backed_up_client_keeps_byte_order(aio, impl, redis_server):
    """A client whose socket is full: what the kernel does not take waits in
    the transport, later trades and a pong queue behind it, and once the
    client reads again it gets every byte in order; then writes go straight
    to the socket again."""
    async def main():
        async with running_gateway(impl, redis_server.url, max_buffered_bytes=64 << 20) as gw:
            await wait_until(lambda: gw.redis.ready)
            loop = asyncio.get_running_loop()
            s = await raw_client(gw.port, 4096)
            s.sock.settimeout(10)
            s.send_text(b'{"action":"subscribe","symbols":["BACKUP"]}')
            await wait_until(lambda: gw.table.subscription_count == 1)
            listener = next(iter(gw.sessions)).listener
            r = redis_server.client()
            payload = b'{"symbol":"BACKUP","seq":%d,"pad":"' + b"x" * 150 + b'"}'

            def publish(first, count):
                pipe = r.pipeline(transaction=False)
                for n in range(first, first + count):
                    pipe.publish("channel:trade:BACKUP", payload % n)
                pipe.execute()

            # Until the kernel's buffers are full and the transport holds the rest.
            first = 0
            while listener.write_buffer_size() == 0:
                assert first < 100_000, "the kernel took 100,000 trades"
                await loop.run_in_executor(None, publish, first, 2000)
                first += 2000
                await asyncio.sleep(0.05)
            s.send(wire.frame(wire.OP_PING, b"behind"))
            await asyncio.sleep(0.2)            # the gateway has read the ping
            total = first + 3000
            await loop.run_in_executor(None, publish, first, 3000)

            def read(n_trades):
                seqs, pongs = [], []
                while len(seqs) < n_trades:
                    f = s.frame()
                    if f.opcode == wire.OP_PONG:
                        pongs.append((len(seqs), f.payload))
                    else:
                        msg = f.json()
                        if msg["type"] == "trade":
                            seqs.append(msg["data"]["seq"])
                return seqs, pongs
            seqs, pongs = await loop.run_in_executor(None, read, total)
            assert seqs == list(range(total))
            # The pong went behind what was queued when the ping came.
            assert len(pongs) == 1 and pongs[0][1] == b"behind" and 0 < pongs[0][0] <= first, pongs
            await wait_until(lambda: listener.write_buffer_size() == 0)
            await loop.run_in_executor(None, publish, total, 10)
            seqs, pongs = await loop.run_in_executor(None, read, 10)
            assert seqs == list(range(total, total + 10)) and not pongs
            assert gw.counters.slow_consumers == {}
            s.close()
    aio(main(), timeout=60)


# -- Redis faults ------------------------------------------------------------------

def test_redis_restart_clients_stay_delivery_resumes(aio, impl, own_redis):
    async def main():
        own_redis.start()
        async with running_gateway(impl, own_redis.url) as gw:
            gw.redis.backoff.cap = 0.2
            await wait_until(lambda: gw.redis.ready)
            ws = await client(gw.port, ["RR"])
            own_redis.client().publish("channel:trade:RR", b'{"n":1}')
            assert orjson.loads(await ws.recv())["data"] == {"n": 1}
            own_redis.kill()
            await wait_until(lambda: not gw.redis.ready)
            own_redis.start()
            await wait_until(lambda: gw.redis.ready, timeout=10)
            assert gw.redis.reconnects >= 1
            assert own_redis.client().publish("channel:trade:RR", b'{"n":2}') == 1
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"] == {"n": 2}
            assert len(gw.sessions) == 1
            await ws.close()
    aio(main())


@pytest.mark.slow
@pytest.mark.heavy
def test_redis_unreachable_at_start_then_appears(aio, impl, own_redis):
    async def main():
        async with running_gateway(impl, own_redis.url) as gw:
            gw.redis.backoff.cap = 0.2
            ws = await client(gw.port, ["LATE"])  # the gateway serves clients meanwhile
            await asyncio.sleep(0.3)
            assert not gw.redis.ready and "cannot connect" in gw.redis.reason
            own_redis.start()
            await wait_until(lambda: gw.redis.ready, timeout=10)
            own_redis.client().publish("channel:trade:LATE", b'{"n":1}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"] == {"n": 1}
            await ws.close()
    aio(main())


@pytest.mark.heavy
@pytest.mark.slow
def test_redis_password_and_db_honoured(aio, impl, own_redis, caplog):
    own_redis.extra = ["--requirepass", "s3cret"]
    own_redis.start()

    async def main():
        bad = own_redis.url.replace("redis://", "redis://:wrong@")
        async with running_gateway(impl, bad) as gw:
            gw.redis.backoff.cap = 0.1
            await asyncio.sleep(0.5)
            assert not gw.redis.ready and gw.redis.connects >= 2  # retried, no crash
        good = own_redis.url.replace("redis://", "redis://:s3cret@") + "/3"
        async with running_gateway(impl, good) as gw:
            await wait_until(lambda: gw.redis.ready)
            ws = await client(gw.port, ["AUTH"])
            import redis
            r = redis.Redis(port=own_redis.port, password="s3cret")
            r.publish("channel:trade:AUTH", b'{"ok":1}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"] == {"ok": 1}
            await ws.close()
    with caplog.at_level("ERROR", logger="gateway.redis"):
        aio(main())
    assert any("Redis refused the gateway" in r.getMessage() for r in caplog.records)
    assert "s3cret" not in caplog.text and "wrong" not in caplog.text


# -- process: signals, CLI, stats ------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_closes_clients_1001_and_exits_0(gateway_process, sig):
    gw = gateway_process()
    port = gw.port
    gw.wait_listening()

    async def main():
        conns = [await client(port, ["SIG"]) for _ in range(3)]
        gw.send_signal(sig)
        t0 = time.monotonic()
        for ws in conns:
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd.code == 1001
        return time.monotonic() - t0
    took = asyncio.run(main())
    assert gw.wait(5) == 0
    assert took < 3
    assert "shutting down" in gw.log_text() and not gw.tracebacks()
    # No longer accepting.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_shutdown_closes_tcp_once_the_client_answers_the_close(gateway_process):
    """RFC 6455 7.1.1: the close handshake done, the server closes TCP at
    once; it does not sit out the shutdown grace (2 s) first."""
    gw = gateway_process()
    gw.wait_listening()
    with wire.connect(gw.port) as raw:
        raw.text()                                      # welcome
        gw.send_signal(signal.SIGTERM)
        close = raw.until_close()
        answered = time.monotonic()
        assert close.payload[:2] == (1001).to_bytes(2, "big")
        raw.send(wire.close_frame(1001))
        raw.sock.settimeout(5)
        assert raw.read_all() == b""
        took = time.monotonic() - answered
    assert gw.wait(5) == 0
    assert took < 1.0, f"EOF {took:.2f} s after the client's close"


@pytest.mark.parametrize("env,args,expected", [
    ({"WS_PORT": "http"}, [], "WS_PORT must be a whole number"),
    ({}, ["--port", "70000"], "--port must be between 0 and 65535"),
    ({"REDIS_URL": "http://localhost"}, [], "REDIS_URL must start with redis://"),
    ({"REDIS_URL": "redis://host:notaport"}, [], "REDIS_URL is malformed"),
    ({"REDIS_URL": "redis://localhost/abc"}, [], "database must be a number"),
    ({"WS_MAX_SYMBOLS": "0"}, [], "WS_MAX_SYMBOLS must be between 1"),
    ({"WS_HEARTBEAT_INTERVAL": "soon"}, [], "WS_HEARTBEAT_INTERVAL must be a number"),
    ({"LOG_LEVEL": "LOUD"}, [], "LOG_LEVEL must be"),
    ({"WS_CHANNEL_PREFIX": "a*"}, [], "WS_CHANNEL_PREFIX must be"),
    ({}, ["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_config_one_line_exit_2(env, args, expected):
    proc = subprocess.run([sys.executable, "-m", "gateway", *args], env=gateway_env(**env),
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ws-gateway: error:") and expected in lines[0]
    assert proc.stdout == ""


def test_help_documents_every_setting():
    from gateway.config import SETTINGS
    proc = subprocess.run([sys.executable, "-m", "gateway", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for s in SETTINGS:
        assert s.flag in text and s.env in text


def test_console_script_installed():
    import shutil
    exe = shutil.which("ws-gateway") or os.path.join(os.path.dirname(sys.executable), "ws-gateway")
    if not os.path.exists(exe):
        pytest.skip("package not installed with its console scripts")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "WS_PORT" in proc.stdout


@pytest.mark.slow
def test_stats_logged_periodically(redis_server, gateway_process):
    gw = gateway_process(WS_STATS_INTERVAL="0.3")
    port = gw.port
    try:
        gw.wait_listening()

        async def main():
            ws = await client(port, ["ST1", "ST2"])
            await ws.send("bad json")
            await ws.recv()
            r = redis_server.client()
            r.publish("channel:trade:ST1", b'{"n":1}')
            r.publish("channel:trade:ST1", b"garbage")
            await ws.recv()
            await asyncio.sleep(0.8)
            await ws.close()
        asyncio.run(main())
    finally:
        gw.stop()
    out = gw.log_text()
    lines = [dict(kv.split("=") for kv in line.split("stats: ")[-1].split())
             for line in out.splitlines() if "stats: connections=" in line]
    assert len(lines) >= 2
    # While the client was connected and subscribed ...
    assert any(f["connections"] == "1" and f["subscriptions"] == "2" and f["symbols"] == "2"
               for f in lines)
    # ... and the totals at the end (the last line is logged at shutdown).
    last = lines[-1]
    assert last["connections"] == "0" and last["subscriptions"] == "0"
    assert int(last["redis_messages"]) >= 2
    assert last["frames_sent"] == "1"
    assert last["client_messages"] == "2"
    assert last["client_errors"] == "1"
    assert int(last["dropped_payloads"]) >= 1
