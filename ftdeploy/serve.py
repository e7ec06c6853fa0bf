"""``ftdeploy serve MODEL.onnx``: FastAPI on uvicorn over one onnxruntime session.

The ONNX file alone carries what serving needs (its task, class names, preprocessing or tokenizer);
the task names the request codec (images: multipart, base64 JSON or a raw body; text: JSON or
text/plain, tokenized with the ``tokenizers`` library). Concurrent requests are
gathered into micro-batches. Bad input gets a 4xx JSON error and never disturbs other requests; an
overloaded server says so (503 with Retry-After) instead of queueing without end.
Torch-free: installs with ``pip install 'ftdeploy[serve]'``.

Example::

    app = create_app("runs/digits/export/model.onnx")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import functools
import io
import json
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
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DependencyError, FtdeployError, ServiceError
from .latency import PROVIDERS, installed_providers
from .onnx_model import OnnxClassifier
from .registry import Registry
from .tasks.base import concat

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse, PlainTextResponse
    from fastapi.staticfiles import StaticFiles
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException
    import uvicorn
    from swagger_ui_bundle import swagger_ui_path
except ImportError:  # pragma: no cover - exercised by users without the extra
    raise DependencyError("serving needs FastAPI, uvicorn, prometheus-client and swagger-ui-bundle-v2",
                          "pip install 'ftdeploy[serve]'") from None

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("uvicorn.error")  # the logger uvicorn configures and prints


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # Pillow's own bomb guard is 89M; a classifier never needs that much
    max_images: int = 32  # inputs per request: images, or texts
    max_request_bytes: int = 32 * 2**20  # counted on the bytes read, so chunked uploads are held to it too


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


class HttpError(Exception):
    """An answer other than 200, in the one error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class BadInput(HttpError):
    """Something wrong with the request itself (4xx)."""


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> an image whose header has been read and checked (size, pixels, bombs); nothing decoded yet."""
    if not data:
        raise BadInput(400, "empty_image", "an image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise BadInput(413, "image_too_large", f"an image has {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(413, "decompression_bomb", "an image decompresses to too many pixels") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise BadInput(400, "invalid_image", f"not a decodable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise BadInput(413, "too_many_pixels", f"an image is {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels}")
    return img


def decode(img: Image.Image) -> Image.Image:
    """Decode an opened image fully, or a BadInput saying why it cannot be."""
    try:
        img.load()
    except Exception as e:
        raise BadInput(400, "invalid_image", f"not a decodable image ({type(e).__name__}: {e})") from None
    return img


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
        self.batch = Histogram("ftdeploy_batch_size", "Images per onnxruntime run.",
                               buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size}), registry=self.registry)
        self.images = Counter("ftdeploy_images", "Images classified.", registry=self.registry)

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
    """Gathers concurrent requests into one onnxruntime run of up to ``max_batch_size`` images,
    waiting at most ``max_wait_ms`` for a batch to fill; results go back to each caller. At most
    ``max_queue`` requests wait: beyond that a request is refused at once (503), since a queue
    without a bound only turns overload into timeouts for everyone."""

    def __init__(self, model: OnnxClassifier, metrics: Metrics, max_batch_size: int, max_wait_ms: float,
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
                future.set_exception(HttpError(503, "unavailable", self.lifecycle.failed))

    async def infer(self, arrays: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Logits for one request's images (possibly run together with other requests'); an
        HttpError when the queue is full (503), the server cannot serve (503), or the answer takes
        longer than ``timeout`` seconds (504)."""
        if self.lifecycle.failed:
            raise HttpError(503, "unavailable", self.lifecycle.failed)
        if self.queue.qsize() >= self.max_queue:
            raise HttpError(503, "overloaded", f"{self.queue.qsize()} requests are waiting (--max-queue "
                            f"{self.max_queue}); retry shortly", {"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        self.queue.put_nowait((arrays, future))
        try:
            return await asyncio.wait_for(future, timeout)  # cancels the future, which the batch then skips
        except asyncio.TimeoutError:
            raise HttpError(504, "timeout", f"no answer within {timeout:g} s (--request-timeout)") from None

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
                logits = self._logits(batch)
            else:
                logits = await asyncio.get_running_loop().run_in_executor(None, self._logits, batch)
        except Exception as e:  # an inference failure must reach the callers, not kill the loop
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            return
        self.metrics.observe_batch(len(batch))
        start = 0
        for arrays, future in items:
            if not future.done():
                future.set_result(logits[start:start + len(arrays)])
            start += len(arrays)

    def _run_inline(self, images: int) -> bool:
        """Whether to run this batch on the event loop itself. The hop to a worker thread and back
        (two thread wake-ups) costs ~0.4 ms, an eighth of a small model's request on 2 cores, and buys
        nothing when no other request is in the server to use the loop meanwhile, nor when worker
        processes already cover every core (``process_per_core``): the thread's overlap with the
        loop then only takes CPU from another worker. A model slower than INLINE_MAX_RUN_S always
        goes to the thread, so the loop (health checks, new arrivals) is never blocked for long."""
        if self.single_run_s > INLINE_MAX_RUN_S:
            return False
        return self.process_per_core or (images == 1 and self.active <= 1)

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self.model.logits(batch)
        if len(batch) == 1:
            self.single_run_s = time.perf_counter() - start
        return logits


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


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
    model = OnnxClassifier(model_path, threads, providers=[PROVIDERS[chosen]])
    agreement = None
    if chosen != "cpu":
        reference = OnnxClassifier(model_path, threads)  # the CPU provider: the check's reference, the fallback
        try:
            agreement = check_agreement(model, reference)
        except FtdeployError as e:
            if provider != "auto":
                raise
            log.warning("--provider auto: %s; serving on cpu", e)
            chosen, why, model = "cpu", str(e), reference
    print(f"provider: {chosen} ({why})", flush=True)
    metrics = Metrics(max_batch_size)
    state = lifecycle or Lifecycle()
    batcher = MicroBatcher(model, metrics, max_batch_size, max_wait_ms, process_per_core, max_queue, state)
    # Fitted by `ftdeploy report --calibrate` and stored in the file: probabilities that mean what they say.
    temperature = float(model.metadata.get("temperature") or 1.0)
    codec = CODECS.get(model.task.codec)(model, limits)
    info = {"task": model.task.name, "classes": model.classes,
            "input_size": getattr(model.preprocessing, "input_size", None),
            "preprocessing": {k: v for k, v in model.preprocessing.to_dict().items() if k != "tokenizer"},
            "variant": model.metadata.get("variant"),
            "source_run": model.metadata.get("source_run"), "model": model.metadata.get("model"),
            "exported_by": model.metadata.get("version"), "server_version": __version__, "file": str(model.path),
            "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "limits": limits.__dict__,
            "max_queue": max_queue, "request_timeout": request_timeout,
            "temperature": temperature, "provider": chosen, "provider_reason": why, "provider_agreement": agreement,
            "pid": os.getpid()}

    async def warm_up() -> None:
        dummy = codec.warmup_input()
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
                  description=f"{model.task.description} with {model.path.name} ({len(model.classes)} classes). "
                              f"{codec.accepts}")

    app.state.batcher, app.state.lifecycle = batcher, state  # for callers who embed the app
    app.add_middleware(RequestMetrics, metrics=metrics, lifecycle=state)
    add_docs(app)

    @app.exception_handler(HttpError)
    async def refused(_request: Request, exc: HttpError):
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

    @app.post("/v1/predict", responses=ERRORS, openapi_extra={"requestBody": codec.request_body},
              description=codec.accepts)
    async def predict(request: Request, k: int = Query(5, ge=1, description="labels to return per input")):
        batcher.active += 1
        try:
            probs = softmax(await batcher.infer(await codec.inputs(request, batcher), request_timeout) / temperature)
        finally:
            batcher.active -= 1
        k_ = min(k, len(model.classes))
        top = np.argsort(-probs, axis=-1)[:, :k_]
        # A plain JSONResponse: FastAPI's encoder walk over the result costs more than the model at this size.
        return JSONResponse({"predictions": [{"top_k": [{"label": model.classes[i], "index": int(i),
                                                         "probability": float(p[i])} for i in row]}
                                             for row, p in zip(top, probs)]})

    return app


CODECS: Registry[type] = Registry("request codec", FtdeployError)  # a task's ``codec`` names its entry


@CODECS.register("image")
class ImageCodec:
    """Images in a request -> preprocessed arrays."""

    accepts = ('Send images as a multipart upload (one or more files), JSON {"images": ["<base64>", ...]} '
               "or a raw image body.")
    request_body = {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                       "description": "base64-encoded image files"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}}}}

    def __init__(self, model: OnnxClassifier, limits: Limits):
        self.model, self.limits = model, limits

    def warmup_input(self) -> np.ndarray:
        return np.zeros((1, *self.model.preprocessing.input_shape), np.float32)

    async def inputs(self, request: Request, batcher: MicroBatcher) -> np.ndarray:
        opened = [open_image(b, self.limits) for b in await read_images(request, self.limits)]  # headers only
        inputs = lambda: self.model.preprocess([decode(img) for img in opened])  # noqa: E731
        if sum(img.width * img.height for img in opened) <= INLINE_DECODE_PIXELS:
            return inputs()  # a thread hop costs more than decoding a small image
        batcher.incoming += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(None, inputs)
        finally:
            batcher.incoming -= 1


