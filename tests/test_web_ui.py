"""The web page (WS_WEB_UI=on) in a real headless Chromium, against real
gateway, candle service and redis-server processes.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/test.sh);
Playwright only drives it and never downloads a browser. What the page
delivered is read from its test hook, ``window.gatewayPage``.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest
import redis
from conftest import ROOT, RedisServer

from gateway import sequencing
from gateway._testbase.net import http_get
from gateway._testbase.process import CandleProcess, GatewayProcess

pytestmark = pytest.mark.slow   # a browser and several processes per test

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "web-ui.png"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the [test] extra brings it
    sync_playwright = None

if sync_playwright is None or not os.path.exists(CHROMIUM):
    pytestmark = [pytestmark, pytest.mark.skip(
        reason=f"needs playwright (pip) and {CHROMIUM} (apt-get install chromium; scripts/test.sh does)")]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium for the module, with a fresh profile; each test opens its pages."""
    assert sync_playwright is not None
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1360, "height": 860})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def redis_srv():
    server = RedisServer(extra=["--stream-node-max-entries", "4"]).start()
    yield server
    server.stop()


@pytest.fixture
def processes():
    """Gateway and candle service processes of one test, stopped after it."""
    started: list[GatewayProcess] = []
    yield started
    for proc in started:
        proc.close()


def start_gateway(processes, redis_url, port=None, **settings) -> GatewayProcess:
    settings.setdefault("WS_WEB_UI", "on")
    gw = GatewayProcess(redis_url, port=port, cwd=ROOT, **settings).start()
    processes.append(gw)
    gw.wait_ready()
    return gw


class Page:
    """A browser tab on the gateway's page, with its console errors."""

    def __init__(self, context, port: int, query: str):
        self.page = context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        self.page.goto(f"http://127.0.0.1:{port}/?{query}")

    def wait(self, expression: str, arg=None, timeout: float = 20) -> None:
        self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000)

    def wait_live(self, timeout: float = 20) -> None:
        self.wait("document.getElementById('state').dataset.state === 'open'", timeout=timeout)

    def delivered(self, symbol: str) -> list[tuple[str, int]]:
        return [tuple(x) for x in self.page.evaluate(
            "s => gatewayPage.received.filter(r => r.symbol === s).map(r => [r.epoch, r.seq])", symbol)]

    def gaps(self) -> list[dict]:
        return self.page.evaluate("() => gatewayPage.gaps.map(g => ({...g}))")

    def unexpected_errors(self) -> list[str]:
        # A refused WebSocket connection (the gateway is down) is logged by
        # Chromium itself; anything else is the page's fault.
        return [e for e in self.console_errors if not e.startswith("WebSocket connection to")]

    def close(self) -> None:
        self.page.close()


class Publisher(threading.Thread):
    """Sequenced trades through publish_trade at about ``rate``/s over
    ``symbols``, a random walk each, until stop(); ``published`` holds
    (symbol, seq) in order."""

    EXCHANGES = ("NASDAQ", "NYSE", "ARCA", "BATS")

    def __init__(self, port: int, symbols: tuple[str, ...], rate: float, seed: int = 1):
        super().__init__(daemon=True)
        self.client = redis.Redis(port=port)
        self.symbols, self.rate = symbols, rate
        self.rng = random.Random(seed)
        self.price = {s: round(self.rng.uniform(80, 400), 2) for s in symbols}
        self.published: list[tuple[str, int]] = []
        self._halt = threading.Event()

    def publish_one(self, symbol: str) -> int:
        self.price[symbol] = round(max(1.0, self.price[symbol] * (1 + self.rng.gauss(0, 0.0015))), 2)
        seq = int(sequencing.publish_trade(self.client, symbol, {
            "symbol": symbol, "price": self.price[symbol], "volume": self.rng.choice((10, 50, 100, 200, 500)),
            "timestamp": int(time.time() * 1000), "conditions": ["@"], "exchange": self.rng.choice(self.EXCHANGES)}))
        self.published.append((symbol, seq))
        return seq

    def run(self):
        while not self._halt.is_set():
            self.publish_one(self.rng.choice(self.symbols))
            self._halt.wait(self.rng.expovariate(self.rate))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.client.close()

    def seqs(self, symbol: str) -> list[int]:
        return [seq for s, seq in self.published if s == symbol]


