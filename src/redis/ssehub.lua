#!lua name=ssehub
-- ssehub's Redis Functions: the one place where event ids are assigned, so every gateway of a
-- fleet gives an event the same position, and the history lives where the ids are assigned.
--
-- Every key of channel C hashes to C's own slot (FCALL declares C as its one key):
--   base = "ssehub:t:C" when C has a hash tag, "ssehub:{C}" otherwise (the `t:` keeps a tagged
--          "{x}" and an untagged "x" apart)
--   base..":h"    stream of events; fields p (payload), v (the previous id, "" for the first)
--   base..":m"    hash; e (epoch), l (last id)
--   base..":i:K:<length of K>"  idempotency record of key K: the position it published
-- Live events go out on base..":live" as "<epoch> <id> <prev>\n<payload>", with SPUBLISH in a
-- Redis Cluster (the live channel hashes to the declared key's slot, so Redis takes it in a
-- function, and the message stays in that shard) and PUBLISH otherwise.
--
-- Ids are stream ids from XADD * (milliseconds-sequence), so they grow with the clock: ids lost
-- with a failover are not handed out again for other events. The epoch changes whenever the
-- channel's state was lost (FLUSHALL, eviction, a restart without persistence), so a position
-- ("<epoch> <id>") from before can never name a different event, even when the new epoch's
-- first id repeats an old one.

local VERSION = 2
local CAPACITY = @CAPACITY@
local MAX_AGE_MS = @MAX_AGE_MS@
local KEY_TTL_MS = @KEY_TTL_MS@
local IDEMPOTENCY_MS = @IDEMPOTENCY_MS@
local MAX_PAYLOAD_BYTES = @MAX_PAYLOAD_BYTES@
local LIVE_BROADCAST = '@BROADCAST@'
local MAX_IDEMPOTENCY_KEY_BYTES = 128

local function base_of(channel)
  local open = string.find(channel, '{', 1, true)
  if open then
    local close = string.find(channel, '}', open + 1, true)
    if close and close > open + 1 then
      return 'ssehub:t:' .. channel
    end
  end
  if string.find(channel, '}', 1, true) then
    return nil
  end
  return 'ssehub:{' .. channel .. '}'
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local function base36(n)
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  local out = ''
  repeat
    local d = n % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    n = math.floor(n / 36)
  until n == 0
  return out
end

-- A new epoch: the server clock in microseconds, so an epoch made right after a FLUSHALL still
-- differs from the one it replaces.
local function new_epoch()
  local time = redis.call('TIME')
  return base36(tonumber(time[1]) * 1000000 + tonumber(time[2]))
end

local function publish(keys, args)
  local channel, payload, idempotency = keys[1], args[1], args[2]
  if channel == nil or payload == nil or #keys ~= 1 or #args > 2 then
    return redis.error_reply(
      'ERR usage: FCALL ssehub_publish 1 <channel> <payload> [<idempotency-key>]')
  end
  local base = base_of(channel)
  if base == nil then
    return redis.error_reply('ERR ssehub: a channel name with `}` needs a {hash tag}')
  end
  if #payload > MAX_PAYLOAD_BYTES then
    return redis.error_reply('ERR ssehub: the payload is larger than ' .. MAX_PAYLOAD_BYTES ..
      ' bytes (limits.max_payload_bytes)')
  end
  if idempotency ~= nil and (#idempotency > MAX_IDEMPOTENCY_KEY_BYTES or
      string.find(idempotency, '[^!-~]')) then
    return redis.error_reply('ERR ssehub: an idempotency key is 1 to 128 visible ASCII bytes')
  end
  local record
  if idempotency ~= nil and idempotency ~= '' then
    -- The key's length last: channel names and keys may both contain ':', and this keeps two
    -- different (channel, key) pairs from ever naming one record.
    record = base .. ':i:' .. idempotency .. ':' .. #idempotency
    local earlier = redis.call('GET', record)
    if earlier then
      return earlier
    end
  end
  local stream, meta = base .. ':h', base .. ':m'
  local now = now_ms()
  local epoch = redis.call('HGET', meta, 'e')
  local prev = ''
  if not epoch then
    -- Lost or never created: whatever is left of the stream belongs to a dead epoch.
    redis.call('DEL', stream)
    epoch = new_epoch()
    redis.call('HSET', meta, 'e', epoch)
  else
    prev = redis.call('HGET', meta, 'l') or ''
  end
  local id = redis.call('XADD', stream, 'MAXLEN', CAPACITY, '*', 'p', payload, 'v', prev)
  if MAX_AGE_MS > 0 then
    redis.call('XTRIM', stream, 'MINID', tostring(now - MAX_AGE_MS))
  end
  redis.call('HSET', meta, 'l', id)
  local ttl = math.max(MAX_AGE_MS, KEY_TTL_MS)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, ttl)
  local position = epoch .. ' ' .. id
  if record then
    redis.call('SET', record, position, 'PX', IDEMPOTENCY_MS)
  end
  redis.call(LIVE_BROADCAST, base .. ':live', position .. ' ' .. prev .. '\n' .. payload)
  return position
end

