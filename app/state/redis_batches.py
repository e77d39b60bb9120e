"""Batches in the Redis engine (app/state/batch_queue.py says what each part means), every
operation one Lua script or one MULTI, so it is atomic and one round trip.

The keys, under the store's prefix (``gw:`` by default):

    {prefix}batch:{id}                 the batch's record, a hash of BatchRecord's fields
                                       (a time that is None is no field)
    {prefix}batch:{id}:claims          its items handed out and not done: a sorted set of item
                                       numbers scored by ``until`` (lease end, or retry time)
    {prefix}batch:{id}:held            the same items: number -> "attempts:token" (no token:
                                       given back to be tried again)
    {prefix}batch:{id}:done            its items done, a bitmap (100,000 items: 12.5 KB)
    {prefix}batches                    every batch's id, a sorted set, every score 0: ids sort
                                       by creation, so a range by lex is a page of the list
    {prefix}batches:owner:{owner}      the ids of one key's batches, the same way
    {prefix}batches:open               in_progress batches (score 0): the claim's work list
    {prefix}batches:canceling          canceling batches, for the sweep's lost runners
    {prefix}batches:expiry             batches not ended, scored by ``expires_at``
    {prefix}batches:ended              ended batches not archived, scored by ``created_at``
    {prefix}f:batch:{backend}          batch items' slots on a backend: the placement's flight
                                       set (redis_store.py) under BATCH_FLIGHTS + the name
    {prefix}loads:{backend}            each worker's interactive requests in flight on it, a
                                       hash of worker -> "count:ends" (publish_loads)

Nothing is kept per item until it is handed out, and a batch's claims go when it ends, so a
queue of a million waiting items costs a hash each batch. The done bitmap stays while the
results are served and goes at delete or archive. The two time-scored sets let the sweep find
its work with one range each, not a scan of every batch.

A claim walks the oldest open batches, so the scripts name keys they find (batch ids) rather
than taking all of them in KEYS: the store is one Redis, not a cluster. Times are the caller's
``now`` (passed as the caller's text, so a record's times read back exactly); a slot's expiry is
Redis's ``TIME``, as the placement's flights are.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from app.state.batch_queue import (
    ARCHIVED_AFTER,
    BATCH_FLIGHTS,
    CANCELING,
    DONE_KINDS,
    ENDED,
    EXPIRES_AFTER,
    IN_PROGRESS,
    WORKER_LOADS,
    BatchCensus,
    BatchPage,
    BatchQueue,
    BatchRecord,
    Claim,
)
from app.state.store import lease_id

T = TypeVar("T")
Arg = str | bytes | int | float

# Open batches looked at per claim (app/state/sqlite_batches.py CLAIM_BATCHES, the same).
CLAIM_BATCHES = 16

INTS = ("total", "succeeded", "errored", "canceled", "expired", "running", "next")
TIMES = ("created_at", "expires_at", "ended_at", "cancel_initiated_at", "archived_at")

# Shared by the scripts below. ``P`` is the prefix (ARGV[1] of every script).
COMMON = """
local P = ARGV[1]
local function bkey(id) return P .. 'batch:' .. id end
local function parse(v)
  local attempts, holder = string.match(v, '^(%d+):(.*)$')
  return tonumber(attempts), holder
end
local function forget(b, idx)
  redis.call('ZREM', b .. ':claims', idx)
  redis.call('HDEL', b .. ':held', idx)
end
-- The batch ends at ``now``: its unfinished items canceled or expired (batch_queue.ended).
local function end_batch(id, now)
  local b = bkey(id)
  local f = redis.call('HMGET', b, 'total', 'succeeded', 'errored', 'cancel_initiated_at',
    'created_at')
  local rest = tonumber(f[1]) - tonumber(f[2]) - tonumber(f[3])
  local canceled, expired = 0, rest
  if f[4] then canceled, expired = rest, 0 end
  redis.call('HSET', b, 'status', 'ended', 'ended_at', now, 'canceled', canceled,
    'expired', expired, 'running', 0)
  redis.call('DEL', b .. ':claims', b .. ':held')
  redis.call('ZREM', P .. 'batches:open', id)
  redis.call('ZREM', P .. 'batches:canceling', id)
  redis.call('ZREM', P .. 'batches:expiry', id)
  redis.call('ZADD', P .. 'batches:ended', f[5], id)
