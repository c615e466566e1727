"""AsyncLLMEngine: runs one LLMEngine's step loop in a background thread and streams each request's chunks
to its asyncio caller.

Every engine mutation happens on the loop thread: callers enqueue add/abort commands and get results
through per-request asyncio queues, filled with one `call_soon_threadsafe` per event loop per step; a
consumer that falls behind takes what piled up as one chunk per choice.
torch releases the GIL in the forward pass, so the replica's event loop stays responsive.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from replicas.engine.config import EngineConfig
from replicas.engine.engine import LLMEngine
from replicas.engine.protocol import EngineStats, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)

_IDLE_TICK_S = 0.5  # the loop wakes at least this often, so `heartbeat` proves it is alive


FAULTS = ("stall", "crash", "slow")


class EngineShutdown(RuntimeError):
    pass


class InjectedCrash(BaseException):
    """Escapes the loop's `except Exception`, so the loop thread dies (fault injection only)."""


@dataclass(frozen=True, slots=True)
class _Add:
    """Admit a request; its chunks go to `queue` on `loop`."""
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, **engine_kwargs):
        self.engine = LLMEngine(config, **engine_kwargs)
        self.heartbeat = time.monotonic()
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False  # set by the loop thread on exit; guarded by _lock with _commands
        self._lock = threading.Lock()
        # request id -> (event loop, queue); touched only on the loop thread.
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._step: Callable[[], list[GenerationChunk]] = self.engine.step  # what the loop runs (inject_fault)
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ caller side (asyncio)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Chunks of one request until its usage-carrying last chunk. A rejected request raises
        EngineError here; if the consumer stops early (cancelled, closed) the request is aborted."""
        if req.sampling.structured is not None:
            # Compile the grammar here, off the loop thread (cached: add_request then finds it), so that a
            # large schema does not stall every other request's step.
            await asyncio.to_thread(self.engine.grammars.compile, req.sampling.structured)
        queue: asyncio.Queue = asyncio.Queue()
        if not self._submit(_Add(req, asyncio.get_running_loop(), queue)):
            raise EngineShutdown("engine is shut down")
        done = False
        ready: collections.deque = collections.deque()
        try:
            while True:
                if not ready:
                    # A consumer that lags (slow client, busy event loop) gets what piled up as one chunk per
                    # choice: every hop to the client costs per chunk, not per token.
                    items = [await queue.get()]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    ready.extend(_coalesce(items) if len(items) > 1 else items)
                item = ready.popleft()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.usage is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; a still-listening caller gets finish_reason "abort"."""
        self._submit(_Abort(request_id))

    def check_workers(self, timeout_s: float) -> None:
        """TP: raise if a worker rank is dead or silent, or a step failed (LLMReplica.check_health)."""
        self.engine.check_workers(timeout_s)

    def cached_block_hashes(self) -> list[int]:
        """Every block hash in the prefix cache now; safe from any thread (LLMEngine.cached_block_hashes)."""
        return self.engine.cached_block_hashes()

    def inject_fault(self, kind: str) -> None:
        """Tests only. "stall": the loop blocks in its next step, forever; "crash": the loop thread dies at its
        next step; "slow": every step takes 50 ms longer. Swaps the step the loop runs, so the serving path
        carries no check for it; a later fault replaces an earlier one (it wraps the real step)."""
        step = self.engine.step
        if kind == "stall":
            never = threading.Event()
            self._step = lambda: never.wait() and []
        elif kind == "crash":
            def crash():
                raise InjectedCrash("injected engine loop crash")
            self._step = crash
        elif kind == "slow":
            def slow():
                time.sleep(0.05)
                return step()
            self._step = slow
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.engine.shutdown()

    def _submit(self, command: _Add | _Abort) -> bool:
        """Queue a command for the loop thread; False once the loop has exited."""
        with self._lock:
            if self._closed:
                return False
            self._commands.append(command)
        self._wake.set()
        return True

    # ------------------------------------------------------------------ loop thread

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self.heartbeat = time.monotonic()
            outbox: list[tuple[str, object]] = []
            self._drain_commands(outbox)
            if engine.has_unfinished():
                try:
                    outbox.extend((c.request_id, c) for c in self._step())
                except Exception as exc:  # outside the forward (which the engine contains): fail all
                    log.exception("engine step crashed; failing every request")
                    for rid in list(engine.requests):
                        engine.abort_request(rid)
                        outbox.append((rid, exc))
                outbox.extend(engine.take_failures())
            self._deliver(outbox)
            if not engine.has_unfinished() and not self._commands:
                self._wake.wait(_IDLE_TICK_S)
                self._wake.clear()
        gone = EngineShutdown("engine is shut down")
        self._deliver([(rid, gone) for rid in list(self._streams)])
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        with self._lock:
            self._closed = True
            pending, self._commands = list(self._commands), collections.deque()
        for command in pending:  # adds that raced with shutdown must not leave their caller waiting
            if isinstance(command, _Add):
                self._send(command.loop, [(command.queue, gone)])

    def _drain_commands(self, outbox: list) -> None:
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, _Add):
                try:
                    self.engine.add_request(command.request)
                except Exception as exc:  # EngineError for bad input: that caller only
                    self._send(command.loop, [(command.queue, exc)])
                    continue
                self._streams[command.request.request_id] = (command.loop, command.queue)
            else:
                outbox.extend((command.request_id, c) for c in self.engine.abort_request(command.request_id))

    def _deliver(self, outbox: list[tuple[str, object]]) -> None:
        """Hand items to their callers: one thread-safe call per event loop."""
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in outbox:
            stream = self._streams.get(rid)
            if stream is None:
                continue  # aborted by its consumer
            if isinstance(item, BaseException) or item.usage is not None:
                del self._streams[rid]
            per_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, items in per_loop.items():
            self._send(loop, items)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, items: list) -> None:
        def put_all():
            for queue, item in items:
                queue.put_nowait(item)
        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


def _coalesce(items: list) -> list:
    """Queued items -> one chunk per choice, each joined in order, ordered by its last part (so the
    usage-carrying last chunk stays last); an error (which ends the stream) stays after them."""
    joined: dict[int, GenerationChunk] = {}
    last: dict[int, int] = {}
    for pos, item in enumerate(items):
        if isinstance(item, BaseException):
            return sorted(joined.values(), key=lambda c: last[c.index]) + items[pos:]
        prev = joined.get(item.index)
        joined[item.index] = item if prev is None else _join(prev, item)
        last[item.index] = pos
    return sorted(joined.values(), key=lambda c: last[c.index])


def _join(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    lp = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return a.model_copy(update={"text": a.text + b.text, "token_ids": a.token_ids + b.token_ids, "logprobs": lp,
                                "finish_reason": b.finish_reason or a.finish_reason, "usage": b.usage or a.usage})
