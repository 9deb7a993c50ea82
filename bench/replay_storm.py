"""Replay storm: many clients resuming at once while live clients keep receiving.

Issue 9's target: 1,000 clients reconnecting at once, each resuming 100 missed
trades on each of 5 symbols, are all caught up within 2 s, while clients that
are not resuming keep publish->receive p99 under 5 ms.

Setup (the same pinning as bench/fanout.py):

- redis-server on CPU 1; the ws_gateway function library loaded; 100 storm
  symbols each get ``--history`` (100) trades through ``FCALL publish_trade``
  (gateway.sequencing.publish_trade, one pipeline), so each symbol's history
  holds seqs 1..100 under its own epoch. Every trade carries its own ``"seq"``
  (= the seq Redis assigned) and ``"ts"``.
- ``python -m gateway`` on CPU 0 (bench/fanout.py's Gateway: a
  gateway._testbase GatewayProcess), a fresh one per run.
- Live clients: the C load client (bench/loadclient.c) with 100 connections,
  each on 5 of 10 live symbols, every connection sampled (latency from the
  trade's "ts", per-symbol order from its "seq"), fed by the C publisher in
  the sequenced form (``-E``: ``{"_seq":n,"_epoch":"live1",...}``) on an
  open-loop 1 ms schedule (``--live-rate`` trades/s over the 10 symbols).
- Storm clients: a second load client process with 1,000 connections, all
  connecting at once (no limit on connects in flight), each subscribing to 5
  storm symbols with ``"since": {SYM: {"epoch": <its epoch>, "seq": 0}}``
  (``-J``), i.e. resuming all 100 retained trades of each: 500 frames per
  client, 500,000 in all. Every connection checks that each symbol's trades
  arrive as seq 1, 2, ... 100 (no hole, no duplicate, no foreign symbol) and
  that it gets exactly 500 frames (a 200 ms grace catches extras).

Both load clients, the publisher, Redis and this script share CPU 1.

A run: live clients connect; the live feed starts; after ``--warmup`` s the
storm load client is started (t0); the live feed goes on for ``--window`` s
after t0. Catch-up time is t0 -> the moment the last storm connection got its
500th frame (CLOCK_REALTIME, per connection: p50/p99/max are reported); it
includes starting the load client process, 1,000 TCP connects, upgrades and
subscribes. Live latency percentiles are over the ``--window`` s from t0 (the
warm-up is skipped). A "quiet" run does the same without the storm, as the
control; with ``--repeat 2`` the order of storm and quiet runs alternates.

Client side: the report gives the storm load client's own CPU time and the
gateway's CPU time (schedstat) over the catch-up window; when the gateway was
busy for nearly all of it, the gateway set the pace, not the clients.

Run (about 30 s):

    .venv/bin/python bench/replay_storm.py --repeat 2 --out /tmp/replay_storm.json
    .venv/bin/python bench/replay_storm.py --smoke

Exit status: 0 correct (targets are reported, not enforced), 3 a correctness
problem, 1 harness error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fanout  # noqa: E402  (bench/fanout.py: processes, tools, Redis, Gateway)
import redis as redis_py  # noqa: E402
from fanout import (  # noqa: E402
    AUX_CPU,
    GATEWAY_CPU,
    PROCS,
    BenchRun,
    Gateway,
    HarnessError,
    LoadClient,
    Redis,
    build_tools,
    client_symbols,
    per_symbol_counts,
    procfs,
    scrape_metrics,
)

from gateway import sequencing  # noqa: E402

LIVE_EPOCH = "live1"


@dataclass
class Sizes:
    storm_symbols: int = 100
    storm_clients: int = 1000
    per_client: int = 5
    history: int = 100          # trades published per storm symbol = trades resumed
    live_symbols: int = 10
    live_clients: int = 100
    live_rate: int = 1000       # trades/s over the live symbols (x50 subscribers each)
    warmup_s: float = 1.0
    window_s: float = 2.0
    target_catchup_s: float = 2.0
    target_live_p99_ms: float = 5.0
    inflight: int = 0           # storm connects in flight at once (0: all)


SMOKE = Sizes(storm_symbols=20, storm_clients=50, history=20, live_clients=10, live_rate=200,
              warmup_s=0.3, window_s=0.7)


def storm_symbol(i: int) -> str:
    return f"RS{i:03d}"


def live_symbol(i: int) -> str:
    return f"LV{i:02d}"


def publish_history(redis_url: str, sz: Sizes) -> dict[str, str]:
    """history trades on each storm symbol through FCALL publish_trade, one
    pipeline; returns symbol -> epoch. Every symbol must be new (seq from 1)."""
    client = redis_py.Redis.from_url(redis_url, socket_timeout=30)
    try:
        sequencing.load_library(client, fanout.CHANNEL_PREFIX)
        pipe = client.pipeline(transaction=False)
        k = 0
        for n in range(1, sz.history + 1):
            for i in range(sz.storm_symbols):
                sym = storm_symbol(i)
                ts = time.time_ns()
                h = (k * 2654435761) & 0xFFFFFFFF
                trade = (f'{{"symbol":"{sym}","price":{10 + h % 990}.{(h >> 10) % 100:02d},'
                         f'"volume":{1 + (h >> 17) % 5000},"timestamp":{ts // 1_000_000},'
                         f'"conditions":["@","T"],"exchange":"NASDAQ","tradeId":"{k:016x}",'
                         f'"seq":{n},"ts":{ts}}}')
                sequencing.publish_trade(pipe, sym, trade)
                k += 1
        seqs = pipe.execute()
        want = [n for n in range(1, sz.history + 1) for _ in range(sz.storm_symbols)]
        if seqs != want:
            raise HarnessError("publish_trade did not number the history 1..N per symbol "
                               "(were the symbols' keys already there?)")
        epochs = {}
        for i in range(sz.storm_symbols):
            sym = storm_symbol(i)
            h = sequencing.parse_history(client.fcall_ro("trade_history", 1, sym, -1, 1))
            if h.epoch is None or h.last != sz.history:
                raise HarnessError(f"history of {sym}: {h}")
            epochs[sym] = h.epoch
        return epochs
    finally:
        client.close()


def write_storm_files(workdir: Path, sz: Sizes, epochs: dict[str, str]) -> tuple[Path, Path, int]:
    clients = client_symbols(sz.storm_clients, sz.storm_symbols, sz.per_client)
    conns, subs = [], []
    for syms in clients:
        names = [storm_symbol(s) for s in syms]
        conns.append(f"{sz.history * len(names)} {' '.join(names)}\n")
        subs.append(json.dumps({"action": "subscribe", "symbols": names,
                                "since": {n: {"epoch": epochs[n], "seq": 0} for n in names}},
                               separators=(",", ":")) + "\n")
    connfile, subfile = workdir / "storm-conns.txt", workdir / "storm-subs.txt"
    connfile.write_text("".join(conns))
    subfile.write_text("".join(subs))
    return connfile, subfile, sz.history * sz.per_client * len(clients)


def write_live_files(workdir: Path, sz: Sizes, total_msgs: int) -> tuple[Path, Path, int]:
    counts = per_symbol_counts(total_msgs, sz.live_symbols)
    clients = client_symbols(sz.live_clients, sz.live_symbols, sz.per_client)
    symfile, connfile = workdir / "live-symbols.txt", workdir / "live-conns.txt"
    symfile.write_text("".join(live_symbol(i) + "\n" for i in range(sz.live_symbols)))
    lines, expected = [], 0
    for syms in clients:
        exp = sum(counts[s] for s in syms)
        expected += exp
        lines.append(f"{exp} {' '.join(live_symbol(s) for s in syms)}\n")
    connfile.write_text("".join(lines))
    return symfile, connfile, expected


def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def lc_problems(rep: dict, who: str) -> list[str]:
    probs = []
    for key in ("connect_failures", "upgrade_errors", "subscribe_errors", "server_closes",
                "closed_while_active", "missing", "extra", "seq_gaps", "seq_dups",
                "wrong_symbol", "parse_errors"):
        if rep.get(key):
            probs.append(f"{who}: {key}={rep[key]}")
    return probs


def one_run(tools, redis: Redis, workdir: Path, sz: Sizes, epochs: dict[str, str], *,
            storm: bool, tag: str) -> dict:
    feed_s = sz.warmup_s + sz.window_s
    nticks = int(feed_s * 1000 + 0.5)
    total_live = int(sz.live_rate * nticks / 1000)
    live_sym, live_conn, live_expected = write_live_files(workdir, sz, total_live)
    storm_conn, storm_subs, storm_expected = write_storm_files(workdir, sz, epochs)
    gw = Gateway("compiled", redis, workdir, tag)
    probs: list[str] = []
    storm_rep = None
    counts_path = workdir / f"storm-counts-{tag}.txt"
    try:
        live = LoadClient(tools["loadclient"], gw.port, live_conn, deadline_s=60, run_s=feed_s + 20,
                          sample=1, idle_ms=0, skip_ms=int(sz.warmup_s * 1000), grace_ms=200,
                          inflight=64, workdir=workdir)
        live.wait_ready(30)
        time.sleep(0.2)
        m0 = scrape_metrics(gw.port) or {}
        pub_out = workdir / f"live-publisher-{tag}.out"
        pub_f = open(pub_out, "wb")  # noqa: SIM115
        pub = PROCS.start([str(tools["publisher"]), "-p", str(redis.port), "-s", str(live_sym),
                           "-P", fanout.CHANNEL_PREFIX, "-E", LIVE_EPOCH, "-m", "rate",
                           "-r", str(sz.live_rate), "-d", f"{feed_s:.3f}"],
                          cpu=AUX_CPU, stdout=pub_f, log=workdir / "publisher.log")
        time.sleep(sz.warmup_s)
        sched0, cores0, rcpu0 = gw.schedstat(), procfs.core_times(), redis.cpu_s()
        lo0 = procfs.listen_overflows()
        t0 = time.time_ns()
        if storm:
            sl = LoadClient(tools["loadclient"], gw.port, storm_conn, deadline_s=30, run_s=20,
                            sample=1, idle_ms=0, skip_ms=0, grace_ms=200,
                            inflight=sz.inflight or sz.storm_clients, workdir=workdir, tag="storm-lc",
                            extra=["-J", str(storm_subs), "-o", str(counts_path)])
            storm_rep = sl.finish(timeout=40)
        t_storm_end = time.time_ns()
        lo1 = procfs.listen_overflows()
        sched1, cores1 = gw.schedstat(), procfs.core_times()
        try:
            pub.wait(feed_s + 15)
        except Exception:
            PROCS.stop(pub, timeout=1)
            raise HarnessError("live publisher did not finish") from None
        PROCS.stop(pub)
        pub_f.close()
        rcpu1 = redis.cpu_s()
        live_rep = live.finish(timeout=feed_s + 30)
        m1 = scrape_metrics(gw.port) or {}
        alive = gw.alive()
    finally:
        rc = gw.stop(redis)
    pub_rep = json.loads([ln for ln in pub_out.read_text().splitlines() if ln.startswith("{")][-1])
    probs += lc_problems(live_rep, "live")
    if pub_rep.get("errors") or pub_rep.get("receivers_zero"):
        probs.append(f"live publisher: errors={pub_rep.get('errors')} "
                     f"receivers_zero={pub_rep.get('receivers_zero')}")
    if not alive:
        probs.append(f"gateway died (exit {rc})")
    probs += [f"gateway log: {ln}" for ln in gw.log_problems()]
    dm = {k.removeprefix("gateway_"): m1.get(k, 0) - m0.get(k, 0) for k in (
        "gateway_replays_total", "gateway_replayed_frames_total", "gateway_history_errors_total",
        "gateway_duplicate_messages_total", "gateway_gap_fills_total",
        "gateway_sequenced_messages_total")}
    rec: dict = {"run": "storm" if storm else "quiet", "tag": tag, "gateway_counters": dm,
                 "live": {k: v for k, v in live_rep.items() if k != "latency_hist"},
                 "live_expected": live_expected, "live_publisher": pub_rep,
                 "live_deliveries_per_s": sz.live_rate * sz.live_clients * sz.per_client / sz.live_symbols,
                 "redis_cpu_s": rcpu1 - rcpu0}
    lat = live_rep.get("latency_us") or {}
    rec["live_p50_ms"] = lat.get("p50", 0) / 1000 if lat else None
    rec["live_p99_ms"] = lat.get("p99", 0) / 1000 if lat else None
    rec["live_p999_ms"] = lat.get("p999", 0) / 1000 if lat else None
    rec["live_max_ms"] = lat.get("max", 0) / 1000 if lat else None
    if storm:
        probs += lc_problems(storm_rep, "storm")
        if storm_rep["frames_total"] != storm_expected:
            probs.append(f"storm: {storm_rep['frames_total']} frames, {storm_expected} expected")
        if dm["replays_total"] != sz.storm_clients:
            probs.append(f"gateway served {dm['replays_total']:.0f} resumes, "
                         f"{sz.storm_clients} asked")
        if dm["replayed_frames_total"] != storm_expected:
            probs.append(f"gateway replayed {dm['replayed_frames_total']:.0f} frames, "
                         f"{storm_expected} expected")
        if dm["history_errors_total"]:
            probs.append(f"history errors: {dm['history_errors_total']:.0f}")
        done = []
        for line in counts_path.read_text().splitlines():
            got, exp, t_done = (int(x) for x in line.split())
            if got == exp and t_done:
                done.append((t_done - t0) / 1e9)
        done.sort()
        if len(done) != sz.storm_clients:
            probs.append(f"storm: {sz.storm_clients - len(done)} clients never caught up")
        # every client or none: a client that never caught up has no catch-up time
        catchup = done[-1] if len(done) == sz.storm_clients else None
        gw_cpu = (sched1[0] - sched0[0]) / 1e9 if sched0 and sched1 else None
        gw_wait = (sched1[1] - sched0[1]) / 1e9 if sched0 and sched1 else None
        lc_cpu = storm_rep["cpu_user_s"] + storm_rep["cpu_sys_s"]
        rec.update({
            "storm_clients": sz.storm_clients, "storm_frames": storm_rep["frames_total"],
            "storm_expected": storm_expected,
            "catchup_s": catchup, "storm_caught_up": len(done), "catchup_p50_s": pct(done, 0.5), "catchup_p99_s": pct(done, 0.99),
            "storm_connect_s": storm_rep.get("connect_s"),
            "storm_connects_in_flight": sz.inflight or sz.storm_clients,
            "listen_overflows": lo1 - lo0 if lo0 is not None and lo1 is not None else None,
            "storm_process_s": (t_storm_end - t0) / 1e9,
            # CPU over t0 .. the storm load client's exit (catch-up + 200 ms grace)
            "gateway_cpu_s_storm": gw_cpu, "gateway_runqueue_wait_s_storm": gw_wait,
            "storm_client_cpu_s": lc_cpu,
            "storm_client_cpu_connect_s": storm_rep.get("cpu_at_ready_s"),
            "core_aux_storm": procfs.core_usage(cores0, cores1, AUX_CPU),
            "core_gateway_storm": procfs.core_usage(cores0, cores1, GATEWAY_CPU),
            "storm_loadclient": {k: v for k, v in storm_rep.items() if k != "latency_hist"},
        })
        if gw_wait and gw_wait > 0.05:
            rec.setdefault("notes", []).append(
                f"core {GATEWAY_CPU} shared: the gateway waited {gw_wait:.2f} s for its core")
    rec["ok"] = not probs
    rec["problems"] = probs
    return rec


def f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def report(results: list[dict], sz: Sizes) -> str:
    out = ["| run | rep | caught up | catch-up s (p50 / p99 / all) | storm connect s | gw CPU s in storm | "
           "storm client CPU s | live p50 / p99 / p99.9 / max ms | replays | ok |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r.get('run')} | {r.get('repeat')} | error: {r['error']} |||||||| False |")
            continue
        storm = r["run"] == "storm"
        out.append("| " + " | ".join([
            r["run"], str(r["repeat"]),
            f"{r.get('storm_caught_up')}/{r.get('storm_clients')}" if storm else "-",
            f"{f(r.get('catchup_p50_s'))} / {f(r.get('catchup_p99_s'))} / {f(r.get('catchup_s'))}"
            if storm else "-",
            (f(r.get("storm_connect_s")) + f" ({r.get('listen_overflows')} SYN drops)") if storm else "-",
            f(r.get("gateway_cpu_s_storm"), ".2f") if storm else "-",
            f(r.get("storm_client_cpu_s"), ".2f") if storm else "-",
            f"{f(r['live_p50_ms'], '.2f')} / {f(r['live_p99_ms'], '.2f')} / "
            f"{f(r['live_p999_ms'], '.2f')} / {f(r['live_max_ms'], '.2f')}",
            f"{r['gateway_counters']['replays_total']:.0f}", str(r["ok"])]) + " |")
    for r in results:
        for p in r.get("problems") or []:
            out.append(f"- {r.get('run')} rep {r.get('repeat')}: **{p}**")
        for n in r.get("notes") or []:
            out.append(f"- {r.get('run')} rep {r.get('repeat')}: note: {n}")
    storms = [r for r in results if r.get("run") == "storm"]
    if storms:
        worst = max((r.get("catchup_s") or float("inf")) for r in storms)
        p99 = max(r.get("live_p99_ms") or float("inf") for r in storms)
        behind = sum(r.get("storm_clients", 0) - r.get("storm_caught_up", 0) for r in storms)
        caught = (f"worst {worst:.3f} s" if worst != float("inf")
                  else f"{behind} clients over {len(storms)} storm runs never caught up")
        out.append("")
        out.append(f"targets: all caught up < {sz.target_catchup_s:g} s: {caught} "
                   f"({'met' if worst < sz.target_catchup_s else 'NOT met'}); live p99 < "
                   f"{sz.target_live_p99_ms:g} ms during the storm: worst {p99:.2f} ms "
                   f"({'met' if p99 < sz.target_live_p99_ms else 'NOT met'})")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Replay storm benchmark (issue 9)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--repeat", type=int, default=1, help="storm+quiet pairs, order alternating")
    p.add_argument("--clients", type=int, default=None, help="storm clients (default 1000)")
    p.add_argument("--inflight", type=int, default=0,
                   help="storm connects in flight at once (default 0: all at once)")
    p.add_argument("--live-rate", type=int, default=None, help="live trades/s (default 1000)")
    p.add_argument("--out", default=None, help="JSON results (default: none)")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    sz = SMOKE if args.smoke else Sizes()
    if args.clients:
        sz.storm_clients = args.clients
    sz.inflight = args.inflight
    if args.live_rate:
        sz.live_rate = args.live_rate
    with BenchRun("gateway-storm-", keep_workdir=args.keep_workdir) as run:
        workdir, results = run.workdir, run.results
        tools = build_tools()
        redis = Redis(workdir)
        t = time.monotonic()
        epochs = publish_history(redis.url, sz)
        print(f"[history] {sz.history} trades x {sz.storm_symbols} symbols via FCALL publish_trade "
              f"in {time.monotonic() - t:.2f} s", file=sys.stderr)
        for rep in range(args.repeat):
            order = [True, False] if rep % 2 == 0 else [False, True]
            for storm in order:
                name = "storm" if storm else "quiet"
                try:
                    rec = one_run(tools, redis, workdir, sz, epochs, storm=storm, tag=f"{name}{rep}")
                except HarnessError as e:
                    rec = {"run": name, "ok": False, "error": str(e), "problems": [str(e)]}
                rec["repeat"] = rep
                results.append(rec)
                print(f"[{'ok' if rec['ok'] else 'FAIL'}] {name} rep {rep}", file=sys.stderr)
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
            "sizes": asdict(sz), "ncpu": os.cpu_count(),
            "pinning": {"gateway": GATEWAY_CPU, "redis+publisher+loadclients+harness": AUX_CPU}}
    return run.finish(meta, args.out, report(run.results, sz))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
