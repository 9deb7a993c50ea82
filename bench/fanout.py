#!/usr/bin/env python3
"""End-to-end fan-out benchmark of the gateway variants.

Starts its own redis-server on a free port, then for every scenario runs each
variant in turn (alternating the order between repeats) on a fresh gateway
process:

    compiled   python -m gateway
    purepy     GATEWAY_NO_EXTENSIONS=1 python -m gateway
    baseline   python bench/baseline_gateway.py  (websockets + redis-py + json)
    floor      bench/floor_gateway.c: the same design in plain C (epoll, one
               Redis connection, each frame built once per read, one send per
               client per Redis read), no /metrics: the floor the others are
               set against (not in the default run)

    compiled@REV, purepy@REV
               the gateway of git revision REV (a branch, tag or hash of this
               repository), exported with `git archive` to a temporary
               directory, its extension built there in place, and run with cwd
               and PYTHONPATH set to it; reported as e.g. compiled@1c8e02a, so
               one run sets the working tree against a revision
               (--variants compiled,compiled@main).  The load tools and this
               harness are always the working tree's.

The gateway runs alone on CPU 0 (taskset -c 0); Redis, the C publisher and the
C epoll load client share CPU 1 with this script.  Gateway CPU is read from
/proc/PID/stat (utime+stime) just before the publisher starts and just after
the load client has seen the last expected frame, so it covers the delivery
window only.

Scenarios:
    protocol  a Python client checks the protocol (welcome, subscribe, trade
              envelope byte-for-byte, routing, ping, limit, unsubscribe)
    market    100 symbols, 1,000 clients x 5 symbols, saturation
    wide      10,000 symbols, 1,000 clients x 5 symbols, saturation
    latency   market topology at fixed offered loads (open loop, 1 ms ticks)
    memory    RSS per idle subscribed connection at 10,000 connections
    hot       one symbol broadcast to 5,000 clients, saturation
    market-deflate  market with every client negotiating permessage-deflate
    market-mixed    market with half the clients negotiating permessage-deflate
    market-auth     market with WS_JWT_SECRET set, every client presenting a JWT
    market-seq      market with every trade in the sequenced form publish_trade
                    publishes ({"_seq":..,"_epoch":..,...}; plain PUBLISH, so no
                    Redis Function cost): the gateway frames it with seq/epoch
    latency-seq     latency, with sequenced trades (compare with latency)
    rate      market topology at fixed offered rates x publisher pipelines
              (N trades per write, writes evenly spaced): latency, gateway CPU
              per delivery (schedstat), sends per delivery (the gateway's
              gateway_writes_total, the floor's own counter), and the ratio to
              the floor's CPU per delivery in the same run (--variants ...,floor)

The market-* scenarios are comparisons: they always run next to a plain market
case on the same variant, in the same invocation (the order reversed on odd
repeats), and the report sets each against that plain run.  They apply to
compiled and purepy; the baseline has neither JWT nor a shared compressor.

Usage:
    python bench/fanout.py [--variants compiled,purepy,baseline,floor,compiled@REV,purepy@REV]
                           [--scenarios protocol,market,wide,latency,memory,hot,
                                        market-deflate,market-mixed,market-auth,rate]
                           [--rate-cells 200000x1,1000000x100,...]
                           [--smoke] [--repeat N] [--out bench/results.json]

Exit status: 0 when every case ran and was correct (no loss, order kept,
protocol as specified); 3 when some case was incorrect; 1 on a harness error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# The shared harness code of this checkout (not of whatever `gateway` an
# editable install points at): free ports, redis-server, /proc readers, spawn.
sys.path.insert(0, str(ROOT))
from gateway._testbase import procfs  # noqa: E402
from gateway._testbase.net import HarnessError, free_port, port_open, scrape_metrics  # noqa: E402
from gateway._testbase.process import GatewayProcess, spawn  # noqa: E402
from gateway._testbase.redis import RedisServer, redis_installed  # noqa: E402

GATEWAY_CPU = 0
AUX_CPU = 1
CHANNEL_PREFIX = "channel:trade:"
ALL_VARIANTS = ["compiled", "purepy", "baseline"]
# Not in the default run: the compiled gateway as `ws-gateway --workers 2`,
# unpinned (its workers, the load client and Redis share both cores).
WORKERS_VARIANT = "workers"
# Not in the default run either: bench/floor_gateway.c, the same design in C.
FLOOR_VARIANT = "floor"
# Nor: the compiled gateway with write coalescing (WS_WRITE_DELAY_US, this many µs).
COALESCED_VARIANT = "coalesced"
COALESCED_DELAY_US = 1000
# Nor: the compiled gateway with every client negotiating permessage-deflate
# (rate scenario only; the market-deflate mode is the bursty form of it).
DEFLATE_VARIANT = "deflate"
KNOWN_VARIANTS = [*ALL_VARIANTS, WORKERS_VARIANT, FLOOR_VARIANT, COALESCED_VARIANT, DEFLATE_VARIANT]
# Kinds that run the compiled gateway as it is.
COMPILED_KINDS = ("compiled", WORKERS_VARIANT, COALESCED_VARIANT, DEFLATE_VARIANT)
# Kinds that serve no /metrics and /readyz: readiness is the port and the
# Redis pattern, the gateway's own counters are not read.
NO_METRICS_KINDS = ("baseline", FLOOR_VARIANT)
# The baseline tops out near 150k deliveries/s: the rate scenario runs it only
# at offered rates up to this (above, a case would just wait out the backlog).
RATE_BASELINE_MAX = 100_000
# Where one core is not saturated: what compression adds per delivery there.
RATE_DEFLATE_MAX = 200_000
# Kinds that can also run from another git revision (KIND@REV).  The baseline
# is bench code, not the gateway: it has no revision to compare.
REV_KINDS = ("compiled", "purepy")
ALL_SCENARIOS = ["protocol", "market", "wide", "latency", "memory", "hot",
                 "market-deflate", "market-mixed", "market-auth", "market-seq", "latency-seq"]
# Also runnable, not in the default run: rate (fixed offered rates x pipelines).
EXTRA_SCENARIOS = ["rate"]
# The market workload with one feature switched on.  Each is measured against
# a plain market case run right next to it (see schedule()).
MARKET_MODES = {
    "market-deflate": {"mode": "deflate", "deflate": 1.0},
    "market-mixed": {"mode": "mixed", "deflate": 0.5},
    "market-auth": {"mode": "auth", "auth": True},
    "market-seq": {"mode": "seq", "seq": True},
}
# The epoch the publisher puts in sequenced trades (publisher -E).
SEQ_EPOCH = "bench1"


# ---------------------------------------------------------------- sizes ----

@dataclass
class Sizes:
    market_symbols: int = 100
    market_clients: int = 1000
    market_msgs: int = 40_000          # x ~50 subscribers = 2M deliveries
    wide_symbols: int = 10_000
    wide_clients: int = 1000
    wide_msgs: int = 300_000           # every symbol 30 times; half have a subscriber
    latency_loads: tuple = (50_000, 400_000, 1_000_000)   # deliveries/s offered
    latency_duration_s: float = 5.0
    latency_skip_ms: int = 500         # warm-up not counted in the percentiles
    latency_drain_s: float = 10.0      # how long an overloaded gateway may lag
    # rate scenario: offered deliveries/s x publisher pipeline (trades per write)
    rate_loads: tuple = (50_000, 200_000, 500_000, 1_000_000)
    rate_pipelines: tuple = (1, 10, 100)
    memory_clients: int = 10_000
    memory_settle_s: float = 1.0       # after READY, before reading RSS
    memory_close_wait_s: float = 1.5   # after the clients leave
    hot_clients: int = 5000
    hot_msgs: int = 300                # x 5,000 = 1.5M deliveries
    per_client: int = 5
    sample_every: int = 16
    latency_sample_every: int = 4
    sat_timeout_s: float = 90.0


SMOKE = Sizes(
    market_symbols=20, market_clients=50, market_msgs=400,
    wide_symbols=500, wide_clients=50, wide_msgs=2000,
    latency_loads=(5_000,), latency_duration_s=1.0, latency_skip_ms=100,
    latency_drain_s=3.0, rate_loads=(5_000,), rate_pipelines=(1, 10), memory_clients=200, memory_settle_s=0.3, memory_close_wait_s=0.5, hot_clients=100, hot_msgs=20,
    sample_every=4, latency_sample_every=2, sat_timeout_s=15.0,
)


# ------------------------------------------------------------ processes ----

class Procs:
    """Every child process, so that all of them die at the end, even on error."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, argv, *, cpu: int | None, log: Path | None = None, env=None,
              stdout=None, nofile: int | None = None, cwd: Path | None = None) -> subprocess.Popen:
        # Own process group: a signal to the harness does not reach the child
        # mid-measurement, and cleanup can kill each group by id.  A harness
        # killed outright takes its children with it.
        p = spawn(argv, env=env, cwd=cwd or ROOT, log=log, stdout=stdout, cpu=cpu,
                  new_group=True, die_with_parent=True, nofile=nofile)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if p in self.live:
            self.live.remove(p)
        return p.returncode

    def kill_all(self) -> None:
        for p in list(self.live):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
            self.live.remove(p)


PROCS = Procs()


def proc_cpu_s(pid: int) -> float:
    """utime+stime of a live process in seconds (procfs.cpu_seconds, but a
    vanished process is a harness error: a case's figures would be wrong)."""
    v = procfs.cpu_seconds(pid)
    if v is None:
        raise HarnessError(f"no /proc/{pid}/stat: the process is gone")
    return v


def proc_cpu_or_zero(pid: int | None) -> float:
    return (procfs.cpu_seconds(pid) or 0.0) if pid is not None else 0.0


def proc_rss_kib(pid: int) -> int:
    v = procfs.rss_kb(pid)
    if v is None:
        raise HarnessError(f"no VmRSS for pid {pid}")
    return v


# --------------------------------------------------------------- builds ----

def build_tools() -> dict[str, Path]:
    """Compile the C tools into a cache dir keyed by source hash (never into the repo)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise HarnessError("gcc not found: the load client and publisher are C programs")
    cache = Path(tempfile.gettempdir()) / "gateway-bench-build"
    cache.mkdir(exist_ok=True)
    out = {}
    # The load client inflates permessage-deflate frames with zlib; the floor
    # gateway takes SHA-1 (Sec-WebSocket-Accept) from libcrypto where its
    # headers are installed, else from its own few lines.
    libs = {"loadclient": ["-lz"], "publisher": [], "floor_gateway": []}
    if has_c_header(gcc, "openssl/sha.h"):
        libs["floor_gateway"] = ["-DHAVE_OPENSSL", "-lcrypto"]
    for name in ("loadclient", "publisher", "floor_gateway"):
        src = BENCH / f"{name}.c"
        # the link flags are part of the key: a binary built without them is stale
        digest = hashlib.sha256(src.read_bytes() + " ".join(libs[name]).encode()).hexdigest()[:16]
        exe = cache / f"{name}-{digest}"
        if not exe.exists():
            tmp = cache / f".{name}-{digest}.{os.getpid()}"
            r = subprocess.run([gcc, "-O2", "-Wall", "-o", str(tmp), str(src), *libs[name]],
                               capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise HarnessError(f"building {name} failed:\n{r.stderr}")
            tmp.replace(exe)   # atomic: concurrent runs never see half a binary
        out[name] = exe
    return out


def has_c_header(gcc: str, header: str) -> bool:
    """Whether `#include <header>` compiles (preprocessor only)."""
    r = subprocess.run([gcc, "-E", "-x", "c", "-"], input=f"#include <{header}>\n",
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0


# ---------------------------------------------------------------- redis ----

class Redis(RedisServer):
    """The bench's redis-server: on the auxiliary core, in its own process
    group, no output-buffer limit for pub/sub clients (Redis keeps a lagging
    gateway's backlog instead of disconnecting it)."""

    def __init__(self, workdir: Path) -> None:
        if not redis_installed():
            raise HarnessError("redis-server not found")
        super().__init__(extra=["--client-output-buffer-limit", "pubsub 0 0 0",
                                "--maxclients", "1000", "--protected-mode", "no"],
                         cpu=AUX_CPU, new_group=True, die_with_parent=True,
                         log_path=workdir / "redis.log", workdir=workdir)
        self.start()
        PROCS.live.append(self.proc)

    def numpat(self) -> int:
        return self.command("PUBSUB", "NUMPAT")

    def publish(self, channel: str, payload: bytes) -> int:
        return self.command("PUBLISH", channel, payload)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)