end
"""

# ARGV: prefix, mode ('new', 'after', 'before'), cursor, limit + 1. KEYS: the id set.
# Returns each record's HGETALL, in the set's order for the mode.
LIST = """
local ids
if ARGV[2] == 'before' then
  ids = redis.call('ZRANGEBYLEX', KEYS[1], '(' .. ARGV[3], '+', 'LIMIT', 0, ARGV[4])
elseif ARGV[2] == 'after' then
  ids = redis.call('ZREVRANGEBYLEX', KEYS[1], '(' .. ARGV[3], '-', 'LIMIT', 0, ARGV[4])
else
  ids = redis.call('ZREVRANGEBYLEX', KEYS[1], '+', '-', 'LIMIT', 0, ARGV[4])
end
local out = {}
for i, id in ipairs(ids) do out[i] = redis.call('HGETALL', bkey(id)) end
return out
"""

# ARGV: prefix, id, now. Returns the record (after), or nil: no such batch.
CANCEL = """
local id, now = ARGV[2], ARGV[3]
local b = bkey(id)
local f = redis.call('HMGET', b, 'status', 'running')
if not f[1] then return false end
if f[1] ~= 'in_progress' then return redis.call('HGETALL', b) end
redis.call('HSET', b, 'status', 'canceling', 'cancel_initiated_at', now)
redis.call('ZREM', P .. 'batches:open', id)
redis.call('ZADD', P .. 'batches:canceling', 0, id)
-- Items waiting to be tried again will not be: only running ones stay claimed.
local held = redis.call('HGETALL', b .. ':held')
for i = 1, #held, 2 do
  local _, holder = parse(held[i + 1])
  if holder == '' then forget(b, held[i]) end
