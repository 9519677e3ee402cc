"""API keys to tenants. DESIGN.md: DUET_API_KEYS="key1:tenant-a,key2:tenant-b", or a file of
such lines (DUET_API_KEYS_FILE); with neither, keys are not checked and everyone is one default
tenant. Keys are kept only as SHA-256 digests."""

import hashlib
from pathlib import Path

from duetserve.proto.subjects import check_token
from duetserve.services.ingress.errors import unauthorized

DEFAULT_TENANT = "default"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class TenantResolver:
    def __init__(self, keys: dict[str, str]) -> None:
        self._tenants = {_digest(key): tenant for key, tenant in keys.items()}

    @property
    def checks_keys(self) -> bool:
        return bool(self._tenants)

    def resolve(self, authorization: str | None) -> str:
        """The tenant of an `Authorization: Bearer <key>` header; raises a 401 ApiError."""
        if not self._tenants:
            return DEFAULT_TENANT
        scheme, _, key = (authorization or "").partition(" ")
        tenant = self._tenants.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise unauthorized()
        return tenant

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: Path | None) -> "TenantResolver":
        entries = [e for e in api_keys.split(",") if e.strip()]
        if api_keys_file is not None:
            entries += [line for line in api_keys_file.read_text().splitlines() if line.strip()]
        return cls(dict(_parse_entry(e) for e in entries))


def _parse_entry(entry: str) -> tuple[str, str]:
    key, sep, tenant = entry.strip().rpartition(":")
    if not sep or not key or not tenant:
        raise ValueError("API key entries are 'key:tenant'")
    return key, check_token(tenant, "tenant")
