"""Micro-batching: concurrent requests gathered into one onnxruntime run, a bounded queue, timeouts,
and the statistics of where a request's time went (queue, compute), per batch size."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..errors import RequestError
from ..onnx_model import OnnxModel
from ..tasks.base import Outputs, concat, slice_outputs

log = logging.getLogger(__name__)

INLINE_MAX_RUN_S = 0.005  # a lone request's model run may hold the event loop this long (see MicroBatcher)


class Stats:
    """Where the time of one model version's requests went, in this process, in the shape of Triton's
    statistics extension (``/v2/models/{m}/stats``: counts and nanoseconds): ``queue`` (waiting for a
    batch to start), ``compute_input`` (decoding and preprocessing), ``compute_infer`` (the
    onnxruntime run), ``compute_output`` (postprocessing and encoding the answer), per request and per
    batch size."""

    KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self):
        self.totals = {kind: [0, 0] for kind in self.KINDS}  # [count, ns]
        self.batches: dict[int, dict[str, list[int]]] = {}
        self.inference_count = self.execution_count = 0
        self.last_inference_ms = 0

    def add(self, kind: str, ns: int, count: int = 1) -> None:
        self.totals[kind][0] += count
        self.totals[kind][1] += ns

    def batch(self, size: int, queued_ns: list[int], compute_ns: int) -> None:
        """One onnxruntime run of ``size`` inputs for requests that waited ``queued_ns`` each."""
        per = self.batches.setdefault(size, {"queue": [0, 0], "compute_infer": [0, 0]})
        per["queue"][0] += len(queued_ns)
        per["queue"][1] += sum(queued_ns)
        per["compute_infer"][0] += 1
        per["compute_infer"][1] += compute_ns
        self.add("queue", sum(queued_ns), len(queued_ns))
        self.add("compute_infer", compute_ns * len(queued_ns), len(queued_ns))  # each request's share of a run
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)

    def as_dict(self) -> dict:
        """Triton's ``model_stats`` entry (less name and version): counts and ``ns`` per kind, and per batch size."""
        def stat(pair):
            return {"count": pair[0], "ns": pair[1]}

        return {"last_inference": self.last_inference_ms, "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {kind: stat(pair) for kind, pair in self.totals.items()},
                "batch_stats": [{"batch_size": size, **{k: stat(v) for k, v in per.items()}}
                                for size, per in sorted(self.batches.items())]}


@dataclass
class Lifecycle:
    """Where one server process stands: warming up, ready, draining (SIGTERM received: /readyz says
    503, requests are still answered), closing (no longer accepting: every answer says
    ``Connection: close``, so no client sends on a connection the server is about to close), or
    failed (the batcher stopped: /readyz says 503 and the process exits non-zero)."""

    ready: bool = False
    draining: bool = False
    closing: bool = False
    failed: str | None = None
    in_flight: int = 0
    last_answer: float = 0.0  # time.monotonic() of the latest response



