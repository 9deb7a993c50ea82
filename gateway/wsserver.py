"""The picows server, created so the listener factory knows the client address.

picows' ``ws_create_server`` calls the factory with the upgrade request
only; per-IP limits need the peer. This builds picows' WSProtocol directly
(the same arguments ``ws_create_server`` passes, for the pinned picows
version) with a per-connection factory that can read its own transport.

It also hands picows a LoggerAdapter rather than a Logger: given a Logger,
picows makes a child Logger object per connection, which idle connections
pay for in memory.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol


async def create_server(make_listener: Callable[[object, str], object], host: str, port: int, *,
                        ssl=None, max_frame_size: int, read_buffer_init_size: int,
                        handshake_timeout: float = 5.0) -> asyncio.base_events.Server:
    """``make_listener(request, peer_ip)`` returns what a picows factory may return."""
    loop = asyncio.get_running_loop()
    logger = logging.LoggerAdapter(logging.getLogger("picows.server"), {})

    def protocol_factory():
        proto = None

        def listener_factory(request):
            peer = proto.transport.underlying_transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else "local"
            return make_listener(request, ip)

        proto = WSProtocol(
            None, None, False,          # host+port, path, is_client_side
            listener_factory,
            logger,
            True,                       # disconnect_on_exception
            handshake_timeout,
            False, 20, 20,              # auto ping off: the gateway's heartbeat does it
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,                       # auto pong
            max_frame_size,
            None,                       # extra headers
            read_buffer_init_size,
        )
        return proto

    return await loop.create_server(protocol_factory, host, port, ssl=ssl)
