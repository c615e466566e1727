"""Shared fixtures (tiny random models, the embedded SmolLM2 model) and the folder markers.

The folders mirror the source: a test in tests/<folder>/ gets the marker <folder> (registered in
pyproject.toml), so `-m engine` or `-m "not e2e"` selects by layer without a decorator in each module."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixture modules shared by several folders (Redis, fake servers and replicas); the Ray cluster and the app
# factory live in tests/e2e/conftest.py, the only folder that starts them.
pytest_plugins = ["tests.fixtures.redis", "tests.fixtures.fake_openai", "tests.fixtures.fake_replicas"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = ("engine", "kvstore", "serving", "cluster", "e2e", "gpu", "load_tests")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        if TESTS in path.parents and path.relative_to(TESTS).parts[0] in FOLDER_MARKERS:
            item.add_marker(path.relative_to(TESTS).parts[0])


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