# -------------------------------------------------------------- gateway ----

def parse_variant(spec: str) -> tuple[str, str | None]:
    """`compiled` -> ("compiled", None); `compiled@main` -> ("compiled", "main").
    Raises ValueError for an unknown kind, an empty revision or `baseline@REV`."""
    kind, sep, rev = spec.partition("@")
    if kind not in KNOWN_VARIANTS:
        raise ValueError(f"unknown variant {spec!r} (kinds: {', '.join(KNOWN_VARIANTS)})")
    if not sep:
        return kind, None
    if kind not in REV_KINDS:
        raise ValueError(f"{spec!r}: only {' and '.join(REV_KINDS)} run from another revision")
    if not rev or rev != rev.strip() or rev.startswith("-"):
        raise ValueError(f"{spec!r}: no revision after '@'")
    return kind, rev


def variant_kind(variant: str) -> str:
    """compiled, purepy or baseline, for a plain or a resolved KIND@HASH name."""
    return variant.partition("@")[0]


def resolve_rev(rev: str) -> tuple[str, str]:
    """(full hash, short hash) of a revision of the repository holding this script."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ValueError(f"revision {rev!r}: {(r.stderr.strip() or 'not found').splitlines()[-1]}")
        return r.stdout.strip()
    full = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    return full, git("rev-parse", "--short", full)


@dataclass
class RevSource:
    """Where a KIND@REV variant comes from."""
    rev: str                  # as given: main, HEAD~3, 1c8e02a
    commit: str               # full hash
    tree: Path | None = None  # exported and built (set by RevTrees.build)
    build_s: float | None = None
    gateway_file: str | None = None   # what `import gateway` finds there


# resolved variant name (compiled@1c8e02a) -> its source; filled by parse_args
REV_SOURCES: dict[str, RevSource] = {}


class RevTrees:
    """One exported and built tree per commit, all under one temporary
    directory that cleanup() removes (main() calls it in `finally`, which runs
    on an error, Ctrl-C and SIGTERM alike)."""

    def __init__(self) -> None:
        self.base: Path | None = None
        self.trees: dict[str, Path] = {}

    def build(self, commit: str, short: str) -> tuple[Path, float]:
        if commit in self.trees:
            return self.trees[commit], 0.0
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="gateway-bench-rev-"))
        tree = self.base / short
        tree.mkdir()
        t = time.monotonic()
        # git archive, not git worktree: nothing is registered in the repository.
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                   stdout=subprocess.PIPE)
        try:
            untar = subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout,
                                   capture_output=True, timeout=120)
        finally:
            archive.stdout.close()
            archive.wait(30)
        if archive.returncode != 0 or untar.returncode != 0:
            raise HarnessError(f"exporting {short} failed: {untar.stderr.decode(errors='replace')}")
        env = dict(os.environ)
        env.pop("GATEWAY_DEBUG", None)
        env.pop("GATEWAY_ANNOTATE", None)
        r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise HarnessError(f"building the extension of {short} failed:\n{r.stderr[-3000:]}")
        self.trees[commit] = tree
        return tree, time.monotonic() - t

    def cleanup(self) -> None:
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            self.trees.clear()


def gateway_source(variant: str) -> tuple[Path, dict]:
    """cwd for a gateway variant and the environment entries it needs: the
    working tree, or the exported tree of its revision (also on PYTHONPATH, so
    neither the caller's PYTHONPATH nor an editable install of another checkout
    can take its place)."""
    src = REV_SOURCES.get(variant)
    if src is None:
        return ROOT, {}
    if src.tree is None:
        raise HarnessError(f"{variant}: its tree was not built")
    return src.tree, {"PYTHONPATH": str(src.tree)}


def variant_available(variant: str) -> tuple[bool, str]:
    kind = variant_kind(variant)
    if kind in NO_METRICS_KINDS:    # bench code: built or run as it is
        return True, ""
    probe = "import gateway._fastpath" if kind in COMPILED_KINDS else "import gateway"
    probe += "; import gateway as g; print(g.__file__)"
    cwd, extra = gateway_source(variant)
    env = dict(os.environ)
    env.update(extra)
    if kind == "purepy":
        env["GATEWAY_NO_EXTENSIONS"] = "1"
    try:
        r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, f"`{probe}` timed out"
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"`{probe}` failed: {tail}"
    src = REV_SOURCES.get(variant)
    if src is not None:
        found = (r.stdout.strip().splitlines() or [""])[-1]
        src.gateway_file = found
        if not Path(found).resolve().is_relative_to(src.tree.resolve()):
            raise HarnessError(f"{variant}: `import gateway` found {found}, not the tree {src.tree}")
    return True, ""


def mapped_fastpath(pid: int) -> str | None:
    """Path of the compiled fast path a running gateway has loaded, if any."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as f:
        for line in f:
            path = line.rstrip("\n").split(None, 5)[-1]
            if "/gateway/_fastpath" in path and path.endswith(".so"):
                return path
    return None


class Gateway:
    """One gateway process of a variant (a GatewayProcess on CPU 0 in its own
    process group), ready once it accepts TCP and its pattern is in Redis."""

    def __init__(self, variant: str, redis: Redis, logdir: Path, tag: str,
                 nofile: int = 20000, extra_env: dict | None = None) -> None:
        self.variant = variant
        self.log = logdir / f"gateway-{tag}.log"
        env = dict(os.environ)
        env.pop("GATEWAY_NO_EXTENSIONS", None)
        # Whatever the caller's environment says, a case starts with compression
        # at its default (on: it only applies to clients that offer it) and
        # authentication off, unless the case asks for it.
        for k in ("WS_JWT_SECRET", "WS_JWT_PUBLIC_KEY", "WS_COMPRESSION"):
            env.pop(k, None)
        env.update(WS_MAX_SYMBOLS="5", WS_CHANNEL_PREFIX=CHANNEL_PREFIX,
                   LOG_LEVEL="WARNING", WS_STATS_INTERVAL="3600", PYTHONUNBUFFERED="1",
                   # every load-client connection comes from 127.0.0.1: lift the
                   # gateway's per-address connection cap (the baseline has none)
                   WS_MAX_CONNECTIONS_PER_IP="0")
        env.update(extra_env or {})
        kind = variant_kind(variant)
        self.kind = kind
        cwd, source_env = gateway_source(variant)
        env.update(source_env)
        port = None
        if kind == "baseline":
            argv = [sys.executable, str(BENCH / "baseline_gateway.py")]
        elif kind == FLOOR_VARIANT:
            # The C floor takes its ports as arguments (GatewayProcess would
            # pick the port only after the argv is made).
            port = free_port()
            argv = [str(build_tools()["floor_gateway"]), "-p", str(port), "-r", str(redis.port),
                    "-P", CHANNEL_PREFIX]
        else:
            argv = [sys.executable, "-m", "gateway"]
            if kind == "purepy":
                env["GATEWAY_NO_EXTENSIONS"] = "1"
        if kind == COALESCED_VARIANT:
            env["WS_WRITE_DELAY_US"] = str(COALESCED_DELAY_US)
        self.workers = 2 if kind == WORKERS_VARIANT else 1
        if self.workers > 1:
            env["WS_WORKERS"] = str(self.workers)
        if redis.numpat() != 0:
            raise HarnessError("a previous gateway still holds its Redis pattern")
        self.gp = GatewayProcess(redis.url, port=port, log_path=self.log, env=env, argv=argv, cwd=cwd,
                                 cpu=GATEWAY_CPU if self.workers == 1 else None, new_group=True,
                                 die_with_parent=True, nofile=nofile)
        self.port = self.gp.port
        self.proc = self.gp.start().proc
        PROCS.live.append(self.proc)
        self.pid = self.proc.pid
        # Ready = accepting TCP and PSUBSCRIBEd (else the first trades are lost);
        # the baseline has no /readyz, so not GatewayProcess.wait_ready().
        deadline = time.monotonic() + 20
        while not (port_open(self.port, timeout=0.5) and redis.numpat() >= 1 and self._workers_ready()):
            if not self.alive():
                raise HarnessError(f"{variant} gateway exited with {self.proc.returncode} "
                                   f"at startup:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{variant} gateway not ready in 20 s:\n{self.log_tail()}")
            time.sleep(0.05)
        if kind == "compiled" and variant in REV_SOURCES:
            # The measured process itself, not just the probe, runs that tree's code.
            so = mapped_fastpath(self.pid)
            if so is None or not Path(so).resolve().is_relative_to(cwd.resolve()):
                raise HarnessError(f"{variant} gateway loaded {so}, not {cwd}'s fast path")

    def _workers_ready(self) -> bool:
        """Every worker subscribed (one alone: what NUMPAT said already)."""
        if self.workers == 1:
            return True
        m = scrape_metrics(self.port) or {}
        return sum(v for k, v in m.items() if k.startswith("gateway_redis_ready{")) == self.workers

    def pids(self) -> list[int]:
        """The gateway's processes: itself, and with workers its children."""
        if self.workers == 1:
            return [self.pid]
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            return [self.pid, *map(int, kids)]
        return [self.pid]

    def alive(self) -> bool:
        return self.gp.alive()

    def counters(self) -> dict | None:
        """The gateway's own delivery counters, from its start: frames
        delivered, socket writes to clients ("sends"), Redis messages (and, for
        the floor, Redis reads).  None for the baseline, which counts nothing.

        compiled/purepy: /metrics (gateway_writes_total counts one write per
        client per batch: what reaches picows' transport; a transport with
        bytes already queued appends instead of sending).  floor: SIGUSR1 makes
        it print a STATS line; its sends are send() calls, EAGAIN included.
        Both cost the gateway a little CPU: read them outside a timed window.
        """
        if self.kind == "baseline":
            return None
        if self.kind == FLOOR_VARIANT:
            return self._floor_stats()
        m = scrape_metrics(self.port, timeout=5.0)
        if m is None:
            return None

        def total(name: str) -> float | None:
            # one process, or the sum over --workers' labelled series
            vals = [v for k, v in m.items() if k == name or k.startswith(name + "{")]
            return sum(vals) if vals else None
        return {"frames": total("gateway_frames_sent_total"), "sends": total("gateway_writes_total"),
                "redis_messages": total("gateway_redis_messages_total"), "redis_reads": None}

    def _floor_stats(self) -> dict | None:
        def stats_lines() -> list[str]:
            return [ln for ln in self.log.read_text(errors="replace").splitlines()
                    if ln.startswith("STATS ")]
        before = len(stats_lines())
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = stats_lines()
            if len(lines) > before:
                st = json.loads(lines[-1].split(" ", 1)[1])
                return {"frames": st["frames"], "sends": st["sends"],
                        "redis_messages": st["redis_messages"], "redis_reads": st["redis_reads"]}
            time.sleep(0.01)
        return None

    def cpu_s(self) -> float:
        return sum(proc_cpu_or_zero(p) for p in self.pids())

    def rss_kib(self) -> int:
        return sum(proc_rss_kib(p) for p in self.pids())

    def schedstat(self) -> tuple[int, int] | None:
        if self.workers == 1:
            return self.gp.schedstat()
        stats = [procfs.schedstat(p) for p in self.pids()]
        if any(s is None for s in stats):
            return None
        return sum(s[0] for s in stats if s), sum(s[1] for s in stats if s)

    def log_tail(self, n: int = 15) -> str:
        return self.gp.log_tail(n)

    def log_problems(self) -> list[str]:
        """Tracebacks and ERROR lines the gateway logged during the case."""
        return self.gp.log_problems()

    def stop(self, redis: Redis) -> int | None:
        """SIGTERM (SIGKILL to the group after 10 s); the exit code, None if killed."""
        rc = self.gp.stop(timeout=10)
        if self.proc in PROCS.live:
            PROCS.live.remove(self.proc)
        # Wait for Redis to notice the gateway's connection closed, so the next
        # gateway's readiness check (NUMPAT >= 1) cannot see a stale pattern.
        deadline = time.monotonic() + 10
        while redis.numpat() != 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return rc


