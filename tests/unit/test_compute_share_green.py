"""The cuda-green backend against a stand-in for cuda-python's driver module that models what
the driver API documents for green contexts, checked against the real bindings' signatures.
What only a GPU can show (the SMs kernels really run on) is `make gpu-check`."""

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from cuda.bindings import driver as real

from duetserve.runtime.compute_share.base import ComputeShareError, CudaCallError
from duetserve.runtime.compute_share.cuda_green import GreenContextShare
from duetserve.runtime.compute_share.probe import probe_cuda
from duetserve.runtime.compute_share.sm_split import SmLayout

OK = real.CUresult.CUDA_SUCCESS
SM_TYPE = real.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
CC_MAJOR = real.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
DEFAULT_STREAM = real.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
NON_BLOCKING = real.CUstream_flags.CU_STREAM_NON_BLOCKING
INVALID_VALUE = real.CUresult.CUDA_ERROR_INVALID_VALUE


@dataclass(frozen=True)
class FakeSm:
    smCount: int  # the driver's field names
    minSmPartitionSize: int
    smCoscheduledAlignment: int


@dataclass(frozen=True)
class FakeResource:
    sm: FakeSm
    ids: tuple[int, ...]  # which SMs, so tests can see overlap


@dataclass
class FakeDriver:
    """Every call returns (CUresult, *values) and is recorded in `calls`; `fail` makes the named
    calls return that error. A split gives the group the first SMs of its input, rounded up to
    the alignment, and the remainder the rest; a green context holds the SMs of its descriptor."""

    total: int = 132
    minimum: int = 8
    alignment: int = 8
    major: int = 9
    fail: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    greens: dict[int, tuple[int, ...]] = field(default_factory=dict)  # live -> SM ids
    streams: dict[int, int] = field(default_factory=dict)  # live stream -> its green context
    retained: int = 0
    next_handle: int = 1000

    CUresult = real.CUresult
    CUdevResourceType = real.CUdevResourceType
    CUdevice_attribute = real.CUdevice_attribute
    CUgreenCtxCreate_flags = real.CUgreenCtxCreate_flags
    CUstream_flags = real.CUstream_flags

    def _call(self, name: str, *args: Any, error: Any = OK) -> Any:
        self.calls.append((name, *args))
        return self.fail.get(name, error)

    def _handle(self) -> int:
        self.next_handle += 1
        return self.next_handle

    def _resource(self, ids: tuple[int, ...]) -> FakeResource:
        return FakeResource(FakeSm(len(ids), self.minimum, self.alignment), ids)

    def cuInit(self, Flags: int) -> tuple[Any, ...]:
        return (self._call("cuInit", Flags),)

    def cuDriverGetVersion(self) -> tuple[Any, ...]:
        return (self._call("cuDriverGetVersion"), 12080)

    def cuDeviceGetCount(self) -> tuple[Any, ...]:
        return (self._call("cuDeviceGetCount"), 1)

    def cuDeviceGet(self, ordinal: int) -> tuple[Any, ...]:
        return (self._call("cuDeviceGet", ordinal), ordinal)

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[Any, ...]:
        error = self._call("cuDevicePrimaryCtxRetain", dev)
        self.retained += error == OK
        return (error, "primary")

    def cuDevicePrimaryCtxRelease(self, dev: int) -> tuple[Any, ...]:
        error = self._call("cuDevicePrimaryCtxRelease", dev)
        self.retained -= error == OK
        return (error,)

    def cuDeviceGetDevResource(self, device: int, typename: Any) -> tuple[Any, ...]:
        error = self._call("cuDeviceGetDevResource", device, typename)
        assert typename == SM_TYPE
        return (error, self._resource(tuple(range(self.total))))

    def cuDeviceGetAttribute(self, attrib: Any, dev: int) -> tuple[Any, ...]:
        return (
            self._call("cuDeviceGetAttribute", attrib, dev),
            self.major if attrib == CC_MAJOR else 0,
        )

    def cuDevSmResourceSplitByCount(
        self, nbGroups: int, input_: FakeResource, flags: int, minCount: int
    ) -> tuple[Any, ...]:
        error = self._call(
            "cuDevSmResourceSplitByCount", nbGroups, input_.sm.smCount, flags, minCount
        )
        step = max(input_.sm.smCoscheduledAlignment, 1)
        size = max(input_.sm.minSmPartitionSize, math.ceil(minCount / step) * step)
        if error != OK or nbGroups != 1 or size > input_.sm.smCount:
            return (error if error != OK else INVALID_VALUE, [], 0, None)
        group, rest = input_.ids[:size], input_.ids[size:]
        return (OK, [self._resource(group)], 1, self._resource(rest))

    def cuDevResourceGenerateDesc(
        self, resources: list[FakeResource], nbResources: int
    ) -> tuple[Any, ...]:
        error = self._call(
            "cuDevResourceGenerateDesc", [r.sm.smCount for r in resources], nbResources
        )
        return (error, resources[0].ids)

    def cuGreenCtxCreate(self, desc: tuple[int, ...], dev: int, flags: int) -> tuple[Any, ...]:
        error = self._call("cuGreenCtxCreate", len(desc), dev, flags)
        if error != OK or flags != DEFAULT_STREAM:
            return (error if error != OK else INVALID_VALUE, None)
        handle = self._handle()
        self.greens[handle] = desc
        return (OK, handle)

    def cuGreenCtxStreamCreate(self, greenCtx: int, flags: int, priority: int) -> tuple[Any, ...]:
        error = self._call("cuGreenCtxStreamCreate", greenCtx, flags, priority)
        if error != OK or greenCtx not in self.greens or not flags & NON_BLOCKING:
            return (error if error != OK else INVALID_VALUE, None)
        handle = self._handle()
        self.streams[handle] = greenCtx
        return (OK, handle)

    def cuGreenCtxGetDevResource(self, hCtx: int, typename: Any) -> tuple[Any, ...]:
        error = self._call("cuGreenCtxGetDevResource", hCtx, typename)
        return (error, self._resource(self.greens[hCtx]))

    def cuStreamSynchronize(self, hStream: int) -> tuple[Any, ...]:
        error = self._call("cuStreamSynchronize", hStream)
        detached = self.streams.get(hStream) not in self.greens
        return (real.CUresult.CUDA_ERROR_STREAM_DETACHED if detached else error,)

    def cuStreamDestroy(self, hStream: int) -> tuple[Any, ...]:
        error = self._call("cuStreamDestroy", hStream)
        self.streams.pop(hStream, None)
        return (error,)

    def cuGreenCtxDestroy(self, hCtx: int) -> tuple[Any, ...]:
        error = self._call("cuGreenCtxDestroy", hCtx)
        self.greens.pop(hCtx, None)
        return (error,)


