#!/usr/bin/env python3
"""Candle streams at fixed offered rates: what the candle service costs per
trade, and whether candle subscriptions cost the trade fan-out anything.

Everything runs on 127.0.0.1 against the bench's own redis-server (a free
port, never 6379), stops by itself and prints a markdown report.

Part A, the candle service's CPU per trade
    ws-gateway-candles (python -m gateway.candle_service, default settings:
    intervals 1s,1m,5m, updates every 250 ms) runs alone on CPU 0; Redis, the
    C publisher and this script share CPU 1.  After a short priming feed (so
    every symbol is known to the service), for each offered rate (1,000 and
    5,000 trades/s over 50 symbols) and each form (plain, and the sequenced
    form of publisher -E, a new epoch per case):
      idle    no trades for a few seconds: the service's tick cost with the
              same symbols known (1s finals of empty intervals keep going out);
      loaded  the publisher's open loop for ~10 s; the service's CPU
              (schedstat, ns) and its /metrics candles_trades_applied_total are
              read at the start and end of a steady window inside it.
    Reported: µs of service CPU per trade applied, net of the idle rate
    measured right before; the marginal cost (the slope between the two
    rates); Redis's CPU beside it.  After every case the service must have
    applied every published trade (candles_trades_applied_total grows by
    exactly what the publisher sent), none invalid, late, future or
    duplicate, no publish error: otherwise the run exits 3.

Part B, a candle subscription beside the trade fan-out
    The gateway (python -m gateway, compiled fast path, candle intervals at
    their default 1s,1m,5m) alone on CPU 0; everything else on CPU 1.  At a
    fixed offered rate (20,000 trades/s over 100 symbols, publisher open
    loop), the C load client with 200 connections x 5 trade symbols (10
    subscribers per symbol: 200,000 trade deliveries/s):
      trades   no candle service, no candle subscription;
      candles  the same, plus the candle service (CPU 1) and 200 more
               connections (a Python websockets client process, CPU 1, no
               compression offered) each subscribed to SYM@1s, SYM@1m, SYM@5m.
    Redis is flushed before every case.  The cases alternate (reversed on odd
    repeats) for --repeat runs.  Reported per case: gateway CPU per delivered
    trade frame (schedstat, from the publisher's start to the load client's
    last frame), the load client's latency percentiles, Redis/service/client
    CPU, candle frames the candle clients received; medians and min-max
    over the repeats, so the noise shows beside the difference.

Usage:
    python bench/candles.py                 # A and B (trades, candles), --repeat 3: ~2 min
    python bench/candles.py --cases trades,service,candles --out /tmp/candles.json   # ~2.5 min
    python bench/candles.py --smoke         # tiny sizes, about 25 s
    python bench/candles.py --parts b --repeat 5

    Part B's --cases also knows two diagnostic cases: service (the candle
    service running, no candle client: candles reach the gateway, unrouted)
    and clients (candle subscriptions, no service: nothing flows).  Every
    case records the CPU other processes used during its window; a part B
    case where they did (or took the gateway's core) runs once more.

Exit status: 0 every case correct; 3 some case incorrect (a trade not applied,
a trade delivery missing, no candle frames, ...); 1 harness error.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


# ------------------------------------------------------------ candle clients ----
# Runs as its own process (python bench/candles.py --candle-clients-worker JSON),
# so it imports nothing of the harness.

def _symbol_name(i: int) -> str:
    s = ""
    for _ in range(4):
        s = chr(65 + i % 26) + s
        i //= 26
    return s


def candle_clients_worker(spec: dict) -> int:
    """N websockets connections, each subscribed to its symbol's candle
    streams; prints READY, a JSON snapshot of what arrived on SIGUSR1, and a
    last one on SIGTERM (then exits)."""
    import orjson
    from websockets.asyncio.client import connect

    port, n, nsym = spec["port"], spec["connections"], spec["symbols"]
    intervals = spec["intervals"]
    st = {"frames": 0, "candle": 0, "update": 0, "final": 0, "correction": 0, "other": 0,
          "errors": 0, "parse_errors": 0, "final_dups": 0, "closed": 0, "connected": 0,
          "failed": 0, "pre_reply_candles": 0}
    delays: list[int] = []            # client clock - message timestamp, ms
    finals: set[tuple] = set()
    per_conn = [0] * n
    problems: list[str] = []

    def on_msg(i: int, raw) -> None:
        st["frames"] += 1
        per_conn[i] += 1
        try:
            m = orjson.loads(raw)
        except orjson.JSONDecodeError:
            st["parse_errors"] += 1
            return
        kind = m.get("type")
        if kind != "candle":
            st["errors" if kind == "error" else "other"] += 1
            if len(problems) < 5:
                problems.append(str(raw)[:200])
            return
        st["candle"] += 1
        d = m["data"]
        state = d.get("state")
        if state in ("update", "final", "correction"):
            st[state] += 1
        if state == "final":
            key = (i, d["symbol"], d["interval"], d["start"])
            if key in finals:
                st["final_dups"] += 1
            finals.add(key)
        delays.append(int(time.time() * 1000) - int(m.get("timestamp", 0)))

    def snapshot(kind: str) -> None:
        ds = sorted(delays)

        def pct(q):
            return ds[min(len(ds) - 1, int(q * len(ds)))] if ds else None
        ru = os.times()
        print(json.dumps({"kind": kind, **st, "conns_without_candles": sum(1 for c in per_conn if not c),
                          "delay_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": ds[-1] if ds else None,
                                       "n": len(ds)},
                          "cpu_s": ru.user + ru.system, "problems": problems}), flush=True)
        delays.clear()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, snapshot, "mark")
        loop.add_signal_handler(signal.SIGTERM, done.set)
        sem = asyncio.Semaphore(50)
        conns = []

        async def one(i: int) -> None:
            sym = _symbol_name(i % nsym)
            streams = [f"{sym}@{iv}" for iv in intervals]
            async with sem:
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}/", compression=None, open_timeout=30,
                                       max_size=2**20, ping_interval=None)
                    welcome = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                    if welcome.get("type") != "success":
                        raise RuntimeError(f"welcome: {welcome}")
                    await ws.send(orjson.dumps({"action": "subscribe", "symbols": streams}).decode())
                    while True:
                        raw = await asyncio.wait_for(ws.recv(), 10)
                        m = orjson.loads(raw)
                        if m.get("type") == "success":
                            break
                        if m.get("type") == "candle":     # a backfill may come right after
                            st["pre_reply_candles"] += 1
                            on_msg(i, raw)
                            continue
                        raise RuntimeError(f"subscribe {streams}: {raw[:200]}")
                except Exception as e:
                    st["failed"] += 1
                    if len(problems) < 5:
                        problems.append(f"connection {i}: {type(e).__name__}: {e}")
                    return
            st["connected"] += 1
            conns.append(ws)
            try:
                async for raw in ws:
                    on_msg(i, raw)
            except Exception:
                pass
            if not done.is_set():
                st["closed"] += 1

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        while st["connected"] + st["failed"] < n:
            await asyncio.sleep(0.02)
        print(f"READY {st['connected']} {st['failed']}", flush=True)
        await done.wait()
        snapshot("final")
        for ws in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------ harness ----

def _harness_imports():
    """fanout.py's pieces (and through it gateway._testbase of this checkout)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCH))
    global fanout, procfs, HarnessError, scrape_metrics, CandleProcess
    import fanout

    from gateway._testbase import procfs
    from gateway._testbase.net import HarnessError, scrape_metrics
    from gateway._testbase.process import CandleProcess


