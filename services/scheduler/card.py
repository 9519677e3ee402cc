"""The unit's card in the registry (proto/units.py): the scheduler rewrites it every
`period_s` with the unit's load, so ingress replicas see which units are alive and how busy
each is; a unit that dies stops rewriting it and the bucket forgets it a TTL later. A write
that fails (NATS away for now) is logged and tried again next period: the card is advisory,
never a reason for the scheduler to stop."""

import asyncio
import logging
import time

from nats.js.kv import KeyValue

from duetserve.common.nats_bus import Bus
from duetserve.common.unit_role import units_bucket
from duetserve.proto.codec import encode
from duetserve.proto.units import UnitCard, card_key
from duetserve.services.scheduler.core import SchedulerCore

logger = logging.getLogger(__name__)
CARD_PERIOD_S = 2.0


def card_of(core: SchedulerCore, unit: str, scheduler: str) -> UnitCard:
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
    )


async def publish_cards(
    bus: Bus, core: SchedulerCore, unit: str, scheduler: str, period_s: float = CARD_PERIOD_S
) -> None:
    """Rewrite the card every `period_s` until cancelled."""
    bucket: KeyValue | None = None
    key = card_key(unit)
    failing = False
    while True:
        try:
            bucket = bucket or await units_bucket(bus)
            await bucket.put(key, encode(card_of(core, unit, scheduler)))
            failing = False
        except Exception as err:  # NATS away for now: the next period tries again
            if not failing:
                logger.warning("could not write the card of unit %s: %s", unit, err)
            failing = True
        await asyncio.sleep(period_s)
