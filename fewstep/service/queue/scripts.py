"""The Redis queue's Lua scripts: every write that must not interleave with another gateway's or worker's.

Fair admission lives here. A submitted item does not go straight into its lane's stream: it waits in
its owner's backlog (a list per owner and lane), and a ring of the owners with a backlog says whose
turn is next. `FEED` moves items into the stream one owner at a time, in turn, only as far as workers
are about to read (a claim feeds what it has room for; a submit feeds one, to wake a blocked worker).
So the stream holds at most about one batch of undelivered work, and a key that submits 10 000 items
delays another key's first item by one turn of the ring, not by 10 000 items. Delivery, pending
lists, reclaim and acknowledgement stay Redis Streams' own.

Backlog names are built inside the scripts from a prefix and the owner: fine for one Redis (fewstep's
deployment), not for Redis Cluster, where every key a script touches must be declared.
"""

from __future__ import annotations

# feed(stream, group, ring, backlog prefix, waiting list, want): moves items from the owners' backlogs
# into the stream, one owner per turn of the ring, until `want` entries wait undelivered. An owner
# leaves the ring when its backlog is empty (and joins it again on its next submit). The waiting list
# holds one element per backlog item: its length is the lane's backlog, which autoscalers read.
_FEED_FUNCTION = """
local function feed(stream, group, ring, backlog_prefix, waiting_list, want)
  local pending = 0
  local p = redis.pcall('XPENDING', stream, group)
  if type(p) == 'table' and p.err == nil then pending = tonumber(p[1]) end  -- no group yet: nothing delivered
  local waiting = redis.call('XLEN', stream) - pending
  local moved = 0
  while waiting < want do
    local owner = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    if not owner then break end
    local backlog = backlog_prefix .. owner
    local entry = redis.call('LPOP', backlog)
    if entry then
      local job, index, at, item = string.match(entry, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
      redis.call('XADD', stream, '*', 'job', job, 'index', index, 'at', at, 'item', item)
      waiting = waiting + 1
      moved = moved + 1
    end
    if redis.call('LLEN', backlog) == 0 then redis.call('LREM', ring, -1, owner) end
  end
  if moved > 0 then redis.call('LPOP', waiting_list, moved) end
  return moved
end
"""

# KEYS: lane stream, job hash, idempotency key, stats hash, owners' cost hash, the owner's jobs sorted set,
#       the owner's backlog, the lane's ring, the lane's waiting list.
# ARGV: job id, fingerprint, max depth, ttl, idempotency ttl, has key, n, created, owner, model, lane,
#       owner field, job cost, owner limit (-1: none), owner's job limit (-1: none), created (ms), group,
#       backlog prefix, webhook, meta, items...
# Every job is recorded in its owner's jobs of the lane (listed by `jobs`); the limit is checked when given.
SUBMIT = (
    _FEED_FUNCTION
    + """
if ARGV[6] == '1' then
  local known = redis.call('GET', KEYS[3])
  if known then return {'existing', known} end
end
local n = tonumber(ARGV[7])
local depth = redis.call('XLEN', KEYS[1]) + redis.call('LLEN', KEYS[9])
if depth + n > tonumber(ARGV[3]) then return {'full', tostring(depth)} end
local owed = tonumber(redis.call('HGET', KEYS[5], ARGV[12]) or '0')
if tonumber(ARGV[14]) >= 0 and owed + tonumber(ARGV[13]) > tonumber(ARGV[14]) then
  return {'owner', tostring(owed)}
end
if tonumber(ARGV[15]) >= 0 then
  local kept = redis.call('ZCOUNT', KEYS[6], '(' .. ARGV[8], '+inf')
  if kept >= tonumber(ARGV[15]) then return {'jobs', tostring(kept)} end
end
-- The first write must be one Redis refuses at maxmemory (an unflagged script is checked at its first write).
redis.call('HINCRBY', KEYS[5], ARGV[12], ARGV[13])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[8])
redis.call('ZADD', KEYS[6], tonumber(ARGV[8]) + tonumber(ARGV[4]), ARGV[1])
redis.call('EXPIRE', KEYS[6], ARGV[4])
redis.call('HSET', KEYS[2], 'owner', ARGV[9], 'model', ARGV[10], 'lane', ARGV[11], 'total', n, 'done', 0,
           'failed', 0, 'cancelled', 0, 'cancel', 0, 'created', ARGV[8], 'ttl', ARGV[4])
if ARGV[19] ~= '' then redis.call('HSET', KEYS[2], 'webhook', ARGV[19]) end
if ARGV[20] ~= '' then redis.call('HSET', KEYS[2], 'meta', ARGV[20]) end
redis.call('EXPIRE', KEYS[2], ARGV[4])
local had = redis.call('LLEN', KEYS[7])
for i = 1, n do
  redis.call('RPUSH', KEYS[7], ARGV[1] .. '|' .. (i - 1) .. '|' .. ARGV[16] .. '|' .. ARGV[20 + i])
  redis.call('RPUSH', KEYS[9], '1')
end
if had == 0 then redis.call('RPUSH', KEYS[8], ARGV[9]) end
feed(KEYS[1], ARGV[17], KEYS[8], ARGV[18], KEYS[9], 1)
if ARGV[6] == '1' then redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[5]) end
redis.call('HINCRBY', KEYS[4], 'submitted', n)
return {'created', ARGV[1]}
"""
)

