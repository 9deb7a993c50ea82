"""``ws-gateway-candles``: computes candles once for the whole deployment.

One service leads, the others stand by. The leader holds a lease in Redis
(``candle_lease``: a TTL and a fencing token) and renews it every tenth of
WS_CANDLE_LEASE; every write it makes goes through ``publish_candles``,
which refuses a holder whose token is no longer the lease's (FENCED), so a
leader that stalled and lost the lease cannot publish over its successor.

The leader subscribes to the trades (``PSUBSCRIBE <prefix>*``), aggregates
them in a CandleBook (gateway.candles) and, every WS_CANDLE_UPDATE_MS, sends
what changed in one atomic ``publish_candles`` call: the messages, each
candle's state and the last sequenced trade applied per symbol (the
watermark). So what is stored always matches what was published.

A standby that gets the lease (the leader died: its lease ran out) takes
over: it subscribes first, holding live trades, then restores every stream
from the stored state, reads each symbol's trades after its watermark from
the trade history (gateway/trades.lua), applies the held trades (a sequenced
trade is applied once), and leads. Nothing a sequenced trade contributed is
lost or counted twice. Trades published without a seq have no history:
those the old leader applied after its last publish, and those published
while no one led, are missing from their candles.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import Any

import hiredis
import orjson

from . import candle_store, picows_adapter, protocol, sequencing
from .candles import Candle, CandleBook, Counters, Trade, interval_settings, parse_trade
from .config import CandleConfig, ConfigError
from .endpoints import http_answer
from .redis_reader import RedisSubscriber
from .sentinel import SentinelMaster
from .server import history_client, stop_signal

log = logging.getLogger("gateway.candles")

HISTORY_PAGE = 1000
LOG_EVERY = 10.0          # seconds between summaries of trades not applied


class TradeReader:
    """Parses the trade subscription's RESP stream and hands each trade to the service."""

    __slots__ = ("service", "on_reply", "reader")

    def __init__(self, service: CandleService, on_reply):
        self.service = service
        self.on_reply = on_reply
        self.reader = hiredis.Reader()

    def feed(self, data, nbytes: int = -1) -> None:
        reader = self.reader
        reader.feed(data, 0, len(data) if nbytes < 0 else nbytes)
        on_trade = self.service.on_trade
        while (reply := reader.gets()) is not False:
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                on_trade(reply[2], reply[3])
            else:
                self.on_reply(reply)


# Messages per publish_candles call. Each call holds Redis for its whole run
# (about 10 us a message), delaying trades published meanwhile; small chunks
# keep that near 0.2 ms. A chunk carries whole symbols with their
# watermarks, so what is stored for a symbol always matches its watermark
# whichever chunks landed.
CHUNK = 16


def chunks(items: list[Any], marks: dict[str, tuple[str, int]]):
    """(items, watermarks) per publish_candles call: whole symbols, about CHUNK items each."""
    by_symbol: dict[str, list[Any]] = {}
    for item in items:
        by_symbol.setdefault(item.symbol, []).append(item)
    for symbol in marks:
        by_symbol.setdefault(symbol, [])
    batch: list[Any] = []
    batch_marks: dict[str, tuple[str, int]] = {}
    for symbol, group in by_symbol.items():
        if batch and len(batch) + len(group) > CHUNK:
            yield batch, batch_marks
            batch, batch_marks = [], {}
        batch += group
        if symbol in marks:
            batch_marks[symbol] = marks[symbol]
    if batch or batch_marks:
        yield batch, batch_marks


