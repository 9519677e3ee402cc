"""The semantic cache's categories: what each one is (example queries), how a query is placed in
one (the nearest centroid of the examples' embeddings), and the settings each one caches with.

Categories differ in how close two queries must be to share an answer: "code" queries that are
near in embedding space are often another task on the same data structure, "factual" ones are
sparse. So each category has its own similarity threshold, TTL and quota, with bounds that load
adaptation moves within (`CategoryPolicy`). The file (semantic_categories.json, or one named by
DUET_SEMANTIC_CATEGORIES) holds the examples and the settings; the thresholds in the shipped
file come from `python -m duetserve.loadtest.semantic_eval tune` on the tuning split of the
frozen pairs, and docs/benchmarks.md ("Semantic cache") has the measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_FILE = Path(__file__).with_name("semantic_categories.json")


def category_names(path: Path | None = None) -> tuple[str, ...]:
    """The categories a file defines, read without embedding anything (for the bus's
    permissions: each category has a JetStream bucket)."""
    raw = json.loads((path or DEFAULT_FILE).read_text(encoding="utf-8"))
    entries = raw.get("categories") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path or DEFAULT_FILE}: no categories")
    return tuple(str(name) for name in entries)


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> Any: ...


def _unit(load: float) -> float:
    return min(max(load, 0.0), 1.0)


@dataclass(frozen=True, slots=True)
class CategoryPolicy:
    """How one category caches. Load in [0, 1] (0: idle, 1: the model is saturated) moves the
    threshold from `threshold_strict` down to `threshold_loose` and the TTL from `ttl_s` up
    to `ttl_max_s`, linearly. `threshold_loose` is the loosest the false-hit target allows on
    the measured pairs: load never goes past it."""

    name: str
    threshold_strict: float
    threshold_loose: float
    ttl_s: float
    ttl_max_s: float
    quota: int  # entries a tenant may hold in this category; the least recently used go

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold_loose <= self.threshold_strict <= 1.0:
            raise ValueError(f"{self.name}: need 0 < threshold_loose <= threshold_strict <= 1")
        if not 0.0 < self.ttl_s <= self.ttl_max_s:
            raise ValueError(f"{self.name}: need 0 < ttl_s <= ttl_max_s")
        if self.quota < 1:
            raise ValueError(f"{self.name}: quota must be >= 1")

    def threshold(self, load: float) -> float:
        load = _unit(load)
        return self.threshold_strict - load * (self.threshold_strict - self.threshold_loose)

    def ttl(self, load: float) -> float:
        return self.ttl_s + _unit(load) * (self.ttl_max_s - self.ttl_s)

    def thresholds(self) -> dict[str, float]:
        return {"threshold_loose": self.threshold_loose, "threshold_strict": self.threshold_strict}


@dataclass(frozen=True, slots=True)
class Categories:
    names: tuple[str, ...]
    centroids: np.ndarray  # [categories, dim], unit length
    policies: dict[str, CategoryPolicy]

    @classmethod
    def load(cls, encoder: Encoder, path: Path | None = None) -> Categories:
        raw = json.loads((path or DEFAULT_FILE).read_text(encoding="utf-8"))
        entries = raw.get("categories")
        if not isinstance(entries, dict) or not entries:
            raise ValueError(f"{path or DEFAULT_FILE}: no categories")
        names, centroids, policies = [], [], {}
        for name, entry in entries.items():
            examples = entry.get("examples")
            if not isinstance(examples, list) or not examples:
                raise ValueError(f"category {name!r} has no example queries")
            vectors = np.asarray(encoder.encode([str(e) for e in examples]), dtype=np.float32)
            centroid = vectors.mean(axis=0)
            centroids.append(centroid / np.linalg.norm(centroid))
            names.append(name)
            if "policy" in entry:
                policies[name] = CategoryPolicy(name=name, **entry["policy"])
        return cls(tuple(names), np.stack(centroids), policies)

    def assign(self, vector: np.ndarray) -> str:
        """The category whose centroid is nearest (highest cosine)."""
        return self.names[int(np.argmax(self.centroids @ vector))]

    def policy(self, name: str) -> CategoryPolicy:
        policy = self.policies.get(name)
        if policy is None:
            raise KeyError(f"category {name!r} has no cache policy in its file")
        return policy
