"""Plain HTTP on the WebSocket port: /healthz, /readyz, /metrics, the web
page (WS_WEB_UI), and the answer builder the upgrade refusals share.

picows hands every request to the listener factory; a path found here is
answered with a plain HTTP response and no WebSocket session.
"""
from __future__ import annotations

import importlib.resources
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


# The web page (WS_WEB_UI=on): GET / is the page, its files are under /ui/.
# A fixed list: a request names one of these exactly or gets 404, so no path
# ever reaches the file system. Path on the wire -> (file in gateway/web, type).
WEB_PAGE = b"/"
WEB_PREFIX = b"/ui/"
WEB_FILES: dict[bytes, tuple[str, str]] = {
    WEB_PAGE: ("index.html", "text/html; charset=utf-8"),
    b"/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    b"/ui/gateway-client.js": ("gateway-client.js", "text/javascript; charset=utf-8"),
    b"/ui/style.css": ("style.css", "text/css; charset=utf-8"),
    b"/ui/vendor/lightweight-charts.standalone.production.js": (
        "vendor/lightweight-charts.standalone.production.js", "text/javascript; charset=utf-8"),
}
WEB_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # The page's URL may carry ?token=<JWT>: never pass it on as a referrer.
    "Referrer-Policy": "no-referrer",
}


def load_web_files() -> dict[bytes, tuple[bytes, dict[str, str]]]:
    """Every file of the page read once: path -> (body, headers).

    Raises OSError when one is missing (a broken install)."""
    web = importlib.resources.files(__package__) / "web"
    files = {}
    for path, (name, content_type) in WEB_FILES.items():
        resource = web
        for part in name.split("/"):
            resource = resource / part
        files[path] = (resource.read_bytes(), {"Content-Type": content_type, **WEB_HEADERS})
    return files


def web_answer(body: bytes, headers: dict[str, str]) -> WSUpgradeResponseWithListener:
    # A new response each time: picows adds headers to the one it sends.
    return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(body, dict(headers)), None)


def is_upgrade(headers) -> bool:
    """True when the request asks for a WebSocket (``Upgrade: websocket``)."""
    return any(v.strip().lower() == "websocket" for v in headers.getall("Upgrade", ()))


class Endpoints:
    """``not_ready()`` returns None when the gateway is ready, else the reason.
    With ``web_ui`` the page's files are loaded now, once."""

    def __init__(self, server_id: str, not_ready: Callable[[], str | None], registry,
                 web_ui: bool = False):
        self.server_id = server_id
        self.not_ready = not_ready
        self.registry = registry
        self.routes: dict[bytes, Callable[[], WSUpgradeResponseWithListener]] = {
            b"/healthz": self.healthz, b"/readyz": self.readyz, b"/metrics": self.metrics}
        self.web = load_web_files() if web_ui else {}

    def answer(self, path: bytes, upgrade: bool = False) -> WSUpgradeResponseWithListener | None:
        """The answer for ``path`` (query string already removed), or None.

        ``upgrade``: the request asks for a WebSocket. ``/`` is then the
        WebSocket endpoint, as it is whenever the page is off."""
        route = self.routes.get(path)
        if route is not None:
            return route()
        if self.web:
            if path == WEB_PAGE:
                return None if upgrade else web_answer(*self.web[WEB_PAGE])
            if path.startswith(WEB_PREFIX):
                found = self.web.get(path)
                if found is None:
                    return http_answer(404, protocol.refusal_body("not found"), WEB_HEADERS)
                return web_answer(*found)
        return None

    def healthz(self) -> WSUpgradeResponseWithListener:
        return http_answer(200, protocol.health_body(self.server_id))

    def readyz(self) -> WSUpgradeResponseWithListener:
        reason = self.not_ready()
        return http_answer(200 if reason is None else 503, protocol.ready_body(reason))

    def metrics(self) -> WSUpgradeResponseWithListener:
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_ok_response(metrics.render(self.registry),
                                                 {"Content-Type": metrics.CONTENT_TYPE}), None)
