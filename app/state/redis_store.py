"""The engine for several hosts: Redis, through redis-py, every operation one Lua script (or
one pipeline), so it is atomic and one round trip. Time is Redis's own (``TIME``), so hosts
whose clocks differ still share one rate.

The keys, under a prefix (``gw:`` by default):

    {prefix}b:{key}:{bucket}           a bucket's tat (seconds), expiring once it is whole again
    {prefix}l:{key}                    the key's leases, a sorted set scored by their expiry
    {prefix}t:{key}:{budget}:{period}  tokens spent of a budget in one period
    {prefix}u:{day}                    usage of a day, a hash of [key, model] | metric -> count
    {prefix}days                       the days that have usage
    {prefix}th:{id}                    a stored conversation (hash: owner, body, continued, claimed)
    {prefix}f:{backend}                a backend's requests in flight, a sorted set scored by expiry
    {prefix}a:{hash}                   the backend that served a conversation (or session) last
    {prefix}aidx                       those entries, scored by expiry (to keep them bounded)
    {prefix}batch:{id}, {prefix}batches...  message batches (app/state/redis_batches.py)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import redis

from app.state.redis_batches import BatchScripts, RedisBatches
from app.state.store import (
    THREAD_FOUND,
    USAGE_COUNTS,
    Ask,
    Placed,
    Placement,
    Settlement,
    Store,
    StoreUnavailable,
    Usage,
    UsageRow,
    Verdict,
    budget_standing,
    lease_id,
    standing,
)

TIMEOUT = 0.5  # seconds for a connection or a command: a slow store fails open (or closed) fast
METRICS = USAGE_COUNTS

# KEYS: n bucket keys, m budget keys, the lease set. ARGV: n, (per, capacity, cost) * n,
# m, (limit, cost, keep) * m, max_concurrent, lease_ttl, lease_id.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local eps = 1e-9
local n = tonumber(ARGV[1])
local i = 2
local tats, news = {}, {}
for b = 1, n do
  local per, cap, cost = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local tat = tonumber(redis.call('GET', KEYS[b]) or '0')
  tats[b] = tat
  if cost > cap + eps then
    return {'refused', 'bucket', b, 'inf', tostring(now), tostring(tat)}
  end
  local new = math.max(tat, now) + cost * per
  local over = new - now - cap * per
  if over > eps then
    return {'refused', 'bucket', b, tostring(over), tostring(now), tostring(tat)}
  end
  news[b] = new
end
local m = tonumber(ARGV[i])
i = i + 1
local useds = {}
for j = 1, m do
  local limit, cost = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 3
  local used = tonumber(redis.call('GET', KEYS[n + j]) or '0')
  if used + cost > limit then
    return {'refused', 'budget', j, tostring(used), tostring(now)}
  end
  useds[j] = used + cost
end
local max_concurrent, lease_ttl, lease = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2]
local leases = KEYS[n + m + 1]
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= max_concurrent then
    return {'refused', 'concurrent', 0, '1', tostring(now)}
  end
  redis.call('ZADD', leases, now + lease_ttl, lease)
  redis.call('PEXPIRE', leases, math.ceil(lease_ttl * 1000))
end
i = 2
for b = 1, n do
  local per = tonumber(ARGV[i])
  i = i + 3
  redis.call('SET', KEYS[b], tostring(news[b]), 'PX', math.ceil((news[b] - now) * 1000) + 1000)
end
i = i + 1
for j = 1, m do
  local cost, keep = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  redis.call('INCRBY', KEYS[n + j], cost)
  redis.call('EXPIRE', KEYS[n + j], math.ceil(keep))
end
local out = {'admitted', tostring(now)}
for b = 1, n do out[#out + 1] = tostring(news[b]) end
for j = 1, m do out[#out + 1] = tostring(useds[j]) end
return out
"""

# KEYS: the lease set, n bucket keys, m budget keys. ARGV: lease_id, n, (per, units) * n,
# m, (tokens, keep) * m.
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local n = tonumber(ARGV[2])
local i = 3
for b = 1, n do
  local per, units = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  local tat = tonumber(redis.call('GET', KEYS[1 + b]) or tostring(now))
  local new = math.max(tat, now) - units * per
  if new > now then
    redis.call('SET', KEYS[1 + b], tostring(new), 'PX', math.ceil((new - now) * 1000) + 1000)
  else
    redis.call('DEL', KEYS[1 + b])
  end
