"""decode_worker: owns its step loop over the requests resident on it and streams their tokens."""