# ----------------------------------------------------------- topologies ----

def symbol_name(i: int) -> str:
    """4 upper-case letters (AAAA, AAAB, ...): valid tickers, 456,976 of them."""
    s = ""
    for _ in range(4):
        s = chr(65 + i % 26) + s
        i //= 26
    return s


def per_symbol_counts(total_msgs: int, nsym: int) -> list[int]:
    """The publisher sends message k to symbol k mod nsym."""
    q, r = divmod(total_msgs, nsym)
    return [q + (1 if s < r else 0) for s in range(nsym)]


def client_symbols(nclients: int, nsym: int, per: int) -> list[list[int]]:
    """Client i takes symbols per*i .. per*i+per-1 (mod nsym): with 1,000 x 5 of
    100 symbols every symbol has exactly 50 subscribers."""
    per = min(per, nsym)
    return [[(per * i + j) % nsym for j in range(per)] for i in range(nclients)]


@dataclass
class Topology:
    nsym: int
    clients: list[list[int]]

    @property
    def subscribers(self) -> list[int]:
        n = [0] * self.nsym
        for syms in self.clients:
            for s in syms:
                n[s] += 1
        return n

    def write(self, workdir: Path, tag: str, msgs_per_symbol: list[int] | None) -> tuple[Path, Path, int]:
        symfile = workdir / f"symbols-{tag}.txt"
        symfile.write_text("".join(symbol_name(i) + "\n" for i in range(self.nsym)))
        connfile = workdir / f"conns-{tag}.txt"
        total = 0
        lines = []
        for syms in self.clients:
            exp = sum(msgs_per_symbol[s] for s in syms) if msgs_per_symbol else 0
            total += exp
            lines.append(f"{exp} {' '.join(symbol_name(s) for s in syms)}\n")
        connfile.write_text("".join(lines))
        return symfile, connfile, total


# ----------------------------------------------------------- load runs ----

