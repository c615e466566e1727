"""kvstore: block hashing, the prefix index (Redis; in-process for unit tests) and the event publisher."""