end
local m = tonumber(ARGV[i])
i = i + 1
for j = 1, m do
  local tokens, keep = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  local used = redis.call('INCRBY', KEYS[1 + n + j], tokens)
  if used < 0 then redis.call('SET', KEYS[1 + n + j], 0) end
  redis.call('EXPIRE', KEYS[1 + n + j], math.ceil(keep))
end
return 1
"""

# KEYS: the candidates' flight sets (n), the lookups (m; the last is the session's when ARGV[3]
# is 1), the keys to remember (r), the memory's index. ARGV: n, m, session (0/1), r, lease_ttl,
# lease, memory_ttl, max_entries, hit_factor, new_factor, then the n candidates' names.
# The choice is app/state/store.py ``choose``, step for step. Returns {backend, routed, loads...}.
PLACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local n, m, session, r = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[4])
local lease_ttl, lease, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local max_entries, hit_factor, new_factor = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local names, loads, index = {}, {}, {}
local total, least = 0, nil
for i = 1, n do
  names[i] = ARGV[10 + i]
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  loads[i] = redis.call('ZCARD', KEYS[i])
  index[names[i]] = i
  total = total + loads[i]
  if least == nil or loads[i] < loads[least] then least = i end
end
local known, by_session = nil, false
if m > 0 then
  local found = redis.call('MGET', unpack(KEYS, n + 1, n + m))
  for j = 1, m do
    if found[j] then
      known = found[j]
      by_session = session and j == m
      break
    end
  end
end
local chosen, routed = least, 'new'
if known then
  local k = index[known]
  if k == nil then
    routed = 'failover'
  else
    local factor = hit_factor
    if by_session then factor = new_factor end
    local bound = math.ceil(factor * (total + 1) / n - 1e-9)
    if loads[k] + 1 <= bound then
      chosen = k
      if by_session then routed = 'session' else routed = 'prefix' end
    else
      routed = 'spilled'
    end
  end
end
redis.call('ZADD', KEYS[chosen], now + lease_ttl, lease)
redis.call('PEXPIRE', KEYS[chosen], math.ceil(lease_ttl * 1000))
local idx = KEYS[n + m + r + 1]
if r > 0 then
  for j = n + m + 1, n + m + r do
    redis.call('SET', KEYS[j], names[chosen], 'PX', math.ceil(ttl * 1000))
    redis.call('ZADD', idx, now + ttl, KEYS[j])
  end
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
  local over = redis.call('ZCARD', idx) - max_entries
  if over > 0 then
    local oldest = redis.call('ZPOPMIN', idx, over)
    for j = 1, #oldest, 2 do redis.call('DEL', oldest[j]) end
  end
end
local out = {names[chosen], routed}
for i = 1, n do out[#out + 1] = loads[i] end
return out
"""

