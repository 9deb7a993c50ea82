"""Replays from the trade history: client resumes, snapshots, and the
gateway's own gap fill.

A client that subscribes with ``since`` or ``snapshot`` is put on hold (its
listener keeps every live frame instead of sending it), its subscribe reply
goes out, the history is read, and then it gets: a gap notice if part of what
it asked for is gone, the history it missed, and the frames held meanwhile
minus those the history already covered. A floor on the listener then skips
live trades the history already delivered until the live stream passes them,
so the seam has no duplicate and no hole whatever the order in which the
history reply and the live messages arrive.

The gateway fills its own gaps the same way, one level up: when the fan-out
sees a sequenced trade skip ahead on a channel (or the Redis subscription
comes back after a drop), it holds that channel, reads what it missed from
the history, routes it, then routes what it held; positions drop duplicates.

History reads for one symbol that are asked for in the same loop turn share
one read, so a thousand clients resuming the same symbols cost a handful of
Redis calls, not thousands.

Candle streams ("AAPL@1m") join the live stream the same way. Every newly
subscribed candle stream gets its backfill: the last ``backfill`` final
candles, oldest first, then the open candle(s) as updates, oldest first
(gateway.candle_store.read_backfill). The backfill comes with ``n``, the
stream's message count when it was read; live candle messages carry their
own n, so the held ones with n <= that are dropped at the release and a
floor (channel, b"", n) skips later ones the backfill already covered. Reads
of one stream asked for in the same loop turn are shared, and each candle is
framed (and compressed) once per read. When the backfill cannot be read
(Redis down or refusing, the library not loaded), the client gets
``{"type":"gap","data":{"symbol":"AAPL@1m","reason":"unavailable"},...}`` in
its place and goes on with the live stream.

Several resumes of one client may run at once (a client that subscribes
twice in quick succession): its live frames stay held until the last of them
is done, and the replies go out in the order the subscribes came.
"""
from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol
from .candle_store import Backfill
from .control import Resume
from .sequencing import HistoryRead, read_all_history

log = logging.getLogger("gateway.replay")

ReadHistory = Callable[[str, int, int], Awaitable[HistoryRead]]
# (symbol, interval, count of finals) -> the stream's backfill
ReadBackfill = Callable[[str, str, int], Awaitable[Backfill]]


class SharedRead:
    """One history read and the frames built from it, shared by every client
    it serves: each trade is framed (and compressed) once per read, not once
    per client, and a client's part is one slice."""

    __slots__ = ("h", "seqs", "_plain", "_deflated", "ts")

    def __init__(self, h: HistoryRead):
        self.h = h
        self.seqs = [seq for seq, _ in h.entries]
        self._plain: list[bytes] | None = None
        self._deflated: list[bytes] | None = None
        self.ts = protocol.now_ms()

    def frames(self, replayer: Replayer, deflate: bool) -> list[bytes]:
        if self._plain is None:
            epoch = (self.h.epoch or "").encode()
            encode = replayer.impl.encode_sequenced_frame
            self._plain = [encode(data, seq, epoch, self.ts) for seq, data in self.h.entries]
        if not deflate:
            return self._plain
        if self._deflated is None:
            self._deflated = [replayer.deflate(f) for f in self._plain]
        return self._deflated


class SharedBackfill:
    """One backfill read of a candle stream, shared by every client it serves:
    each candle is framed (and compressed) once per read."""

    __slots__ = ("b", "_plain", "_deflated")

    def __init__(self, b: Backfill):
        self.b = b
        self._plain: list[bytes] | None = None
        self._deflated: list[bytes] | None = None

    def frames(self, replayer: Replayer, deflate: bool) -> list[bytes]:
        if self._plain is None:
            encode = replayer.impl.encode_text_frame
            self._plain = [encode(body) for body in (*self.b.finals, *self.b.open)]
        if not deflate:
            return self._plain
        if self._deflated is None:
            self._deflated = [replayer.deflate(f) for f in self._plain]
        return self._deflated


class _Resumption:
    """What one client's resumes running at once have gathered: the frames
    of each, in the order they were asked for, and the floors they set."""

    __slots__ = ("running", "parts", "floors", "trades")

    def __init__(self) -> None:
        self.running = 0
        self.parts: list[list[bytes]] = []
        self.floors: dict[bytes, int] = {}
        self.trades = 0             # resumes among them that replay trades


