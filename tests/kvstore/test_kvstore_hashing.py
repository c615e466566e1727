"""replicas.engine.hashing: the one block-hash function shared by router and engine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from replicas.engine.hashing import ROOT_HASH, block_hashes, extra_key, hash_block


def test_values_are_pinned_and_stable_across_processes():
    # Pinned: router and engine in different processes (and versions) must agree forever.
    assert block_hashes(list(range(48)), 16) == [-945382171135270762, -9192240449392426166, -150920988075258501]
    code = "from replicas.engine.hashing import block_hashes; print(block_hashes(list(range(48)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[-945382171135270762, -9192240449392426166, -150920988075258501]"


def test_signed_int64_range():
    hs = block_hashes(list(range(16 * 64)), 16)
    assert all(-(1 << 63) <= h < (1 << 63) for h in hs)
    assert any(h < 0 for h in hs)  # negative parents must chain too


def test_chaining_each_block_depends_on_all_before_it():
    a = block_hashes(list(range(64)), 16)
    b = block_hashes([999] + list(range(1, 64)), 16)  # first token differs
    assert all(x != y for x, y in zip(a, b))
    c = block_hashes(list(range(48)) + [7] * 16, 16)  # only the last block differs
    assert c[:3] == a[:3] and c[3] != a[3]
    assert a[1] == hash_block(a[0], list(range(16, 32)))
    # Continuing from a parent hash equals hashing the whole sequence.
    assert block_hashes(list(range(32, 64)), 16, parent_hash=a[1]) == a[2:]
    # Same block content at a different position hashes differently.
    same = block_hashes([5] * 32, 16)
    assert same[0] != same[1]
    assert same[0] == hash_block(ROOT_HASH, [5] * 16)


def test_only_full_blocks():
    assert block_hashes(list(range(15)), 16) == []
    assert len(block_hashes(list(range(16)), 16)) == 1
    assert block_hashes(list(range(47)), 16) == block_hashes(list(range(32)), 16)
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)


def test_extra_key_separates_models_and_salts():
    toks = list(range(32))
    plain = block_hashes(toks, 16)
    a = block_hashes(toks, 16, extra_key("model-a"))
    b = block_hashes(toks, 16, extra_key("model-b"))
    salted = block_hashes(toks, 16, extra_key("model-a", "tenant-1"))
    assert len({tuple(plain), tuple(a), tuple(b), tuple(salted)}) == 4
    assert a == block_hashes(toks, 16, extra_key("model-a"))
