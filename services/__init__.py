"""Duet services: each a thin shell (settings, wiring, run) around a pure core."""
