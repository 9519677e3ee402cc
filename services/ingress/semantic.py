"""Ingress's side of the semantic response cache (cache_index/semantic_cache.py): which chat
requests may be answered from it, their context key, the lookup before a submit and the
insert of an answer that finished normally.

A request takes part when the server runs the cache (DUET_SEMANTIC_CACHE) and its last message
is the user's; it does not when it asks for logprobs (a cached answer has none), or opts out:
`duet.cache.semantic: false` (neither looked up nor stored), `Cache-Control: no-cache` (not
served from the cache), `Cache-Control: no-store` (its answer not stored).

The context key is a digest of everything besides the last user message that decides the
answer: the model, every earlier message (the system prompt included) with its role and name,
whether a generation prompt is added, and the sampling settings that change the output. Two
requests share cached answers only when their keys are equal; max_tokens is not in it (a cached
answer is served to a budget it fits in). The tenant is not in it either: tenants have separate
namespaces in the cache itself.

A lookup that is not answered within `timeout_s` is a miss: the request is generated as usual.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import msgpack
from prometheus_client import Counter

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.proto import codec, semantic, subjects
from duetserve.proto.common import ErrorReply
from duetserve.services.ingress.api_models import ChatCompletionRequest

logger = logging.getLogger(__name__)
HEADER = "x-duet-cache"
HIT = "semantic"


@dataclass(frozen=True, slots=True)
class SemanticPlan:
    """How one request uses the cache: its query and context, and whether to look it up and
    whether to store its answer."""

    query: str
    context_key: str
    lookup: bool
    store: bool


def plan(
    req: ChatCompletionRequest, model_id: str, cache_control: str | None
) -> SemanticPlan | None:
    """None: the request does not take part (see the module's docstring)."""
    duet_cache = req.duet.cache if req.duet is not None else None
    if duet_cache is not None and not duet_cache.semantic:
        return None
    if req.logprobs or not req.messages or req.messages[-1].role != "user":
        return None
    query = req.messages[-1].text()
    if not query.strip():
        return None
    directives = _directives(cache_control)
    lookup, store = "no-cache" not in directives, "no-store" not in directives
    if not lookup and not store:
        return None
    return SemanticPlan(query, context_key(req, model_id), lookup, store)


def context_key(req: ChatCompletionRequest, model_id: str) -> str:
    earlier = [[m.role, m.text(), m.name] for m in req.messages[:-1]]
    sampling = [
        req.temperature,
        req.top_p,
        req.top_k if req.top_k is not None and req.top_k > 0 else None,
        req.frequency_penalty,
        req.presence_penalty,
        req.repetition_penalty,
        req.min_tokens,
        req.ignore_eos,
        sorted(req.stop_strings),
        sorted(req.stop_token_ids or ()),
        req.seed,
    ]
    material = msgpack.packb(
        [1, model_id, earlier, req.add_generation_prompt, sampling], use_bin_type=True
    )
    return hashlib.sha256(material).hexdigest()


def _directives(cache_control: str | None) -> set[str]:
    if not cache_control:
        return set()
    return {part.strip().lower().split("=", 1)[0] for part in cache_control.split(",")}


_PIECE = re.compile(r"\s*\S+\s*|\s+")


def stream_pieces(text: str, words: int = 4) -> list[str]:
    """A cached answer cut into pieces of a few words each, to stream as a generated one is;
    they join to exactly `text`."""
    parts = _PIECE.findall(text)
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)] or [text]


class SemanticClient:
    def __init__(self, bus: Bus, timeout_s: float, lookups: Counter, inserts: Counter) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self._lookups = lookups  # labelled by result: hit, miss, unavailable
        self._inserts = inserts

    async def lookup(
        self, tenant: str, model: str, plan: SemanticPlan, max_tokens: int, load: float
    ) -> semantic.SemanticHit | None:
        ask = semantic.SemanticLookup(
            tenant, model, plan.context_key, plan.query, max_tokens, min(max(load, 0.0), 1.0)
        )
        try:
            reply = await self.bus.request(
                subjects.SEMANTIC_LOOKUP, codec.encode(ask), timeout=self.timeout_s
            )
            answer = codec.decode(
                reply.data, semantic.SemanticHit, semantic.SemanticMiss, ErrorReply
            )
        except (BusTimeout, BusNoResponders, codec.ProtoError) as err:
            logger.debug("semantic lookup unanswered: %s", err)
            self._lookups.labels("unavailable").inc()
            return None
        if isinstance(answer, semantic.SemanticHit):
            self._lookups.labels("hit").inc()
            return answer
        if isinstance(answer, ErrorReply):
            logger.warning("semantic lookup refused: %s", answer.message)
        self._lookups.labels("miss").inc()
        return None

    async def insert(
        self, tenant: str, model: str, plan: SemanticPlan, answer: str, completion_tokens: int
    ) -> None:
        entry = semantic.SemanticInsert(
            tenant, model, plan.context_key, plan.query, answer, completion_tokens
        )
        try:
            await self.bus.publish(subjects.SEMANTIC_INSERT, codec.encode(entry))
        except Exception as err:  # the answer is served either way
            logger.warning("semantic insert not sent: %s", err)
            return
        self._inserts.inc()
