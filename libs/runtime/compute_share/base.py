"""What every compute-share backend has in common: the roles, the backend names, the result of
applying a share, the protocol a backend implements and the errors it raises.

A share is one worker's fraction of the unit's device, 0 < share <= 1. A share of 1 means the
worker has the whole device (no split: the `unified` mode, or a worker running alone). Below 1,
both workers derive the same split from the prefill worker's fraction (the decode worker uses
1 - share), so the two halves never overlap even after each side rounds to its granularity.
"""

import math
from typing import Literal, NamedTuple, Protocol

Role = Literal["prefill", "decode"]
BackendName = Literal["cuda-mps", "cuda-green", "cpu-cgroup", "cpu-affinity"]
BackendPreference = Literal["auto", "cuda-mps", "cuda-green", "cpu-cgroup", "cpu-affinity"]
AmountUnit = Literal["cores", "threads", "sms", "percent"]

ROLES: tuple[Role, ...] = ("prefill", "decode")
BACKENDS: tuple[BackendName, ...] = ("cuda-green", "cuda-mps", "cpu-cgroup", "cpu-affinity")
# Shares are quantised before rounding so that prefill's `p` and decode's `1 - p` land on the
# same side of every rounding boundary.
_SHARE_DIGITS = 6


class ComputeShareError(RuntimeError):
    """Base class of every error this package raises."""


class InvalidShareError(ComputeShareError, ValueError):
    """A share outside (0, 1], a role or unit name that is not allowed, or an empty core set."""


class BackendUnavailableError(ComputeShareError):
    """A backend was asked for on a machine that cannot run it; the message says why."""


class CudaCallError(ComputeShareError):
    """A CUDA driver call returned an error."""

    def __init__(self, call: str, error: str) -> None:
        super().__init__(f"{call} failed: {error}")
        self.call = call
        self.error = error


class RestartRequiredError(ComputeShareError):
    """The backend cannot change this worker's share in place: a new worker process, started
    with `env_update` added to its environment, must take over."""

    def __init__(self, message: str, env_update: dict[str, str]) -> None:
        super().__init__(message)
        self.env_update = env_update


class AppliedShare(NamedTuple):
    """What a worker actually got after its share was rounded to the backend's granularity."""

    backend: BackendName
    role: Role
    requested: float  # this worker's fraction of the device, as asked
    given: float  # the fraction it has after rounding to cores, quota, SMs or percent
    amount: int  # how much of the device, counted in `unit`
    unit: AmountUnit
    description: str


class ComputeShare(Protocol):
    """A worker's part of the device. `apply` may be called again between iterations to move the
    split; backends with `in_place = False` refuse a different share with RestartRequiredError.
    `close` gives back what `apply` took; it is safe to call twice."""

    @property
    def name(self) -> BackendName: ...

    @property
    def in_place(self) -> bool: ...

    def apply(self, share: float) -> AppliedShare: ...

    def close(self) -> None: ...


def check_share(share: float) -> float:
    """`share` if it is a fraction of a device in (0, 1]; InvalidShareError otherwise."""
    if not math.isfinite(share) or not 0.0 < share <= 1.0:
        raise InvalidShareError(f"a share is a fraction of the device in (0, 1], got {share!r}")
    return share


def check_role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidShareError(f"role must be one of {ROLES}, got {role!r}")


def prefill_fraction(role: Role, share: float) -> float:
    """The prefill worker's fraction of the device, seen from `role` holding `share`."""
    check_share(share)
    fraction = share if role == "prefill" else 1.0 - share
    return round(fraction, _SHARE_DIGITS)


def round_half_up(value: float) -> int:
    """Nearest integer, halves up (Python's round() sends halves to even)."""
    return math.floor(value + 0.5)


def threads_for(share: float, cores: int) -> int:
    """Threads a worker needs to use `share` of `cores`: a quota of 1.5 cores needs 2."""
    check_share(share)
    # The epsilon keeps 0.3 * 10 = 3.0000000000000004 at 3 threads.
    return min(cores, max(1, math.ceil(share * cores - 1e-9)))
