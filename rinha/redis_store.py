"""The Redis data model of the sync between instances on several hosts, and the recovery from it.

Imported by the dispatcher's carrier (redis_sync.py) and by the supervisor, which recovers from
Redis before it forks (`recover_from_redis`). Needs redis-py (the rinha[redis] extra) and one
Redis server (not Cluster: the scripts name keys they derive). What Redis holds, per deployment
(one database of one server):

  rinha:epoch                     the purge generation E (an integer; a purge increments it)
  rinha:members                   SET of every INSTANCE_NAME that ever wrote a cell
  rinha:e{E}:cells:{name}         HASH "{second}:{processor}" -> "{count}:{cents}": the
                                  instance's whole region, absolute values, written only by it
  rinha:e{E}:recent:{name}        ZSET of those fields scored by when they were last written
                                  (Redis's own clock, ms; trimmed to RECENT_KEEP_MS)
  channel rinha:sync              pub/sub of wire.py's messages (CELLS, PURGE, HEALTH), the
                                  same bytes the UDP carrier sends

Why pub/sub plus a periodic read, not streams: every value is absolute and merges by keeping
the larger count (mirror.py), so order and duplicates do not matter and the latest value of a
cell is all anyone needs. The hash is that latest value, the one durable truth, which a
restarted instance reads back whole; pub/sub adds freshness at the cost of one PUBLISH per
dispatcher loop turn and keeps nothing; what it loses (a subscriber disconnected, Redis
restarted) the periodic read of the recently written cells heals, whatever second they belong
to. A stream would keep a second copy of the same values that must be trimmed, and a reader's
position in it means nothing after a Redis restart without persistence, so a snapshot would be
needed anyway.

Writes go through WRITE, a script that keeps the larger count of each cell server-side: a
stale or repeated write cannot lower a cell, even from a restarted instance that has not
recovered yet. Both scripts check the epoch: a write for an older generation is refused (the
writer learns of the purge and purges too), and a missing epoch means Redis lost its data, so
the writers put their whole regions back (redis_sync.py). The ledger keeps the epoch its cells
belong to (Ledger.sync_epoch), so an instance restarted on the same host after a purge it missed
drops its old cells instead of writing them back.
"""

from __future__ import annotations

import logging

from rinha import wire
from rinha.ledger import OWN, Ledger
from rinha.mirror import merge_cells, merge_subject
from rinha.settings import Settings

log = logging.getLogger("rinha.redis")

EPOCH_KEY = "rinha:epoch"
MEMBERS_KEY = "rinha:members"
CHANNEL = "rinha:sync"
RECENT_KEEP_MS = 120_000
CELLS_PER_WRITE = 500  # a full rewrite goes in chunks: one script call never holds Redis long


def cells_key(epoch: int, name: str) -> str:
    return f"rinha:e{epoch}:cells:{name}"


def recent_key(epoch: int, name: str) -> str:
    return f"rinha:e{epoch}:recent:{name}"


# KEYS: epoch, members, cells, recent. ARGV: epoch, name, channel, message count, messages...,
# then field, count, cents for each cell. Returns {epoch in Redis, 1 if it had to be recreated
# (Redis lost its data)}; writes nothing when the epoch is not ARGV[1]'s (a purge happened).
WRITE = """
local lost = 0
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
  lost = 1
end
if epoch ~= ARGV[1] then return {tonumber(epoch), lost} end
redis.call('SADD', KEYS[2], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local first = 5 + tonumber(ARGV[4])
for i = first, #ARGV, 3 do
  local count = tonumber(ARGV[i + 1])
  local old = redis.call('HGET', KEYS[3], ARGV[i])
  if (not old) or tonumber(string.match(old, '^(%d+)')) < count then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1] .. ':' .. ARGV[i + 2])
  end
  redis.call('ZADD', KEYS[4], now, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - RECENT_KEEP_MS)
for i = 5, first - 1 do redis.call('PUBLISH', ARGV[3], ARGV[i]) end
return {tonumber(epoch), lost}
""".replace("RECENT_KEEP_MS", str(RECENT_KEEP_MS))