class Replayer:
    def __init__(self, impl, fanout, table, read_history: ReadHistory,
                 deflate: Callable[[bytes], bytes], page: int = 1000, max_reads: int = 8,
                 read_backfill: ReadBackfill | None = None, backfill: int = 100):
        self.impl = impl
        self.fanout = fanout
        self.table = table
        self.read_history = read_history
        self.read_backfill = read_backfill
        self.backfill = backfill        # final candles before the open one(s)
        self.page = page                # trades per history read
        self.deflate = deflate
        self._pending: dict[tuple[str, bool], list[tuple[int, asyncio.Future[SharedRead]]]] = {}
        self._pending_backfills: dict[str, list[asyncio.Future[SharedBackfill]]] = {}
        self._reads = asyncio.Semaphore(max_reads)   # history and backfill reads in flight at once
        self._tasks: set[asyncio.Task] = set()
        self._resuming: dict[Any, _Resumption] = {}  # listener -> its resumes in progress
        self.replays = 0            # client resumes and snapshots served
        self.replayed_frames = 0
        self.fills = 0              # gaps in the gateway's own stream filled
        self.history_errors = 0
        self.backfills = 0          # candle streams served a backfill
        self.backfill_frames = 0    # candles sent from backfills
        self.backfill_errors = 0    # backfill reads that failed

    # --- shared reads ---------------------------------------------------------
    def _read(self, symbol: str, after: int) -> asyncio.Future[SharedRead]:
        """A read of ``symbol``'s trades after ``after`` (-1: the latest
        one), shared with the other reads of it asked for in this loop turn:
        one read from the lowest position asked, filtered by each caller."""
        key = (symbol, after < 0)
        fut: asyncio.Future[SharedRead] = asyncio.get_running_loop().create_future()
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = waiters = []
            self._spawn(self._issue(key))
        waiters.append((after, fut))
        return fut

    async def _issue(self, key: tuple[str, bool]) -> None:
        # Requests that arrive while this one waits for a free read join it:
        # under a storm, a few reads serve many clients.
        async with self._reads:
            waiters = self._pending.pop(key)
            after = -1 if key[1] else min(a for a, _ in waiters)
            try:
                result = SharedRead(await self.read_all(key[0], after))
            except Exception as exc:  # Redis down or refusing: every waiter learns it
                self.history_errors += 1
                for _, fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                return
        for _, fut in waiters:
            if not fut.done():
                fut.set_result(result)

    async def read_all(self, symbol: str, after: int) -> HistoryRead:
        """Every retained trade after ``after`` (-1: the latest one), in pages."""
        return await read_all_history(self.read_history, symbol, after, self.page)


    def _backfill(self, stream: str) -> asyncio.Future[SharedBackfill]:
        """A backfill read of candle stream ``stream``, shared with the other
        reads of it asked for in this loop turn (or while it waits for a slot)."""
        fut: asyncio.Future[SharedBackfill] = asyncio.get_running_loop().create_future()
        waiters = self._pending_backfills.get(stream)
        if waiters is None:
            self._pending_backfills[stream] = waiters = []
            self._spawn(self._issue_backfill(stream))
        waiters.append(fut)
        return fut

    async def _issue_backfill(self, stream: str) -> None:
        async with self._reads:
            # Every waiter subscribed before this pop, so before the read:
            # whatever the read does not cover reaches each of them live.
            waiters = self._pending_backfills.pop(stream)
            symbol, interval = protocol.split_stream(stream)
            try:
                if self.read_backfill is None or interval is None:
                    raise RuntimeError("candle backfill is not configured")
                result = SharedBackfill(await self.read_backfill(symbol, interval, self.backfill))
            except Exception as exc:
                self.backfill_errors += 1
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                return
        for fut in waiters:
            if not fut.done():
                fut.set_result(result)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- client resumes ---------------------------------------------------------
    def resume(self, listener, items: Resume) -> None:
        """Put ``items`` in front of ``listener``'s live stream. Call right
        after the subscribe that added them, before the loop runs again."""
        listener.holding = True
        state = self._resuming.get(listener)
        if state is None:
            state = self._resuming[listener] = _Resumption()
        state.running += 1
        parts: list[list[bytes]] = [[] for _ in items]
        state.parts.extend(parts)
        if any(not protocol.is_candle_stream(symbol) for symbol, _ in items):
            state.trades += 1
        self._spawn(self._resume(listener, items, parts, state))

    async def _resume(self, listener, items: Resume, parts: list[list[bytes]],
                      state: _Resumption) -> None:
        try:
            # Every symbol's history is read at once; frames go out in the
            # request's symbol order.
            await asyncio.gather(*(self._plan(listener, symbol, since, part, state.floors)
                                   for (symbol, since), part in zip(items, parts, strict=True)))
        except Exception:
            log.exception("replay failed; the client goes on live")
        finally:
            state.running -= 1
            if state.running == 0:
                # The last of this client's resumes: everything goes out now.
                del self._resuming[listener]
                self.replays += state.trades
                self._release(listener, [frame for part in state.parts for frame in part],
                              state.floors)

    async def _plan(self, listener, symbol: str, since: protocol.Position | None,
                    out: list[bytes], floors: dict[bytes, int]) -> None:
        if protocol.is_candle_stream(symbol):
            await self._plan_backfill(listener, symbol, out, floors)
            return
        ts = protocol.now_ms()
        channel = self.table.channel_for(symbol)
        try:
            shared = await self._read(symbol, since.seq if since is not None else -1)
        except Exception as exc:
            log.warning("history of %s unavailable (%s): resume answered with a gap", symbol, exc)
            if since is not None:
                out.append(self._text(listener, protocol.history_gap(
                    symbol, since.epoch, since.seq + 1, 0, protocol.GAP_UNAVAILABLE, ts)))
            return
        h = shared.h
        if since is None:                                   # snapshot: the latest trade
            epoch = h.epoch
            if epoch is not None and h.entries:
                out.append(shared.frames(self, listener.deflate)[-1])
                floors[channel] = h.entries[-1][0]
                self._floor(listener, channel, epoch, h.entries[-1][0])
            return
        if h.epoch is None:
            # Redis holds no history for it: whatever came after since is unknowable.
            out.append(self._text(listener, protocol.history_gap(
                symbol, None, 0, 0, protocol.GAP_EPOCH_CHANGED, ts)))
            return
        after = since.seq
        if h.epoch != since.epoch:
            # A new history: the client's position means nothing in it; it
            # gets everything retained, after a notice of what is not.
            if since.seq > 0:
                shared = await self._read(symbol, 0)
                h = shared.h
            out.append(self._text(listener, protocol.history_gap(
                symbol, h.epoch, 1, h.first - 1 if h.first else h.last,
                protocol.GAP_EPOCH_CHANGED, ts)))
            after = 0
        elif h.first and after + 1 < h.first:
            out.append(self._text(listener, protocol.history_gap(
                symbol, h.epoch, after + 1, h.first - 1, protocol.GAP_TRIMMED, ts)))
        elif not h.first and after < h.last:
            # Nothing retained at all, yet seqs were assigned after since.
            out.append(self._text(listener, protocol.history_gap(
                symbol, h.epoch, after + 1, h.last, protocol.GAP_TRIMMED, ts)))
        epoch = h.epoch
        if epoch is None:          # gone between two reads: nothing to replay
            return
        start = bisect_right(shared.seqs, after)
        frames = shared.frames(self, listener.deflate)[start:]
        out.extend(frames)
        self.replayed_frames += len(frames)
        last = shared.seqs[-1] if frames else after
        floors[channel] = last
        self._floor(listener, channel, epoch, last)

    async def _plan_backfill(self, listener, stream: str, out: list[bytes],
                             floors: dict[bytes, int]) -> None:
        channel = self.table.channel_for(stream)
        try:
            shared = await self._backfill(stream)
        except Exception as exc:
            log.warning("candles of %s unavailable (%s): live stream only", stream, exc)
            out.append(self._text(listener, protocol.backfill_unavailable(stream, protocol.now_ms())))
            return
        frames = shared.frames(self, listener.deflate)
        out.extend(frames)
        self.backfills += 1
        self.backfill_frames += len(frames)
        n = shared.b.n
        floors[channel] = n
        if n > 0:
            # Live candle messages carry no epoch: the floor's is empty.
            listener.set_floor(channel, b"", n)

    def _floor(self, listener, channel: bytes, epoch: str, seq: int) -> None:
        if seq > 0:
            listener.set_floor(channel, epoch.encode(), seq)

    def _text(self, listener, body: bytes) -> bytes:
        frame = self.impl.encode_text_frame(body)
        return self.deflate(frame) if listener.deflate else frame

    def _release(self, listener, out: list[bytes], floors: dict[bytes, int]) -> None:
        # The history first, then what arrived live meanwhile and is newer.
        for channel, seq, frame in listener.take_held():
            if seq and seq <= floors.get(channel, 0):
                continue
            out.append(frame)
        listener.holding = False
        t = listener.transport
        if out and (t is not None or listener.sink is not None):
            listener.send_frame(b"".join(out))

    # --- the gateway's own gaps ---------------------------------------------
    def on_gap(self, channel: bytes, epoch: str, last: int, seq: int) -> None:
        """FanOut.gap_callback: the channel is held; fill last+1..seq-1 of
        ``epoch``, or (``seq`` 0) a trade of another epoch came: announce the
        new epoch and deliver it from its start."""
        if seq:
            log.info("gap in %s: after %d came %d; filling from the history", channel, last, seq)
        else:
            log.warning("%s: a trade of a new epoch after seq %d of %s (the history started anew); "
                        "announcing it", channel, last, epoch)
        self._spawn(self._fill(channel, epoch, last, max(0, seq - 1)))

    def refill(self) -> None:
        """After the Redis subscription comes back: fill every subscribed
        sequenced channel from where the gateway stopped."""
        for channel in [self.table.channel_for(symbol) for symbol in self.table.symbols()]:
            pos = self.fanout.position(channel)
            if pos is None or self.fanout.holding(channel):
                continue
            self.fanout.hold(channel)
            self._spawn(self._fill(channel, pos[0], pos[1]))

    async def _fill(self, channel: bytes, epoch: str, last: int, missing_to: int = 0) -> None:
        """Fill ``channel`` after ``last``; ``missing_to`` is the last seq known
        to be missing (0: not known, as after a reconnect)."""
        symbol = self.table.symbol_for(channel)
        pattern = self.table.prefix + b"*"
        replies: list[Any] = []
        try:
            h = await self.read_all(symbol, last)
        except Exception as exc:
            self.history_errors += 1
            log.warning("cannot fill the gap in %s after seq %d (%s)", symbol, last, exc)
            self._notify(channel, protocol.history_gap(symbol, epoch, last + 1, missing_to,
                                                       protocol.GAP_UNAVAILABLE, protocol.now_ms()))
        else:
            if h.epoch is not None and h.epoch != epoch:
                # The history started anew (Redis lost it): what the old
                # epoch had after `last` is gone for good; the new epoch's
                # trades so far follow a notice of the ones no longer held.
                if last > 0:
                    h = await self.read_all(symbol, 0)
                if h.epoch is not None:
                    self._notify(channel, protocol.history_gap(
                        symbol, h.epoch, 1, h.first - 1 if h.first else h.last,
                        protocol.GAP_EPOCH_CHANGED, protocol.now_ms()))
            elif h.first and h.first > last + 1:
                self._notify(channel, protocol.history_gap(
                    symbol, epoch, last + 1, h.first - 1, protocol.GAP_TRIMMED, protocol.now_ms()))
            if h.epoch is not None:
                for seq, data in h.entries:
                    replies.append([b"pmessage", pattern, channel,
                                    protocol.published_form(data, seq, h.epoch.encode())])
                self.fills += 1
        finally:
            held = self.fanout.release(channel)
            replies.extend([b"pmessage", pattern, channel, p] for p in held)
            # Routed in order from a fresh position (what could not be filled
            # has been announced and must not be asked for again); positions
            # drop whatever the history and the held messages both carry.
            self.fanout.forget(channel)
            self.fanout.dispatch(replies)

    def _notify(self, channel: bytes, body: bytes) -> None:
        for conn in self.table.lookup(channel) or ():
            conn.send_text(body)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