def wrap(handle: int, device_index: int) -> Any:
    return ("torch-stream", handle, device_index)


def names(driver: FakeDriver) -> list[str]:
    return [call[0] for call in driver.calls]


def test_prefill_takes_the_group_and_decode_the_remainder() -> None:
    prefill_driver, decode_driver = FakeDriver(), FakeDriver()  # one per worker process
    prefill = GreenContextShare("prefill", driver=prefill_driver, wrap_stream=wrap)
    decode = GreenContextShare("decode", driver=decode_driver, wrap_stream=wrap)
    mine, theirs = prefill.apply(0.6), decode.apply(0.4)
    assert (mine.amount, mine.unit, theirs.amount) == (80, "sms", 52)
    assert mine.given == pytest.approx(80 / 132)
    (prefill_sms,) = prefill_driver.greens.values()
    (decode_sms,) = decode_driver.greens.values()
    assert not set(prefill_sms) & set(decode_sms)
    assert set(prefill_sms) | set(decode_sms) == set(range(132))
    split_call = ("cuDevSmResourceSplitByCount", 1, 132, 0, 80)
    assert split_call in prefill_driver.calls and split_call in decode_driver.calls


def test_the_worker_stream_is_a_non_blocking_stream_of_the_green_context() -> None:
    driver = FakeDriver()
    share = GreenContextShare("prefill", device_index=0, driver=driver, wrap_stream=wrap)
    with pytest.raises(ComputeShareError, match="no share applied"):
        _ = share.stream
    share.apply(0.5)
    (green,) = driver.greens
    (stream,) = driver.streams
    assert driver.streams[stream] == green
    assert share.stream == ("torch-stream", stream, 0)
    assert ("cuGreenCtxCreate", 64, 0, DEFAULT_STREAM) in driver.calls
    assert ("cuGreenCtxStreamCreate", green, NON_BLOCKING, 0) in driver.calls
    assert driver.retained == 1


def test_moving_the_split_builds_the_new_context_before_retiring_the_old() -> None:
    driver = FakeDriver()
    share = GreenContextShare("decode", driver=driver, wrap_stream=wrap)
    share.apply(0.4)
    (old_green,), (old_stream,) = list(driver.greens), list(driver.streams)
    driver.calls.clear()
    applied = share.apply(0.7)  # prefill 0.3 -> 40 SMs, decode the other 92
    assert applied.amount == 92
    assert names(driver) == [
        "cuDevSmResourceSplitByCount",
        "cuDevResourceGenerateDesc",
        "cuGreenCtxCreate",
        "cuGreenCtxStreamCreate",
        "cuGreenCtxGetDevResource",
        "cuStreamSynchronize",  # the old iteration's work finishes first
        "cuStreamDestroy",
        "cuGreenCtxDestroy",  # after its stream: a context's streams would be left detached
    ]
    assert driver.calls[-3:] == [
        ("cuStreamSynchronize", old_stream),
        ("cuStreamDestroy", old_stream),
        ("cuGreenCtxDestroy", old_green),
    ]
    assert list(driver.greens.values()) == [tuple(range(40, 132))]
    assert share.stream[1] in driver.streams


