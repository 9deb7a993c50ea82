#!lua name=ws_gateway_candles
--[[
Candle streams in Redis (Redis 7 Functions): the leader lease of the candle
service, fenced publishing of candle messages with the state a standby needs
to take over, and the backfill read the gateways serve new subscribers from.
gateway/candle_store.py loads it and wraps every call.

Keys (S = symbol, I = interval name; a symbol's keys carry the hash tag {S}):
  ws-gateway:candles:lease         string "<holder>#<token>", with a TTL
  ws-gateway:candles:fence         integer: the last token handed out
  ws-gateway:candles:symbols       set of symbols with candle state
  ws-gateway:{S}:candles           hash: w = "<epoch>:<seq>", the last trade applied
  ws-gateway:{S}:candles:I         hash: n (messages published), o:<start> = body of an
                                   open candle, s:<start> = its state (candles.py)
  ws-gateway:{S}:candles:I:finals  sorted set: score start, member = final body

FCALL candle_lease 2 <lease> <fence> <holder> <ttl ms> <value held or ''>
  -> the lease value (taken anew or renewed), or nil when another holds it.
FCALL candle_release 1 <lease> <value>  -> 1 if released, 0 if not ours.
FCALL publish_candles 1 <lease> <value> <channel prefix> <W> [<symbol> <watermark>]*W
      [<symbol> <interval> <start> <kind> <body> <stored> <state> <keep>]*
  kind u (update), f (final), c (correction), d (forget state of <start>).
  Fails with FENCED unless <value> still holds the lease: a leader that lost
  it can change nothing. Each message goes out on <prefix><I>:<S> as
  {"_n":<n>,<body minus its '{'>.
FCALL_RO candle_backfill 0 <S> <I> <count> -> {n, {final bodies, oldest first}, {open bodies}}
FCALL_RO candle_state 0 <S> <I> -> {watermark|nil, last final start|-1, last final body|nil,
                                     {start, state, ...}}
]]

local LEASE_SEP = '#'

local function symbol_key(symbol)
  return 'ws-gateway:{' .. symbol .. '}:candles'
end

local function stream_keys(symbol, interval)
  local base = symbol_key(symbol)
  return base, base .. ':' .. interval, base .. ':' .. interval .. ':finals'
end

local function candle_lease(keys, args)
  local lease, fence = keys[1], keys[2]
  local holder, ttl, held = args[1], tonumber(args[2]), args[3] or ''
  if not ttl or ttl < 1 then
    return redis.error_reply('ERR candle_lease: ttl must be a positive number of ms')
  end
  local current = redis.call('GET', lease)
  if current then
    if current == held then
      redis.call('PEXPIRE', lease, ttl)
      return current
    end
    return false
  end
  local token = redis.call('INCR', fence)
  local value = holder .. LEASE_SEP .. token
  redis.call('SET', lease, value, 'PX', ttl)
  return value
end

local function candle_release(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    redis.call('DEL', keys[1])
    return 1
  end
  return 0
end

local function publish_candles(keys, args)
  if redis.call('GET', keys[1]) ~= args[1] then
    return redis.error_reply('FENCED this candle service no longer holds the lease')
  end
  local prefix = args[2]
  local w = tonumber(args[3])
  local i = 4
  for _ = 1, w do
    redis.call('HSET', symbol_key(args[i]), 'w', args[i + 1])
    redis.call('SADD', 'ws-gateway:candles:symbols', args[i])
    i = i + 2
  end
  local published = 0
  while i + 7 <= #args do
    local symbol, interval, start, kind = args[i], args[i + 1], args[i + 2], args[i + 3]
    local body, stored, state, keep = args[i + 4], args[i + 5], args[i + 6], tonumber(args[i + 7])
    i = i + 8
    local _, hash, finals = stream_keys(symbol, interval)
    if kind == 'd' then
      redis.call('HDEL', hash, 's:' .. start)
    else
      if kind == 'u' then
        redis.call('HSET', hash, 's:' .. start, state, 'o:' .. start, body)
      else
        redis.call('HSET', hash, 's:' .. start, state)
        redis.call('HDEL', hash, 'o:' .. start)
        redis.call('ZREMRANGEBYSCORE', finals, start, start)
        redis.call('ZADD', finals, start, kind == 'c' and stored or body)
        redis.call('ZREMRANGEBYRANK', finals, 0, -(keep + 1))
      end
      local n = redis.call('HINCRBY', hash, 'n', 1)
      redis.call('PUBLISH', prefix .. interval .. ':' .. symbol,
                 '{"_n":' .. n .. ',' .. string.sub(body, 2))
      published = published + 1
    end
  end
  return published
end

local function sorted_fields(flat, tag)
  -- {start, value} pairs of the hash fields <tag><start>, by start
  local out = {}
  for k = 1, #flat, 2 do
    local f = flat[k]
    if string.sub(f, 1, 2) == tag then
      out[#out + 1] = {tonumber(string.sub(f, 3)), flat[k + 1]}
    end
  end
  table.sort(out, function(a, b) return a[1] < b[1] end)
  return out
end

local function candle_backfill(keys, args)
  local _, hash, finals = stream_keys(args[1], args[2])
  local count = tonumber(args[3]) or 0
  local n = tonumber(redis.call('HGET', hash, 'n') or '0')
  local old = {}
  if count > 0 then
    old = redis.call('ZRANGE', finals, -count, -1)
  end
  local open = {}
  for _, pair in ipairs(sorted_fields(redis.call('HGETALL', hash), 'o:')) do
    open[#open + 1] = pair[2]
  end
  return {n, old, open}
end

local function candle_state(keys, args)
  local base, hash, finals = stream_keys(args[1], args[2])
  local w = redis.call('HGET', base, 'w')
  local last = redis.call('ZRANGE', finals, -1, -1, 'WITHSCORES')
  local states = {}
  for _, pair in ipairs(sorted_fields(redis.call('HGETALL', hash), 's:')) do
    states[#states + 1] = tostring(pair[1])
    states[#states + 1] = pair[2]
  end
  if #last == 0 then
    return {w, -1, false, states}
  end
  return {w, tonumber(last[2]), last[1], states}
end

redis.register_function('candle_lease', candle_lease)
redis.register_function('candle_release', candle_release)
redis.register_function('publish_candles', publish_candles)
redis.register_function{function_name = 'candle_backfill', callback = candle_backfill,
                        flags = {'no-writes'}}
redis.register_function{function_name = 'candle_state', callback = candle_state,
                        flags = {'no-writes'}}
