"""What wraps every route: a server span per request (while tracing is on), request counts by
endpoint and status, and errors in OpenAI's shape (an ApiError, aiohttp's own 404/405/413, or
an unexpected exception as a 500 that is logged)."""

import asyncio
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry.trace import SpanKind

from duetserve.common.tracing import active_tracer, extract_context
from duetserve.services.ingress.errors import ApiError
from duetserve.services.ingress.metrics import IngressMetrics

logger = logging.getLogger(__name__)

# What a request the client abandoned is counted as (nginx's "client closed request").
CLIENT_GONE_STATUS = 499


def middlewares(metrics: IngressMetrics) -> list[Middleware]:
    """Outermost first: tracing, counting, errors."""

    @web.middleware
    async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = endpoint_name(request)
        try:
            response = await handler(request)
        except (ConnectionResetError, asyncio.CancelledError):
            metrics.observe_request(endpoint, CLIENT_GONE_STATUS)
            raise
        metrics.observe_request(endpoint, response.status)
        return response

    return [trace_requests, count_requests, openai_errors]


def endpoint_name(request: web.Request) -> str:
    """The route's path pattern; "other" for paths no route serves (bounded label values)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


@web.middleware
async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    tracer = active_tracer()
    if tracer is None:
        return await handler(request)
    name = f"{request.method} {endpoint_name(request)}"
    context = extract_context(request.headers)
    with tracer.start_as_current_span(name, context=context, kind=SpanKind.SERVER) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        return response


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason, error_type(exc.status)))
    except ConnectionResetError:
        raise
    except Exception:
        logger.exception("request failed", extra={"path": request.path})
        return error_response(ApiError(500, "Internal server error.", "server_error"))


def error_type(status: int) -> str:
    if status == 404:
        return "NotFoundError"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers())
