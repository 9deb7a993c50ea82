#!lua name=ws_gateway
--[[
Sequenced trade publishing with a bounded history per symbol (Redis 7 Functions).

A template: gateway/sequencing.py fills in the channel prefix and the history
size (library_code()) and loads it with FUNCTION LOAD REPLACE.

Keys of symbol S (KEYS[1]); both carry the hash tag {S}, so one symbol's keys
share one Redis Cluster slot, the slot of the key name S itself:
  ws-gateway:{S}:meta     hash: epoch (string), seq (integer, the last assigned),
                          rid (the replication ID of the server that made or adopted the epoch)
  ws-gateway:{S}:history  stream: entry <seq>-0 with one field d = the trade JSON

FCALL publish_trade 1 <S> <json object>      -> seq (integer)
  PUBLISHes on <prefix><S>: {"_seq":<seq>,"_epoch":"<epoch>",<rest of the object>
  ('{' followed by that rest is byte-identical to the stored d).
FCALL_RO trade_history 1 <S> <after> <count> -> [epoch|nil, first, last, seq1, d1, ...]
  after >= 0: up to count entries with seq > after; after = -1: the latest entry.
]]

local CHANNEL_PREFIX = "@@CHANNEL_PREFIX@@"
local HISTORY_SIZE = @@HISTORY_SIZE@@

-- (The standard libraries are not reachable while the library loads, only
-- when its functions run: no local aliases of string.* here.)

local function key_names(symbol)
  local base = 'ws-gateway:{' .. symbol .. '}:'
  return base .. 'meta', base .. 'history'
end

-- The replication ID of this server (INFO replication's master_replid). A
-- replica promoted to master gets a new one; the data it took over may lack
-- writes the old master acknowledged (replication is asynchronous), so an
-- epoch made elsewhere cannot be trusted to continue here: its seq counter
-- may be behind what clients already saw. Redis 7.0 lets a function call
-- INFO (ROLE it does not).
local function server_id()
  local info = redis.call('INFO', 'replication')
  return string.match(info, 'master_replid:(%x+)') or ''
end

-- JSON's whitespace only (space, tab, LF, CR), unlike Lua's %s.
local function is_ws(c)
  return c == 32 or c == 9 or c == 10 or c == 13
end

local function trim(s)
  local i, j = 1, #s
  while i <= j and is_ws(string.byte(s, i)) do i = i + 1 end
  while j >= i and is_ws(string.byte(s, j)) do j = j - 1 end
  return string.sub(s, i, j)
end

-- cjson does not check the encoding of the bytes it passes through; the
-- gateway (orjson) refuses anything but UTF-8.
local function has_high_byte(s)
  -- math.max over string.byte: one C call per 4000 bytes (Lua's pattern
  -- matching costs more per byte than this)
  local n = #s
  for i = 1, n, 4000 do
    if math.max(string.byte(s, i, math.min(n, i + 3999))) >= 128 then return true end
  end
  return false
end

local function valid_utf8(s)
  local n = #s
  local i = string.find(s, '[\128-\255]')
  while i do
    local c = string.byte(s, i)
    local len, lo, hi
    if c >= 0xC2 and c <= 0xDF then len, lo, hi = 2, 0x80, 0xBF
    elseif c == 0xE0 then len, lo, hi = 3, 0xA0, 0xBF
    elseif (c >= 0xE1 and c <= 0xEC) or c == 0xEE or c == 0xEF then len, lo, hi = 3, 0x80, 0xBF
    elseif c == 0xED then len, lo, hi = 3, 0x80, 0x9F
    elseif c == 0xF0 then len, lo, hi = 4, 0x90, 0xBF
    elseif c >= 0xF1 and c <= 0xF3 then len, lo, hi = 4, 0x80, 0xBF
    elseif c == 0xF4 then len, lo, hi = 4, 0x80, 0x8F
    else return false end
    if i + len - 1 > n then return false end
    local c2 = string.byte(s, i + 1)
    if c2 < lo or c2 > hi then return false end
    for k = i + 2, i + len - 1 do
      local ck = string.byte(s, k)
      if ck < 0x80 or ck > 0xBF then return false end
    end
    i = string.find(s, '[\128-\255]', i + len)
  end
  return true
end

-- cjson turns 1e400 (or 400 digits) into inf; orjson refuses it. Walking the
-- decoded trade costs less than scanning its text with a Lua pattern.
local function has_infinity(v)
  local t = type(v)
  if t == 'number' then
    return v == math.huge or v == -math.huge
  elseif t == 'table' then
    for _, x in pairs(v) do
      if has_infinity(x) then return true end
    end
  end
  return false
end

local BAD_PAYLOAD = 'ERR publish_trade: payload must be a JSON object'

-- The trimmed payload and whether it is empty, when it is one JSON object
-- the gateway would accept; nil otherwise.
local function json_object(payload)
  if type(payload) ~= 'string' then return nil end
  local text = trim(payload)
  if string.byte(text, 1) ~= 123 then return nil end  -- '{'
  cjson.decode_invalid_numbers(false)  -- no nan, inf, hex (shared Lua state: set every time)
  local ok, value = pcall(cjson.decode, text)
  if not ok or type(value) ~= 'table' then return nil end
  if has_high_byte(text) and not valid_utf8(text) then return nil end
  if has_infinity(value) then return nil end
  if next(value) == nil then
    return '{}', true  -- an empty object, however it was spaced
  end
  return text, false
end

local function publish_trade(keys, args)
  local symbol = keys[1]
  if symbol == nil or symbol == '' then
    return redis.error_reply('ERR publish_trade: symbol (KEYS[1]) must not be empty')
  end
  local text, empty = json_object(args[1])
  if text == nil then
    return redis.error_reply(BAD_PAYLOAD)
  end
  local meta, history = key_names(symbol)

  local state = redis.call('HMGET', meta, 'epoch', 'seq', 'rid')
  local epoch, seq, rid = state[1], tonumber(state[2]), state[3]
  local here = server_id()
  if epoch and not rid then
    -- Made before epochs carried a server ID: this server adopts it.
    redis.call('HSET', meta, 'rid', here)
  elseif epoch and rid ~= here then
    -- Made on another server (this one was a replica then; a failover made it
    -- the master): what that server acknowledged last may never have arrived
    -- here, so numbering on would give a seq clients may have seen with another
    -- trade. A new epoch; its first trade tells every reader.
    epoch = nil
  end
  if not epoch then
    -- New symbol, or its keys were lost (a restart without persistence,
    -- eviction), or they came from another master: a new epoch, and the old
    -- history cannot continue it.
    local now = redis.call('TIME')
    epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
    redis.call('DEL', history)
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'rid', here)
    seq = 0
  end
  seq = (seq or 0) + 1
  -- XADD first: if it fails (a stream someone else wrote ahead of seq),
  -- nothing has been changed and no seq is spent.
  redis.call('XADD', history, 'MAXLEN', '~', HISTORY_SIZE, string.format('%d-0', seq), 'd', text)
  redis.call('HINCRBY', meta, 'seq', 1)

  local head = string.format('{"_seq":%d,"_epoch":"%s"', seq, epoch)
  local message
  if empty then
    message = head .. '}'
  else
    message = head .. ',' .. string.sub(text, 2)
  end
  redis.call('PUBLISH', CHANNEL_PREFIX .. symbol, message)
  return seq
end

local function integer_arg(v)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n ~= n or n == math.huge or n == -math.huge then
    return nil
  end
  return n
end

local function entry_seq(id)
  return tonumber(string.match(id, '^(%d+)%-'))
end

local function entry_data(fields)
  for k = 1, #fields, 2 do
    if fields[k] == 'd' then return fields[k + 1] end
  end
  return ''
end

local function trade_history(keys, args)
  local symbol = keys[1]
  if symbol == nil or symbol == '' then
    return redis.error_reply('ERR trade_history: symbol (KEYS[1]) must not be empty')
  end
  local after, count = integer_arg(args[1]), integer_arg(args[2])
  if after == nil or after < -1 then
    return redis.error_reply('ERR trade_history: after must be an integer >= -1')
  end
  if count == nil or count < 1 then
    return redis.error_reply('ERR trade_history: count must be an integer >= 1')
  end
  local meta, history = key_names(symbol)
  local state = redis.call('HMGET', meta, 'epoch', 'seq')
  local epoch = state[1]
  if not epoch then
    -- No epoch: whatever stream is left is not part of any sequence.
    return { false, 0, 0 }
  end
  local reply = { epoch, 0, tonumber(state[2]) or 0 }
  local oldest = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)
  if #oldest == 0 then
    return reply
  end
  reply[2] = entry_seq(oldest[1][1])
  local entries
  if after == -1 then
    entries = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)
  else
    entries = redis.call('XRANGE', history, string.format('%d-0', after + 1), '+', 'COUNT', count)
  end
  for _, e in ipairs(entries) do
    reply[#reply + 1] = entry_seq(e[1])
    reply[#reply + 1] = entry_data(e[2])
  end
  return reply
end

redis.register_function('publish_trade', publish_trade)
redis.register_function{
  function_name = 'trade_history',
  callback = trade_history,
  flags = { 'no-writes' },
}
