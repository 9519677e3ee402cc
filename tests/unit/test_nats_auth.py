"""The bus's users: credentials private to their owner, each role allowed the subjects it uses
and nothing that would let it act as another (a tenant from anyone but ingress, a release of
blocks by anyone but their users)."""

import json
import stat
from pathlib import Path

import bcrypt
import pytest

from duetserve.common import nats_auth
from duetserve.common.nats_auth import NatsAuthError, Permissions, permissions
from duetserve.proto import compute, subjects, workers
from duetserve.proto.supervision import LAUNCHER_REPORT

UNIT = "unit0"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more at the end."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def may_publish(allowed: Permissions, subject: str) -> bool:
    return any(matches(p, subject) for p in allowed.publish)


def may_subscribe(allowed: Permissions, subject: str) -> bool:
    return any(matches(p, subject) for p in allowed.subscribe)


def test_the_matcher_follows_nats_wildcards() -> None:
    assert matches("duet.tokens.*", "duet.tokens.s1")
    assert not matches("duet.tokens.*", "duet.tokens.s1.x")
    assert matches("_INBOX_ingress.>", "_INBOX_ingress.a.b")
    assert not matches("_INBOX_ingress.>", "_INBOX_ingress")
    assert not matches("duet.kv.unit0.alloc", "duet.kv.unit0.release")


# What each service does on the bus, read from its code: (role, mode, publishes, subscribes).
K = subjects.kv
USES = [
    (
        "ingress",
        "semi-pd",
        [
            *(
                subjects.sched(subjects.DEFAULT_UNIT, "submit"),
                subjects.sched(subjects.DEFAULT_UNIT, "resume"),
                subjects.sched(subjects.DEFAULT_UNIT, "cancel"),
            ),
            *(
                subjects.sched(subjects.DEFAULT_UNIT, "status"),
                subjects.TOKENS_REPLAY,
                subjects.health("kv_manager"),
            ),
        ],
        [subjects.tokens("ingress-1-ab"), LAUNCHER_REPORT, "_INBOX_ingress.x.y"],
    ),
    (
        "scheduler",
        "semi-pd",
        [
            *(
                K(UNIT, "alloc"),
                K(UNIT, "release"),
                subjects.cache(subjects.DEFAULT_UNIT, "match"),
                subjects.cache(subjects.DEFAULT_UNIT, "insert"),
            ),
            *(workers.prefill_batch_subject(UNIT), workers.decode_admit_subject(UNIT)),
            *(workers.decode_control_subject(UNIT), compute.compute_split_subject(UNIT)),
            *(subjects.tokens("s"), "$KV.duet_units.unit0.scheduler"),
        ],
        [
            *(
                subjects.sched(subjects.DEFAULT_UNIT, "submit"),
                subjects.sched(subjects.DEFAULT_UNIT, "resume"),
                subjects.TOKENS_REPLAY,
            ),
            *(workers.worker_events_subject(UNIT), compute.compute_applied_subject(UNIT)),
            subjects.health("scheduler"),
        ],
    ),
    ("scheduler", "disagg", [K(UNIT, "stats", "decode")], []),
    (
        "kv_manager",
        "disagg",
        [workers.worker_events_subject(UNIT)],
        [K(UNIT, "alloc"), K(UNIT, "alloc", "decode"), compute.replace_worker_subject(UNIT)],
    ),
    (
        "cache_index",
        "semi-pd",
        [K(UNIT, "retain"), K(UNIT, "shared")],
        [
            subjects.cache(subjects.DEFAULT_UNIT, "match"),
            subjects.cache(subjects.DEFAULT_UNIT, "evict"),
            workers.worker_events_subject(UNIT),
        ],
    ),
    (
        "prefill_worker",
        "semi-pd",
        [
            *(K(UNIT, "retain"), subjects.tokens("s"), compute.compute_applied_subject(UNIT)),
            compute.replace_worker_subject(UNIT),
        ],
        [
            *(workers.prefill_batch_subject(UNIT), compute.compute_split_subject(UNIT)),
            *(compute.handover_subject(UNIT), subjects.TOKENS_REPLAY),
        ],
    ),
    (
        "prefill_worker",
        "unified",
        [K(UNIT, "alloc"), workers.worker_events_subject(UNIT)],
        [workers.decode_admit_subject(UNIT), workers.decode_control_subject(UNIT)],
    ),
    (
        "decode_worker",
        "semi-pd",
        [
            *(K(UNIT, "alloc"), workers.worker_events_subject(UNIT), subjects.tokens("s")),
            workers.decode_admit_subject(UNIT),  # its residents, to its replacement
        ],
        [workers.decode_admit_subject(UNIT), workers.decode_control_subject(UNIT)],
    ),
    ("decode_worker", "disagg", [K(UNIT, "alloc", "decode"), K(UNIT, "storage")], []),
    ("launcher", "semi-pd", [LAUNCHER_REPORT, subjects.health("ingress")], ["_INBOX_launcher.a"]),
]


