"""The HTTP routes: OpenAI's completions, chat completions and models, plus /health and /metrics.

A generation request is: admitted (not while draining), its tenant resolved from the API key,
its JSON parsed and validated, its model checked, its prompt prepared (prompts.py), then one
Generation runs it, answered whole or streamed as server-sent events. /health, /metrics and
/openapi.json (the API's description, built once here: openapi.py) need no key.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from duetserve.common.health import query_health
from duetserve.common.nats_bus import BusTimeout
from duetserve.proto import subjects
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import HealthReply, HealthStatus
from duetserve.proto.scheduling import CancelReason, SchedulerStats, SchedulerStatsQuery
from duetserve.proto.semantic import SemanticHit
from duetserve.services.ingress import genai_span, responses
from duetserve.services.ingress.api_models import ChatCompletionRequest, CompletionRequest
from duetserve.services.ingress.bodies import parse_json_body
from duetserve.services.ingress.errors import DEFAULT_RETRY_AFTER_S, ApiError, not_found_model
from duetserve.services.ingress.formats import ChatFormat, CompletionFormat, ResponseFormat
from duetserve.services.ingress.generation import (
    Admission,
    Arrival,
    Generation,
    GenerationContext,
    GenerationFailed,
)
from duetserve.services.ingress.metrics import CONTENT_TYPE_LATEST, RequestTiming, combined
from duetserve.services.ingress.openapi import build_openapi
from duetserve.services.ingress.output import Piece
from duetserve.services.ingress.prompts import (
    ModelLimits,
    PreparedPrompt,
    prepare_chat,
    prepare_completion,
)
from duetserve.services.ingress.quotas import TenantQuotas
from duetserve.services.ingress.semantic import HEADER as SEMANTIC_HEADER
from duetserve.services.ingress.semantic import HIT as SEMANTIC_HIT
from duetserve.services.ingress.semantic import SemanticClient, SemanticPlan, stream_pieces
from duetserve.services.ingress.semantic import plan as semantic_plan
from duetserve.services.ingress.tenants import TenantResolver

logger = logging.getLogger(__name__)
# Request bodies up to this size are parsed on the event loop; bigger ones in a thread.
_INLINE_BODY_BYTES = 64 * 1024

RequestT = TypeVar("RequestT", bound=BaseModel)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What /health asks: these services over the bus, and ingress itself in-process."""

    services: tuple[str, ...]
    timeout_s: float
    own: Callable[[], HealthReply]


@dataclass(frozen=True, slots=True)
class SemanticCaching:
    """The semantic response cache as ingress uses it (DUET_SEMANTIC_CACHE): its client, and
    the requests in flight that count as full load."""

    client: SemanticClient
    full_load_requests: int


