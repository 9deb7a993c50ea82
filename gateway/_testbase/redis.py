"""A real redis-server for harness code and tests, on a free loopback port.

No persistence, loopback only, never port 6379. The caller must stop() or
kill() it (or use it as a context manager).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .net import HOST, HarnessError, free_port
from .process import SpawnOptions, spawn, terminate
from .resp import encode_command

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisNotInstalled(HarnessError):
    """No redis-server binary on this machine (tests skip on it)."""


def redis_installed() -> bool:
    return os.path.exists(REDIS_SERVER)


class RedisError(HarnessError):
    """Redis answered a command() with an error reply."""


def command(port: int, *args, timeout: float = 5.0, host: str = HOST):
    """One Redis command over a fresh socket; no client library involved.

    Returns an int for ``:``, a str for ``+`` and a bulk reply (None when
    null); raises RedisError for ``-``, OSError when Redis is not there.
    Arrays are not decoded: use a real client for those.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(encode_command(*args))
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
        line, rest = buf.split(b"\r\n", 1)
        kind, body = line[:1], line[1:]
        if kind == b":":
            return int(body)
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RedisError(f"redis error: {body.decode()}")
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            while len(rest) < n + 2:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                rest += chunk
            return rest[:n].decode(errors="replace")
        return line.decode(errors="replace")


class RedisServer:
    """A redis-server process the caller owns.

    ``extra`` are more redis-server arguments (``["--requirepass", "pw"]``).
    kill() then start() brings it back on the same port (restart() does
    both), as a crashed and restarted Redis would be. die_with_parent, cpu
    and new_group are spawn()'s options; ``log_path`` keeps its output
    (discarded otherwise), ``workdir`` is its --dir.
    """

    def __init__(self, port: int | None = None, extra: list[str] | tuple = (), *,
                 die_with_parent: bool = False, cpu: int | None = None, new_group: bool = False,
                 log_path: Path | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        if self.port == 6379:
            raise HarnessError("refusing port 6379: a developer's own Redis may be there")
        self.extra = list(extra)
        self.log_path = log_path
        self.workdir = workdir
        self._spawn_opts = SpawnOptions(die_with_parent=die_with_parent, cpu=cpu,
                                        new_group=new_group)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 10) -> RedisServer:
        """Start it and wait until it answers PING (or NOAUTH, with a
        password). Raises RedisNotInstalled, or HarnessError on timeout."""
        if not redis_installed():
            raise RedisNotInstalled("redis-server is not installed")
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        if self.workdir is not None:
            argv += ["--dir", str(self.workdir)]
        self.proc = spawn([*argv, *self.extra], log=self.log_path, **self._spawn_opts)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                time.sleep(0.02)
        raise HarnessError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and wait."""
        if self.proc is not None:
            terminate(self.proc, 5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no goodbye to its clients, its output buffers are lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self, down: float = 0.0, timeout: float = 10) -> RedisServer:
        """kill(), stay down ``down`` seconds, start() on the same port."""
        self.kill()
        time.sleep(down)
        return self.start(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, *args, timeout: float = 5.0):
        """One command, see command()."""
        return command(self.port, *args, timeout=timeout)

    def numpat(self) -> int:
        """Patterns subscribed in Redis (1 once a gateway's PSUBSCRIBE is in);
        -1 when Redis does not answer."""
        try:
            return int(self.command("PUBSUB", "NUMPAT", timeout=2))
        except (OSError, HarnessError, ValueError):
            return -1

    def client(self, *, retry: bool = True, **kw):
        """A redis-py client. With ``retry=False`` a failed command is not
        sent again (a retried pipeline would publish twice what Redis took
        before the connection dropped)."""
        import redis
        if not retry:
            from redis.backoff import NoBackoff
            from redis.retry import Retry
            kw["retry"] = Retry(NoBackoff(), 0)
        return redis.Redis(host=HOST, port=self.port, **kw)
