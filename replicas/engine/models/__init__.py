"""Model code: the architectures the engine runs, built from a checkpoint directory's config.json."""
from __future__ import annotations

from replicas.engine.models.args import ModelArgs

__all__ = ["CausalLM", "ModelArgs", "TPInfo"]


def __getattr__(name: str):
    # The torch modules load on first use, so that what the engine supports (models.args) can be asked
    # without a torch import: the launcher's early model check runs before anything starts.
    if name == "CausalLM":
        from replicas.engine.models.llama import CausalLM
        return CausalLM
    if name == "TPInfo":
        from replicas.engine.models.layers import TPInfo
        return TPInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
