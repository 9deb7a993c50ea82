// The gateway's live page: a trade tape, a candle chart, per-stream lag and
// seq, connection state and gaps, all from one GatewayClient.
//
// Page URL parameters: ?symbols=AAPL,MSFT,AAPL@1m  ?chart=AAPL@1m
// ?token=<JWT> (passed on to the WebSocket URL)  ?backoffMax=<seconds>
import { GatewayClient, isCandleStream, normalizeStream } from "./gateway-client.js";

const DEFAULT_STREAMS = "AAPL,MSFT,AAPL@1m";
const TAPE_ROWS = 200;
const SLOW_LAG_MS = 1000;

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// Same host and port as the page; wss: when the page came over https.
const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/`;

function parseStreams(text) {
  return [...new Set(String(text).split(",").map((s) => normalizeStream(s)).filter(Boolean))];
}

const initial = parseStreams(params.get("symbols") ?? DEFAULT_STREAMS);
const options = { symbols: initial, token: params.get("token") || undefined };
const backoffMax = Number(params.get("backoffMax"));
if (backoffMax > 0) options.backoffMax = backoffMax;
const client = new GatewayClient(wsUrl, options);

// What the page delivered, for tests and for a look from the console.
const received = [];     // {symbol, epoch, seq} of every trade shown, in order
const gaps = [];         // every gap shown: the event's detail
const candles = [];      // {stream, start, state} of every candle message
const errors = [];       // server errors shown
const states = [];       // every state change
const bars = new Map();  // candle stream -> Map(start -> bar)
let chartStream = null;
let chart = null;
let series = null;
let lastBarTime = null;

window.gatewayPage = Object.freeze({
  client, received, gaps, candles, errors, states,
  chartStream: () => chartStream,
  chartBars: () => (chartStream && bars.has(chartStream) ? bars.get(chartStream).size : 0),
});

// --- connection state ---------------------------------------------------------
let countdown = null;

function showState(text, kind) {
  const el = $("state");
  el.textContent = text;
  el.dataset.state = kind;
}

client.addEventListener("state", (e) => {
  const d = e.detail;
  states.push(d);
  clearInterval(countdown);
  countdown = null;
  $("url").textContent = d.url || "";
  if (d.state === "connecting") {
    showState(d.attempt ? `connecting (attempt ${d.attempt + 1})` : "connecting", "connecting");
    $("conn-id").textContent = "";
  } else if (d.state === "open") {
    showState("live", "open");
    $("conn-id").textContent = d.connectionId ? `connection ${d.connectionId.slice(0, 8)} · ${d.serverId}` : "";
    showLimit();
  } else if (d.retryIn === null || d.retryIn === undefined) {
    showState(`closed${d.code ? ` (${d.code}${d.reason ? ` ${d.reason}` : ""})` : ""}`, "closed");
  } else {
    const until = Date.now() + d.retryIn * 1000;
    const tick = () => {
      const left = Math.max(0, (until - Date.now()) / 1000);
      showState(`reconnecting in ${left.toFixed(1)} s`, "reconnecting");
    };
    tick();
    countdown = setInterval(tick, 100);
  }
});

client.addEventListener("error", (e) => {
  errors.push(e.detail.message);
  showMessage(e.detail.message);
});

function showMessage(text) {
  const el = $("message");
  el.textContent = text || "";
  el.hidden = !text;
}

function showLimit() {
  const max = client.maxSymbols;
  $("limit").textContent = max ? `${client.wanted.length} of ${max} streams per connection` : "";
}

// --- streams table ---------------------------------------------------------------
const rows = new Map();   // trade symbol -> {tr, cells, trades, last}

function symbolRow(symbol) {
  let row = rows.get(symbol);
  if (row) return row;
  const tr = document.createElement("tr");
  tr.dataset.symbol = symbol;
  const cells = {};
  for (const [key, cls] of [["symbol", ""], ["price", "num"], ["seq", "num"], ["epoch", ""],
                            ["lag", "num"], ["trades", "num"]]) {
    const td = document.createElement("td");
    td.className = cls;
    tr.appendChild(td);
    cells[key] = td;
  }
  cells.symbol.textContent = symbol;
  cells.trades.textContent = "0";
  $("symbol-table").tBodies[0].appendChild(tr);
  row = { tr, cells, trades: 0, last: null };
  rows.set(symbol, row);
  return row;
}

function syncRows() {
  const want = client.wanted.filter((s) => !isCandleStream(s));
  for (const [symbol, row] of rows) {
    if (!want.includes(symbol)) {
      row.tr.remove();
      rows.delete(symbol);
    }
  }
  for (const s of want) symbolRow(s);
}

// --- trades ------------------------------------------------------------------------
const tapeBody = $("tape").tBodies[0];
let tapeCount = 0;

function fmtTime(ms) {
  if (typeof ms !== "number") return "";
  const d = new Date(ms);
  return d.toLocaleTimeString("en-GB", { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function fmtPrice(p) {
  return typeof p === "number" ? p.toFixed(2) : String(p ?? "");
}

client.addEventListener("trade", (e) => {
  const t = e.detail;
  const d = t.data;
  received.push({ symbol: t.symbol, epoch: t.epoch, seq: t.seq });
  tapeCount += 1;

  const tr = document.createElement("tr");
  tr.className = "fresh";
  const row = t.symbol ? rows.get(t.symbol) : undefined;
  const dir = row && typeof row.last === "number" && typeof d.price === "number"
    ? (d.price > row.last ? "up" : d.price < row.last ? "down" : "") : "";
  for (const [text, cls] of [[fmtTime(d.timestamp ?? t.receivedAt), ""], [t.symbol ?? "?", ""],
                             [fmtPrice(d.price), `num ${dir}`], [String(d.volume ?? ""), "num"],
                             [String(d.exchange ?? ""), ""], [t.seq === null ? "" : String(t.seq), "num"]]) {
    const td = document.createElement("td");
    td.textContent = text;
    td.className = cls;
    tr.appendChild(td);
  }
  tapeBody.insertBefore(tr, tapeBody.firstChild);
  while (tapeBody.rows.length > TAPE_ROWS) tapeBody.deleteRow(-1);
  $("tape-count").textContent = `${tapeCount} received`;

  if (row) {
    row.trades += 1;
    row.cells.price.textContent = fmtPrice(d.price);
    row.cells.price.className = `num ${dir}`;
    if (typeof d.price === "number") row.last = d.price;
    row.cells.seq.textContent = t.seq === null ? "–" : String(t.seq);
    row.cells.epoch.textContent = t.epoch ?? "–";
    row.cells.trades.textContent = String(row.trades);
    if (typeof d.timestamp === "number") {
      // Receive time minus the trade's own timestamp: feed, Redis, gateway and network together.
      const lag = t.receivedAt - d.timestamp;
      row.cells.lag.textContent = `${lag} ms`;
      row.cells.lag.className = lag > SLOW_LAG_MS ? "num slow" : "num";
    }
  }
});

// --- gaps ----------------------------------------------------------------------------
client.addEventListener("gap", (e) => {
  const g = e.detail;
  gaps.push(g);
  const list = $("gaps");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  const li = document.createElement("li");
  li.className = "gap";
  for (const key of ["symbol", "epoch", "from", "to", "reason", "skipped", "source"]) {
    if (g[key] !== undefined && g[key] !== null) li.dataset[key] = String(g[key]);
  }
  const what = document.createElement("div");
  what.className = "what";
  let range = "";
  let count = "";
  if (g.reason === "candles_missed") {
    range = ` finals of ${fmtTime(g.from)}–${fmtTime(g.to)}`;      // interval starts, not seqs
  } else if (g.from === 0 && g.to === 0) {
    range = " (no trade of the new epoch lost)";
  } else if (typeof g.from === "number") {
    range = g.to === 0 && g.reason !== "epoch_changed" ? ` from seq ${g.from}` : ` seq ${g.from}–${g.to}`;
    if (g.to >= g.from) count = ` (${g.to - g.from + 1} trades)`;
  } else if (typeof g.skipped === "number") {
    range = ` ${g.skipped} skipped`;
  }
  what.textContent = `${g.symbol ?? "?"}${range}${count}: ${g.reason ?? "gap"}`;
  const detail = document.createElement("div");
  detail.className = "detail";
  detail.textContent = `${g.source === "client" ? "detected by the page" : "gateway notice"}` +
    `${g.epoch ? ` · epoch ${g.epoch}` : ""} · ${fmtTime(Date.now())}`;
  li.append(what, detail);
  list.insertBefore(li, list.firstChild);
  const badge = $("gap-count");
  badge.textContent = String(gaps.length);
  badge.dataset.count = String(gaps.length);
});

// --- candles ---------------------------------------------------------------------------
function ensureChart() {
  if (chart || typeof LightweightCharts === "undefined") return;
  const el = $("chart");
  $("chart-empty").hidden = true;
  chart = LightweightCharts.createChart(el, {
    autoSize: true,
    layout: { background: { type: "solid", color: "#161b22" }, textColor: "#aab4c0",
              fontFamily: "system-ui, sans-serif" },
    grid: { vertLines: { color: "#20262e" }, horzLines: { color: "#20262e" } },
    rightPriceScale: { borderColor: "#262d36" },
    timeScale: { borderColor: "#262d36", timeVisible: true, secondsVisible: true },
    crosshair: { mode: 0 },
  });
  series = chart.addSeries(LightweightCharts.CandlestickSeries, {
    upColor: "#26a69a", downColor: "#ef5350", borderVisible: false,
    wickUpColor: "#26a69a", wickDownColor: "#ef5350",
  });
}

function toBar(c) {
  return { time: Math.floor(c.start / 1000), open: c.open, high: c.high, low: c.low, close: c.close };
}

function redrawChart() {
  const streams = client.wanted.filter(isCandleStream);
  if (!streams.includes(chartStream)) chartStream = streams[0] ?? null;
  $("chart-title").textContent = chartStream ? `${chartStream} (UTC)` : "";
  const select = $("chart-stream");
  select.replaceChildren(...streams.map((s) => new Option(s, s, false, s === chartStream)));
  select.disabled = streams.length === 0;
  if (!chartStream) {
    if (series) series.setData([]);
    $("chart-empty").hidden = false;
    lastBarTime = null;
    return;
  }
  ensureChart();
  if (!series) return;
  const data = [...(bars.get(chartStream) || new Map()).values()].sort((a, b) => a.time - b.time);
  series.setData(data);
  lastBarTime = data.length ? data[data.length - 1].time : null;
  followLatest();
}

// A short series fills the width; a long one keeps the latest bars in view.
function followLatest() {
  const n = chartStream && bars.has(chartStream) ? bars.get(chartStream).size : 0;
  if (n <= 80) chart.timeScale().fitContent();
  else chart.timeScale().scrollToRealTime();
}

client.addEventListener("candle", (e) => {
  const c = e.detail;
  candles.push({ stream: c.stream, start: c.start, state: c.state });
  let m = bars.get(c.stream);
  if (!m) {
    m = new Map();
    bars.set(c.stream, m);
  }
  const bar = toBar(c);
  m.set(c.start, bar);
  if (c.stream !== chartStream) {
    if (!chartStream) redrawChart();
    return;
  }
  ensureChart();
  if (!series) return;
  if (lastBarTime === null || bar.time >= lastBarTime) {
    const added = bar.time !== lastBarTime;
    series.update(bar);
    lastBarTime = bar.time;
    if (added) followLatest();
  } else {
    redrawChart();   // a correction, or a late interval before the others
  }
});

$("chart-stream").addEventListener("change", (e) => {
  chartStream = e.target.value;
  redrawChart();
});

// --- choosing streams ------------------------------------------------------------------
const input = $("symbols");
input.value = initial.join(", ");
if (params.get("chart")) chartStream = normalizeStream(params.get("chart"));

$("controls").addEventListener("submit", async (e) => {
  e.preventDefault();
  const next = parseStreams(input.value);
  const max = client.maxSymbols;
  if (max && next.length > max) {
    showMessage(`At most ${max} streams per connection on this gateway; ${next.length} given.`);
    return;
  }
  showMessage("");
  const current = [...client.wanted];
  const gone = current.filter((s) => !next.includes(s));
  const added = next.filter((s) => !current.includes(s));
  try {
    if (gone.length) await client.unsubscribe(gone);
    if (added.length) await client.subscribe(added);
  } catch (err) {
    showMessage(`The gateway refused: ${err.message}`);
  }
  for (const s of gone) bars.delete(s);
  input.value = client.wanted.join(", ");
  const url = new URL(location.href);
  url.searchParams.set("symbols", client.wanted.join(","));
  history.replaceState(null, "", url);
  syncRows();
  redrawChart();
  showLimit();
});

syncRows();
redrawChart();
client.start().catch((err) => showMessage(err.message));