TEXT_TYPES = ("application/json", "text/plain")


@CODECS.register("text")
class TextCodec:
    """Texts in a request -> token ids (the file's tokenizer; a micro-batch pads to its longest).
    A text longer than the file's max_length is truncated to it, as in training; the body limit
    (--max-request-bytes) bounds what is read at all."""

    accepts = ('Send JSON {"text": "..."} or {"texts": ["...", ...]}, or one text as a text/plain body (UTF-8). '
               "Texts longer than the model's max_length tokens are truncated, as in training.")
    request_body = {"content": {
        "application/json": {"schema": {"oneOf": [
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
            {"type": "object", "required": ["texts"], "properties": {
                "texts": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}}}]},
            "example": {"texts": ["A warm, funny and moving film.", "Two hours I will never get back."]}},
        "text/plain": {"schema": {"type": "string"}, "example": "A warm, funny and moving film."}}}

    def __init__(self, model: OnnxClassifier, limits: Limits):
        self.model, self.limits = model, limits

    def warmup_input(self):
        return self.model.preprocess(["warm up"])

    async def inputs(self, request: Request, _batcher: MicroBatcher):
        return self.model.preprocess(await self.texts(request))

    async def texts(self, request: Request) -> list[str]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in TEXT_TYPES:
            raise BadInput(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} is not accepted; send "
                           'application/json {"text": ...} or {"texts": [...]}, or a text/plain body')
        body = await read_body(request, self.limits.max_request_bytes)
        try:
            decoded = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(400, "invalid_encoding", f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
        if ctype == "text/plain":
            texts = [decoded]
        else:
            try:
                payload = json.loads(decoded)
            except ValueError as e:
                raise BadInput(400, "invalid_body", f"the request body cannot be parsed: {e}") from None
            if isinstance(payload, dict) and len(payload) == 1 and "text" in payload:
                texts = [payload["text"]]
            elif isinstance(payload, dict) and len(payload) == 1 and isinstance(payload.get("texts"), list):
                texts = payload["texts"]
            else:
                raise BadInput(400, "invalid_json", 'JSON bodies must be {"text": "..."} or {"texts": ["...", ...]}')
        if not texts:
            raise BadInput(400, "no_texts", "the request holds no text")
        if len(texts) > self.limits.max_images:
            raise BadInput(413, "too_many_texts", f"the request holds {len(texts)} texts; the limit is "
                           f"{self.limits.max_images} (--max-images)")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadInput(400, "invalid_text", f"text {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise BadInput(400, "empty_text", f"text {i} is empty")
        return texts


IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff", "application/octet-stream")


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


async def read_images(request: Request, limits: Limits) -> list[bytes]:
    """The request's image bytes, whatever the accepted encoding; a BadInput for anything else."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json", *IMAGE_TYPES):
        raise BadInput(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'!r} is not accepted; send multipart/form-data, "
                       "application/json with base64 images, or a raw image body")
    try:
        body = await read_body(request, limits.max_request_bytes)
        if ctype == "multipart/form-data":
            async def replay():  # the body as read, for Starlette's multipart parser
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(max_files=limits.max_images + 1)
            blobs = [await f.read() for _, f in form.multi_items() if hasattr(f, "read")]
        elif ctype == "application/json":
            payload = json.loads(body)
            images = payload.get("images") if isinstance(payload, dict) else None
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise BadInput(400, "invalid_json", 'JSON bodies must be {"images": ["<base64>", ...]}')
            blobs = [base64.b64decode(i, validate=True) for i in images]
        else:
            blobs = [body]
    except BadInput:
        raise
    except binascii.Error:
        raise BadInput(400, "invalid_base64", "an image in the JSON body is not valid base64") from None
    except ValueError as e:  # broken JSON
        raise BadInput(400, "invalid_body", f"the request body cannot be parsed: {e}") from None
    except Exception as e:  # a truncated or malformed multipart stream, a client that went away
        raise BadInput(400, "invalid_body", f"the request body cannot be read ({type(e).__name__}: {e})") from None
    if not blobs:
        raise BadInput(400, "no_images", "the request holds no image")
    if len(blobs) > limits.max_images:
        raise BadInput(413, "too_many_images", f"the request holds {len(blobs)} images; the limit is {limits.max_images}")
    return blobs


AGREEMENT_MAX_PROB_DIFF = 0.05  # probabilities; top-1 must agree on every sample as well


def choose_provider(model_path: str | Path, provider: str) -> tuple[str, str]:
    """(provider name, why) for ``--provider``: ``cpu``; ``openvino`` (onnxruntime-openvino must be
    installed); ``auto``: the fastest for this file in the measurements of its export directory
    (``report.json``, written by export and quantize where more than one provider is installed),
    else ``cpu``."""
    import json

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
    variants = json.loads(report.read_text()).get("variants", {}) if report.is_file() else {}
    measured = next((v.get("providers_p50_ms") for v in variants.values()
                     if isinstance(v, dict) and Path(str(v.get("path", ""))).name == path.name and v.get("providers_p50_ms")), None)
    measured = {k: v for k, v in (measured or {}).items() if k in installed}
    if not measured:
        return "cpu", f"no provider measurements for {path.name} in {report}"
    fastest = min(measured, key=measured.get)
    return fastest, "fastest in " + ", ".join(f"{k} {v:.2f} ms" for k, v in measured.items()) + f" (batch-1 p50, {report})"


OPENVINO_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-openvino (it replaces onnxruntime), or "
                 "docker build --build-arg PROVIDER=openvino; or serve with --provider cpu")


def check_agreement(model: OnnxClassifier, reference: OnnxClassifier) -> dict:
    """The file's own sample inputs through ``model``'s provider and through ``reference`` (the same
    file on the CPU provider): top-1 must agree on every sample and probabilities within
    AGREEMENT_MAX_PROB_DIFF, or FtdeployError."""
    samples = model.samples()
    provider = model.session.get_providers()[0]
    if samples is None:
        raise FtdeployError(f"{model.path} carries no sample inputs to check {provider} against the CPU provider",
                            "export it again with this version of ftdeploy, or serve with --provider cpu")
    expected, logits = reference.logits(samples), model.logits(samples)
    result = {"samples": len(samples), "top1_agreement": float((logits.argmax(-1) == expected.argmax(-1)).mean()),
              "max_abs_logit_diff": float(np.abs(logits - expected).max()),
              "max_prob_diff": float(np.abs(softmax(logits) - softmax(expected)).max())}
    if result["top1_agreement"] < 1 or result["max_prob_diff"] > AGREEMENT_MAX_PROB_DIFF:
        raise FtdeployError(f"{provider} disagrees with the CPU provider on the file's {len(samples)} sample inputs: "
                            f"top-1 agreement {result['top1_agreement']:.0%}, max probability difference "
                            f"{result['max_prob_diff']:.3f} (allowed {AGREEMENT_MAX_PROB_DIFF})", "serve with --provider cpu")
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
        print("stopped during start-up", flush=True)
        return
    sock = listening_socket(options.host, options.port, reuse_port=options.workers > 1)
    sock.listen(2048)
    config = uvicorn.Config(app, log_level="info", access_log=False, timeout_graceful_shutdown=30)
    DrainingServer(config, lifecycle, options.drain_seconds, stop_asked).run(sockets=[sock])
    if lifecycle.failed:
        raise ServiceError(lifecycle.failed, "see the log above; the process exits so that it is restarted")


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
        OnnxClassifier(options.model_path, 1)
        choose_provider(options.model_path, options.provider)
        listening_socket(options.host, options.port, reuse_port=False).close()
        os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when a worker imports it
        procs += [context.Process(target=run_worker, args=(options, stop), name=f"ftdeploy-worker-{i}")
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
        print(f"{workers} workers: pids {', '.join(str(p.pid) for p in procs)}", flush=True)
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
