"""The embedded model is converted once; later starts reuse the cache."""
from __future__ import annotations

import json

import pytest

from replicas.engine import model_prep


@pytest.mark.slow
def test_converts_once_then_reuses_cache(tmp_path, monkeypatch):
    calls = []
    real = model_prep.convert_gguf
    monkeypatch.setattr(model_prep, "convert_gguf", lambda *a: (calls.append(a), real(*a)))
    first = model_prep.prepare_embedded_model(cache_dir=tmp_path)
    assert calls and model_prep.is_prepared(first)
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (first / "model.safetensors").stat().st_size > 100_000_000
    second = model_prep.prepare_embedded_model(cache_dir=tmp_path)
    assert second == first and len(calls) == 1   # second start: cache hit, no conversion
    assert not list(tmp_path.glob("SmolLM2-135M-Instruct.*"))  # no temp dirs left behind


def test_missing_model_dir_is_a_clear_error(tmp_path):
    from replicas.engine.config import EngineConfig
    with pytest.raises(FileNotFoundError, match="engine.model"):
        model_prep.resolve_engine_config(EngineConfig(model=str(tmp_path / "nope")))
