"""The live fuzzer end to end for about 15 s with a fixed seed.

Runs ``python -m gateway._testbase.fuzz`` as a subprocess: its own
redis-server and gateway, hundreds of broken and hostile connections, and
well-behaved watchers that must lose nothing. The script decides pass or fail (gateway
alive, RSS bounded, watchers complete, connections released, a fresh client
still served). Its protocol findings are printed, not asserted here.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_redis_server

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261126

pytestmark = [pytest.mark.slow, needs_redis_server]


def test_fuzz_live_fixed_seed_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway._testbase.fuzz", "--duration", "15", "--seed", str(SEED),
         "--concurrency", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=100)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("VERDICT:")]
    assert verdicts, tail
    assert verdicts[-1].startswith("VERDICT: PASS"), tail
    assert proc.returncode == 0, tail
    assert f"seed {SEED}" in out

    # It fuzzed for real: many connections, most cases, no script bugs.
    n = re.search(r"== Fuzz connections: (\d+) in", out)
    assert n and int(n.group(1)) >= 200, tail
    cases = re.findall(r"^  ([a-z_]+) +\d+  ", out, re.M)
    assert len(cases) >= 15, tail
    assert "HARNESS ERROR" not in out, tail
    # The watchers checked real traffic and lost none of it.
    received = [int(x) for x in re.findall(r"w\d+: expected \d+, received (\d+), lost 0,", out)]
    assert len(received) == 4 and min(received) > 1000, tail
