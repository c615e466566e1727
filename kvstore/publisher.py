"""KVEventPublisher: carries one replica's KV block events (stored / evicted) into the prefix index.

The engine calls `on_blocks_stored` / `on_blocks_evicted` from its own thread on every step: they only
append to a bounded buffer under a lock, never block on I/O and never raise. A background asyncio task
flushes the net effect of the buffered events every `flush_interval_s`, heartbeats the replica's epoch,
and resyncs the whole set (`replace` from `full_set()`) whenever the index may have diverged: at start,
after the buffer overflowed, after a failed write, or when a heartbeat finds its entries gone (Redis
restarted, or the heartbeat expired). Every Redis operation it gives up is reported to `on_fallback(reason)`
("timeout" or "error", the llmc_redis_fallbacks_total reasons), called on the publisher's own loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable, Iterable, Sequence

from redis.exceptions import TimeoutError as RedisTimeoutError

from kvstore.index import Epoch, PrefixIndex

log = logging.getLogger(__name__)


class KVEventPublisher:
    def __init__(self, index: PrefixIndex, model_id: str, replica_id: str, epoch: Epoch, *,
                 full_set: Callable[[], Iterable[int]] | None = None, max_buffer: int = 65536,
                 flush_interval_s: float = 0.05, heartbeat_ttl_s: float = 3.0, retry_s: float = 0.5,
                 sweep_interval_s: float | None = None, on_fallback: Callable[[str], None] | None = None):
        self.index, self.model_id, self.replica_id, self.epoch = index, model_id, replica_id, epoch
        # A thread-safe snapshot of the engine's cached hashes. Without one a resync can only clear.
        self.full_set = full_set or (lambda: ())
        self.max_buffer = max_buffer
        self.flush_interval_s = flush_interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.retry_s = retry_s
        self.sweep_interval_s = heartbeat_ttl_s if sweep_interval_s is None else sweep_interval_s
        self.on_fallback = on_fallback
        self._lock = threading.Lock()
        self._events: list[tuple[bool, Sequence[int]]] = []
        self._buffered = 0
        self._diverged = True  # resync before anything else
        self._task: asyncio.Task | None = None
        # Counters for metrics and tests.
        self.resyncs = 0
        self.overflows = 0
        self.errors = 0
        self.flushed_batches = 0

    # ---------------------------------------------------------------- engine thread (hot path)

    def on_blocks_stored(self, hashes: Sequence[int]) -> None:
        """`hashes` is kept by reference until the next flush: pass a list the engine won't mutate."""
        self._push(True, hashes)

    def on_blocks_evicted(self, hashes: Sequence[int]) -> None:
        self._push(False, hashes)

    def _push(self, stored: bool, hashes: Sequence[int]) -> None:
        try:
            n = len(hashes)
            with self._lock:
                if self._diverged:
                    return  # a resync will read the engine's whole set anyway
                if self._buffered + n > self.max_buffer:
                    self._events.clear()
                    self._buffered = 0
                    self._diverged = True
                    self.overflows += 1
                    return
                self._events.append((stored, hashes))
                self._buffered += n
        except Exception:  # noqa: BLE001 — never into the engine; a resync repairs whatever was lost
            self._diverged = True

    # ---------------------------------------------------------------- background task

    async def start(self) -> None:
        """Start the background task on the running loop; returns at once even if Redis is down."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-publisher-{self.replica_id}")

    async def stop(self) -> None:
        """Stop publishing and drop this epoch's entries (clean shutdown); never raises."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        try:
            await self.index.drop_replica(self.model_id, self.replica_id, self.epoch)
        except Exception as e:  # noqa: BLE001 — entries expire by themselves (heartbeat TTL)
            self._report(e)
            log.warning("kv publisher %s: could not drop entries on stop: %r", self.replica_id, e)

    async def _run(self) -> None:
        next_beat = next_sweep = 0.0
        while True:
            delay = self.flush_interval_s
            try:
                now = time.monotonic()
                if now >= next_beat:
                    if not await self.index.heartbeat(self.model_id, self.replica_id, self.epoch,
                                                      self.heartbeat_ttl_s):
                        self._diverged = True
                    next_beat = now + self.heartbeat_ttl_s / 3
                if self._diverged:
                    await self._resync()
                else:
                    await self._flush()
                if now >= next_sweep:
                    next_sweep = now + self.sweep_interval_s
                    await self.index.sweep(self.model_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — the index is a cache: keep going, resync when back
                self.errors += 1
                self._report(e)
                self._diverged = True
                next_beat = 0.0  # the first thing to do once it answers: prove we are alive
                delay = self.retry_s
                log.debug("kv publisher %s: index unavailable: %r", self.replica_id, e)
            await asyncio.sleep(delay)

    def _report(self, exc: BaseException) -> None:
        if self.on_fallback is None:
            return
        try:
            self.on_fallback("timeout" if isinstance(exc, (TimeoutError, RedisTimeoutError)) else "error")
        except Exception:  # noqa: BLE001 — a metrics problem must not stop the publisher
            log.debug("kv publisher %s: on_fallback failed", self.replica_id, exc_info=True)

    async def _flush(self) -> None:
        with self._lock:
            events, self._events, self._buffered = self._events, [], 0
        if not events:
            return
        added: set[int] = set()
        removed: set[int] = set()
        for stored, hashes in events:  # net effect, in order
            if stored:
                added.update(hashes)
                removed.difference_update(hashes)
            else:
                removed.update(hashes)
                added.difference_update(hashes)
        try:
            await self.index.update(self.model_id, self.replica_id, self.epoch, added, removed)
        except BaseException:
            self._diverged = True  # this batch is lost: only a full resync can repair it
            raise
        self.flushed_batches += 1

    async def _resync(self) -> None:
        # Clear before reading the engine's set: events from here on are re-applied on top of it,
        # and re-applying add/remove events the snapshot already reflects changes nothing.
        with self._lock:
            self._events, self._buffered, self._diverged = [], 0, False
        try:
            snapshot = list(self.full_set())
            await self.index.replace(self.model_id, self.replica_id, self.epoch, snapshot)
        except BaseException:
            self._diverged = True
            raise
        self.resyncs += 1