class LoadClient:
    def __init__(self, exe: Path, port: int, connfile: Path, *, deadline_s: float,
                 run_s: float = 0, sample: int, idle_ms: int = 0, skip_ms: int = 0,
                 hold: bool = False, keep_open: bool = False, grace_ms: int = 0, inflight: int = 64,
                 deflate: float = 0.0, paths_file: Path | None = None,
                 workdir: Path, extra: list[str] | tuple = (), tag: str = "loadclient") -> None:
        # deadline_s bounds the whole life of the client; run_s bounds the part
        # after READY, so a slow connect phase does not lengthen a run.
        argv = [str(exe), "-p", str(port), "-f", str(connfile), "-d", f"{deadline_s:.1f}",
                "-D", f"{run_s:.1f}",
                "-s", str(sample), "-i", str(idle_ms), "-k", str(skip_ms),
                "-g", str(grace_ms), "-m", str(inflight)]
        if hold:
            argv.append("-w")
        if keep_open:
            argv.append("-K")
        if deflate:
            argv += ["-z", f"{deflate:g}"]
        if paths_file:
            argv += ["-T", str(paths_file)]
        argv += list(extra)
        self.deadline_s = deadline_s
        self.out_path = workdir / f"{tag}-{time.monotonic_ns()}.out"
        self.out = open(self.out_path, "wb")  # noqa: SIM115  (the child writes it; closed in finish)
        self.proc = PROCS.start(argv, cpu=AUX_CPU, stdout=self.out,
                                log=workdir / "loadclient.log", nofile=20000)
        self.started = time.monotonic()

    def _lines(self) -> list[str]:
        """The whole lines written so far (a line may reach the file in
        several writes while the client runs)."""
        text = self.out_path.read_text(errors="replace")
        return text[:text.rfind("\n") + 1].splitlines()

    def _report(self) -> dict | None:
        for line in reversed(self._lines()):
            if line.startswith("{"):
                return json.loads(line)
        return None

    def wait_ready(self, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._lines():
                if line.startswith("READY"):
                    _, ok, failed = line.split()
                    return int(ok), int(failed)
            if self.proc.poll() is not None:
                raise HarnessError(f"load client exited ({self.proc.returncode}) before READY")
            time.sleep(0.02)
        raise HarnessError(f"load client not READY after {timeout:.0f} s")

    def report_when_done(self, timeout: float) -> dict:
        """The report of a client started with keep_open, which prints it
        and keeps its connections open until close()."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rep = self._report()
            if rep is not None:
                return rep
            if self.proc.poll() is not None:
                raise HarnessError(f"load client exited ({self.proc.returncode}) without a report")
            time.sleep(0.02)
        PROCS.stop(self.proc, timeout=2)
        raise HarnessError("load client did not finish in time")

    def close(self) -> None:
        PROCS.stop(self.proc)
        self.out.close()

    def finish(self, timeout: float, terminate: bool = False) -> dict:
        if terminate:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            PROCS.stop(self.proc, timeout=2)
            raise HarnessError("load client did not finish in time") from None
        self.close()
        rep = self._report()
        if rep is None:
            raise HarnessError("load client printed no report")
        return rep


def run_publisher(exe: Path, redis: Redis, symfile: Path, workdir: Path, *,
                  total: int | None = None, rate: int | None = None,
                  duration_s: float | None = None, timeout: float, seq: bool = False,
                  pipeline: int | None = None) -> dict:
    """pipeline (rate mode): N trades per write, writes evenly spaced (publisher
    -L); None: each 1 ms tick writes its share."""
    argv = [str(exe), "-p", str(redis.port), "-s", str(symfile), "-P", CHANNEL_PREFIX]
    if seq:
        argv += ["-E", SEQ_EPOCH]
    if rate:
        argv += ["-m", "rate", "-r", str(rate), "-d", f"{duration_s:.3f}"]
        if pipeline:
            argv += ["-L", str(pipeline)]
    else:
        argv += ["-m", "sat", "-n", str(total)]
    outp = workdir / f"publisher-{time.monotonic_ns()}.out"
    with open(outp, "wb") as out:
        p = PROCS.start(argv, cpu=AUX_CPU, stdout=out, log=workdir / "publisher.log")
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            PROCS.stop(p, timeout=1)
            raise HarnessError("publisher did not finish in time") from None
        PROCS.stop(p)
    lines = [ln for ln in outp.read_text().splitlines() if ln.startswith("{")]
    if not lines:
        raise HarnessError(f"publisher failed (exit {p.returncode})")
    return json.loads(lines[-1])


def correctness_problems(lc: dict, pub: dict | None, *, allow_missing: bool = False) -> list[str]:
    """Everything that makes a delivery run wrong, as short human strings."""
    probs = []
    for key in ("connect_failures", "upgrade_errors", "subscribe_errors", "server_closes",
                "closed_while_active", "extra", "seq_gaps", "seq_dups", "wrong_symbol",
                "parse_errors", "rsv_errors", "extension_errors", "inflate_errors"):
        if lc.get(key):
            probs.append(f"{key}={lc[key]}")
    if lc.get("missing") and not allow_missing:
        probs.append(f"missing={lc['missing']} of {lc['expected_total']} deliveries")
    if pub is not None:
        if pub.get("receivers_zero"):
            probs.append(f"{pub['receivers_zero']} publishes reached no subscriber in Redis")
        if pub.get("errors"):
            probs.append(f"publisher errors={pub['errors']}")
    return probs


def slim(lc: dict) -> dict:
    return {k: v for k, v in lc.items() if k != "latency_hist"}


# ------------------------------------------------------- auth, upgrades ----

def make_tokens(n: int, secret: str) -> list[str]:
    """HS256 tokens for user0..user(n-1): one per connection, as distinct users
    would present them (per-user connection limits are off by default)."""
    try:
        import jwt  # PyJWT: the gateway's own dependency for WS_JWT_SECRET
    except ImportError as e:
        raise HarnessError(f"market-auth needs PyJWT in the harness's python: {e}") from None
    return [jwt.encode({"sub": f"user{i}"}, secret, algorithm="HS256") for i in range(n)]


def upgrade_status(port: int, path: str = "/") -> int:
    """HTTP status of one WebSocket upgrade request (0 if no status line came
    back); the connection is closed right after the status line."""
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n")
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(req.encode())
        while b"\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return int(m.group(1)) if m else 0


def auth_refusals(port: int, secret: str) -> list[str]:
    """Problems if the gateway admits what it must refuse: no token, and a
    token signed with another secret.  Guards the auth case against measuring
    a gateway that quietly ignores WS_JWT_SECRET."""
    probs = []
    forged = make_tokens(1, secret + "-not")[0]
    for label, path in (("no token", "/"), ("token with a wrong signature", f"/?token={forged}")):
        status = upgrade_status(port, path)
        if status != 401:
            probs.append(f"upgrade with {label} got HTTP {status}, expected 401")
    return probs


# ------------------------------------------------------------ scenarios ----

@dataclass
class Ctx:
    tools: dict
    redis: Redis
    workdir: Path
    sizes: Sizes
    smoke: bool
    results: list = field(default_factory=list)


# BENCH_PERF_DIR=<dir>: record each case's gateway with `perf record -g`
# over the delivery window into <dir>/<tag>.data (read it with `perf report
# -i`). Profiling costs the gateway CPU: figures of such a run are not results.
PERF_DIR = os.environ.get("BENCH_PERF_DIR")


def start_perf(gw: Gateway, tag: str) -> subprocess.Popen | None:
    if not PERF_DIR or not gw.pids():
        return None
    Path(PERF_DIR).mkdir(parents=True, exist_ok=True)
    pids = ",".join(map(str, gw.pids()))
    p = PROCS.start(["perf", "record", "-q", "-g", "-e", "cpu-clock", "-F", "2999", "-p", pids,
                     "-o", str(Path(PERF_DIR) / f"{tag}.data")],
                    cpu=AUX_CPU, log=Path(PERF_DIR) / f"{tag}.log")
    time.sleep(0.3)     # perf attached before the first trade
    return p


def stop_perf(p: subprocess.Popen | None) -> None:
    if p is not None:
        p.send_signal(signal.SIGINT)     # perf writes its file on SIGINT
        p.wait(timeout=30)
        PROCS.stop(p)


def delivery_case(ctx: Ctx, variant: str, tag: str, topo: Topology, *, total_msgs: int | None = None,
                  rate: int | None = None, duration_s: float | None = None, sample: int,
                  skip_ms: int = 0, allow_overload: bool = False, inflight: int = 64,
                  mode: str = "plain", deflate: float = 0.0, auth: bool = False,
                  seq: bool = False, pipeline: int | None = None, count_sends: bool = False) -> dict:
    """One gateway, one load client, one publisher run; returns the case record.

    deflate: fraction of the clients that offer permessage-deflate.
    auth: run the gateway with WS_JWT_SECRET and give every client its own token.
    seq: publish every trade in publish_trade's sequenced form (plain PUBLISH).
    pipeline: with rate, the publisher writes N trades at a time (see run_publisher).
    count_sends: read the gateway's own counters (Gateway.counters) just
    outside the timed window, for sends per delivery.
    """
    loadavg = os.getloadavg()
    sz = ctx.sizes
    if rate:
        nticks = int(duration_s * 1000 + 0.5)
        total_msgs = int(rate * nticks / 1000)
    counts = per_symbol_counts(total_msgs, topo.nsym)
    symfile, connfile, expected = topo.write(ctx.workdir, tag, counts)
    n = len(topo.clients)
    extra_env: dict = {}
    paths_file = None
    secret = ""
    warm_path = "/"
    if auth:
        secret = secrets.token_hex(32)
        extra_env["WS_JWT_SECRET"] = secret
        tokens = make_tokens(n, secret)
        paths_file = ctx.workdir / f"paths-{tag}.txt"
        paths_file.write_text("".join(f"/?token={t}\n" for t in tokens))
        warm_path = f"/?token={tokens[0]}"
    gw = Gateway(variant, ctx.redis, ctx.workdir, tag, extra_env=extra_env)
    auth_probs: list[str] = []
    try:
        # One upgrade before the load client, measured on its own: whatever the
        # first connection pays once (a lazy import, say) stays out of the
        # per-connection connect cost below, and is reported apart.
        sched_w0 = gw.schedstat()
        warm_status = upgrade_status(gw.port, warm_path)
        # schedstat is brought up to date when the gateway goes back to sleep:
        # give it time to finish this connection (welcome, close) first.
        time.sleep(0.05)
        sched_w1 = gw.schedstat()
        if warm_status != 101:
            raise HarnessError(f"warm-up upgrade got HTTP {warm_status}:\n{gw.log_tail()}")
        connect_budget = 30 + n / 200        # generous: a slow gateway accepts ~1k/s
        run_budget = (duration_s + sz.latency_drain_s) if rate else sz.sat_timeout_s
        lc = LoadClient(ctx.tools["loadclient"], gw.port, connfile,
                        deadline_s=connect_budget + run_budget, run_s=run_budget, sample=sample,
                        idle_ms=0 if rate else 5000, skip_ms=skip_ms, grace_ms=200,
                        inflight=inflight, deflate=deflate, paths_file=paths_file,
                        workdir=ctx.workdir, keep_open=True)
        try:
            ok_conns, failed = lc.wait_ready(connect_budget)
        except HarnessError:
            PROCS.stop(lc.proc, timeout=2)
            raise
        # Gateway CPU for the connect phase: upgrade (and token check), welcome,
        # subscribe, for every connection.  READY is polled every 20 ms, so the
        # window ends a little late, but an idle gateway spends nothing then.
        sched_c1 = gw.schedstat()
        rss_ready = gw.rss_kib()
        counts0 = gw.counters() if count_sends else None
        if counts0 is not None:
            time.sleep(0.05)    # the gateway back asleep: schedstat up to date
        cpu0, rcpu0, t0_real = gw.cpu_s(), ctx.redis.cpu_s(), time.time_ns()
        sched0 = gw.schedstat()
        cores0 = procfs.core_times()
        ksoft_pid = procfs.kernel_thread_pid(f"ksoftirqd/{GATEWAY_CPU}")
        ksoft0 = proc_cpu_or_zero(ksoft_pid)
        perf = start_perf(gw, tag)
        pub = run_publisher(ctx.tools["publisher"], ctx.redis, symfile, ctx.workdir,
                            total=None if rate else total_msgs, rate=rate, duration_s=duration_s,
                            timeout=(duration_s + 15) if rate else sz.sat_timeout_s, seq=seq,
                            pipeline=pipeline)
        # The window ends at the report, after the last delivery and the
        # client's idle grace: the connections are still open, so their
        # teardown (a Python session each in the gateway) is not counted.
        try:
            rep = lc.report_when_done(timeout=run_budget + 30)
            stop_perf(perf)
            cpu1, rcpu1 = gw.cpu_s(), ctx.redis.cpu_s()
            sched1 = gw.schedstat()
            cores1 = procfs.core_times()
            ksoft1 = proc_cpu_or_zero(ksoft_pid)
        finally:
            lc.close()
        alive = gw.alive()
        counts1 = gw.counters() if counts0 is not None and alive else None
        rss_end = gw.rss_kib() if alive else None
        if auth and alive:
            auth_probs = auth_refusals(gw.port, secret)   # after the measurement
        seq_probs, seq_counts = [], None
        if alive and variant_kind(variant) not in NO_METRICS_KINDS:
            # after the measurement: did the gateway take the trades as
            # sequenced (seq) or as plain (not seq), without duplicates or gaps?
            seq_probs, seq_counts = sequenced_check(gw.port, pub["sent"] if seq else 0)
    finally:
        rc = gw.stop(ctx.redis)
    frames = rep["frames_total"]
    window_s = max((rep["t_last_ns"] - t0_real) / 1e9, 1e-9) if frames else None
    gw_cpu = cpu1 - cpu0
    overloaded = False
    if rate:
        # Sustained = everything arrived and the last frame came within a second of the
        # schedule's end; otherwise the gateway fell behind the offered load.
        overloaded = bool(rep["missing"]) or (window_s or 0) > duration_s + 1.0
    probs = correctness_problems(rep, pub, allow_missing=allow_overload and overloaded)
    probs += auth_probs + seq_probs
    if deflate:
        # The gateway agrees to every offer it can and compresses every trade for
        # those clients; otherwise this case would measure something else.
        if rep["deflate_conns"] != rep["deflate_offered"]:
            probs.append(f"permessage-deflate agreed on {rep['deflate_conns']} of "
                         f"{rep['deflate_offered']} offers")
        if rep["compressed_frames"] != rep["deflate_conn_frames"]:
            probs.append(f"{rep['deflate_conn_frames'] - rep['compressed_frames']} trades reached "
                         "deflate clients uncompressed")
    if not alive:
        probs.append(f"gateway died during the case (exit {gw.proc.returncode})")
    probs += [f"gateway log: {ln}" for ln in gw.log_problems()]
    lc_cpu = rep["cpu_user_s"] + rep["cpu_sys_s"] - rep.get("cpu_at_ready_s", 0)
    # Anything else that ran on the gateway's core (another user's processes on a
    # shared machine) makes the case slower without the gateway being at fault.
    notes = []
    waited = (sched1[1] - sched0[1]) / 1e9 if sched0 and sched1 else 0.0
    shared = bool(window_s and waited > max(0.05, 0.05 * window_s))
    if shared:
        notes.append(f"core {GATEWAY_CPU} shared: the gateway waited {waited:.2f} s of the "
                     f"{window_s:.2f} s window for its core; throughput may be understated")
    # The same from outside: time the hypervisor gave the gateway's core to
    # someone else (steal) shows in the guest as slower sends and CPU.
    gw_core = procfs.core_usage(cores0, cores1, GATEWAY_CPU)
    stolen = (gw_core or {}).get("steal_s", 0.0)
    if window_s and stolen > max(0.05, 0.05 * window_s):
        shared = True
        notes.append(f"core {GATEWAY_CPU} stolen: the hypervisor took {stolen:.2f} s of the "
                     f"{window_s:.2f} s window; CPU per delivery may be overstated")
    aux = procfs.core_usage(cores0, cores1, AUX_CPU)
    if window_s and window_s >= 1.0 and aux and aux["busy_s"] > 0.9 * window_s:
        notes.append(f"client core {AUX_CPU} saturated ({aux['busy_s']:.1f} s busy in a "
                     f"{window_s:.1f} s window; load client {lc_cpu:.1f} s): latency includes "
                     "client-side queueing")
    if rc not in (0, None) and alive:
        notes.append(f"gateway exit code {rc} after SIGTERM (a clean stop exits 0; "
                     "-9 means it ignored SIGTERM for 10 s)")
    sched_cpu = (sched1[0] - sched0[0]) / 1e9 if sched0 and sched1 else None
    connect_cpu = (sched_c1[0] - sched_w1[0]) / 1e9 if sched_w1 and sched_c1 else None
    cframes, pframes = rep["compressed_frames"], frames - rep["compressed_frames"]
    counted = ({k: (counts1[k] - counts0[k]) if counts1.get(k) is not None and counts0.get(k) is not None
                else None for k in counts1} if counts0 and counts1 else None)
    sends = counted.get("sends") if counted else None
    if counted and counted.get("frames") is not None and counted["frames"] != frames:
        # the load client got something the gateway did not count (or the
        # reverse): the per-delivery figures would not mean what they say
        probs.append(f"gateway counted {counted['frames']:.0f} frames delivered, "
                     f"the load client received {frames}")
    return {
        "variant": variant, "mode": mode, "clients": n, "symbols": topo.nsym,
        "published": pub["sent"], "expected_deliveries": expected, "deliveries": frames,
        "missing": rep["missing"], "order_violations": rep["seq_gaps"] + rep["seq_dups"],
        "window_s": window_s,
        "deliveries_per_s": frames / window_s if window_s else 0,
        # publishes the gateway got through: the last delivery marks the end
        "publishes_per_s": pub["sent"] / window_s if window_s else 0,
        "gateway_cpu_s": gw_cpu,
        # tick-sampled per-core /proc/stat: shows the softirq share of the
        # gateway's core, but under-counts short bursts on a mostly idle core
        "core_gateway": gw_core,
        "core_gateway_ksoftirqd_s": ksoft1 - ksoft0,
        "gateway_runqueue_wait_s": waited,
        "gateway_core_shared": shared,
        "notes": notes,
        "core_aux": aux,
        "gateway_cpu_s_schedstat": sched_cpu,
        # the same per delivery in ns precision (utime+stime ticks are 10 ms, a
        # few % of a compiled market window): what the market-* comparison uses
        "gateway_cpu_us_per_delivery_schedstat": sched_cpu / frames * 1e6 if frames and sched_cpu else None,
        # connect phase: N connections upgraded, welcomed and subscribed
        "connect_s": rep.get("connect_s"),
        "gateway_connect_cpu_s": connect_cpu,
        "gateway_connect_cpu_us_per_conn": connect_cpu / ok_conns * 1e6 if connect_cpu and ok_conns else None,
        "gateway_first_upgrade_cpu_ms": (sched_w1[0] - sched_w0[0]) / 1e6 if sched_w0 and sched_w1 else None,
        # WebSocket frame bytes (header + payload; no TCP/IP) per delivery, by kind
        "deflate_fraction": deflate, "deflate_conns": rep.get("deflate_conns"),
        "compressed_frames": cframes,
        "wire_bytes_per_delivery": (rep["wire_bytes_compressed"] + rep["wire_bytes_plain"]) / frames
        if frames else None,
        "wire_bytes_per_compressed_delivery": rep["wire_bytes_compressed"] / cframes if cframes else None,
        "wire_bytes_per_plain_delivery": rep["wire_bytes_plain"] / pframes if pframes else None,
        # payload compression on the sampled connections (what they inflated)
        "deflate_ratio": rep["inflated_in_bytes"] / rep["inflated_out_bytes"]
        if rep.get("inflated_out_bytes") else None,
        "gateway_cpu_util": gw_cpu / window_s if window_s else None,
        "gateway_cpu_us_per_delivery": gw_cpu / frames * 1e6 if frames else None,
        "gateway_cpu_us_per_publish": gw_cpu / pub["sent"] * 1e6 if pub["sent"] else None,
        "gateway_rss_kib_ready": rss_ready, "gateway_rss_kib_end": rss_end,
        "gateway_exit_code": rc,
        "redis_cpu_s": rcpu1 - rcpu0,
        "loadclient_cpu_s": lc_cpu,
        "loadclient_cpu_us_per_delivery": lc_cpu / frames * 1e6 if frames else None,
        "publisher_cpu_s": pub["cpu_user_s"] + pub["cpu_sys_s"],
        "latency_us": rep["latency_us"], "latency_hist": rep.get("latency_hist"),
        "offered_deliveries_per_s": (rate * expected / total_msgs) if rate and total_msgs else None,
        "overloaded": overloaded, "connected": ok_conns, "connect_failed": failed,
        "sequenced": seq, "gateway_seq_counters": seq_counts,
        "pipeline": pipeline, "loadavg_at_start": loadavg,
        # the gateway's own counters over the window (Gateway.counters)
        "gateway_counted": counted,
        "gateway_sends_per_delivery": sends / frames if sends is not None and frames else None,
        "gateway_us_per_send": sched_cpu / sends * 1e6 if sends and sched_cpu else None,
        "trades_per_redis_read": (counted["redis_messages"] / counted["redis_reads"]
                                  if counted and counted.get("redis_reads") else None),
        "ok": not probs, "problems": probs,
        "loadclient": slim(rep), "publisher": pub,
    }


SEQ_COUNTERS = ("gateway_sequenced_messages_total", "gateway_duplicate_messages_total",
                "gateway_gap_fills_total")


def sequenced_check(port: int, expected: int) -> tuple[list[str], dict | None]:
    """The gateway's own counters after a case: ``expected`` sequenced trades
    received (0 for a plain case), no duplicate dropped, no gap filled."""
    m = scrape_metrics(port, timeout=5.0)
    if m is None:
        return [], None     # a revision without /metrics: nothing to check
    workers = {k: v for k, v in m.items() if k.startswith(SEQ_COUNTERS[0] + "{worker=")}
    if workers:
        # ws-gateway --workers: every worker takes every trade; check each,
        # report the sum of the others' counters.
        probs = [f"{k}: {v:.0f} sequenced trades, {expected} published" for k, v in workers.items()
                 if v != expected]
        got = {k: sum(v for key, v in m.items() if key.startswith(k + "{")) for k in SEQ_COUNTERS}
        return probs + [f"{k}={got[k]:.0f}" for k in SEQ_COUNTERS[1:] if got[k]], got
    got = {k: m.get(k) for k in SEQ_COUNTERS}
    if got["gateway_sequenced_messages_total"] is None:
        return ([f"gateway counted no sequenced trades, {expected} published"] if expected
                else []), got
    probs = []
    if got["gateway_sequenced_messages_total"] != expected:
        probs.append(f"gateway counted {got['gateway_sequenced_messages_total']:.0f} sequenced "
                     f"trades, {expected} published sequenced")
    for k in SEQ_COUNTERS[1:]:
        if got[k]:
            probs.append(f"{k}={got[k]:.0f}")
    return probs, got


def scen_market(ctx: Ctx, variant: str) -> list[dict]:
    sz = ctx.sizes
    topo = Topology(sz.market_symbols, client_symbols(sz.market_clients, sz.market_symbols, sz.per_client))
    return [delivery_case(ctx, variant, f"market-{variant}", topo, total_msgs=sz.market_msgs,
                          sample=sz.sample_every)]


def market_mode(name: str):
    """The market workload (same topology, trades and sampling as `market`)
    with the feature of MARKET_MODES[name] switched on."""
    opts = MARKET_MODES[name]

    def scen(ctx: Ctx, variant: str) -> list[dict]:
        sz = ctx.sizes
        topo = Topology(sz.market_symbols, client_symbols(sz.market_clients, sz.market_symbols, sz.per_client))
        return [delivery_case(ctx, variant, f"{name}-{variant}", topo, total_msgs=sz.market_msgs,
                              sample=sz.sample_every, **opts)]
    scen.__name__ = f"scen_{name.replace('-', '_')}"
    return scen


def not_applicable(scen: str, variant: str) -> str | None:
    """Why a scenario does not run on a variant (None: it does)."""
    kind = variant_kind(variant)
    if scen == "latency-seq" and kind in NO_METRICS_KINDS:
        return f"the {kind} does not know sequenced trades"
    if scen in MARKET_MODES and kind == "baseline":
        return ("the baseline has no JWT check and compresses per connection with "
                "websockets' own deflate: not the gateway's feature under test")
    if kind == DEFLATE_VARIANT and scen != "rate":
        return "the deflate variant is for the rate scenario (market-deflate is its bursty form)"
    if scen in MARKET_MODES and kind == FLOOR_VARIANT:
        return "the floor has no JWT check, no compression and no sequencing"
    return None


def schedule(scenarios: list[str]) -> list[list[str]]:
    """Scenarios grouped into units that run together per variant and repeat.

    `market` and the market-* modes form one unit, at the place of the first of
    them: a plain market case always runs, and each mode runs right after it on
    the same variant (reversed on odd repeats), so a mode is compared with a
    plain run made seconds apart, not a whole benchmark apart."""
    units: list[list[str]] = []
    group: list[str] | None = None
    lat: list[str] | None = None         # latency-seq pairs with latency the same way
    for s in scenarios:
        if s == "market" or s in MARKET_MODES:
            if group is None:
                group = ["market"]
                units.append(group)
            if s not in group:
                group.append(s)
        elif s in ("latency", "latency-seq"):
            if lat is None:
                lat = ["latency"]
                units.append(lat)
            if s not in lat:
                lat.append(s)
        else:
            units.append([s])
    return units


def scen_wide(ctx: Ctx, variant: str) -> list[dict]:
    sz = ctx.sizes
    topo = Topology(sz.wide_symbols, client_symbols(sz.wide_clients, sz.wide_symbols, sz.per_client))
    return [delivery_case(ctx, variant, f"wide-{variant}", topo, total_msgs=sz.wide_msgs,
                          sample=sz.sample_every)]


def scen_hot(ctx: Ctx, variant: str) -> list[dict]:
    sz = ctx.sizes
    topo = Topology(1, [[0] for _ in range(sz.hot_clients)])
    return [delivery_case(ctx, variant, f"hot-{variant}", topo, total_msgs=sz.hot_msgs,
                          sample=sz.sample_every * 4, inflight=128)]


def scen_latency(ctx: Ctx, variant: str) -> list[dict]:
    sz = ctx.sizes
    topo = Topology(sz.market_symbols, client_symbols(sz.market_clients, sz.market_symbols, sz.per_client))
    fan = sum(topo.subscribers) / topo.nsym          # deliveries per publish
    out = []
    for load in sz.latency_loads:
        rate = max(1, round(load / fan))
        rec = delivery_case(ctx, variant, f"latency{load}-{variant}", topo, rate=rate,
                            duration_s=sz.latency_duration_s, sample=sz.latency_sample_every,
                            skip_ms=sz.latency_skip_ms, allow_overload=True)
        rec["offered_label"] = load
        out.append(rec)
    return out


def scen_latency_seq(ctx: Ctx, variant: str) -> list[dict]:
    """The latency scenario with sequenced trades: the same open-loop rates,
    so gateway CPU utilisation at a fixed offered load compares directly."""
    sz = ctx.sizes
    topo = Topology(sz.market_symbols, client_symbols(sz.market_clients, sz.market_symbols, sz.per_client))
    fan = sum(topo.subscribers) / topo.nsym
    out = []
    for load in sz.latency_loads:
        rate = max(1, round(load / fan))
        rec = delivery_case(ctx, variant, f"latencyseq{load}-{variant}", topo, rate=rate,
                            duration_s=sz.latency_duration_s, sample=sz.latency_sample_every,
                            skip_ms=sz.latency_skip_ms, allow_overload=True, mode="seq", seq=True)
        rec["offered_label"] = load
        out.append(rec)
    return out


def rate_cells(sz: Sizes) -> list[tuple[int, int]]:
    """(offered deliveries/s, publisher pipeline) of the rate scenario."""
    return [(load, pipe) for load in sz.rate_loads for pipe in sz.rate_pipelines]


def scen_rate(ctx: Ctx, variant: str, load: int, pipeline: int) -> list[dict]:
    """One cell of the rate scenario: the market topology (1,000 clients x 5
    of 100 symbols) at a fixed offered delivery rate, the publisher writing
    `pipeline` trades at a time on an even schedule, so that a Redis read
    carries about `pipeline` trades to a gateway that keeps up.  CPU per
    delivery here is the cost of the work at that rate, not of how far the
    gateway batches at saturation; sends per delivery say how much of it is
    the kernel's per-send cost."""
    sz = ctx.sizes
    topo = Topology(sz.market_symbols, client_symbols(sz.market_clients, sz.market_symbols, sz.per_client))
    fan = sum(topo.subscribers) / topo.nsym
    rate = max(1, round(load / fan))
    rec = delivery_case(ctx, variant, f"rate{load}x{pipeline}-{variant}", topo, rate=rate,
                        duration_s=sz.latency_duration_s, sample=sz.latency_sample_every,
                        skip_ms=sz.latency_skip_ms, allow_overload=True, pipeline=pipeline,
                        count_sends=True, deflate=1.0 if variant_kind(variant) == DEFLATE_VARIANT else 0.0)
    rec["offered_label"] = load
    return [rec]


def rate_not_applicable(variant: str, load: int) -> str | None:
    if variant_kind(variant) == DEFLATE_VARIANT and load > RATE_DEFLATE_MAX:
        return f"compression is measured only up to {RATE_DEFLATE_MAX:,} deliveries/s (unsaturated)"
    if variant_kind(variant) == "baseline" and load > RATE_BASELINE_MAX:
        return f"the baseline is run only up to {RATE_BASELINE_MAX:,} deliveries/s (it saturates near 150k)"
    return None


def scen_memory(ctx: Ctx, variant: str) -> list[dict]:
    """RSS per idle subscribed connection, over two connect/close cycles: the
    first gives the cost per connection, the second tells a leak (RSS after the
    second close well above the first) from the allocator keeping freed pages."""
    sz = ctx.sizes
    topo = Topology(sz.market_symbols, client_symbols(sz.memory_clients, sz.market_symbols, sz.per_client))
    tag = f"memory-{variant}"
    _, connfile, _ = topo.write(ctx.workdir, tag, None)
    n = len(topo.clients)
    budget = 30 + n / 200
    gw = Gateway(variant, ctx.redis, ctx.workdir, tag)
    probs: list[str] = []
    cycles = []
    try:
        time.sleep(0.5)                       # let start-up allocations settle
        rss_before = gw.rss_kib()
        for _ in range(2):
            lc = LoadClient(ctx.tools["loadclient"], gw.port, connfile, deadline_s=budget + 30,
                            sample=0, hold=True, inflight=64, workdir=ctx.workdir)
            t0 = time.monotonic()
            try:
                ok_conns, failed = lc.wait_ready(budget)
            except HarnessError:
                PROCS.stop(lc.proc, timeout=2)
                raise
            connect_s = time.monotonic() - t0
            time.sleep(sz.memory_settle_s)    # every reply written, buffers drained
            rss_after = gw.rss_kib()
            rep = lc.finish(timeout=20, terminate=True)
            time.sleep(sz.memory_close_wait_s)  # the gateway notices the closes
            alive = gw.alive()
            cycles.append({"connected": ok_conns, "connect_failed": failed,
                           "connect_s": connect_s, "rss_kib_connected": rss_after,
                           "rss_kib_closed": gw.rss_kib() if alive else None,
                           "subscribe_errors": rep.get("subscribe_errors", 0),
                           "loadclient_cpu_s": rep["cpu_user_s"] + rep["cpu_sys_s"]})
            if not alive:
                break
    finally:
        rc = gw.stop(ctx.redis)
    for i, c in enumerate(cycles):
        if c["connect_failed"]:
            probs.append(f"cycle {i + 1}: {c['connect_failed']} connections failed")
        if c["subscribe_errors"]:
            probs.append(f"cycle {i + 1}: subscribe_errors={c['subscribe_errors']}")
    if not alive:
        probs.append("gateway died during the case")
    probs += [f"gateway log: {ln}" for ln in gw.log_problems()]
    notes = [f"gateway exit code {rc} after SIGTERM"] if rc not in (0, None) and alive else []
    first = cycles[0]
    per = (first["rss_kib_connected"] - rss_before) / first["connected"] if first["connected"] else None
    closed = [c["rss_kib_closed"] for c in cycles]
    return [{
        "variant": variant, "clients": n, "connected": first["connected"],
        "connect_failed": first["connect_failed"], "connect_s": first["connect_s"],
        "connects_per_s": first["connected"] / first["connect_s"] if first["connect_s"] else None,
        "gateway_rss_kib_before": rss_before,
        "gateway_rss_kib_after": first["rss_kib_connected"],
        "gateway_rss_kib_after_close": closed[0],
        "gateway_rss_kib_after_close2": closed[1] if len(closed) > 1 else None,
        "rss_kib_per_conn": per, "cycles": cycles, "gateway_exit_code": rc, "notes": notes,
        "loadclient_cpu_s": first["loadclient_cpu_s"],
        "ok": not probs, "problems": probs,
    }]


def scen_protocol(ctx: Ctx, variant: str) -> list[dict]:
    """Protocol conformance with a plain Python client (websockets, sync API).

    Each step is checked on its own, so one failure does not hide the rest.
    """
    from websockets.sync.client import connect  # bench-only dependency
    gw = Gateway(variant, ctx.redis, ctx.workdir, f"protocol-{variant}")
    checks: list[dict] = []
    # The byte-for-byte envelope is the gateway's contract; the baseline
    # re-serialises with json.dumps on purpose, so there it is informational.
    strict_bytes = variant_kind(variant) != "baseline"
    envelope = re.compile(rb'\{"type":"trade","data":(.*),"timestamp":(\d+)\}', re.S)

    def check(name: str, ok: bool, detail: str = "", strict: bool = True) -> None:
        checks.append({"check": name, "ok": bool(ok), "strict": strict, "detail": detail[:300]})

    def recv_json(ws, timeout: float = 3.0):
        raw = ws.recv(timeout=timeout)
        return raw, json.loads(raw)

    def drain(ws) -> None:
        """After a failed step, drop whatever is still queued for this client."""
        with contextlib.suppress(Exception):
            while True:
                ws.recv(timeout=0.3)

    def step(name: str, fn, *clients) -> None:
        before = len(checks)
        try:
            fn()
        except Exception as e:   # a failed step is a finding about the gateway
            check(name, False, f"{type(e).__name__}: {e}")
        if any(not c["ok"] and c["strict"] for c in checks[before:]):
            for c in clients:    # resynchronise: the next step starts on a quiet line
                drain(c)

    def trade_roundtrip(ws, symbol: str, payload: bytes, label: str, strict: bool = True) -> None:
        """Publish payload and check the envelope semantically and byte-for-byte."""
        ctx.redis.publish(CHANNEL_PREFIX + symbol, payload)
        raw = ws.recv(timeout=3)
        rawb = raw.encode() if isinstance(raw, str) else raw
        text = rawb.decode(errors="replace")
        env = json.loads(rawb)
        check(f"{label}: text frame", isinstance(raw, str), type(raw).__name__)
        check(f"{label}: envelope semantics", env.get("type") == "trade"
              and env.get("data") == json.loads(payload)
              and isinstance(env.get("timestamp"), int), text)
        m = envelope.fullmatch(rawb)
        check(f"{label}: byte-for-byte", bool(m) and m.group(1) == payload, text,
              strict=strict and strict_bytes)
        if m:
            check(f"{label}: timestamp is ms now",
                  abs(int(m.group(2)) - time.time() * 1000) < 10_000, m.group(2).decode())

    url = f"ws://127.0.0.1:{gw.port}/"
    try:
        with connect(url, open_timeout=5, close_timeout=2, compression=None,
                     max_size=2**20) as a, \
                connect(url, open_timeout=5, close_timeout=2, compression=None) as b:

            def welcome():
                raw, w = recv_json(a)
                check("welcome", w.get("type") == "success"
                      and w.get("message") == "Connected to WebSocket Gateway"
                      and isinstance(w.get("data"), dict)
                      and w["data"].get("maxSymbolsPerConnection") == 5
                      and bool(w["data"].get("connectionId")) and bool(w["data"].get("serverId"))
                      and isinstance(w.get("timestamp"), int), raw)
                recv_json(b)
            step("welcome", welcome, a, b)

            def subscribe():
                a.send(json.dumps({"action": "subscribe", "symbols": ["aapl", "MSFT"]}))
                raw, r = recv_json(a)
                check("subscribe reply (upper-cased)", r.get("type") == "success"
                      and r.get("message") == "Successfully subscribed to 2 symbol(s)"
                      and set(r.get("data", {}).get("currentSubscriptions", [])) == {"AAPL", "MSFT"},
                      raw)
                b.send(json.dumps({"action": "subscribe", "symbols": ["MSFT"]}))
                recv_json(b)
            step("subscribe", subscribe, a, b)

            # Payloads a trade feed can produce.  A gateway that re-serialises
            # changes these bytes; the contract says it must not.
            payloads = {
                "odd spacing and escapes":
                    b'{"symbol": "AAPL",  "price":150.25, "note":"caf\\u00e9 \\"q\\"",'
                    b'"volume":100,"conditions":["@","T"],"exchange":"NASDAQ"}',
                # json.dumps writes small floats this way (1e-05)
                "exponent numbers":
                    b'{"symbol":"AAPL","price":1.5025e2,"fee":1e-05,"volume":100}',
                "raw UTF-8 and nesting":
                    '{"symbol":"AAPL","venue":{"name":"Börse","ids":[1,2,[3]]},"ok":true,"x":null}'.encode(),
                "large (70 KB, 64-bit frame length)":
                    b'{"symbol":"AAPL","blob":"' + b"x" * 70_000 + b'"}',
            }
            for label, payload in payloads.items():
                step(label, lambda lb=label, p=payload: trade_roundtrip(a, "AAPL", p, lb), a)

            def bad_payloads():
                # Not JSON objects: must not reach clients, must not break the feed.
                for junk in (b"not json", b"[1,2,3]", b'{"unterminated":', b""):
                    ctx.redis.publish(CHANNEL_PREFIX + "AAPL", junk)
                trade_roundtrip(a, "AAPL", b'{"symbol":"AAPL","after":"junk"}', "after junk payloads")
            step("after junk payloads", bad_payloads, a)

            def routing():
                # GOOG has no subscriber here; MSFT goes to both clients once.
                ctx.redis.publish(CHANNEL_PREFIX + "GOOG", b'{"symbol":"GOOG","n":1}')
                ctx.redis.publish(CHANNEL_PREFIX + "MSFT", b'{"symbol":"MSFT","n":2}')
                _, ra = recv_json(a)
                _, rb_ = recv_json(b)
                check("routing by symbol", ra.get("data", {}).get("symbol") == "MSFT"
                      and rb_.get("data", {}).get("symbol") == "MSFT", f"{ra} / {rb_}")
            step("routing by symbol", routing, a, b)

            def ping():
                a.send(json.dumps({"action": "ping"}))
                raw, r = recv_json(a)
                check("ping -> pong", r.get("type") == "pong", raw)
            step("ping -> pong", ping, a)

            def limit():
                a.send(json.dumps({"action": "subscribe", "symbols": ["A", "B", "C", "D"]}))
                raw, r = recv_json(a)
                check("limit of 5 symbols", r.get("type") == "error"
                      and "exceed" in r.get("message", ""), raw)
            step("limit of 5 symbols", limit, a)

            def unsubscribe():
                a.send(json.dumps({"action": "unsubscribe", "symbols": ["aapl"]}))
                raw, r = recv_json(a)
                check("unsubscribe reply", r.get("type") == "success"
                      and r.get("data", {}).get("currentSubscriptions") == ["MSFT"], raw)
                ctx.redis.publish(CHANNEL_PREFIX + "AAPL", b'{"symbol":"AAPL","n":3}')
                ctx.redis.publish(CHANNEL_PREFIX + "MSFT", b'{"symbol":"MSFT","n":4}')
                _, r = recv_json(a)
                check("no delivery after unsubscribe", r.get("data", {}).get("n") == 4, str(r))
                recv_json(b)
            step("unsubscribe", unsubscribe, a, b)

            def bad_input():
                a.send("this is not json")
                raw, r = recv_json(a)
                check("invalid JSON -> error reply", r.get("type") == "error", raw)
                a.send(json.dumps({"action": "ping"}))
                check("connection usable after bad input", recv_json(a)[1].get("type") == "pong")
            step("bad client input", bad_input, a)
    except Exception as e:
        check("protocol session", False, f"{type(e).__name__}: {e}")
    finally:
        alive = gw.alive()
        rc = gw.stop(ctx.redis)
    if not alive:
        check("gateway alive after protocol session", False, f"exit {rc}")
    for line in gw.log_problems():
        check("gateway logged no errors", False, line, strict=False)
    if rc not in (0, None) and alive:
        check("clean exit on SIGTERM", False, f"exit code {rc}", strict=False)
    probs = [f"{c['check']}: {c['detail']}" for c in checks if c["strict"] and not c["ok"]]
    return [{"variant": variant, "checks": checks, "gateway_exit_code": rc,
             "ok": not probs, "problems": probs}]


SCENARIOS = {"protocol": scen_protocol, "market": scen_market, "wide": scen_wide,
             "latency": scen_latency, "memory": scen_memory, "hot": scen_hot,
             "latency-seq": scen_latency_seq, "rate": scen_rate,
             **{name: market_mode(name) for name in MARKET_MODES}}


# ------------------------------------------------------------- reporting ----

def fmt(v, spec=".2f", none="-"):
    if v is None:
        return none
    return format(v, spec)


def markdown(results: list[dict], revisions: dict | None = None) -> str:
    out = []
    for v, src in (revisions or {}).items():
        out.append(f"- `{v}`: revision `{src['rev']}` = {src['commit']}, "
                   f"run from its own exported, built tree")
    if revisions:
        out.append("")
    by = {}
    for r in results:
        by.setdefault(r["scenario"], []).append(r)

    def table(header, rows):
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(map(str, row)) + " |" for row in rows)
        out.append("")

    for scen, rs in by.items():
        out.append(f"### {scen}")
        out.append("")
        if scen == "protocol":
            table(["variant", "ok", "failed checks"],
                  [[r["variant"], r.get("ok"), "; ".join(
                      c["check"] + ("" if c["strict"] else " (info)")
                      for c in r.get("checks", []) if not c["ok"]) or "-"] for r in rs])
        elif scen == "memory":
            table(["variant", "ok", "conns", "connect/s", "RSS before MiB", "RSS after MiB",
                   "KiB per conn", "RSS after close MiB", "after 2nd cycle MiB"],
                  [[r["variant"], r.get("ok"), r.get("connected"), fmt(r.get("connects_per_s"), ".0f"),
                    fmt(r["gateway_rss_kib_before"] / 1024 if r.get("gateway_rss_kib_before") else None, ".1f"),
                    fmt(r["gateway_rss_kib_after"] / 1024 if r.get("gateway_rss_kib_after") else None, ".1f"),
                    fmt(r.get("rss_kib_per_conn"), ".1f"),
                    fmt(r["gateway_rss_kib_after_close"] / 1024 if r.get("gateway_rss_kib_after_close") else None, ".1f"),
                    fmt(r["gateway_rss_kib_after_close2"] / 1024 if r.get("gateway_rss_kib_after_close2") else None, ".1f")]
                   for r in rs])
        elif scen == "rate":
            rate_table(rs, table, out)
        elif scen in ("latency", "latency-seq"):
            table(["variant", "offered/s", "achieved/s", "sustained", "p50 ms", "p99 ms", "p99.9 ms",
                   "max ms", "gw CPU util", "gw µs/deliv", "lc CPU s", "pub CPU s",
                   "missing", "ok"],
                  [[r["variant"], r.get("offered_label", "-"), fmt(r.get("deliveries_per_s"), ",.0f"),
                    "no" if r.get("overloaded") else "yes",
                    fmt(r["latency_us"]["p50"] / 1000, ".3f"), fmt(r["latency_us"]["p99"] / 1000, ".3f"),
                    fmt(r["latency_us"]["p999"] / 1000, ".3f"), fmt(r["latency_us"]["max"] / 1000, ".3f"),
                    fmt(r.get("gateway_cpu_util"), ".0%"),
                    fmt(r.get("gateway_cpu_us_per_delivery")),
                    fmt(r.get("loadclient_cpu_s")), fmt(r.get("publisher_cpu_s")), r.get("missing"),
                    r.get("ok")] for r in rs if "latency_us" in r])
        else:
            table(["variant", "published", "deliveries", "missing", "order viol.", "deliveries/s",
                   "gw µs/deliv", "gw µs/publish", "p99 ms (queued)", "lc µs/deliv",
                   "pub CPU s", "redis CPU s", "ok"],
                  [[r["variant"], r.get("published"), r.get("deliveries"), r.get("missing"),
                    r.get("order_violations"), fmt(r.get("deliveries_per_s"), ",.0f"),
                    fmt(r.get("gateway_cpu_us_per_delivery")), fmt(r.get("gateway_cpu_us_per_publish")),
                    fmt(r["latency_us"]["p99"] / 1000 if r.get("latency_us") else None, ".1f"),
                    fmt(r.get("loadclient_cpu_us_per_delivery"), ".3f"), fmt(r.get("publisher_cpu_s")),
                    fmt(r.get("redis_cpu_s")), r.get("ok")] for r in rs if "deliveries" in r])
        for r in rs:
            for note in r.get("notes") or []:
                out.append(f"- note, {r['variant']}: {note}")
        if any(r.get("notes") for r in rs):
            out.append("")
        bad = [r for r in rs if not r.get("ok")]
        for r in bad:
            out.append(f"- **{r['variant']}**: " + "; ".join(r.get("problems") or [r.get("error", "?")]))
        if bad:
            out.append("")
    compare_modes(results, table, out)
    compare_latency_seq(results, table, out)
    compare_revisions(results, table, out)
    return "\n".join(out)


