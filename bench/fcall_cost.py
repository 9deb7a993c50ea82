"""Cost of a sequenced publish (FCALL publish_trade) against a plain PUBLISH.

Starts its own redis-server on a free port (no persistence), loads the
ws_gateway library, and sends the same trades both ways from a raw socket,
pipelined in batches (the next batch goes when the last one's replies are
in), alternating rounds of each kind. Per call it reports:

- wall: elapsed time / calls (client encoding excluded: commands are
  pre-encoded RESP), i.e. the inverse of Redis's pipelined throughput;
- cpu: Redis's own CPU time (INFO CPU used_cpu_sys + used_cpu_user, delta)
  / calls;
- usec_per_call from INFO COMMANDSTATS (the command's time inside Redis,
  FCALL including the commands it runs).

By default one pattern subscriber (PSUBSCRIBE channel:trade:*, as the
gateway's) drains the messages, so both kinds pay for a delivery.

    .venv/bin/python bench/fcall_cost.py                       # 20,000 of each, 5 rounds
    .venv/bin/python bench/fcall_cost.py --history-size 100    # steady-state trimming
    .venv/bin/python bench/fcall_cost.py --no-subscriber --calls 50000 --batch 500
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway._testbase.redis import RedisServer
from gateway._testbase.resp import encode_command
from gateway.sequencing import history_key, library_code

PREFIX = "channel:trade:"


def trade(n: int, symbol: str) -> bytes:
    return (b'{"symbol":"%s","price":%d.25,"volume":100,"timestamp":%d,'
            b'"conditions":["@","T"],"exchange":"NASDAQ"}' % (symbol.encode(), 100 + n % 50,
                                                             1700000000000 + n))


def info(port: int, section: str) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(encode_command("INFO", section))
        buf = b""
        while b"\r\n" not in buf:
            buf += s.recv(65536)
        head, rest = buf.split(b"\r\n", 1)
        n = int(head[1:])
        while len(rest) < n + 2:
            rest += s.recv(65536)
    out = {}
    for line in rest[:n].decode().splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


def redis_cpu(port: int) -> float:
    i = info(port, "cpu")
    return float(i["used_cpu_sys"]) + float(i["used_cpu_user"])


def usec_per_call(port: int, command: str) -> float:
    stats = info(port, "commandstats").get(f"cmdstat_{command}", "")
    fields = dict(kv.split("=", 1) for kv in stats.split(",") if "=" in kv)
    return float(fields.get("usec_per_call", "nan"))


class Drain(threading.Thread):
    """A PSUBSCRIBE connection that reads and discards everything."""

    def __init__(self, port: int, pattern: str):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(encode_command("PSUBSCRIBE", pattern))
        self.sock.recv(4096)
        self.bytes = 0

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.bytes += len(chunk)
        except OSError:
            pass


def run_batches(sock: socket.socket, batches: list[tuple[bytes, int]]) -> None:
    for payload, count in batches:
        sock.sendall(payload)
        got = 0
        tail = b""
        while got < count:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            data = tail + chunk
            if b"\n-" in b"\n" + data:
                raise RuntimeError(f"redis error: {data[:200]!r}")
            got += chunk.count(b"\n")
            tail = data[-1:]


def build(kind: str, calls: int, batch: int, symbols: list[str], start: int) -> list[tuple[bytes, int]]:
    out = []
    for b0 in range(0, calls, batch):
        parts = []
        for n in range(start + b0, start + min(calls, b0 + batch)):
            s = symbols[n % len(symbols)]
            if kind == "publish":
                parts.append(encode_command("PUBLISH", PREFIX + s, trade(n, s)))
            else:
                parts.append(encode_command("FCALL", "publish_trade", "1", s, trade(n, s)))
        out.append((b"".join(parts), len(parts)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20_000, help="calls of each kind per round")
    p.add_argument("--batch", type=int, default=1000, help="commands per pipelined batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--symbols", type=int, default=10)
    p.add_argument("--history-size", type=int, default=10_000)
    p.add_argument("--no-subscriber", action="store_true")
    p.add_argument("--redis-cpu", type=int, default=None, help="pin redis-server to this CPU")
    args = p.parse_args(argv)

    symbols = [f"SYM{i}" for i in range(args.symbols)]
    with RedisServer(cpu=args.redis_cpu) as server:
        port = server.port
        c = server.client()
        c.function_load(library_code(PREFIX, args.history_size), replace=True)
        drain = None
        if not args.no_subscriber:
            drain = Drain(port, PREFIX + "*")
            drain.start()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # warm-up: create the symbols' keys, fault in the code paths
        run_batches(sock, build("fcall", 2000, args.batch, symbols, 0))
        run_batches(sock, build("publish", 2000, args.batch, symbols, 0))
        results: dict[str, list[tuple[float, float, float]]] = {"publish": [], "fcall": []}
        serial = 10_000
        for _ in range(args.rounds):
            for kind in ("publish", "fcall"):
                batches = build(kind, args.calls, args.batch, symbols, serial)
                serial += args.calls
                c.config_resetstat()
                cpu0, t0 = redis_cpu(port), time.perf_counter()
                run_batches(sock, batches)
                t1, cpu1 = time.perf_counter(), redis_cpu(port)
                results[kind].append(((t1 - t0) / args.calls * 1e6, (cpu1 - cpu0) / args.calls * 1e6,
                                      usec_per_call(port, kind)))
        lengths = [c.xlen(history_key(s)) for s in symbols]
        mem = c.info("memory")["used_memory_human"]
        sock.close()
        c.close()

    print(f"redis-server {os.uname().machine}, {args.calls} calls x {args.rounds} rounds per kind, "
          f"batch {args.batch}, {args.symbols} symbols, history {args.history_size}, "
          f"subscriber {'no' if args.no_subscriber else 'PSUBSCRIBE ' + PREFIX + '*'}")
    print(f"{'':10}{'wall us/call':>14}{'redis cpu us/call':>20}{'usec_per_call':>16}   (median of rounds; min..max)")
    med = {}
    for kind, rows in results.items():
        cols = list(zip(*rows))
        med[kind] = [statistics.median(col) for col in cols]
        print(f"{kind:10}" + "".join(f"{m:>{w}.2f}" for m, w in zip(med[kind], (14, 20, 16)))
              + "   " + ", ".join(f"{min(col):.2f}..{max(col):.2f}" for col in cols))
    print(f"{'ratio':10}" + "".join(f"{f / p_:>{w}.2f}" for f, p_, w in zip(med["fcall"], med["publish"], (14, 20, 16))))
    print(f"{'extra':10}" + "".join(f"{f - p_:>{w}.2f}" for f, p_, w in zip(med["fcall"], med["publish"], (14, 20, 16))))
    print(f"history lengths {min(lengths)}..{max(lengths)}, redis used_memory {mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
