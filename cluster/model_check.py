"""Early model checks: what `llm-cluster serve` verifies about engine.model before it starts Ray, Redis or
Serve. A wrong path or a model the engine cannot run then ends in one line naming the problem and exit code 2,
instead of a traceback, or an error found only inside a replica after the whole cluster came up.

What the engine supports is asked of the engine itself (models.args.check_supported, checkpoint.checkpoint_files),
so this check and the replica refuse exactly the same models.
"""
from __future__ import annotations

import json
from pathlib import Path

from cluster.config import ConfigError
from replicas.engine.checkpoint import checkpoint_files
from replicas.engine.config import EMBEDDED, EngineConfig
from replicas.engine.models.args import check_supported


class ModelCheckError(ConfigError):
    """The model directory cannot be served; the message names the path, file, architecture or rope type."""


def check_engine_model(cfg: EngineConfig) -> None:
    """Check the model an engine config names, and that engine.quantization fits a pre-quantised checkpoint. The
    embedded default is skipped: it is converted by model_prep into a Llama checkpoint the engine runs, and
    converting it here would only move its wait."""
    if cfg.model != EMBEDDED:
        d = check_model_dir(cfg.model)
        from replicas.engine.quant import checkpoint_method_of_dir, resolve
        try:
            resolve(cfg.quantization, cfg.fp8_scheme, cfg.fp8_weight_scales, checkpoint_method_of_dir(d))
        except ValueError as e:
            raise ModelCheckError(f"{e} ({d})") from None


def check_model_dir(model: str | Path) -> Path:
    """Raise ModelCheckError unless `model` is a directory the engine can load; return it."""
    d = Path(model).expanduser()
    if not d.exists():
        raise ModelCheckError(f"engine.model: {model} does not exist")
    if not d.is_dir():
        raise ModelCheckError(f"engine.model: {model} is not a directory")
    cfg = _read_config(d / "config.json")
    _check_weights(d)
    try:
        check_supported(cfg)
    except ValueError as e:
        raise ModelCheckError(f"engine.model: {d / 'config.json'}: {e}") from None
    return d


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise ModelCheckError(f"engine.model: {path.parent} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelCheckError(f"engine.model: {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelCheckError(f"engine.model: {path} is not a JSON object")
    return cfg


def _check_weights(d: Path) -> None:
    # The weight loader's own lookup: it reads safetensors only (single file or sharded with an index).
    try:
        files = checkpoint_files(d)
    except FileNotFoundError:
        if any(d.glob("pytorch_model*.bin")):
            raise ModelCheckError(f"engine.model: {d} has pytorch_model*.bin weights only; the engine loads "
                                  "safetensors (model.safetensors or model.safetensors.index.json)") from None
        raise ModelCheckError(f"engine.model: {d} has no weight files (model.safetensors or "
                              "model.safetensors.index.json)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelCheckError(f"engine.model: {d / 'model.safetensors.index.json'} is not a valid index "
                              f"({type(e).__name__}: {e})") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelCheckError(f"engine.model: {d} is missing weight files its index names: {', '.join(missing)}")
