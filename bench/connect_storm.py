"""Connection storm: every client reconnecting at once, as after a deploy or a
network blip.

One run per listen backlog, in the same invocation: asyncio's default (100,
what the gateway used before WS_BACKLOG) and the gateway's default (the
kernel's net.core.somaxconn). Each run:

- a fresh gateway (compiled fast path) alone on CPU 0, redis-server and the
  C load client (bench/loadclient.c) on CPU 1;
- the load client opens ``--clients`` connections with every connect in
  flight at once, upgrades each, waits for the welcome, subscribes each to one
  of 100 symbols and waits for the reply; "connected" is the moment the last
  subscribe reply arrived (the client's READY), measured from its start;
- TcpExtListenOverflows (SYNs the kernel dropped because the accept queue was
  full) before and after; the gateway's CPU (schedstat) over the storm.

    .venv/bin/python bench/connect_storm.py --repeat 2 --out /tmp/storm.json
    .venv/bin/python bench/connect_storm.py --smoke

The target (10,000 clients connected and subscribed within 3 s, no listen
overflow) is a line of the report, not an assertion.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from fanout import (  # noqa: E402  (bench/fanout.py: processes, tools, Redis, Gateway)
    AUX_CPU,
    GATEWAY_CPU,
    BenchRun,
    Gateway,
    HarnessError,
    LoadClient,
    Redis,
    build_tools,
    procfs,
)

SYMBOLS = 100
TARGET_S = 3.0
ASYNCIO_DEFAULT = 100


def one_run(tools, redis: Redis, workdir: Path, clients: int, backlog: int, tag: str) -> dict:
    conn = workdir / f"conn-{clients}.txt"
    conn.write_text("".join(f"0 ST{i % SYMBOLS:03d}\n" for i in range(clients)))
    gw = Gateway("compiled", redis, workdir, tag, extra_env={"WS_BACKLOG": str(backlog)})
    probs: list[str] = []
    try:
        time.sleep(0.2)
        lo0, sched0 = procfs.listen_overflows(), gw.schedstat()
        t0 = time.monotonic()
        lc = LoadClient(tools["loadclient"], gw.port, conn, deadline_s=120, run_s=0, sample=0,
                        inflight=clients, workdir=workdir, tag=f"storm-{tag}")
        ok, failed = lc.wait_ready(125)
        ready_s = time.monotonic() - t0
        rep = lc.finish(timeout=10, terminate=True)
        lo1, sched1 = procfs.listen_overflows(), gw.schedstat()
        alive = gw.alive()
    finally:
        rc = gw.stop(redis)
    if failed or ok != clients:
        probs.append(f"{failed} of {clients} connections failed")
    for key in ("connect_failures", "upgrade_errors", "subscribe_errors", "server_closes"):
        if rep.get(key):
            probs.append(f"{key}={rep[key]}")
    if not alive:
        probs.append(f"gateway died (exit {rc})")
    probs += [f"gateway log: {ln}" for ln in gw.log_problems()]
    gw_cpu = (sched1[0] - sched0[0]) / 1e9 if sched0 and sched1 else None
    return {
        "backlog": backlog, "clients": clients, "tag": tag,
        "connected_s": rep.get("connect_s"), "ready_seen_s": ready_s,
        "listen_overflows": lo1 - lo0 if lo0 is not None and lo1 is not None else None,
        "gateway_cpu_s": gw_cpu,
        "gateway_cpu_us_per_connection": gw_cpu / clients * 1e6 if gw_cpu else None,
        "client_cpu_s": rep.get("cpu_at_ready_s"),
        "ok": not probs, "problems": probs,
    }


def f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: list[dict], somaxconn: int) -> str:
    lines = [f"{'backlog':>16} {'clients':>8} {'connected s':>12} {'overflows':>10} "
             f"{'gw CPU s':>9} {'µs/conn':>8}  ok"]
    for r in results:
        name = f"{r['backlog']}" + (" (somaxconn)" if r["backlog"] == somaxconn else "")
        lines.append(f"{name:>16} {r['clients']:>8} {f(r.get('connected_s')):>12} "
                     f"{f(r.get('listen_overflows'), 'd'):>10} {f(r.get('gateway_cpu_s')):>9} "
                     f"{f(r.get('gateway_cpu_us_per_connection'), '.0f'):>8}  "
                     f"{'yes' if r['ok'] else 'NO: ' + '; '.join(r['problems'][:3])}")
    best = [r for r in results if r["backlog"] == somaxconn and r["ok"]]
    if best:
        worst = max(r["connected_s"] for r in best)
        over = max(r["listen_overflows"] or 0 for r in best)
        lines.append(f"target: all {best[0]['clients']} connected and subscribed within "
                     f"{TARGET_S:g} s with no listen overflow: worst {worst:.2f} s, {over} overflows"
                     f" -> {'met' if worst <= TARGET_S and not over else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Connection storm benchmark")
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=1, help="runs per backlog, order alternating")
    p.add_argument("--backlogs", default=f"{ASYNCIO_DEFAULT},0",
                   help="comma-separated WS_BACKLOG values to compare; 0 = the gateway's default, "
                        "the kernel's net.core.somaxconn (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="500 clients, one run each")
    p.add_argument("--out", default=None, help="JSON results (default: none)")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    clients = 500 if args.smoke else args.clients
    from gateway.config import listen_backlog
    somaxconn = listen_backlog(0)
    try:
        backlogs = [int(b) or somaxconn for b in args.backlogs.split(",")]
    except ValueError:
        p.error(f"--backlogs must be whole numbers, got {args.backlogs!r}")
    with BenchRun("gateway-connect-storm-", keep_workdir=args.keep_workdir) as run:
        tools = build_tools()
        redis = Redis(run.workdir)
        for rep in range(args.repeat):
            for backlog in (backlogs if rep % 2 == 0 else backlogs[::-1]):
                try:
                    rec = one_run(tools, redis, run.workdir, clients, backlog, f"b{backlog}-{rep}")
                except HarnessError as e:
                    rec = {"backlog": backlog, "clients": clients, "ok": False, "problems": [str(e)]}
                run.results.append(rec)
                print(f"[{'ok' if rec['ok'] else 'FAIL'}] backlog {backlog} rep {rep}: "
                      f"{f(rec.get('connected_s'))} s", file=sys.stderr)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
            "somaxconn": somaxconn, "ncpu": os.cpu_count(),
            "pinning": {"gateway": GATEWAY_CPU, "redis+loadclient+harness": AUX_CPU}}
    return run.finish(meta, args.out, report(run.results, somaxconn))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
