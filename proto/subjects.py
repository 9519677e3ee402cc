"""Every NATS subject Duet uses. Services build subjects here and nowhere else."""

import re

ROOT = "duet"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# A unit's scheduler and cache index answer subjects scoped to the unit (`sched`, `cache`), so
# that many units share one NATS cluster and each request runs on the one it was sent to.
#   scheduler: submit (request/reply, ingress: a new request), cancel (publish, ingress:
#   finish or cancel one: stop string, client gone), stats (request/reply, anyone: requests by
#   phase, for metrics), status (request/reply, ingress: which of these does it still run?),
#   resume (publish, ingress: continue a migrating request from the output its client has).
#   cache_index: match, insert, evict (request/reply, the unit's scheduler and anyone).
SCHED_VERBS = ("submit", "cancel", "stats", "status", "resume")
DEFAULT_UNIT = "unit0"  # the unit a stack runs when DUET_UNIT names none
CACHE_VERBS = ("match", "insert", "evict")


def sched(unit: str, verb: str) -> str:
    """One of a unit's scheduler subjects (SCHED_VERBS)."""
    if verb not in SCHED_VERBS:
        raise ValueError(f"unknown scheduler verb {verb!r}")
    return f"{ROOT}.sched.{check_token(unit, 'unit')}.{verb}"


def cache(unit: str, verb: str) -> str:
    """One of a unit's cache index subjects (CACHE_VERBS)."""
    if verb not in CACHE_VERBS:
        raise ValueError(f"unknown cache verb {verb!r}")
    return f"{ROOT}.cache.{check_token(unit, 'unit')}.{verb}"


def scheduler_subjects(unit: str) -> tuple[str, ...]:
    """What a unit's scheduler answers, whole."""
    return tuple(sched(unit, verb) for verb in SCHED_VERBS)


def cache_subjects(unit: str) -> tuple[str, ...]:
    """What a unit's cache index answers, whole."""
    return tuple(cache(unit, verb) for verb in CACHE_VERBS)


# Ingress -> cache_index: the semantic response cache (proto/semantic.py); lookup is
# request/reply, insert a publish.
SEMANTIC_LOOKUP = f"{ROOT}.semantic.lookup"
SEMANTIC_INSERT = f"{ROOT}.semantic.insert"
SEMANTIC_SUBJECTS = (SEMANTIC_LOOKUP, SEMANTIC_INSERT)


def semantic_bucket(category: str) -> str:
    """The JetStream key-value bucket of one semantic cache category (its answers, for a
    cluster: cache_index/semantic_jetstream.py)."""
    return f"duet-semantic-{check_token(category, 'category')}"


def check_token(value: str, what: str) -> str:
    """A subject token: letters, digits, '_' and '-' only (no '.', '*', '>' or spaces)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must be 1-128 of [A-Za-z0-9_-]")
    return value


def health(service: str) -> str:
    """Request/reply: every service instance answers its own service's health subject."""
    return f"{ROOT}.health.{check_token(service, 'service')}"


def tokens(stream: str) -> str:
    """Publish: the token stream of one ingress, every request it holds a client for. Producers
    (workers, the scheduler) send TokenBatches here, one per step per ingress; see
    proto/tokens.py."""
    return f"{ROOT}.tokens.{check_token(stream, 'stream')}"


# Ingress -> every producer of tokens (publish): send again what a stream lacks (ReplayQuery).
TOKENS_REPLAY = f"{ROOT}.replay.tokens"
# Every ingress's token stream, and every service's health subject: wildcards for the bus's
# permissions (common/nats_auth.py), never for publishing.
ALL_TOKENS = f"{ROOT}.tokens.*"
ALL_HEALTH = f"{ROOT}.health.*"


def stream_name(instance: str, suffix: str) -> str:
    """The token stream of an ingress instance: its name made subject-safe, and a suffix that
    makes it unique to one run of the process."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", instance)[:96]
    return check_token(f"{safe}-{suffix}", "stream")


def kv(unit: str, verb: str, pool: str = "") -> str:
    """Request/reply to one unit's kv_manager: alloc, release, retain, heartbeat, storage.
    `pool` names a second pool of the unit ("decode" in disagg mode); "" is the unit's pool,
    the one the scheduler admits into and the prefix cache indexes."""
    unit_part = check_token(unit, "unit")
    if pool:
        unit_part += "." + check_token(pool, "pool")
    return f"{ROOT}.kv.{unit_part}.{check_token(verb, 'verb')}"
