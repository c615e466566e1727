"""The prefix index: per model and replica, the set of KV block hashes that replica holds.

The router asks "for these candidates, how many LEADING blocks of this prompt does each hold?" in one
Redis round trip; replicas feed it through `kvstore.publisher`. It is a cache: a slow or absent Redis
makes `lookup` return None ("unknown, route by load") and never fails a request.

Redis key layout (`{model}` is a Redis Cluster hash tag, so all keys of one model share a slot and the
Lua scripts may touch them):

    llmc:{model}:reg                   hash  replica_id -> live epoch (the epoch of its latest heartbeat)
    llmc:{model}:hb:{replica}:{epoch}  str   heartbeat, expires after the replica's ttl
    llmc:{model}:r:{replica}:{epoch}   set   block hashes (8-byte little-endian int64), expires after
                                             `entry_ttl_s` unless writes or heartbeats refresh it

Hashes travel packed (a lookup sends the prompt's hashes as one 8-bytes-per-block string): encoding
dozens of separate arguments cost redis-py more than Redis' whole lookup.

An epoch is opaque (one per engine start). A lookup counts a replica's blocks only while the
registry's epoch for it has a live heartbeat: a dead replica (heartbeat expired) or an old epoch
(a restarted engine heartbeated a new one) is ignored at once. Their sets are deleted by the new
epoch's first heartbeat, by `sweep` (publishers call it now and then), or at the latest by their TTL.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import sys
import time
from typing import Iterable, Protocol, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # redis-py depends on async-timeout below 3.11
    from async_timeout import timeout as _timeout

log = logging.getLogger(__name__)

Epoch = str | int

BreakerState = str  # "closed" | "half_open" | "open" (replicas.metrics BREAKER_STATES gives their gauge values)


class PrefixIndex(Protocol):
    lookup_failures: int  # lookups answered None (Redis down, slow, or skipped): exported as a metric
    # Why the latest lookup answered None: "timeout", "error" or "breaker_open" (replicas.metrics
    # LOOKUP_FAILURE_REASONS). Read by the caller right after that lookup returns (no await in between).
    last_failure: str | None

    def breaker_state(self) -> BreakerState:
        """"closed" (lookups go to Redis), "open" (skipped: answered None at once) or "half_open" (the
        skip period is over but Redis has not answered since: the next lookups probe it)."""

    async def add(self, model_id: str, replica_id: str, epoch: Epoch, hashes: Iterable[int]) -> None: ...

    async def remove(self, model_id: str, replica_id: str, epoch: Epoch, hashes: Iterable[int]) -> None: ...

    async def update(self, model_id: str, replica_id: str, epoch: Epoch, added: Iterable[int],
                     removed: Iterable[int]) -> None:
        """add + remove in one round trip (the sets must be disjoint)."""

    async def replace(self, model_id: str, replica_id: str, epoch: Epoch, hashes: Iterable[int]) -> None:
        """Full resync: the replica holds exactly `hashes` now."""

    async def lookup(self, model_id: str, block_hashes: Sequence[int],
                     replica_ids: Sequence[str]) -> dict[str, int] | None:
        """Leading blocks of `block_hashes` each candidate holds (0 for unknown or dead); None = unknown."""

    async def heartbeat(self, model_id: str, replica_id: str, epoch: Epoch, ttl_s: float) -> bool:
        """Mark this epoch live for `ttl_s`. False when its entries may be gone (first beat, expired,
        Redis restarted): the caller then resyncs with `replace`."""

    async def drop_replica(self, model_id: str, replica_id: str, epoch: Epoch | None = None) -> None:
        """Forget the replica (only if `epoch` is still its live one, when given)."""

    async def sweep(self, model_id: str) -> int:
        """Delete the entries of replicas whose heartbeat expired; returns how many were dropped."""

    async def warm(self) -> None:
        """Get ready for the first lookup (connect, load scripts); never raises."""

    async def close(self) -> None: ...


# ---------------------------------------------------------------- Redis

# KEYS[1] reg · ARGV: prefix, n, replica ids (n), packed block hashes. Walks each candidate's blocks
# in chunks and stops at its first miss, so a cold replica costs one SMISMEMBER.
_LOOKUP = """
local p, n = ARGV[1], tonumber(ARGV[2])
local blob = ARGV[3 + n]
local blocks = {}
for b = 1, #blob, 8 do blocks[#blocks + 1] = string.sub(blob, b, b + 7) end
local last = #blocks
local out = {}
for i = 1, n do
  local rid = ARGV[2 + i]
  local held = 0
  local epoch = redis.call('HGET', KEYS[1], rid)
  if epoch and redis.call('EXISTS', p .. 'hb:' .. rid .. ':' .. epoch) == 1 then
    local set = p .. 'r:' .. rid .. ':' .. epoch
    local j = 1
    while j <= last do
      local hi = math.min(j + 31, last)
      local hits = redis.call('SMISMEMBER', set, unpack(blocks, j, hi))
      local k = 1
      while k <= #hits and hits[k] == 1 do k = k + 1 end
      held = held + k - 1
      if k <= #hits then break end
      j = hi + 1
    end
  end
  out[i] = held
