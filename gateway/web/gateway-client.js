// GatewayClient: a browser client of ws-gateway (see the README, "The web page").
//
// An ES module with no dependencies:
//
//   import { GatewayClient } from "./gateway-client.js";
//   const client = new GatewayClient("wss://md.example/", { symbols: ["AAPL", "AAPL@1m"] });
//   client.addEventListener("trade", (e) => console.log(e.detail.symbol, e.detail.data.price));
//   client.addEventListener("gap", (e) => console.warn("gap", e.detail));
//   await client.start();
//
// It reconnects by itself (exponential backoff with full jitter, the next
// URL of the list on each failure) and resumes every sequenced trade stream
// from the last trade it delivered, so each sequenced trade is delivered
// exactly once and in order, or a `gap` event says which ones never will be.
//
// Events (CustomEvent, the payload in `detail`):
//   trade  {symbol, data, seq, epoch, timestamp, receivedAt}   data: the published object
//   candle {stream, symbol, interval, start, open, high, low, close, volume, trades, state,
//           data, timestamp, receivedAt}                       state: update | final | correction
//   gap    {symbol, epoch, from, to, reason, skipped, source}  source: "server" or "client";
//                                                              the client's reasons: "missing" (a seq
//                                                              jump nobody announced), "epoch_changed",
//                                                              "candles_missed" (from/to: starts in ms)
//   state  {state: "connecting" | "open" | "closed", url, attempt, code, reason, retryIn,
//           connectionId, serverId, maxSymbols}                retryIn: seconds, or null (stopped)
//   error  {message, fatal}                                    a server error nobody asked for,
//                                                              or why the client stopped
//
// What a browser cannot do, and what this does instead:
// - It never sees the HTTP status of a refused upgrade (401 bad token, 403
//   origin, 429 limits): the socket just closes with 1006, so a refusal is
//   retried with backoff like any other failure.
// - It cannot send WebSocket pings (and does not surface the server's): a
//   connection that went silent is found with {"action":"ping"} messages.

const TOKEN_EXPIRED = "token expired";
const MUTE_CLOSE = 4000;          // our own close code for a connection that went silent

/** "aapl@1m" -> "AAPL@1m": the symbol part upper-cased, the interval as given. */
export function normalizeStream(text) {
  const s = String(text).trim();
  const at = s.indexOf("@");
  return at < 0 ? s.toUpperCase() : s.slice(0, at).toUpperCase() + s.slice(at);
}

/** A candle stream ("AAPL@1m") rather than a trade symbol. */
export function isCandleStream(stream) {
  return stream.includes("@");
}

/** "1m" -> 60000; null when not an interval. */
export function intervalMs(interval) {
  const m = /^([1-9][0-9]*)([smhd])$/.exec(String(interval));
  return m ? Number(m[1]) * { s: 1000, m: 60000, h: 3600000, d: 86400000 }[m[2]] : null;
}

function candleKey(d) {
  return JSON.stringify([d.open, d.high, d.low, d.close, d.volume, d.trades]);
}

export class GatewayClient extends EventTarget {
  /**
   * @param {string|string[]} urls  ws:// or wss:// URLs; the client moves to the next on each failure
   * @param {object} [options]
   * @param {string[]} [options.symbols]   streams to hold: "AAPL" or "AAPL@1m"
   * @param {string} [options.token]       a JWT, sent as ?token= (browsers cannot set headers)
   * @param {() => Promise<string>} [options.tokenRefresh]  a new JWT after close 1008 "token expired"
   * @param {number} [options.backoffInitial=0.1]  seconds
   * @param {number} [options.backoffMax=30]       seconds
   * @param {number} [options.muteTimeout=10]      seconds of silence before reconnecting
   * @param {number} [options.stableAfter=5]       seconds a connection must stay up to reset the backoff
   * @param {boolean} [options.resume=true]        resume sequenced trades with `since` on reconnect
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (default: the global one)
   */
  constructor(urls, options = {}) {
    super();
    this.urls = (Array.isArray(urls) ? urls : [urls]).map(String);
    if (this.urls.length === 0) throw new TypeError("GatewayClient needs at least one URL");
    this.token = options.token || null;
    this.tokenRefresh = options.tokenRefresh || null;
    this.backoffInitial = options.backoffInitial ?? 0.1;
    this.backoffMax = options.backoffMax ?? 30;
    this.muteTimeout = options.muteTimeout ?? 10;
    this.stableAfter = options.stableAfter ?? 5;
    this.resume = options.resume ?? true;
    this.WebSocketClass = options.WebSocket || globalThis.WebSocket;

    this.wanted = [];                 // streams to hold, in subscription order
    this._addWanted(options.symbols || []);
    this.points = new Map();          // trade symbol -> {epoch, seq} of the last sequenced trade delivered
    this.finals = new Map();          // candle stream -> {last: start, byStart: Map(start -> values)}
    this.leaving = new Map();         // stream -> unsubscribes not yet answered (drop what is in flight)
    this.duplicates = 0;              // sequenced trades dropped as already delivered

    this.ws = null;
    this.url = null;
    this.urlIndex = 0;
    this.attempt = 0;                 // failures since the last stable connection
    this.quickRetryUsed = false;      // 1001 reconnects at once only the first time
    this.state = "idle";
    this.connectionId = null;
    this.serverId = null;
    this.maxSymbols = null;
    this.stopped = true;

    this._pending = [];               // FIFO of requests awaiting their reply: {kind, resolve, reject, ...}
    this._waitingForOpen = [];        // subscribe() calls settled by the next connection's subscribe
    this._welcomed = false;
    this._openedAt = 0;
    this._lastReceived = 0;
    this._probeSent = false;
    this._muteTimer = null;
    this._retryTimer = null;
    this._started = null;             // {resolve, reject} of start(), until the first welcome
  }

