"""The benchmark harness runs end to end at smoke size and sees no loss.

Runs `bench/fanout.py --smoke` as a subprocess (its own redis-server, the C
load client and publisher built with gcc) against the baseline gateway and,
when the package is importable, the compiled gateway, where the smoke run also
covers the market-deflate, market-mixed and market-auth comparisons; and the
rate scenario with the C floor gateway (bench/floor_gateway.c) beside it.  The
numbers are not checked here, only that the run completes and every delivery
arrived in order.
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

from gateway._testbase import ws as wire

ROOT = Path(__file__).resolve().parent.parent
FANOUT = ROOT / "bench" / "fanout.py"
STORM = ROOT / "bench" / "replay_storm.py"
CONNECT_STORM = ROOT / "bench" / "connect_storm.py"

pytestmark = [
    pytest.mark.slow,
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
    if variant == "compiled":
        _check_market_modes(results, report)


@pytest.mark.parametrize("variants", [
    pytest.param("floor", id="floor"),
    pytest.param("compiled,coalesced,deflate,floor", id="compiled,coalesced,deflate,floor",
                 marks=pytest.mark.skipif(importlib.util.find_spec("gateway") is None,
                                          reason="gateway package not importable")),
])
def test_rate_smoke(variants, tmp_path):
    """The rate scenario (fixed offered rates x publisher pipelines, sends
    counted) and the C floor gateway (also in the saturation and protocol
    scenarios): the run completes, nothing is lost, order is kept, and every
    rate case has its sends per delivery and its ratio to the floor; the
    deflate variant's clients got every trade compressed, in fewer bytes."""
    out = tmp_path / "rate.json"
    proc = subprocess.run(
        [sys.executable, str(FANOUT), "--smoke", "--variants", variants,
         "--scenarios", "protocol,market,rate", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists(), report
    doc = json.loads(out.read_text())
    assert doc["harness_error"] is None, report
    results = doc["results"]
    assert {r["variant"] for r in results} == set(variants.split(",")), report
    for r in results:
        if r["variant"] == "deflate" and r["scenario"] != "rate":
            assert "skipped" in r, report      # a rate-only variant
            continue
        assert "skipped" not in r, (r["scenario"], r["variant"], report)
        assert r["ok"], (r["scenario"], r["variant"], r.get("problems"), report)
        if "deliveries" in r:
            assert r["missing"] == 0 and r["order_violations"] == 0, (r["scenario"], report)
            assert r["deliveries"] == r["expected_deliveries"] > 0, (r["scenario"], report)
            assert r["loadclient"]["sampled_frames"] > 0, (r["scenario"], report)
    rate = [r for r in results if r["scenario"] == "rate"]
    cells = {(r["offered_label"], r["pipeline"]) for r in rate}
    assert cells == {(5000, 1), (5000, 10)}, report
    for r in rate:
        assert r["publisher"]["pipeline"] == r["pipeline"], report
        counted = r["gateway_counted"]
        assert counted is not None and counted["frames"] == r["deliveries"], (r["variant"], report)
        # at most one send per delivery, and fewer once a read carries many trades
        assert 0 < r["gateway_sends_per_delivery"] <= 1.05, (r["variant"], report)
        if r["variant"] == "floor":
            assert r["trades_per_redis_read"] >= 1, report
    for r in rate:
        if r["pipeline"] == 10:
            one = next(x for x in rate if x["variant"] == r["variant"] and x["pipeline"] == 1)
            assert r["gateway_sends_per_delivery"] < one["gateway_sends_per_delivery"], report
    for r in rate:
        if r["variant"] == "deflate":
            plain = next(x for x in rate if x["variant"] == "compiled" and x["pipeline"] == r["pipeline"])
            assert r["compressed_frames"] == r["deliveries"], report
            assert r["wire_bytes_per_delivery"] < plain["wire_bytes_per_delivery"], report
    assert "| vs floor |" in proc.stdout and "1.00x" in proc.stdout, report
    if "deflate" in variants:
        assert "| vs compiled |" in proc.stdout, report
    assert proc.returncode == 0, report


def test_variant_names():
    """KIND and KIND@REV parse; a revision resolves to this repository's commit
    and names the variant by its short hash (no tree is built here)."""
    fanout = _fanout()
    assert fanout.parse_variant("compiled") == ("compiled", None)
    assert fanout.parse_variant("purepy@HEAD~1") == ("purepy", "HEAD~1")
    assert fanout.variant_kind("compiled@1c8e02a") == "compiled"
    assert fanout.parse_variant("floor") == ("floor", None)
    for bad in ("baseline@main", "floor@main", "compiled@", "nope", "compiled@-x"):
        with pytest.raises(ValueError):
            fanout.parse_variant(bad)
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    full, short = fanout.resolve_rev("HEAD")
    assert len(full) == 40 and full.startswith(short)
    args = fanout.parse_args(["--variants", "compiled,compiled@HEAD", "--scenarios", "market"])
    assert args.variants == ["compiled", f"compiled@{short}"]
    assert fanout.REV_SOURCES[f"compiled@{short}"].commit == full
    with pytest.raises(SystemExit):      # the same commit twice
        fanout.parse_args(["--variants", "compiled@HEAD,compiled@" + full])


def _fanout():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import fanout
    finally:
        sys.path.pop(0)
    return fanout


@pytest.mark.skipif(importlib.util.find_spec("gateway") is None,
                    reason="gateway package not importable")
def test_replay_storm_smoke(tmp_path):
    """bench/replay_storm.py at smoke size: every resuming client got exactly
    its missed seqs in order, live clients lost nothing."""
    out = tmp_path / "storm.json"
    proc = subprocess.run([sys.executable, str(STORM), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists(), report
    doc = json.loads(out.read_text())
    assert doc["harness_error"] is None, report
    runs = {r["run"]: r for r in doc["results"]}
    assert set(runs) == {"storm", "quiet"}, report
    storm = runs["storm"]
    assert storm["ok"], (storm.get("problems"), report)
    assert storm["storm_frames"] == storm["storm_expected"] > 0, report
    assert storm["storm_loadclient"]["sampled_frames"] == storm["storm_expected"], report
    assert storm["gateway_counters"]["replays_total"] == storm["storm_clients"], report
    assert runs["quiet"]["ok"], report
    assert proc.returncode == 0, report


def test_connect_storm_smoke(tmp_path):
    """bench/connect_storm.py at smoke size: with asyncio's old backlog and
    with the gateway's default, every client connected and subscribed."""
    out = tmp_path / "connect.json"
    proc = subprocess.run([sys.executable, str(CONNECT_STORM), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["harness_error"] is None, report
    assert [r["backlog"] for r in doc["results"]] == [100, doc["meta"]["somaxconn"]], report
    for r in doc["results"]:
        assert r["ok"] and r["clients"] == 500 and r["connected_s"] > 0, report
    assert proc.returncode == 0, report


def _check_market_modes(results: list[dict], report: str) -> None:
    """The compression and auth cases ran next to a plain market case, lost
    nothing, kept order, and really exercised their feature."""
    by = {r["scenario"]: r for r in results if "deliveries" in r}
    for scen in ("market", "market-deflate", "market-mixed", "market-auth"):
        assert scen in by, (scen, report)
        r = by[scen]
        assert r["missing"] == 0 and r["order_violations"] == 0, (scen, report)
        assert r["deliveries"] == r["expected_deliveries"], (scen, report)
        assert r["loadclient"]["sampled_frames"] > 0, (scen, report)
    # every client compressed: every delivery an RSV1 frame, inflated where sampled
    d = by["market-deflate"]
    assert d["deflate_conns"] == d["clients"], report
    assert d["compressed_frames"] == d["deliveries"], report
    assert d["loadclient"]["inflated_frames"] == d["loadclient"]["sampled_frames"], report
    # half compressed: both kinds among the deliveries and among the sampled
    m = by["market-mixed"]
    assert 0 < m["deflate_conns"] < m["clients"], report
    assert 0 < m["compressed_frames"] < m["deliveries"], report
    assert 0 < m["loadclient"]["inflated_frames"] < m["loadclient"]["sampled_frames"], report
    # auth: every client got in with its token; no frame compressed
    a = by["market-auth"]
    assert a["connected"] == a["clients"] and a["compressed_frames"] == 0, report
    for r in by.values():
        lc = r["loadclient"]
        assert lc["rsv_errors"] == 0 and lc["inflate_errors"] == 0, (r["scenario"], report)
    # sequenced: the gateway took every trade of market-seq / latency-seq as
    # sequenced (and none of plain market), with no duplicate and no gap fill
    for scen, want_seq in (("market", False), ("market-seq", True), ("latency-seq", True)):
        r = by.get(scen)
        assert r is not None, (scen, report)
        counters = r["gateway_seq_counters"]
        assert counters is not None, (scen, report)
        assert counters["gateway_sequenced_messages_total"] == (r["published"] if want_seq else 0), \
            (scen, counters, report)
        assert not counters["gateway_duplicate_messages_total"], (scen, report)
        assert not counters["gateway_gap_fills_total"], (scen, report)


def _frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """An unmasked server frame, with the 7-, 16- or 64-bit length form."""
    return wire.frame(opcode, payload, fin=fin, mask=False, rsv=wire.RSV1 if rsv1 else 0)


def _deflate(body: bytes) -> bytes:
    return wire.deflate_message(body, level=6)


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
def test_loadclient_parses_split_and_batched_frames(tmp_path, deflate):
    """The C load client counts every message and keeps per-symbol order when
    frames arrive split at any byte, many to a read, fragmented, with pings in
    between: a fake server sends one byte stream in uneven chunks.  With
    deflate, the client offers permessage-deflate and a token path, the server
    agrees and compresses most messages (a fragmented one: RSV1 on its first
    frame only), and the sampled connection inflates them before parsing."""
    exe = _fanout().build_tools()["loadclient"]

    n_trades = 300
    n_compressed = 0
    frames: list[bytes] = []
    for seq in range(1, n_trades + 1):
        sym = "AAAA" if seq % 2 else "BBBB"
        pad = b"x" * (70_000 if seq == 150 else (300 if seq % 7 == 0 else 10))
        body = (b'{"type":"trade","data":{"symbol":"%s","seq":%d,"ts":%d,"pad":"%s"},'
                b'"timestamp":1}' % (sym.encode(), (seq + 1) // 2, time.time_ns(), pad))
        # with deflate, every 9th message goes plain: allowed per message (RFC 7692 6)
        compress = deflate and seq % 9 != 0
        if compress:
            body = _deflate(body)
            n_compressed += 1
        if seq % 50 == 0:      # fragmented message with a ping between the parts
            frames += [_frame(1, body[:20], fin=False, rsv1=compress), _frame(9, b"hi"),
                       _frame(0, body[20:40], fin=False), _frame(0, body[40:])]
        else:
            frames.append(_frame(1, body, rsv1=compress))
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
    request = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            request["head"] = buf
            ext = (b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                   b"client_no_context_takeover\r\n" if deflate else b"")
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n" + ext + b"\r\n")
            welcome = b'{"type":"success","message":"Connected to WebSocket Gateway"}'
            # a compressed welcome: inflated before ACTIVE too
            conn.sendall(_frame(1, _deflate(welcome), rsv1=True) if deflate else _frame(1, welcome))
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
    extra = ["-z", "1", "-P", "/?token=abc.def"] if deflate else []
    proc = subprocess.run([str(exe), "-p", str(port), "-f", str(connfile), "-d", "20",
                           "-s", "1", "-g", "100", *extra], capture_output=True, text=True, timeout=60)
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
    head = request["head"].decode()
    assert report["rsv_errors"] == 0 and report["inflate_errors"] == 0, report
    assert report["compressed_frames"] == n_compressed, report
    if deflate:
        assert head.startswith("GET /?token=abc.def HTTP/1.1\r\n"), head
        assert "Sec-WebSocket-Extensions: permessage-deflate" in head, head
        assert report["deflate_conns"] == 1 and report["deflate_conn_frames"] == n_trades, report
        assert report["inflated_frames"] == n_compressed + 1, report   # + the welcome
    else:
        assert head.startswith("GET / HTTP/1.1\r\n"), head
        assert "Sec-WebSocket-Extensions" not in head, head
        assert report["deflate_conns"] == 0 and report["inflated_frames"] == 0, report