end
return out
"""

# KEYS[1] reg · ARGV: prefix, replica, epoch, ttl ms, entry ttl ms. Returns 1 if the heartbeat was
# still alive (entries intact), else 0.
_HEARTBEAT = """
local p, rid, epoch = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HGET', KEYS[1], rid)
if old and old ~= epoch then
  redis.call('DEL', p .. 'r:' .. rid .. ':' .. old, p .. 'hb:' .. rid .. ':' .. old)
end
redis.call('HSET', KEYS[1], rid, epoch)
local hb = p .. 'hb:' .. rid .. ':' .. epoch
local alive = redis.call('EXISTS', hb)
redis.call('SET', hb, '1', 'PX', ARGV[4])
redis.call('PEXPIRE', p .. 'r:' .. rid .. ':' .. epoch, ARGV[5])
return alive
"""

# KEYS[1] reg · ARGV: prefix, replica, epoch or ''.
_DROP = """
local p, rid, want = ARGV[1], ARGV[2], ARGV[3]
local epoch = redis.call('HGET', KEYS[1], rid)
if epoch and (want == '' or want == epoch) then
  redis.call('HDEL', KEYS[1], rid)
  redis.call('DEL', p .. 'r:' .. rid .. ':' .. epoch, p .. 'hb:' .. rid .. ':' .. epoch)
end
if want ~= '' and want ~= epoch then
  redis.call('DEL', p .. 'r:' .. rid .. ':' .. want, p .. 'hb:' .. rid .. ':' .. want)
end
return 0
"""

# KEYS[1] reg · ARGV: prefix.
_SWEEP = """
local p = ARGV[1]
local reg = redis.call('HGETALL', KEYS[1])
local dropped = 0
for i = 1, #reg, 2 do
  local rid, epoch = reg[i], reg[i + 1]
  if redis.call('EXISTS', p .. 'hb:' .. rid .. ':' .. epoch) == 0 then
    redis.call('HDEL', KEYS[1], rid)
    redis.call('DEL', p .. 'r:' .. rid .. ':' .. epoch)
    dropped = dropped + 1
  end
