"""What the scheduler keeps of a request from its submit on (services/scheduler/requests.py)."""

from dataclasses import replace

from duetserve.proto.scheduling import Sampling, SubmitRequest
from duetserve.services.scheduler.requests import RequestRecord

SUBMIT = SubmitRequest("r-1", "tenant", (1, 2, 3), Sampling(max_tokens=8), 0.0, "ingress-1")


def test_a_request_without_a_seed_gets_one_at_admission_and_keeps_the_clients() -> None:
    drawn = {RequestRecord.new(SUBMIT, 0.0, "sched-1").submit.sampling.seed for _ in range(8)}
    assert None not in drawn
    assert len(drawn) == 8  # drawn afresh for each request
    assert all(0 <= seed < 2**63 for seed in drawn if seed is not None)
    record = RequestRecord.new(SUBMIT, 0.0, "sched-1")
    assert record.sampling_state().sampling.seed == record.submit.sampling.seed  # travels on
    mine = replace(SUBMIT, sampling=Sampling(max_tokens=8, seed=7))
    assert RequestRecord.new(mine, 0.0, "sched-1").submit.sampling.seed == 7


def test_blocks_are_owned_under_the_schedulers_own_holder() -> None:
    assert RequestRecord.new(SUBMIT, 0.0, "scheduler-host-41").owner == "scheduler-host-41/r-1"
