"""The unit's card in the registry (proto/units.py): the scheduler rewrites it every
`period_s` with the unit's load and a summary of the prefixes its cache is likely to hold, so
ingress replicas see which units are alive, how busy each is, and where a prompt's prefix
is warm; a unit that dies stops rewriting it and the bucket forgets it a TTL later. A write
that fails (NATS away for now) is logged and tried again next period: the card is advisory,
never a reason for the scheduler to stop.

The prefix summary: for each prompt the scheduler accepts, the block keys (the prefix
cache's own, common/block_hash.py, tenant-salted) at depths 1, 2, 4, 8... blocks, cut to
PREFIX_KEY_BYTES, the most recent SUMMARY_KEYS of them. A few keys a prompt keep the card
small (16 KB at most) and still tell ingress how deep a match goes, to within a factor of two.
It says what was recently prefilled here, not what the cache still holds: eviction is not
reported, so it is a likelihood, which is all routing needs."""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from nats.js.kv import KeyValue

from duetserve.common.block_hash import iter_block_keys
from duetserve.common.nats_bus import Bus
from duetserve.common.unit_role import units_bucket
from duetserve.proto.codec import encode
from duetserve.proto.units import PREFIX_KEY_BYTES, UnitCard, card_key, summarised
from duetserve.services.scheduler.core import SchedulerCore

logger = logging.getLogger(__name__)
CARD_PERIOD_S = 2.0
SUMMARY_KEYS = 2048


class PrefixSummary:
    """The most recent prompts' block keys at the summarised depths (see the module doc)."""

    def __init__(self, capacity: int = SUMMARY_KEYS) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def add(
        self, tenant: str, token_ids: Sequence[int], block_size: int, public_prefix_tokens: int
    ) -> None:
        keys = iter_block_keys(tenant, token_ids, block_size, public_prefix_tokens)
        for depth, key in enumerate(keys, 1):
            if summarised(depth):
                short = key[:PREFIX_KEY_BYTES]
                self._keys.pop(short, None)
                self._keys[short] = None
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def keys(self) -> tuple[bytes, ...]:
        return tuple(self._keys)


def card_of(
    core: SchedulerCore, unit: str, scheduler: str, summary: PrefixSummary | None = None
) -> UnitCard:
    view = core.view
    return UnitCard(
        unit=unit,
        scheduler=scheduler,
        waiting=len(view.waiting),
        running=len(view.prefilling) + len(view.decoding),
        running_limit=core.planner.max_running,
        free_blocks=view.free_blocks,
        total_blocks=view.total_blocks,
        written_at=time.time(),
        block_size=core.planner.config.block_size,
        prefixes=summary.keys() if summary is not None else (),
    )


async def publish_cards(
    bus: Bus,
    core: SchedulerCore,
    unit: str,
    scheduler: str,
    period_s: float = CARD_PERIOD_S,
    summary: PrefixSummary | None = None,
) -> None:
    """Rewrite the card every `period_s` until cancelled."""
    bucket: KeyValue | None = None
    key = card_key(unit)
    failing = False
    while True:
        try:
            bucket = bucket or await units_bucket(bus)
            await bucket.put(key, encode(card_of(core, unit, scheduler, summary)))
            failing = False
        except Exception as err:  # NATS away for now: the next period tries again
            if not failing:
                logger.warning("could not write the card of unit %s: %s", unit, err)
            failing = True
        await asyncio.sleep(period_s)
