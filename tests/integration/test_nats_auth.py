"""A real nats-server configured by nats_auth: strangers and wrong passwords are refused, each
role is held to its subjects (refused, not merely ignored), and over TLS a client that does not
speak it is refused while one that verifies the server's certificate gets through."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from duetserve.common import nats_auth
from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.common.nats_server import NatsServer
from duetserve.proto import subjects, workers
from tests.certificates import make_certificate

UNIT = "unit0"


def secured_server(tmp: Path, tls: nats_auth.TlsFiles | None = None) -> NatsServer:
    made = nats_auth.ensure_credentials(tmp / "credentials")
    config = nats_auth.server_config(made, "semi-pd", (UNIT,), tls)
    path = nats_auth.write_private(tmp / "nats.conf", config)
    return NatsServer(tmp / "store", config_file=path, tls=tls is not None)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    tmp = tmp_path_factory.mktemp("secured")
    with secured_server(tmp) as server:
        yield server, tmp / "credentials"


async def connect_as(server: NatsServer, credentials: Path, role: str) -> Bus:
    return await Bus.connect(server.url, f"test-{role}", access=nats_auth.access(role, credentials))


@pytest.fixture
async def operator(secured: tuple[NatsServer, Path]) -> AsyncIterator[Bus]:
    server, credentials = secured
    bus = await connect_as(server, credentials, "operator")
    yield bus
    await bus.close()


async def refused(url: str, **options: object) -> str:
    """Why a connection with `options` is refused (fails the test if it is not)."""
    try:
        client = await nats.connect(
            url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0, **options
        )
    except Exception as err:
        return repr(err)
    await client.close()
    raise AssertionError(f"connected with {options}")


async def test_strangers_and_wrong_passwords_are_refused(
    secured: tuple[NatsServer, Path],
) -> None:
    server, _ = secured
    assert "Authorization Violation" in await refused(server.url)
    assert "Authorization Violation" in await refused(server.url, user="ingress", password="x")
    assert "Authorization Violation" in await refused(server.url, user="root", password="")


async def collect(bus: Bus, subject: str) -> list[bytes]:
    seen: list[bytes] = []

    async def on(msg: Msg) -> None:
        seen.append(msg.data)

    await bus.subscribe(subject, on)
    await bus.flush()
    return seen


async def test_a_role_cannot_publish_beyond_its_subjects(
    secured: tuple[NatsServer, Path], operator: Bus
) -> None:
    server, credentials = secured
    releases = await collect(operator, subjects.kv(UNIT, "release"))
    submits = await collect(operator, subjects.sched(subjects.DEFAULT_UNIT, "submit"))
    ingress = await connect_as(server, credentials, "ingress")
    decode = await connect_as(server, credentials, "decode_worker")
    try:
        await ingress.publish(subjects.kv(UNIT, "release"), b"someone else's blocks")
        await decode.publish(
            subjects.sched(subjects.DEFAULT_UNIT, "submit"), b"a tenant of my choosing"
        )
        await ingress.publish(
            subjects.sched(subjects.DEFAULT_UNIT, "submit"), b"from ingress"
        )  # its own: allowed
        for bus in (ingress, decode):
            await bus.flush()
        await asyncio.sleep(0.3)
        assert releases == [] and submits == [b"from ingress"]
        assert ingress._events is not None and ingress._events.permission_violations == 1
        assert decode._events is not None and decode._events.permission_violations == 1
    finally:
        await ingress.close()
        await decode.close()


async def test_a_role_cannot_read_others_tokens_blocks_or_replies(
    secured: tuple[NatsServer, Path], operator: Bus
) -> None:
    server, credentials = secured
    decode = await connect_as(server, credentials, "decode_worker")
    try:
        stolen = []
        for subject in (
            subjects.tokens("ingress-1"),
            subjects.kv(UNIT, "alloc"),
            "_INBOX_ingress.>",
        ):
            stolen.append(await collect(decode, subject))
        await operator.publish(subjects.tokens("ingress-1"), b"a tenant's tokens")
        await operator.publish(subjects.kv(UNIT, "alloc"), b"an allocation")
        await operator.publish("_INBOX_ingress.abc.def", b"a reply to ingress")
        await operator.flush()
        await asyncio.sleep(0.3)
        assert stolen == [[], [], []]
        assert decode._events is not None and decode._events.permission_violations == 3
    finally:
        await decode.close()


async def test_requests_and_answers_flow_between_the_roles_that_use_them(
    secured: tuple[NatsServer, Path],
) -> None:
    server, credentials = secured
    ingress = await connect_as(server, credentials, "ingress")
    scheduler = await connect_as(server, credentials, "scheduler")
    try:

        async def answer(msg: Msg) -> None:
            await scheduler.reply(msg, b"admitted")

        await scheduler.subscribe(subjects.sched(subjects.DEFAULT_UNIT, "submit"), answer)
        await scheduler.flush()
        reply = await ingress.request(
            subjects.sched(subjects.DEFAULT_UNIT, "submit"), b"a request", timeout=2.0
        )
        assert reply.data == b"admitted"
        assert reply.subject.startswith("_INBOX_ingress.")
        # The scheduler may answer into the inboxes of those that ask it things, and no
        # other: the decode worker never asks it anything.
        await scheduler.publish("_INBOX_decode_worker.forged.reply", b"forged")
        await scheduler.flush()
        await asyncio.sleep(0.2)
        assert scheduler._events is not None and scheduler._events.permission_violations == 1
        # ingress asks what it may not: refused, so it hears nothing back.
        with pytest.raises(BusTimeout):
            await ingress.request(subjects.kv(UNIT, "stats"), b"", timeout=0.5)
    finally:
        await ingress.close()
        await scheduler.close()


async def test_a_request_taken_before_a_server_restart_is_answered_after_it(
    tmp_path: Path,
) -> None:
    """NATS's allow_responses lets a responder answer only what the running server delivered:
    after a restart, a prefill worker's answer to a batch it was computing was refused, and
    the scheduler waited out its 10 s."""
    server = secured_server(tmp_path).start()
    credentials = tmp_path / "credentials"
    scheduler = await connect_as(server, credentials, "scheduler")
    worker = await connect_as(server, credentials, "prefill_worker")
    try:
        taken: asyncio.Queue[Msg] = asyncio.Queue()

        async def take(msg: Msg) -> None:
            await taken.put(msg)

        subject = workers.prefill_batch_subject(UNIT)
        await worker.subscribe(subject, take)
        await worker.flush()
        asking = asyncio.ensure_future(scheduler.request(subject, b"batch", timeout=8.0))
        batch = await asyncio.wait_for(taken.get(), 5)
        server.stop()
        server.start()  # same port, same configuration
        for bus in (worker, scheduler):
            while not bus.is_connected:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # their subscriptions are the new server's too
        await worker.reply(batch, b"prefilled")
        assert (await asyncio.wait_for(asking, 8.0)).data == b"prefilled"
        assert worker._events is not None and worker._events.permission_violations == 0
    finally:
        await scheduler.close()
        await worker.close()
        server.stop()


async def test_over_tls_only_a_client_that_verifies_the_server_gets_in(tmp_path: Path) -> None:
    tls = make_certificate(tmp_path)
    with secured_server(tmp_path, tls) as server:
        assert server.url.startswith("tls://")
        plain_url = server.url.replace("tls://", "nats://")
        operator = nats_auth.load_credentials(tmp_path / "credentials", "operator")
        login = {"user": operator.user, "password": operator.password}
        # No TLS at all, and TLS that does not trust the server's certificate: refused.
        await refused(plain_url, **login)
        await refused(server.url, **login)
        access = nats_auth.access("operator", tmp_path / "credentials", tls.client_ca)
        bus = await Bus.connect(server.url, "test-tls", access=access)
        try:
            seen = await collect(bus, subjects.sched(subjects.DEFAULT_UNIT, "stats"))
            await bus.publish(subjects.sched(subjects.DEFAULT_UNIT, "stats"), b"over tls")
            await bus.flush()
            await asyncio.sleep(0.2)
            assert seen == [b"over tls"]
        finally:
            await bus.close()
