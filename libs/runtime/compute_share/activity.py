"""A work-conserving thread count for the two CPU workers of a unit.

Under the cpu-cgroup weight (the default), each worker ran a torch thread per core of the unit,
so that it could use them all while the other was idle. While both computed, four OpenMP threads
shared two cores: a thread preempted in the middle of a parallel region held up its partner at
every barrier, and CFS weights did not hold a worker that sleeps between steps to its share.
Here each worker says, in 8 bytes of shared memory both map, whether it has work; before each
model call a worker takes every core of the unit while the other has none, and its part of the
cores (by the split) while both have: the threads never outnumber the cores, and an idle
worker's cores are never lost.

    activity = UnitActivity.open(activity_path(region), "decode", cores=2)
    activity.set_active(True)
    torch.set_num_threads(activity.threads(own_share=0.3))

"Has work" is the decode worker's residents (between steps too) and the prefill worker's batch
in hand. A worker that starts a call on every core keeps them until that call ends: at most one
prefill batch or decode step runs oversubscribed after the other starts.

The file lives beside the unit's storage region in /dev/shm (`activity_path`), created by
whichever worker maps it first; kv_manager removes it with the region.
"""

import contextlib
import mmap
import os
import struct
from pathlib import Path

from duetserve.runtime.compute_share.base import Role, check_role

SHM_DIR = Path("/dev/shm")
_SLOT = struct.Struct("=i")
_SLOTS: dict[Role, int] = {"prefill": 0, "decode": 1}
SIZE = _SLOT.size * len(_SLOTS)


def activity_path(region: str) -> Path:
    """Where the activity of the unit whose storage is shared-memory region `region` lives."""
    return SHM_DIR / f"{region}.activity"


def remove_activity(region: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(activity_path(region))


def split_threads(role: Role, own_share: float, cores: int) -> int:
    """Threads of `role` while both workers compute: its share of the cores, at least one
    each, the two adding up to the cores (on one core, one each)."""
    if cores <= 1:
        return 1
    prefill_share = own_share if role == "prefill" else 1.0 - own_share
    prefill = min(max(round(prefill_share * cores), 1), cores - 1)
    return prefill if role == "prefill" else cores - prefill


class UnitActivity:
    def __init__(self, mapping: mmap.mmap, role: Role, cores: int) -> None:
        self._map = mapping
        self.role = check_role(role)
        self.cores = max(cores, 1)
        self._own = _SLOTS[role] * _SLOT.size
        self._other = _SLOTS["decode" if role == "prefill" else "prefill"] * _SLOT.size

    @classmethod
    def open(cls, path: Path, role: Role, cores: int) -> "UnitActivity":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)  # zero-filled: neither has work
            mapping = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        activity = cls(mapping, role, cores)
        activity.set_active(False)
        return activity

    def set_active(self, active: bool) -> None:
        _SLOT.pack_into(self._map, self._own, int(active))

    def other_active(self) -> bool:
        return bool(_SLOT.unpack_from(self._map, self._other)[0])

    def threads(self, own_share: float) -> int:
        """Threads for this worker's next model call."""
        if not self.other_active():
            return self.cores
        return split_threads(self.role, own_share, self.cores)

    def close(self) -> None:
        """Say this worker has no work (its cores are the other's now), and unmap."""
        if self._map.closed:
            return
        self.set_active(False)
        self._map.close()
