"""Who may do what on the bus: one NATS user per service role, each allowed exactly the subjects
it publishes and subscribes, and TLS when certificates are configured.

Without it anything that reaches NATS could submit as any tenant, read every tenant's tokens,
release any owner's blocks or spawn workers. With it:

- Each role (`ROLES`) has its own user and password, kept in `<credentials dir>/<role>.json`
  (mode 0600, the directory 0700), made once by `ensure_credentials` (the launcher does it on
  first start; `python -m duetserve.common.nats_auth` does it for compose or a NATS run
  elsewhere). A service reads only its own role's file (DUET_NATS_CREDENTIALS_DIR).
- The server's configuration (`server_config`) holds only bcrypt digests of the passwords and
  each user's permissions (`permissions`): the subjects it may publish to and subscribe to.
  Each role's replies come to an inbox of its own (`inbox_prefix`), which only it may
  subscribe to, so no service reads another's answers; a service may answer only into the
  inboxes of the roles that ask it things (`ASKED_BY`, and the health askers).
- Tenants are decided at ingress: only ingress may publish the subjects that carry a tenant
  from a client (a unit's `duet.sched.<unit>.submit` and `.resume`); the scheduler passes it
  on to the cache index, and only the scheduler may publish there.
- `operator` may do anything: for the people who run the stack and their tools (the fault
  suite, `split_switch`, tests). Its file is as private as every other.
"""

import argparse
import json
import os
import secrets
import ssl
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from duetserve.proto import compute, subjects, workers
from duetserve.proto.kv import DECODE_POOL, HOST_POOL, UNIT_POOL
from duetserve.proto.supervision import LAUNCHER_REPORT
from duetserve.proto.units import UNITS_BUCKET

SERVICES = ("kv_manager", "cache_index", "scheduler", "prefill_worker", "decode_worker", "ingress")
OPERATOR = "operator"
ROLES = (*SERVICES, "launcher", OPERATOR)
MODES = ("semi-pd", "unified", "disagg")
_BCRYPT_COST = 10  # a connection costs the server one check: ~50 ms of a core at 10


class NatsAuthError(RuntimeError):
    """Credentials that are missing, unreadable or readable by others."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool = True  # answers requests sent to it (health, at least)


@dataclass(frozen=True, slots=True)
class NatsAccess:
    """How one process connects: its role's credentials (None: anonymous, for a bus without
    authentication), the inbox its replies come to, and the TLS context (None: plain TCP
    unless the server asks for TLS)."""

    credentials: Credentials | None = None
    inbox_prefix: str = "_INBOX"
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server's certificate and key, and the CA clients verify it with (None: the
    certificate itself, when it is self-signed)."""

    cert: Path
    key: Path
    ca: Path | None = None

    @property
    def client_ca(self) -> Path:
        return self.ca or self.cert


def inbox_prefix(role: str) -> str:
    """Where `role`'s replies come: only `role` may subscribe below it."""
    return f"_INBOX_{subjects.check_token(role, 'role')}"


def _kv(units: Sequence[str], pools: Sequence[str], verbs: Iterable[str]) -> list[str]:
    verbs = tuple(verbs)
    return [subjects.kv(u, v, p) for u in units for p in pools for v in verbs]


def _per_unit(units: Sequence[str], *builders: Callable[[str], str]) -> list[str]:
    return [build(u) for u in units for build in builders]


def _per_unit_all(units: Sequence[str], family: Callable[[str], tuple[str, ...]]) -> list[str]:
    return [subject for u in units for subject in family(u)]


def _role_lease() -> list[str]:
    """The JetStream requests and key subjects a unit's role lease uses (common/unit_role.py)."""
    stream = f"KV_{UNITS_BUCKET}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$KV.{UNITS_BUCKET}.>",
    ]


def _registry_reader() -> list[str]:
    """What ingress uses to follow the unit registry (the cards in UNITS_BUCKET, read with an
    ordered consumer): reading and watching, never writing."""
    stream = f"KV_{UNITS_BUCKET}"
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


# Who sends requests to whom. A responder may publish into its askers' inboxes: NATS's
# allow_responses alone lets it answer only requests the server delivered itself, and a
# restarted nats-server forgets them, so an answer to a request taken before the restart was
# refused (and its asker waited out its timeout: a prefill batch, 10 s). Health is asked of
# every service by ingress and the launcher.
ASKED_BY = {
    "kv_manager": ("scheduler", "prefill_worker", "decode_worker", "cache_index"),
    "cache_index": ("scheduler", "ingress"),
    "scheduler": ("ingress",),
    # A worker hands its residents over to its replacement, of its own role, as admissions.
    "prefill_worker": ("scheduler", "prefill_worker"),
    "decode_worker": ("scheduler", "decode_worker"),
    "ingress": (),
}
HEALTH_ASKERS = ("ingress", "launcher", OPERATOR)


def _semantic_store(categories: Sequence[str]) -> list[str]:
    """What the semantic cache's JetStream backend uses: each category's bucket (create,
    read, write, watch with an ordered consumer)."""
    out = []
    for category in categories:
        bucket = subjects.semantic_bucket(category)
        stream = f"KV_{bucket}"
        out += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.FC.{stream}.>",
            f"$KV.{bucket}.>",
        ]
    return out