# KEYS: the old flight set, the new one, the keys to remember, the memory's index.
# ARGV: lease, lease_ttl, memory_ttl, backend.
MOVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease_ttl, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now + lease_ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ttl * 1000))
for j = 3, #KEYS - 1 do
  redis.call('SET', KEYS[j], ARGV[4], 'PX', math.ceil(ttl * 1000))
  redis.call('ZADD', KEYS[#KEYS], now + ttl, KEYS[j])
end
return 1
"""

# KEYS: the thread. ARGV: owner, hold (s). Returns {status, body}.
CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local found = redis.call('HMGET', KEYS[1], 'owner', 'continued', 'claimed', 'body')
if not found[1] or found[1] ~= ARGV[1] then return {'thread_not_found', ''} end
if found[2] == '1' then return {'thread_already_continued', ''} end
if tonumber(found[3] or '0') > now then return {'thread_continue_in_flight', ''} end
redis.call('HSET', KEYS[1], 'claimed', tostring(now + tonumber(ARGV[2])))
return {'found', found[4]}
"""

# KEYS: the thread continued (or released), the new thread (finish only).
# ARGV: 'finish' or 'release'; for finish: owner, body, ttl (ms).
END = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if ARGV[1] == 'finish' then redis.call('HSET', KEYS[1], 'continued', 1) end
  redis.call('HSET', KEYS[1], 'claimed', 0)
end
if ARGV[1] == 'finish' then
  redis.call('HSET', KEYS[2], 'owner', ARGV[2], 'body', ARGV[3], 'continued', 0, 'claimed', 0)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
end
return 1
"""


T = TypeVar("T")

# What a script's ARGV may hold (redis-py encodes each).
Arg = str | bytes | int | float


class RedisStore(Store, RedisBatches):
    def __init__(self, url: str, prefix: str = "gw:") -> None:
        self.prefix = prefix
        self.redis = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, health_check_interval=30
        )
        self.admit_script = self.redis.register_script(ADMIT)
        self.settle_script = self.redis.register_script(SETTLE)
        self.claim_script = self.redis.register_script(CLAIM)
        self.end_script = self.redis.register_script(END)
        self.place_script = self.redis.register_script(PLACE)
        self.move_script = self.redis.register_script(MOVE)
        self.batch_scripts = BatchScripts(self.redis)

    def _call(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from None

    # --- limits -----------------------------------------------------------------------------

    def admit(self, ask: Ask) -> Verdict:
        p = self.prefix
        keys = [f"{p}b:{ask.key}:{b.name}" for b, _ in ask.takes]
        keys += [f"{p}t:{ask.key}:{budget.name}:{budget.period}" for budget, _ in ask.spends]
        keys.append(f"{p}l:{ask.key}")
        args: list[Arg] = [len(ask.takes)]
        for bucket, cost in ask.takes:
            args += [repr(bucket.per), repr(bucket.capacity), repr(float(cost))]
        args.append(len(ask.spends))
        for budget, cost in ask.spends:
            args += [budget.limit, int(cost), repr(budget.keep)]
        lease = lease_id()
        args += [ask.max_concurrent, repr(ask.lease_ttl), lease]
        reply = [_text(x) for x in self._call(lambda: self.admit_script(keys=keys, args=args))]
        return self._verdict(ask, reply, lease)

    def _verdict(self, ask: Ask, reply: list[str], lease: str) -> Verdict:
        if reply[0] == "admitted":
            now = float(reply[1])
            verdict = Verdict(admitted=True, lease=lease if ask.max_concurrent else None)
            values = reply[2:]
            for (bucket, _), tat in zip(ask.takes, values, strict=False):
                verdict.standing[bucket.name] = standing(float(tat), now, bucket)
            for (budget, _), used in zip(ask.spends, values[len(ask.takes) :], strict=False):
                verdict.standing[budget.name] = budget_standing(budget, int(float(used)))
            return verdict
        kind, index, detail, now = reply[1], int(reply[2]), reply[3], float(reply[4])
        verdict = Verdict(admitted=False)
        if kind == "bucket":
            bucket = ask.takes[index - 1][0]
            verdict.refused = bucket.name
            verdict.retry_after = None if detail == "inf" else float(detail)
            verdict.standing[bucket.name] = standing(float(reply[5]), now, bucket)
        elif kind == "budget":
            budget, cost = ask.spends[index - 1]
            verdict.refused = budget.name
            verdict.retry_after = None if cost > budget.limit else budget.ends_in
            verdict.standing[budget.name] = budget_standing(budget, int(float(detail)))
        else:
            verdict.refused, verdict.retry_after = "concurrent", 1.0
        return verdict

    def settle(self, settlement: Settlement) -> None:
        p, key = self.prefix, settlement.key
        keys = [f"{p}l:{key}"]
        keys += [f"{p}b:{key}:{b.name}" for b, _ in settlement.corrections]
        keys += [f"{p}t:{key}:{b.name}:{b.period}" for b, _ in settlement.budget_corrections]
        args: list[Arg] = [settlement.lease or "", len(settlement.corrections)]
        for bucket, units in settlement.corrections:
            args += [repr(bucket.per), repr(float(units))]
        args.append(len(settlement.budget_corrections))
        for budget, tokens in settlement.budget_corrections:
            args += [int(tokens), repr(budget.keep)]
        self._call(lambda: self.settle_script(keys=keys, args=args))

    def add_usage(self, records: list[Usage]) -> None:
        p = self.prefix

        def run() -> None:
            pipe = self.redis.pipeline(transaction=True)
            for usage in records:
                field = json.dumps([usage.key, usage.model])
                for metric in METRICS:
                    value = getattr(usage, metric)
                    if value:
                        pipe.hincrby(f"{p}u:{usage.day}", f"{field}|{metric}", value)
            pipe.sadd(f"{p}days", *{usage.day for usage in records})
            pipe.execute()

        if records:
            self._call(run)

    def usage(self, since: str, until: str, key: str | None, model: str | None) -> list[UsageRow]:
        p = self.prefix
        days = sorted(d for d in map(_text, self._call(lambda: self.redis.smembers(f"{p}days"))))
        days = [d for d in days if since <= d <= until]
        rows: list[UsageRow] = []
        for day in days:
            counts: dict[tuple[str, str], dict[str, int]] = {}
            raw = self._call(partial(self.redis.hgetall, f"{p}u:{day}"))
            for field, value in raw.items():
                names, _, metric = _text(field).rpartition("|")
                row_key, row_model = json.loads(names)
                counts.setdefault((row_key, row_model), {})[metric] = int(value)
            for (row_key, row_model), c in sorted(counts.items()):
                if (key is None or row_key == key) and (model is None or row_model == model):
                    rows.append(UsageRow(day, row_key, row_model, *(c.get(m, 0) for m in METRICS)))
        return rows

    def in_flight(self, keys: list[str]) -> dict[str, int]:
        def run() -> list[int]:
            now = self.redis.time()
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.zcount(f"{self.prefix}l:{key}", f"({now[0] + now[1] / 1e6}", "+inf")
            return pipe.execute()

        return dict(zip(keys, self._call(run), strict=True))

    # --- placement on backends ---------------------------------------------------------------

    def place(self, placement: Placement) -> Placed:
        p = self.prefix
        lookups = placement.lookups + ([placement.session] if placement.session else [])
        keys = [f"{p}f:{name}" for name in placement.candidates]
        keys += [f"{p}a:{key}" for key in lookups]
        keys += [f"{p}a:{key}" for key in placement.remember]
        keys.append(f"{p}aidx")
        args: list[Arg] = [
            len(placement.candidates),
            len(lookups),
            1 if placement.session else 0,
            len(placement.remember),
            repr(placement.lease_ttl),
            lease := lease_id(),
            repr(placement.memory_ttl),
            placement.max_entries,
            repr(placement.hit_factor),
            repr(placement.new_factor),
            *placement.candidates,
        ]
        reply = self._call(lambda: self.place_script(keys=keys, args=args))
        loads = {name: int(x) for name, x in zip(placement.candidates, reply[2:], strict=True)}
        return Placed(_text(reply[0]), lease, _text(reply[1]), loads)

    def moved(
        self, lease: str, old: str, new: str, lease_ttl: float, remember: list[str], ttl: float
    ) -> None:
        p = self.prefix
        keys = [f"{p}f:{old}", f"{p}f:{new}", *(f"{p}a:{key}" for key in remember), f"{p}aidx"]
        args: list[Arg] = [lease, repr(lease_ttl), repr(ttl), new]
        self._call(lambda: self.move_script(keys=keys, args=args))

    def unplace(self, backend: str, lease: str) -> None:
        self._call(lambda: self.redis.zrem(f"{self.prefix}f:{backend}", lease))

    def backend_loads(self, backends: list[str]) -> dict[str, int]:
        def run() -> list[int]:
            now = self.redis.time()
            pipe = self.redis.pipeline(transaction=False)
            for name in backends:
                pipe.zcount(f"{self.prefix}f:{name}", f"({now[0] + now[1] / 1e6}", "+inf")
            return pipe.execute()

        return dict(zip(backends, self._call(run), strict=True))

    # --- threads ----------------------------------------------------------------------------

    def put_thread(self, thread_id: str, owner: str, body: bytes, ttl: float) -> None:
        name = f"{self.prefix}th:{thread_id}"

        def run() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(name, mapping={"owner": owner, "body": body, "continued": 0, "claimed": 0})
            pipe.pexpire(name, int(ttl * 1000))
            pipe.execute()

        self._call(run)

    def claim_thread(self, thread_id: str, owner: str, hold: float) -> tuple[str, bytes | None]:
        name = f"{self.prefix}th:{thread_id}"
        status, body = self._call(lambda: self.claim_script(keys=[name], args=[owner, repr(hold)]))
        status = _text(status)
        return status, (bytes(body) if status == THREAD_FOUND else None)

    def finish_thread(
        self, previous_id: str, thread_id: str, owner: str, body: bytes, ttl: float
    ) -> None:
        keys = [f"{self.prefix}th:{previous_id}", f"{self.prefix}th:{thread_id}"]
        args: list[Arg] = ["finish", owner, body, int(ttl * 1000)]
        self._call(lambda: self.end_script(keys=keys, args=args))

    def release_thread(self, thread_id: str) -> None:
        name = f"{self.prefix}th:{thread_id}"
        self._call(lambda: self.end_script(keys=[name], args=["release"]))

    # --- plumbing ---------------------------------------------------------------------------

    def ping(self) -> None:
        self._call(self.redis.ping)

    def close(self) -> None:
        self.redis.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