# KEYS: epoch, members. ARGV: this instance's name, window (ms). Returns {epoch (false if Redis
# lost it), 1 if this instance's own cells are in Redis, then for each other member: name,
# fields, values} with the cells written within the window.
READ_RECENT = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then return {false, 0} end
local t = redis.call('TIME')
local since = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
local prefix = 'rinha:e' .. epoch
local out = {tonumber(epoch), redis.call('EXISTS', prefix .. ':cells:' .. ARGV[1])}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if member ~= ARGV[1] then
    local fields = redis.call('ZRANGEBYSCORE', prefix .. ':recent:' .. member, since, '+inf')
    if #fields > 0 then
      table.insert(out, member)
      table.insert(out, fields)
      table.insert(out, redis.call('HMGET', prefix .. ':cells:' .. member, unpack(fields)))
    end
  end
end
return out
"""

# KEYS: epoch, members. A new generation, the old one's keys deleted; returns the new epoch
# (the caller tells everyone: a PURGE message whose nonce is that epoch).
PURGE = """
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('INCR', KEYS[1])
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local prefix = 'rinha:e' .. old
  redis.call('DEL', prefix .. ':cells:' .. member, prefix .. ':recent:' .. member)
end
return epoch
"""


def field(second: int, processor: int) -> str:
    return f"{second}:{processor}"


def write_args(cells: list[wire.Cell]) -> list[str | int]:
    args: list[str | int] = []
    for second, processor, count, cents in cells:
        args += [field(second, processor), count, cents]
    return args


def parse_cell(raw_field: bytes | str, raw_value: bytes | str | None) -> wire.Cell | None:
    """A cell from a hash field and value, None for a missing or malformed one (logged)."""
    if raw_value is None:
        return None
    try:
        text_field = raw_field.decode() if isinstance(raw_field, bytes) else raw_field
        text_value = raw_value.decode() if isinstance(raw_value, bytes) else raw_value
        second, processor = (int(x) for x in text_field.split(":"))
        count, cents = (int(x) for x in text_value.split(":"))
    except (ValueError, UnicodeDecodeError):
        log.warning("ignored a malformed cell in Redis: %r = %r", raw_field, raw_value)
        return None
    if processor not in (0, 1) or not 0 <= count < wire.COUNT_LIMIT \
            or not 0 <= cents < wire.CENTS_LIMIT:
        log.warning("ignored an out-of-range cell in Redis: %r = %r", raw_field, raw_value)
        return None
    return second, processor, count, cents


def parse_hash(mapping: dict) -> list[wire.Cell]:
    return [cell for f, v in mapping.items() if (cell := parse_cell(f, v)) is not None]


def adopt_epoch(ledger: Ledger, epoch: int) -> bool:
    """Make `epoch` the ledger's; purge first if its cells belong to another generation (a purge
    this instance missed). Returns whether it purged."""
    known = ledger.sync_epoch
    purge = known != 0 and known != epoch
    if purge:
        log.warning("the deployment was purged (Redis epoch %d, this ledger's %d): purging",
                    epoch, known)
        ledger.purge()
    ledger.sync_epoch = epoch
    return purge


def recover_from_redis(settings: Settings, ledger: Ledger) -> int | None:
    """Before the children start: this instance's own cells back from Redis, and every other
    instance's, merged by keeping the larger count. Returns how many other instances Redis
    knows, None if it did not answer within SYNC_RECOVER_TIMEOUT_S."""
    import redis

    timeout = settings.sync_recover_timeout_s
    client = redis.Redis.from_url(settings.sync_url, socket_timeout=timeout,
                                  socket_connect_timeout=timeout)
    name = settings.instance_name
    try:
        # Recreate a lost epoch with ours, so a purge this ledger saw is not undone.
        client.set(EPOCH_KEY, max(ledger.sync_epoch, 1), nx=True)
        epoch = int(client.get(EPOCH_KEY))
        adopt_epoch(ledger, epoch)
        members = [m.decode() for m in client.smembers(MEMBERS_KEY)]
        others = [m for m in members if m != name]
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(cells_key(epoch, name))
        for member in others:
            pipe.hgetall(cells_key(epoch, member))
        own, *theirs = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.warning("Redis recovery failed: %r", exc)
        return None
    finally:
        client.close()
    merge_cells(ledger, OWN, parse_hash(own))
    for member, mapping in zip(others, theirs, strict=True):
        merge_subject(ledger, name, member, parse_hash(mapping))
    return len(others)