def permissions(
    role: str,
    mode: str,
    units: Sequence[str] = ("unit0",),
    semantic_categories: Sequence[str] = (),
) -> Permissions:
    """What `role` may publish and subscribe to in a stack of `units` running in `mode`
    (cache_index also to the JetStream buckets of `semantic_categories`).

    Besides what is listed, every role may subscribe to its own inbox, and every service to
    its health subject and publish into its askers' inboxes (the answers)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if role == OPERATOR:
        return Permissions((">",), (">",))
    pub: list[str] = []
    sub: list[str] = [f"{inbox_prefix(role)}.>"]
    if role in SERVICES:
        sub.append(subjects.health(role))
        askers = dict.fromkeys((*ASKED_BY[role], *HEALTH_ASKERS))
        pub += [f"{inbox_prefix(asker)}.>" for asker in askers]
    pools = (UNIT_POOL, DECODE_POOL) if mode == "disagg" else (UNIT_POOL,)
    events = workers.worker_events_subject
    tokens = subjects.ALL_TOKENS
    worker_common_pub = [
        tokens,
        *_per_unit(units, compute.compute_applied_subject, compute.replace_worker_subject),
        *_per_unit(units, compute.handover_subject),
    ]
    worker_common_sub = [
        subjects.TOKENS_REPLAY,
        *_per_unit(units, compute.compute_split_subject, compute.handover_subject),
    ]
    # A decode worker hands its residents over to its replacement as admissions.
    decode_pub = _per_unit(units, events, workers.decode_admit_subject)
    decode_sub = _per_unit(
        units,
        workers.decode_admit_subject,
        workers.decode_control_subject,
        workers.kv_load_subject,
    )
    if role == "kv_manager":
        verbs = ("alloc", "retain", "release", "heartbeat", "storage", "stats", "shared")
        sub += _kv(units, (*pools, HOST_POOL), verbs)
        sub += _per_unit(units, compute.replace_worker_subject)
        pub += [*_per_unit(units, events), *_role_lease()]
    elif role == "cache_index":
        # Its references: to blocks of the unit pool, and to host-tier blocks (earlier turns).
        pub += _kv(
            units, (UNIT_POOL, HOST_POOL), ("retain", "release", "shared", "heartbeat", "storage")
        )
        sub += [*_per_unit_all(units, subjects.cache_subjects), *subjects.SEMANTIC_SUBJECTS]
        sub += _per_unit(units, events)
        pub += _semantic_store(semantic_categories)
    elif role == "scheduler":
        pub += _kv(units, (UNIT_POOL,), ("alloc", "release", "heartbeat"))
        pub += _kv(units, pools, ("storage", "stats"))
        # The host tier: swapped-out KV held under its owners (DUET_HOST_KV_MB).
        pub += _kv(units, (HOST_POOL,), ("release", "heartbeat", "stats"))
        pub += [*_per_unit_all(units, subjects.cache_subjects), tokens]
        pub += _per_unit(
            units,
            workers.prefill_batch_subject,
            workers.decode_admit_subject,
            workers.decode_control_subject,
            workers.kv_load_subject,
            compute.compute_split_subject,
        )
        pub += _role_lease()
        sub += [*_per_unit_all(units, subjects.scheduler_subjects), subjects.TOKENS_REPLAY]
        sub += _per_unit(
            units, events, compute.compute_applied_subject, compute.compute_split_subject
        )
    elif role == "prefill_worker":
        pub += _kv(units, (UNIT_POOL,), ("retain", "release", "heartbeat", "storage"))
        pub += worker_common_pub
        sub += [*worker_common_sub, *_per_unit(units, workers.prefill_batch_subject)]
        if mode == "unified":  # it decodes too, and swaps out and in
            pub += [*_kv(units, (UNIT_POOL,), ("alloc",)), *decode_pub]
            pub += _kv(units, (HOST_POOL,), ("alloc", "release", "storage"))
            sub += decode_sub
    elif role == "decode_worker":
        own = (DECODE_POOL,) if mode == "disagg" else (UNIT_POOL,)
        pub += _kv(units, own, ("alloc", "retain", "release", "heartbeat", "storage"))
        pub += _kv(units, (UNIT_POOL,), ("storage",))
        if mode != "disagg":  # swaps out to the host tier and back
            pub += _kv(units, (HOST_POOL,), ("alloc", "release", "storage"))
        pub += [*worker_common_pub, *decode_pub]
        sub += [*worker_common_sub, *decode_sub]
    elif role == "ingress":
        pub += [*_per_unit_all(units, subjects.scheduler_subjects)]
        pub += [subjects.TOKENS_REPLAY, subjects.ALL_HEALTH, *_registry_reader()]
        pub += subjects.SEMANTIC_SUBJECTS
        sub += [tokens, LAUNCHER_REPORT]
    elif role == "launcher":
        pub += [LAUNCHER_REPORT, subjects.ALL_HEALTH]
    return Permissions(tuple(dict.fromkeys(pub)), tuple(dict.fromkeys(sub)), role in SERVICES)


# --- credentials ---------------------------------------------------------------------------


def ensure_credentials(directory: Path, roles: Iterable[str] = ROLES) -> dict[str, Credentials]:
    """Each role's credentials from `directory`, made (a random password each, files 0600 in a
    0700 directory) for the roles that have none yet. Existing ones are kept: services that
    run on keep connecting after a restart of the launcher."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    made = {}
    for role in roles:
        path = credentials_path(directory, role)
        if not path.exists():
            entry = {"user": role, "password": secrets.token_urlsafe(32)}
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # made meanwhile by another process: read theirs
                pass
            else:
                with os.fdopen(fd, "w") as file:
                    json.dump(entry, file)
        made[role] = load_credentials(directory, role)
    return made