-- Orders two stream ids ("ms-seq"): -1, 0 or 1. Both parts fit a Lua number exactly.
local function compare(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, a_seq, b_ms, b_seq = tonumber(a_ms), tonumber(a_seq), tonumber(b_ms), tonumber(b_seq)
  if a_ms ~= b_ms then
    return a_ms < b_ms and -1 or 1
  end
  if a_seq ~= b_seq then
    return a_seq < b_seq and -1 or 1
  end
  return 0
end

-- Why the events right after `after` cannot be read: trimmed ("history_expired") when
-- `after` is older than the oldest event kept, otherwise never stored here
-- ("unknown_position").
local function missing_reason(stream, after)
  if after == '' then
    return 'history_expired'
  end
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #oldest == 0 or compare(after, oldest[1][1]) < 0 then
    return 'history_expired'
  end
  if #redis.call('XRANGE', stream, after, after) == 0 then
    return 'unknown_position'
  end
  return 'history_expired'
end

-- The channel's current position, "<epoch> <last id>" ("" before the first event), creating
-- the epoch if the channel has none: a reader's position then always names an epoch, so events
-- of an epoch that was lost before the reader came back are never mistaken for new ones.
-- Gateways holding readers call it now and then: it keeps a quiet channel's keys from
-- expiring under them (which would look like lost history).
local function position(keys)
  local base = base_of(keys[1] or '')
  if base == nil or #keys ~= 1 then
    return redis.error_reply('ERR usage: FCALL ssehub_position 1 <channel>')
  end
  local meta = base .. ':m'
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    redis.call('DEL', base .. ':h')
    epoch = new_epoch()
    redis.call('HSET', meta, 'e', epoch)
  end
  local ttl = math.max(MAX_AGE_MS, KEY_TTL_MS)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', base .. ':h', ttl)
  return epoch .. ' ' .. (redis.call('HGET', meta, 'l') or '')
end

-- The events after position "<epoch> <id>" of a channel, at most `count`:
--   {"ok", epoch, id1, prev1, payload1, id2, ...} when they follow the position without a gap;
--   {"history_expired", epoch} when events after the position were trimmed, by count or by
--   age (an event older than the age bound counts as trimmed even before a publish trims it);
--   {"unknown_position", epoch} when the position is from a lost epoch, or from events lost in
--   Redis (a failover that dropped writes: a position past the last event, or one inside the
--   kept history that this Redis never stored, because the old primary took it after the
--   replica was promoted).
local function read(keys, args)
  local base = base_of(keys[1] or '')
  local epoch, after, count = args[1], args[2] or '', tonumber(args[3] or '')
  if base == nil or #keys ~= 1 or epoch == nil or count == nil or count < 1 then
    return redis.error_reply('ERR usage: FCALL_RO ssehub_read 1 <channel> <epoch> <id> <count>')
  end
  local current = redis.call('HGET', base .. ':m', 'e')
  if not current or current ~= epoch then
    return {'unknown_position', current or ''}
  end
  local last = redis.call('HGET', base .. ':m', 'l') or ''
  if after ~= '' and (last == '' or compare(after, last) > 0) then
    return {'unknown_position', current}
  end
  local start = after == '' and '-' or '(' .. after
  local entries = redis.call('XRANGE', base .. ':h', start, '+', 'COUNT', count)
  if #entries == 0 then
    return after == last and {'ok', current} or {'history_expired', current}
  end
  if MAX_AGE_MS > 0 then
    local oldest = string.match(entries[1][1], '^(%d+)-')
    if tonumber(oldest) < now_ms() - MAX_AGE_MS then
      return {'history_expired', current}
    end
  end
  local reply = {'ok', current}
  for index, entry in ipairs(entries) do
    local fields = entry[2]
    local payload, prev = fields[2], fields[4]
    if index == 1 and prev ~= after then
      return {missing_reason(base .. ':h', after), current}
    end
    table.insert(reply, entry[1])
    table.insert(reply, prev)
    table.insert(reply, payload)
  end
  return reply
end

-- The channel's most recent events (at most `count`, within the age bound) and its position,
-- creating the epoch like `ssehub_position`: what a gateway loads when it starts serving a
-- channel, so it can resume clients that read elsewhere. Reply:
--   {epoch, last, start, id1, prev1, payload1, id2, ...}
-- where `start` is the position just before the first event returned (its `prev`; `last` when
-- none is returned).
local function tail(keys, args)
  local base = base_of(keys[1] or '')
  local count = tonumber(args[1] or '')
  if base == nil or #keys ~= 1 or count == nil or count < 1 then
    return redis.error_reply('ERR usage: FCALL ssehub_tail 1 <channel> <count>')
  end
  local current = position(keys)
  local space = string.find(current, ' ', 1, true)
  local epoch, last = string.sub(current, 1, space - 1), string.sub(current, space + 1)
  local entries = redis.call('XREVRANGE', base .. ':h', '+', '-', 'COUNT', count)
  local oldest_kept = MAX_AGE_MS > 0 and now_ms() - MAX_AGE_MS or nil
  local kept = {}
  for _, entry in ipairs(entries) do
    if oldest_kept and tonumber(string.match(entry[1], '^(%d+)-')) < oldest_kept then
      break
    end
    table.insert(kept, 1, entry)
  end
  local start = last
  if #kept > 0 then
    start = kept[1][2][4]
  end
  local reply = {epoch, last, start}
  for _, entry in ipairs(kept) do
    table.insert(reply, entry[1])
    table.insert(reply, entry[2][4])
    table.insert(reply, entry[2][2])
  end
  return reply
end

local function version()
  return VERSION
end

redis.register_function('ssehub_publish', publish)
redis.register_function('ssehub_position', position)
redis.register_function('ssehub_tail', tail)
redis.register_function{function_name = 'ssehub_read', callback = read, flags = {'no-writes'}}
redis.register_function{function_name = 'ssehub_version', callback = version, flags = {'no-writes'}}