def rate_table(rs: list[dict], table, out: list[str]) -> None:
    """The rate scenario: one row per cell, variant and repeat, each with the
    ratio of its CPU per delivery to the floor's in the same cell and repeat
    (measured seconds apart).  CPU from schedstat (ns); µs/send is the
    gateway's whole CPU over its sends, user space included."""
    cases = [r for r in rs if "latency_us" in r]
    floor = {(r["offered_label"], r["pipeline"], r["repeat"]): r for r in cases
             if variant_kind(r["variant"]) == FLOOR_VARIANT}

    plain = {(r["offered_label"], r["pipeline"], r["repeat"]): r for r in cases
             if r["variant"] == "compiled"}

    def ratio(r: dict, to: dict) -> str:
        f = to.get((r["offered_label"], r["pipeline"], r["repeat"]))
        a = r.get("gateway_cpu_us_per_delivery_schedstat")
        b = f.get("gateway_cpu_us_per_delivery_schedstat") if f else None
        return f"{a / b:.2f}x" if a and b else "-"

    def vs_floor(r: dict) -> str:
        return ratio(r, floor)

    def vs_plain(r: dict) -> str:
        # compressed against plain deliveries, same cell and repeat
        return ratio(r, plain) if variant_kind(r["variant"]) == DEFLATE_VARIANT else "-"

    rows = []
    for r in sorted(cases, key=lambda r: (r["offered_label"], r["pipeline"], r["repeat"], r["variant"])):
        rows.append([f"{r['offered_label']:,}", r["pipeline"], r["repeat"], r["variant"],
                     fmt(r.get("deliveries_per_s"), ",.0f"), "no" if r.get("overloaded") else "yes",
                     fmt(r["latency_us"]["p50"] / 1000, ".3f"), fmt(r["latency_us"]["p99"] / 1000, ".3f"),
                     fmt(r["latency_us"]["p999"] / 1000, ".3f"),
                     fmt(r.get("gateway_cpu_util"), ".0%"),
                     fmt(r.get("gateway_cpu_us_per_delivery_schedstat"), ".3f"), vs_floor(r),
                     vs_plain(r), fmt(r.get("wire_bytes_per_delivery"), ".0f"),
                     fmt(r.get("gateway_sends_per_delivery"), ".3f"), fmt(r.get("gateway_us_per_send"), ".2f"),
                     fmt(r.get("trades_per_redis_read"), ".1f"),
                     fmt(r.get("loadclient_cpu_us_per_delivery"), ".2f"), r.get("missing"), r.get("ok")])
    table(["offered/s", "pipeline", "rep", "variant", "achieved/s", "sustained", "p50 ms", "p99 ms",
           "p99.9 ms", "gw CPU", "gw µs/deliv", "vs floor", "vs compiled", "wire B/deliv",
           "sends/deliv", "gw µs/send", "trades/read", "lc µs/deliv", "missing", "ok"], rows)


