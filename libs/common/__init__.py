"""What every Duet service shares: settings, logging, tracing, the NATS bus, the lifecycle."""