# KEYS: lane stream, the lane's ring, the lane's waiting list. ARGV: group, backlog prefix, want.
FEED = _FEED_FUNCTION + "\nreturn feed(KEYS[1], ARGV[1], KEYS[2], ARGV[2], KEYS[3], tonumber(ARGV[3]))\n"

# KEYS: job hash, results hash, events stream, lane stream, owners' cost hash, webhook schedule, webhook records.
# ARGV: index, result JSON, outcome, now, entry id, group, owner field, item cost, job id.
# The first acknowledgement of an entry gives its cost back to its owner (once, whatever the redeliveries). The
# job's last result schedules its webhook in the same step (a finished job never loses its announcement).
FINISH = """
local wrote = 0
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  wrote = 1
  local field = ARGV[3]
  if field == 'ok' then field = 'done' end
  redis.call('HINCRBY', KEYS[1], field, 1)
  local c = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'cancelled', 'ttl')
  redis.call('XADD', KEYS[3], '*', 'kind', 'item', 'index', ARGV[1], 'outcome', ARGV[3])
  if tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) >= tonumber(c[1]) then
    redis.call('HSET', KEYS[1], 'finished', ARGV[4])
    redis.call('XADD', KEYS[3], '*', 'kind', 'end')
    wrote = redis.call('HGET', KEYS[1], 'created')
    local j = redis.call('HMGET', KEYS[1], 'webhook', 'owner', 'model', 'cancel')
    if j[1] then
      local id = 'msg_' .. ARGV[9]
      local record = cjson.encode({id = id, job = ARGV[9], owner = j[2], url = j[1], model = j[3],
        counts = {tonumber(c[1]), tonumber(c[2]), tonumber(c[3]), tonumber(c[4])}, cancel = (j[4] == '1'),
        created = tonumber(wrote), finished = tonumber(ARGV[4])})
      redis.call('HSET', KEYS[7], id, record)
      redis.call('ZADD', KEYS[6], ARGV[4], id)
    end
  end
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], c[5]) end
end
if redis.call('XACK', KEYS[4], ARGV[6], ARGV[5]) == 1 then
  if redis.call('HINCRBY', KEYS[5], ARGV[7], -tonumber(ARGV[8])) <= 0 then redis.call('HDEL', KEYS[5], ARGV[7]) end
end
redis.call('XDEL', KEYS[4], ARGV[5])
return wrote
"""

# KEYS: job hash, events stream. ARGV: now.
CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local c = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'cancelled', 'cancel', 'ttl')
if c[5] == '1' or tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) >= tonumber(c[1]) then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1, 'cancel_at', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'kind', 'cancel')
redis.call('EXPIRE', KEYS[2], c[6])
return 1
"""

PARTIAL = """
-- A partial image of a streamed item, as an event of its job: only while the job lives and the item has no
-- result yet (a late partial after the final image would be shown over it).
-- KEYS: job hash, results hash, events stream. ARGV: index, partial index, base64 PNG.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
redis.call('XADD', KEYS[3], '*', 'kind', 'partial', 'index', ARGV[1], 'partial', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[3], ttl)
return 1
"""

PROGRESS = """
-- How far a running job got: kept only while the job lives and has not finished, and never lowered.
-- KEYS: job hash. ARGV: percent.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'finished') == 1 then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'progress') or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
return 1
"""

# KEYS: webhook schedule, webhook records. ARGV: now, lease end, n.
# The deliveries due, each with its record and attempts so far, leased (rescheduled at the lease's end).
WEBHOOKS_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local r = redis.call('HMGET', KEYS[2], id, id .. ':attempts')
  table.insert(out, id)
  table.insert(out, r[1] or '')
  table.insert(out, r[2] or '0')
end
return out
"""
