"""A Python client for the gateway that never loses a sequenced trade silently.

    async with GatewayClient("ws://127.0.0.1:8080", symbols=["AAPL", "AAPL@1m"]) as client:
        async for event in client:          # Trade, Candle, Gap, Connected, Disconnected, Overflow
            ...

What it does for the application:

- Reconnects by itself: exponential backoff with full jitter (``backoff_initial``
  doubling up to ``backoff_max``), ``Retry-After`` honoured on 429, the next URL
  of ``urls`` tried on each failure, at once after a 1001 (server going away).
- Resumes: every sequenced trade reaches the application exactly once and in
  order per symbol, or a :class:`Gap` says exactly which seqs are lost. On
  reconnect it subscribes again to everything, each symbol with ``since`` =
  the last (epoch, seq) it queued; duplicates are dropped, a seq jump the
  gateway did not announce becomes a ``Gap`` with reason ``"missing"``.
  Candle streams come back with their backfill; finals already delivered are
  dropped, ones whose values changed meanwhile come as ``correction``.
- Notices a connection that is open but mute (nothing received, not even a
  pong, for ``mute_timeout`` seconds) and reconnects.
- Bounds its queue: past ``max_queue`` undelivered events it stops reading
  the socket and queues one :class:`Overflow` (or, with
  ``on_overflow="raise"``, iteration raises :class:`QueueOverflow`). The
  gateway then treats the connection as a slow consumer; with its default
  policy it closes it and the client resumes from history, so sequenced
  trades are still delivered once the application catches up.
- ``subscribe``, ``unsubscribe`` and ``ping`` return the gateway's reply;
  an error reply raises :class:`ServerError` with the gateway's message.

It speaks WebSocket through the ``websockets`` library rather than picows:
it negotiates permessage-deflate (the gateway compresses each trade once for
all such clients; picows has no compression), it reports a refused upgrade
with its status, headers and body (401/403/429 and ``Retry-After``), and a
client's cost is in its application, not in its frame parser.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from . import config

log = logging.getLogger("gateway.client")

__all__ = [
    "Candle",
    "Connected",
    "ConnectionRefused",
    "Disconnected",
    "Event",
    "Forbidden",
    "Gap",
    "GatewayClient",
    "GatewayError",
    "GatewayUnavailable",
    "Overflow",
    "QueueOverflow",
    "RateLimited",
    "ServerError",
    "TokenExpired",
    "Trade",
    "Unauthorized",
]


# --- errors ---------------------------------------------------------------------
class GatewayError(Exception):
    """Base of every error this client raises."""


class ServerError(GatewayError):
    """The gateway answered a request with ``{"type":"error"}``; ``message`` is its text."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConnectionRefused(GatewayError):
    """The gateway (or a proxy) refused the WebSocket upgrade with an HTTP status."""

    def __init__(self, url: str, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.url, self.status, self.message, self.retry_after = url, status, message, retry_after


class Unauthorized(ConnectionRefused):
    """401: the token is missing, malformed, badly signed, expired or not yet valid."""


class Forbidden(ConnectionRefused):
    """403: the gateway does not accept this Origin. Never retried."""


class RateLimited(ConnectionRefused):
    """429: too many connections from this address or user, or connecting too fast."""


class TokenExpired(GatewayError):
    """The gateway closed the connection (1008) because the token expired, and
    no ``token_refresh`` was given (or it failed)."""


class GatewayUnavailable(GatewayError):
    """``max_attempts`` connection attempts in a row failed; ``__cause__`` is the last failure."""


class QueueOverflow(GatewayError):
    """With ``on_overflow="raise"``: the application fell ``max_queue`` events behind."""


# --- events ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Trade:
    """One trade. ``data`` is the object the publisher sent, as the gateway
    forwarded it; ``seq``/``epoch`` are set when it was published sequenced.
    ``gateway_time`` is the gateway's send time and ``received`` this client's
    receive time, both in milliseconds."""
    symbol: str
    data: dict[str, Any]
    seq: int | None
    epoch: str | None
    gateway_time: int
    received: int
    raw: bytes = field(default=b"", repr=False, compare=False)   # the message as received

    @property
    def price(self) -> Any:
        return self.data.get("price")

    @property
    def volume(self) -> Any:
        return self.data.get("volume")

    @property
    def timestamp(self) -> int | None:
        """The trade's own time (ms), when the publisher gave one."""
        ts = self.data.get("timestamp")
        return ts if isinstance(ts, int) else None

    @property
    def exchange(self) -> str | None:
        return self.data.get("exchange")

    @property
    def lag_ms(self) -> int | None:
        """Receive time minus the trade's own timestamp."""
        ts = self.timestamp
        return None if ts is None else self.received - ts


@dataclass(frozen=True, slots=True)
class Candle:
    """One candle message; ``state`` is "update", "final" or "correction"."""
    symbol: str
    interval: str
    start: int
    open: Any
    high: Any
    low: Any
    close: Any
    volume: Any
    trades: int
    state: str
    gateway_time: int
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def stream(self) -> str:
        return f"{self.symbol}@{self.interval}"

    def values(self) -> tuple:
        return (self.open, self.high, self.low, self.close, self.volume, self.trades)


@dataclass(frozen=True, slots=True)
class Gap:
    """Data that will never arrive. ``symbol`` is a symbol or a candle stream.

    For a trade stream ``first``..``last`` are the lost seqs of ``epoch``
    (``last`` 0: not known). For a candle stream they are the starts (ms) of
    the first and last interval whose final was missed. ``reason`` is the
    gateway's ("trimmed", "epoch_changed", "unavailable", "slow_consumer"), or
    this client's: "missing" (a seq jump nobody announced) or "candles_missed".
    ``skipped`` is the gateway's count for a conflated slow consumer."""
    symbol: str
    reason: str
    epoch: str | None = None
    first: int | None = None
    last: int | None = None
    skipped: int | None = None
    from_gateway: bool = True
    raw: bytes = field(default=b"", repr=False, compare=False)   # empty when the client made it


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection is up and subscribed again; resumed trades follow."""
    url: str
    connection_id: str
    server_id: str
    reconnect: bool
    subscriptions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended, or (``established`` False) an attempt failed; the
    client tries again in ``retry_in`` seconds. ``code``/``reason`` are the
    close frame's when there was one, the HTTP status of a refusal, or the
    error."""
    url: str
    code: int | None
    reason: str
    retry_in: float
    established: bool = True


@dataclass(frozen=True, slots=True)
class Overflow:
    """The application fell ``queued`` events behind; the client stopped
    reading until it catches up (see the module's docstring)."""
    queued: int


Event = Trade | Candle | Gap | Connected | Disconnected | Overflow


# --- helpers --------------------------------------------------------------------
def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, initial * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, initial * (2 ** min(attempt, 40))))


