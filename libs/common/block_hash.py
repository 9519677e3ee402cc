"""Stable keys for full KV blocks: chained, tenant-salted BLAKE2b digests.

Every process and machine computes the same key for the same block (Python's ``hash()`` is
salted per process and is never used), so ingress can compute keys to route a request to the
unit that holds its prefix, and a key can travel in a message.

Blocks. A prompt is cut into blocks of ``block_size`` tokens: block ``i`` holds tokens
``[i * block_size, (i + 1) * block_size)``. Only full blocks have keys; a trailing partial block
is never indexed and never shared.

Namespaces. Sharing across tenants leaks prompts through cache timing, so it is opt-in. A request
may declare ``public_prefix_tokens = N``. Block ``i`` is *public* iff it lies entirely within the
first N tokens, ``(i + 1) * block_size <= N``, i.e. ``i < N // block_size``. The public blocks are
therefore a leading run; the first block that extends past N, and every block after it, is
*private* to the requesting tenant. A request that declares nothing (N = 0) has only private
blocks: it neither offers nor sees public blocks.

Encoding (``u32le`` = unsigned 32-bit little-endian)::

    key(i)    = BLAKE2b(parent || namespace || tokens, digest_size=16, person=b"duet.kv.v1")
    parent    = key(i - 1), or 16 zero bytes for block 0
    namespace = 0x00                                   if block i is public
              | 0x01 || u32le(len(t)) || t             if private, t = tenant id in UTF-8
    tokens    = u32le(token) for each of the block's tokens (4 * block_size bytes)

Consequences: a public key depends on tokens only, so every tenant that declares the same public
prefix (or a longer one) gets the same keys for it; every private block carries its tenant's salt,
so no other tenant can produce its key; a private block chains from its public parent, so a
private continuation of a shared public prefix stays private. A tenant that declares different
public lengths for the same tokens gets different keys for the blocks in between: reuse follows
what was declared. ``person`` versions the scheme; change it whenever the encoding changes.
"""

import hashlib
import struct
from collections.abc import Iterator, Sequence
from typing import NewType

BlockKey = NewType("BlockKey", bytes)
"""The 16-byte key of one full block; it names the block's whole prefix, not only its tokens."""

KEY_BYTES = 16
ROOT_PARENT = BlockKey(bytes(KEY_BYTES))
"""The parent of block 0."""
PERSON = b"duet.kv.v1"
PUBLIC_MARKER = b"\x00"
PRIVATE_MARKER = b"\x01"
MAX_TOKEN_ID = 2**32 - 1


def num_public_blocks(public_prefix_tokens: int, block_size: int) -> int:
    """How many leading blocks lie entirely within the first ``public_prefix_tokens`` tokens."""
    if public_prefix_tokens < 0:
        raise ValueError(f"public_prefix_tokens must be >= 0, got {public_prefix_tokens}")
    return public_prefix_tokens // block_size


def namespace_bytes(tenant: str | None) -> bytes:
    """The namespace field: the public marker for ``None``, else the tenant's salt."""
    if tenant is None:
        return PUBLIC_MARKER
    salt = tenant.encode("utf-8")
    return PRIVATE_MARKER + struct.pack("<I", len(salt)) + salt


def block_key(parent: BlockKey, tokens: Sequence[int], tenant: str | None) -> BlockKey:
    """The key of one block given its parent's key; ``tenant=None`` means a public block."""
    if len(parent) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent)}")
    try:
        token_bytes = struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as exc:
        raise ValueError(f"token ids must lie in [0, {MAX_TOKEN_ID}]: {exc}") from exc
    data = parent + namespace_bytes(tenant) + token_bytes
    return BlockKey(hashlib.blake2b(data, digest_size=KEY_BYTES, person=PERSON).digest())


def iter_block_keys(
    tenant: str,
    token_ids: Sequence[int],
    block_size: int,
    public_prefix_tokens: int = 0,
) -> Iterator[BlockKey]:
    """Yield the keys of the full blocks of ``token_ids`` in order, lazily.

    Lazy so that a lookup stops hashing at its first miss. A trailing partial block yields
    nothing.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    num_public = num_public_blocks(public_prefix_tokens, block_size)
    parent = ROOT_PARENT
    for i in range(len(token_ids) // block_size):
        tokens = token_ids[i * block_size : (i + 1) * block_size]
        parent = block_key(parent, tokens, None if i < num_public else tenant)
        yield parent
