"""Model runtime: Llama-family checkpoints over a paged KV cache that someone else owns.

A plain library: no asyncio, no NATS, nothing about services. Workers hand it the KV pool, the
weights (or let it load them) and a batch object per forward pass.
"""
