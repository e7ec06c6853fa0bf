"""The latency protocol's budget: what it spends on warm-ups and on figures no decision rests on."""

import time

import numpy as np

from ftdeploy.latency import compare, profile, rounds_at


def counted(seconds: float):
    """A call that takes ``seconds``, and the list its calls are counted in."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(seconds)

    return fn, calls


def test_a_long_call_is_warmed_up_once_per_block_and_a_short_one_three_times():
    slow, slow_calls = counted(0.06)
    fast, fast_calls = counted(0.001)
    result = compare({"slow": slow, "fast": fast}, 32, rounds=3, seconds=0.3, warmup=3)
    assert len(slow_calls) - result.stats["slow"].iterations == 3  # one per block
    assert len(fast_calls) - result.stats["fast"].iterations == 9  # three per block


def test_sizes_where_nothing_is_judged_are_timed_for_report_seconds():
    def runners():
        return {name: (lambda batch: (lambda: time.sleep(0.001))) for name in ("a", "b", "a A/A")}

    figures, comparisons = profile(runners(), np.zeros((4, 1), np.float32), [1, 4], seconds=0.3,
                                   only_at={"a A/A": 1}, report_seconds=0.06)
    judged, reported = comparisons[1].stats, comparisons[4].stats
    assert set(judged) == {"a", "b", "a A/A"} and set(reported) == {"a", "b"}
    # ~1 ms a call: about 300 timed calls per variant at batch 1, about 60 at batch 4
    assert reported["a"].iterations < judged["a"].iterations / 2
    assert rounds_at(1) == 5 and rounds_at(4) == 3 and len(comparisons[4].blocks["a"]) == 3
    assert set(figures["a"]["latency_ms"]) == {"1", "4"} and set(figures["a A/A"]["latency_ms"]) == {"1"}
