"""bench/gateway_vs_vllm.py's paired mode and CPU lists, without servers: `run` is replaced by a
scripted one whose gateway side is a fixed 5 ms (and 2 ms to the first token) slower."""

from __future__ import annotations

import pytest

from bench import gateway_vs_vllm
from bench.loadgen import Result


def test_paired_rows_alternate_the_order_and_report_the_paired_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    clock = iter(range(1000))

    def run(url: str, request: dict, concurrency: int, requests: int) -> Result:
        assert (concurrency, requests) == (1, 1)
        calls.append(url)
        base = 0.5 + next(clock) * 0.01  # the machine drifts between requests; a pair is taken close together
        slower = url == "gateway"
        return Result(latencies_s=[base + (0.005 if slower else 0.0)],
                      first_token_s=[0.1 + (0.002 if slower else 0.0)])

    monkeypatch.setattr(gateway_vs_vllm, "run", run)
    row = gateway_vs_vllm.paired_row("none", "direct", {}, "gateway", {}, 4)
    assert calls[2:] == ["direct", "gateway", "gateway", "direct", "direct", "gateway", "gateway", "direct"]
    assert row["direct"]["requests"] == row["gateway"]["requests"] == 4
    # within each pair: +5 ms, plus the drift of one step where the gateway went second, minus it where
    # it went first; the alternation cancels the drift in the mean and the median
    assert row["paired_diff_p25_p50_p75_ms"] == pytest.approx([-5.0, 5.0, 15.0])
    assert row["pairs"] == 4 and row["pairs_with_a_failed_side"] == 0
    assert row["paired_diff_mean_ms"] == pytest.approx(5.0)
    assert row["paired_ttft_diff_mean_ms"] == pytest.approx(2.0)
    low, high = row["paired_diff_mean_ci95_ms"]
    assert low < 5.0 < high and high - low == pytest.approx(2 * 1.96 * 11.547 / 2, rel=1e-3)  # sd of ±10 ms, n 4
    assert row["paired_ttft_diff_mean_ci95_ms"] == pytest.approx([2.0, 2.0])
    assert row["paired_ttft_diff_p25_p50_p75_ms"] == pytest.approx([2.0, 2.0, 2.0])


@pytest.mark.parametrize("text, cpus", [("1", {1}), ("0,2", {0, 2}), ("2-4", {2, 3, 4}), ("0,2-3", {0, 2, 3})])
def test_cpu_lists_read_as_taskset_writes_them(text: str, cpus: set[int]) -> None:
    assert gateway_vs_vllm.cpu_list(text) == cpus


def test_a_paired_row_survives_a_side_that_always_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(url: str, request: dict, concurrency: int, requests: int) -> Result:
        if url == "gateway":
            return Result(errors=["HTTP 502"])
        return Result(latencies_s=[0.5], first_token_s=[0.1])

    monkeypatch.setattr(gateway_vs_vllm, "run", run)
    row = gateway_vs_vllm.paired_row("none", "direct", {}, "gateway", {}, 3)
    assert row["pairs_with_a_failed_side"] == 3 and row["gateway"]["errors"] == 3  # the warm-up is not counted
    assert row["p50_ratio"] is None and row["paired_diff_mean_ms"] is None and row["paired_diff_p25_p50_p75_ms"] is None
