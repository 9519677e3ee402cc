"""The producer's replay buffer: what a stream lacks is there to send again, within bounds."""

from duetserve.common.token_outbox import ReplayBuffer
from duetserve.proto.tokens import FinishReason, ReplayFrom, TokenChunk


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tokens(
    request_id: str, index: int, *ids: int, finish: FinishReason | None = None
) -> TokenChunk:
    return TokenChunk(request_id, index, ids, finish_reason=finish)


def test_a_replay_holds_every_chunk_that_reaches_the_index_asked_for() -> None:
    buffer = ReplayBuffer()
    first = TokenChunk("r", 0, (5, 6, 7), cached_tokens=4)  # handed over: three tokens at once
    later = [tokens("r", 3, 8), tokens("r", 4, 9), tokens("r", 5, finish=FinishReason.STOP)]
    for chunk in (first, *later):
        buffer.keep("ingress-a", chunk)
    assert buffer.since("ingress-a", ReplayFrom("r", 0)) == [first, *later]
    assert buffer.since("ingress-a", ReplayFrom("r", 2)) == [first, *later]  # straddles 2
    assert buffer.since("ingress-a", ReplayFrom("r", 4)) == later[1:]
    assert buffer.since("ingress-a", ReplayFrom("r", 5)) == later[2:]  # the end alone
    assert buffer.since("ingress-b", ReplayFrom("r", 0)) == []  # another ingress's stream
    assert buffer.since("ingress-a", ReplayFrom("other", 0)) == []


def test_errors_and_migrating_notices_are_sent_again_whatever_the_index() -> None:
    buffer = ReplayBuffer()
    notice = TokenChunk("r", 2, (), migrating=True)
    error = TokenChunk("r", 1, (), finish_reason=FinishReason.ERROR, error="no worker")
    buffer.keep("s", notice)
    buffer.keep("s", error)
    assert buffer.since("s", ReplayFrom("r", 9)) == [notice, error]


def test_requests_quiet_past_keep_s_are_forgotten() -> None:
    clock = Clock()
    buffer = ReplayBuffer(keep_s=10.0, clock=clock)
    buffer.keep("s", tokens("old", 0, 1))
    clock.now += 6
    buffer.keep("s", tokens("new", 0, 2))
    clock.now += 6  # "old" untouched for 12 s, "new" for 6
    assert buffer.since("s", ReplayFrom("old", 0)) == []
    assert buffer.since("s", ReplayFrom("new", 0)) == [tokens("new", 0, 2)]
    assert len(buffer) == 1


def test_past_max_chunks_the_least_recently_active_requests_go_first() -> None:
    buffer = ReplayBuffer(max_chunks=4)
    for index in range(3):
        buffer.keep("s", tokens("a", index, index))
    buffer.keep("s", tokens("b", 0, 7))
    buffer.keep("s", tokens("a", 3, 3))  # "a" is the active one now; 5 chunks in all
    assert buffer.has("a") and not buffer.has("b")  # "b" was touched least recently
    assert len(buffer) == 4
