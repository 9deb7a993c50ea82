"""What Linux's /proc says about a process, a core, or loopback sockets.

Linux only. Readers for one pid return None when the process is gone (it may
exit between two reads), unless their docstring says they raise.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB (from /proc/PID/status), None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds; 10 ms granular."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime: fields 14 and 15 of stat, 12 and 13 after the ")".
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def schedstat(pid: int) -> tuple[int, int] | None:
    """(ns on CPU, ns runnable but waiting for a CPU), summed over the live
    threads, from /proc/PID/task/*/schedstat.

    The first is exact where cpu_seconds() is tick-sampled; the second
    measures interference (time the process wanted a core another had).
    The kernel brings the figures up to date when a thread sleeps: read them
    while the process is idle for exact deltas.
    """
    run = wait = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
            run += int(fields[0])
            wait += int(fields[1])
    except (OSError, ValueError, IndexError):
        return None
    return run, wait


def core_times() -> dict[int, list[int]]:
    """Per-core jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                out[int(name[3:])] = [int(v) for v in vals[:8]]
    return out


def core_usage(before: dict, after: dict, core: int) -> dict:
    """What ``core`` did between two core_times() samples, in seconds (busy
    counts softirq and steal too). Tick-sampled: on a mostly idle core short
    bursts are missed; use it as context, not as a measurement."""
    if core not in before or core not in after:
        return {}
    d = [(a - b) / CLK_TCK for a, b in zip(after[core], before[core], strict=True)]
    user, nice, system, idle, iowait, irq, softirq, steal = d
    return {"busy_s": user + nice + system + irq + softirq + steal, "idle_s": idle + iowait,
            "softirq_s": softirq, "irq_s": irq, "steal_s": steal}


def kernel_thread_pid(name: str) -> int | None:
    """pid of a kernel thread such as ``ksoftirqd/0``, None if there is none."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{d}/comm").read_text().strip() == name:
                    return int(d)
    return None


TCP_ESTABLISHED, TCP_CLOSE_WAIT = "01", "08"  # states in /proc/net/tcp


def tcp_peer_ports(local_port: int, states=(TCP_ESTABLISHED,)) -> set[int]:
    """Remote ports of the IPv4 sockets whose local port is ``local_port`` and
    whose state is in ``states`` (hex codes as in /proc/net/tcp).

    For a server on ``local_port`` these are its ends of client connections:
    one leaves ESTABLISHED the moment the server closes it, even when the
    client cannot see the FIN yet (it waits behind unread data).
    """
    out = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split(None, 4)
            local, remote, state = parts[1], parts[2], parts[3]
            if state in states and int(local.rsplit(":", 1)[1], 16) == local_port:
                out.add(int(remote.rsplit(":", 1)[1], 16))
    return out


def listen_overflows() -> int | None:
    """TcpExtListenOverflows of this network namespace (/proc/net/netstat):
    SYNs dropped because a listen queue was full. Their clients retry after
    1 s, 3 s, 7 s. None where it cannot be read."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            d = dict(zip(head.split()[1:], vals.split()[1:], strict=False))
            return int(d["ListenOverflows"]) if "ListenOverflows" in d else None
    return None
