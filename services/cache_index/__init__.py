"""cache_index: prefix radix index over KV blocks and its eviction."""
