"""API keys to tenants. DESIGN.md: DUET_API_KEYS="key1:tenant-a,key2:tenant-b", or a file of
such lines (DUET_API_KEYS_FILE); with neither, keys are not checked and everyone is one default
tenant. Keys are kept only as SHA-256 digests.

An entry may set its tenant's quotas after the tenant, separated by spaces (quotas.py):

    sk-4f1c...:acme max_in_flight=16 tokens_per_minute=200000
"""

import hashlib
import hmac
from pathlib import Path

from duetserve.proto.subjects import check_token
from duetserve.services.ingress.errors import unauthorized
from duetserve.services.ingress.quotas import Quota

DEFAULT_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class TenantResolver:
    def __init__(self, keys: dict[str, str], quotas: dict[str, Quota] | None = None) -> None:
        self._tenants = {_digest(key): tenant for key, tenant in keys.items()}
        self.quotas = quotas or {}

    @property
    def checks_keys(self) -> bool:
        return bool(self._tenants)

    def resolve(self, authorization: str | None) -> str:
        """The tenant of an `Authorization: Bearer <key>` header; raises a 401 ApiError."""
        if not self._tenants:
            return DEFAULT_TENANT
        scheme, _, key = (authorization or "").partition(" ")
        digest = _digest(key.strip())
        tenant = None
        if scheme.lower() == "bearer":
            for known, name in self._tenants.items():  # every key compared, in constant time
                if hmac.compare_digest(known, digest):
                    tenant = name
        if tenant is None:
            raise unauthorized()
        return tenant

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: Path | None) -> "TenantResolver":
        entries = [e for e in api_keys.split(",") if e.strip()]
        if api_keys_file is not None:
            entries += [line for line in api_keys_file.read_text().splitlines() if line.strip()]
        keys: dict[str, str] = {}
        quotas: dict[str, Quota] = {}
        for entry in entries:
            key, tenant, quota = _parse_entry(entry)
            keys[key] = tenant
            if quota is None:
                continue
            if quotas.get(tenant, quota) != quota:
                raise ValueError(f"tenant {tenant!r} is given two different quotas")
            quotas[tenant] = quota
        return cls(keys, quotas)


_QUOTA_FIELDS = ("max_in_flight", "tokens_per_minute")


def _parse_entry(entry: str) -> tuple[str, str, Quota | None]:
    """`key:tenant`, then optionally `name=value` quotas."""
    head, *settings = entry.split()
    key, sep, tenant = head.rpartition(":")
    if not sep or not key or not tenant:
        raise ValueError("API key entries are 'key:tenant', then optional quotas")
    values: dict[str, int] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in _QUOTA_FIELDS or not value.isdigit():
            raise ValueError(
                f"unknown quota {setting!r} (give max_in_flight=N or tokens_per_minute=N)"
            )
        values[name] = int(value)
    quota = Quota(**values) if values else None
    return key, check_token(tenant, "tenant"), quota
