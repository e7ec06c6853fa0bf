"""Latency measurement, one protocol for the INT8 search, pruning, the reports and the benchmarks.

- Sessions are built as serving builds them (:func:`ort_session`), with the thread count and the
  intra-op spinning policy set explicitly and recorded (:func:`session_policy`).
- Variants are timed in alternating *blocks*, never call by call (alternating two sessions call by
  call inflates both and pulls their ratio towards 1). Each block starts after an idle gap that lets
  spinning worker threads (onnxruntime's, PyTorch's OpenMP) go to sleep, then warm-up calls, so no
  variant runs against another's leftovers. The order rotates every round: five rounds at batch 1,
  where speedups are judged, three at larger batches, whose calls are long (:func:`rounds_at`).
- A speedup is the median of per-round ratios, with their interquartile range as the spread: "faster
  by at least ``min_speedup``" needs the low end (the 25th percentile) to clear it
  (:meth:`Speedup.verdict`). The extremes are kept too; one round disturbed by another tenant of a
  shared machine should not decide alone.
- An A/A comparison (a file against itself) gives the noise floor: a candidate whose speedup lies
  inside it is "not distinguishable", not faster.

Torch-free (numpy + onnxruntime), so ``ftdeploy bench`` and the server can use it.

>>> stats = measure(lambda: sum(range(1000)), batch_size=1, min_seconds=0.01)
>>> stats.p50 <= stats.p90 <= stats.p99
True
>>> Speedup.of([1.0, 1.0, 1.0], [0.5, 0.52, 0.48]).verdict(noise_floor=0.05, min_speedup=1.1)
'faster'
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .tasks.base import feeds, tile

# Spinning worker threads answer the next run sooner; serving builds its sessions the same way.
ALLOW_SPINNING = True
SETTLE_SECONDS = 0.02  # idle gap before each block: longer than a spin-wait, short against a block
# Warm-up calls stop after this long (at least one): one call of a 200 ms batch warms what three of a
# 2 ms batch do, and three of them cost more than the timed calls of a 2-second measurement.
WARMUP_SECONDS = 0.05


@dataclass
class LatencyStats:
    batch_size: int
    iterations: int
    p50: float  # milliseconds per batch
    p90: float
    p99: float
    mean: float
    throughput: float  # items per second at the median latency

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn: Callable[[], object], times: list[float], min_iterations: int, max_iterations: int,
           min_seconds: float) -> None:
    start, n = time.perf_counter(), 0
    while n < max_iterations and (n < min_iterations or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        n += 1


def _stats(times: list[float], batch_size: int) -> LatencyStats:
    ms = np.asarray(times) * 1000
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return LatencyStats(batch_size, len(times), p50, p90, p99, float(ms.mean()), batch_size * 1000 / p50)


def measure(fn: Callable[[], object], batch_size: int, warmup: int = 5, min_iterations: int = 20,
            max_iterations: int = 2000, min_seconds: float = 1.5) -> LatencyStats:
    """Run ``fn`` ``warmup`` times untimed, then at least ``min_iterations`` times and ``min_seconds`` long."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    _timed(fn, times, min_iterations, max_iterations, min_seconds)
    return _stats(times, batch_size)


FASTER = ("faster", "faster, below min_speedup")  # the verdicts of a speedup outside the noise floor
# A search times each candidate beside its own measurement of the reference file. One whose reference ran
# more than REFERENCE_DRIFT from the search's median reference is measured again, up to RETAKES times, and
# flagged when still off: a neighbour's memory traffic slows a large FP32 file more than a small INT8 one,
# the A/A twin slows with it, and the ratio flatters the candidate outside any noise floor.
REFERENCE_DRIFT = 0.20
RETAKES = 2


