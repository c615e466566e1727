"""RecentRoutes: one router's own recent decisions, its prefix estimate when the prefix index is late.

Block hash -> the replica this router last sent a prompt holding that block to, and when. Hashes are
chained, so block i maps to replica r only if r took a prompt that began with every block up to i: r
computed that prefix. Whether r still caches it, and what other routers sent, only Redis knows; the
router therefore asks Redis first and reads the whole record only when Redis did not answer. What it
sent in the last moments (`since`) it also adds to Redis's answer: a holder publishes its blocks only
after computing them, so a burst of prompts sharing a new prefix would otherwise scatter before the
index shows the first one's holder.

Bounded to `max_blocks` entries by two generations of at most half of it each (new entries go to the
young one; when they would not fit, it becomes the old one and the previous old one is dropped):
recording a prompt is one dict update at C speed on the routing hot path, where a per-entry LRU cost
~0.6 µs a block (66 µs for a 1,760-token prompt). At least the max_blocks / 2 most recently recorded
blocks are kept, and a prompt's blocks are recorded and dropped together (its first max_blocks / 2), so
what is known of a chain is always a prefix of it.
"""
from __future__ import annotations

from itertools import repeat
from typing import Iterable, Sequence


class RecentRoutes:
    __slots__ = ("max_blocks", "_young", "_old")

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self._young: dict[int, str] = {}
        self._old: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def record(self, hashes: Sequence[int], replica: str, now: float = 0.0) -> None:
        """`replica` took a prompt with these chained block hashes at time `now` (time.monotonic())."""
        half = self.max_blocks // 2
        if not half:
            return
        new = hashes[:half]
        if len(self._young) + len(new) > half:
            self._old, self._young = self._young, {}
        self._young.update(zip(new, repeat((replica, now))))

    def held(self, hashes: Sequence[int], candidates: Iterable[str], since: float | None = None) -> dict[str, int]:
        """Leading blocks of `hashes` each candidate took last, as far as this router knows (absent: none);
        with `since`, only what it took at or after that time."""
        young, old = self._young, self._old
        found: dict[str, int] = {}
        for i, h in enumerate(hashes):
            e = young.get(h) or old.get(h)
            if e is None:  # nothing later in a chain is recorded without this block
                break
            if since is None or e[1] >= since:
                found[e[0]] = i + 1  # it took blocks 0..i
        return {r: n for r, n in found.items() if r in candidates} if found else found

    def retain(self, replicas: Iterable[str]) -> None:
        """Forget the replicas not in `replicas` (they left: a restart comes back with a new replica id)."""
        keep = set(replicas)
        self._young = {h: e for h, e in self._young.items() if e[0] in keep}
        self._old = {h: e for h, e in self._old.items() if e[0] in keep}
