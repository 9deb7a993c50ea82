"""Sequenced trade publishing with a bounded history per symbol (Redis 7 Functions).

The Redis side is the function library ``ws_gateway`` (gateway/trades.lua):

- ``FCALL publish_trade 1 <symbol> <json object>`` gives the trade the next
  sequence number of its symbol, keeps it in the symbol's history stream and
  PUBLISHes ``{"_seq":<seq>,"_epoch":"<epoch>",<the rest of the object>`` on
  ``<prefix><symbol>``; it returns the seq.
- ``FCALL_RO trade_history 1 <symbol> <after> <count>`` reads the history:
  ``[epoch, first, last, seq1, d1, ...]`` (see parse_history()).

A symbol's seq starts at 1 in each epoch; a new epoch starts when the
symbol's keys are missing (a new symbol, or Redis lost them) or were made on
another master (a failover promoted a replica, which may lack what the old
master acknowledged last), so (epoch, seq) never repeats. Keys:
``ws-gateway:{<symbol>}:meta`` (hash: epoch, seq, rid: the replication ID of
the master that made the epoch) and ``ws-gateway:{<symbol>}:history`` (stream of ``<seq>-0`` entries with
one field ``d``), one Cluster slot per symbol.

``ws-gateway-functions load`` loads the library (as deployments do before
the publishers start); ``ws-gateway-functions show`` prints it.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import redis
import redis.exceptions

LIBRARY_NAME = "ws_gateway"
DEFAULT_CHANNEL_PREFIX = "channel:trade:"
DEFAULT_HISTORY_SIZE = 10000
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"

_PREFIX_MARK = "@@CHANNEL_PREFIX@@"
_SIZE_MARK = "@@HISTORY_SIZE@@"


class LibraryLoadError(redis.exceptions.ResponseError):
    """Redis refused FUNCTION LOAD of the ws_gateway library (an older Redis
    without Functions, a syntax error, ...). A ResponseError, like the reply
    it stands for."""


class LibraryLoadPermissionError(LibraryLoadError, redis.exceptions.NoPermissionError):
    """FUNCTION LOAD refused by Redis ACLs (NOPERM): still a NoPermissionError."""


def meta_key(symbol: str) -> str:
    """The hash holding a symbol's epoch and last seq."""
    return f"ws-gateway:{{{symbol}}}:meta"


def history_key(symbol: str) -> str:
    """The stream holding a symbol's retained trades."""
    return f"ws-gateway:{{{symbol}}}:history"


def _template() -> str:
    return resources.files("gateway").joinpath("trades.lua").read_text(encoding="utf-8")