end
if tonumber(f[2]) <= 0 then end_batch(id, now) end
return redis.call('HGETALL', b)
"""

# ARGV: prefix, id. Returns 1 if deleted.
DELETE = """
local id = ARGV[2]
local b = bkey(id)
local f = redis.call('HMGET', b, 'status', 'owner')
if f[1] ~= 'ended' then return 0 end
redis.call('DEL', b, b .. ':claims', b .. ':held', b .. ':done')
redis.call('ZREM', P .. 'batches', id)
redis.call('ZREM', P .. 'batches:owner:' .. f[2], id)
redis.call('ZREM', P .. 'batches:ended', id)
return 1
"""

# ARGV: prefix, token, now, until, limit, batches to look at.
# Returns {id, index, attempts, ...}.
CLAIM = """
local token, now, till = ARGV[2], ARGV[3], ARGV[4]
local limit, looked_max = tonumber(ARGV[5]), tonumber(ARGV[6])
local nowv = tonumber(now)
local out, got, looked, from = {}, 0, 0, 0
while got < limit and looked < looked_max do
  local ids = redis.call('ZRANGE', P .. 'batches:open', from, from + looked_max - 1)
  if #ids == 0 then break end
  from = from + #ids
  for _, id in ipairs(ids) do
    if got >= limit or looked >= looked_max then break end
    local b = bkey(id)
    local f = redis.call('HMGET', b, 'expires_at', 'total', 'next')
    if f[1] and tonumber(f[1]) > nowv then
      looked = looked + 1
      local want = limit - got
      local started = 0
      local due = redis.call('ZRANGEBYSCORE', b .. ':claims', '-inf', now, 'LIMIT', 0, want)
      for _, idx in ipairs(due) do
        local attempts, holder = parse(redis.call('HGET', b .. ':held', idx))
        -- A runner whose lease ran out is gone: that attempt counts. A given-back item was
        -- counted when it was given back, and runs again.
        if holder ~= '' then attempts = attempts + 1 else started = started + 1 end
        redis.call('HSET', b .. ':held', idx, attempts .. ':' .. token)
        redis.call('ZADD', b .. ':claims', till, idx)
        out[#out + 1] = id
        out[#out + 1] = tonumber(idx)
        out[#out + 1] = attempts
      end
      got = got + #due
      local nxt = tonumber(f[3])
      local fresh = math.min(limit - got, tonumber(f[2]) - nxt)
      if fresh > 0 then
        for idx = nxt, nxt + fresh - 1 do
          redis.call('HSET', b .. ':held', idx, '0:' .. token)
          redis.call('ZADD', b .. ':claims', till, idx)
          out[#out + 1] = id
          out[#out + 1] = idx
          out[#out + 1] = 0
        end
        redis.call('HINCRBY', b, 'next', fresh)
        got = got + fresh
        started = started + fresh
      end
      if started > 0 then redis.call('HINCRBY', b, 'running', started) end
    end
  end
end
return out
"""

# ARGV: prefix, token, until, then (id, index) for each claim.
RENEW = """
local token, till = ARGV[2], ARGV[3]
for i = 4, #ARGV, 2 do
  local b = bkey(ARGV[i])
  local v = redis.call('HGET', b .. ':held', ARGV[i + 1])
  if v then
    local _, holder = parse(v)
    if holder == token then redis.call('ZADD', b .. ':claims', 'XX', till, ARGV[i + 1]) end
  end
end
return 1
"""

# ARGV: prefix, token, id, index, not_before, now ('' for Redis's own clock), 1 or 0: an
# attempt is counted.
RELEASE = """
local token, id, idx, not_before, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local attempt = tonumber(ARGV[7])
local b = bkey(id)
local v = redis.call('HGET', b .. ':held', idx)
if not v then return 0 end
local attempts, holder = parse(v)
if holder ~= token then return 0 end
local running = redis.call('HINCRBY', b, 'running', -1)
if redis.call('HGET', b, 'status') == 'canceling' then
  -- It will not be tried again; the batch ends once nothing runs.
  forget(b, idx)
  if running <= 0 then
    if now == '' then
      local t = redis.call('TIME')
      now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
    end
    end_batch(id, now)
  end
  return 1
end
redis.call('HSET', b .. ':held', idx, (attempts + attempt) .. ':')
redis.call('ZADD', b .. ':claims', not_before, idx)
return 1
"""

# ARGV: prefix, id, index, kind, now. Returns the record after it, or nil: not counted.
FINISH = """
local id, idx, kind, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local b = bkey(id)
local status = redis.call('HGET', b, 'status')
if not status or status == 'ended' then return false end
if redis.call('SETBIT', b .. ':done', idx, 1) == 1 then return false end
local v = redis.call('HGET', b .. ':held', idx)
if v then
  local _, holder = parse(v)
  forget(b, idx)
  if holder ~= '' then redis.call('HINCRBY', b, 'running', -1) end
end
redis.call('HINCRBY', b, kind, 1)
local f = redis.call('HMGET', b, 'total', 'succeeded', 'errored', 'running')
local over
if status == 'canceling' then
  over = tonumber(f[4]) <= 0
else
  over = tonumber(f[2]) + tonumber(f[3]) >= tonumber(f[1])
end
if over then end_batch(id, now) end
return redis.call('HGETALL', b)
"""

# ARGV: prefix, now, archive created at or before this. Returns the ids archived.
SWEEP = """
local now, old = ARGV[2], ARGV[3]
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'batches:expiry', '-inf', now)) do
  end_batch(id, now)
end
-- A canceling batch's items whose runners are gone will not finish: it ends without them.
for _, id in ipairs(redis.call('ZRANGE', P .. 'batches:canceling', 0, -1)) do
  local b = bkey(id)
  local lost = redis.call('ZRANGEBYSCORE', b .. ':claims', '-inf', now)
  if #lost > 0 then
    for _, idx in ipairs(lost) do forget(b, idx) end
    local running = redis.call('HINCRBY', b, 'running', -#lost)
    if running <= 0 then end_batch(id, now) end
  end
end
local ids = redis.call('ZRANGEBYSCORE', P .. 'batches:ended', '-inf', old)
for _, id in ipairs(ids) do
  local b = bkey(id)
  redis.call('HSET', b, 'archived_at', now)
  redis.call('DEL', b .. ':done')
  redis.call('ZREM', P .. 'batches:ended', id)
end
return ids
"""

# KEYS: the backend's batch flights, its workers' published loads. ARGV: share, capacity, lease,
# slot. The placement's way (redis_store.py PLACE): Redis's clock, live flights only.
SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local share, capacity, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local batch = redis.call('ZCARD', KEYS[1])
local interactive = 0
local loads = redis.call('HGETALL', KEYS[2])
for i = 1, #loads, 2 do
  local count, ends = string.match(loads[i + 1], '^(%d+):(.*)$')
  if tonumber(ends) > now then
    interactive = interactive + tonumber(count)
  else
    redis.call('HDEL', KEYS[2], loads[i])  -- a worker that stopped publishing
  end
end
if batch >= share or batch + interactive >= capacity then return false end
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
local ms = math.ceil(lease * 1000)
-- The set lives as long as its longest lease (a shorter one never cuts the others short).
if ms > 0 and redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return ARGV[4]
"""


# KEYS: each backend's worker loads (a hash: worker -> "count:ends"). ARGV: worker, ttl, then
# the counts in KEYS' order.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[i + 2] .. ':' .. (now + ttl))
  local ms = math.ceil(ttl * 1000)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
return 0
"""


# KEYS: the backend's batch flights. ARGV: lease, then the slots. Only live slots are renewed:
# one run out may have been taken by another item.
RESLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  local ends = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if ends and tonumber(ends) > now then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
  end
end
local ms = math.ceil(lease * 1000)
if ms > 0 and redis.call('PTTL', KEYS[1]) < ms then redis.call('PEXPIRE', KEYS[1], ms) end
return 0
"""


class BatchScripts:
    """The scripts, registered with a client (no round trip until the first call)."""

    def __init__(self, client: redis.Redis) -> None:
        def script(body: str) -> Script:
            return client.register_script(COMMON + body)

        self.list = script(LIST)
        self.cancel = script(CANCEL)
        self.delete = script(DELETE)
        self.claim = script(CLAIM)
        self.renew = script(RENEW)
        self.release = script(RELEASE)
        self.finish = script(FINISH)
        self.sweep = script(SWEEP)
        self.slot = client.register_script(SLOT)
        self.reslot = client.register_script(RESLOT)
        self.publish = client.register_script(PUBLISH)


class RedisBatches(BatchQueue):
    """The batch methods of app.state.redis_store.RedisStore."""

    prefix: str
    redis: redis.Redis
    batch_scripts: BatchScripts

    @abstractmethod
    def _call(self, work: Callable[[], T]) -> T: ...

    def batch_create(self, record: BatchRecord) -> None:
        p, batch_id = self.prefix, record.id

        def run() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(f"{p}batch:{batch_id}", items=_fields(record))
            pipe.zadd(f"{p}batches", {batch_id: 0})
            pipe.zadd(f"{p}batches:owner:{record.owner}", {batch_id: 0})
            pipe.zadd(f"{p}batches:open", {batch_id: 0})
            pipe.zadd(f"{p}batches:expiry", {batch_id: record.expires_at})
            pipe.execute()

        self._call(run)

    def batch_census(self) -> BatchCensus:
        p = self.prefix

        def count() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            for name in ("open", "canceling", "ended"):
                pipe.zcard(f"{p}batches:{name}")
            pipe.zrange(f"{p}batches:expiry", 0, 0, withscores=True)
            return pipe.execute()

        running, canceling, ended_, first = self._call(count)
        oldest = first[0][1] - EXPIRES_AFTER if first else None
        by_status = {IN_PROGRESS: running, CANCELING: canceling, ENDED: ended_}
        return BatchCensus(by_status, oldest)

    def batch_get(self, batch_id: str) -> BatchRecord | None:
        found = self._call(lambda: self.redis.hgetall(f"{self.prefix}batch:{batch_id}"))
        return _record(found) if found else None

    def batch_list(
        self, owner: str | None, limit: int, before_id: str | None, after_id: str | None
    ) -> BatchPage:
        p = self.prefix
        ids = f"{p}batches" if owner is None else f"{p}batches:owner:{owner}"
        if before_id is not None:
            mode, cursor = "before", before_id  # the ones just after it, reversed below
        elif after_id is not None:
            mode, cursor = "after", after_id
        else:
            mode, cursor = "new", ""
        args: list[Arg] = [p, mode, cursor, limit + 1]
        found = self._call(lambda: self.batch_scripts.list(keys=[ids], args=args))
        records = [_record(fields) for fields in found[:limit] if fields]
        if mode == "before":
            records.reverse()
        return BatchPage(records, len(found) > limit)

    def batch_cancel(self, batch_id: str, now: float) -> BatchRecord | None:
        args: list[Arg] = [self.prefix, batch_id, repr(now)]
        found = self._call(lambda: self.batch_scripts.cancel(args=args))
        return _record(found) if found else None

    def batch_delete(self, batch_id: str) -> bool:
        args: list[Arg] = [self.prefix, batch_id]
        return bool(self._call(lambda: self.batch_scripts.delete(args=args)))

    def batch_claim(self, token: str, now: float, lease: float, limit: int) -> list[Claim]:
        if limit <= 0:
            return []
        args: list[Arg] = [self.prefix, token, repr(now), repr(now + lease), limit, CLAIM_BATCHES]
        found = self._call(lambda: self.batch_scripts.claim(args=args))
        return [
            Claim(_text(found[i]), int(found[i + 1]), int(found[i + 2]))
            for i in range(0, len(found), 3)
        ]

    def batch_renew(self, token: str, claims: list[Claim], now: float, lease: float) -> None:
        if not claims:
            return
        args: list[Arg] = [self.prefix, token, repr(now + lease)]
        for claim in claims:
            args += [claim.batch_id, claim.index]
        self._call(lambda: self.batch_scripts.renew(args=args))

    def batch_release(
        self,
        token: str,
        claim: Claim,
        not_before: float,
        now: float | None = None,
        attempt: bool = True,
    ) -> None:
        args: list[Arg] = [
            self.prefix,
            token,
            claim.batch_id,
            claim.index,
            repr(not_before),
            "" if now is None else repr(now),
            int(attempt),
        ]
        self._call(lambda: self.batch_scripts.release(args=args))

    def batch_finish(self, claim: Claim, kind: str, now: float) -> BatchRecord | None:
        assert kind in DONE_KINDS
        args: list[Arg] = [self.prefix, claim.batch_id, claim.index, kind, repr(now)]
        found = self._call(lambda: self.batch_scripts.finish(args=args))
        return _record(found) if found else None

    def batch_done(self, batch_id: str, start: int, stop: int) -> list[int]:
        if stop <= start:
            return []
        name = f"{self.prefix}batch:{batch_id}:done"
        first = start // 8
        found = self._call(lambda: self.redis.getrange(name, first, (stop - 1) // 8))
        bits = found.encode() if isinstance(found, str) else found
        return [
            i
            for i in range(start, stop)
            if i // 8 - first < len(bits) and bits[i // 8 - first] >> (7 - i % 8) & 1
        ]

    def publish_loads(self, worker: str, loads: dict[str, int], ttl: float) -> None:
        names = list(loads)
        keys = [f"{self.prefix}{WORKER_LOADS}:{name}" for name in names]
        args: list[Arg] = [worker, repr(ttl), *(int(loads[name]) for name in names)]
        if keys:
            self._call(lambda: self.batch_scripts.publish(keys=keys, args=args))

    def batch_slot(self, backend: str, capacity: int, share: int, lease: float) -> str | None:
        p = self.prefix
        keys = [f"{p}f:{BATCH_FLIGHTS}{backend}", f"{p}{WORKER_LOADS}:{backend}"]
        args: list[Arg] = [share, capacity, repr(lease), lease_id()]
        found = self._call(lambda: self.batch_scripts.slot(keys=keys, args=args))
        return _text(found) if found else None

    def batch_reslot(self, backend: str, slots: list[str], lease: float) -> None:
        keys = [f"{self.prefix}f:{BATCH_FLIGHTS}{backend}"]
        args: list[Arg] = [repr(lease), *slots]
        self._call(lambda: self.batch_scripts.reslot(keys=keys, args=args))

    def batch_unslot(self, backend: str, slot: str) -> None:
        self._call(lambda: self.redis.zrem(f"{self.prefix}f:{BATCH_FLIGHTS}{backend}", slot))

    def batch_sweep(self, now: float) -> list[str]:
        args: list[Arg] = [self.prefix, repr(now), repr(now - ARCHIVED_AFTER)]
        found = self._call(lambda: self.batch_scripts.sweep(args=args))
        return [_text(batch_id) for batch_id in found]


def _fields(record: BatchRecord) -> list[Arg]:
    """The record's hash, field after value (a time that is None is left out)."""
    fields: list[Arg] = ["id", record.id, "owner", record.owner, "status", record.status]
    for name in INTS:
        fields += [name, int(getattr(record, name))]
    for name in TIMES:
        value = getattr(record, name)
        if value is not None:
            fields += [name, repr(float(value))]
    return fields


def _record(found: Any) -> BatchRecord:
    """A record from a hash: HGETALL's dict (redis-py) or a script's flat list."""
    if not isinstance(found, dict):
        found = dict(zip(found[::2], found[1::2], strict=True))
    raw = {_text(name): _text(value) for name, value in found.items()}
    times = {name: float(raw[name]) if name in raw else None for name in TIMES}
    return BatchRecord(
        id=raw["id"],
        owner=raw["owner"],
        total=int(raw["total"]),
        created_at=float(raw["created_at"]),
        expires_at=float(raw["expires_at"]),
        status=raw["status"],
        ended_at=times["ended_at"],
        cancel_initiated_at=times["cancel_initiated_at"],
        archived_at=times["archived_at"],
        **{name: int(raw[name]) for name in INTS if name != "total"},
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
