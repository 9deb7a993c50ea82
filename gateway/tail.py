"""``ws-gateway-tail``: follow trades and candles in a terminal.

    ws-gateway-tail ws://127.0.0.1:8080 AAPL MSFT AAPL@1m

One aligned line per trade (time, symbol, price, size, exchange, seq, lag)
and per candle; reconnects and gaps on lines of their own. ``--json`` prints
each message as the gateway sent it, one per line, and the connection's
story on stderr. Built on :class:`gateway.client.GatewayClient`, so it
reconnects, resumes and reports gaps the same way. Ctrl-C exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import TextIO

import uvloop

from .cli import OneLineParser
from .client import (
    Candle,
    Connected,
    ConnectionRefused,
    Disconnected,
    Event,
    Gap,
    GatewayClient,
    GatewayError,
    Overflow,
    ServerError,
    Trade,
)

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ws-gateway-tail", description=__doc__.split("\n\n")[0],
                epilog="Streams are SYMBOL or SYMBOL@interval (a candle stream, e.g. AAPL@1m).")
    p.add_argument("url", help="gateway URL, ws://host:port (several: comma-separated, tried in turn)")
    p.add_argument("streams", nargs="+", metavar="STREAM", help="symbols and candle streams")
    p.add_argument("--json", action="store_true", help="print each message as received (JSON lines)")
    p.add_argument("--token", default=os.environ.get("WS_TOKEN"),
                   help="JWT for gateways that require one [env WS_TOKEN]")
    p.add_argument("--snapshot", action="store_true",
                   help="start each symbol with its latest trade")
    p.add_argument("--utc", action="store_true", help="times in UTC (default: local time)")
    p.add_argument("--mute-timeout", type=float, default=10.0, metavar="S",
                   help="reconnect when nothing arrives for S seconds (default 10)")
    return p


def clock(ms: int | None, utc: bool) -> str:
    """HH:MM:SS.mmm of a millisecond timestamp."""
    if ms is None:
        return " " * 12
    t = time.gmtime(ms / 1000) if utc else time.localtime(ms / 1000)
    return time.strftime("%H:%M:%S", t) + f".{ms % 1000:03d}"


def number(value: object, width: int) -> str:
    if isinstance(value, float):
        # At least two decimals, so prices line up; more only when they carry digits.
        whole, _, frac = f"{value:.6f}".partition(".")
        text = f"{whole}.{frac.rstrip('0').ljust(2, '0')}"
    else:
        text = "-" if value is None else str(value)
    return text.rjust(width)


class Printer:
    """Turns events into lines; ``out`` gets data, ``status`` the rest."""

    def __init__(self, out: TextIO, status: TextIO, *, json: bool, utc: bool):
        self.out, self.status, self.json, self.utc = out, status, json, utc

    HEADER = (f"{'time':<12}  {'symbol':<10} {'price':>12} {'size':>9}  {'exchange':<8} {'seq':>10} "
              f"{'lag':>9}")

    def header(self) -> None:
        if not self.json:
            self.out.write(self.HEADER + "\n")

    def show(self, event: Event) -> None:
        if self.json and isinstance(event, Trade | Candle | Gap) and event.raw:
            self.out.write(event.raw.decode("utf-8", "replace") + "\n")
        elif isinstance(event, Trade):
            self.out.write(self.trade(event) + "\n")
        elif isinstance(event, Candle):
            self.out.write(self.candle(event) + "\n")
        else:
            self.status.write(self.notice(event) + "\n")
        self.out.flush()
        self.status.flush()

    def trade(self, t: Trade) -> str:
        seq = f"#{t.seq}" if t.seq is not None else "-"
        lag = t.lag_ms
        exchange = t.exchange if isinstance(t.exchange, str) else ""
        return (f"{clock(t.timestamp or t.gateway_time, self.utc)}  {t.symbol:<10} "
                f"{number(t.price, 12)} {number(t.volume, 9)}  {exchange[:8]:<8} {seq:>10} "
                f"{'' if lag is None else f'{lag:>6} ms'}").rstrip()

    def candle(self, c: Candle) -> str:
        return (f"{clock(c.start, self.utc)}  {c.stream:<10} "
                f"O {number(c.open, 10)} H {number(c.high, 10)} L {number(c.low, 10)} "
                f"C {number(c.close, 10)}  V {number(c.volume, 9)}  n {c.trades:>5}  {c.state}")

    def notice(self, event: Event) -> str:
        if isinstance(event, Connected):
            again = "reconnected" if event.reconnect else "connected"
            return (f"-- {again} to {event.url} (server {event.server_id}, connection "
                    f"{event.connection_id[:8]}); streams {' '.join(event.subscriptions) or '-'}")
        if isinstance(event, Disconnected):
            why = event.reason if not event.code or event.reason.startswith(event.url) else (
                f"{event.code} {event.reason}".strip())
            what = "disconnected from" if event.established else "cannot connect to"
            return f"-- {what} {event.url} ({why}); retrying in {event.retry_in:.2f} s"
        if isinstance(event, Gap):
            return "!! " + describe_gap(event)
        if isinstance(event, Overflow):
            return f"!! falling behind: {event.queued} messages queued; reading paused"
        return f"-- {event!r}"


def describe_gap(g: Gap) -> str:
    where = f"epoch {g.epoch}, " if g.epoch else ""
    if "@" in g.symbol and g.first is not None and g.last is not None:
        return (f"gap in {g.symbol}: finals from {clock(g.first, True)} to {clock(g.last, True)} UTC "
                f"missed ({g.reason})")
    if g.first is not None and g.last:
        span = f"seq {g.first}" if g.first == g.last else f"seqs {g.first}-{g.last}"
        return f"gap in {g.symbol}: {span} lost ({where}{g.reason})"
    if g.first:
        return f"gap in {g.symbol}: from seq {g.first}, end not known ({where}{g.reason})"
    if g.skipped is not None:
        return f"gap in {g.symbol}: {g.skipped} skipped ({g.reason})"
    return f"gap in {g.symbol}: {g.reason}"


async def follow(args: argparse.Namespace, out: TextIO, status: TextIO) -> int:
    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("ws://", "wss://")):
            print(f"ws-gateway-tail: error: not a ws:// or wss:// URL: {u!r}", file=sys.stderr)
            return EXIT_USAGE
    printer = Printer(out, status, json=args.json, utc=args.utc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client = GatewayClient(urls, args.streams, token=args.token, snapshot=args.snapshot,
                           mute_timeout=args.mute_timeout)
    printer.header()
    await client.start(wait=False)
    reader = asyncio.ensure_future(_print_all(client, printer))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        await client.close()
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        exc = reader.exception()
        print(f"ws-gateway-tail: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ServerError | ConnectionRefused) else 1
    reader.cancel()
    return 0


async def _print_all(client: GatewayClient, printer: Printer) -> None:
    async for event in client:
        printer.show(event)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Human-readable: one stream, in order. JSON: stdout stays pure JSON lines.
        return uvloop.run(follow(args, sys.stdout, sys.stderr if args.json else sys.stdout))
    except KeyboardInterrupt:                 # Ctrl-C before the handlers were in place
        return 0
    except BrokenPipeError:
        # `| head` closed the pipe: stop quietly (and let the exit-time flush not complain).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except GatewayError as exc:
        print(f"ws-gateway-tail: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
