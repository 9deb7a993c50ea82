#!/usr/bin/env bash
# Sets everything up and runs the gateway with a local Redis and a demo feed.
# Ctrl-C stops them all. WS_PORT (8080), DEMO_CANDLES_PORT (8081) and
# DEMO_REDIS_PORT (6390) can be set.
source "$(dirname "$0")/bootstrap.sh"
need_redis
need_venv "[test]"   # [test] brings the websockets CLI client used below

WS_PORT="${WS_PORT:-8080}"
REDIS_PORT="${DEMO_REDIS_PORT:-6390}"
CANDLES_PORT="${DEMO_CANDLES_PORT:-8081}"
SYMBOLS="AAPL,GOOGL,MSFT,AMZN,TSLA,NVDA,META,NFLX,AMD,INTC"

# Before touching anything (logs included): are the ports free? A second
# demo, or anything else on them, stops here with a clear line.
for spec in "Redis:$REDIS_PORT:DEMO_REDIS_PORT" "the candle service:$CANDLES_PORT:DEMO_CANDLES_PORT" \
            "the gateway:$WS_PORT:WS_PORT"; do
    IFS=: read -r who port var <<<"$spec"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "error: port $port (for $who) is already in use on 127.0.0.1: is a demo already" \
             "running? Stop it, or set $var to another port." >&2
        exit 1
    fi
done

RUN="$ROOT/.demo"
mkdir -p "$RUN"
pids=()
cleanup() {
    trap - EXIT INT TERM
    # Newest first: the gateway and the candle service finish while Redis is still there.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    echo "demo stopped"
}
trap cleanup EXIT INT TERM

echo "==> starting redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$RUN" --logfile "$RUN/redis.log" --daemonize no &
pids+=($!)
for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    echo "error: redis-server did not start on 127.0.0.1:$REDIS_PORT; the end of $RUN/redis.log:" >&2
    tail -n 5 "$RUN/redis.log" >&2
    exit 1
fi

export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
echo "==> starting the demo feed: 20 trades/s over $SYMBOLS"
"$VENV/bin/ws-gateway-feed" --redis-url "$REDIS_URL" --symbols "$SYMBOLS" --rate 20 2>"$RUN/feed.log" &
pids+=($!)

echo "==> starting the candle service (1s, 1m, 5m candles; health on 127.0.0.1:$CANDLES_PORT)"
WS_HOST=127.0.0.1 WS_PORT="$CANDLES_PORT" "$VENV/bin/ws-gateway-candles" 2>"$RUN/candles.log" &
pids+=($!)

echo "==> starting the gateway (with its web page: WS_WEB_UI=on)"
WS_HOST="${WS_HOST:-127.0.0.1}" WS_PORT="$WS_PORT" WS_STATS_INTERVAL="${WS_STATS_INTERVAL:-30}" \
    WS_WEB_UI=on "$VENV/bin/ws-gateway" &
pids+=($!)
# The gateway's own start-up lines come first; the ways in are the last thing printed.
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.1
done
sleep 0.2
echo
echo "    connect to   ws://127.0.0.1:$WS_PORT"
echo "    then send    {\"action\": \"subscribe\", \"symbols\": [\"AAPL\", \"MSFT\", \"AAPL@1m\"]}"
echo "    e.g.         $VENV/bin/python -m websockets ws://127.0.0.1:$WS_PORT"
echo
# .venv/bin/... as the README has it, when the environment is the default one.
BIN="$VENV/bin"
[ "$VENV" = "$ROOT/.venv" ] && BIN=".venv/bin"
echo "    the web page:   http://127.0.0.1:$WS_PORT/"
echo "    in a terminal:  $BIN/ws-gateway-tail ws://127.0.0.1:$WS_PORT AAPL MSFT AAPL@1m"
echo
wait "${pids[-1]}"
