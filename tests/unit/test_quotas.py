"""Per-tenant quotas: requests in flight and tokens per minute, refused with 429 and
Retry-After, and given back when a request ends."""

import pytest

from duetserve.services.ingress.errors import ApiError
from duetserve.services.ingress.quotas import Quota, TenantQuotas


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def refused(quotas: TenantQuotas, tenant: str, prompt: int, max_tokens: int) -> ApiError:
    with pytest.raises(ApiError) as info:
        quotas.take(tenant, prompt, max_tokens)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    return info.value


def test_requests_in_flight_are_bounded_per_tenant() -> None:
    quotas = TenantQuotas({"acme": Quota(max_in_flight=2)})
    first, _ = quotas.take("acme", 10, 10), quotas.take("acme", 10, 10)
    error = refused(quotas, "acme", 10, 10)
    assert error.type == "requests" and error.headers() == {"Retry-After": "1"}
    quotas.take("other", 10, 10)  # another tenant, no quota
    first.release()
    first.release()  # twice is once
    quotas.take("acme", 10, 10)
    refused(quotas, "acme", 10, 10)


def test_tokens_per_minute_slide_and_count_what_was_used() -> None:
    clock = Clock()
    quotas = TenantQuotas({"acme": Quota(tokens_per_minute=1000)}, clock=clock)
    a = quotas.take("acme", 100, 300)  # charged 400
    clock.now += 20
    quotas.take("acme", 100, 300).release(150)  # charged 400, used 150
    clock.now += 10
    error = refused(quotas, "acme", 200, 300)  # 550 in the window: 500 does not fit
    assert error.type == "tokens"
    assert error.headers() == {"Retry-After": "30"}  # when the first 400 leave the window
    a.release(120)  # it used 120 of its 400: 270 in the window now
    quotas.take("acme", 200, 300)
    clock.now += 61
    quotas.take("acme", 500, 500)  # the window is empty again


def test_a_request_larger_than_the_minute_says_so() -> None:
    quotas = TenantQuotas({"acme": Quota(tokens_per_minute=1000)})
    error = refused(quotas, "acme", 600, 600)
    assert "lower max_tokens" in error.message
    assert error.headers() == {"Retry-After": "60"}
