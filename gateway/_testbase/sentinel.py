"""Redis with Sentinel for harness code and tests: a master, a replica and
three sentinels, all redis-server processes on free loopback ports (never
6379 or 26379).

Debian's redis-server runs a sentinel as ``redis-server <conf> --sentinel``;
the sentinel rewrites its configuration file, so each gets its own in a
temporary directory. Failure detection is quick (``down_after_ms``, 500 ms by
default) so a failover takes a second or two.

    with SentinelCluster() as rs:
        ... REDIS_URL=rs.url ...
        old = rs.master_port()
        rs.servers[old].kill()
        new = rs.wait_failover(old)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .net import HOST, HarnessError, free_port, port_open
from .process import spawn, terminate
from .redis import REDIS_SERVER, RedisNotInstalled, RedisServer, redis_installed

SENTINEL_DEFAULT_PORT = 26379


class SentinelUnavailable(HarnessError):
    """This redis-server cannot run as a sentinel (tests skip on it)."""


def _port(avoid: set[int]) -> int:
    while True:
        port = free_port()
        if port not in avoid and port != SENTINEL_DEFAULT_PORT:
            avoid.add(port)
            return port


class Sentinel:
    """One ``redis-server <conf> --sentinel`` process."""

    def __init__(self, port: int, conf: Path, log_path: Path | None = None):
        self.port = port
        self.conf = conf
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> Sentinel:
        self.proc = spawn([REDIS_SERVER, str(self.conf), "--sentinel"], log=self.log_path,
                          die_with_parent=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SentinelUnavailable(
                    f"redis-server --sentinel exited with {self.proc.returncode}"
                    + (f": {self.log_path.read_text()[-500:]}" if self.log_path else ""))
            if port_open(self.port):
                return self
            time.sleep(0.02)
        raise HarnessError(f"sentinel did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 5)
        self.proc = None

    def client(self):
        import redis
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, decode_responses=True)


class SentinelCluster:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum 2)
    watching it as ``name``. ``servers`` maps port -> RedisServer (master and
    replicas); which of them is the master changes with each failover."""

    def __init__(self, name: str = "md", *, replicas: int = 1, sentinels: int = 3,
                 down_after_ms: int = 500, failover_timeout_ms: int = 2000,
                 workdir: Path | None = None):
        if not redis_installed():
            raise RedisNotInstalled("redis-server is not installed")
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ws-gateway-sentinel-"))
        used: set[int] = set()
        master_port = _port(used)
        self.servers: dict[int, RedisServer] = {
            master_port: RedisServer(master_port, die_with_parent=True, workdir=self._data(master_port),
                                     log_path=self.dir / f"redis-{master_port}.log")}
        self.initial_master = master_port
        for _ in range(replicas):
            p = _port(used)
            self.servers[p] = RedisServer(
                p, ["--replicaof", HOST, str(master_port)], die_with_parent=True,
                workdir=self._data(p), log_path=self.dir / f"redis-{p}.log")
        self.sentinels: list[Sentinel] = []
        for _ in range(sentinels):
            p = _port(used)
            conf = self.dir / f"sentinel-{p}.conf"
            conf.write_text(
                f"port {p}\nbind {HOST}\ndaemonize no\ndir {self.dir}\nloglevel notice\n"
                f"sentinel monitor {name} {HOST} {master_port} 2\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n")
            self.sentinels.append(Sentinel(p, conf, self.dir / f"sentinel-{p}.log"))

    def _data(self, port: int) -> Path:
        # A replica's full sync writes an RDB file into its --dir: never the caller's cwd.
        d = self.dir / f"data-{port}"
        d.mkdir(exist_ok=True)
        return d

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}"

    def start(self, timeout: float = 20) -> SentinelCluster:
        """Everything up, the replica in sync and every sentinel aware of the
        replica and of the other sentinels (so a failover can happen)."""
        for server in self.servers.values():
            server.start()
        for s in self.sentinels:
            s.start()
        deadline = time.monotonic() + timeout
        while True:
            if self._settled():
                return self
            if time.monotonic() > deadline:
                raise HarnessError(f"sentinels did not settle within {timeout:g} s "
                                   f"(logs in {self.dir})")
            time.sleep(0.1)

    def _settled(self) -> bool:
        try:
            for s in self.sentinels:
                c = s.client()
                try:
                    replicas = [r for r in c.sentinel_slaves(self.name)
                                if "s_down" not in r.get("flags", "")]
                    others = c.sentinel_sentinels(self.name)
                finally:
                    c.close()
                if len(replicas) < len(self.servers) - 1 or len(others) < len(self.sentinels) - 1:
                    return False
            master = self.servers[self.master_port()]
            return all(self.link_up(p) for p in self.servers if p != master.port)
        except Exception:
            return False

    def link_up(self, port: int) -> bool:
        import redis
        c = redis.Redis(host=HOST, port=port, socket_timeout=2, decode_responses=True)
        try:
            info = c.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            c.close()

    def master_port(self, sentinel: int = 0) -> int:
        """The master's port as sentinel ``sentinel`` names it."""
        c = self.sentinels[sentinel].client()
        try:
            _, port = c.sentinel_get_master_addr_by_name(self.name)
        finally:
            c.close()
        return int(port)

    def master(self) -> RedisServer:
        return self.servers[self.master_port()]

    def role(self, port: int, timeout: float = 1.0) -> str | None:
        """ROLE's first word (master, slave), None when it does not answer."""
        import redis
        c = redis.Redis(host=HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                        decode_responses=True)
        try:
            return str(c.execute_command("ROLE")[0])
        except redis.RedisError:
            return None
        finally:
            c.close()

    def wait_failover(self, old: int, timeout: float = 15) -> int:
        """Block until every sentinel names a master other than ``old`` and it
        answers ROLE master; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ports = {self.master_port(i) for i in range(len(self.sentinels))}
            except Exception:
                ports = set()
            if len(ports) == 1:
                port = ports.pop()
                if port != old and self.role(port) == "master":
                    return port
            time.sleep(0.05)
        raise HarnessError(f"no failover away from {old} within {timeout:g} s (logs in {self.dir})")

    def failover(self) -> None:
        """SENTINEL FAILOVER: move the master to a replica although it is healthy."""
        c = self.sentinels[0].client()
        try:
            c.execute_command("SENTINEL", "FAILOVER", self.name)
        finally:
            c.close()

    def freeze(self, port: int) -> None:
        """SIGSTOP: its connections stay open, nothing is answered."""
        os.kill(self.servers[port].pid, signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        os.kill(self.servers[port].pid, signal.SIGCONT)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for server in self.servers.values():
            if server.proc is not None:
                try:
                    os.kill(server.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            server.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def sentinel_mode_available() -> str | None:
    """None when ``redis-server --sentinel`` runs here, else why not."""
    if not redis_installed():
        return "redis-server is not installed"
    d = Path(tempfile.mkdtemp(prefix="ws-gateway-sentinel-check-"))
    try:
        port = _port(set())
        conf = d / "s.conf"
        conf.write_text(f"port {port}\nbind {HOST}\ndaemonize no\ndir {d}\n")
        s = Sentinel(port, conf, d / "s.log")
        try:
            s.start(timeout=5)
        except HarnessError as exc:
            return f"redis-server cannot run as a sentinel: {exc}"
        finally:
            s.stop()
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)