def compare_revisions(results: list[dict], table, out: list[str]) -> None:
    """Each KIND@REV delivery case against the working tree's KIND case of the
    same scenario, mode and repeat: before/after a change in one run.  CPU per
    delivery from schedstat (ns), as in compare_modes."""
    cases = [r for r in results if "deliveries" in r and "@" in r["variant"]]
    if not cases:
        return
    # A rate cell is its offered load and its publisher pipeline.
    here = {(r["scenario"], r.get("offered_label"), r.get("pipeline"), r["variant"], r["repeat"]): r
            for r in results if "deliveries" in r and "@" not in r["variant"]}
    rows = []
    for r in sorted(cases, key=lambda r: (r["scenario"], str(r.get("offered_label")),
                                          r.get("pipeline") or 0, r["variant"], r["repeat"])):
        kind = variant_kind(r["variant"])
        w = here.get((r["scenario"], r.get("offered_label"), r.get("pipeline"), kind, r["repeat"]))
        if w is None:
            continue
        us_w = w.get("gateway_cpu_us_per_delivery_schedstat")
        us_r = r.get("gateway_cpu_us_per_delivery_schedstat")
        scen = r["scenario"] + (f" {r['offered_label']}" if r.get("offered_label") else "")
        if r.get("pipeline"):
            scen += f"x{r['pipeline']}"
        rows.append([scen, r["repeat"], kind, fmt(us_w, ".3f"), r["variant"], fmt(us_r, ".3f"),
                     f"{us_w / us_r:.2f}x" if us_w and us_r else "-",
                     fmt(w.get("deliveries_per_s"), ",.0f"), fmt(r.get("deliveries_per_s"), ",.0f"),
                     w.get("ok") and r.get("ok")])
    if not rows:
        return
    out.append("### working tree vs revision (same invocation)")
    out.append("")
    table(["scenario", "rep", "working tree", "gw µs/deliv", "revision", "gw µs/deliv",
           "CPU tree/rev", "deliveries/s tree", "deliveries/s rev", "ok"], rows)


