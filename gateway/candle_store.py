"""Candles in Redis: the calls of the ws_gateway_candles function library
(gateway/candles.lua), for the candle service (lease, publishing, state) and
for the gateways (backfill).

The library is loaded by whoever needs it first (the candle service at
start, a gateway at start), with FUNCTION LOAD REPLACE: loading it again is
harmless. Every call takes a redis-py client (sync or asyncio, with or
without decode_responses).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .candles import Out

LIBRARY_NAME = "ws_gateway_candles"
LEASE_KEY = "ws-gateway:candles:lease"
FENCE_KEY = "ws-gateway:candles:fence"
SYMBOLS_KEY = "ws-gateway:candles:symbols"
KIND_CODES = {"update": "u", "final": "f", "correction": "c"}


def library_code() -> str:
    return resources.files("gateway").joinpath("candles.lua").read_text()


def load_library(client) -> None:
    client.function_load(library_code(), replace=True)


async def aload_library(aclient) -> None:
    await aclient.function_load(library_code(), replace=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# --- the lease ------------------------------------------------------------------
def lease_args(holder: str, ttl_ms: int, held: str | None) -> list[Any]:
    return ["candle_lease", 2, LEASE_KEY, FENCE_KEY, holder, ttl_ms, held or ""]


def lease_reply(reply: Any) -> str | None:
    return None if reply is None else _text(reply)


def acquire_lease(client, holder: str, ttl_ms: int, held: str | None = None) -> str | None:
    """Take the lease (or renew ``held``): its value "<holder>#<token>", or
    None while another holder has it."""
    return lease_reply(client.fcall(*lease_args(holder, ttl_ms, held)))


async def aacquire_lease(aclient, holder: str, ttl_ms: int, held: str | None = None) -> str | None:
    return lease_reply(await aclient.fcall(*lease_args(holder, ttl_ms, held)))


async def arelease_lease(aclient, value: str) -> bool:
    return bool(await aclient.fcall("candle_release", 1, LEASE_KEY, value))


def token_of(value: str) -> int:
    """The fencing token in a lease value."""
    return int(value.rsplit("#", 1)[1])


# --- publishing -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Forget:
    """Drop the stored state of one candle (it left the late window)."""
    symbol: str
    interval: str
    start: int


def publish_args(token: str, items: Iterable[Out | Forget], prefix: str, keep: dict[str, int],
                 watermarks: dict[str, tuple[str, int]]) -> list[Any]:
    args: list[Any] = [token, prefix, len(watermarks)]
    for symbol, (epoch, seq) in watermarks.items():
        args += [symbol, f"{epoch}:{seq}"]
    for item in items:
        if isinstance(item, Forget):
            args += [item.symbol, item.interval, item.start, "d", "", "", "", 0]
        else:
            args += [item.symbol, item.interval, item.start, KIND_CODES[item.kind], item.body,
                     item.stored, item.state, keep[item.interval]]
    return ["publish_candles", 1, LEASE_KEY, *args]


def publish_candles(client, token: str, items: Iterable[Out | Forget], prefix: str,
                    keep: dict[str, int], watermarks: dict[str, tuple[str, int]] | None = None) -> int:
    """Publish and store ``items`` while ``token`` holds the lease (else a
    ResponseError starting with FENCED); returns how many went out."""
    return int(client.fcall(*publish_args(token, items, prefix, keep, watermarks or {})))


async def apublish_candles(aclient, token: str, items: Iterable[Out | Forget], prefix: str,
                           keep: dict[str, int], watermarks: dict[str, tuple[str, int]] | None = None
                           ) -> int:
    return int(await aclient.fcall(*publish_args(token, items, prefix, keep, watermarks or {})))


def is_fenced(exc: BaseException) -> bool:
    return str(exc).startswith("FENCED")


# --- reading --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Backfill:
    """What a new subscriber of a candle stream gets before the live stream:
    final candles (oldest first), then the open one(s), each a complete
    client message; ``n`` is the stream's message count when read."""
    n: int
    finals: list[bytes]
    open: list[bytes]


def parse_backfill(reply: Any) -> Backfill:
    if not isinstance(reply, (list, tuple)) or len(reply) != 3:
        raise ValueError(f"not a candle_backfill reply: {reply!r:.200}")
    return Backfill(int(reply[0]), [_bytes(b) for b in reply[1]], [_bytes(b) for b in reply[2]])


async def read_backfill(aclient, symbol: str, interval: str, count: int) -> Backfill:
    """The last ``count`` finals and the open candle(s) of SYMBOL@INTERVAL."""
    return parse_backfill(await aclient.fcall_ro("candle_backfill", 0, symbol, interval, count))


@dataclass(frozen=True, slots=True)
class StreamState:
    """What a new leader takes over for one stream."""
    watermark: tuple[str, int] | None
    last_final: tuple[int, bytes] | None     # (start, body) of the newest final
    states: list[bytes]                      # Candle.state() of every candle kept


def parse_state(reply: Any) -> StreamState:
    w, last_start, last_body, flat = reply
    watermark = None
    if w:
        epoch, _, seq = _text(w).rpartition(":")
        watermark = (epoch, int(seq))
    last = None if int(last_start) < 0 or not last_body else (int(last_start), _bytes(last_body))
    return StreamState(watermark, last, [_bytes(flat[k + 1]) for k in range(0, len(flat), 2)])


async def read_state(aclient, symbol: str, interval: str) -> StreamState:
    return parse_state(await aclient.fcall_ro("candle_state", 0, symbol, interval))


async def candle_symbols(aclient) -> list[str]:
    return sorted(_text(s) for s in await aclient.smembers(SYMBOLS_KEY))
