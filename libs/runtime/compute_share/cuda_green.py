"""The `cuda-green` backend: a CUDA green context holding this worker's SMs, and a stream in it
that the worker runs every kernel on. Changed in place.

Building a share (driver API, through cuda-python; every CUresult checked, a failure is a
CudaCallError naming the call):
  cuDeviceGetDevResource(device, SM)            all SMs, with their split rules
  cuDevSmResourceSplitByCount(1, all, 0, k)     prefill's k SMs + the remainder (decode's)
  cuDevResourceGenerateDesc([mine], 1)          a descriptor of this worker's SMs
  cuGreenCtxCreate(desc, device, DEFAULT_STREAM)
  cuGreenCtxStreamCreate(green, NON_BLOCKING, 0) a stream whose kernels run on those SMs only
  torch.cuda.ExternalStream(int(stream))        the same stream as torch sees it

Moving the split builds the new green context and stream first, makes them current, then waits
for the old stream's queued work (so the next iteration on the new stream sees every KV write of
the last one) and destroys the old stream and context. The worker must read `stream` afresh at
every iteration and run all its work on it: the stream is non-blocking, so nothing orders it
against torch's default stream.

Scope. Green contexts divide SMs among the contexts of one process. Two worker processes run
side by side only under MPS; without it the driver time-slices their contexts, and a split then
bounds each worker's SMs without making them overlap in time. Each worker makes the same split
call, so prefill's group and decode's remainder are assumed to be the same SMs in both processes
(`make gpu-check` verifies it within one process).

The primary context is retained while the share is open: the driver advises it, since a green
context retains it anyway and creating one without it active pays a full context initialisation.
"""

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from duetserve.runtime.compute_share.base import (
    AppliedShare,
    BackendName,
    ComputeShareError,
    CudaCallError,
    Role,
    check_role,
    prefill_fraction,
)
from duetserve.runtime.compute_share.sm_split import (
    SmLayout,
    SmSplit,
    layout_from_resource,
    plan_sm_split,
)

Driver = Any  # cuda.bindings.driver, or a stand-in with the same functions
StreamWrapper = Callable[[int, int], torch.cuda.Stream]
_log = logging.getLogger(__name__)


def import_driver() -> Driver:
    """cuda-python's driver bindings: `cuda.bindings.driver` (cuda-python 12.6+ and 13), or
    `cuda.cuda` in older 12.x releases. Imported here, never at module import."""
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError:
        return importlib.import_module("cuda.cuda")


def _error_code(error: Any) -> int:
    return int(getattr(error, "value", error))


def _error_name(error: Any) -> str:
    name = getattr(error, "name", None)
    return name if isinstance(name, str) else f"CUresult {_error_code(error)}"


def checked(call: str, result: Any) -> tuple[Any, ...]:
    """The values after the CUresult that every cuda-python call returns first."""
    values = result if isinstance(result, tuple) else (result,)
    if _error_code(values[0]) != 0:
        raise CudaCallError(call, _error_name(values[0]))
    return values[1:]


def init_driver(driver: Driver) -> None:
    """cuInit, with a missing libcuda (which cuda-python raises as an exception, before any
    CUresult exists) reported as the failed call it is."""
    try:
        result = driver.cuInit(0)
    except Exception as err:
        raise CudaCallError("cuInit", f"{type(err).__name__}: {err}") from err
    checked("cuInit", result)


def torch_external_stream(handle: int, device_index: int) -> torch.cuda.Stream:
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", device_index))


@dataclass(frozen=True, slots=True)
class _GreenStream:
    green: Any  # CUgreenCtx
    stream: Any  # CUstream, created in `green`
    torch_stream: torch.cuda.Stream
    sms: int  # SMs the green context has, read back from the driver
    planned: int  # SMs the plan gave this worker


