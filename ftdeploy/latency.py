"""Latency measurement: warm up, then time many iterations; report p50/p90/p99 and throughput.

Torch-free (numpy + onnxruntime), so ``ftdeploy bench`` and the server can use it.

>>> stats = measure(lambda: sum(range(1000)), batch_size=1, min_seconds=0.01)
>>> stats.p50 <= stats.p90 <= stats.p99
True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np


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


def measure_interleaved(fns: dict[str, Callable[[], object]], batch_size: int, rounds: int = 4, warmup: int = 5,
                        min_iterations: int = 20, min_seconds: float = 1.5) -> dict[str, LatencyStats]:
    """Time several variants in alternating rounds, so that drift in the machine's speed (other
    tenants, frequency changes) hits all of them alike; each gets ``min_seconds`` in all."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _timed(fn, times[name], -(-min_iterations // rounds), 2000, min_seconds / rounds)
    return {name: _stats(t, batch_size) for name, t in times.items()}


def ort_session(path: str | Path, threads: int):
    """A CPU session pinned to ``threads`` intra-op threads (one inter-op thread: a single image stream)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session, batch: np.ndarray) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: batch})


def tile_batch(samples: np.ndarray, batch_size: int) -> np.ndarray:
    """A batch of ``batch_size`` real samples (repeated when there are fewer)."""
    reps = -(-batch_size // len(samples))
    return np.ascontiguousarray(np.concatenate([samples] * reps)[:batch_size])


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
