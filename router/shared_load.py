"""SharedLoad: a value the ingress loads lazily, once, for all requests (the tokenizer and model limits).

The load runs as a task that no request owns: it is created in an empty `contextvars.Context`, so Ray
Serve does not see its handle calls as children of whichever request happened to start it (Serve
cancels a request's child calls when that request's client goes away), and callers await it through
`asyncio.shield`, so a caller that gives up leaves it running for the next. A load that ends in any
way but success, cancellation included, is forgotten and the next caller starts a new one: no single
failure can poison the value for good.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("llm_cluster.router")


class LoadCancelled(RuntimeError):
    """The shared load was cancelled while this caller waited for it (not this caller's own cancellation)."""


class SharedLoad(Generic[T]):
    def __init__(self, load: Callable[..., Awaitable[T]], name: str):
        self._load = load
        self.name = name
        self.value: T | None = None
        self._task: asyncio.Task | None = None

    def _start(self, *args) -> asyncio.Task:
        task = self._task
        if task is None or task.done():  # a finished task here failed or was cancelled: start again
            task = self._task = asyncio.get_running_loop().create_task(
                self._run(*args), name=f"load-{self.name}", context=contextvars.Context())
        return task

    async def _run(self, *args) -> T:
        value = await self._load(*args)
        self.value = value
        return value

    async def get(self, *args) -> T:
        """The value, loading it if needed; `args` go to the load function when this call starts one."""
        if self.value is not None:
            return self.value
        task = self._start(*args)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _cancelling():
                # The load itself was cancelled, not this caller: a clean, retryable failure.
                raise LoadCancelled(f"loading {self.name} was cancelled") from None
            raise

    def start_in_background(self, retry_s: float = 1.0) -> asyncio.Task:
        """Keep loading until it succeeds, from now on (at start-up, before any request asks)."""
        async def until_loaded():
            while self.value is None:
                try:
                    await self.get()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - not there yet (no replica): try again
                    log.debug("background load of %s failed (%r); retrying", self.name, e)
                    await asyncio.sleep(retry_s)
        return asyncio.get_running_loop().create_task(until_loaded(), name=f"preload-{self.name}",
                                                      context=contextvars.Context())


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