  // --- public API ----------------------------------------------------------

  /** Connect (and keep reconnecting). Resolves with the first welcome message. */
  start() {
    if (!this.stopped) return Promise.resolve(this.welcome);
    this.stopped = false;
    const started = new Promise((resolve, reject) => { this._started = { resolve, reject }; });
    this._connect();
    return started;
  }

  /** Stop for good: close the connection (1000) and reject whatever waits. */
  close() {
    this.stopped = true;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this.ws;
    this._dropSocket();
    if (ws) {
      try { ws.close(1000, "client closing"); } catch { /* already closed */ }
    }
    this._failWaiting(new Error("client closed"));
    if (this._started) {
      this._started.reject(new Error("client closed"));
      this._started = null;
    }
    this._setState("closed", { code: 1000, reason: "client closing", retryIn: null });
    return Promise.resolve();
  }

  /**
   * Add streams. Resolves with the server's `success` reply, rejects with
   * its `error` message (the server then changed nothing, and neither does
   * the client). While disconnected, the streams are subscribed with the
   * next connection and the promise settles with that reply.
   */
  subscribe(symbols) {
    const list = this._list(symbols);
    const added = this._addWanted(list);
    return new Promise((resolve, reject) => {
      const waiter = { kind: "subscribe", added, resolve, reject };
      if (this._isOpen()) {
        const message = { action: "subscribe", symbols: list };
        const since = this._since(list);
        if (since) message.since = since;
        this._request(message, waiter);
      } else {
        this._waitingForOpen.push(waiter);
      }
    });
  }

  /** Drop streams; their resume points are forgotten. Resolves with the reply. */
  unsubscribe(symbols) {
    const list = this._list(symbols);
    this.wanted = this.wanted.filter((s) => !list.includes(s));
    for (const s of list) {
      this.points.delete(s);
      this.finals.delete(s);
    }
    if (!this._isOpen()) {
      // Nothing to ask a server: the next connection simply leaves them out.
      return Promise.resolve({ type: "success", message: "unsubscribed while disconnected",
                               data: { unsubscribed: list, currentSubscriptions: [...this.wanted] } });
    }
    for (const s of list) this.leaving.set(s, (this.leaving.get(s) || 0) + 1);
    return new Promise((resolve, reject) => {
      this._request({ action: "unsubscribe", symbols: list },
                    { kind: "unsubscribe", symbols: list, resolve, reject });
    });
  }

  /** {"action":"ping"}: resolves with the `pong`. */
  ping() {
    if (!this._isOpen()) return Promise.reject(new Error("not connected"));
    return new Promise((resolve, reject) => {
      this._request({ action: "ping" }, { kind: "ping", resolve, reject });
    });
  }

  // --- connection ----------------------------------------------------------

