"""How the launcher supervises its services: which exits it restarts, after how long, and what
else must start again with them. Pure: no processes, no clock of its own.

- An exit with code 0 is the service's own decision (a worker that handed its requests to a
  replacement, the decode worker of unified mode, an operator's SIGTERM to one service): it is
  not restarted. Any other exit (a non-zero code, a signal that killed it) is a crash.
- A crashed service starts again after a backoff: 0.5 s, doubling with each crash up to 30 s,
  and back to 0.5 s once it has run for a minute without crashing.
- kv_manager holds the unit's memory (the KV pool and the weights that the workers mapped, the
  blocks that the scheduler and the cache index reference). When it dies those services are
  stopped and started again after it: they would otherwise write into, or account for, a pool
  that no longer exists.
"""

from dataclasses import dataclass, field

# The services that map or reference kv_manager's storage, restarted with it.
UNIT_SERVICES = ("cache_index", "scheduler", "prefill_worker", "decode_worker")
ROOT_SERVICE = "kv_manager"


def crashed(returncode: int) -> bool:
    """Whether an exit is a crash the launcher restarts (see the module doc)."""
    return returncode != 0


def restart_group(service: str, running: tuple[str, ...]) -> tuple[str, ...]:
    """What starts again when `service` crashed, in `running`'s (start) order: the service,
    and for kv_manager every unit service with it."""
    if service == ROOT_SERVICE:
        return tuple(s for s in running if s == service or s in UNIT_SERVICES)
    return (service,)


@dataclass(slots=True)
class Backoff:
    """The delay before a crashed service starts again (see the module doc)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    reset_after_s: float = 60.0
    _next_s: dict[str, float] = field(default_factory=dict)

    def delay(self, service: str, ran_s: float) -> float:
        """The wait before restarting `service`, which crashed after running `ran_s`."""
        if ran_s >= self.reset_after_s:
            self._next_s.pop(service, None)
        delay = self._next_s.get(service, self.initial_s)
        self._next_s[service] = min(self.max_s, delay * 2)
        return delay
