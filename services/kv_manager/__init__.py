"""kv_manager: the unit's block allocator, leases, and the shared storage of KV pool and weights."""
