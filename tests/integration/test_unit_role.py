"""One kv_manager and one scheduler per unit (libs/common/unit_role.py), on a real
nats-server with JetStream."""

import subprocess
import sys
import time

import pytest

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer
from duetserve.common.unit_role import RoleTaken, UnitRole
from duetserve.proto.codec import encode
from duetserve.proto.units import RoleHolder, role_key
from tests.conftest import ModelDirs
from tests.integration.unit_services import new_unit, running_kv_manager
from tests.model_specs import TINY


async def test_a_second_kv_manager_for_a_unit_is_refused_and_the_first_keeps_serving(
    nats_server: NatsServer, bus: Bus, model_dirs: ModelDirs
) -> None:
    tiny = model_dirs.get(TINY)
    async with running_kv_manager(nats_server.url, tiny) as first:
        unit = first.settings.unit
        second = UnitRole(bus, unit, "kv_manager", "kv_manager-intruder", ttl_s=10.0)
        started = time.monotonic()
        with pytest.raises(RoleTaken, match=first.instance):
            await second.claim(wait_s=1.0)
        assert time.monotonic() - started >= 1.0  # it waited for the role to lapse
        assert await first.ready()
    # The first released its role when it stopped: the next one takes it at once.
    successor = UnitRole(bus, unit, "kv_manager", "kv_manager-next")
    await successor.claim(wait_s=0.0)
    await successor.release()


async def test_the_role_of_a_process_that_died_here_is_taken_over_at_once(bus: Bus) -> None:
    """A crashed kv_manager never released its role; its restart must not wait out the TTL."""
    unit = new_unit()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = UnitRole(bus, unit, "scheduler", "probe").me.host
    kv = await _bucket(bus)
    await kv.create(role_key(unit, "scheduler"), encode(RoleHolder("gone", dead.pid, host)))
    role = UnitRole(bus, unit, "scheduler", "scheduler-new")
    started = time.monotonic()
    await role.claim(wait_s=30.0)
    assert time.monotonic() - started < 2.0
    await role.release()


async def test_a_live_holder_elsewhere_is_not_taken_over(bus: Bus) -> None:
    unit = new_unit()
    kv = await _bucket(bus)
    await kv.create(role_key(unit, "scheduler"), encode(RoleHolder("far", 1, "another-host")))
    with pytest.raises(RoleTaken, match="far"):
        await UnitRole(bus, unit, "scheduler", "scheduler-new").claim(wait_s=0.5)


async def _bucket(bus: Bus):  # type: ignore[no-untyped-def]
    probe = UnitRole(bus, "probe", "probe", "probe")
    return await probe._bucket()