def epoch_of(r: RedisServer, symbol: str) -> str:
    return r.client().hget(sequencing.meta_key(symbol), "epoch").decode()


# --- serving ---------------------------------------------------------------------------

def test_page_and_files_are_served_with_their_types(redis_srv, processes):
    gw = start_gateway(processes, redis_srv.url)
    status, headers, body = http_get(gw.port, "/?symbols=AAPL")
    assert status == 200 and body.startswith(b"<!doctype html>")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["cache-control"] == "no-cache" and headers["x-content-type-options"] == "nosniff"
    for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/gateway-client.js", "text/javascript"),
                       ("/ui/style.css", "text/css"),
                       ("/ui/vendor/lightweight-charts.standalone.production.js", "text/javascript")):
        status, headers, body = http_get(gw.port, path)
        assert status == 200 and headers["content-type"].startswith(kind), path
        assert body == (ROOT / "gateway" / "web" / path.removeprefix("/ui/")).read_bytes()
    for path in ("/ui/../x", "/ui/../config.py", "/ui/%2e%2e/endpoints.py", "/ui/", "/ui/vendor/",
                 "/ui/vendor/LICENSE", "/ui/index.html", "/ui//app.js", "/ui/app.js/"):
        status, headers, body = http_get(gw.port, path)
        assert status == 404 and headers["content-type"] == "application/json", path
        assert body == b'{"type":"error","message":"not found"}'
    # The monitoring endpoints are unchanged.
    assert http_get(gw.port, "/healthz")[0] == 200


def test_web_ui_off_serves_no_page(redis_srv, processes):
    gw = start_gateway(processes, redis_srv.url, WS_WEB_UI="off")
    for path in ("/", "/ui/app.js", "/ui/../x"):
        status, headers, body = http_get(gw.port, path)
        # As before the page existed: / is only a WebSocket endpoint.
        assert status == 400 and b"WebSocket" in body and b"<html" not in body, path


# --- the page in Chromium ------------------------------------------------------------------

