"""The Open Inference Protocol (KServe V2) over REST, beside ``/v1``: what Triton, KServe, OpenVINO Model
Server and their clients (``tritonclient.http``, KServe's ``InferenceRESTClient``, perf_analyzer) speak.

Endpoints: ``/v2/health/live``, ``/v2/health/ready``, ``/v2`` (server metadata), ``/v2/models/{m}
[/versions/{v}]`` (model metadata), ``.../ready``, ``.../infer``, ``.../config`` (Triton's model
configuration), ``.../stats`` (Triton's statistics) and ``/v2/repository/index``. Errors are the
protocol's ``{"error": "<message>"}`` with the status ``/v1`` uses for the same fault.

Extensions: binary tensor data (``Inference-Header-Content-Length``, ``binary_data_size``,
``binary_data``/``binary_data_output``) and classification (``"parameters": {"classification": k}``
on an output answers BYTES ``"score:index:label"``). What an input takes and an output holds is the
task's (its codec's tensor side): image models take their FP32 input tensor, preprocessed, or BYTES
holding encoded images; text models BYTES strings; detectors answer padded boxes, scores and labels
and a ``num_detections`` count.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from .. import __version__
from ..codecs import DATATYPES, Limits, Tensor
from ..errors import BadInput, RequestError
from .batching import Lifecycle
from .handling import holding, prepared, read_body, timed
from .repository import Repository, Version

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics", "model_configuration"]
PLATFORM = "onnxruntime_onnx"


def protocol_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The protocol's error shape: ``{"error": "<message>"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- tensors on the wire ----------------------------------------------------------------------------
def split_bytes(buffer: bytes, name: str) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then that many bytes.

    >>> split_bytes(join_bytes([b"ab", b""]), "x")
    [b'ab', b'']
    """
    items, at = [], 0
    while at < len(buffer):
        if at + 4 > len(buffer):
            raise BadInput(400, "invalid_tensor", f"input {name!r}: BYTES data ends inside an element's length")
        size = int.from_bytes(buffer[at:at + 4], "little")
        if at + 4 + size > len(buffer):
            raise BadInput(400, "invalid_tensor", f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        items.append(bytes(buffer[at + 4:at + 4 + size]))
        at += 4 + size
    return items


def join_bytes(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def _flat(data: Any) -> list:
    """JSON tensor data, nested by shape (row-major) or flat, as one flat list."""
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_bytes(item: Any, name: str) -> bytes:
    """A BYTES element sent in JSON: a string (its UTF-8), or ``{"b64": ...}`` (OpenVINO Model Server's form)."""
    import base64
    import binascii

    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, dict) and isinstance(item.get("b64"), str):
        try:
            return base64.b64decode(item["b64"], validate=True)
        except binascii.Error:
            raise BadInput(400, "invalid_base64", f"input {name!r}: a b64 element is not valid base64") from None
    raise BadInput(400, "invalid_tensor", f"input {name!r}: a BYTES element must be a string or {{\"b64\": \"...\"}}")


def input_tensor(entry: Any, binary: memoryview, at: int) -> tuple[Tensor, int]:
    """One input of an inference request (its JSON entry; its data in JSON or in ``binary`` from ``at``)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise BadInput(400, "invalid_tensor", 'each input must be {"name", "shape", "datatype", "data"}')
    name, datatype, shape = entry["name"], entry.get("datatype"), entry.get("shape")
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise BadInput(400, "invalid_datatype", f"input {name!r}: datatype {datatype!r} is not known (known: "
                       f"{', '.join([*DATATYPES, 'BYTES'])})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadInput(400, "invalid_shape", f"input {name!r}: shape must be a list of non-negative integers; got {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    parameters = entry.get("parameters") or {}
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or at + size > len(binary):
            raise BadInput(400, "invalid_tensor", f"input {name!r}: binary_data_size {size!r} runs past the "
                           f"{len(binary)} bytes of binary data after the JSON header")
        chunk, at = binary[at:at + size], at + size
        if datatype == "BYTES":
            data: Any = split_bytes(chunk, name)
        else:
            dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
            if size != count * dtype.itemsize:
                raise BadInput(400, "invalid_tensor", f"input {name!r}: {size} bytes of binary data for shape {shape} "
                               f"of {datatype} ({count * dtype.itemsize} bytes)")
            data = np.frombuffer(chunk, dtype).reshape(shape)
    elif "data" in entry:
        flat = _flat(entry["data"])
        if datatype == "BYTES":
            data = [_json_bytes(item, name) for item in flat]
        else:
            try:
                data = np.asarray(flat, DATATYPES[datatype])
            except (TypeError, ValueError, OverflowError):
                raise BadInput(400, "invalid_tensor", f"input {name!r}: its data are not all {datatype}") from None
    else:
        raise BadInput(400, "invalid_tensor", f"input {name!r} has neither data nor parameters.binary_data_size")
    elements = len(data) if isinstance(data, list) else data.size
    if elements != count:
        raise BadInput(400, "invalid_shape", f"input {name!r}: {elements} elements for shape {shape} ({count})")
    if not isinstance(data, list):
        data = data.reshape(shape)
    return Tensor(name, datatype, shape, data, parameters), at


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], list[Tensor]]:
    """An inference request: its JSON header and its input tensors (binary data after the header when
    ``Inference-Header-Content-Length`` says where the header ends)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadInput(400, "invalid_body", f"Inference-Header-Content-Length {header_length!r} is not a length "
                           f"within the {len(body)}-byte body")
        cut = int(header_length)
    else:
        cut = len(body)
    try:
        header = json.loads(bytes(body[:cut]))
    except ValueError as e:
        raise BadInput(400, "invalid_body", f"the inference request's JSON cannot be parsed: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise BadInput(400, "invalid_body", 'an inference request is {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    binary, at, tensors = memoryview(body)[cut:], 0, []
    for entry in header["inputs"]:
        tensor, at = input_tensor(entry, binary, at)
        tensors.append(tensor)
    if at != len(binary):
        raise BadInput(400, "invalid_body", f"{len(binary) - at} bytes of binary data after the JSON header belong to no input")
    for key in ("outputs", "parameters"):
        if key in header and not isinstance(header[key], (list if key == "outputs" else dict)):
            raise BadInput(400, "invalid_body", f"the request's {key!r} must be a {'list' if key == 'outputs' else 'object'}")
    return header, tensors


def encode_response(header: dict[str, Any], tensors: list[tuple[Tensor, bool]]) -> tuple[bytes, dict[str, str]]:
    """An inference response: its JSON header, then the binary data of the outputs asked for in binary."""
    outputs, chunks = [], []
    for tensor, binary in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.parameters:
            entry["parameters"] = dict(tensor.parameters)
        if binary:
            raw = (join_bytes(tensor.data) if tensor.datatype == "BYTES"
                   else np.ascontiguousarray(tensor.data, np.dtype(DATATYPES[tensor.datatype]).newbyteorder("<")).tobytes())
            entry.setdefault("parameters", {})["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = ([b.decode("utf-8", "replace") for b in tensor.data] if tensor.datatype == "BYTES"
                             else np.asarray(tensor.data).ravel().tolist())
        outputs.append(entry)
    body = json.dumps({**header, "outputs": outputs}, separators=(",", ":")).encode()
    if not chunks:
        return body, {"content-type": "application/json"}
    return body + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(body))}


