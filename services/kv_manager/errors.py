"""Typed errors of kv_manager. An allocator error means the call changed nothing."""


class KVManagerError(Exception):
    """Base class of every error kv_manager raises on purpose."""


class AllocatorError(KVManagerError):
    """A block operation refused; the allocator's state is unchanged."""


class InvalidOwner(AllocatorError):
    """An owner name that is empty or has an empty holder or request part."""


class InvalidCount(AllocatorError):
    """A negative number of blocks asked for."""


class OutOfBlocks(AllocatorError):
    """Fewer blocks free than asked for; nothing was allocated."""

    def __init__(self, owner: str, requested: int, num_free: int, num_total: int) -> None:
        super().__init__(
            f"{owner} asked for {requested} blocks, {num_free} of {num_total} are free"
        )
        self.owner = owner
        self.requested = requested
        self.num_free = num_free
        self.num_total = num_total


class UnknownBlock(AllocatorError):
    """A block id outside the pool, or a block that is not allocated."""


class DuplicateBlock(AllocatorError):
    """The same block id twice in one batch."""


class NotHeld(AllocatorError):
    """Releasing references the owner does not hold."""


class AlreadyHeld(AllocatorError):
    """Retaining a block the owner already holds (an owner holds one reference per block)."""


class LeaseExpired(AllocatorError):
    """A holder whose lease has passed takes no new references until it renews."""

    def __init__(self, holder: str, deadline: float, now: float) -> None:
        super().__init__(f"lease of {holder} expired at {deadline:.3f} (now {now:.3f})")
        self.holder = holder
        self.deadline = deadline
        self.now = now


class Fenced(AllocatorError):
    """The holder's lease lapsed and its references were released: it may never take or
    renew one again under that name (it starts over as a new holder)."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"the lease of {holder} lapsed and was released; it is fenced off")
        self.holder = holder


class InvariantViolation(AllocatorError):
    """The allocator's bookkeeping is inconsistent (a bug, never an input error)."""


class StorageError(KVManagerError):
    """Shared storage could not be created, exported, described or mapped."""


class WireFormatError(StorageError):
    """A storage description or layout from the wire that is malformed; nothing was mapped."""


class LayoutError(StorageError):
    """Tensors that do not fit, overlap, are misaligned or have an unknown dtype."""


class SharedMemoryError(StorageError):
    """A POSIX shared-memory region could not be created, attached or mapped."""


class RegionExists(SharedMemoryError):
    """create() of a name that is already under /dev/shm (a live unit, or a stale segment)."""


class RegionNotFound(SharedMemoryError):
    """attach() of a name that is not under /dev/shm."""


class CudaUnavailable(StorageError):
    """The CUDA path was asked for on a machine where probe_cuda() says it cannot run."""


class CudaError(StorageError):
    """A CUDA runtime call returned an error; `call` and `error_name` say which and what."""

    def __init__(self, call: str, error_name: str) -> None:
        super().__init__(f"{call} failed: {error_name}")
        self.call = call
        self.error_name = error_name
