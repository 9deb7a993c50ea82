"""One-shot raw-DEFLATE compressors on trade messages, for permessage-deflate.

The gateway compresses each trade once for every client that negotiated
permessage-deflate with ``server_no_context_takeover``, so each message is
compressed on its own. This compares, on the same trade messages as the
gateway sends them (envelope included, ~230-300 bytes):

- zlib-stream: the gateway's old way, one ``zlib.compressobj(level,
  DEFLATED, -15)`` for all messages and a ``Z_FULL_FLUSH`` after each;
- zlib: stdlib one-shot ``zlib.compress(body, level, wbits=-15)``;
- libdeflate: ``deflate.deflate_compress(body, level)`` (PyPI ``deflate``);
- isal: ``isal.isal_zlib.compress(body, level, wbits=-15)`` (ISA-L);
- zlib-ng: ``zlib_ng.zlib_ng.compress(body, level, wbits=-15)``.

Per candidate and level it reports the time per message (a Python call
included: the gateway calls it from Python or Cython the same way; the
median of ``--rounds`` passes over all messages, each pass timed as one) and
the mean WebSocket frame size on the wire (header + payload as RFC 7692
sends it) against the plain frame. Every output is checked to inflate back
to its message with the receiver's procedure (append 00 00 ff ff, raw
inflate) before it is timed. Packages that are not installed are skipped.

A second table takes the gateway's own compressor
(gateway.compression.deflate_payload) over the same messages cut to fixed
lengths: the wire bytes it saves against its time, by message size (how
WS_COMPRESSION_MIN_SIZE's default was chosen).

    .venv/bin/python bench/compressors.py                  # markdown table
    .venv/bin/python bench/compressors.py --json out.json --messages 2000 --rounds 15
"""
from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import protocol

EXCHANGES = ["NASDAQ", "NYSE", "ARCA", "BATS", "IEX", "EDGX"]
CONDITIONS = ['["@","T"]', '["@","F","I"]', '["@"]', '["@","12","T"]']
SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK.B", "JPM", "V"]


