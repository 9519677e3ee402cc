"""One kv_manager and one scheduler per unit: a role lease in a JetStream key-value bucket.

A second kv_manager would allocate the same unit's blocks twice over, a second scheduler admit
the same requests twice. So each claims its role (`proto/units.py`: key `<unit>.<role>`) before
it serves, and renews it every ttl_s / 3; the bucket forgets an entry ttl_s after its last
renewal, so the role of a process that died frees itself.

- `claim` creates the key. If someone holds it, the claim waits (up to `wait_s`) for the
  entry to lapse, except that a holder on this host whose process is gone is taken over at
  once (the supervisor restarting a crashed service must not wait out the TTL). Still held
  then: RoleTaken, naming the holder.
- `keep` renews with the revision it last wrote; one that finds another revision (the role
  was taken over: this process was frozen past the TTL) raises RoleLost, and the process
  stops.
- `release` deletes it, if still ours.
"""

import asyncio
import logging
import os
import socket
import time

import nats.js.errors
from nats.js.kv import KeyValue

from duetserve.common.nats_bus import Bus
from duetserve.common.processes import process_stat, running
from duetserve.proto.codec import ProtoError, decode, encode
from duetserve.proto.units import UNITS_BUCKET, RoleHolder, role_key

logger = logging.getLogger(__name__)
DEFAULT_TTL_S = 10.0


async def units_bucket(bus: Bus, ttl_s: float = DEFAULT_TTL_S) -> KeyValue:
    """UNITS_BUCKET, created (entries living `ttl_s` after their last write) if it is not yet."""
    return await bus.key_value(UNITS_BUCKET, ttl_s)


class RoleTaken(RuntimeError):
    """Another process holds the role."""


class RoleLost(RuntimeError):
    """The role was taken over while this process held it."""


class UnitRole:
    def __init__(
        self, bus: Bus, unit: str, role: str, instance: str, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        self.bus, self.unit, self.role, self.ttl_s = bus, unit, role, ttl_s
        self.key = role_key(unit, role)
        pid = os.getpid()
        stat = process_stat(pid)
        self.me = RoleHolder(instance, pid, socket.gethostname(), stat.started if stat else 0)
        self._kv: KeyValue | None = None
        self._revision = 0

    async def claim(self, wait_s: float) -> None:
        """Take the role (see the module doc); RoleTaken if it stays held for `wait_s`."""
        kv = self._kv = await self._bucket()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._revision = await kv.create(self.key, encode(self.me))
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            holder, revision = await self._holder(kv)
            if holder is None:
                continue  # it lapsed between the two calls
            if self._dead(holder):
                try:
                    self._revision = await kv.update(self.key, encode(self.me), last=revision)
                    logger.warning(
                        "took over the %s role of %s from %s, which is gone",
                        self.role,
                        self.unit,
                        holder.instance,
                    )
                    return
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            if time.monotonic() >= deadline:
                raise RoleTaken(
                    f"the {self.role} of unit {self.unit} is held by {holder.instance} "
                    f"(pid {holder.pid} on {holder.host}); one unit runs one {self.role}"
                )
            await asyncio.sleep(min(1.0, self.ttl_s / 4))

    async def keep(self) -> None:
        """Renew every ttl_s / 3 until cancelled; RoleLost once it is someone else's."""
        assert self._kv is not None, "claim first"
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                self._revision = await self._kv.update(
                    self.key, encode(self.me), last=self._revision
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                holder, _ = await self._holder(self._kv)
                who = holder.instance if holder is not None else "nobody (it lapsed)"
                raise RoleLost(f"the {self.role} role of {self.unit} is now {who}'s") from None
            except Exception:  # NATS away for now: the next renewal tries again
                logger.warning("could not renew the %s role of %s", self.role, self.unit)

    async def release(self) -> None:
        if self._kv is None or not self.bus.is_connected:
            return
        try:
            await self._kv.delete(self.key, last=self._revision)
        except Exception as err:  # taken over, or gone: nothing of ours to delete
            logger.info("role %s not released: %s", self.key, err)

    async def _bucket(self) -> KeyValue:
        return await units_bucket(self.bus, self.ttl_s)

    async def _holder(self, kv: KeyValue) -> tuple[RoleHolder | None, int]:
        try:
            entry = await kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        try:
            return decode(entry.value or b"", RoleHolder), entry.revision or 0
        except ProtoError:
            return RoleHolder("unreadable", 0, ""), entry.revision or 0

    def _dead(self, holder: RoleHolder) -> bool:
        """Provably gone: on this host, and its pid is no process, a zombie, or a process
        started at another time (the pid was reused)."""
        if holder.host != self.me.host or holder.pid <= 0:
            return False
        return not running(holder.pid, holder.started)
