"""The benchmark harness runs end to end at smoke size and sees no loss.

Runs `bench/fanout.py --smoke` as a subprocess (its own redis-server, the C
load client and publisher built with gcc) against the baseline gateway and,
when the package is importable, the compiled gateway.  The numbers are not
checked here, only that the run completes and every delivery arrived in order.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FANOUT = ROOT / "bench" / "fanout.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                       reason="gcc not found: the bench load client is C"),
    pytest.mark.skipif(shutil.which("redis-server") is None
                       and not Path("/usr/bin/redis-server").exists(),
                       reason="redis-server not found"),
]

VARIANTS = [
    pytest.param("baseline", id="baseline"),
    pytest.param("compiled", id="compiled",
                 marks=pytest.mark.skipif(importlib.util.find_spec("gateway") is None,
                                          reason="gateway package not importable")),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fanout_smoke(variant, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(FANOUT), "--smoke", "--variants", variant, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists(), report
    doc = json.loads(out.read_text())
    assert doc["harness_error"] is None, report
    results = [r for r in doc["results"] if r["variant"] == variant]
    assert results, report
    for r in results:
        if "skipped" in r:
            continue
        if "deliveries" in r:        # a delivery case: nothing lost, order kept
            assert r["missing"] == 0, (r["scenario"], report)
            assert r["order_violations"] == 0, (r["scenario"], report)
            assert r["deliveries"] == r["expected_deliveries"], (r["scenario"], report)
        assert r["ok"], (r["scenario"], r.get("problems"), report)
    assert proc.returncode == 0, report


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """An unmasked server frame, with the 7-, 16- or 64-bit length form."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


def test_loadclient_parses_split_and_batched_frames(tmp_path):
    """The C load client counts every message and keeps per-symbol order when
    frames arrive split at any byte, many to a read, fragmented, with pings in
    between: a fake server sends one byte stream in uneven chunks."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fanout
    finally:
        sys.path.pop(0)
    exe = fanout.build_tools()["loadclient"]

    n_trades = 300
    frames: list[bytes] = []
    for seq in range(1, n_trades + 1):
        sym = "AAAA" if seq % 2 else "BBBB"
        pad = b"x" * (70_000 if seq == 150 else (300 if seq % 7 == 0 else 10))
        body = (b'{"type":"trade","data":{"symbol":"%s","seq":%d,"ts":%d,"pad":"%s"},'
                b'"timestamp":1}' % (sym.encode(), (seq + 1) // 2, time.time_ns(), pad))
        if seq % 50 == 0:      # fragmented message with a ping between the parts
            frames += [_frame(1, body[:20], fin=False), _frame(9, b"hi"),
                       _frame(0, body[20:40], fin=False), _frame(0, body[40:])]
        else:
            frames.append(_frame(1, body))
    # (bytes, pause after): every third frame goes out one byte at a time, so
    # every header form is split at every offset; the rest go out in batches.
    chunks: list[tuple[bytes, bool]] = []
    batch = b""
    for i, f in enumerate(frames):
        if i % 3 == 0:
            if batch:
                chunks.append((batch, True))
                batch = b""
            head = 2 + {126: 2, 127: 8}.get(f[1] & 0x7F, 0)
            chunks += [(f[k:k + 1], True) for k in range(head)]
            chunks += [(f[head:head + 5], True), (f[head + 5:], False)]
        else:
            batch += f
    if batch:
        chunks.append((batch, False))

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got_pong = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            conn.sendall(_frame(1, b'{"type":"success","message":"Connected to WebSocket Gateway"}'))
            conn.recv(4096)    # the masked subscribe frame
            conn.sendall(_frame(1, b'{"type":"success","message":"Successfully subscribed"}'))
            for c, pause in chunks:
                conn.sendall(c)
                if pause:
                    time.sleep(0.0003)   # let the client read the partial frame
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while conn.recv(4096):   # pongs (masked, opcode 0xA)
                    got_pong.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    connfile = tmp_path / "conns.txt"
    connfile.write_text(f"{n_trades} AAAA BBBB\n")
    proc = subprocess.run([str(exe), "-p", str(port), "-f", str(connfile), "-d", "20",
                           "-s", "1", "-g", "100"], capture_output=True, text=True, timeout=60)
    srv.close()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["stop_reason"] == "expected", report
    assert report["frames_total"] == n_trades, report
    assert report["missing"] == 0 and report["extra"] == 0, report
    assert report["sampled_frames"] == n_trades, report
    assert report["seq_gaps"] == 0 and report["seq_dups"] == 0, report
    assert report["wrong_symbol"] == 0 and report["parse_errors"] == 0, report
    assert report["pings"] == n_trades // 50, report
    assert report["latency_us"]["count"] == n_trades, report
    assert report["reads"] > n_trades, report   # the stream really came in pieces