SERVICE_CPU_A = 0      # part A: the candle service alone on CPU 0
GATEWAY_CPU = 0        # part B: the gateway alone on CPU 0
AUX_CPU = 1            # everything else
INTERVALS = ("1s", "1m", "5m")


@dataclass
class Sizes:
    # part A
    a_symbols: int = 50
    a_rates: tuple = (1000, 5000)
    a_duration_s: float = 10.0
    a_skip_s: float = 2.0          # window starts this long after the publisher
    a_tail_s: float = 0.7          # and ends this long before its schedule ends
    a_idle_s: float = 4.0          # idle window before each loaded case
    a_prime_rate: int = 500
    a_prime_s: float = 1.0
    # part B
    b_rate: int = 20_000
    b_symbols: int = 100
    b_trade_clients: int = 200
    b_per_client: int = 5
    b_candle_clients: int = 200
    b_duration_s: float = 8.0
    b_skip_ms: int = 500
    b_sample: int = 4
    b_drain_s: float = 10.0


SMOKE = Sizes(a_symbols=10, a_rates=(200, 1000), a_duration_s=2.5, a_skip_s=0.7, a_tail_s=0.4,
              a_idle_s=1.0, a_prime_rate=100, a_prime_s=0.5,
              b_rate=2000, b_symbols=20, b_trade_clients=20, b_candle_clients=10,
              b_duration_s=2.0, b_skip_ms=200, b_sample=2, b_drain_s=3.0)


def metric(m: dict | None, name: str) -> float:
    return (m or {}).get(name, 0.0) or 0.0


def sched_ns(pid: int) -> tuple[int, int]:
    v = procfs.schedstat(pid)
    if v is None:
        raise HarnessError(f"no schedstat for pid {pid}: the process is gone")
    return v


