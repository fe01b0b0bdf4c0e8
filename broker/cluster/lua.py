"""The Lua scripts of the data plane. Each runs on ONE hash slot (all its keys share a tag), so
Redis runs it atomically; every write changes only what its own slot holds.

A content value is ``header | body``: the header is 8 bytes, ``>I4I4`` = (reference count,
server time in seconds of the last change), the body the page's first 4072 bytes; the page's
last 24 bytes are in the key's name. So a stored page is a 4080-byte value, which Redis 7
keeps in jemalloc's 4096-byte class, where a 4096-byte value lands in the 5120 class (the
issue's measure: 4,269 against 5,240 bytes per page; ``bench/scale_bench.py`` measures ours).
The time in the header is what lets the collector tell a leaked reference from one in flight
(see :mod:`broker.cluster.collector`).
"""

from __future__ import annotations

from typing import Final

# Every script that creates or deletes a content also changes its slot's content counter
# (``ns:n{<tag of that slot>}``, the last key): the sum of the counters over all slots is the
# namespace's number of contents, the pool's cluster-wide ``unique_pages`` (docs/scale.md).

# KEYS: the content's candidate names (collision numbers k = 0, 1, ...), all in one slot, then
# the slot's counter. ARGV[1]: the body. Takes a reference to the first candidate holding the
# same bytes, or creates the content at the first free one. Returns {k, shared (0/1), server
# time}; k = -1 when every candidate holds other bytes.
TAKE: Final = """
local now = tonumber(redis.call('TIME')[1])
local body = ARGV[1]
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  local head = redis.call('GETRANGE', key, 0, 7)
  if head == '' then
    redis.call('SET', key, struct.pack('>I4I4', 1, now) .. body)
    redis.call('INCR', KEYS[#KEYS])
    return {i - 1, 0, now}
  end
  if redis.call('GETRANGE', key, 8, -1) == body then
    local n = struct.unpack('>I4', head)
    redis.call('SETRANGE', key, 0, struct.pack('>I4I4', n + 1, now))
    return {i - 1, 1, now}
  end
end
return {-1, 0, now}
"""

# KEYS[1]: a content, KEYS[2]: its slot's counter. ARGV[1]: server time of the change that let the reference go (the
# handle's removal, or the take it was for); ARGV[2]: the most seconds a drop may come after
# it. Returns the references left (0: deleted), -1 when the content is missing, -2 when the
# drop came too late and was refused (the reference leaks; the collector takes it).
DROP: Final = """
local now = tonumber(redis.call('TIME')[1])
if now - tonumber(ARGV[1]) > tonumber(ARGV[2]) then return -2 end
local head = redis.call('GETRANGE', KEYS[1], 0, 7)
if head == '' then return -1 end
local n = struct.unpack('>I4', head)
if n <= 1 then
  redis.call('DEL', KEYS[1])
  redis.call('DECR', KEYS[2])
  return 0
end
redis.call('SETRANGE', KEYS[1], 0, struct.pack('>I4I4', n - 1, now))
return n - 1
"""

# KEYS[1]: the guest's fence ({g<id>}:epoch), KEYS[2]: its object set, KEYS[3]: the object's
# handle hash. ARGV: epoch, op ('p' put, 'd' drop a handle, 'o' drop the object), member (the
# object's name in the set), field (the index), value (the content ref, '' for the zero page),
# take time ('' for none), max age of the take. Returns {0, server time}, {-1, fence} when a
# broker with a higher epoch took the guest, {-2, now} when the take is too old to be used.
HANDLE: Final = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
if fence > tonumber(ARGV[1]) then return {-1, fence} end
local now = tonumber(redis.call('TIME')[1])
local op = ARGV[2]
if op == 'p' then
  if ARGV[6] ~= '' and now - tonumber(ARGV[6]) > tonumber(ARGV[7]) then return {-2, now} end
  redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
  redis.call('SADD', KEYS[2], ARGV[3])
elseif op == 'd' then
  redis.call('HDEL', KEYS[3], ARGV[4])
  if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SREM', KEYS[2], ARGV[3]) end
else
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[2], ARGV[3])
end
return {0, now}
"""

# KEYS[1]: the guest's fence. ARGV[1]: the epoch of the broker taking the guest. Returns
# {1, epoch} when the fence is now that epoch, {0, fence} when a higher one holds it.
ADOPT: Final = """
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = tonumber(ARGV[1])
if fence > epoch then return {0, fence} end
redis.call('SET', KEYS[1], ARGV[1])
return {1, epoch}
"""

# KEYS[1]: a content, KEYS[2]: its slot's counter. ARGV: the reference count and change time
# the collector saw, and the
# excess to drop. Drops it only if nothing changed since (see broker.cluster.collector).
# Returns the references left (0: deleted), -1 missing, -2 changed meanwhile.
COLLECT: Final = """
local head = redis.call('GETRANGE', KEYS[1], 0, 7)
if head == '' then return -1 end
local n, t = struct.unpack('>I4I4', head)
if n ~= tonumber(ARGV[1]) or t ~= tonumber(ARGV[2]) then return -2 end
local left = n - tonumber(ARGV[3])
if left <= 0 then
  redis.call('DEL', KEYS[1])
  redis.call('DECR', KEYS[2])
  return 0
end
redis.call('SETRANGE', KEYS[1], 0, struct.pack('>I4I4', left, t))
return left
"""

# KEYS[1]: a content counter, ARGV: more counters, of any slots this node serves (declared
# keys must share a slot; the flag lets a script read others of its node: Redis 7, Valkey).
# Returns their sum. Read-only: one call per master instead of a GET per slot.
COUNT: Final = """#!lua flags=no-writes,allow-cross-slot-keys
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
for i = 1, #ARGV do
  total = total + tonumber(redis.call('GET', ARGV[i]) or '0')
end
return total
"""

SCRIPTS: Final = {
    "take": TAKE,
    "drop": DROP,
    "handle": HANDLE,
    "adopt": ADOPT,
    "collect": COLLECT,
    "count": COUNT,
}