  _connect() {
    if (this.stopped) return;
    this._retryTimer = null;
    this.url = this.urls[this.urlIndex % this.urls.length];
    this._welcomed = false;
    this._openedAt = 0;
    this._setState("connecting", { url: this.url, attempt: this.attempt });
    let ws;
    try {
      ws = new this.WebSocketClass(this._withToken(this.url));
    } catch (err) {
      // A malformed URL: nothing to retry with on this one.
      this._emit("error", { message: `cannot connect to ${this.url}: ${err.message}`, fatal: false });
      this._scheduleRetry({ code: 1006, reason: String(err.message) });
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this._openedAt = Date.now();
      this._lastReceived = Date.now();
      this._startMuteTimer();
    };
    ws.onmessage = (event) => {
      if (this.ws === ws) this._onMessage(event.data);
    };
    // A refused upgrade (401, 403, 429) reaches a browser as an error and
    // close 1006, never as its HTTP status: it is retried like any failure.
    ws.onerror = () => {};
    ws.onclose = (event) => {
      if (this.ws === ws) this._onClosed(event.code, event.reason);
    };
  }

  _withToken(url) {
    if (!this.token) return url;
    const u = new URL(url);
    u.searchParams.set("token", this.token);
    return u.toString();
  }

  _dropSocket() {
    const ws = this.ws;
    this.ws = null;
    clearInterval(this._muteTimer);
    this._muteTimer = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    }
    return ws;
  }

  _onClosed(code, reason) {
    const wasStable = this._openedAt > 0 && Date.now() - this._openedAt >= this.stableAfter * 1000;
    this._dropSocket();
    this.connectionId = null;
    // Replies that will never come. Subscribes are made again by the next
    // connection's subscribe, which settles them; the rest fail.
    const pending = this._pending;
    this._pending = [];
    this.leaving.clear();
    for (const p of pending) {
      if (p.kind === "subscribe") this._waitingForOpen.push(p);
      else if (p.kind === "resubscribe") this._waitingForOpen.push(...p.waiters);
      else if (p.reject) p.reject(new Error(`connection closed (${code})`));
    }
    if (this.stopped) return;
    if (wasStable) {
      this.attempt = 0;
      this.quickRetryUsed = false;
    }
    if (code === 1008 && reason === TOKEN_EXPIRED) {
      this._renewToken(code, reason);
      return;
    }
    this._scheduleRetry({ code, reason });
  }

  async _renewToken(code, reason) {
    if (!this.tokenRefresh) {
      this._stopWith(`the server closed the connection: ${TOKEN_EXPIRED}`, code, reason);
      return;
    }
    this._setState("closed", { code, reason, url: this.url, retryIn: 0 });
    try {
      this.token = await this.tokenRefresh();
    } catch (err) {
      this._stopWith(`token refresh failed: ${err && err.message ? err.message : err}`, code, reason);
      return;
    }
    if (!this.stopped) this._connect();
  }

  _stopWith(message, code, reason) {
    this.stopped = true;
    this._failWaiting(new Error(message));
    if (this._started) {
      this._started.reject(new Error(message));
      this._started = null;
    }
    this._setState("closed", { code, reason, url: this.url, retryIn: null });
    this._emit("error", { message, fatal: true });
  }

  _scheduleRetry({ code, reason }) {
    // Each failure moves to the next URL (a single URL: the same one again).
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
    let delay;
    if (code === 1001 && !this.quickRetryUsed) {
      // The server is going away (shutdown, restart): another one, or the
      // same one back, is likely there at once.
      this.quickRetryUsed = true;
      delay = 0;
    } else {
      // Full jitter: anywhere in [0, min(max, initial * 2^attempt)].
      const cap = Math.min(this.backoffMax, this.backoffInitial * 2 ** this.attempt);
      delay = Math.random() * cap;
      this.attempt += 1;
    }
    this._setState("closed", { code, reason, url: this.url, retryIn: delay, attempt: this.attempt });
    this._retryTimer = setTimeout(() => this._connect(), delay * 1000);
  }

  // Browsers cannot send WebSocket pings: after muteTimeout/2 of silence a
  // {"action":"ping"} asks for a pong; still nothing by muteTimeout, and the
  // connection is given up and made again.
  _startMuteTimer() {
    clearInterval(this._muteTimer);
    this._probeSent = false;
    const tick = Math.max(50, (this.muteTimeout * 1000) / 8);
    this._muteTimer = setInterval(() => this._checkMute(), tick);
  }

  _checkMute() {
    const silent = Date.now() - this._lastReceived;
    if (silent >= this.muteTimeout * 1000) {
      const ws = this._dropSocket();
      // The close handshake may never finish on a dead connection: do not wait for it.
      if (ws) {
        try { ws.close(MUTE_CLOSE, "no message from the server"); } catch { /* ignore */ }
      }
      this.ws = null;
      this._onClosed(MUTE_CLOSE, `nothing received for ${this.muteTimeout} s`);
    } else if (silent >= (this.muteTimeout * 1000) / 2 && !this._probeSent && this._welcomed) {
      this._probeSent = true;
      this._request({ action: "ping" }, { kind: "probe" });
    }
  }

  // --- requests and replies --------------------------------------------------

  _isOpen() {
    return this.ws !== null && this._welcomed && this.ws.readyState === 1;
  }

  _request(message, waiter) {
    // The server answers control messages in order, one reply each.
    this._pending.push(waiter);
    this.ws.send(JSON.stringify(message));
  }

  _onMessage(text) {
    this._lastReceived = Date.now();
    this._probeSent = false;
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this._emit("error", { message: "the server sent a message that is not JSON", fatal: false });
      return;
    }
    switch (msg.type) {
      case "trade": this._onTrade(msg); break;
      case "candle": this._onCandle(msg); break;
      case "gap": this._onGap(msg.data || {}); break;
      case "success":
      case "pong":
      case "error":
        if (!this._welcomed && msg.type === "success") this._onWelcome(msg);
        else this._onReply(msg);
        break;
      default: break;   // a message type this client does not know yet
    }
  }

  _onWelcome(msg) {
    const data = msg.data || {};
    this._welcomed = true;
    this.welcome = msg;
    this.connectionId = data.connectionId || null;
    this.serverId = data.serverId || null;
    this.maxSymbols = data.maxSymbolsPerConnection ?? null;
    this._setState("open", { url: this.url, connectionId: this.connectionId, serverId: this.serverId,
                             maxSymbols: this.maxSymbols });
    if (this._started) {
      this._started.resolve(msg);
      this._started = null;
    }
    for (const f of this.finals.values()) f.resumed = true;
    // One subscribe for every wanted stream, resuming trades where delivery stopped.
    const waiters = this._waitingForOpen;
    this._waitingForOpen = [];
    if (this.wanted.length === 0) {
      for (const w of waiters) w.resolve({ type: "success", data: { subscribed: [], currentSubscriptions: [] } });
      return;
    }
    const message = { action: "subscribe", symbols: [...this.wanted] };
    const since = this._since(this.wanted);
    if (since) message.since = since;
    this._request(message, { kind: "resubscribe", waiters });
  }

  _onReply(msg) {
    const waiter = this._pending.shift();
    if (!waiter) {
      // Nothing asked for it: an error the server volunteered.
      if (msg.type === "error") this._emit("error", { message: msg.message, fatal: false });
      return;
    }
    if (waiter.kind === "unsubscribe") {
      for (const s of waiter.symbols) {
        const n = (this.leaving.get(s) || 1) - 1;
        if (n > 0) this.leaving.set(s, n); else this.leaving.delete(s);
      }
    }
    if (msg.type === "error") {
      const err = new Error(msg.message);
      err.reply = msg;
      if (waiter.kind === "subscribe") this._dropWanted(waiter.added);
      if (waiter.kind === "resubscribe") {
        // The new connection refused what the old one held (a lower limit,
        // say): report it; the streams stay wanted for the next connection.
        this._emit("error", { message: msg.message, fatal: false });
        for (const w of waiter.waiters) {
          this._dropWanted(w.added);
          w.reject(err);
        }
        return;
      }
      if (waiter.kind === "probe") return;
      waiter.reject(err);
      return;
    }
    if (waiter.kind === "resubscribe") {
      for (const w of waiter.waiters) w.resolve(msg);
      return;
    }
    if (waiter.resolve) waiter.resolve(msg);
  }

  _failWaiting(err) {
    const all = [...this._pending, ...this._waitingForOpen];
    this._pending = [];
    this._waitingForOpen = [];
    for (const w of all) {
      if (w.kind === "resubscribe") w.waiters.forEach((x) => x.reject(err));
      else if (w.reject) w.reject(err);
    }
  }

  // --- streams -----------------------------------------------------------------

  _list(symbols) {
    const list = (Array.isArray(symbols) ? symbols : [symbols]).map(normalizeStream).filter(Boolean);
    return [...new Set(list)];
  }

  _addWanted(list) {
    const added = [];
    for (const s of this._list(list)) {
      if (!this.wanted.includes(s)) {
        this.wanted.push(s);
        added.push(s);
      }
    }
    return added;
  }

  _dropWanted(list) {
    this.wanted = this.wanted.filter((s) => !list.includes(s));
  }

  _since(list) {
    if (!this.resume) return null;
    const since = {};
    let any = false;
    for (const s of list) {
      const p = this.points.get(s);
      if (p && p.seq !== null && p.epoch && !isCandleStream(s)) {
        since[s] = { epoch: p.epoch, seq: p.seq };
        any = true;
      }
    }
    return any ? since : null;
  }

  _onTrade(msg) {
    const data = msg.data || {};
    const symbol = typeof data.symbol === "string" ? data.symbol.toUpperCase() : null;
    if (symbol !== null && this.leaving.has(symbol)) return;   // unsubscribed, still in flight
    const { seq, epoch } = msg;
    if (symbol !== null && typeof seq === "number" && typeof epoch === "string") {
      let p = this.points.get(symbol);
      if (p && p.seq === null) p = null;     // where a loss ended is unknown: this trade is the baseline
      if (p && p.epoch === epoch) {
        if (seq <= p.seq) {                  // delivered already (a resume overlapping the live stream)
          this.duplicates += 1;
          return;
        }
        if (seq > p.seq + 1) {
          this._emitGap({ symbol, epoch, from: p.seq + 1, to: seq - 1, reason: "missing" }, "client");
        }
      } else if (p) {
        // A new epoch with no notice: this epoch's trades before this one are not known to us.
        this._emitGap({ symbol, epoch, from: seq > 1 ? 1 : 0, to: seq - 1, reason: "epoch_changed",
                        previousEpoch: p.epoch }, "client");
      }
      this.points.set(symbol, { epoch, seq });
    }
    this._emit("trade", { symbol, data, seq: seq ?? null, epoch: epoch ?? null,
                          timestamp: msg.timestamp, receivedAt: Date.now() });
  }

  _onGap(data) {
    const symbol = typeof data.symbol === "string" ? data.symbol : null;
    if (symbol !== null && this.leaving.has(symbol)) return;
    if (symbol !== null && !isCandleStream(symbol)) {
      const epoch = typeof data.epoch === "string" ? data.epoch : null;
      if (typeof data.to === "number" && data.to > 0) {
        // The gateway accounts for everything up to `to`: resume from there.
        this.points.set(symbol, { epoch, seq: data.to });
      } else if (data.reason === "epoch_changed") {
        // Nothing of the new epoch is lost: it starts from 1.
        if (epoch) this.points.set(symbol, { epoch, seq: 0 });
        else this.points.delete(symbol);
      } else if (this.points.has(symbol)) {
        // Where the loss ends is not known ("unavailable", to 0): the next trade is the baseline.
        this.points.set(symbol, { epoch, seq: null });
      }
    }
    this._emitGap({ ...data }, "server");
  }

  _emitGap(gap, source) {
    this._emit("gap", { ...gap, source });
  }

  _onCandle(msg) {
    const d = msg.data || {};
    const stream = `${d.symbol}@${d.interval}`;
    if (this.leaving.has(stream)) return;
    let state = d.state;
    if (state === "final" || state === "correction") {
      let f = this.finals.get(stream);
      if (!f) {
        f = { last: -Infinity, byStart: new Map(), resumed: false };
        this.finals.set(stream, f);
      }
      const key = candleKey(d);
      const seen = f.byStart.get(d.start);
      if (state === "final" && d.start <= f.last && seen !== undefined) {
        // A backfill after a reconnect repeats finals already delivered.
        if (seen === key) return;
        state = "correction";              // changed meanwhile: deliver it as the correction it is
      }
      if (f.resumed && state === "final" && d.start > f.last) {
        // The first new final after a reconnect: did intervals go by that the backfill no longer holds?
        f.resumed = false;
        const step = intervalMs(d.interval);
        if (step && d.start > f.last + step) {
          this._emitGap({ symbol: stream, reason: "candles_missed", from: f.last + step,
                          to: d.start - step }, "client");
        }
      }
      f.byStart.set(d.start, key);
      if (d.start > f.last) f.last = d.start;
      if (f.byStart.size > 2000) {          // keep the recent ones (a backfill is at most 10,000)
        const oldest = Math.min(...f.byStart.keys());
        f.byStart.delete(oldest);
      }
    }
    this._emit("candle", { stream, symbol: d.symbol, interval: d.interval, start: d.start,
                           open: d.open, high: d.high, low: d.low, close: d.close, volume: d.volume,
                           trades: d.trades, state, data: d, timestamp: msg.timestamp,
                           receivedAt: Date.now() });
  }

  // --- events -------------------------------------------------------------------

  _setState(state, detail) {
    this.state = state;
    this._emit("state", { state, url: this.url, ...detail });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
