"""``ftdeploy serve MODEL.onnx``: FastAPI on uvicorn over one onnxruntime session.

The ONNX file alone carries what serving needs (its task, label names, preprocessing or tokenizer,
what its postprocessing reads). The server keeps HTTP, batching and the lifecycle; the task's codec
turns a request's bytes into inputs and predictions into the answer (images: multipart, base64 JSON
or a raw body; text: JSON or text/plain, tokenized with the ``tokenizers`` library), and the task's
postprocess turns raw outputs into predictions. Concurrent requests are gathered into
micro-batches. Bad input gets a 4xx JSON error and never disturbs other requests; an overloaded
server says so (503 with Retry-After) instead of queueing without end.
Torch-free: installs with ``pip install 'ftdeploy[serve]'``.

Example::

    app = create_app("runs/digits/export/model.onnx")
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codecs import Limits
from .errors import BadInput, DependencyError, FtdeployError, RequestError, ServiceError
from .latency import PROVIDERS, installed_providers
from .logs import showing_logs
from .onnx_model import OnnxModel
from .records import ExportReport, load_record
from .tasks.base import Outputs, concat, slice_outputs

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
    from pydantic import BaseModel, ValidationError
    from starlette.exceptions import HTTPException
    import uvicorn
    from swagger_ui_bundle import swagger_ui_path
except ImportError:  # pragma: no cover - exercised by users without the extra
    raise DependencyError("serving needs FastAPI, uvicorn, prometheus-client and swagger-ui-bundle-v2",
                          "pip install 'ftdeploy[serve]'") from None

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger(__name__)


# Images with up to this many pixels in all are decoded on the event loop (a thread hop costs more
# than decoding them); larger ones in a thread. Decided from the header: a 60 KB PNG can hold 36 M
# pixels, and decoding those on the loop would stall every other request.
INLINE_DECODE_PIXELS = 256 * 256
INLINE_MAX_RUN_S = 0.005  # a lone request's model run may hold the event loop this long (see MicroBatcher)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """The one shape of every error the server answers."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "not an image or an empty text, truncated, not UTF-8, bad JSON or base64"),
    (413, "too many bytes, pixels, images or texts"),
    (415, "unsupported content type"), (422, "invalid query parameter"),
    (503, "overloaded (the request queue is full: retry after Retry-After seconds) or unable to serve"),
    (504, "the request waited longer than --request-timeout"))}


class Metrics:
    """Request and batch metrics (prometheus_client). With ``--workers N`` every worker writes to the
    shared ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``, whichever worker answers, covers them all."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()  # one per app: tests build several apps in one process
        self.requests = Counter("ftdeploy_requests", "HTTP requests by path and status.", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("ftdeploy_request_duration_seconds", "Request latency.",
                                 buckets=self.LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("ftdeploy_batch_size", "Inputs per onnxruntime run.",
                               buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size}), registry=self.registry)
        self.images = Counter("ftdeploy_images", "Inputs answered (images, texts).", registry=self.registry)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        self.latency.observe(seconds)

    def observe_batch(self, size: int) -> None:
        self.batch.observe(size)
        self.images.inc(size)

    def render(self) -> bytes:
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


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


class RequestMetrics:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware costs about a millisecond a request):
    metrics, requests in flight, and ``Connection: close`` once the server stops accepting."""

    def __init__(self, app, metrics: Metrics, lifecycle: Lifecycle):
        self.app, self.metrics, self.lifecycle = app, metrics, lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, life = time.perf_counter(), [500], self.lifecycle

        async def record_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if life.closing:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        life.in_flight += 1
        try:
            await self.app(scope, receive, record_status)
        finally:
            life.in_flight -= 1
            life.last_answer = time.monotonic()
            self.metrics.observe_request(scope["path"], status[0], time.perf_counter() - start)


class MicroBatcher:
    """Gathers concurrent requests into one onnxruntime run of up to ``max_batch_size`` inputs,
    waiting at most ``max_wait_ms`` for a batch to fill; each caller gets the raw outputs of its own
    inputs back. At most
    ``max_queue`` requests wait: beyond that a request is refused at once (503), since a queue
    without a bound only turns overload into timeouts for everyone."""

    def __init__(self, model: OnnxModel, metrics: Metrics, max_batch_size: int, max_wait_ms: float,
                 process_per_core: bool = False, max_queue: int = 256, lifecycle: Lifecycle | None = None):
        self.model, self.metrics, self.process_per_core = model, metrics, process_per_core
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
        self.queue.put_nowait((arrays, future))
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
        items = [(arrays, future) for arrays, future in items if not future.done()]  # timed out: nobody waits
        if not items:
            return
        batch = concat([a for a, _ in items])
        try:
            if self._run_inline(len(batch)):
                outputs = self._outputs(batch)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(None, self._outputs, batch)
        except Exception as e:  # an inference failure must reach the callers, not kill the loop
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            return
        self.metrics.observe_batch(len(batch))
        start = 0
        for arrays, future in items:
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


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error the server answers has one shape: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def add_docs(app: FastAPI) -> None:
    """``/docs`` from the Swagger UI files of an installed package: FastAPI's default page loads them
    from a CDN, which leaves it blank wherever the server runs without internet access."""
    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - docs",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")


