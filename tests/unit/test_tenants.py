"""API keys map to tenants; no keys configured means one default tenant."""

from pathlib import Path

import pytest

from duetserve.services.ingress.errors import ApiError
from duetserve.services.ingress.quotas import Quota
from duetserve.services.ingress.tenants import DEFAULT_TENANT, TenantResolver


def test_no_keys_means_everyone_is_the_default_tenant() -> None:
    resolver = TenantResolver.from_settings("", None)
    assert resolver.resolve(None) == DEFAULT_TENANT
    assert resolver.resolve("Bearer anything") == DEFAULT_TENANT


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-file:tenant-c\n\n")
    resolver = TenantResolver.from_settings("sk-a:tenant-a, sk-b:tenant-b", keys_file)
    assert resolver.resolve("Bearer sk-a") == "tenant-a"
    assert resolver.resolve("bearer sk-b") == "tenant-b"
    assert resolver.resolve("Bearer sk-file") == "tenant-c"
    for header in (None, "Bearer nope", "Basic sk-a", "sk-a"):
        with pytest.raises(ApiError) as info:
            resolver.resolve(header)
        assert info.value.status == 401


def test_malformed_entries_are_refused() -> None:
    for bad in ("just-a-key", "key:", ":tenant", "key:bad.tenant"):
        with pytest.raises(ValueError):
            TenantResolver.from_settings(bad, None)


def test_quotas_follow_the_tenant_in_its_entry(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "sk-a:acme max_in_flight=4 tokens_per_minute=9000\n"
        "sk-a2:acme max_in_flight=4 tokens_per_minute=9000\n"
        "sk-b:beta tokens_per_minute=100\n"
        "sk-c:free\n"
    )
    resolver = TenantResolver.from_settings("", keys_file)
    assert resolver.quotas == {
        "acme": Quota(max_in_flight=4, tokens_per_minute=9000),
        "beta": Quota(tokens_per_minute=100),
    }
    for bad in ("k:t max_inflight=3", "k:t max_in_flight=x", "k:t tokens_per_minute=0"):
        with pytest.raises(ValueError):
            TenantResolver.from_settings(bad, None)
    with pytest.raises(ValueError, match="two different quotas"):
        TenantResolver.from_settings("k1:t max_in_flight=1, k2:t max_in_flight=2", None)