class MicroBatcher:
    """Gathers concurrent requests into one onnxruntime run of up to ``max_batch_size`` inputs,
    waiting at most ``max_wait_ms`` for a batch to fill; each caller gets the raw outputs of its own
    inputs back. At most
    ``max_queue`` requests wait: beyond that a request is refused at once (503), since a queue
    without a bound only turns overload into timeouts for everyone."""

    def __init__(self, model: OnnxModel, metrics, max_batch_size: int, max_wait_ms: float,
                 process_per_core: bool = False, max_queue: int = 256, lifecycle: Lifecycle | None = None,
                 stats: "Stats | None" = None):
        self.model, self.metrics, self.process_per_core = model, metrics, process_per_core
        self.stats = stats or Stats()
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.lifecycle = lifecycle or Lifecycle()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.pending: set[asyncio.Future] = set()  # every answer still owed, queued or in a batch
        # Requests still decoding. A batch only waits while some are on their way: a lone request
        # at low load runs at once instead of paying max_wait_ms for company that is not coming.
        self.incoming = 0
        self.active = 0  # predict requests in the server, from reading the body to the answer
        self.single_run_s = float("inf")  # the latest one-image session run, timed inside the run

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self.task.add_done_callback(self._stopped)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def _stopped(self, task: asyncio.Task) -> None:
        """The loop ended other than by stop(): nothing will answer the requests waiting or to come.
        They get a 503 now, /readyz turns 503 and the server exits (the orchestrator restarts it)."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        self.lifecycle.failed = f"the micro-batcher stopped ({type(error).__name__}: {error})"
        log.error("%s", self.lifecycle.failed)
        for future in list(self.pending):
            if not future.done():
                future.set_exception(RequestError(503, "unavailable", self.lifecycle.failed))

    async def infer(self, arrays, timeout: float | None = None) -> Outputs:
        """Raw outputs for one request's inputs (possibly run together with other requests'); a
        RequestError when the queue is full (503), the server cannot serve (503), or the answer
        takes longer than ``timeout`` seconds (504)."""
        if self.lifecycle.failed:
            raise RequestError(503, "unavailable", self.lifecycle.failed)
        if self.queue.qsize() >= self.max_queue:
            raise RequestError(503, "overloaded", f"{self.queue.qsize()} requests are waiting (--max-queue "
                            f"{self.max_queue}); retry shortly", {"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        self.queue.put_nowait((arrays, future, time.perf_counter_ns()))
        try:
            return await asyncio.wait_for(future, timeout)  # cancels the future, which the batch then skips
        except asyncio.TimeoutError:
            raise RequestError(504, "timeout", f"no answer within {timeout:g} s (--request-timeout)") from None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            count = len(items[0][0])
            deadline = loop.time() + self.max_wait
            while count < self.max_batch_size:
                timeout = deadline - loop.time()
                try:
                    if self.queue.empty() and (timeout <= 0 or self.incoming == 0):
                        break
                    item = self.queue.get_nowait() if not self.queue.empty() else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if count + len(item[0]) > self.max_batch_size:
                    await self._run(items)  # keep the batch under the cap; the newcomer starts the next one
                    items, count = [], 0
                items.append(item)
                count += len(item[0])
            await self._run(items)

    async def _run(self, items) -> None:
        items = [item for item in items if not item[1].done()]  # timed out: nobody waits
        if not items:
            return
        batch = concat([a for a, _, _ in items])
        started = time.perf_counter_ns()
        try:
            if self._run_inline(len(batch)):
                outputs = self._outputs(batch)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(None, self._outputs, batch)
        except Exception as e:  # an inference failure must reach the callers, not kill the loop
            for _, future, _ in items:
                if not future.done():
                    future.set_exception(e)
            return
        self.metrics.observe_batch(len(batch))
        self.stats.batch(len(batch), [started - queued for _, _, queued in items], time.perf_counter_ns() - started)
        start = 0
        for arrays, future, _ in items:
            if not future.done():
                future.set_result(slice_outputs(outputs, start, start + len(arrays)))
            start += len(arrays)

    def _run_inline(self, inputs: int) -> bool:
        """Whether to run this batch on the event loop itself. The hop to a worker thread and back
        (two thread wake-ups) costs ~0.4 ms, an eighth of a small model's request on 2 cores, and buys
        nothing when no other request is in the server to use the loop meanwhile, nor when worker
        processes already cover every core (``process_per_core``): the thread's overlap with the
        loop then only takes CPU from another worker. A model slower than INLINE_MAX_RUN_S always
        goes to the thread, so the loop (health checks, new arrivals) is never blocked for long."""
        if self.single_run_s > INLINE_MAX_RUN_S:
            return False
        return self.process_per_core or (inputs == 1 and self.active <= 1)

    def _outputs(self, batch) -> Outputs:
        start = time.perf_counter()
        outputs = self.model.outputs(batch)
        if len(batch) == 1:
            self.single_run_s = time.perf_counter() - start
        return outputs