def query_parameters(params) -> list[dict]:
    """The OpenAPI parameters of a codec's query model (shown by /docs)."""
    if params is None:
        return []
    schema = params.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", []),
             "description": field.get("description", ""),
             "schema": {k: v for k, v in field.items() if k not in ("title", "description")}}
            for name, field in schema.get("properties", {}).items()]


def parse_params(params, query) -> Any:
    """The request's query parameters as the codec's model; 422 ``invalid_parameter`` when they do not fit."""
    if params is None:
        return None
    try:
        return params.model_validate(dict(query))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'query'}: {err['msg']}"
                             + (f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else "")
                             for err in e.errors())
        raise RequestError(422, "invalid_parameter", problems) from None


def create_app(model_path: str | Path, threads: int | None = None, max_batch_size: int = 16, max_wait_ms: float = 2.0,
               limits: Limits = Limits(), warmup_runs: int = 3, provider: str = "cpu",
               lifecycle: Lifecycle | None = None, process_per_core: bool = False, max_queue: int = 256,
               request_timeout: float | None = 30.0) -> FastAPI:
    """The serving app for one ONNX file (loaded now, so a bad file fails before the server binds).
    ``provider``: ``cpu``, ``openvino`` or ``auto`` (see :func:`choose_provider`);
    ``process_per_core``: worker processes cover every core (see :meth:`MicroBatcher._run_inline`);
    ``max_queue``: requests that may wait for the model (then 503); ``request_timeout``: seconds a
    request may wait for its answer (then 504)."""
    from . import __version__

    chosen, why = choose_provider(model_path, provider)
    model = OnnxModel(model_path, threads, providers=[PROVIDERS[chosen]])
    agreement = None
    if chosen != "cpu":
        reference = OnnxModel(model_path, threads)  # the CPU provider: the check's reference, the fallback
        try:
            agreement = check_agreement(model, reference)
        except FtdeployError as e:
            if provider != "auto":
                raise
            log.warning("--provider auto: %s; serving on cpu", e)
            chosen, why, model = "cpu", str(e), reference
    log.info("provider: %s (%s)", chosen, why)
    metrics = Metrics(max_batch_size)
    state = lifecycle or Lifecycle()
    batcher = MicroBatcher(model, metrics, max_batch_size, max_wait_ms, process_per_core, max_queue, state)
    task, codec = model.task, model.task.codec
    info = {"task": task.name, "classes": model.classes,
            "input_size": getattr(model.preprocessing, "input_size", None),
            "preprocessing": {k: v for k, v in model.preprocessing.to_dict().items() if k != "tokenizer"},
            "variant": model.metadata.get("variant"),
            "source_run": model.metadata.get("source_run"), "model": model.metadata.get("model"),
            "exported_by": model.metadata.get("version"), "server_version": __version__, "file": str(model.path),
            "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "limits": limits.__dict__,
            "max_queue": max_queue, "request_timeout": request_timeout,
            # fitted by `ftdeploy report --calibrate` and stored in the file: probabilities that mean what they say
            "temperature": float(model.metadata.get("temperature") or 1.0),
            "provider": chosen, "provider_reason": why, "provider_agreement": agreement,
            "pid": os.getpid()}

    async def warm_up() -> None:
        dummy = model.preprocess(codec.warmup(model.preprocessing))
        for _ in range(warmup_runs):
            await batcher.infer(dummy)
        state.ready = True

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        warmup = asyncio.get_running_loop().create_task(warm_up())
        yield
        warmup.cancel()
        await batcher.stop()

    app = FastAPI(title="ftdeploy model server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"{task.description} with {model.path.name} ({len(model.classes)} labels). "
                              f"{codec.accepts}")

    app.state.batcher, app.state.lifecycle = batcher, state  # for callers who embed the app
    app.add_middleware(RequestMetrics, metrics=metrics, lifecycle=state)
    add_docs(app)

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
                             for e in exc.errors())
        return error_response(422, "invalid_parameter", problems)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.get("/healthz")
    async def healthz():
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded and has answered its warm-up requests, the server is not
        draining (after SIGTERM it answers 503 here at once, and still answers requests) and its
        micro-batcher runs (``failed`` says why when it stopped)."""
        ready = state.ready and not state.draining and state.failed is None
        return JSONResponse({"ready": ready, "draining": state.draining, "failed": state.failed},
                            status_code=200 if ready else 503)

    @app.get("/v1/model")
    async def model_info():
        return info

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus metrics, of every worker process."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def inputs(parsed):
        """Decode and preprocess a parsed request: on the event loop when it is small (a thread hop
        costs more than decoding a small image), else in a thread, so a huge one never stalls the
        requests beside it."""
        def run():
            return model.preprocess([parsed.decode(item) for item in parsed.raw])

        if parsed.work <= INLINE_DECODE_PIXELS:
            return run()
        batcher.incoming += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(None, run)
        finally:
            batcher.incoming -= 1

    @app.post("/v1/predict", responses={200: {"content": {"application/json": {"schema": codec.response_schema}}},
                                        **ERRORS},
              openapi_extra={"requestBody": codec.request_body, "parameters": query_parameters(codec.params)},
              description=codec.accepts)
    async def predict(request: Request):
        params = parse_params(codec.params, request.query_params)
        batcher.active += 1
        try:
            body = await read_body(request, limits.max_request_bytes)
            batch = await inputs(codec.parse(body, request.headers.get("content-type", ""), limits))
            outputs = await batcher.infer(batch, request_timeout)
        finally:
            batcher.active -= 1
        predictions = task.postprocess(outputs, batch, model.info)
        # A plain JSONResponse: FastAPI's encoder walk over the result costs more than the model at this size.
        return JSONResponse(codec.respond(predictions, params, model.info))

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as more than ``limit`` bytes have arrived: the count
    is of the bytes read, so a chunked upload without Content-Length is held to it as well."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadInput(400, "invalid_body", f"Content-Length {declared!r} is not a number")
    if declared is not None and int(declared) > limit:
        raise BadInput(413, "request_too_large", f"the request has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise BadInput(413, "request_too_large", f"the request body passed {limit} bytes, the limit")
        body += chunk
    return bytes(body)


AGREEMENT_MAX_PROB_DIFF = 0.05  # served scores (probabilities); the task's decisions must agree on every sample


def choose_provider(model_path: str | Path, provider: str) -> tuple[str, str]:
    """(provider name, why) for ``--provider``: ``cpu``; ``openvino`` (onnxruntime-openvino must be
    installed); ``auto``: the fastest for this file in the measurements of its export directory
    (``report.json``, written by export and quantize where more than one provider is installed),
    else ``cpu``."""
    installed = installed_providers()
    if provider not in ("auto", *PROVIDERS):
        raise FtdeployError(f"--provider {provider!r} is not known", f"use auto, {', '.join(PROVIDERS)}")
    if provider != "auto":
        if provider not in installed:
            raise FtdeployError(f"--provider {provider}: its onnxruntime execution provider is not installed "
                                f"(installed: {', '.join(installed)})", OPENVINO_HINT)
        return provider, "asked for"
    if installed == ["cpu"]:
        return "cpu", "onnxruntime-openvino is not installed, so the CPU provider is the only one"
    path = Path(model_path)
    report = path.parent / "report.json"
    variants = load_record(ExportReport, report).variants if report.is_file() else {}
    measured = next((v.providers_p50_ms for v in variants.values()
                     if Path(str(v.path or "")).name == path.name and v.providers_p50_ms), None)
    measured = {k: v for k, v in (measured or {}).items() if k in installed}
    if not measured:
        return "cpu", f"no provider measurements for {path.name} in {report}"
    fastest = min(measured, key=measured.get)
    return fastest, "fastest in " + ", ".join(f"{k} {v:.2f} ms" for k, v in measured.items()) + f" (batch-1 p50, {report})"


OPENVINO_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-openvino (it replaces onnxruntime), or "
                 "docker build --build-arg PROVIDER=openvino; or serve with --provider cpu")


def check_agreement(model: OnnxModel, reference: OnnxModel) -> dict:
    """The file's own sample inputs through ``model``'s provider and through ``reference`` (the same
    file on the CPU provider), compared by the task: its decisions (a classifier's top-1) must agree
    on every sample and its served scores within AGREEMENT_MAX_PROB_DIFF, or FtdeployError."""
    samples = model.samples()
    provider = model.session.get_providers()[0]
    if samples is None:
        raise FtdeployError(f"{model.path} carries no sample inputs to check {provider} against the CPU provider",
                            "export it again with this version of ftdeploy, or serve with --provider cpu")
    result = {"samples": len(samples),
              **model.task.agreement(reference.outputs(samples), model.outputs(samples), samples, model.info)}
    if result["decision_agreement"] < 1 or result["max_score_diff"] > AGREEMENT_MAX_PROB_DIFF:
        raise FtdeployError(f"{provider} disagrees with the CPU provider on the file's {len(samples)} sample inputs: "
                            f"{model.task.decision} agreement {result['decision_agreement']:.0%}, max score difference "
                            f"{result['max_score_diff']:.3f} (allowed {AGREEMENT_MAX_PROB_DIFF})", "serve with --provider cpu")
    return result


SO_ATTACH_FILTER = 26  # Linux <asm-generic/socket.h>


def block_new_connections(sock: socket.socket) -> bool:
    """Make a listening socket drop every new SYN, leaving the connections already in its accept
    queue alone (a one-instruction classic BPF socket filter: ``ret #0``). A client whose SYN is
    dropped retries it a second later and is then refused by the closed port: refused, never reset.
    False where the kernel has no socket filters (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    program = (ctypes.c_ubyte * 8)(*struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET | BPF_K, k = 0: drop
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(program)))
    except OSError:
        return False
    return True


HANDSHAKE_GRACE_S = 0.05  # a handshake begun before the SYN filter completes within a round trip


def take_queued_connections(listener, grace: float = HANDSHAKE_GRACE_S) -> list[socket.socket]:
    """Every connection in a listening socket's accept queue: clients that finished the TCP handshake
    (for them the connection is open, and their request may be on its way) but that the server has
    not accepted yet. Closing the listener resets those; accepting them first lets them be answered.
    New SYNs are dropped first, so the queue cannot refill between the last accept and the close,
    but a handshake already half done when the filter went in still lands in the queue one round
    trip later: the queue is emptied until it has stayed empty for ``grace`` seconds."""
    sock = socket.socket(fileno=os.dup(listener.fileno()))  # a second handle on the same listener
    try:
        block_new_connections(sock)
        sock.setblocking(False)
        queued = []
        quiet_until = time.monotonic() + grace
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() >= quiet_until:
                    return queued
                time.sleep(0.002)
                continue
            conn.setblocking(False)
            queued.append(conn)
            quiet_until = time.monotonic() + grace
    finally:
        sock.close()  # the duplicate handle only; the server closes the listener itself


class DrainingServer(uvicorn.Server):
    """uvicorn, draining on SIGTERM/SIGINT: /readyz turns 503 at once while requests are still
    answered for ``drain_seconds`` (a load balancer or Kubernetes keeps sending for a few seconds
    after the signal); then it stops accepting without resetting anyone: the connections already in
    the kernel's accept queue are accepted first and answered with ``Connection: close``, like what
    still arrives on open keep-alive connections, until they go quiet; in-flight and batched work
    finishes, and it exits. A second signal skips what is left of the drain.

    It relies on uvicorn internals (``servers``, ``server_state``, ``lifespan.state``,
    ``config.http_protocol_class``), hence uvicorn's upper bound in pyproject.toml, and
    tests/test_serve.py checks them."""

    LINGER_S = 0.25  # quiet time on open connections before closing them; a keep-alive client under
    MAX_LINGER_S = 5.0  # load sends again within milliseconds, and is told to close

    def __init__(self, config, lifecycle: Lifecycle, drain_seconds: float, stop_asked=lambda: False):
        super().__init__(config)
        self.lifecycle, self.drain_seconds, self.drain_started = lifecycle, drain_seconds, None
        self.stop_asked = stop_asked  # a stop that came before uvicorn's own signal handlers were in place

    def handle_exit(self, sig, frame) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.lifecycle.draining = True
            log.info("draining for %.1f s (signal %s)", self.drain_seconds, sig)
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is None and self.stop_asked():
            self.handle_exit(signal.SIGTERM, None)
        if self.lifecycle.failed and not self.should_exit:  # nothing can be answered: no drain
            log.error("stopping: %s", self.lifecycle.failed)
            self.should_exit = True
        started = self.drain_started
        if started is not None and not self.should_exit and time.monotonic() - started >= self.drain_seconds:
            await self.stop_accepting()
            self.should_exit = True
        return await super().on_tick(counter)

    async def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        queued = [conn for server in self.servers for listener in server.sockets
                  for conn in take_queued_connections(listener)]
        for server in self.servers:
            server.close()
        life = self.lifecycle
        life.closing = True
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        for conn in queued:
            await loop.connect_accepted_socket(protocol, conn)
        if queued:
            log.info("stopped accepting; %d queued connection(s) accepted to be answered", len(queued))
        deadline = time.monotonic() + self.MAX_LINGER_S
        while self.server_state.connections and time.monotonic() < deadline and not self.force_exit:
            if life.in_flight == 0 and time.monotonic() - life.last_answer >= self.LINGER_S:
                break
            await asyncio.sleep(0.02)


@dataclass
class ServeOptions:
    """Everything a worker process needs to build its app and server (picklable)."""

    model_path: str
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    limits: Limits = field(default_factory=Limits)
    warmup_runs: int = 3
    provider: str = "cpu"
    drain_seconds: float = 5.0
    workers: int = 1
    max_queue: int = 256
    request_timeout: float | None = 30.0


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A socket bound to (host, port). With ``reuse_port`` (several workers) every worker binds its
    own with SO_REUSEPORT, and the kernel spreads new connections over them evenly (one shared accept
    queue lets the first to wake take a burst); without it, a port in use is an error, not a share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FtdeployError(f"cannot listen on {host}:{port} ({e.strerror})", "pick another --port or stop what uses it") from None
    return sock


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_worker(options: ServeOptions, stop=None) -> None:
    """One server process: its own onnxruntime session, batcher and event loop. A stop signal (or
    ``stop``, a multiprocessing Event the parent sets) during start-up, which can take seconds,
    ends it cleanly before it serves; once uvicorn runs, the server drains."""
    from .machine import physical_cores

    asked: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda sig, _frame: asked.append(sig))

    def stop_asked() -> bool:
        return bool(asked) or (stop is not None and stop.is_set())

    lifecycle = Lifecycle()
    per_core = options.workers > 1 and options.workers * (options.threads or 1) >= physical_cores()
    app = None if stop_asked() else create_app(
        options.model_path, options.threads, options.max_batch_size, options.max_wait_ms, options.limits,
        options.warmup_runs, options.provider, lifecycle, per_core, options.max_queue, options.request_timeout)
    if stop_asked():
        log.info("stopped during start-up")
        return
    sock = listening_socket(options.host, options.port, reuse_port=options.workers > 1)
    sock.listen(2048)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30)
    DrainingServer(config, lifecycle, options.drain_seconds, stop_asked).run(sockets=[sock])
    if lifecycle.failed:
        raise ServiceError(lifecycle.failed, "see the log above; the process exits so that it is restarted")


