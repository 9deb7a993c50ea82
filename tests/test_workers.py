"""``ws-gateway --workers N`` as an operator runs it: a supervisor process and
N workers on one port (SO_REUSEPORT), against a redis-server started here,
with real WebSocket clients. A worker killed with SIGKILL is restarted and
the others' clients are not disturbed; SIGTERM stops everything with 1001 to
every client and exit 0; /metrics on any connection shows every worker."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import orjson
import pytest
import redis
from conftest import fresh_symbols, needs_redis_server, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway._testbase.net import parse_metrics, try_http_get
from gateway.config import Config, ConfigError
from gateway.supervisor import WorkerInfo

pytestmark = needs_redis_server


def test_workers_setting():
    assert Config.from_sources({"WS_WORKERS": "3"}, {}).workers == 3
    assert Config.from_sources({"WS_WORKERS": "auto"}, {}).workers == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "many", "1.5"):
        with pytest.raises(ConfigError, match="WS_WORKERS"):
            Config.from_sources({"WS_WORKERS": bad}, {})


def test_worker_info_from_env():
    assert WorkerInfo.from_env({}) is None
    assert WorkerInfo.from_env({"GATEWAY_WORKER": "1/4", "GATEWAY_WORKER_DIR": "/tmp/x"}) == (
        WorkerInfo(1, 4, "/tmp/x"))


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(x) for x in out.split())


def metrics(port: int) -> dict[str, float]:
    got = try_http_get(port, "/metrics", timeout=2.0)
    assert got is not None and got[0] == 200
    return parse_metrics(got[1].decode())




@pytest.mark.slow
def test_two_workers_share_the_port_survive_a_death_and_stop_together(redis_server, gateway_process):
    gw = gateway_process(WS_WORKERS=2, WS_MAX_CONNECTIONS_PER_IP=0, WS_HEARTBEAT_INTERVAL=30)
    gw.wait_ready()
    wait_for(lambda: len(children(gw.pid)) == 2, 10, "two workers")
    sym = fresh_symbols(1)[0]
    r = redis.Redis(port=redis_server.port)

    async def main():
        clients = []
        for _ in range(24):
            ws = await connect(gw.url)
            welcome = orjson.loads(await ws.recv())
            await ws.send(orjson.dumps({"action": "subscribe", "symbols": [sym]}).decode())
            await ws.recv()
            clients.append((ws, welcome["data"]["serverId"]))
        servers = {sid for _, sid in clients}
        assert len(servers) == 2 and all(s.endswith(("-w0", "-w1")) for s in servers), servers

        async def everyone_gets(price, among):
            r.publish(f"channel:trade:{sym}", orjson.dumps({"symbol": sym, "price": price}))
            for ws, _ in among:
                msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
                assert msg["type"] == "trade" and msg["data"]["price"] == price
        await everyone_gets(1, clients)
        # Another worker's figures are up to a second old (it writes them once a second).
        def per_worker() -> dict[str, float]:
            return {k: v for k, v in metrics(gw.port).items() if k.startswith("gateway_connections{")}
        await asyncio.to_thread(wait_for, lambda: sum(per_worker().values()) == 24, 3, "24 connections")
        assert sorted(per_worker()) == ['gateway_connections{worker="0"}', 'gateway_connections{worker="1"}']

        # One worker dies: its clients are cut, the other worker's keep their stream.
        victim = children(gw.pid)[0]
        os.kill(victim, signal.SIGKILL)
        await asyncio.sleep(0.3)
        alive = []
        for ws, sid in clients:
            try:
                await asyncio.wait_for(ws.ping(), 1)
                alive.append((ws, sid))
            except (ConnectionClosed, TimeoutError):
                pass
        assert 0 < len(alive) < 24 and len({sid for _, sid in alive}) == 1
        await everyone_gets(2, alive)
        await asyncio.to_thread(wait_for, lambda: len(children(gw.pid)) == 2 and victim not in children(gw.pid),
                                10, "the worker restarted")
        # The port is served by two again: new clients reach both.
        fresh = set()
        deadline = time.monotonic() + 10
        while len(fresh) < 2 and time.monotonic() < deadline:
            async with connect(gw.url) as ws:
                fresh.add(orjson.loads(await ws.recv())["data"]["serverId"])
        assert len(fresh) == 2

        # SIGTERM to the supervisor: every client gets 1001, everything exits 0.
        t0 = time.monotonic()
        gw.send_signal(signal.SIGTERM)
        for ws, _ in alive:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        code = await asyncio.to_thread(gw.wait, 15)
        assert code == 0 and time.monotonic() - t0 < 5
    asyncio.run(main())
    log = gw.log_text()
    assert "worker 0 exited with SIGKILL" in log or "worker 1 exited with SIGKILL" in log
    assert "all workers stopped" in log and not gw.tracebacks()
