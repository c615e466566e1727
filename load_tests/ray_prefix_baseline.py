"""Ray Serve LLM's PrefixCacheAffinityRouter as a routing baseline for our LLMReplica deployment.

Unchanged except for reading our request type: its prefix tree matches prompt text, so it gets the
prompt's token ids as one character each (an exact prefix over tokens). The public import path
(ray.serve.llm) pulls in pyarrow; the router module itself needs neither pyarrow nor vLLM.
"""
from __future__ import annotations

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from replicas.engine.protocol import GenerationRequest


class RayPrefixCacheAffinityRouter(PrefixCacheAffinityRouter):
    def _extract_text_from_request(self, pending_request):
        for arg in pending_request.args:
            if isinstance(arg, GenerationRequest):
                return "".join(map(chr, (t + 0x100 for t in arg.prompt_token_ids)))
        return None  # model_info and other calls: the base class routes them by pow2
