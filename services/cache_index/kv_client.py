"""cache_index's calls to its unit's kv_manager. A call that does not succeed raises
KVCallFailed, which says whether kv_manager may still have done it (no answer in time)."""

from collections.abc import Sequence
from typing import TypeVar

from duetserve.common.nats_bus import Bus, BusNoResponders, BusTimeout
from duetserve.proto import kv, subjects
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.common import ErrorReply

T = TypeVar("T")


class KVCallFailed(Exception):
    def __init__(self, verb: str, code: str, detail: str, *, uncertain: bool = False) -> None:
        super().__init__(f"kv {verb}: {code}: {detail}")
        self.code = code
        self.uncertain = uncertain  # True: no answer, so kv_manager may have done it anyway


class KVClient:
    def __init__(self, bus: Bus, unit: str) -> None:
        self.bus = bus
        self.unit = unit

    async def retain(
        self, owner: str, block_ids: Sequence[int], pool: str = kv.UNIT_POOL
    ) -> kv.BlocksGranted:
        """One more reference, held by `owner`, to each block; all or nothing."""
        request = kv.RetainBlocks(owner, tuple(block_ids))
        return await self._call("retain", request, kv.BlocksGranted, pool)

    async def release(
        self, owner: str, block_ids: Sequence[int] = (), pool: str = kv.UNIT_POOL
    ) -> kv.BlocksReleased:
        """Drop `owner`'s references to the blocks, or to all of its blocks if none given."""
        request = kv.ReleaseBlocks(owner, tuple(block_ids))
        return await self._call("release", request, kv.BlocksReleased, pool)

    async def shared(
        self, owner: str, block_ids: Sequence[int], pool: str = kv.UNIT_POOL
    ) -> set[int]:
        """The blocks among `block_ids` that someone besides `owner` holds."""
        request = kv.SharedBlocksQuery(owner, tuple(block_ids))
        return set((await self._call("shared", request, kv.SharedBlocks, pool)).block_ids)

    async def _call(self, verb: str, request: object, expected: type[T], pool: str) -> T:
        try:
            reply = await self.bus.request(subjects.kv(self.unit, verb, pool), encode(request))
        except BusNoResponders as err:
            raise KVCallFailed(verb, "no_responders", str(err)) from None
        except BusTimeout as err:
            raise KVCallFailed(verb, "timeout", str(err), uncertain=True) from None
        try:
            answer = decode(reply.data, expected, ErrorReply)
        except ProtoError as err:
            raise KVCallFailed(verb, err.code, f"unreadable reply: {err}") from None
        if isinstance(answer, ErrorReply):
            raise KVCallFailed(verb, answer.code, answer.message)
        assert isinstance(answer, expected)
        return answer
