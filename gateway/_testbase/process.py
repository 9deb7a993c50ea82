"""Child processes for harness code: ``python -m gateway`` and how to start it.

A GatewayProcess is the gateway as production runs it: its own process, its
settings in the environment, its log in a file. The caller must stop() or
kill() it (or use it as a context manager); nothing reaps it otherwise.
"""
from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

from gateway.supervisor import die_with_parent

from . import procfs
from .net import HOST, HarnessError, free_port, port_open, try_http_get

# Where ``python -m gateway`` runs by default: the directory holding the
# ``gateway`` package this module belongs to (the checkout, or site-packages).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent

TRACEBACK = "Traceback (most recent call last)"


_set_pdeathsig = die_with_parent  # spawn()'s parameter of the same name hides it


class SpawnOptions(TypedDict, total=False):
    """spawn()'s process options, as a caller keeps them for later starts."""

    die_with_parent: bool
    cpu: int | None
    new_group: bool
    nofile: int | None


def spawn(argv: list[str], *, env: dict | None = None, cwd=None, log: Path | None = None,
          stdout=None, die_with_parent: bool = False, cpu: int | None = None,
          new_group: bool = False, nofile: int | None = None) -> subprocess.Popen:
    """Popen with the options harness code needs.

    log              append stdout and stderr to this file (else both are
                     discarded, unless ``stdout`` is given: a file or PIPE);
    die_with_parent  see die_with_parent();
    cpu              pin the child to this core (taskset when installed, else
                     sched_setaffinity);
    new_group        own process group: a Ctrl-C aimed at the harness does not
                     reach the child; kill the group with os.killpg(pid, ...);
    nofile           raise RLIMIT_NOFILE's soft limit to this (capped at hard).
    """
    use_taskset = cpu is not None and shutil.which("taskset") is not None
    if use_taskset:
        argv = ["taskset", "-c", str(cpu), *argv]

    def preexec() -> None:
        if new_group:
            os.setpgrp()
        if die_with_parent:
            _set_pdeathsig()
        if cpu is not None and not use_taskset:
            os.sched_setaffinity(0, {cpu})
        if nofile:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    needs_preexec = new_group or die_with_parent or nofile or (cpu is not None and not use_taskset)
    # The child gets its own copy of the log file; ours closes on the way out.
    with open(log, "ab") if log else contextlib.nullcontext() as logf:
        out = stdout if stdout is not None else (logf or subprocess.DEVNULL)
        err = subprocess.STDOUT if stdout is not None and logf is None else (logf or subprocess.DEVNULL)
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, preexec_fn=preexec if needs_preexec else None)