class CandleService:
    def __init__(self, config: CandleConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self.settings = interval_settings(config.candle_intervals, config.grace, config.late_window)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # Behind Sentinel: the lease, the writes and the trade subscription all
        # follow the master the sentinels name.
        self.sentinel = SentinelMaster(config.redis) if config.redis.sentinels else None
        if self.sentinel is not None:
            self.sentinel.on_switch(self._on_master_switch)
        self.client = history_client(config.redis, self.sentinel)
        self.counters = Counters()
        self.book: CandleBook | None = None
        self.lease: str | None = None
        self.role = "standby"
        # Finals kept per stream for the gateways' backfill (a correction of
        # an older one is added and trimmed at once; the candles' states,
        # kept for the whole late window, are what corrections start from).
        self.keep = {name: max(1, config.candle_backfill) for name, _ in self.settings.intervals}
        self.lease_ms = round(config.lease * 1000)
        self.ttl_ms = max(100, round(self.lease_ms * 0.8))
        self.poll = config.lease / 10
        self.prefix = config.channel_prefix.encode()
        self.subscriber: RedisSubscriber | None = None
        self.held_all: list[tuple[str, Trade]] | None = None   # during a takeover
        self.held: dict[str, list[Trade]] = {}                 # symbols being filled
        self.last_lease_ok = 0.0
        self.takeovers = 0
        self.stepdowns = 0
        self.published = 0
        self.publish_errors = 0
        self.lost_trades = 0        # sequenced trades the history no longer held
        self.tick_seconds = 0.0
        self.ticks = 0
        self._tasks: set[asyncio.Task] = set()
        self._leader_tasks: list[asyncio.Task] = []
        self._stopping = False
        self._logged = (0, 0, 0)
        self._logged_at = 0.0
        self.server: Any = None
        self.port = 0

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- trades ---------------------------------------------------------------------
    def on_trade(self, channel: bytes, payload: bytes) -> None:
        book = self.book
        if book is None:
            return
        symbol = channel[len(self.prefix):].decode("utf-8", "replace")
        trade = parse_trade(payload)
        if trade is None:
            self.counters.invalid += 1
            return
        if self.held_all is not None:
            self.held_all.append((symbol, trade))
            return
        self._apply(book, symbol, trade)

    def _apply(self, book: CandleBook, symbol: str, trade: Trade) -> None:
        held = self.held.get(symbol)
        if held is not None:
            held.append(trade)
            return
        if trade.seq:
            mark = book.watermarks.get(symbol)
            if mark is not None and mark[0] == trade.epoch:
                missed = trade.seq > mark[1] + 1
            else:               # new to this leader, or a new epoch of the history
                missed = trade.seq > 1
            if missed:
                # Trades of this symbol went by unseen (the subscription
                # dropped, or it is new here): read them from the history
                # first, holding what arrives meanwhile.
                self.held[symbol] = [trade]
                self._spawn(self._fill(book, symbol))
                return
        book.add(symbol, trade, self.now_ms())

    async def _fill(self, book: CandleBook, symbol: str) -> None:
        """Apply ``symbol``'s trades after its watermark from the history, then what was held."""
        try:
            await self._read_history_into(book, symbol)
        except Exception as exc:
            log.warning("cannot read the trade history of %s (%s); going on with live trades",
                        symbol, exc)
        finally:
            held = self.held.pop(symbol, [])
            if self.book is book:
                for trade in held:
                    self._apply(book, symbol, trade)

    async def _read_history_into(self, book: CandleBook, symbol: str) -> None:
        mark = book.watermarks.get(symbol)
        after = mark[1] if mark is not None else 0
        h = await self._read_all(symbol, after)
        if h.epoch is None:
            return
        if mark is not None and h.epoch != mark[0]:
            log.warning("the trade history of %s started anew (epoch %s, was %s): applying what it "
                        "holds", symbol, h.epoch, mark[0])
            after = 0
            h = await self._read_all(symbol, 0)
            if h.epoch is None:
                return
        if h.first and h.first > after + 1 and (mark is not None or after > 0):
            self.lost_trades += h.first - after - 1
            log.warning("trades %d..%d of %s are no longer in the history: their candles miss them",
                        after + 1, h.first - 1, symbol)
        now = self.now_ms()
        epoch = h.epoch
        if epoch is None:
            return
        for seq, data in h.entries:
            trade = parse_trade(data)
            if trade is None:
                self.counters.invalid += 1
                continue
            trade.seq, trade.epoch = seq, epoch
            book.add(symbol, trade, now)

    async def _read_all(self, symbol: str, after: int) -> sequencing.HistoryRead:
        return await sequencing.read_all_history(
            lambda sym, a, n: sequencing.read_history(self.client, sym, a, n), symbol, after,
            HISTORY_PAGE)

    # --- leading --------------------------------------------------------------------
    async def _take_over(self) -> None:
        t0 = time.monotonic()
        self.role = "taking over"
        book = CandleBook(self.settings, self.counters)
        self.held_all = []
        self.held = {}
        self.book = book
        try:
            self.subscriber = RedisSubscriber(
                self.config.redis, self.config.channel_prefix + "*",
                lambda on_reply: TradeReader(self, on_reply), on_state=self._on_subscription,
                sentinel=self.sentinel)
            self.subscriber.start()
            while not self.subscriber.ready:
                await asyncio.sleep(0.01)
                if self.book is not book:
                    return
            restored = await self._restore(book)
            live = self.held_all
            self.held_all = None
            for symbol, trade in live:
                self._apply(book, symbol, trade)
        except Exception as exc:
            log.error("takeover failed (%s); standing by", exc)
            await self._step_down("takeover failed")
            return
        self.role = "leader"
        self.takeovers += 1
        log.info("leading as %s (lease %s): %d symbol(s) restored, %d live trade(s) held meanwhile, "
                 "in %.0f ms", self.holder, self.lease, restored, len(live),
                 (time.monotonic() - t0) * 1000)
        self._leader_tasks.append(asyncio.get_running_loop().create_task(self._tick_loop()))

    async def _restore(self, book: CandleBook) -> int:
        symbols = await candle_store.candle_symbols(self.client)
        for symbol in symbols:
            per: dict[str, tuple[tuple[int, float] | None, list[Candle]]] = {}
            mark = None
            for name, _ in self.settings.intervals:
                st = await candle_store.read_state(self.client, symbol, name)
                mark = st.watermark or mark
                last = None
                if st.last_final is not None:
                    last = (st.last_final[0], float(orjson.loads(st.last_final[1])["data"]["close"]))
                per[name] = (last, [Candle.from_state(s) for s in st.states])
            book.restore(symbol, mark, per)
        # Every symbol with a trade history: those with stored state catch
        # up from their watermark; the others start from what is retained,
        # unless their newest trade is too old to make any candle.
        known = set(symbols)
        horizon = self.now_ms() - self.settings.late_window_ms - 2 * max(
            length for _, length in self.settings.intervals)
        async for key in self.client.scan_iter(match="ws-gateway:{*}:meta", count=1000):
            text = key.decode() if isinstance(key, bytes) else key
            symbol = text[len("ws-gateway:{"):-len("}:meta")]
            if symbol in known:
                continue
            latest = await sequencing.read_history(self.client, symbol, -1, 1)
            if not latest.entries:
                continue
            trade = parse_trade(latest.entries[-1][1])
            if trade is not None and trade.ts >= horizon:
                symbols.append(symbol)
        await asyncio.gather(*(self._read_history_into(book, s) for s in symbols))
        return len(symbols)

    def _on_master_switch(self, address: tuple[str, int]) -> None:
        # Replication is asynchronous: the new master may lack the last
        # candles and states this leader wrote, so its book may be ahead of
        # what is stored. Leading on would never store those again; standing
        # down and taking over from what the new master holds (as any
        # standby would) republishes what is due from there.
        if self.role != "standby" and not self._stopping:
            self._spawn(self._step_down("the Redis master changed (failover); taking over again "
                                        "from what the new master holds"))

    def _on_subscription(self, ready: bool, reason: str) -> None:
        if ready and self.subscriber is not None and self.subscriber.connects > 1 and self.book:
            # Back after a drop: catch every symbol up from the history.
            for symbol in list(self.book.watermarks):
                if symbol not in self.held:
                    self.held[symbol] = []
                    self._spawn(self._fill(self.book, symbol))

    async def _tick_loop(self) -> None:
        period = self.config.update_ms / 1000
        next_at = time.monotonic()
        while self.role == "leader":
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self.role != "leader":
                return
            if not await self.flush():
                return
            self._log_unapplied()

    async def flush(self) -> bool:
        """One tick: publish and store what changed; False if leadership was lost."""
        book = self.book
        if book is None or self.lease is None:
            return False
        t0 = time.perf_counter()
        outs: list[Any] = book.tick(self.now_ms())
        outs += [candle_store.Forget(*f) for f in book.take_forgotten()]
        marks = {s: book.watermarks[s] for s in book.changed_watermarks}
        book.changed_watermarks.clear()
        self.tick_seconds += time.perf_counter() - t0
        self.ticks += 1
        if not outs and not marks:
            return True
        try:
            for items, chunk_marks in chunks(outs, marks):
                self.published += await candle_store.apublish_candles(
                    self.client, self.lease, items, self.config.candle_channel_prefix, self.keep,
                    chunk_marks)
        except Exception as exc:
            self.publish_errors += 1
            why = "lost the lease" if candle_store.is_fenced(exc) else f"publishing failed: {exc}"
            log.error("%s; standing by (the stored state is where the next leader starts)", why)
            await self._step_down(why)
            return False
        return True

    def _log_unapplied(self) -> None:
        c = self.counters
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY:
            return
        state = (c.too_late, c.invalid, c.future)
        if state != self._logged:
            late = self.book.late_log[-1] if self.book and self.book.late_log else None
            log.warning("trades not aggregated so far: %d past the late window%s, %d without numeric "
                        "price/volume/timestamp, %d stamped too far ahead", c.too_late,
                        f" (latest: {late[0]} at {late[1]}, {(late[2] - late[1]) / 1000:.0f} s late)"
                        if late else "", c.invalid, c.future)
            self._logged = state
            if self.book:
                self.book.late_log.clear()
        self._logged_at = now

    async def _step_down(self, why: str) -> None:
        was = self.role
        self.role = "standby"
        self.book = None
        self.held_all = None
        self.held = {}
        for task in self._leader_tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._leader_tasks = []
        if self.subscriber is not None:
            await self.subscriber.stop()
            self.subscriber = None
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                await candle_store.arelease_lease(self.client, lease)
            except Exception:
                pass
        if was != "standby":
            self.stepdowns += 1
            (log.info if self._stopping else log.warning)("standing by: %s", why)

    # --- the lease ------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        while not self._stopping:
            try:
                value = await asyncio.wait_for(candle_store.aacquire_lease(
                    self.client, self.holder, self.ttl_ms, self.lease), self.poll * 4)
            except Exception as exc:
                if "function not found" in str(exc).lower():
                    # A Redis restarted without persistence has lost the library.
                    await self._load_library()
                if self.lease is not None and time.monotonic() - self.last_lease_ok > self.ttl_ms / 1000:
                    await self._step_down(f"cannot renew the lease ({exc})")
                elif self.lease is None:
                    log.debug("lease poll failed: %s", exc)
            else:
                self.last_lease_ok = time.monotonic()
                if value is None:
                    if self.lease is not None:
                        await self._step_down("another candle service holds the lease")
                elif self.lease is None or value != self.lease:
                    if self.lease is not None:
                        await self._step_down("the lease was taken anew")
                    self.lease = value
                    self._spawn(self._take_over())
            await asyncio.sleep(self.poll)

    async def _load_library(self) -> None:
        try:
            await candle_store.aload_library(self.client)
            log.info("Redis Function library %s loaded again", candle_store.LIBRARY_NAME)
        except Exception as exc:
            log.warning("cannot load the %s library (%s)", candle_store.LIBRARY_NAME, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- health ---------------------------------------------------------------------
    def not_ready(self) -> str | None:
        if self._stopping:
            return "shutting down"
        if time.monotonic() - self.last_lease_ok > max(2.0, 4 * self.poll):
            return "cannot reach Redis"
        if self.role == "leader" and not (self.subscriber and self.subscriber.ready):
            return self.subscriber.reason if self.subscriber else "not subscribed"
        return None

    def _answer(self, request, peer_ip: str):
        path = request.path.split(b"?", 1)[0]
        if path == b"/healthz":
            return http_answer(200, {"status": "ok", "role": self.role, "holder": self.holder})
        if path == b"/readyz":
            reason = self.not_ready()
            return http_answer(200 if reason is None else 503,
                               {**protocol.ready_body(reason), "role": self.role})
        if path == b"/metrics":
            from picows import WSUpgradeResponse, WSUpgradeResponseWithListener

            from .metrics import CONTENT_TYPE
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(self.metrics_text(), {"Content-Type": CONTENT_TYPE}),
                None)
        return http_answer(404, {"type": "error", "message": "not found: try /healthz, /readyz, /metrics"})

    def metrics_text(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self

        class Collector:
            def collect(self):
                c = service.counters
                yield GaugeMetricFamily("candles_leader", "1 while this service leads",
                                        value=int(service.role == "leader"))
                for name, doc, value in (
                        ("candles_trades_applied", "Trades aggregated", c.trades),
                        ("candles_trades_invalid", "Trades without numeric price, volume and timestamp",
                         c.invalid),
                        ("candles_trades_too_late", "Trades past the late window, not applied", c.too_late),
                        ("candles_trades_future", "Trades stamped too far ahead, not applied", c.future),
                        ("candles_trades_duplicate", "Sequenced trades seen twice", c.duplicates),
                        ("candles_trades_lost", "Sequenced trades no longer in the history at catch-up",
                         service.lost_trades),
                        ("candles_updates", "Update messages", c.updates),
                        ("candles_finals", "Final messages", c.finals),
                        ("candles_corrections", "Correction messages", c.corrections),
                        ("candles_published", "Candle messages published", service.published),
                        ("candles_publish_errors", "Failed publishes", service.publish_errors),
                        ("candles_takeovers", "Times this service took the lead", service.takeovers),
                        ("candles_tick_seconds", "Time spent computing ticks", service.tick_seconds)):
                    yield CounterMetricFamily(name, doc, value=value)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector())
        return generate_latest(registry)

    # --- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self.server = await picows_adapter.create_server(
            self._answer, c.host, c.port, max_frame_size=1024, read_buffer_init_size=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        if self.sentinel is not None:
            self.sentinel.start()
        await candle_store.aload_library(self.client)
        self._spawn(self._lease_loop())
        log.info("candle service %s: intervals %s, grace %g s, late window %g s, lease %g s; "
                 "health on port %d; trades from %s* on %s, candles to %s<interval>:<SYMBOL>",
                 self.holder, ",".join(c.candle_intervals), c.grace, c.late_window, c.lease, self.port,
                 c.channel_prefix, c.redis.describe(), c.candle_channel_prefix)

    async def stop(self) -> None:
        """Publish what is pending and hand the lease over at once."""
        self._stopping = True
        if self.role == "leader":
            await self.flush()
        await self._step_down("shutting down")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.server.close()
        if self.sentinel is not None:
            await self.sentinel.stop()
        await self.client.aclose()
        log.info("stopped")


async def serve(config: CandleConfig) -> None:
    service = CandleService(config)
    stop = stop_signal()
    await service.start()
    received = await stop
    log.info("received %s", signal.Signals(received).name)
    await service.stop()


def main(argv: list[str] | None = None) -> int:
    from .cli import EXIT_CONFIG, build_parser, setup_logging
    from .config import CANDLE_SETTINGS
    parser = build_parser(CANDLE_SETTINGS, "ws-gateway-candles",
                          "Aggregate trades into candles (OHLCV) once for the whole deployment and "
                          "publish them for the gateways.")
    args = parser.parse_args(argv)
    try:
        config = CandleConfig.from_sources(os.environ, vars(args))
    except ConfigError as exc:
        print(f"ws-gateway-candles: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    import uvloop
    try:
        uvloop.run(serve(config))
    except OSError as exc:
        print(f"ws-gateway-candles: error: cannot listen on {config.host}:{config.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:   # Redis unreachable at start, say
        print(f"ws-gateway-candles: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