def test_the_same_split_again_builds_nothing() -> None:
    driver = FakeDriver()
    share = GreenContextShare("prefill", driver=driver, wrap_stream=wrap)
    first = share.apply(0.6)
    count = len(driver.calls)
    again = share.apply(0.59)  # 77.9 SMs: still 80
    assert len(driver.calls) == count
    assert (again.amount, again.requested) == (first.amount, 0.59)


def test_a_whole_device_share_is_not_split() -> None:
    driver = FakeDriver()
    applied = GreenContextShare("decode", driver=driver, wrap_stream=wrap).apply(1.0)
    assert applied.amount == 132 and applied.given == 1.0
    assert "cuDevSmResourceSplitByCount" not in names(driver)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("cuDevSmResourceSplitByCount", "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION"),
        ("cuGreenCtxCreate", "CUDA_ERROR_NOT_SUPPORTED"),
        ("cuGreenCtxStreamCreate", "CUDA_ERROR_OUT_OF_MEMORY"),
        ("cuGreenCtxGetDevResource", "CUDA_ERROR_INVALID_CONTEXT"),
    ],
)
def test_a_failed_call_is_named_and_leaks_nothing(call: str, error: str) -> None:
    driver = FakeDriver()
    share = GreenContextShare("prefill", driver=driver, wrap_stream=wrap)
    share.apply(0.5)
    before = (dict(driver.greens), dict(driver.streams))
    driver.fail[call] = getattr(real.CUresult, error)
    with pytest.raises(CudaCallError, match=f"{call} failed: {error}"):
        share.apply(0.25)
    assert (driver.greens, driver.streams) == before  # the old share stays, whole
    assert share.apply(0.5).amount == 64  # and is still current


def test_close_gives_everything_back_and_is_safe_twice() -> None:
    driver = FakeDriver()
    share = GreenContextShare("decode", driver=driver, wrap_stream=wrap)
    share.apply(0.5)
    share.close()
    assert (driver.greens, driver.streams, driver.retained) == ({}, {}, 0)
    count = len(driver.calls)
    share.close()
    assert len(driver.calls) == count
    with pytest.raises(ComputeShareError, match="after close"):
        share.apply(0.5)


def test_the_layout_falls_back_to_the_documented_rules() -> None:
    driver = FakeDriver(total=108, minimum=0, alignment=0, major=8)
    share = GreenContextShare("prefill", driver=driver, wrap_stream=wrap)
    assert share.layout == SmLayout(108, 4, 2)


def real_parameters(name: str) -> list[str]:
    """Parameter names from the first line of the real binding's docstring, e.g.
    `cuDevSmResourceSplitByCount(unsigned int nbGroups, CUdevResource input_: Optional[...],
    unsigned int flags, unsigned int minCount)`."""
    first = (getattr(real, name).__doc__ or "").strip().splitlines()[0]
    inside = first[first.index("(") + 1 : first.rindex(")")]
    parameters, depth, current = [], 0, ""
    for char in inside + ",":
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            if current.strip():
                parameters.append(current.split(":")[0].split()[-1])
            current = ""
        else:
            current += char
    return parameters


def test_the_stand_in_matches_the_pinned_cuda_python_bindings() -> None:
    """Same functions, same parameters in the same order: the backend calls them positionally."""
    for name, member in inspect.getmembers(FakeDriver, inspect.isfunction):
        if name.startswith("cu"):
            assert hasattr(real, name), name
            fake = list(inspect.signature(member).parameters)[1:]  # without self
            assert real_parameters(name) == fake, name


def test_without_a_cuda_driver_opening_is_a_named_error() -> None:
    if probe_cuda().devices > 0:
        pytest.skip("this machine has a CUDA driver and a device")
    with pytest.raises(CudaCallError, match="cuInit failed"):
        GreenContextShare("prefill")


def test_probe_reads_the_driver() -> None:
    facts = probe_cuda(lambda: FakeDriver())
    assert (facts.devices, facts.driver_version, facts.green_api) == (1, 12080, True)
    assert facts.detail == "1 device(s), driver CUDA 12.8"
