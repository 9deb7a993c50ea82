"""What an operator relies on: /healthz, /readyz and /metrics telling the
truth during faults, slow-consumer policies, misbehaving clients, and memory
that comes back after churn."""
from __future__ import annotations

import ast
import asyncio
import sys
import time

import orjson
import pytest
from conftest import ROOT, running_gateway, wait_until
from test_lifecycle import client, raw_client

from gateway import metrics
from gateway._testbase import procfs
from gateway._testbase import ws as wire
from gateway._testbase.net import parse_metrics


async def http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:] if ":" in h)}
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    writer.close()
    return status, headers, body


async def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}, via prometheus_client's parser."""
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return parse_metrics(body.decode())


# -- health and metrics ----------------------------------------------------------------

def test_health_ready_metrics_endpoints(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            status, _, body = await http_get(gw.port, "/healthz")
            assert status == 200 and orjson.loads(body)["status"] == "ok"
            status, _, body = await http_get(gw.port, "/readyz")
            assert status == 200 and orjson.loads(body) == {"status": "ready"}
            # Before any event, each known label value is there at 0.
            m = await scrape(gw.port)
            for reason in metrics.REFUSAL_REASONS:
                assert m[f'gateway_refused_connections_total{{reason="{reason}"}}'] == 0
            for kind in metrics.ERROR_KINDS:
                assert m[f'gateway_errors_total{{kind="{kind}"}}'] == 0

            ws = await client(gw.port, ["MET", "RIC"])
            await ws.send("not json")
            await ws.recv()
            r = redis_server.client()
            r.publish("channel:trade:MET", b'{"n":1}')
            r.publish("channel:trade:MET", b"bad payload")
            await ws.recv()
            await wait_until(lambda: gw.fanout.dropped_payloads == 1)
            m = await scrape(gw.port)
            assert m["gateway_connections"] == 1
            assert m["gateway_subscriptions"] == 2
            assert m["gateway_redis_messages_total"] == 2
            assert m["gateway_frames_sent_total"] == 1
            assert m["gateway_client_messages_total"] == 2
            assert m['gateway_errors_total{kind="invalid_json"}'] == 1
            assert m["gateway_dropped_payloads_total"] == 1
            assert m['gateway_slow_consumers_total{action="disconnect"}'] == 0
            assert m['gateway_slow_consumers_total{action="conflate"}'] == 0
            assert m["gateway_redis_reconnects_total"] == 0
            assert m["gateway_fanout_latency_seconds_count"] >= 1
            assert m['gateway_fanout_latency_seconds_bucket{le="+Inf"}'] == \
                m["gateway_fanout_latency_seconds_count"]
            assert 0 < m["gateway_fanout_latency_seconds_sum"] < 1
            # Unknown plain-HTTP paths are not endpoints.
            status, _, _ = await http_get(gw.port, "/nope")
            assert status >= 400
            # The WebSocket endpoint is unaffected by all that.
            await ws.send('{"action":"ping"}')
            assert orjson.loads(await ws.recv())["type"] == "pong"
            await ws.close()
    aio(main())


def test_metrics_label_lists_cover_every_reason_and_kind_in_the_sources():
    """metrics.REFUSAL_REASONS and ERROR_KINDS (the series that exist at 0)
    name every literal reason/kind the code counts, so a new one cannot be
    missing until it first happens."""
    found: dict[str, set[str]] = {"refusal": set(), "error": set()}
    for path in (ROOT / "gateway").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            label = node.args[1] if len(node.args) >= 2 else None   # _refuse(status, reason, ...)
            if name == "_refuse" and path.name == "access.py" and isinstance(label, ast.Constant):
                found["refusal"].add(label.value)
            elif name == "ClientError" and isinstance(label, ast.Constant):     # ClientError(text, kind)
                found["error"].add(label.value)
            elif name == "count_error":
                # session.py: count_error("bad_compression" if ... else "too_big")
                found["error"].update(c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                                      and isinstance(c.value, str))
    assert found["refusal"] and found["error"]
    assert found["refusal"] <= set(metrics.REFUSAL_REASONS), found["refusal"] - set(metrics.REFUSAL_REASONS)
    assert found["error"] <= set(metrics.ERROR_KINDS), found["error"] - set(metrics.ERROR_KINDS)


@pytest.mark.heavy
@pytest.mark.slow      # ~1.6 s of Redis restarts
def test_readyz_and_metrics_follow_redis_faults(aio, impl, own_redis):
    async def main():
        async with running_gateway(impl, own_redis.url) as gw:
            gw.redis.backoff.cap = 0.2
            # Unreachable at start: serving, but not ready, and saying why.
            status, _, _ = await http_get(gw.port, "/healthz")
            assert status == 200
            status, _, body = await http_get(gw.port, "/readyz")
            assert status == 503 and "cannot connect" in orjson.loads(body)["reason"]
            own_redis.start()
            await wait_until(lambda: gw.redis.ready, 10)
            assert (await http_get(gw.port, "/readyz"))[0] == 200
            ws = await client(gw.port, ["FLT"])
            # Killed: clients stay, not ready, then ready again, reconnect counted.
            own_redis.kill()
            await wait_until(lambda: not gw.redis.ready)
            status, _, body = await http_get(gw.port, "/readyz")
            assert status == 503 and orjson.loads(body)["status"] == "not ready"
            assert (await scrape(gw.port))["gateway_redis_ready"] == 0
            own_redis.start()
            await wait_until(lambda: gw.redis.ready, 10)
            m = await scrape(gw.port)
            assert m["gateway_redis_reconnects_total"] >= 1 and m["gateway_redis_ready"] == 1
            assert m["gateway_connections"] == 1
            own_redis.client().publish("channel:trade:FLT", b'{"back":true}')
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["data"] == {"back": True}
            await ws.close()
    aio(main())


def test_redis_acl_without_pubsub_rights(aio, impl, own_redis, caplog):
    own_redis.start()
    admin = own_redis.client()
    admin.execute_command("ACL", "SETUSER", "feedonly", "on", ">pw", "~*", "&*", "+@all", "-psubscribe")

    async def main():
        url = own_redis.url.replace("redis://", "redis://feedonly:pw@")
        async with running_gateway(impl, url) as gw:
            gw.redis.backoff.cap = 0.1
            # Retried with backoff, no crash; the refusal stays the reason
            # (a fresh attempt is "subscribing" until Redis answers it).
            await wait_until(lambda: gw.redis.connects >= 3 and "NOPERM" in gw.redis.reason, 5)
            assert not gw.redis.ready
            status, _, body = await http_get(gw.port, "/readyz")
            assert status == 503 and "NOPERM" in orjson.loads(body)["reason"]
            admin.execute_command("ACL", "SETUSER", "feedonly", "+psubscribe")
            await wait_until(lambda: gw.redis.ready, 5)
    with caplog.at_level("ERROR", logger="gateway.redis"):
        aio(main())
    assert "Redis refused the gateway (NOPERM" in caplog.text
    assert ">pw" not in caplog.text and ":pw@" not in caplog.text


# -- slow consumers ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.heavy
def test_slow_consumer_conflation_reports_exact_gaps(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url, max_buffered_bytes=128 * 1024,
                                   slow_client_policy="conflate") as gw:
            await wait_until(lambda: gw.redis.ready)
            loop = asyncio.get_running_loop()
            slow = await raw_client(gw.port, 4096)
            slow.send_text(b'{"action":"subscribe","symbols":["CA","CB"]}')
            healthy = await client(gw.port, ["CA", "CB"], max_queue=None)
            await wait_until(lambda: gw.table.subscription_count == 4)
            r = redis_server.client()
            pad = b"x" * 150
            total = 20000

            def publish(start, stop):
                pipe = r.pipeline(transaction=False)
                for n in range(start, stop):
                    sym = b"CA" if n % 2 == 0 else b"CB"
                    pipe.publish(b"channel:trade:" + sym,
                                 b'{"s":"%s","seq":%d,"pad":"%s"}' % (sym, n // 2, pad))
                pipe.execute()
            # A burst the stalled client cannot take: it ends up conflating.
            for start in range(0, total, 2000):
                await loop.run_in_executor(None, publish, start, start + 2000)
            seen = {"CA": -1, "CB": -1}
            for _ in range(total):
                d = orjson.loads(await asyncio.wait_for(healthy.recv(), 10))["data"]
                assert d["seq"] == seen[d["s"]] + 1  # the healthy client misses nothing
                seen[d["s"]] = d["seq"]
            assert gw.counters.slow_consumers.get("conflate", 0) >= 1
            assert gw.fanout.conflated_messages > 0
            m = await scrape(gw.port)
            assert m['gateway_slow_consumers_total{action="conflate"}'] >= 1

            # The slow client now reads everything: a contiguous run, then per
            # symbol a gap notice saying exactly how many it skipped, then the
            # latest trade, then live trades again.
            slow.sock.settimeout(10)
            last = {"CA": -1, "CB": -1}
            gaps = {"CA": 0, "CB": 0}
            pending_gap = {}
            tail_published = False
            while min(last.values()) < total // 2 + 9:
                msg = await loop.run_in_executor(None, slow.text)
                if msg["type"] == "success":
                    continue
                if msg["type"] == "gap":
                    sym = msg["data"]["symbol"]
                    assert sym not in pending_gap
                    pending_gap[sym] = msg["data"]["skipped"]
                    continue
                assert msg["type"] == "trade"
                d = msg["data"]
                expected = last[d["s"]] + 1 + pending_gap.pop(d["s"], 0)
                if d["s"] in gaps and expected != last[d["s"]] + 1:
                    gaps[d["s"]] += 1
                assert d["seq"] == expected, (d, last)
                last[d["s"]] = d["seq"]
                if not tail_published and min(last.values()) == total // 2 - 1:
                    # Drained: trades published now flow without gaps.
                    tail_published = True
                    await loop.run_in_executor(None, publish, total, total + 20)
            assert sum(gaps.values()) >= 1
            assert not gw.sessions or all(not s.listener.conflating for s in gw.sessions)
            slow.close()
            await healthy.close()
    aio(main(), timeout=120)


@pytest.mark.heavy
@pytest.mark.slow      # ~1.3 s of flooding
def test_control_reply_flood_without_reading_is_a_slow_consumer(aio, impl, redis_server):
    async def main():
        # Rate limit off: the outbound limit alone must stop this client.
        async with running_gateway(impl, redis_server.url, max_buffered_bytes=64 * 1024,
                                   client_msg_rate=0) as gw:
            loop = asyncio.get_running_loop()
            flooder = await raw_client(gw.port, 4096)
            ping = wire.text_frame(b'{"action":"ping"}')
            burst = ping * 2000

            def flood():
                try:
                    for _ in range(50):
                        flooder.send(burst)
                except OSError:
                    pass
            await loop.run_in_executor(None, flood)
            await wait_until(lambda: gw.counters.slow_consumers.get("disconnect") == 1, 10)
            await wait_until(lambda: not gw.sessions, 5)
            flooder.close()
    aio(main())


# -- misbehaving clients -----------------------------------------------------------------

def test_client_vanishing_mid_write(aio, impl, redis_server):
    async def main():
        async with running_gateway(impl, redis_server.url) as gw:
            await wait_until(lambda: gw.redis.ready)
            loop = asyncio.get_running_loop()
            goners = []
            for _ in range(20):
                s = await raw_client(gw.port, 4096)
                s.send_text(b'{"action":"subscribe","symbols":["MID"]}')
                goners.append(s)
            healthy = await client(gw.port, ["MID"], max_queue=None)
            await wait_until(lambda: gw.table.subscription_count == 21)
            r = redis_server.client()

            def publish(start, stop):
                pipe = r.pipeline(transaction=False)
                for n in range(start, stop):
                    pipe.publish("channel:trade:MID", b'{"seq":%d,"pad":"%s"}' % (n, b"y" * 200))
                pipe.execute()
            await loop.run_in_executor(None, publish, 0, 3000)
            for s in goners:  # RST while the gateway has data queued for them
                s.rst()
            await loop.run_in_executor(None, publish, 3000, 6000)
            for n in range(6000):
                assert orjson.loads(await asyncio.wait_for(healthy.recv(), 10))["data"]["seq"] == n
            await wait_until(lambda: len(gw.sessions) == 1 and gw.table.subscription_count == 1)
            await healthy.close()
    aio(main(), timeout=120)


def test_half_open_clients_are_reaped(aio, impl, redis_server):
    """Clients that vanish without FIN or RST (cable pulled): the heartbeat finds them."""
    async def main():
        async with running_gateway(impl, redis_server.url, heartbeat_interval=0.2) as gw:
            ghosts = []
            for _ in range(30):
                s = await raw_client(gw.port)
                s.send_text(b'{"action":"subscribe","symbols":["GHOST"]}')
                ghosts.append(s)  # never reads, never answers a ping, never closes
            await wait_until(lambda: gw.table.subscription_count == 30)
            await wait_until(lambda: not gw.sessions and gw.table.subscription_count == 0, 5)
            assert gw.counters.heartbeat_timeouts == 30
            assert (await scrape(gw.port))["gateway_heartbeat_timeouts_total"] == 30
            for s in ghosts:
                s.close()
    aio(main())


FLOODER = r"""
import socket, sys, threading, time
from gateway._testbase import ws as wire
port, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.sendall(wire.upgrade_request(port))
burst = wire.text_frame(b'{"action":"subscribe","symbols":["X1"]}', key=b"\0\0\0\0") * 100
got = bytearray()
def drain():
    try:
        while chunk := s.recv(1 << 20):
            got.extend(chunk[-64:])
    except OSError:
        pass
t = threading.Thread(target=drain, daemon=True)
t.start()
sent, end = 0, time.monotonic() + seconds
try:
    while time.monotonic() < end:
        s.sendall(burst)
        sent += 100
except OSError:
    pass
t.join(2)
print(sent)
"""


@pytest.mark.slow
def test_control_flood_does_not_delay_other_clients(redis_server, gateway_process):
    """One client floods control messages as fast as it can; the per-connection
    rate limit closes it (1008) and another client's trades keep flowing.
    Gateway and flooder run in their own processes."""
    import subprocess
    gw = gateway_process()
    port = gw.port
    flooder = None
    try:
        gw.wait_listening()

        async def main():
            nonlocal flooder
            watcher = await client(port, ["LAT"])
            flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(port), "4"],
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT)
            await asyncio.sleep(0.5)
            r = redis_server.client()
            latencies = []
            for n in range(100):
                t0 = time.monotonic()
                r.publish("channel:trade:LAT", b'{"n":%d}' % n)
                d = orjson.loads(await asyncio.wait_for(watcher.recv(), 5))["data"]
                latencies.append(time.monotonic() - t0)
                assert d == {"n": n}
                await asyncio.sleep(0.01)
            m = await scrape(port)
            await watcher.close()
            return sorted(latencies), m
        latencies, m = asyncio.run(main())
        assert int(flooder.communicate(timeout=20)[0]) >= 100
        # The flooder was refused, then closed; only the watcher remained.
        assert m['gateway_errors_total{kind="rate_limited"}'] > 40
        assert m["gateway_rate_limit_closes_total"] == 1
        assert m["gateway_connections"] == 1
        # Generous: the claim is "not starved", not a latency target (bench/ measures those).
        assert latencies[98] < 0.1, latencies[-5:]
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
        gw.stop()


# -- memory after churn -------------------------------------------------------------------

@pytest.mark.slow
def test_churn_10000_cycles_rss_returns_to_baseline(redis_server, gateway_process):
    gw = gateway_process(WS_MAX_CONNECTIONS_PER_IP=0)
    port = gw.port
    try:
        gw.wait_listening()
        upgrade = wire.upgrade_request(port)

        async def cycle(i):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(wire.text_frame(b'{"action":"subscribe","symbols":["A%d","B%d","C"]}'
                                         % (i % 500, i % 7)))
            await reader.readuntil(b"currentSubscriptions")
            if i % 2:
                writer.transport.abort()
            else:
                writer.close()

        async def run(start, stop):
            for base in range(start, stop, 100):
                await asyncio.gather(*(cycle(i) for i in range(base, base + 100)))

        async def main():
            await run(0, 1000)  # warm-up: allocator pools, interned strings
            await asyncio.sleep(1.0)
            before = procfs.rss_kb(gw.pid)
            await run(1000, 11000)
            await asyncio.sleep(1.0)
            deadline = time.monotonic() + 10
            while True:
                m = await scrape(port)
                if m["gateway_connections"] == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            return before, procfs.rss_kb(gw.pid), m
        before, after, m = asyncio.run(main())
        assert m["gateway_connections"] == 0
        assert m["gateway_subscriptions"] == 0 and m["gateway_symbols"] == 0
        assert m["gateway_connections_accepted_total"] == 11000
        # 10,000 connections held at once would be ~60 MB; leaking 1% of
        # them would show. Allow allocator noise of 2 MB.
        assert after - before < 2048, (before, after)
    finally:
        gw.stop()