def test_page_shows_trades_and_candles(browser, redis_srv, processes, tmp_path):
    symbols = ("AAPL", "MSFT", "NVDA")
    gw = start_gateway(processes, redis_srv.url, WS_CANDLE_INTERVALS="1s")
    candles = CandleProcess(redis_srv.url, cwd=ROOT, WS_CANDLE_INTERVALS="1s", WS_CANDLE_GRACE="0.3",
                            WS_CANDLE_UPDATE_MS="100").start()
    processes.append(candles)
    candles.wait_role("leader")
    page = Page(browser, gw.port, "symbols=AAPL,MSFT,NVDA,AAPL@1s")
    page.wait_live()
    # One subscribe for the streams of the URL, answered.
    page.wait("gatewayPage.client.wanted.length === 4 && gatewayPage.states.some(s => s.state === 'open')")
    assert page.page.evaluate("gatewayPage.client.maxSymbols") == 5
    pub = Publisher(redis_srv.port, symbols, rate=40)
    time.sleep(0.3)    # the subscribe is in before the first trade
    pub.start()
    try:
        page.wait("gatewayPage.chartBars() >= 10 && "
                  "gatewayPage.candles.filter(c => c.state === 'final').length >= 6", timeout=40)
    finally:
        pub.stop()
    for s in symbols:
        expected = pub.seqs(s)
        page.wait("([s, n]) => gatewayPage.received.filter(r => r.symbol === s).length >= n", [s, len(expected)])
        epoch = epoch_of(redis_srv, s)
        assert page.delivered(s) == [(epoch, seq) for seq in expected]
    # The tape shows them, newest first; the streams table the last seq and a lag.
    first_row = page.page.locator("#tape tbody tr").first.locator("td").all_inner_texts()
    assert first_row[1] in symbols and first_row[4] in Publisher.EXCHANGES
    row = page.page.locator("#symbol-table tr[data-symbol=AAPL] td").all_inner_texts()
    assert row[2] == str(pub.seqs("AAPL")[-1]) and row[4].endswith(" ms")
    # Each final once, in order; the chart holds every interval of the stream.
    finals = page.page.evaluate("gatewayPage.candles.filter(c => c.state === 'final').map(c => c.start)")
    assert finals == sorted(set(finals))
    assert page.page.evaluate("gatewayPage.chartStream()") == "AAPL@1s"
    assert page.page.locator("#chart canvas").count() > 0
    assert page.page.locator("#gap-count").inner_text() == "0"
    assert page.console_errors == []
    # Chromium negotiated permessage-deflate: every trade above came compressed
    # (RFC 7692 BFINAL blocks, one inflater kept across messages by the browser).
    metrics = http_get(gw.port, "/metrics")[2].decode()
    compressed = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("gateway_compressed_messages_total "))
    assert compressed >= sum(len(pub.seqs(s)) for s in symbols)

    shot = tmp_path / "web-ui.png"
    page.page.mouse.move(5, 5)                      # no crosshair over the chart
    page.page.screenshot(path=str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 20_000 < len(data) < 5_000_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
    page.close()
    assert not gw.tracebacks() and not candles.tracebacks()


def test_page_refuses_more_streams_than_the_limit(browser, redis_srv, processes):
    gw = start_gateway(processes, redis_srv.url, WS_MAX_SYMBOLS="2")
    page = Page(browser, gw.port, "symbols=AAPL")
    page.wait_live()
    page.page.fill("#symbols", "AAPL, MSFT, TSLA")
    page.page.click("button[type=submit]")
    page.wait("!document.getElementById('message').hidden")
    assert "At most 2 streams" in page.page.inner_text("#message")
    # The gateway's own refusal is shown too (an interval it does not serve).
    page.page.fill("#symbols", "AAPL, AAPL@7m")
    page.page.click("button[type=submit]")
    page.wait("document.getElementById('message').textContent.includes('refused')")
    assert "interval" in page.page.inner_text("#message")
    assert page.page.evaluate("gatewayPage.client.wanted") == ["AAPL"]
    assert page.console_errors == []
    page.close()


def test_gateway_restart_loses_and_repeats_nothing(browser, redis_srv, processes):
    symbols = ("RSTA", "RSTB")
    gw = start_gateway(processes, redis_srv.url)
    port = gw.port
    page = Page(browser, port, "symbols=RSTA,RSTB&backoffMax=1")
    page.wait_live()
    time.sleep(0.3)
    pub = Publisher(redis_srv.port, symbols, rate=60, seed=2)
    pub.start()
    try:
        page.wait("gatewayPage.received.length >= 40")
        assert gw.stop() == 0                       # close 1001 to the page, then gone
        page.wait("document.getElementById('state').dataset.state !== 'open'")
        down_from = len(pub.published)
        time.sleep(1.0)                             # trades go on while no gateway is there
        assert len(pub.published) > down_from + 20
        start_gateway(processes, redis_srv.url, port=port)
        page.wait("gatewayPage.states.filter(s => s.state === 'open').length >= 2", timeout=30)
        time.sleep(1.0)
    finally:
        pub.stop()
    for s in symbols:
        expected = pub.seqs(s)
        page.wait("([s, n]) => gatewayPage.received.filter(r => r.symbol === s).length >= n", [s, len(expected)])
        time.sleep(0.2)                             # anything repeated would be here by now
        epoch = epoch_of(redis_srv, s)
        assert page.delivered(s) == [(epoch, seq) for seq in expected], s
    assert page.gaps() == []
    assert page.page.evaluate("gatewayPage.client.duplicates") >= 0
    assert page.unexpected_errors() == []
    page.close()


def test_page_shows_a_trimmed_gap_with_its_range(browser, redis_srv, processes):
    gw = start_gateway(processes, redis_srv.url, WS_HISTORY_SIZE="5")
    port = gw.port
    page = Page(browser, port, "symbols=GAPX&backoffMax=1")
    page.wait_live()
    time.sleep(0.3)
    pub = Publisher(redis_srv.port, ("GAPX",), rate=1)
    for _ in range(10):
        pub.publish_one("GAPX")
    page.wait("gatewayPage.received.length === 10")
    assert gw.stop() == 0
    for _ in range(60):                             # far more than the history keeps
        pub.publish_one("GAPX")
    first_retained = int(redis_srv.client().xrange(sequencing.history_key("GAPX"), count=1)[0][0]
                         .split(b"-")[0])
    assert first_retained > 11
    start_gateway(processes, redis_srv.url, port=port, WS_HISTORY_SIZE="5")
    page.wait("n => gatewayPage.received.length === 10 + (70 - n + 1)", first_retained, timeout=30)
    epoch = epoch_of(redis_srv, "GAPX")
    assert page.gaps() == [{"symbol": "GAPX", "epoch": epoch, "from": 11, "to": first_retained - 1,
                            "reason": "trimmed", "source": "server"}]
    assert page.delivered("GAPX") == [(epoch, s) for s in [*range(1, 11), *range(first_retained, 71)]]
    # Shown plainly: the range, how many trades, the reason.
    item = page.page.locator("#gaps li.gap").first
    assert item.get_attribute("data-from") == "11"
    assert item.get_attribute("data-to") == str(first_retained - 1)
    assert item.get_attribute("data-reason") == "trimmed"
    text = item.inner_text()
    assert f"seq 11–{first_retained - 1}" in text and f"({first_retained - 11} trades)" in text
    assert page.page.locator("#gap-count").inner_text() == "1"
    assert page.unexpected_errors() == []
    pub.client.close()
    page.close()


# --- gateway-client.js on its own, in Chromium, against a scripted socket ------------------

CLIENT_SCRIPT = """
async () => {
  const { GatewayClient } = await import("/ui/gateway-client.js");
  const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
  const sockets = [];
  class ScriptedSocket {
    constructor(url) {
      this.url = url; this.readyState = 0; this.sent = []; sockets.push(this);
      setTimeout(() => { this.readyState = 1; if (this.onopen) this.onopen(); }, 0);
    }
    send(text) { this.sent.push(JSON.parse(text)); }
    close(code, reason) { this.readyState = 3; }
    push(obj) { this.onmessage({ data: JSON.stringify(obj) }); }
    drop(code, reason) { this.readyState = 3; this.onclose({ code, reason }); }
  }
  const welcome = (id) => ({ type: "success", message: "Connected to WebSocket Gateway",
                             data: { connectionId: id, serverId: "s", maxSymbolsPerConnection: 5 } });
  const ok = { type: "success", data: {} };
  const trade = (seq, epoch) => ({ type: "trade", data: { symbol: "AAA", price: 1, timestamp: 1 }, seq, epoch });
  const candle = (start, close, state) => ({ type: "candle", data: { symbol: "AAA", interval: "1m", start,
      open: 1, high: 2, low: 1, close, volume: 5, trades: 2, state } });

  const client = new GatewayClient("ws://gw.example/", { symbols: ["aaa", "AAA@1m"], token: "T.K.N",
      WebSocket: ScriptedSocket, backoffInitial: 0.01, backoffMax: 0.02 });
  const events = [];
  for (const type of ["trade", "gap", "candle", "error"]) {
    client.addEventListener(type, (e) => events.push([type, e.detail.seq ?? e.detail.start ?? null,
      e.detail.reason ?? e.detail.state ?? null, e.detail.from ?? null, e.detail.to ?? null]));
  }
  const started = client.start();
  await tick(5);
  const first = sockets[0];
  first.push(welcome("c1"));
  await started;
  first.push(ok);                                       // the subscribe's reply
  for (const [seq, epoch] of [[1, "E1"], [2, "E1"], [2, "E1"], [5, "E1"], [3, "E2"]]) first.push(trade(seq, epoch));
  first.push(candle(60000, 1, "final"));
  first.push(candle(120000, 1, "final"));
  first.push(candle(180000, 1, "update"));
  const pong = client.ping();
  first.push({ type: "pong", timestamp: 1 });
  const pongReply = await pong;
  first.drop(1001, "server shutting down");             // reconnects at once
  await tick(5);
  const second = sockets[1];
  second.push(welcome("c2"));
  await tick();
  second.push(ok);
  second.push({ type: "gap", data: { symbol: "AAA", epoch: "E2", from: 4, to: 6, reason: "trimmed" } });
  second.push(trade(7, "E2"));
  second.push(trade(7, "E2"));
  second.push(candle(60000, 1, "final"));               // backfill: already delivered, dropped
  second.push(candle(120000, 9, "final"));              // changed meanwhile: a correction
  second.push(candle(180000, 1, "update"));
  second.push(candle(300000, 1, "final"));              // 180000 and 240000 never came as finals
  const refused = client.subscribe(["BBB"]);
  second.push({ type: "error", message: "Cannot subscribe: would exceed maximum of 5 symbols per connection" });
  let refusal = null;
  try { await refused; } catch (err) { refusal = err.message; }
  const wanted = [...client.wanted];
  client.close();
  return { urls: sockets.map((s) => s.url), sent: sockets.map((s) => s.sent), events, pong: pongReply.type,
           refusal, wanted, duplicates: client.duplicates };
}
"""


def test_client_module_resumes_deduplicates_and_reports_gaps(browser, redis_srv, processes):
    gw = start_gateway(processes, redis_srv.url)
    page = Page(browser, gw.port, "symbols=")
    got = page.page.evaluate(CLIENT_SCRIPT)
    assert got["urls"] == ["ws://gw.example/?token=T.K.N"] * 2
    first, second = got["sent"]
    assert first == [{"action": "subscribe", "symbols": ["AAA", "AAA@1m"]}, {"action": "ping"}]
    # The new connection resumes where delivery stopped (the epoch E2 trade seen last).
    assert second[0] == {"action": "subscribe", "symbols": ["AAA", "AAA@1m"],
                         "since": {"AAA": {"epoch": "E2", "seq": 3}}}
    assert second[1] == {"action": "subscribe", "symbols": ["BBB"]}
    assert got["events"] == [
        ["trade", 1, None, None, None], ["trade", 2, None, None, None],
        ["gap", None, "missing", 3, 4], ["trade", 5, None, None, None],
        ["gap", None, "epoch_changed", 1, 2], ["trade", 3, None, None, None],
        ["candle", 60000, "final", None, None], ["candle", 120000, "final", None, None],
        ["candle", 180000, "update", None, None],
        ["gap", None, "trimmed", 4, 6], ["trade", 7, None, None, None],
        ["candle", 120000, "correction", None, None], ["candle", 180000, "update", None, None],
        ["gap", None, "candles_missed", 180000, 240000], ["candle", 300000, "final", None, None],
    ]
    assert got["duplicates"] == 2
    assert got["pong"] == "pong"
    assert got["refusal"].startswith("Cannot subscribe")
    assert got["wanted"] == ["AAA", "AAA@1m"]     # a refused subscribe changes nothing
    assert page.console_errors == []
    page.close()
