"""Baseline gateway: the same protocol written the way most Python users would.

This is the comparison point for the benchmark, not a strawman: the `websockets`
asyncio server, `websockets.broadcast()` to the subscribers of a symbol, redis-py's
asyncio PubSub with one PSUBSCRIBE, and the stdlib `json` module.  Nothing here is
made slow on purpose; it is what a careful first implementation looks like.

Config (env vars, overridable by flags): WS_HOST, WS_PORT, REDIS_URL,
WS_MAX_SYMBOLS, WS_CHANNEL_PREFIX, LOG_LEVEL, WS_STATS_INTERVAL.

Run:  python bench/baseline_gateway.py [--port 8080] [--redis-url redis://...]
Stop: SIGTERM or SIGINT (closes every client with 1001 "going away").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
import uuid

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

log = logging.getLogger("baseline_gateway")


def now_ms() -> int:
    return int(time.time() * 1000)


class Gateway:
    def __init__(self, max_symbols: int, channel_prefix: str) -> None:
        self.max_symbols = max_symbols
        self.channel_prefix = channel_prefix
        self.server_id = "ws-gateway-" + uuid.uuid4().hex[:6]
        # symbol -> set of connections subscribed to it (what broadcast() iterates)
        self.subscribers: dict[str, set[ServerConnection]] = {}
        # connection -> its own symbols, kept in subscription order for replies
        self.subscriptions: dict[ServerConnection, list[str]] = {}
        self.messages_received = 0
        self.messages_sent = 0

    # ---- client side -------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        self.subscriptions[ws] = []
        await ws.send(json.dumps({
            "type": "success",
            "message": "Connected to WebSocket Gateway",
            "data": {
                "connectionId": str(uuid.uuid4()),
                "serverId": self.server_id,
                "maxSymbolsPerConnection": self.max_symbols,
            },
            "timestamp": now_ms(),
        }))
        try:
            async for raw in ws:
                await ws.send(json.dumps(self.handle_message(ws, raw)))
        except ConnectionClosed:
            pass
        finally:
            for sym in self.subscriptions.pop(ws, ()):
                self._remove(sym, ws)

    def handle_message(self, ws: ServerConnection, raw: str | bytes) -> dict:
        try:
            msg = json.loads(raw)
        except ValueError:
            return self.error("Invalid JSON message")
        if not isinstance(msg, dict):
            return self.error("Invalid message format")
        action = msg.get("action")
        if action == "ping":
            return {"type": "pong", "timestamp": now_ms()}
        if action not in ("subscribe", "unsubscribe"):
            return self.error(f"Unknown action: {action}")
        symbols = msg.get("symbols")
        if (not isinstance(symbols, list) or not symbols
                or not all(isinstance(s, str) and s.strip() for s in symbols)):
            return self.error("Invalid symbols: must be a non-empty array of strings")
        # Normalise to upper case and drop duplicates, keeping request order.
        wanted = list(dict.fromkeys(s.strip().upper() for s in symbols))
        current = self.subscriptions[ws]
        if action == "subscribe":
            new = [s for s in wanted if s not in current]
            if len(current) + len(new) > self.max_symbols:
                return self.error(
                    "Cannot subscribe: would exceed maximum of "
                    f"{self.max_symbols} symbols per connection")
            for sym in new:
                current.append(sym)
                self.subscribers.setdefault(sym, set()).add(ws)
            return {
                "type": "success",
                "message": f"Successfully subscribed to {len(wanted)} symbol(s)",
                "data": {"subscribed": wanted, "currentSubscriptions": list(current)},
                "timestamp": now_ms(),
            }
        gone = [s for s in wanted if s in current]
        for sym in gone:
            current.remove(sym)
            self._remove(sym, ws)
        return {
            "type": "success",
            "message": f"Successfully unsubscribed from {len(gone)} symbol(s)",
            "data": {"unsubscribed": gone, "currentSubscriptions": list(current)},
            "timestamp": now_ms(),
        }

    def _remove(self, sym: str, ws: ServerConnection) -> None:
        subs = self.subscribers.get(sym)
        if subs is not None:
            subs.discard(ws)
            if not subs:
                del self.subscribers[sym]

    @staticmethod
    def error(message: str) -> dict:
        return {"type": "error", "message": message, "timestamp": now_ms()}

    # ---- Redis side --------------------------------------------------------

    async def redis_loop(self, redis_url: str) -> None:
        client = aioredis.from_url(redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(self.channel_prefix + "*")
        log.info("psubscribed to %s*", self.channel_prefix)
        prefix_len = len(self.channel_prefix)
        try:
            async for message in pubsub.listen():
                if message["type"] != "pmessage":
                    continue
                self.messages_received += 1
                symbol = message["channel"][prefix_len:].decode()
                subs = self.subscribers.get(symbol)
                if not subs:
                    continue
                try:
                    data = json.loads(message["data"])
                except ValueError:
                    data = None
                if not isinstance(data, dict):   # trades are JSON objects
                    log.warning("dropping a payload that is not a JSON object on %s", symbol)
                    continue
                broadcast(subs, json.dumps(
                    {"type": "trade", "data": data, "timestamp": now_ms()}))
                self.messages_sent += len(subs)
        finally:
            await pubsub.aclose()
            await client.aclose()

    async def stats_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            log.info("stats server=%s connections=%d symbols=%d received=%d sent=%d",
                     self.server_id, len(self.subscriptions), len(self.subscribers),
                     self.messages_received, self.messages_sent)


async def main(args: argparse.Namespace) -> None:
    gw = Gateway(args.max_symbols, args.channel_prefix)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None))
    # Heartbeat every 30 s as the spec says; websockets closes dead peers itself.
    async with serve(gw.handler, args.host, args.port, ping_interval=30,
                     ping_timeout=30, max_size=100 * 1024) as server:
        log.info("listening on %s:%d", args.host, args.port)
        tasks = [asyncio.create_task(gw.redis_loop(args.redis_url)),
                 asyncio.create_task(gw.stats_loop(args.stats_interval))]
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        server.close(close_connections=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:  # surface a Redis failure as a non-zero exit
            if t is not stop and t.exception() is not None:
                raise t.exception()


def parse_args() -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=env("WS_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env("WS_PORT", "8080")))
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--max-symbols", type=int, default=int(env("WS_MAX_SYMBOLS", "5")))
    p.add_argument("--channel-prefix", default=env("WS_CHANNEL_PREFIX", "channel:trade:"))
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    p.add_argument("--stats-interval", type=float,
                   default=float(env("WS_STATS_INTERVAL", "60")))
    return p.parse_args()


if __name__ == "__main__":
    a = parse_args()
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main(a))