def drifted(reference_p50: float | None, median: float) -> float | None:
    """How far a reference measurement ran from the median reference (relative), when beyond
    REFERENCE_DRIFT; else None.

    >>> drifted(6.6, 4.4), drifted(4.6, 4.4)
    (0.5, None)
    """
    if not reference_p50 or not median:
        return None
    off = reference_p50 / median - 1
    return round(off, 6) if abs(off) > REFERENCE_DRIFT else None


@dataclass
class Speedup:
    """How much faster a candidate is than a baseline: per-round ratios of block medians."""

    median: float
    low: float  # 25th percentile of the per-round ratios
    high: float  # 75th percentile
    rounds: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, baseline_ms: list[float], candidate_ms: list[float]) -> "Speedup":
        ratios = [b / c for b, c in zip(baseline_ms, candidate_ms)]
        low, median, high = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
        return cls(median, low, high, ratios)

    @property
    def noise(self) -> float:
        """As an A/A comparison: how far from 1 a ratio strays between identical variants."""
        return max(abs(1 - self.low), abs(self.high - 1))

    def verdict(self, noise_floor: float, min_speedup: float = 1.0) -> str:
        """``faster`` (the low end clears ``min_speedup`` and the median is outside the noise),
        ``not distinguishable`` (the median is inside the noise floor), ``slower``, or ``faster, below
        min_speedup``."""
        if self.median < 1 - noise_floor:
            return "slower"
        if self.median <= 1 + noise_floor:
            return "not distinguishable"
        return "faster" if self.low >= min_speedup else "faster, below min_speedup"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """Variants timed under the protocol: pooled statistics and the median of every block."""

    stats: dict[str, LatencyStats]
    blocks: dict[str, list[float]]  # variant -> block p50 (ms), one per round

    def speedup(self, baseline: str, candidate: str) -> Speedup:
        return Speedup.of(self.blocks[baseline], self.blocks[candidate])

    def renamed(self, names: dict[str, str]) -> "Comparison":
        """The variants in ``names`` (old -> new name), the others left out."""
        return Comparison({names[k]: v for k, v in self.stats.items() if k in names},
                          {names[k]: v for k, v in self.blocks.items() if k in names})


