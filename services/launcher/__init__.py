"""launcher: the local supervisor behind `make run`: nats-server and the six services."""