@pytest.mark.parametrize(("role", "mode", "publishes", "subscribes"), USES)
def test_each_role_may_use_what_it_uses(
    role: str, mode: str, publishes: list[str], subscribes: list[str]
) -> None:
    allowed = permissions(role, mode)
    assert [s for s in publishes if not may_publish(allowed, s)] == []
    assert [s for s in subscribes if not may_subscribe(allowed, s)] == []


@pytest.mark.parametrize("mode", nats_auth.MODES)
def test_only_ingress_speaks_for_tenants_and_only_the_scheduler_asks_the_cache(mode: str) -> None:
    for role in nats_auth.ROLES:
        allowed = permissions(role, mode)
        for subject in (
            subjects.sched(subjects.DEFAULT_UNIT, "submit"),
            subjects.sched(subjects.DEFAULT_UNIT, "resume"),
        ):
            assert may_publish(allowed, subject) == (role in ("ingress", "operator")), role
        for subject in (
            subjects.cache(subjects.DEFAULT_UNIT, "match"),
            subjects.cache(subjects.DEFAULT_UNIT, "insert"),
        ):
            assert may_publish(allowed, subject) == (role in ("scheduler", "operator")), role


@pytest.mark.parametrize("mode", nats_auth.MODES)
def test_no_role_reaches_beyond_its_own(mode: str) -> None:
    ingress, decode = permissions("ingress", mode), permissions("decode_worker", mode)
    assert not may_publish(ingress, subjects.kv(UNIT, "release"))
    assert not may_subscribe(ingress, subjects.kv(UNIT, "alloc"))
    assert not may_publish(ingress, compute.replace_worker_subject(UNIT))
    assert not may_publish(ingress, compute.handover_subject(UNIT))
    assert not may_subscribe(decode, "_INBOX_ingress.x")  # nobody reads another's replies
    assert not may_subscribe(decode, subjects.tokens("ingress-1"))  # nor a tenant's tokens
    launcher = permissions("launcher", mode)
    assert launcher.publish == (LAUNCHER_REPORT, subjects.ALL_HEALTH)
    for role in nats_auth.SERVICES:
        allowed = permissions(role, mode)
        assert ">" not in allowed.publish and ">" not in allowed.subscribe
        other = [f"{nats_auth.inbox_prefix(r)}.x" for r in nats_auth.ROLES if r != role]
        assert not any(may_subscribe(allowed, inbox) for inbox in other), role
    assert not may_subscribe(
        permissions("prefill_worker", "semi-pd"), workers.decode_admit_subject(UNIT)
    )


