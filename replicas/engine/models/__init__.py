"""Model code: the architectures the engine runs, built from a checkpoint directory's config.json."""
from __future__ import annotations

from replicas.engine.models.args import ModelArgs
from replicas.engine.models.layers import TPInfo
from replicas.engine.models.llama import CausalLM

__all__ = ["CausalLM", "ModelArgs", "TPInfo"]
