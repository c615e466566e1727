"""replicas: the inference engine and the LLMReplica Serve deployment with its tensor-parallel workers."""