def compare(fns: dict[str, Callable[[], object]], batch_size: int, rounds: int = 5, seconds: float = 1.5,
            warmup: int = 3, min_iterations: int = 3, settle: float = SETTLE_SECONDS) -> Comparison:
    """Time ``fns`` in ``rounds`` alternating blocks, ``seconds`` per variant in all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    blocks: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no variant always goes first
            time.sleep(settle)
            _timed(fns[name], [], 1, warmup, WARMUP_SECONDS)
            block: list[float] = []
            _timed(fns[name], block, min_iterations, 100_000, seconds / rounds)
            times[name] += block
            blocks[name].append(1000 * statistics.median(block))
    return Comparison({name: _stats(t, batch_size) for name, t in times.items()}, blocks)


def beside_reference(reference: Callable[[], object], twin: Callable[[], object],
                     candidates: dict[str, Callable[[], object]], batch_size: int, seconds: float,
                     name: str = "reference") -> tuple[Comparison, float]:
    """``candidates`` timed in the same rounds as the reference and its A/A ``twin`` (the same file in
    a second session), named ``name`` and ``name A/A``; returns the comparison and the A/A spread,
    the noise of this very measurement."""
    result = compare({name: reference, f"{name} A/A": twin, **candidates}, batch_size, seconds=seconds)
    return result, result.speedup(name, f"{name} A/A").noise


def rounds_at(batch_size: int) -> int:
    """Rounds of :func:`compare` at a batch size: five at batch 1, three at larger batches, whose
    calls are long (a block holds a few of them, and more rounds would add warm-ups, not figures)."""
    return 5 if batch_size == 1 else 3


def profile(runners: dict[str, Callable[[np.ndarray], Callable[[], object]]], samples: np.ndarray,
            batch_sizes: list[int], seconds: float, measured: dict[int, Comparison] | None = None,
            only_at: dict[str, int] | None = None, report_seconds: float | None = None
            ) -> tuple[dict[str, dict], dict[int, Comparison]]:
    """Every variant (name -> batch -> callable) timed side by side at each batch size; returns the
    report figures per variant (p50/p90/p99, throughput, iterations per batch size) and the
    comparison behind each batch size, for speedups. ``measured`` holds comparisons of the same
    variants already taken under the protocol (batch size -> comparison): those are not timed again.
    ``only_at`` times a variant at one batch size alone (an A/A session, where a speedup is judged);
    the batch sizes without one are timed ``report_seconds`` per variant when given: their figures
    are reported, no decision rests on them."""
    figures: dict[str, dict] = {name: {"latency_ms": {}, "throughput": {}, "iterations": {}} for name in runners}
    comparisons = dict(measured or {})
    judged = set((only_at or {}).values())
    for bs in batch_sizes:
        if bs not in comparisons:
            batch = tile_batch(samples, bs)
            timed = seconds if bs in judged or report_seconds is None else report_seconds
            comparisons[bs] = compare({name: make(batch) for name, make in runners.items()
                                       if (only_at or {}).get(name, bs) == bs}, bs, rounds_at(bs), timed)
        for name, st in comparisons[bs].stats.items():
            figures[name]["latency_ms"][str(bs)] = {"p50": st.p50, "p90": st.p90, "p99": st.p99}
            figures[name]["throughput"][str(bs)] = st.throughput
            figures[name]["iterations"][str(bs)] = st.iterations
    return figures, comparisons


def session_policy(threads: int) -> dict:
    """How sessions are built, recorded beside every figure they produce."""
    return {"intra_op_threads": threads, "inter_op_threads": 1, "execution_mode": "sequential",
            "allow_spinning": ALLOW_SPINNING}


def ort_session(path: str | Path, threads: int, providers: list[str] | None = None):
    """A session as serving builds it: ``threads`` intra-op threads, one inter-op thread (one image
    stream), sequential execution, the spinning policy of :data:`ALLOW_SPINNING`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if ALLOW_SPINNING else "0")
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


# Execution providers ftdeploy can serve with, by the name --provider takes.
PROVIDERS = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def installed_providers() -> list[str]:
    import onnxruntime as ort

    return [name for name, ep in PROVIDERS.items() if ep in ort.get_available_providers()]


def provider_latency(path: str | Path, samples: np.ndarray, threads: int, seconds: float) -> dict[str, float] | None:
    """Batch-1 p50 (ms) of ``path`` on every installed provider of :data:`PROVIDERS`, timed side by
    side; None when the CPU provider is the only one (nothing to choose between)."""
    names = installed_providers()
    if len(names) < 2:
        return None
    batch = tile_batch(samples, 1)
    result = compare({n: ort_runner(ort_session(path, threads, [PROVIDERS[n]]), batch) for n in names}, 1, seconds=seconds)
    return {n: st.p50 for n, st in result.stats.items()}


def ort_runner(session, batch) -> Callable[[], object]:
    """One session run on ``batch`` (any task's inputs), its arrays made once, outside the timing."""
    arrays = feeds(batch, [i.name for i in session.get_inputs()])
    return lambda: session.run(None, arrays)


tile_batch = tile  # a batch of ``batch_size`` real samples (repeated when there are fewer)


def bench_grid(path: str | Path, batch_sizes: list[int], threads: list[int], samples: np.ndarray | None = None,
               min_seconds: float = 1.5) -> list[dict]:
    """ONNX latency over a batch-size x threads grid; random inputs of the model's shape unless given."""
    rows = []
    for n_threads in threads:
        session = ort_session(path, n_threads)
        if samples is None:
            shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
            samples = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        for bs in batch_sizes:
            stats = measure(ort_runner(session, tile_batch(samples, bs)), bs, min_seconds=min_seconds)
            rows.append({"threads": n_threads, **stats.as_dict()})
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