class Handlers:
    def __init__(
        self,
        model_id: str,
        limits: ModelLimits,
        context: GenerationContext,
        tenants: TenantResolver,
        admission: Admission,
        health: HealthCheck,
        semantic: SemanticCaching | None = None,
    ) -> None:
        self.model_id = model_id
        self.created = int(time.time())
        self._limits = limits
        self._context = context
        self._tenants = tenants
        self._quotas = TenantQuotas(tenants.quotas, context.metrics.quota_refusals)
        self._admission = admission
        self._health = health
        self._semantic = semantic
        self.openapi_document = build_openapi(model_id)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/openapi.json", self.openapi),
        ]

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = Arrival.now()
        with self._admission:
            tenant = self._tenant(request)
            req = await self._parse(request, CompletionRequest)
            # In a thread: a long prompt's tokenizing must not stop every other request.
            prompt = await asyncio.to_thread(
                prepare_completion,
                req,
                self._context.tokenizer,
                self._limits,
                self._context.lengths,
            )
            return await self._run(request, arrival, tenant, prompt, CompletionFormat(), req)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = Arrival.now()
        with self._admission:
            tenant = self._tenant(request)
            req = await self._parse(request, ChatCompletionRequest)
            prompt = await asyncio.to_thread(
                prepare_chat, req, self._context.tokenizer, self._limits, self._context.lengths
            )
            cache = None
            if self._semantic is not None:
                cache = semantic_plan(req, self.model_id, request.headers.get("Cache-Control"))
            return await self._run(request, arrival, tenant, prompt, ChatFormat(), req, cache)

    async def models(self, request: web.Request) -> web.Response:
        self._tenant(request)
        card = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "duet",
            "root": self.model_id,
            "parent": None,
            "max_model_len": self._limits.context_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        bus = self._context.bus
        replies = await query_health(bus, self._health.services, self._health.timeout_s)
        status, body = health_body(self._health.own(), replies)
        headers = {"Retry-After": str(int(DEFAULT_RETRY_AFTER_S))} if status == 503 else None
        return web.json_response(body, status=status, headers=headers)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi_document)

    async def metrics(self, request: web.Request) -> web.Response:
        """Ingress's own metrics, plus the schedulers' queue, running and KV counts asked for
        now, summed over the live units (the configured one when the registry names none);
        left at their last values if no scheduler answers in time."""
        units = self._context.units
        cards = units.live() if units is not None else []
        names = [c.unit for c in cards] or [self._context.unit]
        answers = await asyncio.gather(*(self._scheduler_stats(u) for u in names))
        found = [a for a in answers if a is not None]
        if found:
            self._context.metrics.observe_scheduler(combined(found))
        if units is not None:
            self._context.metrics.observe_units(cards)
        body = self._context.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _scheduler_stats(self, unit: str) -> SchedulerStats | None:
        try:
            reply = await self._context.bus.request(
                subjects.sched(unit, "stats"), encode(SchedulerStatsQuery()), timeout=0.5
            )
            return decode(reply.data, SchedulerStats)
        except (BusTimeout, ProtoError) as err:
            logger.debug("scheduler stats of %s unavailable: %s", unit, err)
            return None

    def _tenant(self, request: web.Request) -> str:
        return self._tenants.resolve(request.headers.get("Authorization"))

    async def _parse(self, request: web.Request, model: type[RequestT]) -> RequestT:
        raw = await request.read()
        if len(raw) < _INLINE_BODY_BYTES:
            return self._validate(raw, model)
        return await asyncio.to_thread(self._validate, raw, model)  # a big body: off the loop

    def _validate(self, raw: bytes, model: type[RequestT]) -> RequestT:
        body = parse_json_body(raw)
        try:
            req = model.model_validate(body)
        except ValidationError as err:
            raise ApiError.from_validation(err) from None
        requested = getattr(req, "model", None)
        if requested != self.model_id:
            raise not_found_model(str(requested))
        return req

    async def _run(
        self,
        request: web.Request,
        arrival: Arrival,
        tenant: str,
        prompt: PreparedPrompt,
        fmt: ResponseFormat,
        req: CompletionRequest | ChatCompletionRequest,
        cache: SemanticPlan | None = None,
    ) -> web.StreamResponse:
        request_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        head = responses.ResponseHead(request_id, self.model_id, int(time.time()))
        held = self._quotas.take(tenant, len(prompt.prompt_ids), prompt.sampling.max_tokens)
        generation = Generation(self._context, request_id, tenant, prompt, arrival)
        chat = isinstance(req, ChatCompletionRequest)
        operation = genai_span.CHAT if chat else genai_span.TEXT_COMPLETION
        genai_span.annotate_request(operation, self.model_id, request_id, prompt.sampling)
        answered = False  # from the semantic cache (its span says so itself)
        semantic, lookup = self._semantic, None
        if semantic is not None and cache is not None and cache.lookup:
            # Asked while the request is submitted, not before it: a miss adds no time to it,
            # and a hit cancels it (its first token comes after a prefill, the answer sooner).
            load = self._admission.in_flight / semantic.full_load_requests
            lookup = asyncio.create_task(
                semantic.client.lookup(
                    tenant, self.model_id, cache, prompt.sampling.max_tokens, load
                )
            )
        try:
            with self._admission.running(generation):
                try:
                    await generation.start()
                except ApiError:  # refused (overloaded, no scheduler): a hit still answers
                    hit = await lookup if lookup is not None else None
                    if hit is None:
                        raise
                    answered = True
                    return await self._serve_hit(
                        request, arrival, tenant, head, fmt, req, prompt, hit
                    )
                hit = await lookup if lookup is not None else None
                if hit is not None:
                    await generation.close(CancelReason.ANSWERED_FROM_CACHE)
                    answered = True
                    return await self._serve_hit(
                        request, arrival, tenant, head, fmt, req, prompt, hit
                    )
                if req.stream:
                    return await self._stream(request, generation, head, fmt, req.include_usage)
                return await self._collect(generation, head, fmt)
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
            usage = generation.usage
            held.release(usage.prompt_tokens + usage.completion_tokens)
            if not answered:
                genai_span.annotate_outcome(
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cached_tokens,
                    generation.finish_reason,
                    generation.ttft_s,
                )
            if semantic is not None and cache is not None and cache.store:
                await self._store_answer(semantic.client, tenant, cache, generation)
            # Shielded: a client that went away cancelled this handler, and the cancel must
            # still reach the scheduler.
            await asyncio.shield(generation.close())

    async def _store_answer(
        self, client: SemanticClient, tenant: str, cache: SemanticPlan, generation: Generation
    ) -> None:
        """Only an answer that finished normally is stored: one cut by max_tokens, failed, or
        whose client went away is not."""
        if generation.finish_reason != "stop":
            return
        answer = "".join(generation.text_parts)
        if answer:
            usage = generation.usage
            await client.insert(tenant, self.model_id, cache, answer, usage.completion_tokens)

    async def _serve_hit(
        self,
        request: web.Request,
        arrival: Arrival,
        tenant: str,
        head: responses.ResponseHead,
        fmt: ResponseFormat,
        req: CompletionRequest | ChatCompletionRequest,
        prompt: PreparedPrompt,
        hit: SemanticHit,
    ) -> web.StreamResponse:
        """An answer from the semantic cache, in the shape a generated one has: whole, or as
        server-sent events (its text in pieces of a few words, the finish reason on the last,
        usage if asked); marked `x-duet-cache: semantic`. Usage counts the whole prompt as
        cached (nothing was computed for it)."""
        prompt_tokens = len(prompt.prompt_ids)
        usage = responses.Usage(prompt_tokens, hit.completion_tokens, prompt_tokens)
        headers = {"X-Request-Id": head.id, SEMANTIC_HEADER: SEMANTIC_HIT}
        elapsed = time.monotonic() - arrival.monotonic
        genai_span.annotate_outcome(
            prompt_tokens, hit.completion_tokens, prompt_tokens, hit.finish_reason, elapsed, True
        )
        self._context.metrics.observe_generation(
            RequestTiming(
                elapsed,
                elapsed,
                prompt_tokens,
                hit.completion_tokens,
                prompt_tokens,
                hit.finish_reason,
                tenant,
            )
        )
        if not req.stream:
            body = fmt.body(head, hit.answer, hit.finish_reason, usage, None)
            return web.json_response(body, headers=headers)
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        for chunk in fmt.stream_start(head):
            await response.write(responses.sse(chunk))
        pieces = stream_pieces(hit.answer)
        for i, text in enumerate(pieces):
            finish = hit.finish_reason if i == len(pieces) - 1 else None
            await response.write(
                responses.sse(fmt.stream_chunk(head, Piece(text, [], [], finish), None))
            )
        if req.include_usage:
            await response.write(responses.sse(fmt.usage_chunk(head, usage)))
        await response.write(responses.SSE_DONE)
        await response.write_eof()
        return response

    async def _collect(
        self, generation: Generation, head: responses.ResponseHead, fmt: ResponseFormat
    ) -> web.Response:
        parts, logprobs = [], []
        while True:
            try:
                piece = await generation.next_piece()
            except GenerationFailed as err:
                raise generation_error(err) from None
            parts.append(piece.text)
            logprobs.extend(piece.logprobs)
            if piece.finish_reason is not None:
                break
        tokenizer = self._context.tokenizer
        wants_logprobs = generation.prompt.sampling.logprobs is not None
        logprobs_body = fmt.logprobs(tokenizer, logprobs, 0) if wants_logprobs else None
        body = fmt.body(head, "".join(parts), piece.finish_reason, generation.usage, logprobs_body)
        return web.json_response(body, headers={"X-Request-Id": head.id})

    async def _stream(
        self,
        request: web.Request,
        generation: Generation,
        head: responses.ResponseHead,
        fmt: ResponseFormat,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": head.id})
        await response.prepare(request)
        for chunk in fmt.stream_start(head):
            await response.write(responses.sse(chunk))
        try:
            await self._stream_pieces(response, generation, head, fmt)
            if include_usage:
                await response.write(responses.sse(fmt.usage_chunk(head, generation.usage)))
        except GenerationFailed as err:
            await response.write(responses.sse(generation_error(err).body()))
        except ConnectionResetError:
            raise
        except Exception:  # the status line is sent: the error can only be an event now
            logger.exception("stream failed", extra={"request_id": head.id})
            error = ApiError(500, "Internal server error.", "server_error")
            await response.write(responses.sse(error.body()))
        await response.write(responses.SSE_DONE)
        await response.write_eof()
        return response

    async def _stream_pieces(
        self,
        response: web.StreamResponse,
        generation: Generation,
        head: responses.ResponseHead,
        fmt: ResponseFormat,
    ) -> None:
        wants_logprobs = generation.prompt.sampling.logprobs is not None
        text_offset = 0
        while True:
            piece = await generation.next_piece()
            finished = piece.finish_reason is not None
            if piece.text or finished or (wants_logprobs and piece.token_ids):
                logprobs = None
                if wants_logprobs:
                    logprobs = fmt.logprobs(self._context.tokenizer, piece.logprobs, text_offset)
                chunk = fmt.stream_chunk(head, piece, logprobs)
                if finished and generation.slo_outcome is not None:
                    # The last chunk with choices says whether it met its SLO (as usage does).
                    chunk["duet"] = {"slo": generation.slo_outcome.body()}
                await response.write(responses.sse(chunk))
            text_offset += len(piece.text)
            if finished:
                return


def generation_error(err: GenerationFailed) -> ApiError:
    """A generation the server could not finish (a worker or the scheduler said why): the
    request was valid (ingress checked it), so it is the server's trouble, and worth retrying
    once it has passed: a 503 with Retry-After, never a 500."""
    return ApiError(503, str(err), "server_error", code=err.code or "generation_failed")


def health_body(
    own: HealthReply, replies: Mapping[str, HealthReply | str]
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body of /health: 200 when every service is ready, else 503."""
    services: dict[str, dict[str, str]] = {own.service: _health_entry(own)}
    for name, reply in replies.items():
        if isinstance(reply, HealthReply):
            services[name] = _health_entry(reply)
        else:
            services[name] = {"status": "unreachable", "detail": reply}
    ready = all(entry["status"] == HealthStatus.READY.value for entry in services.values())
    body = {"status": "ready" if ready else "unavailable", "services": services}
    return (200 if ready else 503), body


def _health_entry(reply: HealthReply) -> dict[str, str]:
    entry = {"status": reply.status.value, "instance": reply.instance}
    if reply.detail:
        entry["detail"] = reply.detail
    return entry
