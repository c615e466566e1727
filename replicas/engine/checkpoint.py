"""Which files of a Hugging Face checkpoint directory hold its weights; torch-free, so that the launcher's
early model check asks the same question the weight loader does without importing torch."""
from __future__ import annotations

import json
from pathlib import Path


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {d}")
