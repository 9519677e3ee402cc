"""The stack's bus is Duet's own: `make run` makes credentials on first start, every service
connects as its role and is held to its subjects (no refusal in the server's log after real
traffic), a stranger or a role acting as another is refused, tenants never share a cache
unless they declare a prefix public, and with a certificate configured the whole stack talks
TLS."""

import asyncio
import stat
from collections.abc import Iterator
from pathlib import Path

import nats
import openai
import pytest

from duetserve.common import nats_auth
from duetserve.common.nats_bus import Bus, BusTimeout
from duetserve.proto import subjects
from duetserve.proto.codec import decode, encode
from duetserve.proto.common import ErrorReply
from duetserve.proto.scheduling import Sampling, SubmitAccepted, SubmitRequest
from tests.certificates import make_certificate
from tests.conftest import ModelDirs
from tests.e2e.conftest import (
    INTRUDER,
    Stack,
    assert_stops_cleanly,
    bus_violations,
    start_stack,
)
from tests.model_specs import TINY

KEYS = {"tenant-a": "key-of-a", "tenant-b": "key-of-b"}
# Long enough for several whole KV blocks.
PROMPT = "The lighthouse keeper counted the ships that passed the rocks each night. " * 6


@pytest.fixture(scope="module")
def secured_stack(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    keys = ",".join(f"{key}:{tenant}" for tenant, key in KEYS.items())
    stack = start_stack(model_dirs.get(TINY), tmp_path_factory.mktemp("var"), DUET_API_KEYS=keys)
    yield stack
    assert_stops_cleanly(stack)


def credentials_of(stack: Stack) -> Path:
    return stack.var_dir / "credentials"


def bare_url(stack: Stack) -> str:
    """The stack's NATS URL without the operator's credentials."""
    scheme, _, rest = stack.nats_url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def test_credentials_are_made_on_first_start_for_the_owner_only(secured_stack: Stack) -> None:
    directory = credentials_of(secured_stack)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert [f.stem for f in files] == sorted(nats_auth.ROLES)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    config = secured_stack.var_dir / "nats" / "nats.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    text = config.read_text()
    for role in nats_auth.ROLES:
        assert nats_auth.load_credentials(directory, role).password not in text


def test_a_client_without_the_stack_credentials_is_refused(secured_stack: Stack) -> None:
    url = bare_url(secured_stack)

    async def attempt(**login: str) -> str:
        try:
            client = await nats.connect(
                url, name=INTRUDER, allow_reconnect=False, connect_timeout=2, **login
            )
        except Exception as err:
            return repr(err)
        await client.close()
        return "connected"

    async def run() -> list[str]:
        return [
            await attempt(),
            await attempt(user=INTRUDER, password="guess"),
            await attempt(user="ingress", password="guess"),
        ]

    assert all("Authorization Violation" in why for why in asyncio.run(run()))


def test_a_service_cannot_submit_as_a_tenant_only_ingress_can(secured_stack: Stack) -> None:
    """The tenant in a submit is trusted because only ingress (and the operator) may publish
    one: the same message from a worker's credentials is refused by the bus."""
    submit = SubmitRequest("cmpl-forged", "tenant-b", (5, 6, 7), Sampling(2), 0.0, "nobody-listens")

    async def run() -> tuple[object, str]:
        operator = await Bus.connect(secured_stack.nats_url, INTRUDER + "-operator")
        worker = await Bus.connect(
            bare_url(secured_stack),
            INTRUDER,
            access=nats_auth.access("decode_worker", credentials_of(secured_stack)),
        )
        try:
            as_operator = decode(
                (
                    await operator.request(
                        subjects.sched(subjects.DEFAULT_UNIT, "submit"), encode(submit), 5.0
                    )
                ).data,
                SubmitAccepted,
                ErrorReply,
            )
            forged = SubmitRequest(
                "cmpl-forged-2", "tenant-b", (5, 6, 7), Sampling(2), 0.0, "nobody-listens"
            )
            try:
                await worker.request(
                    subjects.sched(subjects.DEFAULT_UNIT, "submit"), encode(forged), 1.0
                )
                outcome = "answered"
            except BusTimeout:
                outcome = "refused"
            return as_operator, outcome
        finally:
            await operator.close()
            await worker.close()

    as_operator, as_worker = asyncio.run(run())
    assert isinstance(as_operator, SubmitAccepted)  # the message itself is fine
    assert as_worker == "refused"
    refusals = (secured_stack.var_dir / "nats").glob("nats-server-*.log")
    assert any(
        "Publish Violation" in line
        and INTRUDER in line
        and subjects.sched(subjects.DEFAULT_UNIT, "submit") in line
        for log in refusals
        for line in log.read_text().splitlines()
    )


def cached_tokens(stack: Stack, tenant: str, public_prefix_tokens: int = 0) -> int:
    """What `tenant`'s completion of PROMPT found cached (usage.prompt_tokens_details)."""
    api = openai.OpenAI(base_url=stack.base_url, api_key=KEYS[tenant], max_retries=0)
    extra = {"duet": {"cache": {"public_prefix_tokens": public_prefix_tokens}}}
    done = api.completions.create(
        model=stack.model_dir.name, prompt=PROMPT, max_tokens=2, extra_body=extra
    )
    assert done.usage is not None and done.usage.prompt_tokens_details is not None
    return done.usage.prompt_tokens_details.cached_tokens or 0


def test_tenants_share_no_cache_unless_a_prefix_is_declared_public(
    secured_stack: Stack,
) -> None:
    assert cached_tokens(secured_stack, "tenant-a") == 0
    assert cached_tokens(secured_stack, "tenant-a") > 0  # its own prefix: reused
    assert cached_tokens(secured_stack, "tenant-b") == 0  # a's prefix is not b's
    # Declared public by both: b finds what a left.
    public = 32
    assert cached_tokens(secured_stack, "tenant-a", public) == 0  # first as public
    assert cached_tokens(secured_stack, "tenant-b", public) >= public
    # The stack's own traffic stayed within its roles.
    assert bus_violations(secured_stack.var_dir) == []


def test_with_a_certificate_the_stack_talks_tls(
    model_dirs: ModelDirs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    var = tmp_path_factory.mktemp("var")
    tls = make_certificate(var)
    stack = start_stack(
        model_dirs.get(TINY),
        var,
        DUET_NATS_TLS_CERT=str(tls.cert),
        DUET_NATS_TLS_KEY=str(tls.key),
    )
    try:
        assert stack.nats_url.startswith("tls://")
        api = openai.OpenAI(base_url=stack.base_url, api_key="x", max_retries=0)
        done = api.completions.create(model=stack.model_dir.name, prompt="Hello", max_tokens=3)
        assert done.usage is not None and done.usage.completion_tokens == 3

        async def plain() -> str:  # the operator's password, but no TLS: refused
            try:
                client = await nats.connect(
                    stack.nats_url.replace("tls://", "nats://"),
                    name=INTRUDER,
                    allow_reconnect=False,
                    connect_timeout=2,
                )
            except Exception as err:
                return repr(err)
            await client.close()
            return "connected"

        assert asyncio.run(plain()) != "connected"
    finally:
        assert_stops_cleanly(stack)
