"""Every NATS subject Duet uses. Services build subjects here and nowhere else."""

import re

ROOT = "duet"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Ingress -> scheduler (request/reply): a new request.
SCHED_SUBMIT = f"{ROOT}.sched.submit"
# Ingress -> scheduler (publish): finish or cancel a request (stop string, client gone).
SCHED_CANCEL = f"{ROOT}.sched.cancel"
# Anyone -> scheduler (request/reply): requests by phase, for metrics.
SCHED_STATS = f"{ROOT}.sched.stats"
# Ingress -> scheduler (request/reply): which of these requests does it still run?
SCHED_STATUS = f"{ROOT}.sched.status"
# Ingress -> scheduler (publish): continue a migrating request from the output its client has.
SCHED_RESUME = f"{ROOT}.sched.resume"
# Anyone -> cache_index (request/reply).
CACHE_MATCH = f"{ROOT}.cache.match"
CACHE_INSERT = f"{ROOT}.cache.insert"
CACHE_EVICT = f"{ROOT}.cache.evict"
# Ingress -> cache_index: the semantic response cache (proto/semantic.py); lookup is
# request/reply, insert a publish.
SEMANTIC_LOOKUP = f"{ROOT}.semantic.lookup"
SEMANTIC_INSERT = f"{ROOT}.semantic.insert"
SEMANTIC_SUBJECTS = (SEMANTIC_LOOKUP, SEMANTIC_INSERT)


def semantic_bucket(category: str) -> str:
    """The JetStream key-value bucket of one semantic cache category (its answers, for a
    cluster: cache_index/semantic_jetstream.py)."""
    return f"duet-semantic-{check_token(category, 'category')}"


# What the scheduler and the cache index answer, each family whole.
SCHEDULER_SUBJECTS = (SCHED_SUBMIT, SCHED_CANCEL, SCHED_STATS, SCHED_STATUS, SCHED_RESUME)
CACHE_SUBJECTS = (CACHE_MATCH, CACHE_INSERT, CACHE_EVICT)


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
