"""Who the bus lets in, and what it lets each one do: every role tries every subject.

For each mode, a nats-server configured as the launcher configures it (common/nats_auth.py).
Strangers try to connect (no credentials, a wrong password, a user that does not exist). Then
each role connects with its own credentials and tries to publish to, and subscribe to, every
subject Duet has (each service's request and event subjects for the unit, every inbox, every
wildcard that would read a whole family). The server's verdicts are compared with the table:
everything outside a role's permissions must be refused, everything inside let through.

    python -m duetserve.loadtest.bus_access --write docs/reliability.md

What services actually need is checked elsewhere: every test that runs the stack fails if
nats-server refused one of the stack's own messages (tests/e2e/conftest.py).
"""

import argparse
import asyncio
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors

from duetserve.common import nats_auth
from duetserve.common.nats_server import NatsServer
from duetserve.loadtest.bench_report import write_section
from duetserve.loadtest.faults import RELIABILITY_HEADER
from duetserve.proto import compute, subjects, workers
from duetserve.proto.kv import DECODE_POOL, UNIT_POOL
from duetserve.proto.supervision import LAUNCHER_REPORT
from duetserve.proto.units import UNITS_BUCKET

UNIT = "unit0"
KV_VERBS = ("alloc", "retain", "release", "heartbeat", "storage", "stats", "shared")
_REFUSAL = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"')


def catalogue() -> list[str]:
    """Every subject Duet uses for one unit, the inboxes of every role, and the wildcards an
    eavesdropper would subscribe to."""
    unit_subjects = [
        subjects.kv(UNIT, verb, pool) for pool in (UNIT_POOL, DECODE_POOL) for verb in KV_VERBS
    ]
    unit_subjects += [
        build(UNIT)
        for build in (
            workers.prefill_batch_subject,
            workers.decode_admit_subject,
            workers.decode_control_subject,
            workers.worker_events_subject,
            compute.compute_split_subject,
            compute.compute_applied_subject,
            compute.replace_worker_subject,
            compute.handover_subject,
        )
    ]
    return [
        *subjects.scheduler_subjects(UNIT),
        *subjects.cache_subjects(UNIT),
        *subjects.SEMANTIC_SUBJECTS,
        subjects.TOKENS_REPLAY,
        subjects.tokens("ingress-1-a1b2"),
        LAUNCHER_REPORT,
        *(subjects.health(service) for service in nats_auth.SERVICES),
        *unit_subjects,
        *(f"{nats_auth.inbox_prefix(role)}.probe.1" for role in nats_auth.ROLES),
        "_INBOX.probe.1",
        f"$KV.{UNITS_BUCKET}.{UNIT}.scheduler",
        "$JS.API.STREAM.DELETE.KV_" + UNITS_BUCKET,
        "$SYS.REQ.SERVER.PING",
        "duet.>",
        "duet.tokens.*",
        "duet.kv.>",
        ">",
    ]


def allowed(patterns: Sequence[str], subject: str) -> bool:
    """Whether NATS lets `subject` (which may hold wildcards) through these patterns: a
    wildcard subscription is allowed only when a pattern covers all it could match."""

    def covers(pattern: str, wanted: str) -> bool:
        want, have = pattern.split("."), wanted.split(".")
        for i, token in enumerate(want):
            if token == ">":
                return len(have) > i
            if i >= len(have) or have[i] == ">":
                return False
            if token != "*" and (token != have[i] or have[i] == "*"):
                return False
        return len(want) == len(have)

    return any(covers(pattern, subject) for pattern in patterns)


@dataclass
class RoleResult:
    role: str
    tried: int = 0
    refused: int = 0
    wrongly_refused: list[str] = field(default_factory=list)
    wrongly_allowed: list[str] = field(default_factory=list)


@dataclass
class ModeResult:
    mode: str
    strangers_tried: int = 0
    strangers_refused: int = 0
    roles: list[RoleResult] = field(default_factory=list)


async def _quiet(err: Exception) -> None:
    """nats-py prints a traceback for a refused connection unless told where errors go."""


async def try_stranger(url: str, **login: str) -> bool:
    """Whether a connection with `login` is refused."""
    try:
        client = await nats.connect(
            url,
            allow_reconnect=False,
            connect_timeout=2,
            max_reconnect_attempts=0,
            error_cb=_quiet,
            **login,
        )
    except Exception:
        return True
    await client.close()
    return False