def trade_bodies(n: int, seed: int = 1) -> list[bytes]:
    """Trade messages as clients receive them: bench/publisher.c's payload
    (half of them sequenced, with seq and epoch) in the gateway's envelope."""
    rng = random.Random(seed)
    out = []
    ts = 1795673796074123456
    for k in range(n):
        sym = SYMBOLS[k % len(SYMBOLS)]
        ts += rng.randrange(1000, 2_000_000)
        price = f"{rng.randrange(10, 1000)}.{rng.randrange(100):02d}"
        payload = (f'{{"symbol":"{sym}","price":{price},"volume":{rng.randrange(1, 5000)},'
                   f'"timestamp":{ts // 1_000_000},"conditions":{rng.choice(CONDITIONS)},'
                   f'"exchange":"{rng.choice(EXCHANGES)}","tradeId":"{(k * 0x9E3779B97F4A7C15) & (2**64 - 1):016x}",'
                   f'"seq":{k + 1},"ts":{ts}}}').encode()
        ms = str(ts // 1_000_000 + rng.randrange(3)).encode()
        if k % 2:
            out.append(b"".join((protocol.TRADE_HEAD, payload, protocol.SEQ_MID, str(k + 1).encode(),
                                 protocol.EPOCH_MID, b"1795673796074-0", protocol.EPOCH_END, ms,
                                 protocol.TRADE_TAIL)))
        else:
            out.append(protocol.TRADE_HEAD + payload + protocol.TRADE_MID + ms + protocol.TRADE_TAIL)
    return out


def frame_size(n: int) -> int:
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


def wire_payload(z: bytes) -> bytes:
    """What goes on the wire for a complete raw-DEFLATE stream (final block):
    RFC 7692 7.2.1 appends an empty stored block (one byte of header bits,
    then 00 00 ff ff) and drops the 00 00 ff ff, i.e. one 00 byte."""
    return bytes(z) + b"\x00"


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def candidates() -> list[tuple[str, int, str, Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """(name, level, version, compress, to wire payload)."""
    out: list = []
    for level in (1, 6):
        c = zlib.compressobj(level, zlib.DEFLATED, -15)

        def stream(b: bytes, c=c) -> bytes:
            return c.compress(b) + c.flush(zlib.Z_FULL_FLUSH)
        out.append(("zlib-stream (full flush)", level, zlib.ZLIB_RUNTIME_VERSION, stream,
                    lambda z: z[:-4]))
    for level in (1, 6, 9):
        out.append(("zlib", level, zlib.ZLIB_RUNTIME_VERSION,
                    lambda b, level=level: zlib.compress(b, level, wbits=-15), wire_payload))
    libs = [("libdeflate", "deflate", (1, 4, 6, 9, 12),
             lambda m, level: (lambda b: m.deflate_compress(b, level))),
            ("isal", "isal.isal_zlib", (0, 1, 2, 3),
             lambda m, level: (lambda b: m.compress(b, level, wbits=-15))),
            ("zlib-ng", "zlib_ng.zlib_ng", (1, 2, 6, 9),
             lambda m, level: (lambda b: m.compress(b, level, wbits=-15)))]
    for name, module, levels, make in libs:
        try:
            m = importlib.import_module(module)
        except ImportError:
            print(f"{name}: {module} not installed, skipped", file=sys.stderr)
            continue
        top = importlib.import_module(module.split(".")[0])
        version = getattr(top, "__version__", "?")
        for level in levels:
            out.append((name, level, version, make(m, level), wire_payload))
    return out


def measure(fn: Callable[[bytes], bytes], bodies: list[bytes], rounds: int) -> float:
    """Median ns per message over ``rounds`` timed passes (after one warm-up)."""
    for b in bodies:
        fn(b)
    per = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        for b in bodies:
            fn(b)
        per.append((clock() - t0) / len(bodies))
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    bodies = trade_bodies(args.messages)
    plain = statistics.mean(frame_size(len(b)) for b in bodies)
    rows = []
    for name, level, version, fn, to_wire in candidates():
        # Correct first: every message, through the receiver's procedure.
        sizes = []
        for b in bodies:
            p = to_wire(fn(b))
            if inflate(p) != b:
                sys.exit(f"{name} level {level}: a message did not inflate back")
            sizes.append(frame_size(len(p)))
        ns = measure(fn, bodies, args.rounds)
        rows.append({"compressor": name, "version": version, "level": level, "ns_per_message": ns,
                     "wire_bytes": statistics.mean(sizes), "plain_wire_bytes": plain})
    lo, hi = min(map(len, bodies)), max(map(len, bodies))
    print(f"{len(bodies)} trade messages, {lo}-{hi} bytes (mean plain frame {plain:.1f} B), "
          f"median of {args.rounds} passes\n")
    print("| compressor | level | ns/message | wire bytes/message | vs plain frame |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['compressor']} {r['version']} | {r['level']} | {r['ns_per_message']:.0f} | "
              f"{r['wire_bytes']:.1f} | {r['wire_bytes'] / plain:.2f} |")
    sizes = by_size(bodies, args.rounds)
    print("\n| message bytes | plain frame | gateway's compressed frame | saved bytes | ratio | ns/message |")
    print("|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['length']} | {r['plain_wire_bytes']:.1f} | {r['wire_bytes']:.1f} | "
              f"{r['plain_wire_bytes'] - r['wire_bytes']:.1f} | {r['wire_bytes'] / r['plain_wire_bytes']:.2f} | "
              f"{r['ns_per_message']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"compressors": rows, "by_size": sizes}, indent=1))


def by_size(bodies: list[bytes], rounds: int) -> list[dict]:
    from gateway.compression import deflate_payload
    out = []
    for length in (16, 32, 64, 96, 112, 128, 160, 192, 224, 256):
        cut = [b[:length] for b in bodies]
        for b in cut:
            if inflate(deflate_payload(b)) != b:
                sys.exit(f"gateway compressor: a {length}-byte message did not inflate back")
        out.append({"length": length,
                    "plain_wire_bytes": statistics.mean(frame_size(len(b)) for b in cut),
                    "wire_bytes": statistics.mean(frame_size(len(deflate_payload(b))) for b in cut),
                    "ns_per_message": measure(deflate_payload, cut, rounds)})
    return out


if __name__ == "__main__":
    main()
