"""Every use of picows internals, in one place (its compiled half is
gateway/_picows_adapter.pxd).

Matches picows 2.3.1 exactly, the version pyproject.toml pins: the fast path
binds to its C layout, and the server below calls picows' WSProtocol with
the positional arguments that version's ``ws_create_server`` passes. On a
picows upgrade, re-read its ``picows.pyx`` for these and both halves of this
adapter first; ``check_version()`` refuses to start on any other version.

Why the server is built here rather than with ``ws_create_server``: picows
calls the listener factory with the upgrade request only, and per-IP limits
need the peer address. Building WSProtocol directly gives a per-connection
factory that can read its own transport. It also hands picows a
LoggerAdapter rather than a Logger: given a Logger, picows makes a child
Logger object per connection, which idle connections pay for in memory.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import picows
from picows import WSAutoPingStrategy
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stub

PICOWS_VERSION = "2.3.1"


def check_version() -> None:
    """Raise RuntimeError unless the installed picows is the one this adapter matches."""
    installed = getattr(picows, "__version__", None)
    if installed != PICOWS_VERSION:
        raise RuntimeError(f"picows {installed} is installed; this gateway is built for "
                           f"picows {PICOWS_VERSION} exactly (see pyproject.toml)")


def peer_ip(proto) -> str:
    """The client address of a server-side WSProtocol, as text ("local" for a Unix socket)."""
    peer = proto.transport.underlying_transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else "local"


async def create_server(make_listener: Callable[[Any, str], Any], host: str, port: int, *,
                        ssl=None, max_frame_size: int, read_buffer_init_size: int,
                        handshake_timeout: float = 5.0, backlog: int = 4096,
                        reuse_port: bool = False) -> asyncio.Server:
    """``make_listener(request, peer_ip)`` returns what a picows factory may return."""
    check_version()
    loop = asyncio.get_running_loop()
    logger = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

    def protocol_factory():
        proto = None

        def listener_factory(request):
            return make_listener(request, peer_ip(proto))

        proto = WSProtocol(
            None, None, False,          # host+port, path, is_client_side
            listener_factory,
            logger,
            True,                       # disconnect_on_exception
            handshake_timeout,
            False, 20, 20,              # auto ping off: the gateway's heartbeat does it
            WSAutoPingStrategy.PING_WHEN_IDLE,
            False,                      # auto pong off: gateway.frames answers pings, so
                                        # that every write goes through the listener
            max_frame_size,
            None,                       # extra headers
            read_buffer_init_size,
        )
        return proto

    # asyncio's default backlog of 100 overflows when clients reconnect all
    # at once, and every dropped SYN waits 1 s, 3 s... to be retried; the
    # kernel caps this at net.core.somaxconn (the gateway's WS_BACKLOG).
    return await loop.create_server(protocol_factory, host, port, ssl=ssl, backlog=backlog,
                                    reuse_port=reuse_port or None)