async def try_role(url: str, credentials: Path, role: str, mode: str) -> RoleResult:
    """`role` publishes to and subscribes to every subject of the catalogue; the server's
    refusals come back through the error callback."""
    refusals: set[tuple[str, str]] = set()

    async def on_error(err: Exception) -> None:
        found = _REFUSAL.search(str(err))
        if found:
            kind = "publish" if found.group(1) == "publish" else "subscribe"
            refusals.add((kind, found.group(2)))  # nats-py lowercases the whole message

    own = nats_auth.access(role, credentials)
    assert own.credentials is not None
    client = await nats.connect(
        url,
        user=own.credentials.user,
        password=own.credentials.password,
        inbox_prefix=own.inbox_prefix,
        error_cb=on_error,
        allow_reconnect=False,
    )
    permitted = nats_auth.permissions(role, mode, (UNIT,))
    result = RoleResult(role)
    try:
        for subject in catalogue():
            # A publish to a wildcard is not a publish; only concrete subjects are sent to.
            if "*" not in subject and ">" not in subject:
                await client.publish(subject, b"probe")
                result.tried += 1
            subscription = await client.subscribe(subject)
            await client.flush()
            result.tried += 1
            await subscription.unsubscribe()
        await client.flush()
        await asyncio.sleep(0.3)  # the last refusals arrive
    finally:
        await client.close()
    for subject in catalogue():
        attempts = [("subscribe", permitted.subscribe)]
        if "*" not in subject and ">" not in subject:
            attempts.append(("publish", permitted.publish))
        for kind, patterns in attempts:
            was_refused = (kind, subject.lower()) in refusals
            result.refused += was_refused
            should_pass = allowed(patterns, subject)
            if was_refused and should_pass:
                result.wrongly_refused.append(f"{kind} {subject}")
            if not was_refused and not should_pass:
                result.wrongly_allowed.append(f"{kind} {subject}")
    return result


async def probe_mode(mode: str, directory: Path) -> ModeResult:
    made = nats_auth.ensure_credentials(directory / "credentials")
    config = nats_auth.write_private(
        directory / f"nats-{mode}.conf", nats_auth.server_config(made, mode, (UNIT,))
    )
    result = ModeResult(mode)
    with NatsServer(directory / f"store-{mode}", config_file=config) as server:
        strangers = [
            {},
            {"user": "ingress", "password": "guess"},
            {"user": "operator", "password": made["ingress"].password},  # another's password
            {"user": "root", "password": ""},
        ]
        for login in strangers:
            result.strangers_tried += 1
            result.strangers_refused += await try_stranger(server.url, **login)
        for role in nats_auth.ROLES:
            if role != nats_auth.OPERATOR:
                result.roles.append(
                    await try_role(server.url, directory / "credentials", role, mode)
                )
    return result


def probe(modes: Sequence[str] = nats_auth.MODES) -> list[ModeResult]:
    async def run() -> list[ModeResult]:
        with tempfile.TemporaryDirectory(prefix="duet-bus-access-") as tmp:
            return [await probe_mode(mode, Path(tmp)) for mode in modes]

    return asyncio.run(run())


def failures(results: Sequence[ModeResult]) -> list[str]:
    """Every verdict that differs from the table, and every stranger let in."""
    found = []
    for mode in results:
        if mode.strangers_refused != mode.strangers_tried:
            found.append(f"{mode.mode}: a stranger got in")
        for role in mode.roles:
            found += [f"{mode.mode} {role.role}: refused {s}" for s in role.wrongly_refused]
            found += [f"{mode.mode} {role.role}: allowed {s}" for s in role.wrongly_allowed]
    return found


def report(results: Sequence[ModeResult]) -> str:
    lines = [
        "Every role of the stack tries to publish to and subscribe to every subject Duet has",
        f"({len(catalogue())} subjects: each service's subjects for one unit, every role's inbox,",
        "and wildcards that would read whole families), on a nats-server configured as the",
        "launcher configures it; strangers try to connect. Reproduce with",
        "`python -m duetserve.loadtest.bus_access --write docs/reliability.md`.",
        "",
        "| mode | strangers refused | role attempts | refused | refused as the table says |",
        "|---|---|---|---|---|",
    ]
    for mode in results:
        tried = sum(r.tried for r in mode.roles)
        refused = sum(r.refused for r in mode.roles)
        wrong = sum(len(r.wrongly_refused) + len(r.wrongly_allowed) for r in mode.roles)
        lines.append(
            f"| {mode.mode} | {mode.strangers_refused} of {mode.strangers_tried} | {tried} "
            f"| {refused} | {'all' if wrong == 0 else f'{wrong} differ'} |"
        )
    problems = failures(results)
    if problems:
        lines += ["", "Differences from the table:", *(f"- {p}" for p in problems)]
    else:
        lines += ["", "Every attempt outside a role's permissions was refused, and none inside."]
    lines += [
        "The stack's own traffic is checked by every end-to-end test, which fails when",
        "nats-server refused one of the stack's messages.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.loadtest.bus_access", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--write", type=Path, help="write the section into this Markdown file")
    args = parser.parse_args(argv)
    results = probe()
    body = report(results)
    print(body)
    if args.write is not None:
        write_section(args.write, "bus-access", "Bus access", body, RELIABILITY_HEADER)
    return 1 if failures(results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
