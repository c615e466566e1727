"""The one block-hash implementation, shared by the engine (what it caches) and the router (what it looks up).

Contract (DESIGN.md): prompt tokens are split into blocks of `block_size`; block i's hash is a stable
64-bit hash of (hash of block i-1, the block's token ids, extra key). Only full blocks are hashed.
xxh3_64 is stable across processes and machines, unlike Python's hash().
"""
from __future__ import annotations

from array import array
from typing import Sequence

import xxhash

ROOT_HASH = 0


def extra_key(model_id: str, cache_salt: str | None = None) -> bytes:
    """Bytes mixed into every block hash so that different models (or salts) never share entries."""
    return f"{model_id}\x00{cache_salt or ''}".encode()


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    h = xxhash.xxh3_64()
    h.update(parent_hash.to_bytes(8, "little", signed=True))  # hashes are signed int64
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    # Signed 64-bit so the value fits int64 columns and Redis/pydantic round-trips unchanged.
    return h.intdigest() - (1 << 63)


def block_hashes(token_ids: Sequence[int], block_size: int, extra: bytes = b"",
                 parent_hash: int = ROOT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    h = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash_block(h, token_ids[start:start + block_size], extra)
        out.append(h)
    return out
