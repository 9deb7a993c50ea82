"""The soak harness end to end, at a size that fits a test run (about 70 s).

Runs ``python -m gateway._testbase.soak --duration 60`` as a subprocess: its
own redis-server, the gateway as ``python -m gateway``, healthy clients, churn,
stalled clients and two Redis restarts. The script decides pass or fail (zero loss for
healthy clients, flat RSS, gateway alive); this test checks that it passed
and that it really exercised what it claims to, so a harness that silently
tested nothing cannot pass.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_redis_server

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, needs_redis_server]


def test_soak_one_minute_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway._testbase.soak", "--duration", "60", "--clients", "50",
         "--rate", "500", "--churn-rate", "20", "--churn-concurrency", "8", "--stalled", "2",
         "--redis-restarts", "2", "--per-client", "worst", "--seed", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=110)
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    verdicts = [line for line in proc.stdout.splitlines() if line.startswith("VERDICT:")]
    assert verdicts, tail
    verdict = verdicts[-1]
    assert verdict.startswith("VERDICT: PASS"), tail
    assert proc.returncode == 0, tail

    # Zero loss, over a real number of expected deliveries.
    m = re.search(r"(\d+) of (\d+) expected deliveries lost, (\d+) out of order, "
                  r"(\d+) healthy disconnects", verdict)
    assert m, verdict
    lost, expected, ooo, disconnects = map(int, m.groups())
    assert (lost, ooo, disconnects) == (0, 0, 0), verdict
    assert expected > 50 * 2 * 100, verdict  # 50 clients, thousands of trades each way
    assert "RSS flat" in verdict, verdict

    # Everything the soak claims to do happened.
    assert len(re.findall(r"re-subscribed [\d.]+ s after restart", out)) == 2, tail
    churn = re.search(r"churn cycles: (\d+)", out)
    assert churn and int(churn.group(1)) > 500, tail
    cut = re.search(r"stalled clients, silent: opened \d+, cut off by the gateway (\d+)", out)
    assert cut and int(cut.group(1)) >= 1, tail
    samples = re.findall(r"\d+s +[\d.]+", out.split("== RSS over time (MB) ==")[1].split("==")[0])
    assert len(samples) >= 25, tail  # an RSS sample every 2 s