def test_permissions_are_per_unit() -> None:
    allowed = permissions("scheduler", "semi-pd", ("unit1",))
    assert may_publish(allowed, subjects.kv("unit1", "alloc"))
    assert not may_publish(allowed, subjects.kv("unit0", "alloc"))
    # The scheduler and cache index answer their own unit's subjects, and ingress reaches the
    # schedulers of the units it was given, no other.
    assert may_subscribe(allowed, subjects.sched("unit1", "submit"))
    assert not may_subscribe(allowed, subjects.sched("unit0", "submit"))
    assert may_publish(allowed, subjects.cache("unit1", "match"))
    assert not may_publish(allowed, subjects.cache("unit0", "match"))
    cache = permissions("cache_index", "semi-pd", ("unit1",))
    assert may_subscribe(cache, subjects.cache("unit1", "insert"))
    assert not may_subscribe(cache, subjects.cache("unit0", "insert"))
    ingress = permissions("ingress", "semi-pd", ("unit1", "unit2"))
    for unit in ("unit1", "unit2"):
        assert may_publish(ingress, subjects.sched(unit, "submit"))
    assert not may_publish(ingress, subjects.sched("unit3", "submit"))


def test_credentials_are_made_once_and_private(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    made = nats_auth.ensure_credentials(directory)
    assert set(made) == set(nats_auth.ROLES)
    assert len({c.password for c in made.values()}) == len(made)  # one password each
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for role in nats_auth.ROLES:
        path = nats_auth.credentials_path(directory, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert nats_auth.ensure_credentials(directory) == made  # kept across restarts


def test_credentials_others_can_read_are_refused(tmp_path: Path) -> None:
    nats_auth.ensure_credentials(tmp_path, ["ingress"])
    nats_auth.credentials_path(tmp_path, "ingress").chmod(0o644)
    with pytest.raises(NatsAuthError, match="readable by others"):
        nats_auth.load_credentials(tmp_path, "ingress")
    with pytest.raises(NatsAuthError, match="cannot read"):
        nats_auth.load_credentials(tmp_path, "scheduler")


def test_the_server_config_holds_digests_not_passwords(tmp_path: Path) -> None:
    made = nats_auth.ensure_credentials(tmp_path)
    text = nats_auth.server_config(made, "semi-pd")
    users = {u["user"]: u for u in json.loads(text)["authorization"]["users"]}
    assert set(users) == set(nats_auth.ROLES)
    for role, creds in made.items():
        assert creds.password not in text
        assert bcrypt.checkpw(creds.password.encode(), users[role]["password"].encode())
    assert users["ingress"]["permissions"]["allow_responses"] is True
    assert "allow_responses" not in users["launcher"]["permissions"]
    assert "tls" not in json.loads(text)
    tls = nats_auth.TlsFiles(Path("/c.pem"), Path("/k.pem"))
    with_tls = json.loads(nats_auth.server_config(made, "semi-pd", tls=tls))
    assert with_tls["tls"]["cert_file"] == "/c.pem"
    written = nats_auth.write_private(tmp_path / "nats" / "nats.conf", text)
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_the_operator_url_carries_its_credentials(tmp_path: Path) -> None:
    made = nats_auth.ensure_credentials(tmp_path, ["operator"])
    url = nats_auth.operator_url("nats://127.0.0.1:4222", tmp_path)
    assert url == f"nats://operator:{made['operator'].password}@127.0.0.1:4222"
    assert nats_auth.operator_url(url, tmp_path) == url  # not twice


def test_access_without_credentials_is_anonymous(tmp_path: Path) -> None:
    assert nats_auth.access("ingress", None).credentials is None
    nats_auth.ensure_credentials(tmp_path, ["ingress"])
    ingress = nats_auth.access("ingress", tmp_path)
    assert ingress.credentials is not None and ingress.credentials.user == "ingress"
    assert ingress.inbox_prefix == "_INBOX_ingress"


def test_unknown_roles_and_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        permissions("intruder", "semi-pd")
    with pytest.raises(ValueError, match="unknown mode"):
        permissions("ingress", "auto")
