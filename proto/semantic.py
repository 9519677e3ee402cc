"""Ingress <-> cache_index: the semantic response cache (cache_index/semantic_cache.py).

Ingress asks before it submits a chat request it may serve from the cache (request/reply,
SemanticLookup -> SemanticHit | SemanticMiss), within a short timeout: no answer in time is a
miss, and the request is generated as usual. Ingress sends every answer that finished normally
(publish, SemanticInsert); cache_index embeds the query and stores it.

The text of queries and answers travels as it is; cache_index embeds the query itself (ingress
carries no model of its own). `context_key` is ingress's digest of everything besides the last
user message that decides the answer (services/ingress/semantic.py): a hit needs it equal.
"""

from dataclasses import dataclass

from duetserve.proto.codec import message


@message("semantic.lookup")
@dataclass(frozen=True, slots=True)
class SemanticLookup:
    tenant: str
    model: str
    context_key: str
    query: str  # the last user message
    max_tokens: int  # a cached answer longer than this is not served
    load: float = 0.0  # [0, 1]: how loaded the model is (loosens thresholds, lengthens TTLs)


@message("semantic.hit")
@dataclass(frozen=True, slots=True)
class SemanticHit:
    answer: str
    completion_tokens: int
    finish_reason: str
    category: str
    similarity: float


@message("semantic.miss")
@dataclass(frozen=True, slots=True)
class SemanticMiss:
    category: str
    reason: str  # semantic_cache.MissReason's value
    similarity: float = 0.0


@message("semantic.insert")
@dataclass(frozen=True, slots=True)
class SemanticInsert:
    """An answer that finished normally (finish_reason "stop"), to cache for its query."""

    tenant: str
    model: str
    context_key: str
    query: str
    answer: str
    completion_tokens: int
    finish_reason: str = "stop"