def interval_ms(interval: str) -> int | None:
    """"1m" -> 60000 (gateway.config's reading); None when it does not read as one."""
    try:
        return config.interval_ms(interval)
    except ValueError:
        return None


def normalise(stream: str) -> str:
    """As the gateway names a stream: symbol upper-cased, interval as given."""
    symbol, at, interval = stream.strip().partition("@")
    return symbol.upper() + at + interval


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _refusal(url: str, exc: InvalidStatus) -> ConnectionRefused:
    response = exc.response
    status = response.status_code
    message = response.reason_phrase
    with contextlib.suppress(Exception):
        message = orjson.loads(response.body or b"{}").get("message") or message
    cls = {401: Unauthorized, 403: Forbidden, 429: RateLimited}.get(status, ConnectionRefused)
    return cls(url, status, message, _retry_after(response.headers))


class _Lost(Exception):
    """A connection ended (internal): close code and reason, if any."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future
    on_reply: Callable[[dict], None] | None = None


@dataclass(slots=True)
class _CandleTrack:
    """What was delivered of one candle stream: finals by start (bounded)."""
    finals: dict[int, tuple] = field(default_factory=dict)
    last_final: int | None = None
    resumed: bool = False        # the next final is the first after a reconnect


# --- the client -----------------------------------------------------------------
class GatewayClient:
    """See the module docstring. All times are in seconds.

    ``urls``: one URL or several (tried in turn). ``symbols``: what to
    subscribe to first. ``token``: a JWT sent as ``Authorization: Bearer``;
    ``token_refresh``: called (sync or async) for a new one when the gateway
    says the token expired or refuses it with 401 on a reconnect.
    ``since``: resume points {symbol: (epoch, seq)} from an earlier run
    (see :attr:`positions`). ``snapshot``: ask for each symbol's latest trade
    when it has no resume point. ``max_attempts``: failed attempts in a row
    before :class:`GatewayUnavailable` (None: keep trying).
    """

    def __init__(self, urls: str | Sequence[str], symbols: Iterable[str] = (), *,
                 token: str | None = None,
                 token_refresh: Callable[[], str | Awaitable[str]] | None = None,
                 since: Mapping[str, tuple[str, int]] | None = None,
                 snapshot: bool = False,
                 backoff_initial: float = 0.1, backoff_max: float = 30.0,
                 stable_after: float = 5.0,
                 mute_timeout: float = 10.0,
                 open_timeout: float = 10.0, request_timeout: float = 10.0,
                 max_queue: int = 10_000,
                 on_overflow: Literal["pause", "raise"] = "pause",
                 max_attempts: int | None = None,
                 compression: bool = True,
                 connect_options: Mapping[str, Any] | None = None,
                 rng: random.Random | None = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("GatewayClient needs at least one URL")
        if on_overflow not in ("pause", "raise"):
            raise ValueError(f"on_overflow must be 'pause' or 'raise', got {on_overflow!r}")
        if max_queue < 1 or mute_timeout <= 0 or backoff_initial < 0 or backoff_max < backoff_initial:
            raise ValueError("max_queue, mute_timeout and backoff_* must be positive "
                             "(backoff_max >= backoff_initial)")
        self.token, self.token_refresh = token, token_refresh
        self.snapshot = snapshot
        self.backoff_initial, self.backoff_max, self.stable_after = (
            backoff_initial, backoff_max, stable_after)
        self.mute_timeout, self.open_timeout, self.request_timeout = (
            mute_timeout, open_timeout, request_timeout)
        self.max_queue, self.on_overflow, self.max_attempts = max_queue, on_overflow, max_attempts
        self.compression = compression
        self.connect_options = dict(connect_options or {})
        self.rng = rng or random.Random()

        self._wanted: list[str] = []                 # streams, in subscription order
        for s in symbols:
            self._want(normalise(s))
        # symbol -> (epoch, last seq queued); seq None: the next one is the baseline.
        self._points: dict[str, tuple[str | None, int | None]] = {
            normalise(s): (e, q) for s, (e, q) in (since or {}).items()}
        self._candles: dict[str, _CandleTrack] = {}

        self._queue: deque[Event] = deque()
        self._data_queued = 0                         # Trades and Candles in _queue
        self._readable = asyncio.Event()              # _queue has something, or the end came
        self._drained = asyncio.Event()               # below max_queue again
        self._drained.set()
        self._overflowing = False
        self._error: BaseException | None = None      # raised by iteration once the queue is empty
        self._raise_now: BaseException | None = None  # raised by iteration at once
        self._closing = False

        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()                 # connected and subscribed again
        self._first = asyncio.get_running_loop().create_future()
        self._pending: deque[_Pending] = deque()
        self._task: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._last_rx = 0.0

        self.url: str | None = None                   # the URL of the current connection
        self.connection_id: str | None = None
        self.server_id: str | None = None
        self.max_symbols: int | None = None
        self.reconnects = 0
        self.duplicates = 0                           # resumed trades dropped as already queued

    # -- life -----------------------------------------------------------------
    async def __aenter__(self) -> GatewayClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, wait: bool = True) -> None:
        """Connect and subscribe; returns once the first connection is up.
        Raises what ends the client before that (a refusal that is not
        retried, :class:`GatewayUnavailable`, ...). With ``wait=False`` it
        returns at once; iteration then shows the attempts as they go."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-client")
        if wait:
            await asyncio.shield(self._first)

    async def close(self) -> None:
        """Close the connection (1000) and end iteration."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._finish(None)

    @property
    def subscriptions(self) -> list[str]:
        """The streams the client holds (and will hold again after a reconnect)."""
        return list(self._wanted)

    @property
    def positions(self) -> dict[str, tuple[str, int]]:
        """{symbol: (epoch, seq)} of the last sequenced trade queued; give it
        as ``since`` to a new client to carry on after a restart."""
        return {s: (e, q) for s, (e, q) in self._points.items() if e is not None and q is not None}

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    # -- iteration --------------------------------------------------------------
    def __aiter__(self) -> GatewayClient:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._raise_now is not None:
                raise self._raise_now
            if self._queue:
                event = self._queue.popleft()
                if isinstance(event, Trade | Candle):
                    self._data_queued -= 1
                    # Reading resumes at half (not one below the bound: a
                    # read per event consumed); the next Overflow is told
                    # only once the application has caught up entirely.
                    if self._data_queued <= self.max_queue // 2 and not self._drained.is_set():
                        self._drained.set()
                    if not self._queue:
                        self._overflowing = False
                return event
            if self._error is not None:
                raise self._error
            if self._closing:
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()

    async def recv(self, timeout: float | None = None) -> Event:
        """The next event (``asyncio.TimeoutError`` after ``timeout``)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def _put(self, event: Event) -> None:
        self._queue.append(event)
        if isinstance(event, Trade | Candle):
            self._data_queued += 1
            if self._data_queued >= self.max_queue and self._drained.is_set():
                self._drained.clear()
                if self._overflowing:
                    pass
                elif self.on_overflow == "raise":
                    self._raise_now = QueueOverflow(
                        f"the application fell {self._data_queued} events behind")
                    self._closing = True
                    if self._task is not None:
                        self._task.cancel()
                else:
                    self._overflowing = True
                    self._queue.append(Overflow(self._data_queued))
                    log.warning("application %d events behind: reading paused", self._data_queued)
        self._readable.set()

    def _finish(self, error: BaseException | None) -> None:
        if error is not None and self._error is None and not self._closing:
            self._error = error
        self._closing = self._closing or error is not None
        self._ready.clear()
        if not self._first.done():
            if error is not None:
                self._first.set_exception(error)
                self._first.exception()     # retrieved: with start(wait=False) iteration raises it
            else:
                self._first.cancel()
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(error or GatewayError("client closed"))
        self._pending.clear()
        self._readable.set()

    # -- requests --------------------------------------------------------------
    async def subscribe(self, symbols: Iterable[str], *, snapshot: bool | None = None) -> dict:
        """Subscribe (and keep the streams across reconnects); the gateway's
        reply ``data``. Raises :class:`ServerError` with its message."""
        streams = [normalise(s) for s in symbols]
        added = [s for s in streams if s not in self._wanted]
        for s in added:
            self._want(s)
        try:
            return await self._request(lambda: self._subscribe_message(streams, snapshot))
        except ServerError:
            for s in added:
                self._unwant(s)
            raise

    async def unsubscribe(self, symbols: Iterable[str]) -> dict:
        """Unsubscribe; forgets the streams' resume points. The gateway's reply ``data``."""
        streams = [normalise(s) for s in symbols]
        for s in streams:
            self._unwant(s)
        return await self._request(lambda: {"action": "unsubscribe", "symbols": streams})

    async def ping(self) -> int:
        """An application-level ping; the gateway's pong timestamp (ms)."""
        reply = await self._request(lambda: {"action": "ping"})
        return int(reply.get("timestamp", 0))

    async def _request(self, make: Callable[[], dict]) -> dict:
        """Send when connected and wait for the reply; a connection lost
        meanwhile is waited out and the request sent again (subscribe and
        unsubscribe are idempotent; the reconnect has already applied them)."""
        async with asyncio.timeout(self.request_timeout):
            while True:
                if self._error is not None or self._closing:
                    raise self._error or GatewayError("client closed")
                await self._ready.wait()
                ws = self._ws
                if ws is None:
                    continue
                future = asyncio.get_running_loop().create_future()
                async with self._send_lock:
                    self._pending.append(_Pending(future))
                    try:
                        await ws.send(orjson.dumps(make()).decode())
                    except ConnectionClosed:
                        continue
                try:
                    return await future
                except _Lost:
                    continue

    def _want(self, stream: str) -> None:
        if stream not in self._wanted:
            self._wanted.append(stream)

    def _unwant(self, stream: str) -> None:
        if stream in self._wanted:
            self._wanted.remove(stream)
        self._points.pop(stream, None)
        self._candles.pop(stream, None)

    def _subscribe_message(self, streams: list[str], snapshot: bool | None) -> dict:
        message: dict[str, Any] = {"action": "subscribe", "symbols": streams}
        since = {s: {"epoch": e, "seq": q} for s, (e, q) in self._points.items()
                 if s in streams and e is not None and q is not None}
        if since:
            message["since"] = since
        if snapshot if snapshot is not None else self.snapshot:
            message["snapshot"] = True
        return message

    # -- connection loop ------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0            # failures since the last stable connection
        failures = 0           # failures in a row, for max_attempts
        index = 0
        immediate = False
        refreshed = False
        last_error: BaseException | None = None
        try:
            while not self._closing:
                url = self.urls[index % len(self.urls)]
                started = time.monotonic()
                retry_after: float | None = None
                established = False
                code: int | None = None
                reason = ""
                try:
                    await self._session(url)
                    return                                   # closed by the application
                except _Lost as lost:
                    established = True
                    code, reason = lost.code, lost.reason
                    failures = 0
                    if code == 1008 and reason == "token expired":
                        if not await self._refresh_token(TokenExpired("the gateway closed the "
                                                                      "connection: token expired")):
                            return
                        immediate = True
                    elif code == 1001 and not immediate:
                        immediate = True                    # going away: try again at once
                    else:
                        immediate = False
                except Unauthorized as exc:
                    if refreshed or self.token_refresh is None:
                        raise
                    refreshed = True
                    await self._refresh_token(exc)
                    immediate, code, reason = True, None, str(exc)
                except (Forbidden, InvalidURI, ValueError):
                    raise
                except ConnectionRefused as exc:
                    last_error = exc
                    retry_after, code, reason = exc.retry_after, exc.status, str(exc)
                    failures += 1
                    immediate = False
                except (OSError, TimeoutError, WebSocketException, ServerError) as exc:
                    last_error = exc
                    code, reason = None, f"{type(exc).__name__}: {exc}"
                    failures += 1
                    immediate = False
                    if isinstance(exc, ServerError):
                        raise
                if self._closing:
                    return
                if self.max_attempts is not None and failures >= self.max_attempts:
                    raise GatewayUnavailable(f"{failures} connection attempts failed; last: {reason}"
                                             ) from last_error
                if time.monotonic() - started >= self.stable_after:
                    attempt = 0
                    refreshed = False
                if immediate:
                    delay = 0.0
                else:
                    delay = backoff_delay(attempt, self.backoff_initial, self.backoff_max, self.rng)
                    attempt += 1
                if retry_after is not None:
                    delay = max(delay, retry_after)
                self._put(Disconnected(url, code, reason, delay, established))
                log.info("gateway %s: connection ended (%s %s); next attempt in %.2f s",
                         url, code, reason, delay)
                index += 1                                  # the next URL, when there are several
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self._finish(exc)
            return
        self._finish(None)

    async def _refresh_token(self, error: GatewayError) -> bool:
        """A new token from token_refresh; False (and the client ends with
        ``error``) when there is none."""
        if self.token_refresh is None:
            self._finish(error)
            return False
        try:
            token = self.token_refresh()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            self._finish(TokenExpired(f"token_refresh failed: {exc!r}"))
            return False
        self.token = token
        return True

    async def _session(self, url: str) -> None:
        """One connection, from the upgrade to its end (raises _Lost)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        options: dict[str, Any] = {"proxy": None, **self.connect_options}
        try:
            ws = await connect(url, additional_headers=headers,
                               compression="deflate" if self.compression else None,
                               open_timeout=self.open_timeout, ping_interval=None,
                               close_timeout=1.0, max_size=None, max_queue=64, **options)
        except InvalidStatus as exc:
            raise _refusal(url, exc) from None
        self._ws = ws
        self._last_rx = time.monotonic()
        watchdog = asyncio.get_running_loop().create_task(self._watch(ws))
        try:
            await self._greet(ws, url)
            await self._read(ws)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise _Lost(rcvd.code if rcvd else None, rcvd.reason if rcvd else "no close frame") from None
        finally:
            watchdog.cancel()
            self._ready.clear()
            self._ws = None
            lost = _Lost(None, "connection lost")
            while self._pending:
                p = self._pending.popleft()
                if not p.future.done():
                    p.future.set_exception(lost)
            if self._closing:
                with contextlib.suppress(Exception):
                    await ws.close()
            else:
                ws.transport.abort()

    async def _greet(self, ws: ClientConnection, url: str) -> None:
        """The welcome, then the subscription again (with resume points)."""
        async with asyncio.timeout(self.open_timeout):
            welcome = orjson.loads(await ws.recv(decode=False))
        self._last_rx = time.monotonic()
        if welcome.get("type") != "success" or "connectionId" not in (welcome.get("data") or {}):
            raise ServerError(f"unexpected first message from {url}: {welcome!r}")
        data = welcome["data"]
        reconnect = self.url is not None
        self.url, self.connection_id = url, data["connectionId"]
        self.server_id, self.max_symbols = data.get("serverId", ""), data.get("maxSymbolsPerConnection")
        if reconnect:
            self.reconnects += 1
            for track in self._candles.values():
                track.resumed = True

        def connected(_reply: dict) -> None:
            self._ready.set()
            self._put(Connected(url, self.connection_id or "", self.server_id or "", reconnect,
                                tuple(self._wanted)))
            if not self._first.done():
                self._first.set_result(None)

        if not self._wanted:
            connected({})
            return
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(future, connected))
        await ws.send(orjson.dumps(self._subscribe_message(list(self._wanted), None)).decode())
        # The reply is read by _read (so that trades right behind it keep their order).

    async def _read(self, ws: ClientConnection) -> None:
        while True:
            if not self._drained.is_set():
                await self._drained.wait()           # the application is behind: stop reading
                self._last_rx = time.monotonic()
            raw = await ws.recv(decode=False)
            self._last_rx = time.monotonic()
            try:
                message = orjson.loads(raw)
                kind = message["type"]
            except Exception:
                log.warning("gateway %s sent a message that is not JSON with a type: %.200r",
                            self.url, raw)
                continue
            if kind == "trade":
                self._on_trade(message, raw)
            elif kind == "candle":
                self._on_candle(message, raw)
            elif kind == "gap":
                self._on_gap(message.get("data") or {}, raw)
            elif kind in ("success", "error", "pong"):
                self._on_reply(message)
            else:
                log.debug("gateway %s: message of unknown type %r ignored", self.url, kind)

    async def _watch(self, ws: ClientConnection) -> None:
        """Mute detection: a ping when nothing arrived for half of
        mute_timeout, the connection aborted when nothing (not even the pong)
        arrived for all of it. Paused while the application is behind."""
        half = self.mute_timeout / 2
        pong: Awaitable[float] | None = None
        while True:
            await asyncio.sleep(min(half / 2, 1.0))
            now = time.monotonic()
            if not self._drained.is_set():
                self._last_rx = now
                continue
            idle = now - self._last_rx
            if idle >= self.mute_timeout:
                log.warning("gateway %s: nothing received for %.1f s; reconnecting", self.url, idle)
                ws.transport.abort()
                return
            if idle >= half and (pong is None or getattr(pong, "done", lambda: True)()):
                with contextlib.suppress(Exception):
                    pong = await ws.ping()
                    pong.add_done_callback(self._on_pong)   # type: ignore[attr-defined]

    def _on_pong(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._last_rx = time.monotonic()

    # -- messages -------------------------------------------------------------
    def _on_reply(self, message: dict) -> None:
        if not self._pending:
            log.debug("gateway %s: reply with no request: %.200r", self.url, message)
            return
        p = self._pending.popleft()
        if message["type"] == "error":
            error = ServerError(str(message.get("message", "")))
            if p.on_reply is not None:           # the subscription after a reconnect failed
                self._finish(error)
                self._closing = True
                if self._ws is not None:
                    self._ws.transport.abort()
                return
            if not p.future.done():
                p.future.set_exception(error)
            return
        reply = message.get("data") or {}
        if message["type"] == "pong":
            reply = {"timestamp": message.get("timestamp")}
        if p.on_reply is not None:
            p.on_reply(reply)
        if not p.future.done():
            p.future.set_result(reply)

    def _on_trade(self, message: dict, raw: bytes = b"") -> None:
        data = message.get("data")
        if not isinstance(data, dict):
            return
        symbol = data.get("symbol")
        symbol = symbol if isinstance(symbol, str) else ""
        seq, epoch = message.get("seq"), message.get("epoch")
        if isinstance(seq, int) and isinstance(epoch, str) and symbol:
            p_epoch, p_seq = self._points.get(symbol, (None, None))
            if p_seq is not None:
                if epoch == p_epoch:
                    if seq <= p_seq:
                        self.duplicates += 1
                        return
                    if seq > p_seq + 1:
                        self._put(Gap(symbol, "missing", epoch, p_seq + 1, seq - 1, from_gateway=False))
                else:
                    self._put(Gap(symbol, "epoch_changed", epoch, 1 if seq > 1 else 0, seq - 1,
                                  from_gateway=False))
            self._points[symbol] = (epoch, seq)
        else:
            seq = epoch = None
        self._put(Trade(symbol, data, seq, epoch, int(message.get("timestamp") or 0),
                        time.time_ns() // 1_000_000, raw))

    def _on_gap(self, data: dict, raw: bytes = b"") -> None:
        symbol = str(data.get("symbol", ""))
        reason = str(data.get("reason", "slow_consumer" if "skipped" in data else ""))
        epoch, first, last = data.get("epoch"), data.get("from"), data.get("to")
        if "@" not in symbol and symbol:
            if isinstance(last, int) and last > 0:
                self._points[symbol] = (epoch, last)
            elif reason == "epoch_changed":
                # Nothing of the new epoch is lost: it starts from 1 (or is unknown).
                self._points[symbol] = (epoch, 0) if epoch else (None, None)
            elif symbol in self._points:
                # Where the loss ends is not known: the next trade is the baseline.
                self._points[symbol] = (epoch, None)
        self._put(Gap(symbol, reason, epoch if isinstance(epoch, str) else None,
                      first if isinstance(first, int) else None,
                      last if isinstance(last, int) else None,
                      data.get("skipped") if isinstance(data.get("skipped"), int) else None,
                      raw=raw))

    def _on_candle(self, message: dict, raw: bytes = b"") -> None:
        d = message.get("data") or {}
        try:
            candle = Candle(d["symbol"], d["interval"], int(d["start"]), d["open"], d["high"],
                            d["low"], d["close"], d["volume"], int(d["trades"]), str(d["state"]),
                            int(message.get("timestamp") or 0), raw)
        except (KeyError, TypeError, ValueError):
            log.warning("gateway %s sent a candle without its fields: %.200r", self.url, message)
            return
        track = self._candles.setdefault(candle.stream, _CandleTrack())
        if candle.state in ("final", "correction"):
            seen = track.finals.get(candle.start)
            if candle.state == "final" and seen is not None:
                if seen == candle.values():
                    return                             # a backfill repeating what was delivered
                candle = _as_correction(candle)
            if track.resumed and track.last_final is not None and candle.state == "final":
                track.resumed = False
                step = interval_ms(candle.interval)
                if step and candle.start > track.last_final + step:
                    self._put(Gap(candle.stream, "candles_missed", None, track.last_final + step,
                                  candle.start - step, from_gateway=False))
            track.finals[candle.start] = candle.values()
            if track.last_final is None or candle.start > track.last_final:
                track.last_final = candle.start
            if len(track.finals) > 1024:
                del track.finals[min(track.finals)]
        self._put(candle)


def _as_correction(c: Candle) -> Candle:
    return Candle(c.symbol, c.interval, c.start, c.open, c.high, c.low, c.close, c.volume, c.trades,
                  "correction", c.gateway_time, c.raw)
