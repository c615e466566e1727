"""Samples a status time series during a run (replica count, queue depth, ...) from a callable
or a JSON URL, for the replicas-against-queue-depth plot."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable, Mapping, Union

import httpx
from pydantic import BaseModel

from load_tests.target import check_target

StatusSource = Union[str, Callable[[], Union[Mapping[str, Any], Awaitable[Mapping[str, Any]]]]]


class TimePoint(BaseModel):
    t_s: float  # from run start
    values: dict[str, float]  # numeric leaves, nested keys joined with "."


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        if isinstance(obj, (int, float)):  # bool is an int: kept as 0/1
            out[prefix] = float(obj)
        return out
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class StatusSampler:
    """Polls `source` every interval_s until stopped. A failed sample is counted, never raised:
    the status endpoint going away must not end a load run."""

    def __init__(self, source: StatusSource, interval_s: float = 1.0, *, allow_remote: bool = False,
                 timeout_s: float = 2.0):
        if isinstance(source, str):
            check_target(source, allow_remote)
        self.source, self.interval_s, self.timeout_s = source, interval_s, timeout_s
        self.points: list[TimePoint] = []
        self.errors = 0

    async def _sample(self, http: httpx.AsyncClient | None) -> Mapping[str, Any]:
        if isinstance(self.source, str):
            resp = await http.get(self.source)
            resp.raise_for_status()
            return resp.json()
        value = self.source()
        return await value if inspect.isawaitable(value) else value

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        """Sample at t0 (perf_counter time of run start) + k * interval_s until `stop` is set."""
        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            k = 0
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(self._sample(http), self.timeout_s)
                    self.points.append(TimePoint(t_s=time.perf_counter() - t0, values=flatten(data)))
                except Exception:  # noqa: BLE001 - see class docstring
                    self.errors += 1
                k += 1
                delay = t0 + k * self.interval_s - time.perf_counter()
                try:
                    await asyncio.wait_for(stop.wait(), max(delay, 0.0))
                except asyncio.TimeoutError:
                    pass
