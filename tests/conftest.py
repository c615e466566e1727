"""Shared fixtures: tiny random models, the embedded SmolLM2 model."""
from __future__ import annotations

import os

import pytest

# Fixture modules owned by each area (redis server, ray cluster, ...), registered here.
pytest_plugins = ["tests.fixtures.ray_cluster", "tests.fixtures.redis", "tests.fixtures.fake_openai",
                  "tests.fixtures.fake_replicas"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from load_tests.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build variants: tiny_model_factory(arch="qwen3", num_kv_heads=1)."""
    cache = {}

    def make(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            from load_tests.tiny_model import build_tiny_model
            cache[key] = build_tiny_model(tmp_path_factory.mktemp("tiny"), **kwargs)
        return cache[key]
    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    from replicas.engine.model_prep import prepare_embedded_model
    return prepare_embedded_model()