def compare_latency_seq(results: list[dict], table, out: list[str]) -> None:
    """latency-seq against latency, same variant, repeat and offered load: at
    a fixed offered rate the gateway's CPU utilisation is the cost of the
    work, not of how well it batches at saturation."""
    seqs = [r for r in results if r["scenario"] == "latency-seq" and "latency_us" in r]
    if not seqs:
        return
    plain = {(r["variant"], r["repeat"], r.get("offered_label")): r for r in results
             if r["scenario"] == "latency" and "latency_us" in r}
    rows = []
    for r in sorted(seqs, key=lambda r: (r["variant"], r.get("offered_label") or 0, r["repeat"])):
        p = plain.get((r["variant"], r["repeat"], r.get("offered_label")))
        if p is None:
            continue
        up, us = p.get("gateway_cpu_s_schedstat"), r.get("gateway_cpu_s_schedstat")
        dp, ds = p.get("deliveries"), r.get("deliveries")
        cp = up / dp * 1e6 if up and dp else None
        cs = us / ds * 1e6 if us and ds else None
        rows.append([r["variant"], r.get("offered_label"), r["repeat"],
                     fmt(cp, ".3f"), fmt(cs, ".3f"), f"{cs / cp:.2f}x" if cp and cs else "-",
                     fmt(p["latency_us"]["p99"] / 1000, ".3f"), fmt(r["latency_us"]["p99"] / 1000, ".3f"),
                     "no" if p.get("overloaded") or r.get("overloaded") else "yes",
                     p.get("ok") and r.get("ok")])
    if not rows:
        return
    out.append("### latency: plain vs sequenced at a fixed offered rate (same invocation)")
    out.append("")
    table(["variant", "offered/s", "rep", "plain gw µs/deliv", "seq gw µs/deliv", "vs plain",
           "plain p99 ms", "seq p99 ms", "both sustained", "ok"], rows)


