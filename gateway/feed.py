"""Synthetic trade publisher for demos and benchmarks.

``ws-gateway-feed --symbols AAPL,MSFT --rate 50`` publishes about 50 trades a
second, spread over the symbols, to ``<prefix><SYMBOL>`` as JSON objects with
the protocol's trade fields (symbol, price, volume, timestamp, conditions,
exchange). Prices follow a random walk; ``--seed`` makes a run repeatable.

By default each trade goes through the ``publish_trade`` Redis function
(gateway/sequencing.py, loaded once at start with ``--history-size``): it is
numbered per symbol, kept in the symbol's bounded history, and published as
``{"_seq":..,"_epoch":"..",...}``. ``--plain`` PUBLISHes the bare JSON instead.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import orjson

DEFAULT_SYMBOLS = "AAPL,GOOGL,MSFT,AMZN,TSLA,NVDA,META,NFLX,AMD,INTC"
EXCHANGES = ("NASDAQ", "NYSE", "ARCA", "BATS", "IEX")
CONDITIONS = ("@", "T", "F", "I", "4", "Z")


class TradeGenerator:
    """Realistic-looking trades: a random walk per symbol, round-lot volumes."""

    def __init__(self, symbols: list[str], seed: int | None = None):
        self.rng = random.Random(seed)
        self.prices = {s: round(self.rng.uniform(20, 900), 2) for s in symbols}
        self.symbols = symbols

    def trade(self, symbol: str) -> dict:
        rng = self.rng
        price = max(0.01, self.prices[symbol] * (1 + rng.gauss(0, 0.0008)))
        self.prices[symbol] = price
        return {
            "symbol": symbol,
            "price": round(price, 2),
            "volume": rng.choice((1, 5, 10, 25, 50, 100, 100, 100, 200, 300, 500, 1000)),
            "timestamp": time.time_ns() // 1_000_000,
            "conditions": rng.sample(CONDITIONS, rng.randint(0, 2)),
            "exchange": rng.choice(EXCHANGES),
        }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ws-gateway-feed", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    p.add_argument("--symbols", default=DEFAULT_SYMBOLS, help="comma-separated symbols")
    p.add_argument("--rate", type=float, default=20.0, help="trades per second, all symbols together")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 runs until interrupted")
    p.add_argument("--count", type=int, default=0, help="stop after this many trades; 0 means no limit")
    p.add_argument("--prefix", default="channel:trade:", help="channel prefix")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--plain", action="store_true",
                   help="plain PUBLISH: no sequence numbers, no history, no function library")
    p.add_argument("--history-size", type=int, default=None,
                   help="trades kept per symbol, at least (default: WS_HISTORY_SIZE or 10000)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import redis

    from .sequencing import env_history_size, library_code, load_library, publish_trade

    args = parse_args(argv)
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    if not symbols or args.rate <= 0:
        print("ws-gateway-feed: error: need at least one symbol and a positive rate", file=sys.stderr)
        return 2
    history_size = 0
    if not args.plain:
        try:
            history_size = args.history_size if args.history_size is not None else env_history_size()
            library_code(args.prefix, history_size)  # the settings' checks, before any connection
        except ValueError as exc:
            print(f"ws-gateway-feed: error: {exc}", file=sys.stderr)
            return 2
    from .config import ConfigError
    from .sentinel import redis_client
    try:
        client = redis_client(args.redis_url)
    except ConfigError as exc:
        print(f"ws-gateway-feed: error: {exc}", file=sys.stderr)
        return 2
    # Behind Sentinel a failover is a few seconds of connection errors: wait
    # them out (a batch sent again may publish some trades twice).
    patience = 30.0 if args.redis_url.lower().startswith("redis+sentinel://") else 0.0
    failing_since: float | None = None
    if not args.plain:
        try:
            load_library(client, args.prefix, history_size)
        except redis.RedisError as exc:
            print(f"ws-gateway-feed: error: {exc}", file=sys.stderr)
            return 1
    gen = TradeGenerator(symbols, args.seed)
    tick = 0.01 if args.rate >= 100 else 1.0 / args.rate
    per_tick = args.rate * tick
    start = time.monotonic()
    sent = 0.0
    published = 0
    how = "" if args.plain else f" (sequenced, history {history_size})"
    print(f"publishing ~{args.rate:g} trades/s for {len(symbols)} symbol(s) to "
          f"{args.prefix}<SYMBOL>{how}", file=sys.stderr)
    try:
        while True:
            now = time.monotonic()
            if args.duration and now - start >= args.duration:
                break
            sent += per_tick
            pipe = client.pipeline(transaction=False)
            n = int(sent) - published
            if args.count:
                n = min(n, args.count - published)  # --count is exact, whatever the batch
            for _ in range(n):
                sym = gen.rng.choice(symbols)
                if args.plain:
                    pipe.publish(args.prefix + sym, orjson.dumps(gen.trade(sym)))
                else:
                    publish_trade(pipe, sym, gen.trade(sym))
            if n:
                try:
                    pipe.execute()
                except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > patience:
                        raise
                    time.sleep(0.2)
                    continue
                failing_since = None
                published += n
            if args.count and published >= args.count:
                break
            time.sleep(max(0.0, start + (published + 1) / args.rate - time.monotonic()) if n == 0
                       else max(0.0, tick - (time.monotonic() - now)))
    except KeyboardInterrupt:
        pass
    except redis.RedisError as exc:
        print(f"ws-gateway-feed: error: {exc}", file=sys.stderr)
        return 1
    print(f"published {published} trade(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
