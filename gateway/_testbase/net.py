"""Loopback ports and plain HTTP, for harness code.

Everything here talks to 127.0.0.1 only. The callers own what they start;
nothing in this module starts a process.
"""
from __future__ import annotations

import contextlib
import http.client
import socket
import time

HOST = "127.0.0.1"
REDIS_DEFAULT_PORT = 6379  # never handed out: a developer's own Redis may be there


class HarnessError(Exception):
    """The harness could not set itself up (not a failure of the gateway)."""


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (never 6379).

    The port is free when this returns, not reserved: bind it soon, and expect
    (rarely) to lose a race with another process.
    """
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != REDIS_DEFAULT_PORT:
            return port


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    """True when something accepts a TCP connection on ``port``."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, host: str = HOST, alive=None) -> None:
    """Block until ``port`` accepts connections.

    ``alive``, when given, is called between attempts; if it returns False
    (the process that should listen has exited) this raises HarnessError at
    once instead of waiting out the timeout. Raises TimeoutError after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(port, host):
            return
        if alive is not None and not alive():
            raise HarnessError(f"the process meant to listen on port {port} exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:g} s")
        time.sleep(0.05)


def http_get(port: int, path: str, timeout: float = 2.0,
             host: str = HOST) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one GET. Raises OSError or
    http.client.HTTPException when nothing sensible answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def try_http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body), or None when the request failed in any way."""
    try:
        status, _, body = http_get(port, path, timeout)
    except (OSError, http.client.HTTPException):
        return None
    return status, body


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format as {'name{k="v",...}': value}, labels sorted.

    Uses prometheus_client's parser (a dependency of the gateway), so a
    malformed exposition raises ValueError rather than being half-read.
    """
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape_metrics(port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """``/metrics`` of a gateway as parse_metrics gives it; None when it is not
    served or not parseable (callers that require it should assert)."""
    got = try_http_get(port, "/metrics", timeout)
    if got is None or got[0] != 200:
        return None
    with contextlib.suppress(ValueError):
        return parse_metrics(got[1].decode(errors="replace")) or None
    return None


def readyz(port: int, timeout: float = 1.0) -> int | None:
    """/readyz status code when served (200 or 503), else None."""
    got = try_http_get(port, "/readyz", timeout)
    return got[0] if got is not None and got[0] in (200, 503) else None
