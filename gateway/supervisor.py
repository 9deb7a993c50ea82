"""``ws-gateway --workers N``: N gateway processes on one port.

Each worker is a whole gateway (its own event loop, Redis subscription and
clients) listening on the same address with ``SO_REUSEPORT``, so the kernel
spreads new connections over them and every core does fan-out work. The
supervisor only starts them, restarts one that dies (with backoff, so a
worker that cannot start does not spin), passes SIGTERM/SIGINT on to all and
exits 0 once they have stopped (1 if one had to be killed).

Workers learn who they are from two environment variables (WORKER_ENV,
WORKER_DIR_ENV): their index, and a directory where each writes its metrics
so that ``/metrics`` on any of them shows every worker (gateway.metrics).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("gateway.supervisor")

WORKER_ENV = "GATEWAY_WORKER"            # "<index>/<count>"
WORKER_DIR_ENV = "GATEWAY_WORKER_DIR"    # where workers leave their metrics
STOP_TIMEOUT = 10.0                      # s a worker has after SIGTERM (it needs about 2)
RESTART_BACKOFF = (0.5, 30.0)            # s: first delay after a death, cap
STABLE_AFTER = 30.0                      # s up before a worker's backoff starts over


@dataclass(frozen=True)
class WorkerInfo:
    index: int
    count: int
    directory: str

    @classmethod
    def from_env(cls, env=os.environ) -> WorkerInfo | None:
        """This process's place among the workers, or None when it runs alone."""
        spec, directory = env.get(WORKER_ENV), env.get(WORKER_DIR_ENV)
        if not spec or not directory:
            return None
        index, _, count = spec.partition("/")
        return cls(int(index), int(count), directory)


def die_with_parent() -> None:
    """In a child (as preexec_fn): SIGKILL it when its parent dies, however
    the parent dies. Linux ties this to the thread that forked the child."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def resolve_port(host: str, port: int) -> int:
    """``port``, or for 0 a free one every worker can then share."""
    if port:
        return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0              # deaths in a row, for the backoff
        self.restart_at: float | None = None


class Supervisor:
    def __init__(self, count: int, argv: list[str], host: str, port: int):
        self.count = count
        self.port = resolve_port(host, port)
        # Flags win over the environment, and the last of a flag wins: the
        # worker runs what the supervisor was asked to run, as one worker.
        self.argv = [sys.executable, "-m", "gateway", *argv,
                     "--workers", "1", "--port", str(self.port)]
        self.directory = tempfile.mkdtemp(prefix="ws-gateway-workers-")
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = False
        self.forced = False

    def start(self, w: Worker) -> None:
        env = {**os.environ, WORKER_ENV: f"{w.index}/{self.count}", WORKER_DIR_ENV: self.directory}
        w.proc = subprocess.Popen(self.argv, env=env, preexec_fn=die_with_parent)
        w.started = time.monotonic()
        w.restart_at = None
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def reap(self, now: float) -> None:
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            w.proc = None
            if self.stopping:
                continue
            w.failures = 1 if now - w.started >= STABLE_AFTER else w.failures + 1
            delay = min(RESTART_BACKOFF[1], RESTART_BACKOFF[0] * 2 ** (w.failures - 1))
            w.restart_at = now + delay
            log.warning("worker %d exited with %s; restarting in %.1f s", w.index,
                        _describe(code), delay)

    def run(self) -> int:
        def on_signal(signum, frame):
            if not self.stopping:
                log.info("received %s: stopping %d worker(s)", signal.Signals(signum).name, self.count)
                self.stopping = True
                self.signal_all(signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("supervising %d workers on port %d", self.count, self.port)
        try:
            for w in self.workers:
                self.start(w)
            while not self.stopping:
                now = time.monotonic()
                self.reap(now)
                for w in self.workers:
                    if w.proc is None and w.restart_at is not None and now >= w.restart_at:
                        self.start(w)
                time.sleep(0.1)
            self.wait_all()
        finally:
            self.signal_all(signal.SIGKILL)
            shutil.rmtree(self.directory, ignore_errors=True)
        log.info("all workers stopped")
        return 1 if self.forced else 0

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def wait_all(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop within %.0f s: killed", w.index, STOP_TIMEOUT)
                self.forced = True
                w.proc.kill()
                w.proc.wait()


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"code {code}"


def run(count: int, argv: list[str], host: str, port: int) -> int:
    return Supervisor(count, argv, host, port).run()
