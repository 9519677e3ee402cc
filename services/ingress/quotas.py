"""Per-tenant quotas, from the API-keys entries (tenants.py): requests in flight, and tokens per
minute. A request over either gets a 429 in OpenAI's shape with Retry-After, before anything
reaches the scheduler.

Tokens are counted as OpenAI counts them for its limits: at admission a request is charged its
prompt plus max_tokens (what it may use); when it ends the charge becomes what it did use. The
minute is a sliding window over those charges.

    held = quotas.take(tenant, prompt_tokens, max_tokens)   # ApiError(429) when over a quota
    try:
        ...
    finally:
        held.release(used_tokens)
"""

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from duetserve.services.ingress.errors import ApiError

WINDOW_S = 60.0
RATE_LIMITED = "rate_limit_exceeded"


@dataclass(frozen=True, slots=True)
class Quota:
    max_in_flight: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(slots=True)
class _Charge:
    at: float
    tokens: int


@dataclass(slots=True)
class _Usage:
    in_flight: int = 0
    charges: deque[_Charge] = field(default_factory=deque)


class Held:
    """A request's place in its tenant's quotas, until `release`."""

    def __init__(self, usage: _Usage, charge: _Charge) -> None:
        self._usage, self._charge = usage, charge
        self._released = False

    def release(self, used_tokens: int | None = None) -> None:
        """The request ended, having used `used_tokens` (None: what it was charged). Safe
        twice."""
        if self._released:
            return
        self._released = True
        self._usage.in_flight -= 1
        if used_tokens is not None:
            self._charge.tokens = min(self._charge.tokens, used_tokens)


class TenantQuotas:
    def __init__(
        self,
        quotas: dict[str, Quota],
        refusals: Counter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`refusals`: counted by tenant and limit (requests, tokens), if given."""
        self.quotas, self.clock = quotas, clock
        self._usage: dict[str, _Usage] = {}
        self._refusals = refusals

    def take(self, tenant: str, prompt_tokens: int, max_tokens: int) -> Held:
        """Hold a place for a request; an ApiError(429) with Retry-After when over a quota."""
        quota = self.quotas.get(tenant, Quota())
        usage = self._usage.setdefault(tenant, _Usage())
        now = self.clock()
        if quota.max_in_flight is not None and usage.in_flight >= quota.max_in_flight:
            raise self._refuse(
                tenant,
                "requests",
                f"Rate limit reached for {tenant}: {quota.max_in_flight} requests in flight "
                "at most. Retry when one of them has finished.",
                1.0,
            )
        charge = prompt_tokens + max_tokens
        limit = quota.tokens_per_minute
        if limit is not None:
            wait = self._tokens_wait_s(usage, now, charge, limit)
            if wait is not None:
                why = (
                    f"lower max_tokens or shorten the prompt: more than {limit} never fit"
                    if charge > limit
                    else f"retry in {math.ceil(wait)}s"
                )
                raise self._refuse(
                    tenant,
                    "tokens",
                    f"Rate limit reached for {tenant}: {limit} tokens per minute, and this "
                    f"request may use {charge} (prompt plus max_tokens); {why}.",
                    wait,
                )
        held = _Charge(now, charge)
        usage.charges.append(held)
        usage.in_flight += 1
        return Held(usage, held)

    def _tokens_wait_s(self, usage: _Usage, now: float, charge: int, limit: int) -> float | None:
        """None if `charge` fits in the window now; else how long until it does."""
        charges = usage.charges
        while charges and charges[0].at <= now - WINDOW_S:
            charges.popleft()
        used = sum(c.tokens for c in charges)
        if used + charge <= limit:
            return None
        if charge > limit:  # never fits (take() says so)
            return WINDOW_S
        for old in charges:  # the oldest charges leave the window first
            used -= old.tokens
            if used + charge <= limit:
                return old.at + WINDOW_S - now
        return WINDOW_S

    def _refuse(self, tenant: str, kind: str, message: str, retry_after_s: float) -> ApiError:
        if self._refusals is not None:
            self._refusals.labels(tenant, kind).inc()
        return ApiError(429, message, kind, None, RATE_LIMITED, retry_after_s)
