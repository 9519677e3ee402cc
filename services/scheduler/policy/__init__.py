"""Scheduling policies: strategy objects chosen once from settings."""
