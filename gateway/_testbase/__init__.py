"""Harness code shared by the tests, the soak, the live fuzzer and the
benchmarks: real processes on loopback, a raw WebSocket client, /proc readers.

Not part of the gateway's API: it may change with the tests. It is shipped in
the wheel (as asyncpg ships its ``_testbase``) so that a deployed build can
be soaked and fuzzed where it runs:

    python -m gateway._testbase.soak --duration 600
    python -m gateway._testbase.fuzz --duration 60 --seed 1

Modules:

    net      free_port, wait_port, http_get, scrape_metrics, readyz, HarnessError
    redis    RedisServer (a redis-server process), command (one RESP command)
    process  GatewayProcess (``python -m gateway``), spawn, gateway_env, die_with_parent
    procfs   rss_kb, cpu_seconds, schedstat, core_times, tcp_peer_ports
    ws       upgrade_request, frame, FrameParser, connect / RawSocket, open_async
    resp     encode_command, bulk, pmessage
    loops    new_loop, CheckedLoops (fails a test on unhandled loop errors)
    soak     the soak run (``python -m gateway._testbase.soak``)
    fuzz     the live fuzzer (``python -m gateway._testbase.fuzz``)

Every process these start listens on 127.0.0.1 only, on a free port, never
on 6379; the caller stops what it starts.
"""
from __future__ import annotations

from .loops import LOOP_KINDS, CheckedLoops, UnhandledLoopError, new_loop, run_loop
from .net import (HOST, HarnessError, free_port, http_get, parse_metrics, port_open, readyz,
                  scrape_metrics, wait_port)
from .process import (ONE_ADDRESS_ENV, GatewayProcess, die_with_parent, gateway_env, spawn,
                      terminate)
from .redis import RedisNotInstalled, RedisServer, command, redis_installed

__all__ = [
    "HOST", "HarnessError", "free_port", "http_get", "parse_metrics", "port_open", "readyz",
    "scrape_metrics", "wait_port",
    "ONE_ADDRESS_ENV", "GatewayProcess", "die_with_parent", "gateway_env", "spawn", "terminate",
    "RedisNotInstalled", "RedisServer", "command", "redis_installed",
    "LOOP_KINDS", "CheckedLoops", "UnhandledLoopError", "new_loop", "run_loop",
]
