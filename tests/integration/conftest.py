"""Integration fixtures: a real nats-server (never a mock) and a Bus connected to it.

`nats_server` is one server for the whole session, on a free loopback port with its JetStream
store under pytest's temporary directory; tests that stop or restart a server start their own
`NatsServer` instead.
"""

from collections.abc import AsyncIterator, Iterator

import pytest

from duetserve.common.nats_bus import Bus
from duetserve.common.nats_server import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connected = await Bus.connect(nats_server.url, "test", request_timeout_s=1.0)
    yield connected
    await connected.close()
