"""The engine: paged KV cache with prefix caching, continuous batching scheduler, model runner, sampler."""
