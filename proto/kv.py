"""Workers and the scheduler <-> one unit's kv_manager: blocks, leases and the shared storage.

kv_manager is the only allocator. Every reference to a block has an owner; owners are named
"<holder>/<request id>" so that a holder (a worker or the scheduler) that stops heart-beating
loses all its references at once and its requests can be retried or failed with a reason.
"""

from dataclasses import dataclass
from enum import StrEnum

from duetserve.proto.codec import message

# The pools of a unit, as `subjects.kv(unit, verb, pool)` names them. Every mode has the unit
# pool; disagg mode adds the decode worker's own pool (and its own weight copy); with
# DUET_HOST_KV_MB, the host tier: KV blocks only, in host memory, where preempted requests'
# KV is swapped to (owned, leased and freed like the others).
UNIT_POOL = ""
DECODE_POOL = "decode"
HOST_POOL = "host"


@message("kv.alloc")
@dataclass(frozen=True, slots=True)
class AllocateBlocks:
    owner: str
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")


@message("kv.alloc.ok")
@dataclass(frozen=True, slots=True)
class BlocksGranted:
    owner: str
    block_ids: tuple[int, ...]
    num_free: int  # after this grant, so callers can keep a watermark


@message("kv.retain")
@dataclass(frozen=True, slots=True)
class RetainBlocks:
    """One more reference to blocks already allocated (prefix sharing). With `held_by`, only
    if each block is still held by one of those owners: a worker about to write blocks it was
    given for a request refuses to write them if they were freed and handed to someone else
    meanwhile (allocated, but no longer that request's)."""

    owner: str
    block_ids: tuple[int, ...]
    held_by: tuple[str, ...] = ()


@message("kv.release")
@dataclass(frozen=True, slots=True)
class ReleaseBlocks:
    """Drop the owner's references: to the listed blocks, or to all of its blocks if none."""

    owner: str
    block_ids: tuple[int, ...] = ()


@message("kv.released")
@dataclass(frozen=True, slots=True)
class BlocksReleased:
    owner: str
    num_freed: int
    num_free: int


@message("kv.heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Renews the lease of every owner under `holder`. Sent as a request, it is answered with
    LeaseRenewed, or an ErrorReply `fenced` once the holder's lease has lapsed: its blocks are
    someone else's now, and it must stop writing them and start over as a new holder.

    A holder that writes into the pool (a worker) says so, with its process: kv_manager stops
    such a process (SIGKILL) before it frees the blocks of its lapsed lease, so no block is
    reused while a stale owner may still write it."""

    holder: str
    writes: bool = False
    pid: int = 0
    host: str = ""
    started: int = 0  # the process's start (clock ticks after boot): tells a reused pid


@message("kv.heartbeat.ok")
@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    holder: str
    lease_s: float  # the lease now runs at least this long from when the heartbeat was sent


class StorageKind(StrEnum):
    CPU_SHARED_MEMORY = "cpu_shm"
    CUDA_IPC = "cuda_ipc"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str  # torch dtype name: float32, bfloat16, ...
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the region


@message("kv.storage.query")
@dataclass(frozen=True, slots=True)
class StorageQuery:
    worker: str


@message("kv.storage")
@dataclass(frozen=True, slots=True)
class StorageDescription:
    """Where a worker maps the unit's KV pool and weights from: a shared-memory region name
    (CPU) or a 64-byte CUDA IPC handle (GPU), and the tensors packed inside it."""

    kind: StorageKind
    region: str  # /dev/shm name on the CPU
    cuda_ipc_handle: bytes | None
    device_index: int | None
    nbytes: int
    tensors: tuple[TensorSpec, ...]
    block_size: int
    num_blocks: int
    model_dir: str
    dtype: str
    alignment: int = 256  # of every tensor offset, as the layout was packed

    def __post_init__(self) -> None:
        if self.kind == StorageKind.CUDA_IPC and (
            self.cuda_ipc_handle is None or len(self.cuda_ipc_handle) != 64
        ):
            raise ValueError("a CUDA IPC storage needs a 64-byte handle")
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment {self.alignment} is not a power of two")


@message("kv.stats.query")
@dataclass(frozen=True, slots=True)
class KvStatsQuery:
    pass


@message("kv.stats")
@dataclass(frozen=True, slots=True)
class KvStats:
    """Who holds the unit's blocks: references per holder (a block two holders share counts
    for both), for operators, metrics and leak checks."""

    num_free: int
    num_total: int
    references_by_holder: dict[str, int]
    # Blocks found written while free when handed out again (only counted with DUET_KV_POISON;
    # anything but 0 means a stale owner wrote into memory it no longer held).
    stale_writes: int = 0


@message("kv.shared.query")
@dataclass(frozen=True, slots=True)
class SharedBlocksQuery:
    """Which of these blocks does anyone besides `owner` hold? (cache_index asks before it
    evicts, so that it drops only blocks no request is using.)"""

    owner: str
    block_ids: tuple[int, ...]


@message("kv.shared")
@dataclass(frozen=True, slots=True)
class SharedBlocks:
    block_ids: tuple[int, ...]