def credentials_path(directory: Path, role: str) -> Path:
    return directory / f"{subjects.check_token(role, 'role')}.json"


def load_credentials(directory: Path, role: str) -> Credentials:
    """`role`'s credentials; NatsAuthError if the file is missing, malformed, or readable by
    anyone but its owner (as ssh refuses a private key others can read)."""
    path = credentials_path(directory, role)
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise NatsAuthError(
                f"{path} is readable by others (mode {mode:o}); chmod 600 it, or delete it to "
                "have new credentials made"
            )
        entry = json.loads(path.read_text())
        return Credentials(str(entry["user"]), str(entry["password"]))
    except NatsAuthError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise NatsAuthError(f"cannot read NATS credentials {path}: {err}") from None


def access(role: str, credentials_dir: Path | None, tls_ca: Path | None = None) -> NatsAccess:
    """How a process of `role` connects: with its credentials when there is a credentials
    directory (else anonymously), verifying the server with `tls_ca` when it is set."""
    tls = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca is not None else None
    if credentials_dir is None:
        return NatsAccess(tls=tls)
    return NatsAccess(load_credentials(credentials_dir, role), inbox_prefix(role), tls)


def operator_url(url: str, credentials_dir: Path) -> str:
    """`url` with the operator's user and password in it (what the stack's tools and tests
    connect with). Never print it."""
    operator = load_credentials(credentials_dir, OPERATOR)
    parts = urlsplit(url)
    netloc = f"{quote(operator.user, safe='')}:{quote(operator.password, safe='')}@"
    return urlunsplit(parts._replace(netloc=netloc + parts.netloc.rpartition("@")[2]))


# --- the server's side -----------------------------------------------------------------------


def server_config(
    credentials: dict[str, Credentials],
    mode: str,
    units: Sequence[str] = ("unit0",),
    tls: TlsFiles | None = None,
    semantic_categories: Sequence[str] = (),
) -> str:
    """nats-server's configuration: one user per role with its permissions, passwords as
    bcrypt digests; TLS required when `tls` is given. JSON, which nats-server reads."""
    import bcrypt  # only here: the services never hash

    users = []
    for role, creds in credentials.items():
        allowed = permissions(role, mode, units, semantic_categories)
        rules: dict[str, object] = {
            "publish": {"allow": list(allowed.publish)},
            "subscribe": {"allow": list(allowed.subscribe)},
        }
        if allowed.responds:
            rules["allow_responses"] = True
        digest = bcrypt.hashpw(creds.password.encode(), bcrypt.gensalt(_BCRYPT_COST)).decode()
        users.append({"user": creds.user, "password": digest, "permissions": rules})
    config: dict[str, object] = {"authorization": {"users": users}}
    if tls is not None:
        config["tls"] = {"cert_file": str(tls.cert), "key_file": str(tls.key), "timeout": 5}
    return json.dumps(config, indent=2)


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by its owner only (replacing what was there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    temporary.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Make the credentials (if missing) and write nats-server's configuration, for a NATS
    server the launcher does not start (compose, a cluster's own)."""
    parser = argparse.ArgumentParser(
        prog="python -m duetserve.common.nats_auth", description=main.__doc__
    )
    parser.add_argument("--credentials", type=Path, required=True, help="credentials directory")
    parser.add_argument("--config", type=Path, required=True, help="nats-server config to write")
    parser.add_argument(
        "--mode", choices=MODES, help="the unit's mode (default: DUET_MODE's, `auto` resolved)"
    )
    parser.add_argument("--unit", action="append", help="a unit's name (default: unit0)")
    parser.add_argument("--tls-cert", type=Path, help="the server's certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    try:
        credentials = ensure_credentials(args.credentials)
    except NatsAuthError as err:
        print(f"duet: {err}", file=sys.stderr)
        return 1
    units = tuple(args.unit or ("unit0",))
    if args.mode is None:
        from duetserve.common.settings import ServingSettings  # it imports this module

        args.mode = ServingSettings().mode
    write_private(args.config, server_config(credentials, args.mode, units, tls))
    print(
        f"wrote {args.config} ({len(credentials)} users, {args.mode} mode); "
        f"credentials in {args.credentials}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