def library_code(prefix: str = DEFAULT_CHANNEL_PREFIX, history_size: int = DEFAULT_HISTORY_SIZE) -> str:
    """The library's source with the channel prefix and history size filled in.

    Raises ValueError for a prefix that cannot sit in a Lua string literal
    (quotes, backslash, line breaks or other non-printable characters) or a
    history size below 1."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("channel prefix must be a non-empty string")
    if any(c in prefix for c in "\"'\\\n\r") or not prefix.isprintable():
        raise ValueError(f"channel prefix must not contain quotes, backslashes or line breaks: {prefix!r}")
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
        raise ValueError(f"history size must be an integer >= 1, got {history_size!r}")
    # The size first: a prefix may not bring a marker the second replace would fill.
    return _template().replace(_SIZE_MARK, str(history_size)).replace(_PREFIX_MARK, prefix)


def _load_failed(exc: redis.exceptions.ResponseError) -> LibraryLoadError:
    text = str(exc)
    hint = " (Redis Functions need Redis 7 or later)" if "unknown command" in text.lower() else ""
    cls = (LibraryLoadPermissionError if isinstance(exc, redis.exceptions.NoPermissionError)
           else LibraryLoadError)
    return cls(f"FUNCTION LOAD of the {LIBRARY_NAME} library failed: {text}{hint}")


def _check_loaded(name: Any) -> str:
    if isinstance(name, bytes):
        name = name.decode()
    if name != LIBRARY_NAME:
        raise LibraryLoadError(f"FUNCTION LOAD answered {name!r}, expected {LIBRARY_NAME!r}")
    return name


def load_library(client: redis.Redis, prefix: str = DEFAULT_CHANNEL_PREFIX,
                 history_size: int = DEFAULT_HISTORY_SIZE) -> str:
    """FUNCTION LOAD REPLACE the library through a redis-py client; returns
    its name. Raises LibraryLoadError (a ResponseError; for NOPERM also a
    NoPermissionError), ValueError for bad settings, and redis-py's
    connection errors as they are."""
    code = library_code(prefix, history_size)
    try:
        name = client.function_load(code, replace=True)
    except redis.exceptions.ResponseError as exc:
        raise _load_failed(exc) from exc
    return _check_loaded(name)


async def aload_library(client: Any, prefix: str = DEFAULT_CHANNEL_PREFIX,
                        history_size: int = DEFAULT_HISTORY_SIZE) -> str:
    """load_library() for a redis.asyncio client."""
    code = library_code(prefix, history_size)
    try:
        name = await client.function_load(code, replace=True)
    except redis.exceptions.ResponseError as exc:
        raise _load_failed(exc) from exc
    return _check_loaded(name)


def publish_trade(client: Any, symbol: str, trade: dict | bytes | str) -> Any:
    """FCALL publish_trade: the seq (int) from a sync client, an awaitable
    of it from a redis.asyncio client, the pipeline itself from a pipeline
    (its execute() then holds the seq). A dict is encoded with orjson;
    bytes and str go as they are (Redis checks that they are a JSON object
    and answers a ResponseError otherwise)."""
    if isinstance(trade, (bytes, bytearray, memoryview, str)):
        payload: Any = trade
    else:
        payload = orjson.dumps(trade)
    return client.fcall("publish_trade", 1, symbol, payload)


@dataclass(frozen=True)
class HistoryRead:
    """One trade_history answer.

    ``epoch`` is None for a symbol Redis knows nothing of; ``first`` is the
    oldest retained seq (0 when none is retained), ``last`` the last seq
    assigned in this epoch (0 when none); ``entries`` are (seq, trade JSON)
    in ascending seq order."""
    epoch: str | None
    first: int
    last: int
    entries: list[tuple[int, bytes]]


def parse_history(reply: Any) -> HistoryRead:
    """A trade_history reply (as redis-py returns it, with or without
    decode_responses) as a HistoryRead. ValueError when it has another shape."""
    if not isinstance(reply, (list, tuple)) or len(reply) < 3 or (len(reply) - 3) % 2:
        raise ValueError(f"not a trade_history reply: {reply!r:.200}")
    epoch = reply[0]
    if epoch is None or epoch is False:
        epoch_text = None
    elif isinstance(epoch, bytes):
        epoch_text = epoch.decode()
    elif isinstance(epoch, str):
        epoch_text = epoch
    else:
        raise ValueError(f"not a trade_history epoch: {epoch!r}")
    entries: list[tuple[int, bytes]] = []
    for k in range(3, len(reply), 2):
        data = reply[k + 1]
        entries.append((int(reply[k]), data.encode() if isinstance(data, str) else bytes(data)))
    return HistoryRead(epoch_text, int(reply[1]), int(reply[2]), entries)


async def read_history(aclient: Any, symbol: str, after: int, count: int) -> HistoryRead:
    """FCALL_RO trade_history through a redis.asyncio client: up to
    ``count`` trades with seq > ``after`` (after=-1: the latest one)."""
    reply = await aclient.fcall_ro("trade_history", 1, symbol, after, count)
    return parse_history(reply)


async def read_all_history(read: Callable[[str, int, int], Awaitable[HistoryRead]], symbol: str,
                           after: int, page: int) -> HistoryRead:
    """Every retained trade of ``symbol`` after ``after`` (-1: the latest
    one), through ``read(symbol, after, count)`` (read_history bound to a
    client) in pages of ``page``, so no single Redis call carries the whole
    history."""
    h = await read(symbol, after, page)
    if after < 0:
        return h
    entries = list(h.entries)
    while entries and len(h.entries) == page and entries[-1][0] < h.last:
        more = await read(symbol, entries[-1][0], page)
        if more.epoch != h.epoch:
            break            # started anew meanwhile: the next read sees it
        entries.extend(more.entries)
        h = HistoryRead(h.epoch, h.first, more.last, more.entries)
    return HistoryRead(h.epoch, h.first, h.last, entries)


# ---------------------------------------------------------------- command line

def env_history_size() -> int:
    """WS_HISTORY_SIZE from the environment (default 10000); ValueError when malformed."""
    text = os.environ.get("WS_HISTORY_SIZE", "").strip()
    if not text:
        return DEFAULT_HISTORY_SIZE
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"WS_HISTORY_SIZE must be an integer >= 1, got {text!r}") from None
    if size < 1:
        raise ValueError(f"WS_HISTORY_SIZE must be an integer >= 1, got {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ws-gateway-functions",
                                description="Load or show the ws_gateway Redis function library.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--channel-prefix", default=None,
                        help="channel prefix (default: WS_CHANNEL_PREFIX or channel:trade:)")
    common.add_argument("--history-size", type=_positive_int, default=None,
                        help="trades kept per symbol, at least (default: WS_HISTORY_SIZE or 10000)")
    load = sub.add_parser("load", parents=[common], help="FUNCTION LOAD REPLACE the library")
    load.add_argument("--redis-url", default=None,
                      help="default: REDIS_URL or redis://127.0.0.1:6379")
    sub.add_parser("show", parents=[common], help="print the library's code")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    prefix = args.channel_prefix
    if prefix is None:
        prefix = os.environ.get("WS_CHANNEL_PREFIX", "") or DEFAULT_CHANNEL_PREFIX
    try:
        size = args.history_size if args.history_size is not None else env_history_size()
        code = library_code(prefix, size)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.command == "show":
        sys.stdout.write(code)
        return 0
    url = args.redis_url or os.environ.get("REDIS_URL", "") or DEFAULT_REDIS_URL
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from .config import ConfigError, redact_url
    from .sentinel import redis_client
    try:
        client = redis_client(url, socket_connect_timeout=5, socket_timeout=10,
                              retry=Retry(NoBackoff(), 0))
        try:
            load_library(client, prefix, size)
        finally:
            client.close()
    except ConfigError as exc:        # a malformed redis+sentinel:// URL
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (redis.RedisError, ValueError, OSError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {redact_url(url)}: {text}", file=sys.stderr)
        return 1
    print(f"loaded {LIBRARY_NAME} into {redact_url(url)} (channel prefix {prefix!r}, history size {size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
