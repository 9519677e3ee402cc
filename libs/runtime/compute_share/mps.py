"""The `cuda-mps` backend: CUDA MPS limits a client process to a percentage of the GPU's SMs,
read once from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE when the process starts its CUDA context.

It cannot change in place: moving the split means starting a NEW worker process with the new
percentage (the unit's resident process does that, handing the requests over). This module only
does the arithmetic, builds the child's environment and tells whether MPS can be used here:
an NVIDIA GPU is present and an MPS control daemon answers in the pipe directory
(CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps; the daemon is `nvidia-cuda-mps-control -d`).
The percentages of the two workers need not add up to 100: MPS caps each client separately.
"""

import stat
from collections.abc import Mapping
from pathlib import Path

from duetserve.runtime.compute_share.base import (
    AppliedShare,
    BackendName,
    InvalidShareError,
    RestartRequiredError,
    Role,
    check_role,
    check_share,
    round_half_up,
)

PERCENT_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
PIPE_DIR_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")


def mps_percent(share: float) -> int:
    """The active-thread percentage for `share`: nearest integer, within [1, 100]."""
    check_share(share)
    return min(100, max(1, round_half_up(share * 100.0)))


def mps_child_env(
    share: float, base_env: Mapping[str, str], pipe_dir: Path | None = None
) -> dict[str, str]:
    """`base_env` plus what a worker process holding `share` of the GPU must be started with."""
    env = dict(base_env)
    env[PERCENT_ENV] = str(mps_percent(share))
    if pipe_dir is not None:
        env[PIPE_DIR_ENV] = str(pipe_dir)
    return env


def mps_pipe_dir(env: Mapping[str, str]) -> Path:
    """The MPS pipe directory a process with environment `env` talks to."""
    return Path(env.get(PIPE_DIR_ENV) or DEFAULT_PIPE_DIR)


def parse_percent(value: str | None) -> int | None:
    """The percentage a worker was started with (its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), or
    None when it was started without one."""
    if value is None or value.strip() == "":
        return None
    try:
        percent = int(value)
    except ValueError:
        raise InvalidShareError(f"{PERCENT_ENV} must be an integer, got {value!r}") from None
    if not 1 <= percent <= 100:
        raise InvalidShareError(f"{PERCENT_ENV} must be in 1..100, got {percent}")
    return percent


def mps_daemon_running(pipe_dir: Path) -> bool:
    """Whether an MPS control daemon listens in `pipe_dir` (its `control` endpoint exists)."""
    try:
        mode = (pipe_dir / "control").stat().st_mode
    except OSError:
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)


class MpsShare:
    """A worker under MPS. `apply` confirms that the percentage this process was started with
    (`started_percent`, None for no limit = 100) is the one `share` needs, and otherwise raises
    RestartRequiredError carrying the environment for the replacement worker."""

    name: BackendName = "cuda-mps"
    in_place: bool = False

    def __init__(self, role: Role, started_percent: int | None) -> None:
        self.role = check_role(role)
        self.percent = 100 if started_percent is None else started_percent

    def apply(self, share: float) -> AppliedShare:
        wanted = mps_percent(share)
        if wanted != self.percent:
            raise RestartRequiredError(
                f"cuda-mps: this {self.role} worker runs at {self.percent}% and share {share:g} "
                f"needs {wanted}%: start a new worker with {PERCENT_ENV}={wanted}",
                {PERCENT_ENV: str(wanted)},
            )
        return AppliedShare(
            backend=self.name,
            role=self.role,
            requested=share,
            given=self.percent / 100.0,
            amount=self.percent,
            unit="percent",
            description=f"{self.role}: MPS active thread percentage {self.percent}%",
        )

    def close(self) -> None:
        """Nothing to give back: the limit ends with the process."""
