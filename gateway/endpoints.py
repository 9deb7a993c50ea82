"""Plain HTTP on the WebSocket port: /healthz, /readyz, /metrics, and the
answer builder the upgrade refusals share.

picows hands every request to the listener factory; a path found here is
answered with a plain HTTP response and no WebSocket session.
"""
from __future__ import annotations

from collections.abc import Callable

import orjson
from picows import WSUpgradeResponse, WSUpgradeResponseWithListener

from . import metrics, protocol


def http_answer(status: int, body: dict, extra_headers: dict | None = None
                ) -> WSUpgradeResponseWithListener:
    """A plain HTTP answer with a JSON body to an upgrade request."""
    data = orjson.dumps(body)
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    if status == 200:
        response = WSUpgradeResponse.create_ok_response(data, headers)
    else:
        response = WSUpgradeResponse.create_error_response(status, data, headers)
    return WSUpgradeResponseWithListener(response, None)


class Endpoints:
    """``not_ready()`` returns None when the gateway is ready, else the reason."""

    def __init__(self, server_id: str, not_ready: Callable[[], str | None], registry):
        self.server_id = server_id
        self.not_ready = not_ready
        self.registry = registry
        self.routes: dict[bytes, Callable[[], WSUpgradeResponseWithListener]] = {
            b"/healthz": self.healthz, b"/readyz": self.readyz, b"/metrics": self.metrics}

    def answer(self, path: bytes) -> WSUpgradeResponseWithListener | None:
        """The answer for ``path`` (query string already removed), or None."""
        route = self.routes.get(path)
        return route() if route is not None else None

    def healthz(self) -> WSUpgradeResponseWithListener:
        return http_answer(200, protocol.health_body(self.server_id))

    def readyz(self) -> WSUpgradeResponseWithListener:
        reason = self.not_ready()
        return http_answer(200 if reason is None else 503, protocol.ready_body(reason))

    def metrics(self) -> WSUpgradeResponseWithListener:
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_ok_response(metrics.render(self.registry),
                                                 {"Content-Type": metrics.CONTENT_TYPE}), None)
