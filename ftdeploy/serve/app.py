"""The serving app: FastAPI over the versions a :class:`~.repository.Repository` serves, each with its
own onnxruntime session and micro-batcher.

The ONNX file alone carries what serving needs (its task, label names, preprocessing or tokenizer,
what its postprocessing reads, and the answers its sample inputs should get). The server keeps HTTP,
batching and the lifecycle; the task's codec turns a request's bytes (``/v1``) or tensors (``/v2``,
the Open Inference Protocol: :mod:`.protocol`) into inputs and predictions into the answer, and the
task's postprocess turns raw outputs into predictions. Concurrent requests are gathered into
micro-batches. Bad input gets a 4xx JSON error and never disturbs other requests; an overloaded
server says so (503 with Retry-After) instead of queueing without end.

Example::

    app = create_app("runs/digits/export/model.onnx")    # one file: model "model", version 1
    app = create_app("models/", poll_seconds=10)          # a repository: models/<model>/<version>/
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from ..codecs import Limits
from ..errors import FtdeployError, RequestError
from ..latency import PROVIDERS
from ..machine import physical_cores, usable_cpus
from ..onnx_model import OnnxModel
from .batching import Lifecycle, MicroBatcher, Stats
from .handling import LingeringClose, holding, prepared, read_body
from .protocol import add_protocol_routes, protocol_error
from .providers import check_agreement, choose_provider
from .repository import Repository, Version, VersionPolicy

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger(__name__)


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


def markdown(text: str) -> str:
    """Text for /docs, which renders Markdown: ``<base64>`` would vanish as an HTML tag."""
    return text.replace("<", "&lt;")


def intra_op_threads(asked: int | None, workers: int = 1) -> tuple[int, str]:
    """onnxruntime intra-op threads per worker, and why: ``--threads``, else the physical cores this
    process may use (its affinity mask and its cgroup's CPU quota, whichever is smaller: onnxruntime
    itself sizes its pool from the host) shared among the workers."""
    if asked:
        return asked, "--threads"
    cores = physical_cores()
    return max(1, cores // workers), f"{cores} usable physical core(s) / {workers} worker(s): {usable_cpus()[1]}"


def create_app(model_path: str | Path, threads: int | None = None, max_batch_size: int = 16, max_wait_ms: float = 2.0,
               limits: Limits = Limits(), warmup_runs: int = 3, provider: str = "cpu",
               lifecycle: Lifecycle | None = None, process_per_core: bool = False, max_queue: int = 256,
               request_timeout: float | None = 30.0, version_policy: str = "latest:1", poll_seconds: float = 0.0,
               model_name: str | None = None, threads_reason: str | None = None) -> FastAPI:
    """The serving app for one ONNX file or a model repository (:mod:`.repository`), its versions
    loaded and checked now, so that a bad file fails before the server binds.
    ``provider``: ``cpu``, ``openvino`` or ``auto`` (see :func:`choose_provider`);
    ``process_per_core``: worker processes cover every core (see :meth:`MicroBatcher._run_inline`);
    ``max_queue``: requests that may wait for a version (then 503); ``request_timeout``: seconds a
    request may wait for its answer (then 504); ``version_policy``: ``latest:N`` or ``all``;
    ``poll_seconds``: how often a repository is read for new versions (0: never);
    ``model_name``: the name one file is served under (default: the file's name without .onnx)."""
    from .. import __version__

    if threads is None or threads_reason is None:
        threads, threads_reason = intra_op_threads(threads)
    log.info("onnxruntime intra-op threads: %d (%s)", threads, threads_reason)
    metrics = Metrics(max_batch_size)
    state = lifecycle or Lifecycle()
    settings = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                "request_timeout": request_timeout}

    def load(name: str, number: int, path: Path) -> Version:
        """Open one version's file on its provider and check it (blocking)."""
        chosen, why = choose_provider(path, provider)
        model = OnnxModel(path, threads, providers=[PROVIDERS[chosen]])
        agreement = None
        if chosen != "cpu":
            reference = OnnxModel(path, threads)  # the CPU provider: the check's reference, the fallback
            try:
                agreement = check_agreement(model, reference)
            except FtdeployError as e:
                if provider != "auto":
                    raise
                log.warning("--provider auto: %s; serving on cpu", e)
                chosen, why, model = "cpu", str(e), reference
        check = model.check_answers()
        log.info("%s version %d: %s, provider %s (%s); self-check %s", name, number, path, chosen, why,
                 f"passed (max |diff| {check['max_abs_diff']:.3g} <= {check['tolerance']:.3g})" if check["checked"]
                 else f"skipped: {check['reason']}")
        batcher = MicroBatcher(model, metrics, max_batch_size, max_wait_ms, process_per_core, max_queue, state)
        info = {"model_name": name, "model_version": str(number), "task": model.task.name, "classes": model.classes,
                "input_size": getattr(model.preprocessing, "input_size", None),
                "preprocessing": {k: v for k, v in model.preprocessing.to_dict().items() if k != "tokenizer"},
                "variant": model.metadata.get("variant"),
                "source_run": model.metadata.get("source_run"), "model": model.metadata.get("model"),
                "exported_by": model.metadata.get("version"), "server_version": __version__, "file": str(model.path),
                **settings, "limits": limits.__dict__,
                # fitted by `ftdeploy report --calibrate` and stored in the file: probabilities that mean what they say
                "temperature": float(model.metadata.get("temperature") or 1.0),
                "provider": chosen, "provider_reason": why, "provider_agreement": agreement, "self_check": check,
                "threads": threads, "threads_reason": threads_reason, "pid": os.getpid()}
        return Version(name, number, path, model, batcher, info)

    async def activate(version: Version) -> None:
        """Start a version's batcher and warm it up: it takes traffic only after this."""
        version.batcher.start()
        model = version.onnx
        dummy = model.preprocess(model.task.codec.warmup(model.preprocessing))
        for _ in range(warmup_runs):
            await version.batcher.infer(dummy)
        version.batcher.stats = Stats()  # what requests cost, not the warm-up

    repository = Repository.open(model_path, load, activate, VersionPolicy.parse(version_policy), model_name, poll_seconds)

    async def start() -> None:
        await repository.start()
        state.ready = True

    @asynccontextmanager
    async def lifespan(_app):
        starting = asyncio.get_running_loop().create_task(start())
        yield
        starting.cancel()
        await repository.stop()

    first = repository.serving()[0].onnx
    names = ", ".join(f"{v.model} v{v.number} ({v.onnx.task.description.lower()}, {v.onnx.path.name})"
                      for v in repository.serving())
    app = FastAPI(title="ftdeploy model server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=f"Serving {names}. /v1: this project's API; /v2: the Open Inference Protocol "
                              f"(KServe V2, as Triton speaks it). {markdown(first.task.codec.accepts)}")
    app.state.repository, app.state.lifecycle = repository, state  # for callers who embed the app
    app.add_middleware(RequestMetrics, metrics=metrics, lifecycle=state)
    app.add_middleware(LingeringClose)
    add_docs(app)

    def failure(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        """An error in the shape of the protocol the request spoke."""
        if request.url.path.startswith("/v2"):
            return protocol_error(status, message, headers)
        return error_response(status, code, message, headers)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return failure(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                             + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
                             for e in exc.errors())
        return failure(request, 422, "invalid_parameter", problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return failure(request, exc.status_code, code, str(exc.detail), exc.headers)

    @app.get("/healthz", tags=["server"])
    async def healthz():
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["server"])
    async def readyz():
        """Ready: every model's versions are loaded and have answered their warm-up requests, the
        server is not draining (after SIGTERM it answers 503 here at once, and still answers
        requests) and its micro-batchers run (``failed`` says why when one stopped)."""
        ready = state.ready and not state.draining and state.failed is None
        return JSONResponse({"ready": ready, "draining": state.draining, "failed": state.failed},
                            status_code=200 if ready else 503)

    @app.get("/v1/model", tags=["v1"])
    async def model_info():
        """The only model's served version (several models: each one's, by name)."""
        if len(repository.models) == 1:
            return repository.get(repository.only()).info
        return {"models": {name: repository.get(name).info for name in repository.models if repository.models[name]}}

    @app.get("/v1/models/{name}", tags=["v1"])
    async def named_model_info(name: str):
        return repository.get(name).info

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"])
    async def prometheus():
        """Prometheus metrics, of every worker process."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    codec = first.task.codec  # /docs shows the first model's request and answer; every model's codec serves its own
    predict_doc = dict(responses={200: {"content": {"application/json": {"schema": codec.response_schema}}}, **ERRORS},
                       openapi_extra={"requestBody": codec.request_body, "parameters": query_parameters(codec.params)})

    async def predict(request: Request, name: str) -> JSONResponse:
        served = repository.get(name)
        model = served.onnx
        codec = model.task.codec
        params = parse_params(codec.params, request.query_params)
        with holding(served):
            body = await read_body(request, limits.max_request_bytes)
            batch = await prepared(served, codec.parse(body, request.headers.get("content-type", ""), limits))
            outputs = await served.batcher.infer(batch, request_timeout)
        predictions = model.task.postprocess(outputs, batch, model.info)
        # A plain JSONResponse: FastAPI's encoder walk over the result costs more than the model at this size.
        return JSONResponse(codec.respond(predictions, params, model.info),
                            headers={"x-model-name": served.model, "x-model-version": served.name})

    @app.post("/v1/predict", description=f"The repository's only model. {markdown(codec.accepts)}", tags=["v1"],
              **predict_doc)
    async def predict_only(request: Request):
        return await predict(request, repository.only())

    @app.post("/v1/models/{name}/predict", description=f"The latest version of a named model. {markdown(codec.accepts)}",
              tags=["v1"], **predict_doc)
    async def predict_named(request: Request, name: str):
        return await predict(request, name)

    add_protocol_routes(app, repository, state, limits, request_timeout, settings)
    return app