def compare_modes(results: list[dict], table, out: list[str]) -> None:
    """market-* cases against the plain market case of the same variant and
    repeat (run next to each other).  CPU is from schedstat (ns), the figure
    fine enough for differences of a few %."""
    modes = [r for r in results if r["scenario"] in MARKET_MODES and "deliveries" in r]
    if not modes:
        return
    plain = {(r["variant"], r["repeat"]): r for r in results
             if r["scenario"] == "market" and "deliveries" in r}

    def vs_plain(us, p):
        base = p.get("gateway_cpu_us_per_delivery_schedstat") if p else None
        return f"{us / base:.2f}x" if us is not None and base else "-"

    out.append("### market: plain vs deflate / mixed / auth / seq (same invocation)")
    out.append("")
    rows = []
    for r in sorted(modes + [p for p in plain.values()
                             if any((m["variant"], m["repeat"]) == (p["variant"], p["repeat"])
                                    for m in modes)],
                    key=lambda r: (r["variant"], r["repeat"], ["plain", "deflate", "mixed", "auth", "seq"]
                                   .index(r.get("mode", "plain")))):
        p = plain.get((r["variant"], r["repeat"]))
        us = r.get("gateway_cpu_us_per_delivery_schedstat")
        rows.append([r["variant"], r["repeat"], r.get("mode", "plain"),
                     f"{r.get('deflate_conns') or 0}/{r.get('clients')}",
                     fmt(us, ".3f"),
                     vs_plain(us, p) if r is not p else "-",
                     fmt(r.get("deliveries_per_s"), ",.0f"),
                     fmt(r.get("wire_bytes_per_delivery"), ".0f"),
                     fmt(r.get("wire_bytes_per_compressed_delivery"), ".0f"),
                     fmt(r.get("loadclient_cpu_us_per_delivery"), ".3f"),
                     fmt(r.get("connect_s"), ".3f"),
                     fmt(r.get("gateway_connect_cpu_us_per_conn"), ".0f"),
                     fmt(r.get("gateway_first_upgrade_cpu_ms"), ".1f"),
                     r.get("ok")])
    table(["variant", "rep", "mode", "deflate conns", "gw µs/deliv", "vs plain", "deliveries/s",
           "wire B/deliv", "B/compressed", "lc µs/deliv", "connect s", "gw connect µs/conn",
           "1st upgrade ms", "ok"], rows)


# ------------------------------------------------------------------ main ----

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gateway fan-out benchmark")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help=f"default: all but {', '.join(EXTRA_SCENARIOS)}")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, whole run in seconds")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant, order alternating")
    p.add_argument("--out", default=str(BENCH / "results.json"))
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and temp files")
    p.add_argument("--rate-cells", default=None,
                   help="rate scenario cells as LOADxPIPELINE,... (offered deliveries/s x "
                        "trades per publisher write), e.g. 200000x1,1000000x100; "
                        "default every load of 50k/200k/500k/1M with pipelines 1, 10, 100")
    p.add_argument("--noisy-retries", type=int, default=None,
                   help="re-run a case whose gateway core was shared with other tasks "
                        "(default 1, 0 with --smoke)")
    a = p.parse_args(argv)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    if a.rate_cells is not None:
        cells = []
        for c in a.rate_cells.split(","):
            m = re.fullmatch(r"(\d+)x(\d+)", c.strip())
            if not m or int(m.group(1)) <= 0 or not 0 < int(m.group(2)) <= 1000:
                p.error(f"--rate-cells: {c!r} is not LOADxPIPELINE (pipeline 1-1000)")
            cells.append((int(m.group(1)), int(m.group(2))))
        a.rate_cells = cells
    specs = [v for v in a.variants.split(",") if v]
    a.variants = []
    for spec in specs:
        try:
            kind, rev = parse_variant(spec)
            name = kind
            if rev is not None:
                full, short = resolve_rev(rev)
                name = f"{kind}@{short}"
                REV_SOURCES[name] = RevSource(rev, full)
        except ValueError as e:
            p.error(str(e))
        if name in a.variants:
            p.error(f"variant {spec} given twice (as {name})")
        a.variants.append(name)
    for s in a.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s}")
    return a


def meta(args) -> dict:
    def ver(mod):
        try:
            from importlib.metadata import version
            return version(mod)
        except Exception:
            return None
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "")
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
            "variants": args.variants, "scenarios": args.scenarios, "repeat": args.repeat,
            "revisions": {v: {"rev": src.rev, "commit": src.commit, "build_s": src.build_s,
                              "gateway_file": src.gateway_file}
                          for v, src in REV_SOURCES.items() if v in args.variants},
            "python": platform.python_version(), "cpu": cpu, "ncpu": os.cpu_count(),
            "kernel": platform.release(),
            "versions": {m: ver(m) for m in ("websockets", "redis", "picows", "hiredis",
                                             "orjson", "uvloop", "ws-gateway")},
            "pinning": {"gateway": GATEWAY_CPU, "redis+publisher+loadclient+harness": AUX_CPU},
            "loadavg_end": os.getloadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    loadavg_start = os.getloadavg()
    sizes = SMOKE if args.smoke else Sizes()
    retries = args.noisy_retries if args.noisy_retries is not None else (0 if args.smoke else 1)
    # This script polls and parses on the auxiliary core, never on the gateway's.
    bench = BenchRun("gateway-bench-", keep_workdir=args.keep_workdir)
    results = bench.results

    trees = RevTrees()
    with bench:
        workdir = bench.workdir
        tools = build_tools()
        for v in args.variants:
            src = REV_SOURCES.get(v)
            if src is not None and src.tree is None:
                shared = src.commit in trees.trees
                src.tree, src.build_s = trees.build(src.commit, v.partition("@")[2])
                print(f"[rev] {v}: {src.rev} = {src.commit}, " +
                      ("same tree as above" if shared else
                       f"exported and built in {src.build_s:.1f} s"), file=sys.stderr)
        redis = Redis(workdir)
        ctx = Ctx(tools, redis, workdir, sizes, args.smoke, results)
        avail = {v: variant_available(v) for v in args.variants}
        for v, src in REV_SOURCES.items():
            if v in avail:
                print(f"[rev] {v}: runs {src.gateway_file}", file=sys.stderr)

        def run_case(scen: str, v: str, rep: int, cell: tuple[int, int] | None = None) -> None:
            base = {"scenario": scen, "variant": v, "repeat": rep}
            kw = {}
            if cell is not None:
                base.update(offered_label=cell[0], pipeline=cell[1])
                kw = {"load": cell[0], "pipeline": cell[1]}
            ok, why = avail[v]
            why = why if not ok else not_applicable(scen, v)
            if not why and cell is not None:
                why = rate_not_applicable(v, cell[0])
            if why:
                results.append({**base, "skipped": why, "ok": True})
                print(f"[skip] {scen}/{v}: {why}", file=sys.stderr)
                return
            t = time.monotonic()
            try:
                for attempt in range(1 + retries):
                    recs = SCENARIOS[scen](ctx, v, **kw)
                    if not any(r.get("gateway_core_shared") for r in recs):
                        break
                    if attempt < retries:
                        print(f"[noisy] {scen}/{v}: gateway core shared, re-running",
                              file=sys.stderr)
                for rec in recs:
                    results.append({**base, **rec, "attempts": attempt + 1})
            except HarnessError as e:
                # A gateway that cannot start or crashes is a finding for
                # that case; the run goes on with the next one.
                results.append({**base, "ok": False, "error": str(e), "problems": [str(e)]})
            status = "ok" if all(r.get("ok") for r in results if r["scenario"] == scen
                                 and r["variant"] == v and r["repeat"] == rep
                                 and r.get("pipeline") == base.get("pipeline")
                                 and r.get("offered_label") == base.get("offered_label")) else "FAIL"
            label = f"{scen}{f' {cell[0]}x{cell[1]}' if cell else ''}/{v}"
            print(f"[{status}] {label} in {time.monotonic() - t:.1f}s", file=sys.stderr)

        for unit in schedule(args.scenarios):
            for rep in range(args.repeat):
                order = args.variants if rep % 2 == 0 else list(reversed(args.variants))
                if unit == ["rate"]:
                    # cell by cell, every variant in turn: the ratio to the
                    # floor compares runs made seconds apart; odd repeats go
                    # through the cells and the variants backwards
                    cells = args.rate_cells or rate_cells(sizes)
                    for cell in (cells if rep % 2 == 0 else list(reversed(cells))):
                        for v in order:
                            run_case("rate", v, rep, cell)
                    continue
                for v in order:
                    for scen in (unit if rep % 2 == 0 else list(reversed(unit))):
                        run_case(scen, v, rep)
    trees.cleanup()
    info = meta(args)
    info["loadavg_start"] = loadavg_start
    return bench.finish(info, args.out, markdown(results, info["revisions"]))


class BenchRun:
    """What every bench's main() does around its cases.

        with BenchRun("gateway-bench-", keep_workdir=args.keep_workdir) as run:
            run.results += ...          # records with "ok" (and "problems")
            run.report = lambda: markdown(run.results)
        ...
        doc = run.doc(meta)             # after the with: JSON document of the run
        return run.status

    On entry: this process moves to the auxiliary core (the gateway's stays
    free), a work dir is made, SIGTERM is raised as KeyboardInterrupt. On
    exit: a HarnessError or an interrupt becomes ``harness_error`` (not an
    exception), every child process is killed, and ``finish()`` writes the
    JSON, prints the report and keeps the work dir when anything went wrong.
    """

    def __init__(self, prefix: str, *, keep_workdir: bool = False) -> None:
        self.prefix, self.keep_workdir = prefix, keep_workdir
        self.results: list[dict] = []
        self.harness_error: str | None = None
        self.workdir = Path()
        self.t_start = time.monotonic()

    def __enter__(self) -> BenchRun:
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {AUX_CPU})
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix))

        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        PROCS.kill_all()
        if isinstance(exc, HarnessError | KeyboardInterrupt):
            self.harness_error = str(exc) or type(exc).__name__
            print(f"harness error: {self.harness_error}", file=sys.stderr)
            return True
        return False

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.t_start

    def finish(self, meta: dict, out: str | Path | None, report: str, footer: str = "") -> int:
        """Write the JSON document (when ``out``), print ``report`` and a
        footer line, keep or remove the work dir; the exit status."""
        doc = {"meta": meta, "duration_s": self.duration_s, "harness_error": self.harness_error,
               "workdir": str(self.workdir), "results": self.results}
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(doc, indent=1))
        print(report)
        print(f"\n{footer or f'({self.duration_s:.1f} s)'}" + (f"  results: {out}" if out else ""))
        keep_or_remove_workdir(self.workdir, self.results, self.keep_workdir, self.harness_error)
        return exit_status(self.results, self.harness_error)


def keep_or_remove_workdir(workdir: Path, results: list[dict], keep: bool, harness_error) -> None:
    """Logs stay (and are named) when asked for or when anything went wrong."""
    if keep or harness_error or any(not r.get("ok") for r in results):
        print(f"logs: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def exit_status(results: list[dict], harness_error) -> int:
    """0 all correct, 3 some case incorrect, 1 harness error."""
    if harness_error:
        return 1
    return 3 if any(not r.get("ok") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