# --- metadata -----------------------------------------------------------------------------------------
def model_metadata(version: Version, versions: list[str]) -> dict[str, Any]:
    codec, model = version.onnx.task.codec, version.onnx
    return {"name": version.model, "versions": versions, "platform": PLATFORM,
            "inputs": [s.as_dict() for s in codec.tensor_inputs(model)],
            "outputs": [s.as_dict() for s in codec.tensor_outputs(model.info)]}


def _config_tensor(spec) -> dict[str, Any]:
    """A tensor of Triton's model configuration: dims without the batch axis; a per-input scalar (text)
    as dims [1] reshaped to [] (Triton's way of saying shape [N])."""
    dims = list(spec.shape[1:])
    entry: dict[str, Any] = {"name": spec.name, "data_type": "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}",
                             "dims": dims or [1]}
    if not dims:
        entry["reshape"] = {"shape": []}
    return entry


def model_config(version: Version, settings: dict[str, Any]) -> dict[str, Any]:
    """Triton's minimal model configuration, which perf_analyzer and other tools read. ftdeploy's
    batcher settings differ in meaning from Triton's settings of similar names, so they travel as
    ``parameters`` under their own names (README: how each maps): ``dynamic_batching`` only says
    that requests are batched together."""
    codec, model = version.onnx.task.codec, version.onnx
    config: dict[str, Any] = {
        "name": version.model, "platform": PLATFORM, "backend": "onnxruntime", "version_policy": settings["version_policy"],
        "max_batch_size": settings["max_batch_size"],
        "input": [_config_tensor(s) for s in codec.tensor_inputs(model)],
        "output": [_config_tensor(s) for s in codec.tensor_outputs(model.info)],
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
        "parameters": {f"ftdeploy_{k}": {"string_value": str(v)} for k, v in settings.items()
                       if k not in ("max_batch_size", "version_policy")}}
    if settings["max_batch_size"] > 1:
        config["dynamic_batching"] = {}
    return config


def _policy(text: str) -> dict[str, Any]:
    kind, _, count = text.partition(":")
    return {"all": {}} if kind == "all" else {"latest": {"num_versions": int(count or 1)}}