end
return dropped
"""


def _packed(hashes: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}q", *hashes)


def _members(hashes: Iterable[int]) -> list[bytes]:
    hashes = hashes if isinstance(hashes, (list, tuple)) else list(hashes)
    blob = _packed(hashes)
    return [blob[i:i + 8] for i in range(0, len(blob), 8)]


class RedisPrefixIndex:
    """`lookup` is bounded by `timeout_s` and, after a failure, skips Redis for `breaker_s` (answers
    None at once) so that a dead Redis costs the router nothing. Writes get `write_timeout_s`."""

    def __init__(self, url: str, *, timeout_s: float = 0.005, write_timeout_s: float = 1.0,
                 breaker_s: float = 1.0, entry_ttl_s: float = 600.0, key_prefix: str = "llmc"):
        self.timeout_s = timeout_s
        self.write_timeout_s = write_timeout_s
        self.breaker_s = breaker_s
        self.entry_ttl_ms = int(entry_ttl_s * 1000)
        self.key_prefix = key_prefix
        self.lookup_failures = 0
        self.last_failure: str | None = None
        self._skip_until = 0.0
        self._ok = True  # last lookup succeeded: log transitions only, not every failed lookup
        # No client-side retries: a timed-out or refused command reconnects on the next call instead
        # of spending this one's budget. No CLIENT SETINFO: one round trip less per (re)connect.
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=write_timeout_s, socket_timeout=write_timeout_s,
            retry=Retry(NoBackoff(), 0), lib_name=None, lib_version=None)
        self._lookup = self._redis.register_script(_LOOKUP)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._drop = self._redis.register_script(_DROP)
        self._sweep = self._redis.register_script(_SWEEP)

    def _p(self, model_id: str) -> str:
        return f"{self.key_prefix}:{{{model_id}}}:"

    def _set(self, model_id: str, replica_id: str, epoch: Epoch) -> str:
        return f"{self._p(model_id)}r:{replica_id}:{epoch}"

    async def lookup(self, model_id: str, block_hashes: Sequence[int],
                     replica_ids: Sequence[str]) -> dict[str, int] | None:
        if not block_hashes or not replica_ids:
            return dict.fromkeys(replica_ids, 0)
        if time.monotonic() < self._skip_until:
            self.lookup_failures += 1
            self.last_failure = "breaker_open"
            return None
        try:
            async with _timeout(self.timeout_s):
                held = await self._lookup(keys=[self._p(model_id) + "reg"],
                                          args=[self._p(model_id), len(replica_ids), *replica_ids,
                                                _packed(block_hashes)])
        except Exception as e:  # noqa: BLE001 — any Redis trouble means "unknown", never an error
            self.lookup_failures += 1
            # asyncio's budget raises TimeoutError; redis-py's socket timeout its own TimeoutError.
            self.last_failure = ("timeout" if isinstance(e, (TimeoutError, asyncio.TimeoutError, RedisTimeoutError))
                                 else "error")
            self._skip_until = time.monotonic() + self.breaker_s
            if self._ok:
                self._ok = False
                log.warning("prefix index lookup failed (%r): routing by load until it answers", e)
            return None
        if not self._ok:
            self._ok = True
            log.warning("prefix index answers again")
        return dict(zip(replica_ids, held))

    def breaker_state(self) -> BreakerState:
        # Open while failed lookups are being skipped; past that, half-open until a lookup reaches Redis
        # and comes back (every lookup in between is a probe: there is no single trial request).
        if time.monotonic() < self._skip_until:
            return "open"
        return "closed" if self._ok else "half_open"

    async def add(self, model_id, replica_id, epoch, hashes) -> None:
        await self.update(model_id, replica_id, epoch, hashes, ())

    async def remove(self, model_id, replica_id, epoch, hashes) -> None:
        await self.update(model_id, replica_id, epoch, (), hashes)

    async def update(self, model_id, replica_id, epoch, added, removed) -> None:
        added, removed = _members(added), _members(removed)
        if not added and not removed:
            return
        key = self._set(model_id, replica_id, epoch)
        pipe = self._redis.pipeline(transaction=False)
        if removed:
            pipe.srem(key, *removed)
        if added:
            pipe.sadd(key, *added)
            pipe.pexpire(key, self.entry_ttl_ms)
        async with _timeout(self.write_timeout_s):
            await pipe.execute()

    async def replace(self, model_id, replica_id, epoch, hashes) -> None:
        key = self._set(model_id, replica_id, epoch)
        hashes = _members(hashes)
        pipe = self._redis.pipeline(transaction=True)  # readers never see the set half-rebuilt
        pipe.delete(key)
        for i in range(0, len(hashes), 8192):
            pipe.sadd(key, *hashes[i:i + 8192])
        pipe.pexpire(key, self.entry_ttl_ms)
        async with _timeout(self.write_timeout_s):
            await pipe.execute()

    async def heartbeat(self, model_id, replica_id, epoch, ttl_s) -> bool:
        p = self._p(model_id)
        async with _timeout(self.write_timeout_s):
            alive = await self._heartbeat(keys=[p + "reg"], args=[p, replica_id, str(epoch),
                                                                  max(1, int(ttl_s * 1000)), self.entry_ttl_ms])
        return bool(alive)

    async def drop_replica(self, model_id, replica_id, epoch=None) -> None:
        p = self._p(model_id)
        async with _timeout(self.write_timeout_s):
            await self._drop(keys=[p + "reg"], args=[p, replica_id, "" if epoch is None else str(epoch)])

    async def sweep(self, model_id) -> int:
        p = self._p(model_id)
        async with _timeout(self.write_timeout_s):
            return int(await self._sweep(keys=[p + "reg"], args=[p]))

    async def warm(self) -> None:
        # The first lookup would otherwise pay connect + EVALSHA (NOSCRIPT) + SCRIPT LOAD + EVALSHA: four
        # round trips against its few-ms budget, on a router loop that is busiest when a fleet starts.
        try:
            async with _timeout(self.write_timeout_s):
                await self._redis.script_load(_LOOKUP)
        except Exception as e:  # noqa: BLE001 — the lookup copes (None) if Redis is still away
            log.debug("prefix index warm-up failed: %r", e)

    async def close(self) -> None:
        await self._redis.aclose()


# ---------------------------------------------------------------- in-process (router unit tests only)


class InMemoryPrefixIndex:
    """Same semantics as RedisPrefixIndex (epochs, heartbeat expiry) in one process; never fails."""

    def __init__(self, clock=time.monotonic):
        self.lookup_failures = 0
        self.last_failure: str | None = None
        self._clock = clock
        self._sets: dict[tuple[str, str, str], set[int]] = {}
        self._live: dict[tuple[str, str], str] = {}  # (model, replica) -> epoch
        self._beats: dict[tuple[str, str, str], float] = {}  # (model, replica, epoch) -> expiry

    def _alive(self, model_id: str, replica_id: str, epoch: str) -> bool:
        return self._beats.get((model_id, replica_id, epoch), 0.0) > self._clock()

    async def lookup(self, model_id, block_hashes, replica_ids):
        out = {}
        for rid in replica_ids:
            epoch = self._live.get((model_id, rid))
            held = 0
            if epoch is not None and self._alive(model_id, rid, epoch):
                blocks = self._sets.get((model_id, rid, epoch), ())
                for h in block_hashes:
                    if h not in blocks:
                        break
                    held += 1
            out[rid] = held
        return out

    async def add(self, model_id, replica_id, epoch, hashes) -> None:
        await self.update(model_id, replica_id, epoch, hashes, ())

    async def remove(self, model_id, replica_id, epoch, hashes) -> None:
        await self.update(model_id, replica_id, epoch, (), hashes)

    async def update(self, model_id, replica_id, epoch, added, removed) -> None:
        blocks = self._sets.setdefault((model_id, replica_id, str(epoch)), set())
        blocks.difference_update(removed)
        blocks.update(added)

    async def replace(self, model_id, replica_id, epoch, hashes) -> None:
        self._sets[(model_id, replica_id, str(epoch))] = set(hashes)

    async def heartbeat(self, model_id, replica_id, epoch, ttl_s) -> bool:
        epoch = str(epoch)
        old = self._live.get((model_id, replica_id))
        if old is not None and old != epoch:
            self._sets.pop((model_id, replica_id, old), None)
            self._beats.pop((model_id, replica_id, old), None)
        self._live[(model_id, replica_id)] = epoch
        alive = self._alive(model_id, replica_id, epoch)
        self._beats[(model_id, replica_id, epoch)] = self._clock() + ttl_s
        return alive

    async def drop_replica(self, model_id, replica_id, epoch=None) -> None:
        live = self._live.get((model_id, replica_id))
        target = live if epoch is None else str(epoch)
        self._sets.pop((model_id, replica_id, target), None)
        self._beats.pop((model_id, replica_id, target), None)
        if live is not None and live == target:
            del self._live[(model_id, replica_id)]

    async def sweep(self, model_id) -> int:
        dead = [(m, r, e) for (m, r), e in self._live.items() if m == model_id and not self._alive(m, r, e)]
        for m, r, e in dead:
            del self._live[(m, r)]
            self._sets.pop((m, r, e), None)
            self._beats.pop((m, r, e), None)
        return len(dead)

    def breaker_state(self) -> BreakerState:
        return "closed"

    async def warm(self) -> None:
        pass

    async def close(self) -> None:
        pass