def terminate(proc: subprocess.Popen, timeout: float = 5.0, sig=signal.SIGTERM) -> int | None:
    """Send ``sig`` (SIGTERM), wait ``timeout`` s, then SIGKILL.

    The exit code, or None when it had to be killed.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode


def gateway_env(**settings) -> dict[str, str]:
    """This process's environment without GATEWAY_NO_EXTENSIONS, plus
    ``settings`` (values are turned into strings)."""
    env = dict(os.environ)
    env.pop("GATEWAY_NO_EXTENSIONS", None)
    env.update({k: str(v) for k, v in settings.items()})
    return env


# All load from a harness comes from 127.0.0.1: these lift the gateway's
# per-address connection limits.
ONE_ADDRESS_ENV = {"WS_MAX_CONNECTIONS_PER_IP": "0", "WS_CONNECT_RATE": "0"}


class GatewayProcess:
    """``python -m gateway`` on a free loopback port, its log in a file.

        with GatewayProcess(redis.url, WS_HEARTBEAT_INTERVAL=5) as gw:
            gw.wait_ready()
            ... ws://127.0.0.1:{gw.port} ...
            assert gw.stop() == 0 and not gw.tracebacks()

    ``settings`` are environment variables (WS_*, LOG_LEVEL, ...) on top of
    gateway_env(); WS_HOST, WS_PORT and REDIS_URL are set from the arguments.
    ``env`` replaces gateway_env() as the base. With ``log_path`` None the log
    goes to a temporary file, removed by close() (and on leaving the ``with``).
    ``argv`` runs something else in its place (e.g. another implementation
    speaking the same protocol); die_with_parent, cpu, new_group and nofile
    are spawn()'s options.
    """

    def __init__(self, redis_url: str, *, port: int | None = None, log_path: Path | None = None,
                 env: dict | None = None, argv: list[str] | None = None, cwd=None,
                 die_with_parent: bool = False, cpu: int | None = None, new_group: bool = False,
                 nofile: int | None = None, **settings):
        self.port = port or free_port()
        self.env = dict(env) if env is not None else gateway_env()
        self.env.update({"WS_HOST": HOST, "WS_PORT": str(self.port), "REDIS_URL": redis_url})
        self.env.update({k: str(v) for k, v in settings.items()})
        self.argv = argv or [sys.executable, "-m", "gateway"]
        self.cwd = cwd or PACKAGE_PARENT
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="gateway-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self._spawn_opts = SpawnOptions(die_with_parent=die_with_parent, cpu=cpu,
                                        new_group=new_group, nofile=nofile)
        self.proc: subprocess.Popen | None = None

    # -- life ---------------------------------------------------------------

    def start(self) -> GatewayProcess:
        """Start it (the log file is truncated first). Returns self."""
        self.log_path.write_bytes(b"")
        self.proc = spawn(self.argv, env=self.env, cwd=self.cwd, log=self.log_path,
                          **self._spawn_opts)
        return self

    def wait_listening(self, timeout: float = 20) -> None:
        """Block until the port accepts TCP. Raises HarnessError (with the log
        tail) if the process exits or the timeout passes."""
        self._wait(lambda: port_open(self.port), timeout, "listening")

    def wait_ready(self, timeout: float = 20) -> None:
        """Block until /readyz answers 200: listening and the Redis pattern
        subscription confirmed. Raises HarnessError as wait_listening()."""
        def ready():
            got = try_http_get(self.port, "/readyz", timeout=1.0)
            return got is not None and got[0] == 200
        self._wait(ready, timeout, "ready")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = self.proc.returncode if self.proc is not None else "never started"
                raise HarnessError(f"gateway exited with {code}:\n{self.log_tail()}")
            if predicate():
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"gateway not {what} within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; its exit code (subprocess.TimeoutExpired on timeout)."""
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10, sig=signal.SIGTERM) -> int | None:
        """``sig`` (SIGTERM) and wait; the exit code, or None if it had to be
        killed after ``timeout`` s."""
        if self.proc is None:
            return None
        if self._spawn_opts["new_group"] and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        return terminate(self.proc, timeout, sig)

    def kill(self) -> None:
        """SIGKILL if still running (its whole group with new_group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self._spawn_opts["new_group"]:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """kill(), and remove the log if it is a temporary one."""
        self.kill()
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it used and said -------------------------------------------------

    def rss_kb(self) -> int | None:
        return procfs.rss_kb(self.pid)

    def cpu_seconds(self) -> float | None:
        return procfs.cpu_seconds(self.pid)

    def schedstat(self) -> tuple[int, int] | None:
        return procfs.schedstat(self.pid)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def tracebacks(self) -> list[str]:
        """Each Python traceback in the log, from its first line to the next
        line that does not start with a space (the exception line included)."""
        out, block = [], None
        for line in self.log_text().splitlines():
            if block is not None:
                block.append(line)
                if not line.startswith(" "):
                    out.append("\n".join(block))
                    block = None
            elif TRACEBACK in line:
                block = [line]
        if block is not None:
            out.append("\n".join(block))
        return out

    def log_problems(self, limit: int = 5) -> list[str]:
        """The first ``limit`` log lines that are tracebacks, ERROR or CRITICAL."""
        lines = [line for line in self.log_text().splitlines()
                 if TRACEBACK in line or line.startswith(("ERROR", "CRITICAL"))
                 or " ERROR " in line or " CRITICAL " in line]
        return lines[:limit]


class CandleProcess(GatewayProcess):
    """``ws-gateway-candles`` (python -m gateway.candle_service) on a free
    port for its /healthz, /readyz and /metrics; the same life as GatewayProcess."""

    def __init__(self, redis_url: str, **kwargs):
        kwargs.setdefault("argv", [sys.executable, "-m", "gateway.candle_service"])
        super().__init__(redis_url, **kwargs)

    def role(self) -> str | None:
        """leader, standby, taking over; None when it does not answer."""
        import json
        got = try_http_get(self.port, "/healthz", timeout=1.0)
        return json.loads(got[1])["role"] if got is not None and got[0] == 200 else None

    def wait_role(self, role: str, timeout: float = 20) -> None:
        self._wait(lambda: self.role() == role, timeout, role)
