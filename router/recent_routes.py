"""RecentRoutes: one router's own recent decisions, its prefix estimate when the prefix index is late.

Block hash -> the replica this router last sent a prompt holding that block to, LRU-bounded to
`max_blocks` entries. Hashes are chained, so block i maps to replica r only if r took a prompt that began
with every block up to i: r computed that prefix. Whether r still caches it, and what other routers sent,
only Redis knows; the router therefore asks Redis first and reads this only when Redis did not answer.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence


class RecentRoutes:
    __slots__ = ("max_blocks", "_owner")

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._owner: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def record(self, hashes: Sequence[int], replica: str) -> None:
        """`replica` took a prompt with these chained block hashes."""
        owner = self._owner
        # Leading blocks touched last (freshest): the LRU drops a chain's tail before its head, so what is
        # left of a chain is always a prefix of it.
        for h in reversed(hashes[:self.max_blocks]):
            owner[h] = replica
            owner.move_to_end(h)
        while len(owner) > self.max_blocks:
            owner.popitem(last=False)

    def held(self, hashes: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """Leading blocks of `hashes` each candidate took last, as far as this router knows (absent: none)."""
        owner = self._owner
        found: dict[str, int] = {}
        for i, h in enumerate(hashes):
            r = owner.get(h)
            if r is None:  # nothing later in a chain is recorded without this block
                break
            found[r] = i + 1  # r took blocks 0..i
        return {r: n for r, n in found.items() if r in candidates} if found else found

    def retain(self, replicas: Iterable[str]) -> None:
        """Forget the replicas not in `replicas` (they left: a restart comes back with a new replica id)."""
        keep = set(replicas)
        owner = self._owner
        for h in [h for h, r in owner.items() if r not in keep]:
            del owner[h]