def spawned_worker(options: ServeOptions, stop) -> None:
    """A worker process of ``--workers N``: spawned, it starts with no logging set up, so it shows
    its lines as the command line does."""
    with showing_logs():
        run_worker(options, stop)


def serve(options: ServeOptions) -> None:
    """Run the server until SIGTERM/SIGINT, then drain (see :class:`DrainingServer`).
    ``options.workers`` processes share the port, each with its own session; /metrics covers them all."""
    workers = options.workers
    if workers == 1:  # this process serves: it loads the file and binds the port itself, once
        return run_worker(options)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    stopping: list[int] = []
    procs: list = []

    def forward(sig, _frame):
        stopping.append(sig)
        stop.set()  # first: a worker still importing ignores the signal, and reads this once it can
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM if len(stopping) == 1 else sig)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    metrics_dir = tempfile.mkdtemp(prefix="ftdeploy-metrics-")
    try:
        # a bad file, --provider or a busy port fails here, once, before any worker starts
        OnnxModel(options.model_path, 1)
        choose_provider(options.model_path, options.provider)
        listening_socket(options.host, options.port, reuse_port=False).close()
        os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when a worker imports it
        procs += [context.Process(target=spawned_worker, args=(options, stop), name=f"ftdeploy-worker-{i}")
                  for i in range(workers)]
        # Workers inherit an ignored signal across exec: none dies of one while it imports. Here the
        # signals are blocked meanwhile (a blocked signal stays pending even while ignored), and
        # reach ``forward`` once it is back.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            for p in procs:
                p.start()
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, forward)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        log.info("%d workers: pids %s", workers, ", ".join(str(p.pid) for p in procs))
        while not stopping and all(p.is_alive() for p in procs):
            time.sleep(0.2)
        if not stopping:  # a worker died on its own: stop the others; the orchestrator restarts the whole
            forward(signal.SIGTERM, None)
        for p in procs:
            if p.pid is not None:
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [p for p in procs if p.pid is not None and p.exitcode != 0]
    if failed:
        raise ServiceError(f"worker {failed[0].name} exited with code {failed[0].exitcode}", "see the log above")
