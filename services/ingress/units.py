"""Which unit runs a request: the registry of live units (their cards, proto/units.py), as
ingress follows it, and the choice among them.

Each unit's scheduler rewrites its card every couple of seconds; ingress watches the cards
and keeps each with the time it was written (the writer's wall clock: the hosts of a cluster
keep their clocks in step to well under the bound). A unit whose card is older than
`stale_s` (its scheduler stopped writing: dead, or cut off from NATS) is no longer chosen,
whether or not the bucket has forgotten it yet.

The choice, by a score per live unit, highest first:

    score = hit - LOAD_WEIGHT * load
    hit   = the share of the prompt in the deepest of its prefixes the unit's card lists
            (the card lists a unit's recent prompts' block keys at depths 1, 2, 4, 8...
            blocks: scheduler/card.py), 0 when none is
    load  = (waiting + running + what this ingress sent it since its card was written)
            / its running limit

With LOAD_WEIGHT 1, a unit that holds a whole prompt's prefix wins unless it is busier by
more than its whole running limit: a prefill saved is worth a queue that long, and no more
(a hot prefix must not pile every request onto one unit). Counting what was sent since the
card spreads a burst that arrives between two cards instead of sending all of it to the
unit that looked best a second ago. Ties go to the less loaded unit, then the one with more
free KV blocks, then by name. With no live card (a single-unit stack whose scheduler has not
written one yet, or no registry at all) it is the configured unit, DUET_UNIT. A unit that
refuses a request for its load is passed over for the next best (generation.py).

The watch runs for the life of ingress and starts again after any failure (NATS away, the
bucket not created yet because no scheduler has run) or when it has heard nothing for
`stale_s` (a watch that stopped delivering): routing is advisory, never a reason to refuse a
request.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from duetserve.common.block_hash import iter_block_keys
from duetserve.common.nats_bus import Bus
from duetserve.proto.codec import ProtoError, decode
from duetserve.proto.units import (
    CARD_KEYS,
    PREFIX_KEY_BYTES,
    UNITS_BUCKET,
    UnitCard,
    summarised,
)

logger = logging.getLogger(__name__)
_DELETES = ("DEL", "PURGE")
RETRY_S = 2.0
LOAD_WEIGHT = 1.0


@dataclass(slots=True)
class _Known:
    card: UnitCard
    heard_at: float  # monotonic
    prefixes: frozenset[bytes]  # the card's prefix keys, as a set once per card
    sent: int = 0  # requests this ingress sent it since the card was written


class UnitDirectory:
    def __init__(
        self,
        configured: str,
        stale_s: float = 7.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.configured, self.stale_s, self.clock, self.wall = configured, stale_s, clock, wall
        self._units: dict[str, _Known] = {}
        self._task: asyncio.Task[None] | None = None

    # --- the choice -----------------------------------------------------------------------

    def live(self) -> list[UnitCard]:
        now = self.clock()
        return [k.card for k in self._units.values() if now - k.heard_at <= self.stale_s]

    def choose(
        self, tenant: str = "", token_ids: Sequence[int] = (), public_prefix_tokens: int = 0
    ) -> str:
        """The unit to send a new request to (see the module doc); counted as sent there."""
        chosen = self.choose_other((), tenant, token_ids, public_prefix_tokens)
        return self.configured if chosen is None else chosen

    def choose_other(
        self,
        exclude: Collection[str],
        tenant: str = "",
        token_ids: Sequence[int] = (),
        public_prefix_tokens: int = 0,
    ) -> str | None:
        """The best live unit but those in `exclude` (counted as sent there); None if there
        is none."""
        now = self.clock()
        live = [
            k
            for k in self._units.values()
            if now - k.heard_at <= self.stale_s and k.card.unit not in exclude
        ]
        if not live:
            return None
        if len(live) == 1:  # nothing to weigh (a one-unit stack): no prompt hashed
            best = live[0]
        else:
            prompt = _Prompt(tenant, token_ids, public_prefix_tokens)
            best = min(live, key=lambda known: _rank(known, prompt))
        best.sent += 1
        return best.card.unit

    def heard(self, card: UnitCard) -> None:
        """A card arrived: as old as its writer's clock says (a card a new watch reads back
        may be seconds old already), never newer than now."""
        age = max(0.0, self.wall() - card.written_at)
        self._units[card.unit] = _Known(card, self.clock() - age, frozenset(card.prefixes))

    def forget(self, unit: str) -> None:
        self._units.pop(unit, None)

    # --- following the registry -----------------------------------------------------------

    def start(self, bus: Bus) -> None:
        self._task = asyncio.create_task(self._follow(bus), name="unit-directory")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _follow(self, bus: Bus) -> None:
        failing = False
        while True:
            try:
                bucket = await bus.js.key_value(UNITS_BUCKET)
                watcher = await bucket.watch(CARD_KEYS)
                try:
                    failing = False
                    while True:  # nothing for stale_s: the watch starts again
                        entry = await watcher.updates(timeout=self.stale_s)
                        if entry is not None:
                            self._apply(entry.key, entry.operation, entry.value)
                finally:
                    await watcher.stop()
            except asyncio.CancelledError:
                raise
            except nats.js.errors.BucketNotFoundError:
                pass  # no scheduler has written yet
            except nats.errors.TimeoutError:
                continue  # a quiet registry: watch again
            except Exception as err:
                if not failing:
                    logger.warning("not following the unit registry for now: %s", err)
                failing = True
            await asyncio.sleep(RETRY_S)

    def _apply(self, key: str, operation: str | None, value: bytes | None) -> None:
        unit = key.rsplit(".", 1)[0]
        if operation in _DELETES or not value:
            self.forget(unit)
            return
        try:
            card = decode(value, UnitCard)
        except ProtoError as err:
            logger.warning("skipped a malformed unit card %s: %s", key, err)
            return
        if card.unit != unit:
            logger.warning("skipped the card of %s stored under %s", card.unit, key)
            return
        self.heard(card)


class _Prompt:
    """A request's prompt, with its block keys at the summarised depths computed once per
    block size (units may differ in it)."""

    def __init__(self, tenant: str, token_ids: Sequence[int], public_prefix_tokens: int) -> None:
        self.tenant, self.token_ids, self.public = tenant, token_ids, public_prefix_tokens
        self._keys: dict[int, list[tuple[int, bytes]]] = {}

    def hit(self, card: UnitCard, held: frozenset[bytes]) -> float:
        """The share of the prompt in its deepest prefix the card lists (`held`: its keys)."""
        if not self.token_ids or card.block_size <= 0 or not held:
            return 0.0
        keys = self._keys.get(card.block_size)
        if keys is None:
            blocks = iter_block_keys(self.tenant, self.token_ids, card.block_size, self.public)
            keys = [
                (depth, key[:PREFIX_KEY_BYTES])
                for depth, key in enumerate(blocks, 1)
                if summarised(depth)
            ]
            self._keys[card.block_size] = keys
        deepest = max((depth for depth, key in keys if key in held), default=0)
        return deepest * card.block_size / len(self.token_ids)


def _rank(known: _Known, prompt: _Prompt) -> tuple[float, float, int, str]:
    """Smallest first: the negated score, then load, free blocks (more first), name."""
    card = known.card
    load = (card.waiting + card.running + known.sent) / max(card.running_limit, 1)
    score = prompt.hit(card, known.prefixes) - LOAD_WEIGHT * load
    return (-score, load, -card.free_blocks, card.unit)
