"""Admission control: a bound on requests this ingress holds that have not yet received their first token
(queued in front of, or inside, the replicas). Over the bound the request is turned away at once with 429
and Retry-After, so an overloaded cluster sheds load instead of growing queues and every TTFT with them.

The cluster-wide `router.max_queued_requests` is split evenly across the ingress replicas.
"""
from __future__ import annotations

import math

from router.errors import APIError


class Admission:
    def __init__(self, max_queued: int, num_ingress: int = 1, retry_after_s: int = 1):
        self.limit = max(1, math.ceil(max_queued / max(1, num_ingress)))
        self.retry_after_s = retry_after_s
        self.queued = 0

    def admit(self) -> "Ticket":
        if self.queued >= self.limit:
            raise APIError(429, f"server overloaded: {self.queued} requests are waiting for a replica; "
                           "retry later", code="too_many_requests",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.queued += 1
        return Ticket(self)


class Ticket:
    """One admitted request. `started()` on its first token; `release()` when it ends (idempotent)."""
    __slots__ = ("_admission", "_queued")

    def __init__(self, admission: Admission):
        self._admission = admission
        self._queued = True

    @property
    def queued(self) -> bool:
        return self._queued

    def started(self) -> None:
        if self._queued:
            self._queued = False
            self._admission.queued -= 1

    release = started

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
