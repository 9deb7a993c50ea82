"""In-process cost of the hot path per delivery, without sockets.

RESP bytes for 2,000 trades over 100 symbols go into a SubscriptionReader;
1,000 clients with 5 symbols each receive them into no-op sinks. Prints the
best of 30 runs in ns per delivery. It runs against whatever ``gateway`` is
importable, including revisions from before the reader/fan-out split (their
``Dispatcher``), so a change can be compared with its parent on one core:

    git archive REV | tar -x -C /tmp/rev && (cd /tmp/rev && python setup.py -q build_ext --inplace)
    for i in 1 2 3; do
        PYTHONPATH=/tmp/rev taskset -c 0 .venv/bin/python bench/feedpath.py
        taskset -c 0 .venv/bin/python bench/feedpath.py
    done
"""
from __future__ import annotations

import time

from gateway import _fastpath as F

PREFIX = b"channel:trade:"
SYMBOLS = [f"S{i}" for i in range(100)]
TRADES = 2000


def pmessage(channel: bytes, payload: bytes) -> bytes:
    return (b"*4\r\n$8\r\npmessage\r\n$15\r\nchannel:trade:*\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
            % (len(channel), channel, len(payload), payload))


def trade(n: int) -> bytes:
    symbol = SYMBOLS[n % len(SYMBOLS)].encode()
    return (b'{"symbol":"%s","price":%d.25,"volume":100,"timestamp":1700000000000,'
            b'"conditions":["@"],"exchange":"NASDAQ","seq":%d}' % (symbol, n, n))


def discard(frames: bytes) -> None:
    pass


def main() -> None:
    table = F.SymbolTable()
    clients = []
    for i in range(1000):
        conn = F.ClientListener()
        conn.sink = discard
        for k in range(5):
            table.subscribe(conn, SYMBOLS[(i * 7 + k * 13) % len(SYMBOLS)])
        clients.append(conn)
    stream = b"".join(pmessage(PREFIX + SYMBOLS[n % len(SYMBOLS)].encode(), trade(n))
                      for n in range(TRADES))
    if hasattr(F, "FanOut"):
        fanout = F.FanOut(table)

        def feed(data: bytes) -> None:
            F.SubscriptionReader(fanout).feed(data)
        label = "SubscriptionReader + FanOut"
    else:  # revisions before the split
        dispatcher = F.Dispatcher(table)

        def feed(data: bytes) -> None:
            dispatcher.reset()
            dispatcher.feed(data)
        label = "Dispatcher"
    best = float("inf")
    for _ in range(30):
        t0 = time.perf_counter()
        feed(stream)
        best = min(best, time.perf_counter() - t0)
    deliveries = sum(len(table.lookup(PREFIX + SYMBOLS[n % len(SYMBOLS)].encode()))
                     for n in range(TRADES))
    print(f"{label}: best {best * 1e3:.2f} ms for {deliveries} deliveries, "
          f"{best / deliveries * 1e9:.1f} ns per delivery")


if __name__ == "__main__":
    main()
