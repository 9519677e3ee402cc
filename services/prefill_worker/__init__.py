"""prefill_worker: runs (chunked) prefill batches and samples each request's first token."""
