"""Every role tries every subject on a nats-server configured as the launcher configures it:
the server's verdicts are exactly the permission table's, and no stranger gets in."""

from duetserve.common import nats_auth
from duetserve.loadtest import bus_access


def test_the_server_refuses_exactly_what_the_table_forbids() -> None:
    results = bus_access.probe(nats_auth.MODES)
    assert bus_access.failures(results) == []
    for mode in results:
        assert mode.strangers_refused == mode.strangers_tried == 4
        assert {r.role for r in mode.roles} == set(nats_auth.ROLES) - {nats_auth.OPERATOR}
        # Most of what a role could try is refused: each is held to a few subjects.
        assert all(r.refused > r.tried / 2 for r in mode.roles), mode
