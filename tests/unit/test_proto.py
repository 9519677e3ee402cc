"""Every wire message round-trips; every malformed message is refused with a typed error; the
compiled readers read what the general reader reads, in the sparse and the full wire form."""

import dataclasses
import enum
import re
from typing import Any

import msgpack
import pytest

from duetserve.proto import (
    cache,
    codec,
    common,
    compute,
    kv,
    scheduling,
    semantic,
    subjects,
    supervision,
    tokens,
    units,
    workers,
)
from duetserve.proto.codec import (
    InvalidMessageError,
    UnknownMessageError,
    VersionMismatchError,
    decode,
    encode,
)

SAMPLING = scheduling.Sampling(
    max_tokens=64, temperature=0.7, top_k=40, stop_token_ids=(3, 7), logprobs=2, seed=11
)
EXAMPLES: list[object] = [
    common.HealthQuery(),
    common.HealthReply("scheduler", "sched-1", common.HealthStatus.READY, "ok"),
    common.ErrorReply("out_of_blocks", "need 4 blocks, 2 free"),
    tokens.TokenChunk("r-1", 0, (5, 6), cached_tokens=32),
    tokens.TokenChunk(
        "r-1",
        2,
        (9,),
        logprobs=(tokens.TokenLogprob(9, -0.25, (tokens.TopLogprob(9, -0.25),)),),
        finish_reason=tokens.FinishReason.LENGTH,
    ),
    tokens.TokenChunk("r-1", 3, (), finish_reason=tokens.FinishReason.ERROR, error="worker lost"),
    tokens.TokenChunk("r-1", 3, (), migrating=True),
    tokens.TokenBatch(
        "decode_worker-host-7-0a1b",
        12,
        (tokens.TokenChunk("r-1", 4, (8,)), tokens.TokenChunk("r-2", 0, (3,), cached_tokens=16)),
    ),
    tokens.TokenBatch("scheduler-host-3-ffee", 0, ()),
    tokens.ReplayQuery(
        "ingress-host-1-ab12", (tokens.ReplayFrom("r-1", 4), tokens.ReplayFrom("r-2", 0))
    ),
    scheduling.SubmitRequest(
        request_id="r-1",
        tenant="tenant-a",
        prompt_token_ids=(1, 2, 3, 4),
        sampling=SAMPLING,
        arrival_time=1732400000.25,
        stream="ingress-host-1-ab12",
        slo=scheduling.Slo(scheduling.SloKind.LATENCY, ttft_ms=500, tpot_ms=50),
        public_prefix_tokens=2,
    ),
    scheduling.SubmitRequest(
        request_id="r-2",
        tenant="default",
        prompt_token_ids=(1,),
        sampling=scheduling.Sampling(max_tokens=1),
        arrival_time=0.0,
        stream="ingress-2",
        slo=scheduling.Slo(scheduling.SloKind.COMPOUND, deadline_ms=2e4, group="plan-17"),
    ),
    scheduling.SubmitAccepted("r-1"),
    scheduling.SchedulerStatsQuery(),
    scheduling.SchedulerStats(3, 1, 12, 40, 512, preemptions=2),
    scheduling.SchedulerStats(0, 0, 2, 500, 512, 0, prefill_share=0.65, split_moves=3),
    scheduling.SchedulerStats(
        0,
        0,
        2,
        40,
        64,
        0,
        decode_free_blocks=30,
        decode_total_blocks=64,
        kv_copies=5,
        kv_copied_bytes=1 << 20,
        kv_copy_s=0.01,
    ),
    scheduling.CancelRequest("r-1", scheduling.CancelReason.CLIENT_GONE),
    scheduling.RequestStatusQuery(("r-1", "r-2")),
    scheduling.RequestStatus("scheduler-host-7", ("r-2",)),
    scheduling.ResumeRequest("r-2", (5, 6, 7)),
    kv.AllocateBlocks("sched-0/r-1", 4),
    kv.BlocksGranted("sched-0/r-1", (3, 9, 1, 0), num_free=100),
    kv.RetainBlocks("sched-0/r-2", (3, 9)),
    kv.ReleaseBlocks("sched-0/r-1"),
    kv.BlocksReleased("sched-0/r-1", num_freed=2, num_free=102),
    kv.Heartbeat("decode-0"),
    kv.Heartbeat("decode-0", writes=True, pid=4242, host="node-1"),
    kv.LeaseRenewed("decode-0", 5.0),
    units.RoleHolder("kv_manager-host-41", 41, "host", started=123456),
    units.UnitCard("unit0", "scheduler-host-7", 3, 4, 8, 100, 512),
    kv.StorageQuery("prefill-0"),
    kv.KvStatsQuery(),
    supervision.SupervisorReport("launcher-1", {"decode_worker": 2}, {"kv_manager": 41}),
    kv.SharedBlocksQuery("cache_index", (3, 4, 5)),
    kv.SharedBlocks((4,)),
    kv.KvStats(10, 64, {"cache_index": 40, "decode-0": 14}),
    kv.StorageDescription(
        kind=kv.StorageKind.CUDA_IPC,
        region="",
        cuda_ipc_handle=bytes(range(64)),
        device_index=0,
        nbytes=1 << 30,
        tensors=(kv.TensorSpec("kv_pool", "bfloat16", (4, 2, 128, 16, 4, 64), 0),),
        block_size=16,
        num_blocks=128,
        model_dir="/models/tiny",
        dtype="bfloat16",
        alignment=512,
    ),
    cache.PrefixMatchQuery("scheduler/r-1", "tenant-a", (1, 2, 3), public_prefix_tokens=0),
    cache.PrefixMatch((4, 5), 32),
    cache.PrefixMatchQuery("scheduler/r-1", "tenant-a", (1, 2, 3), host=True),
    cache.PrefixMatch((4,), 16, host_block_ids=(9, 3, 7)),
    cache.PrefixInsert("tenant-a", tuple(range(40)), (4, 5)),
    cache.PrefixInsert("tenant-a", tuple(range(40)), (9, 3), pool=kv.HOST_POOL),
    cache.PrefixInserted(2),
    cache.EvictQuery(8),
    cache.Evicted((4,)),
    semantic.SemanticLookup("tenant-a", "m", "ab12", "what is 2+2?", 64, load=0.5),
    semantic.SemanticHit("4", 1, "stop", "factual", 0.93),
    semantic.SemanticMiss("code", "vetoed", 0.97),
    semantic.SemanticInsert("tenant-a", "m", "ab12", "what is 2+2?", "4", 1),
    workers.PrefillBatch(
        7,
        (
            workers.PrefillItem("r-1", (5, 6, 7), 16, (3, 4)),
            workers.PrefillItem(
                "r-2",
                (9,),
                0,
                (8,),
                workers.SamplingState((9,), (), SAMPLING, "ingress-1", cached_tokens=0),
            ),
        ),
    ),
    workers.PrefillDone(
        7,
        (
            workers.PrefillResult("r-1"),
            workers.PrefillResult("r-2", tokens.TokenLogprob(11, -0.5), finished=True),
            workers.PrefillResult("r-3", error="context too long"),
        ),
    ),
    workers.DecodeAdmit(
        (
            workers.DecodeItem(
                "r-2", (8, 9), workers.SamplingState((9,), (11,), SAMPLING, "ingress-1")
            ),
        )
    ),
    workers.DecodeAdmit(
        (
            workers.DecodeItem(
                "r-3",
                (4,),
                workers.SamplingState((9,), (11, 12), SAMPLING, "i-2"),
                from_worker=True,
            ),
        )
    ),
    workers.DecodeAdmitted(("r-2",), (workers.Refusal("r-4", "full"),)),
    workers.DecodeAdmitted(
        ("r-2",),
        (workers.Refusal("r-4", "no room", retry=True),),
        kv_copied_blocks=3,
        kv_copied_bytes=3 * 393216,
        kv_copy_s=0.002,
    ),
    workers.DecodeControl(workers.ControlKind.PREEMPT, ("r-2", "r-5")),
    workers.KvLoad("scheduler/r-3", (9, 3), (40, 41)),
    workers.KvLoaded(2, 0.0004),
    workers.DecodeControl(
        workers.ControlKind.CANCEL, ("r-7",), tokens.FinishReason.ERROR, "outgrew the pool"
    ),
    workers.WorkerEvents(
        "decode-0",
        (
            workers.WorkerEvent(workers.EventKind.FINISHED, "r-2", num_output_tokens=17),
            workers.WorkerEvent(workers.EventKind.NEEDS_BLOCKS, "r-5", blocks_needed=1),
            workers.WorkerEvent(workers.EventKind.PREEMPTED, "r-6", output_token_ids=(1, 2)),
            workers.WorkerEvent(
                workers.EventKind.PREEMPTED,
                "r-8",
                output_token_ids=(1, 2),
                host_block_ids=(12,),
                swap_s=0.001,
                host_kept=3,
            ),
        ),
        free_blocks=0,
        residents=(workers.ResidentSize("r-5", 40, 4),),
    ),
    compute.SetComputeSplit(0.35, 4, "TTFT misses"),
    compute.ComputeShareApplied(
        "prefill-0", "prefill", "cpu-cgroup", 4, 0.35, 0.35, "0.7 of 2 cores, 1 thread"
    ),
    compute.ComputeShareApplied(
        "decode-0", "decode", "cpu-affinity", 5, 0.9, 0.5, "", error="too few cores"
    ),
    compute.ReplaceWorker(
        "decode", "decode-0", {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70"}, "split 3"
    ),
    compute.ReplacementStarted("decode", "decode-0", 4242),
    compute.HandOverReady("decode-0", "decode-1"),
    compute.HandedOver("decode-0", "decode-1", 16, 1, 0.138),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode(encode(msg), type(msg)) == msg
    assert decode(encode(msg)) == msg


def test_every_registered_message_has_a_round_trip_example() -> None:
    covered = {type(m) for m in EXAMPLES}
    assert set(codec._REGISTRY.values()) <= covered


def full_body(value: Any) -> Any:
    """The wire form with every field, defaults included, as peers before sparse bodies sent."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: full_body(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [full_body(v) for v in value]
    if isinstance(value, dict):
        return {k: full_body(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_the_compiled_reader_reads_what_the_general_one_does(msg: object) -> None:
    cls, name = type(msg), codec.wire_name(type(msg))
    sparse = msgpack.unpackb(encode(msg), raw=False)[2]
    for body in (sparse, full_body(msg)):
        assert codec._reader(cls)(body) == codec._build(cls, body, name) == msg
        assert decode(envelope(name, 1, body), cls) == msg


def test_fields_at_their_default_stay_off_the_wire() -> None:
    chunk = tokens.TokenChunk("r-1", 3, (5,))
    assert msgpack.unpackb(encode(chunk), raw=False)[2] == {
        "request_id": "r-1",
        "index": 3,
        "token_ids": [5],
    }
    # A value equal to the default but of another type is a value, not the default.
    assert not codec._is_default(1, 1.0) and not codec._is_default(0, False)
    assert codec._is_default((), ()) and codec._is_default(None, None)


def test_values_off_the_compiled_path_go_to_the_general_reader() -> None:
    # An int where a float is due is read as the float, by both readers.
    body = {"prefill_share": 1, "sequence": 1}
    with pytest.raises(InvalidMessageError, match="prefill_share"):
        decode(envelope("compute.set_split", 1, body))  # __post_init__ refuses 1.0: named
    body = {"owner": "o", "block_ids": [1, True]}  # a bool among ints: refused, with its path
    with pytest.raises(InvalidMessageError, match=re.escape("block_ids[1]")):
        decode(envelope("kv.release", 1, body))


def envelope(name: str, version: int, body: object) -> bytes:
    packed: bytes = msgpack.packb([name, version, body], use_bin_type=True)
    return packed


@pytest.mark.parametrize(
    ("data", "error", "text"),
    [
        (b"\xc1garbage", InvalidMessageError, "msgpack"),
        (msgpack.packb({"a": 1}), InvalidMessageError, "name, version, body"),
        (envelope("no.such", 1, {}), UnknownMessageError, "no.such"),
        (envelope("sched.submit.ok", 2, {"request_id": "r"}), VersionMismatchError, "version 2"),
        (envelope("sched.submit.ok", 1, {}), InvalidMessageError, "missing field 'request_id'"),
        (envelope("sched.submit.ok", 1, {"request_id": 5}), InvalidMessageError, "expected str"),
        (
            envelope("sched.submit.ok", 1, {"request_id": "r", "x": 1}),
            InvalidMessageError,
            "unknown field",
        ),
        (envelope("kv.alloc", 1, {"owner": "o", "count": True}), InvalidMessageError, "bool"),
        (envelope("kv.alloc", 1, {"owner": "o", "count": 0}), InvalidMessageError, "count"),
        (
            envelope("kv.release", 1, {"owner": "o", "block_ids": [1, "2"]}),
            InvalidMessageError,
            "[1]",
        ),
        (
            envelope("sched.cancel", 1, {"request_id": "r", "reason": "bored"}),
            InvalidMessageError,
            "CancelReason",
        ),
    ],
)
def test_malformed_messages_are_refused(data: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=re.escape(text)):
        decode(data)


def test_nested_validation_names_the_path() -> None:
    body = {
        "request_id": "r-1",
        "tenant": "t",
        "prompt_token_ids": [1],
        "sampling": {"max_tokens": 4},
        "arrival_time": 0,
        "stream": "ingress-1",
        "slo": {"kind": "latency", "ttft_ms": 100},
    }
    with pytest.raises(InvalidMessageError, match="needs tpot_ms"):
        decode(envelope("sched.submit", 1, body))
    body["slo"] = None
    body["request_id"] = "has.dot"
    with pytest.raises(InvalidMessageError, match="request id"):
        decode(envelope("sched.submit", 1, body))


def test_unexpected_type_is_refused() -> None:
    data = encode(scheduling.SubmitAccepted("r-1"))
    with pytest.raises(InvalidMessageError, match=r"expected kv\.alloc"):
        decode(data, kv.AllocateBlocks)


def test_subjects_refuse_unsafe_tokens() -> None:
    assert subjects.tokens("ingress-1") == "duet.tokens.ingress-1"
    assert (
        subjects.stream_name("ingress-my.host.example-12", "ab") == "ingress-my_host_example-12-ab"
    )
    assert subjects.kv("unit0", "alloc") == "duet.kv.unit0.alloc"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError):
            subjects.tokens(bad)
        with pytest.raises(ValueError):
            subjects.sched(bad, "submit")
    assert subjects.sched("unit-7", "submit") == "duet.sched.unit-7.submit"
    assert subjects.cache("unit-7", "match") == "duet.cache.unit-7.match"
    assert len(set(subjects.scheduler_subjects("a")) | set(subjects.scheduler_subjects("b"))) == 10
    for verb in ("alloc", "submit.x", ""):  # only the verbs a scheduler or cache index answers
        with pytest.raises(ValueError):
            subjects.cache("unit0", verb)
    with pytest.raises(ValueError):
        subjects.sched("unit0", "match")


def test_a_compute_split_outside_zero_one_is_refused() -> None:
    for share in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="prefill_share"):
            compute.SetComputeSplit(share, 1)
    with pytest.raises(InvalidMessageError):
        decode(envelope("compute.set_split", 1, {"prefill_share": 1.5, "sequence": 1}))
    assert compute.compute_split_subject("unit0") == "duet.compute.unit0.split"
    with pytest.raises(ValueError):
        compute.compute_applied_subject("unit.0")