# --- routes -------------------------------------------------------------------------------------------
def add_protocol_routes(app: FastAPI, repository: Repository, lifecycle: Lifecycle, limits: Limits,
                        request_timeout: float | None, settings: dict[str, Any]) -> None:
    """The ``/v2`` routes over ``repository``. ``settings``: the batcher settings ``/config`` shows."""
    settings = {**settings, "version_policy": _policy(str(repository.policy))}

    def ready() -> bool:
        return lifecycle.ready and not lifecycle.draining and lifecycle.failed is None

    @app.get("/v2/health/live", tags=["v2"])
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2"])
    async def server_ready():
        """Ready to take inference requests: KServe's client reads the body, tritonclient the status."""
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2", tags=["v2"])
    async def server_metadata():
        return {"name": "ftdeploy", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/repository/index", tags=["v2"])
    @app.post("/v2/repository/index", tags=["v2"], operation_id="repository_index_post")
    async def repository_index():
        """Every version the repository holds: READY, or UNAVAILABLE with the reason it was refused
        (tritonclient POSTs here, as Triton's extension defines it)."""
        return repository.index()

    def versions_of(name: str) -> list[str]:
        return [str(n) for n in sorted(repository.models.get(name, {}))]

    @app.get("/v2/models/{name}", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"])
    async def metadata(name: str, version: str | None = None):
        return model_metadata(repository.get(name, version), versions_of(name))

    @app.get("/v2/models/{name}/ready", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"])
    async def model_ready(name: str, version: str | None = None):
        repository.get(name, version)  # 404 for a model or version not loaded
        return JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 503)

    @app.get("/v2/models/{name}/config", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/config", tags=["v2"])
    async def config(name: str, version: str | None = None):
        return model_config(repository.get(name, version), settings)

    @app.get("/v2/models/{name}/stats", tags=["v2"])
    @app.get("/v2/models/{name}/versions/{version}/stats", tags=["v2"])
    async def stats(name: str, version: str | None = None):
        """Triton's statistics of the versions asked for, in the process that answers (with
        ``--workers N``, one worker's; /metrics adds them all up)."""
        chosen = [repository.get(name, version)] if version else list(repository.models.get(name, {}).values())
        if not chosen:
            repository.get(name)  # 404 or 503, with the reason
        return {"model_stats": [{"name": v.model, "version": v.name, **v.batcher.stats.as_dict()} for v in chosen]}

    @app.post("/v2/models/{name}/infer", tags=["v2"])
    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"])
    async def infer(request: Request, name: str, version: str | None = None):
        """An inference request: JSON, or JSON then binary tensor data (``Inference-Header-Content-Length``)."""
        started = time.perf_counter_ns()
        served = repository.get(name, version)
        try:
            with holding(served):
                body = await read_body(request, limits.max_request_bytes)
                answer, headers = await infer_once(served, body, request.headers.get(HEADER_LENGTH))
        except RequestError:
            served.batcher.stats.add("fail", time.perf_counter_ns() - started)
            raise
        served.batcher.stats.add("success", time.perf_counter_ns() - started)
        return Response(answer, headers=headers)

    async def infer_once(served: Version, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        model = served.onnx
        task, codec = model.task, model.task.codec
        with timed(served, "compute_input"):
            header, tensors = parse_request(body, header_length)
            parsed = codec.from_tensors(tensors, model, limits)
            requested = header.get("outputs")
            params = request_params(codec, header.get("parameters") or {})
            batch = await prepared(served, parsed)
        outputs = await served.batcher.infer(batch, request_timeout)
        with timed(served, "compute_output"):
            predictions = task.postprocess(outputs, batch, model.info)
            produced = codec.to_tensors(predictions, params, model.info)
            binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
            chosen = []
            for entry in requested if requested is not None else [{"name": n} for n in produced]:
                if not isinstance(entry, dict) or entry.get("name") not in produced:
                    raise BadInput(400, "invalid_output", f"output {entry.get('name') if isinstance(entry, dict) else entry!r} "
                                   f"is not one of this model's ({', '.join(produced)})")
                options = entry.get("parameters") or {}
                tensor = produced[entry["name"]]
                k = options.get("classification")
                if k is not None:
                    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                        raise BadInput(400, "invalid_parameter", f"output {entry['name']!r}: classification must be a "
                                       f"positive integer; got {k!r}")
                    rows = codec.classify(predictions, entry["name"], k, model.info)
                    tensor = Tensor(entry["name"], "BYTES", [len(rows), len(rows[0]) if rows else 0],
                                    [s.encode() for row in rows for s in row])
                chosen.append((tensor, bool(options.get("binary_data", binary_default))))
            answer = {"model_name": served.model, "model_version": served.name}
            if "id" in header:
                answer["id"] = header["id"]
            if parsed.notes:
                answer["parameters"] = parsed.notes
            return encode_response(answer, chosen)


def request_params(codec, parameters: dict[str, Any]) -> Any:
    """The codec's answer parameters (a detector's ``score_threshold``...) from the request's
    ``parameters``; the protocol's own there (``binary_data_output``, ``timeout``...) are not the codec's."""
    from pydantic import ValidationError

    if codec.params is None:
        return None
    fields = codec.params.model_fields
    try:
        return codec.params.model_validate({k: v for k, v in parameters.items() if k in fields})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise BadInput(400, "invalid_parameter", problems) from None