def user_sys_s(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds, tick-sampled (fine over seconds of CPU)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        raise HarnessError(f"no /proc/{pid}/stat: the process is gone") from None
    return int(f[11]) / procfs.CLK_TCK, int(f[12]) / procfs.CLK_TCK


def foreign_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (command, utime+stime s) of every user-space process that is not
    this harness or one of its descendants: other work on the machine."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            raw = Path(f"/proc/{d}/stat").read_text()
            comm = raw.split("(", 1)[1].rsplit(")", 1)[0]
            f = raw.rsplit(")", 1)[1].split()
            procs[int(d)] = (int(f[1]), comm, (int(f[11]) + int(f[12])) / procfs.CLK_TCK)
    ours, todo = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in ours:
                ours.add(c)
                todo.append(c)
    # kernel threads (children of kthreadd, pid 2) do work for everyone: not counted
    return {pid: (comm, cpu) for pid, (ppid, comm, cpu) in procs.items()
            if pid not in ours and pid != 2 and ppid != 2}


def foreign_delta(before: dict, after: dict) -> tuple[float, str]:
    """CPU seconds other processes used between two foreign_cpu() samples, and the top ones."""
    used = []
    for pid, (comm, cpu) in after.items():
        d = cpu - before[pid][1] if pid in before else cpu if cpu < 60 else 0.0
        if d > 0:
            used.append((d, comm))
    used.sort(reverse=True)
    return sum(d for d, _ in used), ", ".join(f"{comm} {d:.2f} s" for d, comm in used[:3])


SLOW_US = 1000     # Redis commands slower than this go to its slowlog
FOREIGN_NOTE_S = 0.2   # other processes' CPU in a window worth a note


def redis_prepare(redis) -> None:
    redis.command("CONFIG", "SET", "slowlog-log-slower-than", str(SLOW_US))
    redis.command("CONFIG", "SET", "slowlog-max-len", "4096")


def fcall_stats(redis) -> tuple[int, int]:
    """(calls, µs) of FCALL so far (INFO commandstats)."""
    for line in (redis.command("INFO", "commandstats") or "").splitlines():
        if line.startswith("cmdstat_fcall:"):
            kv = dict(x.split("=", 1) for x in line.split(":", 1)[1].split(","))
            return int(kv["calls"]), int(kv["usec"])
    return 0, 0


def slow_commands(redis) -> dict:
    """What Redis's slowlog holds (commands over SLOW_US), then reset it."""
    r = redis.client()
    try:
        entries = r.slowlog_get(4096)
        r.slowlog_reset()
    finally:
        r.close()
    names: dict[str, int] = {}
    for e in entries:
        cmd = e.get("command") or b""
        cmd = cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)
        name = " ".join(cmd.split()[:2])
        names[name] = names.get(name, 0) + 1
    durs = sorted(e["duration"] for e in entries)
    return {"count": len(durs), "max_us": durs[-1] if durs else 0,
            "p50_us": durs[len(durs) // 2] if durs else 0, "commands": names}


def service_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("GATEWAY_NO_EXTENSIONS", None)
    for k in list(env):
        if k.startswith("WS_CANDLE_"):
            env.pop(k)
    env.update(LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", **extra)
    return env


def start_service(redis, workdir: Path, tag: str, cpu: int):
    svc = CandleProcess(redis.url, log_path=workdir / f"candles-{tag}.log", env=service_env(),
                        cpu=cpu, new_group=True, die_with_parent=True)
    svc.start()
    fanout.PROCS.live.append(svc.proc)
    try:
        svc.wait_role("leader", timeout=30)
    except HarnessError:
        stop_service(svc)
        raise
    return svc


def stop_service(svc) -> int | None:
    rc = svc.stop(timeout=10)
    if svc.proc in fanout.PROCS.live:
        fanout.PROCS.live.remove(svc.proc)
    return rc


def service_metrics(svc) -> dict:
    m = scrape_metrics(svc.port, timeout=5.0)
    if m is None:
        raise HarnessError(f"no /metrics from the candle service:\n{svc.log_tail()}")
    return m


SERVICE_BAD = ("candles_trades_invalid_total", "candles_trades_too_late_total",
               "candles_trades_future_total", "candles_trades_duplicate_total",
               "candles_trades_lost_total", "candles_publish_errors_total")


def wait_applied(svc, want: float, timeout: float = 8.0) -> dict:
    """/metrics once candles_trades_applied_total reached ``want`` (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = service_metrics(svc)
        if metric(m, "candles_trades_applied_total") >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def write_symbols(workdir: Path, tag: str, n: int) -> Path:
    p = workdir / f"symbols-{tag}.txt"
    p.write_text("".join(fanout.symbol_name(i) + "\n" for i in range(n)))
    return p


class BackgroundPublisher:
    """bench/publisher.c in rate mode, not waited for (fanout.run_publisher blocks)."""

    def __init__(self, tools, redis, symfile: Path, workdir: Path, rate: int, duration_s: float,
                 epoch: str | None):
        argv = [str(tools["publisher"]), "-p", str(redis.port), "-s", str(symfile),
                "-P", fanout.CHANNEL_PREFIX, "-m", "rate", "-r", str(rate), "-d", f"{duration_s:.3f}"]
        if epoch:
            argv += ["-E", epoch]
        self.out_path = workdir / f"publisher-{time.monotonic_ns()}.out"
        self.out = open(self.out_path, "wb")  # noqa: SIM115  (closed in finish)
        self.proc = fanout.PROCS.start(argv, cpu=AUX_CPU, stdout=self.out, log=workdir / "publisher.log")
        self.started = time.monotonic()

    def finish(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            fanout.PROCS.stop(self.proc, timeout=1)
            raise HarnessError("publisher did not finish in time") from None
        fanout.PROCS.stop(self.proc)
        self.out.close()
        lines = [ln for ln in self.out_path.read_text().splitlines() if ln.startswith("{")]
        if not lines:
            raise HarnessError(f"publisher failed (exit {self.proc.returncode})")
        return json.loads(lines[-1])


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


# -------------------------------------------------------------------- part A ----

def part_a(tools, redis, workdir: Path, sz: Sizes, run_id: str) -> list[dict]:
    redis.command("FLUSHALL")
    symfile = write_symbols(workdir, "a", sz.a_symbols)
    svc = start_service(redis, workdir, "a", SERVICE_CPU_A)
    out: list[dict] = []
    try:
        # Prime: every symbol known to the service (streams begun), so the
        # idle windows measure the tick cost with these symbols known.
        pub = BackgroundPublisher(tools, redis, symfile, workdir, sz.a_prime_rate, sz.a_prime_s, None)
        prime = pub.finish(sz.a_prime_s + 15)
        m = wait_applied(svc, prime["sent"])
        if metric(m, "candles_trades_applied_total") != prime["sent"]:
            raise HarnessError(f"priming: the service applied "
                               f"{metric(m, 'candles_trades_applied_total'):.0f} of {prime['sent']} trades")
        time.sleep(2.5)      # the primed 1s candles' finals (2 s grace) are out
        applied_total = metric(m, "candles_trades_applied_total")
        cases = [(rate, form) for rate in sz.a_rates for form in ("plain", "seq")]
        for k, (rate, form) in enumerate(cases):
            epoch = f"{run_id}a{k}" if form == "seq" else None
            rec = {"part": "A", "rate": rate, "form": form, "symbols": sz.a_symbols, "epoch": epoch}
            probs: list[str] = []
            # idle: the same symbols known, no trades
            m0 = service_metrics(svc)
            s0, r0, t0 = sched_ns(svc.pid), redis.cpu_s(), time.monotonic()
            time.sleep(sz.a_idle_s)
            s1, r1, t1 = sched_ns(svc.pid), redis.cpu_s(), time.monotonic()
            m1 = service_metrics(svc)
            idle_rate = (s1[0] - s0[0]) / 1e9 / (t1 - t0)
            rec.update(idle_window_s=t1 - t0, idle_cpu_util=idle_rate,
                       idle_wait_s=(s1[1] - s0[1]) / 1e9, idle_redis_util=(r1 - r0) / (t1 - t0),
                       idle_published=metric(m1, "candles_published_total") - metric(m0, "candles_published_total"))
            if metric(m1, "candles_trades_applied_total") != applied_total:
                probs.append("trades applied during the idle window")
            # loaded
            pub = BackgroundPublisher(tools, redis, symfile, workdir, rate, sz.a_duration_s, epoch)
            sleep_until(pub.started + sz.a_skip_s)
            ma = service_metrics(svc)
            slow_commands(redis)
            fa = fcall_stats(redis)
            fo0 = foreign_cpu()
            sa, ra, ta = sched_ns(svc.pid), redis.cpu_s(), time.monotonic()
            sleep_until(pub.started + sz.a_duration_s - sz.a_tail_s)
            sb, rb, tb = sched_ns(svc.pid), redis.cpu_s(), time.monotonic()
            fo, fo_top = foreign_delta(fo0, foreign_cpu())
            fb = fcall_stats(redis)
            slow = slow_commands(redis)
            mb = service_metrics(svc)
            pubrep = pub.finish(sz.a_duration_s + 15)
            mc = wait_applied(svc, applied_total + pubrep["sent"])
            window = tb - ta
            cpu = (sb[0] - sa[0]) / 1e9
            trades = metric(mb, "candles_trades_applied_total") - metric(ma, "candles_trades_applied_total")
            net = cpu - idle_rate * window
            applied = metric(mc, "candles_trades_applied_total") - applied_total
            applied_total = metric(mc, "candles_trades_applied_total")
            waited = (sb[1] - sa[1]) / 1e9
            rec.update(
                published=pubrep["sent"], applied=applied, window_s=window, window_trades=trades,
                cpu_s=cpu, cpu_util=cpu / window, wait_s=waited,
                core_shared=waited > max(0.05, 0.05 * window),
                us_per_trade_gross=cpu / trades * 1e6 if trades else None,
                us_per_trade_net=net / trades * 1e6 if trades else None,
                redis_util=(rb - ra) / window,
                redis_us_per_trade=(rb - ra) / trades * 1e6 if trades else None,
                window_published=metric(mb, "candles_published_total") - metric(ma, "candles_published_total"),
                window_updates=metric(mb, "candles_updates_total") - metric(ma, "candles_updates_total"),
                publisher_late_ticks=pubrep.get("late_ticks"),
                redis_fcalls=fb[0] - fa[0],
                redis_us_per_fcall=(fb[1] - fa[1]) / (fb[0] - fa[0]) if fb[0] > fa[0] else None,
                redis_slow=slow, foreign_cpu_s=fo, foreign_top=fo_top,
                notes=[f"other processes used {fo:.2f} s of CPU in the window ({fo_top})"]
                if fo > FOREIGN_NOTE_S else [],
                service_counters={k: metric(mc, k) for k in SERVICE_BAD})
            if applied != pubrep["sent"]:
                probs.append(f"the service applied {applied:.0f} of {pubrep['sent']} trades published")
            if pubrep.get("errors"):
                probs.append(f"publisher errors={pubrep['errors']}")
            for k in SERVICE_BAD:
                if metric(mc, k):
                    probs.append(f"{k}={metric(mc, k):.0f}")
            if not svc.alive():
                probs.append("the candle service died")
            rec.update(ok=not probs, problems=probs)
            out.append(rec)
            print(f"[A] {rate}/s {form}: {rec['us_per_trade_net'] or 0:.1f} µs/trade net "
                  f"({rec['us_per_trade_gross'] or 0:.1f} gross, idle {idle_rate:.1%}); "
                  f"applied {applied:.0f}/{pubrep['sent']}", file=sys.stderr)
    finally:
        rc = stop_service(svc)
    probs = [f"candle service log: {ln}" for ln in svc.log_problems()]
    if rc not in (0, None):
        probs.append(f"candle service exit code {rc} after SIGTERM")
    if probs and out:
        out[-1]["problems"] += probs
        out[-1]["ok"] = False
    # marginal cost: the slope of CPU/s against offered rate, per form
    for form in ("plain", "seq"):
        rs = sorted((r for r in out if r["form"] == form), key=lambda r: r["rate"])
        if len(rs) >= 2:
            lo, hi = rs[0], rs[-1]
            dr = hi["window_trades"] / hi["window_s"] - lo["window_trades"] / lo["window_s"]
            if dr > 0:
                hi["us_per_trade_marginal"] = (hi["cpu_util"] - lo["cpu_util"]) / dr * 1e6
    return out


# -------------------------------------------------------------------- part B ----

class CandleClients:
    def __init__(self, port: int, n: int, nsym: int, workdir: Path, tag: str):
        spec = {"port": port, "connections": n, "symbols": nsym, "intervals": list(INTERVALS)}
        self.out_path = workdir / f"candleclients-{tag}.out"
        self.out = open(self.out_path, "wb")  # noqa: SIM115  (closed in finish)
        self.proc = fanout.PROCS.start([sys.executable, str(Path(__file__).resolve()),
                                        "--candle-clients-worker", json.dumps(spec)],
                                       cpu=AUX_CPU, stdout=self.out, log=workdir / "candleclients.log",
                                       nofile=4096)

    def _json_lines(self) -> list[dict]:
        return [json.loads(ln) for ln in self.out_path.read_text(errors="replace").splitlines()
                if ln.startswith("{")]

    def wait_ready(self, timeout: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ln in self.out_path.read_text(errors="replace").splitlines():
                if ln.startswith("READY"):
                    _, ok, failed = ln.split()
                    return int(ok), int(failed)
            if self.proc.poll() is not None:
                raise HarnessError(f"candle clients exited ({self.proc.returncode}) before READY")
            time.sleep(0.05)
        raise HarnessError(f"candle clients not READY after {timeout:.0f} s")

    def mark(self, timeout: float = 5.0) -> dict:
        n = len(self._json_lines())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._json_lines()
            if len(lines) > n:
                return lines[-1]
            time.sleep(0.02)
        raise HarnessError("candle clients did not answer SIGUSR1")

    def finish(self, timeout: float = 10.0) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            fanout.PROCS.stop(self.proc, timeout=1)
            raise HarnessError("candle clients did not stop") from None
        fanout.PROCS.stop(self.proc)
        self.out.close()
        lines = [x for x in self._json_lines() if x["kind"] == "final"]
        if not lines:
            raise HarnessError("candle clients printed no final report")
        return lines[-1]


B_CASES = {
    # name: (candle service running, candle clients connected)
    "trades": (False, False),      # case 1 of the comparison
    "candles": (True, True),       # case 2
    "service": (True, False),      # diagnosis: candles reach the gateway, nobody subscribed
    "clients": (False, True),      # diagnosis: candle subscriptions, no candle flowing
}


def b_case(tools, redis, workdir: Path, sz: Sizes, case: str, rep: int) -> dict:
    with_service, with_clients = B_CASES[case]
    tag = f"b-{case}-{rep}"
    redis.command("FLUSHALL")
    topo = fanout.Topology(sz.b_symbols, fanout.client_symbols(sz.b_trade_clients, sz.b_symbols,
                                                               sz.b_per_client))
    nticks = int(sz.b_duration_s * 1000 + 0.5)
    total = int(sz.b_rate * nticks / 1000)
    counts = fanout.per_symbol_counts(total, topo.nsym)
    symfile, connfile, expected = topo.write(workdir, tag, counts)
    rec: dict = {"part": "B", "case": case, "repeat": rep,
                 "rate": sz.b_rate, "symbols": sz.b_symbols, "trade_clients": sz.b_trade_clients,
                 "candle_clients": sz.b_candle_clients if with_clients else 0,
                 "expected_deliveries": expected}
    probs: list[str] = []
    notes: list[str] = []
    gw = fanout.Gateway("compiled", redis, workdir, tag)
    svc = cc = None
    cc_rep = cc0 = cc1 = svc_m = None
    svc_rc = None
    try:
        if fanout.mapped_fastpath(gw.pid) is None:
            raise HarnessError("the gateway did not load the compiled fast path")
        if fanout.upgrade_status(gw.port) != 101:
            raise HarnessError(f"warm-up upgrade failed:\n{gw.log_tail()}")
        if with_service:
            svc = start_service(redis, workdir, tag, AUX_CPU)
        if with_clients:
            cc = CandleClients(gw.port, sz.b_candle_clients, sz.b_symbols, workdir, tag)
            ok, failed = cc.wait_ready(30 + sz.b_candle_clients / 50)
            rec.update(candle_connected=ok, candle_connect_failed=failed)
            if failed:
                probs.append(f"{failed} candle client connections failed")
        connect_budget = 30 + sz.b_trade_clients / 200
        run_budget = sz.b_duration_s + sz.b_drain_s
        lc = fanout.LoadClient(tools["loadclient"], gw.port, connfile,
                               deadline_s=connect_budget + run_budget, run_s=run_budget,
                               sample=sz.b_sample, idle_ms=0, skip_ms=sz.b_skip_ms, grace_ms=200,
                               inflight=64, workdir=workdir)
        try:
            ok_conns, failed = lc.wait_ready(connect_budget)
        except HarnessError:
            fanout.PROCS.stop(lc.proc, timeout=2)
            raise
        time.sleep(0.3)
        if cc:
            cc0 = cc.mark()
        svc_cpu0 = procfs.cpu_seconds(svc.pid) if svc else None
        m0 = scrape_metrics(gw.port, timeout=5.0)
        slow_commands(redis)
        f0 = fcall_stats(redis)
        us0 = user_sys_s(gw.pid)
        fo0 = foreign_cpu()
        g0, r0, t0_real = sched_ns(gw.pid), redis.cpu_s(), time.time_ns()
        cores0 = procfs.core_times()
        pub = fanout.run_publisher(tools["publisher"], redis, symfile, workdir, rate=sz.b_rate,
                                   duration_s=sz.b_duration_s, timeout=sz.b_duration_s + 15)
        rep_lc = lc.finish(timeout=run_budget + 30)
        g1, r1 = sched_ns(gw.pid), redis.cpu_s()
        us1 = user_sys_s(gw.pid)
        fo, fo_top = foreign_delta(fo0, foreign_cpu())
        cores1 = procfs.core_times()
        f1 = fcall_stats(redis)
        slow = slow_commands(redis)
        svc_cpu1 = procfs.cpu_seconds(svc.pid) if svc else None
        if cc:
            cc1 = cc.mark()
        m1 = scrape_metrics(gw.port, timeout=5.0)
        if svc:
            svc_m = wait_applied(svc, pub["sent"])
        alive = gw.alive()
    finally:
        if cc:
            with contextlib.suppress(HarnessError):
                cc_rep = cc.finish()
        if svc:
            svc_rc = stop_service(svc)
        rc = gw.stop(redis)
    frames = rep_lc["frames_total"]
    window_s = max((rep_lc["t_last_ns"] - t0_real) / 1e9, 1e-9) if frames else None
    gw_cpu = (g1[0] - g0[0]) / 1e9
    waited = (g1[1] - g0[1]) / 1e9
    overloaded = bool(rep_lc["missing"]) or (window_s or 0) > sz.b_duration_s + 1.0
    probs += fanout.correctness_problems(rep_lc, pub)
    if not alive:
        probs.append("the gateway died during the case")
    probs += [f"gateway log: {ln}" for ln in gw.log_problems()]
    aux = procfs.core_usage(cores0, cores1, AUX_CPU)
    if window_s and waited > max(0.05, 0.05 * window_s):
        notes.append(f"core {GATEWAY_CPU} shared: the gateway waited {waited:.2f} s for its core")
    if fo > FOREIGN_NOTE_S:
        notes.append(f"other processes used {fo:.2f} s of CPU in the window ({fo_top})")
    lc_cpu = rep_lc["cpu_user_s"] + rep_lc["cpu_sys_s"] - rep_lc.get("cpu_at_ready_s", 0)
    dm = {k: metric(m1, k) - metric(m0, k) for k in
          ("gateway_redis_messages_total", "gateway_frames_sent_total", "gateway_candle_messages_total",
           "gateway_unrouted_messages_total", "gateway_writes_total")}
    rec.update(
        published=pub["sent"], deliveries=frames, missing=rep_lc["missing"], window_s=window_s,
        deliveries_per_s=frames / window_s if window_s else None, overloaded=overloaded,
        gateway_cpu_s=gw_cpu, gateway_cpu_util=gw_cpu / window_s if window_s else None,
        gateway_us_per_trade_frame=gw_cpu / frames * 1e6 if frames else None,
        gateway_wait_s=waited, gateway_metrics_delta=dm,
        gateway_user_us_per_trade_frame=(us1[0] - us0[0]) / frames * 1e6 if frames else None,
        gateway_sys_us_per_trade_frame=(us1[1] - us0[1]) / frames * 1e6 if frames else None,
        frames_per_write=dm["gateway_frames_sent_total"] / dm["gateway_writes_total"]
        if dm["gateway_writes_total"] else None,
        redis_fcalls=f1[0] - f0[0],
        redis_us_per_fcall=(f1[1] - f0[1]) / (f1[0] - f0[0]) if f1[0] > f0[0] else None,
        redis_slow=slow, foreign_cpu_s=fo, foreign_top=fo_top,
        gateway_candle_messages_total=metric(m1, "gateway_candle_messages_total"),
        latency_us=rep_lc["latency_us"], connected=ok_conns, connect_failed=failed,
        redis_cpu_s=r1 - r0, loadclient_cpu_s=lc_cpu,
        publisher_cpu_s=pub["cpu_user_s"] + pub["cpu_sys_s"], publisher_late_ticks=pub.get("late_ticks"),
        core_aux=aux,
        gateway_exit_code=rc, notes=notes)
    if svc is not None:
        applied = metric(svc_m, "candles_trades_applied_total")
        rec.update(service_cpu_s=(svc_cpu1 or 0) - (svc_cpu0 or 0), service_applied=applied,
                   service_published=metric(svc_m, "candles_published_total"), service_exit_code=svc_rc)
        if applied != pub["sent"]:
            probs.append(f"the candle service applied {applied:.0f} of {pub['sent']} trades")
        for k in SERVICE_BAD:
            if metric(svc_m, k):
                probs.append(f"candle service {k}={metric(svc_m, k):.0f}")
        probs += [f"candle service log: {ln}" for ln in svc.log_problems()]
        if svc_rc not in (0, None):
            probs.append(f"candle service exit code {svc_rc} after SIGTERM")
    # what this run put on CPU 1 (the processes it measured), as a share of the window
    known = rec["redis_cpu_s"] + lc_cpu + rec["publisher_cpu_s"] + rec.get("service_cpu_s", 0)
    if cc0 and cc1:
        known += cc1["cpu_s"] - cc0["cpu_s"]
    rec["aux_known_util"] = known / window_s if window_s else None
    if cc is not None:
        if cc0 and cc1:
            rec.update(candle_frames_window=cc1["candle"] - cc0["candle"],
                       candle_finals_window=cc1["final"] - cc0["final"],
                       candle_updates_window=cc1["update"] - cc0["update"],
                       candle_delay_ms_window=cc1["delay_ms"],
                       candle_clients_cpu_s=cc1["cpu_s"] - cc0["cpu_s"])
        if cc_rep is None:
            probs.append("the candle clients gave no final report")
        else:
            rec.update(candle_clients=cc_rep)
            if with_service and not cc_rep["candle"]:
                probs.append("the candle clients received no candle frame")
            if with_service and cc_rep["conns_without_candles"]:
                probs.append(f"{cc_rep['conns_without_candles']} candle connections received no candle")
            for k in ("errors", "other", "parse_errors", "final_dups", "closed", "failed"):
                if cc_rep.get(k):
                    probs.append(f"candle clients {k}={cc_rep[k]}" +
                                 (f" ({'; '.join(cc_rep['problems'][:2])})" if cc_rep["problems"] else ""))
    if with_service and with_clients and not dm["gateway_candle_messages_total"]:
        probs.append("the gateway counted no candle message during the window")
    if not with_service and dm["gateway_candle_messages_total"]:
        probs.append("candle messages counted without a candle service")
    rec.update(ok=not probs, problems=probs)
    lat = rec["latency_us"] or {}
    print(f"[B] rep {rep} {rec['case']}: {rec['gateway_us_per_trade_frame'] or 0:.3f} µs/trade frame, "
          f"p50/p99 {lat.get('p50', 0) / 1000:.2f}/{lat.get('p99', 0) / 1000:.2f} ms, "
          f"candle frames {rec.get('candle_frames_window', '-')}, ok={rec['ok']}", file=sys.stderr)
    return rec


def noisy(rec: dict) -> bool:
    """Another process took the gateway's core, or much CPU, during the window."""
    w = rec.get("window_s") or 0
    return (rec.get("gateway_wait_s") or 0) > max(0.05, 0.05 * w) or \
        (rec.get("foreign_cpu_s") or 0) > FOREIGN_NOTE_S


def part_b(tools, redis, workdir: Path, sz: Sizes, repeat: int, cases: list[str],
           retries: int) -> list[dict]:
    out = []
    for rep in range(repeat):
        for case in (cases if rep % 2 == 0 else list(reversed(cases))):
            try:
                for attempt in range(1 + retries):
                    rec = b_case(tools, redis, workdir, sz, case, rep)
                    rec["attempts"] = attempt + 1
                    if not noisy(rec):
                        break
                    if attempt < retries:
                        print(f"[B] rep {rep} {case}: other work on the machine during the window, "
                              "running it again", file=sys.stderr)
                out.append(rec)
            except HarnessError as e:
                # a gateway or service that cannot start is a finding for that case
                print(f"[B] rep {rep} {case}: {e}", file=sys.stderr)
                out.append({"part": "B", "case": case, "repeat": rep, "ok": False,
                            "error": str(e), "problems": [str(e).splitlines()[0]]})
    return out


# ----------------------------------------------------------------- reporting ----

def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def spread(vals: list[float], spec: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return (f"{format(statistics.median(vals), spec)} ({format(min(vals), spec)}-"
            f"{format(max(vals), spec)})")


def slow_cell(slow: dict | None) -> str:
    if not slow:
        return "-"
    return f"{slow['count']} ({slow['max_us'] / 1000:.1f})" if slow["count"] else "0"


def report(results: list[dict], sz: Sizes) -> str:
    out: list[str] = []

    def table(header, rows):
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(map(str, r)) + " |" for r in rows)
        out.append("")

    a = [r for r in results if r.get("part") == "A"]
    if a:
        out += [f"### A: candle service CPU per trade ({sz.a_symbols} symbols, intervals "
                f"{','.join(INTERVALS)}, service alone on CPU {SERVICE_CPU_A})", ""]
        table(["offered/s", "form", "applied/published", "idle CPU", "loaded CPU", "µs/trade gross",
               "µs/trade net of idle", "µs/trade marginal", "candle msgs/s", "Redis µs/trade",
               "Redis µs/FCALL", f"Redis cmds >{SLOW_US // 1000} ms (max ms)", "core wait s",
               "others' CPU s", "ok"],
              [[f"{r['rate']:,}", r["form"], f"{r['applied']:.0f}/{r['published']}",
                fmt(r["idle_cpu_util"], ".1%"), fmt(r["cpu_util"], ".1%"),
                fmt(r["us_per_trade_gross"], ".1f"), fmt(r["us_per_trade_net"], ".1f"),
                fmt(r.get("us_per_trade_marginal"), ".1f"),
                fmt(r["window_published"] / r["window_s"], ",.0f"), fmt(r["redis_us_per_trade"], ".2f"),
                fmt(r.get("redis_us_per_fcall"), ".0f"), slow_cell(r.get("redis_slow")),
                fmt(r["wait_s"], ".2f"), fmt(r.get("foreign_cpu_s")), r["ok"]]
               for r in a])
    b = [r for r in results if r.get("part") == "B"]
    if b:
        r0 = b[0]
        out += [f"### B: trade fan-out with and without candle subscriptions ({r0['rate']:,} trades/s "
                f"over {r0['symbols']} symbols, {r0['trade_clients']} trade connections x "
                f"{sz.b_per_client}; gateway alone on CPU {GATEWAY_CPU})", ""]
        table(["rep", "case", "deliveries/s", "gw CPU", "gw µs/trade frame", "frames/write", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "Redis CPU s",
               "Redis µs/FCALL", f"Redis cmds >{SLOW_US // 1000} ms (max ms)", "service µs/trade",
               "candle frames", "CPU-1 load", "gw core wait s", "others' CPU s", "ok"],
              [[r["repeat"], r["case"], fmt(r.get("deliveries_per_s"), ",.0f"),
                fmt(r.get("gateway_cpu_util"), ".1%"), fmt(r.get("gateway_us_per_trade_frame"), ".3f"),
                fmt(r.get("frames_per_write")),
                fmt(r["latency_us"]["p50"] / 1000, ".3f") if r.get("latency_us") else "-",
                fmt(r["latency_us"]["p99"] / 1000, ".3f") if r.get("latency_us") else "-",
                fmt(r["latency_us"]["p999"] / 1000, ".3f") if r.get("latency_us") else "-",
                fmt(r["latency_us"]["max"] / 1000, ".3f") if r.get("latency_us") else "-",
                fmt(r.get("redis_cpu_s")), fmt(r.get("redis_us_per_fcall"), ".0f"),
                slow_cell(r.get("redis_slow")),
                fmt(r["service_cpu_s"] / r["published"] * 1e6 if r.get("service_cpu_s") else None, ".1f"),
                r.get("candle_frames_window", "-"), fmt(r.get("aux_known_util"), ".0%"),
                fmt(r.get("gateway_wait_s")), fmt(r.get("foreign_cpu_s")), r["ok"]]
               for r in b if "deliveries" in r])
        rows = []
        for case in B_CASES:
            rs = [r for r in b if r["case"] == case and "deliveries" in r]
            if not rs:
                continue
            rows.append([case, len(rs), spread([r["gateway_us_per_trade_frame"] for r in rs], ".3f"),
                         spread([r["gateway_cpu_util"] * 100 for r in rs], ".1f"),
                         spread([r["latency_us"]["p50"] / 1000 for r in rs], ".3f"),
                         spread([r["latency_us"]["p99"] / 1000 for r in rs], ".3f"),
                         spread([r.get("candle_frames_window") for r in rs], ".0f")
                         if B_CASES[case][1] else "-"])
        out.append("median (min-max) over the repeats:")
        out.append("")
        table(["case", "runs", "gw µs/trade frame", "gw CPU %", "p50 ms", "p99 ms", "candle frames"], rows)
        comparisons = [(c, "trades") for c in B_CASES if c != "trades"] + [("candles", "service")]
        for case, base in comparisons:
            pairs = []
            for rep in sorted({r["repeat"] for r in b}):
                t = next((r for r in b if r["repeat"] == rep and r["case"] == base
                          and r.get("gateway_us_per_trade_frame")), None)
                c = next((r for r in b if r["repeat"] == rep and r["case"] == case
                          and r.get("gateway_us_per_trade_frame")), None)
                if t and c:
                    pairs.append(c["gateway_us_per_trade_frame"] / t["gateway_us_per_trade_frame"])
            if pairs:
                out.append(f"- {case}/{base}, gateway CPU per trade frame, per repeat: " +
                           ", ".join(f"{p:.2f}x" for p in pairs) +
                           f" (median {statistics.median(pairs):.2f}x)")
        out.append("")
    for r in results:
        if r.get("attempts", 1) > 1:
            out.append(f"- note, B {r['case']} rep {r['repeat']}: run {r['attempts']} times "
                       "(other work on the machine during the earlier window); the last is shown")
        for n in r.get("notes") or []:
            out.append(f"- note, {r.get('part')} {r.get('case', r.get('form', ''))} "
                       f"rep {r.get('repeat', '-')}: {n}")
        if not r.get("ok"):
            out.append(f"- **{r.get('part')} {r.get('case', '')}{r.get('rate', '')} {r.get('form', '')} "
                       f"rep {r.get('repeat', '-')}**: " + "; ".join(r.get("problems") or [r.get("error", "?")]))
    return "\n".join(out)


# ---------------------------------------------------------------------- main ----

def git_state() -> dict:
    """The commit measured, and the package files that differ from it (the
    gateway and the service run from the working tree as it is on disk)."""
    def git(*a):
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=30)
        return r.stdout.rstrip() if r.returncode == 0 else ""
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "gateway").splitlines() if ln.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "?", "dirty": dirty}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Candle streams at fixed offered rates: (A) the candle service's CPU per trade, "
                    "net of its idle tick cost; (B) gateway CPU per trade frame and latency with and "
                    "without candle subscriptions, alternating. Own redis-server on 127.0.0.1; "
                    "stops by itself.",
        epilog="Exit status: 0 correct, 3 some case incorrect, 1 harness error.")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (about 20-30 s in all)")
    p.add_argument("--parts", default="a,b", help="a, b or a,b (default: both)")
    p.add_argument("--repeat", type=int, default=None,
                   help="part B runs of each case, alternating order (default 3, 1 with --smoke)")
    p.add_argument("--cases", default="trades,candles",
                   help="part B cases, in this order (reversed on odd repeats): trades (no candles), "
                        "candles (service + candle clients); for diagnosis also service (candle "
                        "service, no candle client), clients (candle clients, no service)")
    p.add_argument("--b-rate", type=int, default=None, help="part B offered trades/s (default 20000)")
    p.add_argument("--trade-clients", type=int, default=None, help="part B load-client connections (default 200)")
    p.add_argument("--candle-clients", type=int, default=None,
                   help="part B candle connections, 3 streams each (default 200)")
    p.add_argument("--noisy-retries", type=int, default=None,
                   help="run a part B case again when other processes took the gateway's core or "
                        f"over {FOREIGN_NOTE_S} s of CPU during its window (default 1, 0 with --smoke)")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and temp files")
    p.add_argument("--candle-clients-worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.parts = {x.strip().lower() for x in a.parts.split(",") if x.strip()}
    if not a.parts or a.parts - {"a", "b"}:
        p.error("--parts: a, b or a,b")
    a.cases = [x.strip() for x in a.cases.split(",") if x.strip()]
    if not a.cases or any(c not in B_CASES for c in a.cases) or len(set(a.cases)) != len(a.cases):
        p.error(f"--cases: some of {', '.join(B_CASES)}, each once")
    if a.repeat is not None and a.repeat < 1:
        p.error("--repeat must be at least 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.candle_clients_worker:
        return candle_clients_worker(json.loads(args.candle_clients_worker))
    _harness_imports()
    sz = SMOKE if args.smoke else Sizes()
    if args.b_rate:
        sz.b_rate = args.b_rate
    if args.trade_clients:
        sz.b_trade_clients = args.trade_clients
    if args.candle_clients:
        sz.b_candle_clients = args.candle_clients
    repeat = args.repeat or (1 if args.smoke else 3)
    run_id = f"c{int(time.time()) % 100000}"
    tree = git_state()
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    print(f"gateway code: {tree['commit']}" + (f" + uncommitted changes in {', '.join(tree['dirty'])}"
                                              if tree["dirty"] else ""), file=sys.stderr)
    with fanout.BenchRun("gateway-bench-candles-", keep_workdir=args.keep_workdir) as run:
        tools = fanout.build_tools()
        redis = fanout.Redis(run.workdir)
        redis_prepare(redis)
        if "a" in args.parts:
            run.results += part_a(tools, redis, run.workdir, sz, run_id)
        if "b" in args.parts:
            retries = args.noisy_retries if args.noisy_retries is not None else (0 if args.smoke else 1)
            run.results += part_b(tools, redis, run.workdir, sz, repeat, args.cases, retries)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
            "argv": sys.argv[1:], "sizes": asdict(sz), "repeat": repeat,
            "ncpu": os.cpu_count(), **tree, "loadavg_start": load0,
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3]}
    footer = (f"gateway code {tree['commit']}" + (f" + uncommitted {', '.join(tree['dirty'])}"
                                                 if tree["dirty"] else "") +
              f"; load average {' '.join(load0)} at start; {run.duration_s:.0f} s")
    return run.finish(meta, args.out, report(run.results, sz), footer)


if __name__ == "__main__":
    sys.exit(main())