class GreenContextShare:
    """This worker's SMs of CUDA device `device_index`, as a green context and its stream."""

    name: BackendName = "cuda-green"
    in_place: bool = True

    def __init__(
        self,
        role: Role,
        device_index: int = 0,
        driver: Driver | None = None,
        wrap_stream: StreamWrapper = torch_external_stream,
    ) -> None:
        self.role = check_role(role)
        self.device_index = device_index
        self._driver = import_driver() if driver is None else driver
        self._wrap_stream = wrap_stream
        self._current: _GreenStream | None = None
        self._closed = False
        d = self._driver
        init_driver(d)
        (self._device,) = checked("cuDeviceGet", d.cuDeviceGet(device_index))
        checked("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self._device))
        try:
            self.layout, self._resource = self._read_device()
        except BaseException:
            self._closed = True
            checked("cuDevicePrimaryCtxRelease", d.cuDevicePrimaryCtxRelease(self._device))
            raise

    @property
    def stream(self) -> torch.cuda.Stream:
        """The stream to run the next iteration on; `apply` replaces it."""
        if self._current is None:
            raise ComputeShareError("cuda-green: no share applied yet")
        return self._current.torch_stream

    def apply(self, share: float) -> AppliedShare:
        if self._closed:
            raise ComputeShareError("cuda-green: apply after close")
        plan = plan_sm_split(prefill_fraction(self.role, share), self.layout)
        current = self._current
        if current is None or current.planned != plan.sms_for(self.role):
            fresh = self._build(plan)
            self._current = fresh
            if current is not None:
                self._retire(current)
            current = fresh
        return AppliedShare(
            backend=self.name,
            role=self.role,
            requested=share,
            given=current.sms / self.layout.total,
            amount=current.sms,
            unit="sms",
            description=f"{self.role}: {current.sms} of {self.layout.total} SMs in a green "
            f"context (partitions of at least {self.layout.min_partition}, "
            f"multiples of {self.layout.alignment})",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        current, self._current = self._current, None
        try:
            if current is not None:
                self._retire(current)
        finally:
            d = self._driver
            checked("cuDevicePrimaryCtxRelease", d.cuDevicePrimaryCtxRelease(self._device))

    def _read_device(self) -> tuple[SmLayout, Any]:
        d = self._driver
        sm_type = d.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
        (resource,) = checked(
            "cuDeviceGetDevResource", d.cuDeviceGetDevResource(self._device, sm_type)
        )
        major_attribute = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        (major,) = checked(
            "cuDeviceGetAttribute", d.cuDeviceGetAttribute(major_attribute, self._device)
        )
        return layout_from_resource(resource.sm, int(major)), resource

    def _partition(self, plan: SmSplit) -> Any:
        """This worker's SM resource under `plan`: the whole device, the group or the rest."""
        if not plan.split:
            return self._resource
        d = self._driver
        groups, count, remainder = checked(
            "cuDevSmResourceSplitByCount",
            d.cuDevSmResourceSplitByCount(1, self._resource, 0, plan.prefill_sms),
        )
        if int(count) != 1 or not groups:
            raise ComputeShareError(
                f"cuDevSmResourceSplitByCount made {int(count)} groups of "
                f"{plan.prefill_sms} SMs out of {self.layout.total}, expected 1"
            )
        mine = groups[0] if self.role == "prefill" else remainder
        if int(mine.sm.smCount) < 1:
            raise ComputeShareError(f"cuda-green: the split left {self.role} no SMs ({plan})")
        return mine

    def _build(self, plan: SmSplit) -> _GreenStream:
        d = self._driver
        resource = self._partition(plan)
        (desc,) = checked("cuDevResourceGenerateDesc", d.cuDevResourceGenerateDesc([resource], 1))
        flag = d.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
        (green,) = checked("cuGreenCtxCreate", d.cuGreenCtxCreate(desc, self._device, flag))
        stream = None
        try:
            non_blocking = d.CUstream_flags.CU_STREAM_NON_BLOCKING
            (stream,) = checked(
                "cuGreenCtxStreamCreate", d.cuGreenCtxStreamCreate(green, non_blocking, 0)
            )
            sm_type = d.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
            (given,) = checked(
                "cuGreenCtxGetDevResource", d.cuGreenCtxGetDevResource(green, sm_type)
            )
            torch_stream = self._wrap_stream(int(stream), self.device_index)
        except BaseException:
            self._discard(stream, green)
            raise
        return _GreenStream(
            green, stream, torch_stream, int(given.sm.smCount), plan.sms_for(self.role)
        )

    def _retire(self, old: _GreenStream) -> None:
        """Wait for the old stream's work, then destroy the stream and its green context (in
        that order: a destroyed context leaves its streams detached)."""
        d = self._driver
        try:
            checked("cuStreamSynchronize", d.cuStreamSynchronize(old.stream))
        finally:
            try:
                checked("cuStreamDestroy", d.cuStreamDestroy(old.stream))
            finally:
                checked("cuGreenCtxDestroy", d.cuGreenCtxDestroy(old.green))

    def _discard(self, stream: Any, green: Any) -> None:
        """Best-effort cleanup after a failed build; the build's own error is the one raised."""
        d = self._driver
        calls = [("cuGreenCtxDestroy", lambda: d.cuGreenCtxDestroy(green))]
        if stream is not None:
            calls.insert(0, ("cuStreamDestroy", lambda: d.cuStreamDestroy(stream)))
        for call, run in calls:
            try:
                checked(call, run())
            except Exception as err:  # keep the original failure visible
                _log.warning("cuda-green: cleanup %s failed: %s", call, err)
