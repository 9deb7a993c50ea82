"""Redis behind Sentinel: where the master is, and following it through a failover.

``REDIS_URL=redis+sentinel://[user:password@]host1:26379,host2:26379/<master-name>[/db]``
(gateway.config.parse_sentinel_url) names sentinels, not Redis. A process
that uses it keeps one SentinelMaster:

- ``discover()`` asks the sentinels in turn (``SENTINEL
  get-master-addr-by-name``; the first that answers wins, and is asked first
  next time) for the master's address. The caller connects there and checks
  ``ROLE`` itself (a sentinel's answer during a switch can still name the
  demoted master); when the check fails it calls ``stale()`` and asks again
  with backoff.
- ``watch()`` holds a SUBSCRIBE connection to one sentinel for
  ``+switch-master``, ``+odown`` and ``-odown``; when it fails it moves to
  the next sentinel, with backoff. A ``+switch-master`` for our master (or,
  after a reconnect to a sentinel, an answer that differs from what we had)
  calls every ``on_switch`` callback with the new address at once, so a
  process moves without waiting for its old connection to time out (a frozen
  or partitioned master keeps the TCP connection open). While the sentinels
  hold the master objectively down (``+odown``), ``odown`` is True.

The subscription (gateway.redis_reader.RedisSubscriber) takes a
SentinelMaster: it connects where discover() says, sends ``ROLE`` ahead of
its PSUBSCRIBE on the same connection and is ready only once Redis answered
``master`` and confirmed the patterns. The command clients
(``command_client``) connect where the SentinelMaster points and check
``ROLE`` on each new connection; ``on_switch`` drops their pooled
connections.

The control connections here (a query per discovery, one SUBSCRIBE to a
sentinel) speak RESP through hiredis over asyncio streams, as the
subscription does, rather than through redis-py's asyncio Sentinel: they
are a handful of commands each, every step has its own timeout, and the
caller learns which sentinel answered what; redis-py's Sentinel pools and
retries internally and never says. Publishers that only need a client use
``redis_client()`` / ``async_redis_client()``, which are redis-py's own
Sentinel clients (``master_for``).
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import hiredis

from .config import RedisTarget, parse_redis_url
from .redis_reader import Backoff, Failures, encode_command

log = logging.getLogger("gateway.sentinel")

Address = tuple[str, int]

QUERY_TIMEOUT = 1.0           # seconds per sentinel asked
WATCH_PING = 5.0              # seconds between PINGs on the watch connection


class MasterUnknown(OSError):
    """No sentinel named a master (all unreachable, or none knows the name).
    An OSError, so callers that retry connection failures retry this too."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(address: Address | None) -> str:
    if address is None:
        return "(none)"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Conn:
    """One small RESP connection: commands out, replies in (hiredis)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, address: Address, timeout: float) -> _Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout)
        return cls(reader, writer)

    def send(self, *args: str | bytes) -> None:
        self.writer.write(encode_command(*args))

    async def reply(self, timeout: float | None) -> Any:
        while True:
            got = self.parser.gets()
            if got is not False:
                return got
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("connection closed")
            self.parser.feed(data)

    def close(self) -> None:
        self.writer.close()


def _check(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        raise ConnectionError(f"sentinel refused: {reply}")
    return reply


class SentinelMaster:
    """The master of ``target.master_name`` as the sentinels of ``target`` see it."""

    def __init__(self, target: RedisTarget, *, query_timeout: float = QUERY_TIMEOUT,
                 watch_ping: float = WATCH_PING):
        if not target.sentinels:
            raise ValueError("SentinelMaster needs a redis+sentinel:// target")
        self.target = target
        self.name = target.master_name
        self.sentinels: list[Address] = list(target.sentinels)
        self.query_timeout = query_timeout
        self.watch_ping = watch_ping
        self.address: Address | None = None     # the last address a sentinel named
        self.odown = False                      # the sentinels hold the master down
        self.watching: Address | None = None    # the sentinel the watch connection is on
        self.switches = 0
        self._first = 0                         # the sentinel to ask first
        self._hint: Address | None = None       # from +switch-master: try it first
        self._on_switch: list[Callable[[Address], None]] = []
        self._on_odown: list[Callable[[bool], None]] = []
        self._task: asyncio.Task | None = None

    # --- discovery ------------------------------------------------------------------
    def _auth(self, conn: _Conn) -> int:
        t = self.target
        if t.sentinel_password is None:
            return 0
        user = [t.sentinel_username] if t.sentinel_username else []
        conn.send("AUTH", *user, t.sentinel_password)
        return 1

    async def ask(self, sentinel: Address) -> Address | None:
        """One sentinel's answer: the master's address, or None when it does
        not know the name. Raises OSError / TimeoutError when it cannot answer."""
        conn = await _Conn.open(sentinel, self.query_timeout)
        try:
            authed = self._auth(conn)
            conn.send("SENTINEL", "get-master-addr-by-name", self.name)
            for _ in range(authed):
                _check(await conn.reply(self.query_timeout))
            reply = _check(await conn.reply(self.query_timeout))
        finally:
            conn.close()
        if not reply:
            return None
        return _text(reply[0]), int(reply[1])

    async def discover(self) -> Address:
        """The master's address: a +switch-master's, else the first sentinel's
        that answers. Raises MasterUnknown when none names one."""
        if self._hint is not None:
            hint, self._hint = self._hint, None
            return hint
        errors = []
        n = len(self.sentinels)
        for k in range(n):
            i = (self._first + k) % n
            sentinel = self.sentinels[i]
            try:
                found = await self.ask(sentinel)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{describe(sentinel)}: {exc or type(exc).__name__}")
                continue
            if found is None:
                errors.append(f"{describe(sentinel)}: does not know {self.name!r}")
                continue
            self._first = i
            self._learn(found, f"sentinel {describe(sentinel)} names it")
            return found
        raise MasterUnknown(f"no master known for {self.name!r} ({'; '.join(errors)})")

    def stale(self, address: Address) -> None:
        """``address`` answered ROLE with something other than master: the
        next discover() asks the sentinels again (starting with the next one)."""
        if self._hint == address:
            self._hint = None
        self._first = (self._first + 1) % len(self.sentinels)

    # --- following a failover ---------------------------------------------------------
    def on_switch(self, callback: Callable[[Address], None]) -> None:
        """``callback(new address)`` whenever the sentinels move the master."""
        self._on_switch.append(callback)

    def on_odown(self, callback: Callable[[bool], None]) -> None:
        """``callback(down)`` when the sentinels start or stop holding the master down."""
        self._on_odown.append(callback)

    def remove(self, *callbacks: Callable[..., None]) -> None:
        """Stop calling ``callbacks`` (given to on_switch or on_odown)."""
        for cb in callbacks:
            for group in (self._on_switch, self._on_odown):
                while cb in group:
                    group.remove(cb)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.watch(), name="sentinel-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def _learn(self, found: Address, how: str) -> None:
        if self.address is None:
            log.info("the master of %s is %s (%s)", self.name, describe(found), how)
            self.address = found
        elif found != self.address:
            self._switched(found, how)

    def _switched(self, new: Address, how: str) -> None:
        old = self.address
        self.address = new
        self._hint = new
        self.switches += 1
        log.warning("sentinel: the master of %s moved from %s to %s (%s)", self.name, describe(old),
                    describe(new), how)
        for callback in list(self._on_switch):
            try:
                callback(new)
            except Exception:
                log.exception("sentinel switch callback failed")
        # After the move: whoever was still on the old master has left it.
        self._set_odown(False)

    def _set_odown(self, down: bool) -> None:
        if down == self.odown:
            return
        self.odown = down
        if down:
            log.warning("sentinel: the master of %s (%s) is down; a failover should follow",
                        self.name, describe(self.address))
        for callback in list(self._on_odown):
            try:
                callback(down)
            except Exception:
                log.exception("sentinel odown callback failed")

    def _on_event(self, channel: str, data: str) -> None:
        parts = data.split()
        if channel == "+switch-master":
            # "<name> <old ip> <old port> <new ip> <new port>"
            if len(parts) >= 5 and parts[0] == self.name:
                # Always passed on, even when a discovery learnt it first:
                # whoever is still on the old master moves now.
                self._switched((parts[3], int(parts[4])), "+switch-master")
        elif (channel in ("+odown", "-odown") and len(parts) >= 2 and parts[0] == "master"
              and parts[1] == self.name):
            # "master <name> <ip> <port> [#quorum n/m]"
            self._set_odown(channel == "+odown")

    async def watch(self) -> None:
        """Forever: SUBSCRIBE to one sentinel's events; on failure the next one."""
        failures = Failures()
        backoff = Backoff(0.1, 5.0)
        i = self._first
        while True:
            sentinel = self.sentinels[i % len(self.sentinels)]
            try:
                await self._watch_one(sentinel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.watching = None
                if failures.failed():
                    log.warning("sentinel %s: cannot watch for failovers (%s); trying the next "
                                "sentinel", describe(sentinel), exc or type(exc).__name__)
            else:
                failures.reset()
                backoff.reset()
            i += 1
            # A watch that ended cleanly is resumed soon; failures back off to 5 s.
            await asyncio.sleep(backoff.next_delay() if failures.count else 0.1 * random.uniform(0.8, 1.0))

    async def _watch_one(self, sentinel: Address) -> None:
        conn = await _Conn.open(sentinel, self.query_timeout)
        try:
            authed = self._auth(conn)
            # Where the master is now (a switch may have happened while no
            # one watched), then the events from here on.
            conn.send("SENTINEL", "get-master-addr-by-name", self.name)
            conn.send("SUBSCRIBE", "+switch-master", "+odown", "-odown")
            for _ in range(authed):
                _check(await conn.reply(self.query_timeout))
            now = _check(await conn.reply(self.query_timeout))
            for _ in range(3):
                _check(await conn.reply(self.query_timeout))
            self.watching = sentinel
            log.info("sentinel %s: watching %s for failovers", describe(sentinel), self.name)
            if now:
                self._learn((_text(now[0]), int(now[1])), f"sentinel {describe(sentinel)} names it")
            # A sentinel sends nothing while nothing happens: PING proves it is there.
            silent = 0.0
            while True:
                try:
                    msg = await conn.reply(self.watch_ping)
                except TimeoutError:
                    silent += self.watch_ping
                    if silent > 3 * self.watch_ping:
                        raise ConnectionError("the sentinel stopped answering") from None
                    conn.send("PING")
                    continue
                silent = 0.0
                _check(msg)
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                    self._on_event(_text(msg[1]), _text(msg[2]))
        finally:
            conn.close()


# --- redis-py clients ------------------------------------------------------------------
def command_client(master: SentinelMaster, **kwargs: Any):
    """A redis.asyncio client for commands on the master ``master`` points at
    (gateway.server.history_client builds the rest): each new connection
    goes where the SentinelMaster last learnt, asks the sentinels when it
    knows nothing, and refuses a server whose ROLE is not master."""
    import redis.asyncio as aredis
    import redis.exceptions

    class MasterConnection(aredis.Connection):
        async def _connect(self) -> None:
            address = master.address or await master.discover()
            self.host, self.port = address
            await super()._connect()

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            await super().on_connect_check_health(check_health)
            await self.send_command("ROLE")
            role = await self.read_response()
            kind = _text(role[0]) if isinstance(role, (list, tuple)) and role else repr(role)
            if kind != "master":
                master.stale((self.host, self.port))
                master.address = None
                raise redis.exceptions.ConnectionError(
                    f"{self.host}:{self.port} is a {kind}, not the master (failover in progress)")

    pool = aredis.BlockingConnectionPool(connection_class=MasterConnection, host="", port=0,
                                         **kwargs)
    client = aredis.Redis(connection_pool=pool)

    pending: set[asyncio.Task] = set()

    def moved(_: Address) -> None:
        # Pooled connections to the old master go; the next command connects anew.
        task = asyncio.get_running_loop().create_task(pool.disconnect())
        pending.add(task)
        task.add_done_callback(pending.discard)
    master.on_switch(moved)
    return client


def _sentinel_kwargs(target: RedisTarget) -> dict[str, Any]:
    kw: dict[str, Any] = {"socket_timeout": QUERY_TIMEOUT, "socket_connect_timeout": QUERY_TIMEOUT}
    if target.sentinel_password is not None:
        kw["password"] = target.sentinel_password
        if target.sentinel_username:
            kw["username"] = target.sentinel_username
    return kw


def redis_client(url: str, **kwargs: Any):
    """A synchronous redis-py client for ``url``: ``redis.Redis.from_url`` for
    redis://, rediss://, unix://; for redis+sentinel:// redis-py's
    ``Sentinel(...).master_for(<master-name>)``, which finds the master
    through the sentinels and finds it again after a connection error (a
    failover: retry the command). ``kwargs`` go to the client (timeouts,
    retry, decode_responses, ...). Raises gateway.config.ConfigError for a
    malformed redis+sentinel:// URL."""
    import redis
    import redis.sentinel

    if not url.lower().startswith("redis+sentinel://"):
        return redis.Redis.from_url(url, **kwargs)
    t = parse_redis_url(url)
    sentinel = redis.sentinel.Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t))
    return sentinel.master_for(t.master_name, username=t.username, password=t.password, db=t.db,
                               **kwargs)


def async_redis_client(url: str, **kwargs: Any):
    """redis_client() for redis.asyncio."""
    import redis.asyncio as aredis
    import redis.asyncio.sentinel

    if not url.lower().startswith("redis+sentinel://"):
        return aredis.Redis.from_url(url, **kwargs)
    t = parse_redis_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(list(t.sentinels),
                                               sentinel_kwargs=_sentinel_kwargs(t))
    return sentinel.master_for(t.master_name, username=t.username, password=t.password, db=t.db,
                               **kwargs)
