"""Duet: an LLM serving system with prefill and decode side by side on one shared KV pool."""

__version__ = "0.1.0"
