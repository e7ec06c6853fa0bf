"""What a request may hold and how its bytes become inputs: the per-request limits, the decoding
helpers every task's codec shares, and the codec itself (a task's request side and response side in
one object). HTTP-free: bytes and a content type in, a batch out; predictions in, JSON-able values
out. The server (``ftdeploy.serve``) reads bodies, batches and answers; the tasks never import it.

>>> image_blobs(b'{"images": ["aGk="]}', "application/json", Limits())
[b'hi']
>>> image_blobs(b"", "text/csv", Limits())
Traceback (most recent call last):
...
ftdeploy.errors.BadInput: content type 'text/csv' is not accepted; send multipart/form-data, application/json with base64 images, or a raw image body
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import BadInput


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # Pillow's own bomb guard is 89M; a classifier never needs that much
    max_images: int = 32  # inputs per request: images, or texts
    max_request_bytes: int = 32 * 2**20  # counted on the bytes read, so chunked uploads are held to it too


IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff", "application/octet-stream")
TEXT_TYPES = ("application/json", "text/plain")


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise BadInput(400, "invalid_body", f"the request body cannot be parsed: {e}") from None


def utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(400, "invalid_encoding", f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[bytes]:
    """The file parts of a multipart/form-data body (python-multipart's parser, fed the bytes read)."""
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadInput(400, "invalid_body", "a multipart body needs a boundary in its Content-Type")
    files: list[bytes] = []
    part: dict[str, Any] = {}

    def header(name: str):
        def on(data: bytes, start: int, end: int) -> None:
            part[name] = part.get(name, b"") + data[start:end]
        return on

    def header_end() -> None:
        if part.get("field", b"").strip().lower() == b"content-disposition":
            part["disposition"] = part.get("value", b"")
        part["field"] = part["value"] = b""

    def begin() -> None:
        part.clear()
        part["data"] = bytearray()

    def data(chunk: bytes, start: int, end: int) -> None:
        part["data"] += chunk[start:end]

    def end() -> None:
        if b"filename=" in part.get("disposition", b""):
            files.append(bytes(part["data"]))
            if len(files) > max_files:
                raise BadInput(413, "too_many_images", f"the request holds more than {max_files} images; "
                               f"the limit is {max_files}")

    parser = MultipartParser(boundary, {"on_part_begin": begin, "on_part_data": data, "on_part_end": end,
                                        "on_header_field": header("field"), "on_header_value": header("value"),
                                        "on_header_end": header_end})
    try:
        parser.write(body)
    except BadInput:
        raise
    except Exception as e:  # the parser raises its own error types on a malformed stream
        raise BadInput(400, "invalid_body", f"the request body cannot be read ({type(e).__name__}: {e})") from None
    if parser.state != MultipartState.END:
        raise BadInput(400, "invalid_body", "the multipart body is truncated (no closing boundary)")
    return files


def image_blobs(body: bytes, content_type: str, limits: Limits) -> list[bytes]:
    """The image files a request holds: a multipart upload, JSON ``{"images": [base64, ...]}`` or a raw
    image body; a BadInput for anything else."""
    ctype = media_type(content_type)
    if ctype == "multipart/form-data":
        blobs = multipart_files(body, content_type, limits.max_images)
    elif ctype == "application/json":
        payload = parse_json(body)
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise BadInput(400, "invalid_json", 'JSON bodies must be {"images": ["<base64>", ...]}')
        try:
            blobs = [base64.b64decode(i, validate=True) for i in images]
        except binascii.Error:
            raise BadInput(400, "invalid_base64", "an image in the JSON body is not valid base64") from None
    elif ctype in IMAGE_TYPES:
        blobs = [body]
    else:
        raise BadInput(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'!r} is not accepted; send multipart/form-data, "
                       "application/json with base64 images, or a raw image body")
    if not blobs:
        raise BadInput(400, "no_images", "the request holds no image")
    if len(blobs) > limits.max_images:
        raise BadInput(413, "too_many_images", f"the request holds {len(blobs)} images; the limit is {limits.max_images}")
    return blobs


def open_image(data: bytes, limits: Limits):
    """Bytes -> an image whose header has been read and checked (size, pixels, bombs); nothing decoded yet."""
    from PIL import Image

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


def decode_image(img):
    """Decode an opened image fully, or a BadInput saying why it cannot be."""
    try:
        img.load()
    except Exception as e:
        raise BadInput(400, "invalid_image", f"not a decodable image ({type(e).__name__}: {e})") from None
    return img


def texts_of(body: bytes, content_type: str, limits: Limits) -> list[str]:
    """The texts a request holds: JSON ``{"text": ...}`` or ``{"texts": [...]}``, or a text/plain body."""
    ctype = media_type(content_type)
    if ctype not in TEXT_TYPES:
        raise BadInput(415, "unsupported_media_type", f"content type {ctype or '(none)'!r} is not accepted; send "
                       'application/json {"text": ...} or {"texts": [...]}, or a text/plain body')
    decoded = utf8(body)
    return checked_texts([decoded] if ctype == "text/plain" else json_texts(parse_json(decoded)), limits)


def json_texts(payload: Any) -> list:
    """The texts of a parsed JSON body, ``{"text": ...}`` or ``{"texts": [...]}`` (not checked yet)."""
    if isinstance(payload, dict) and len(payload) == 1 and "text" in payload:
        return [payload["text"]]
    if isinstance(payload, dict) and len(payload) == 1 and isinstance(payload.get("texts"), list):
        return payload["texts"]
    raise BadInput(400, "invalid_json", 'JSON bodies must be {"text": "..."} or {"texts": ["...", ...]}')


def checked_texts(texts: list, limits: Limits) -> list[str]:
    """Texts of a request held to the limits: at least one, at most ``max_images``, each a non-empty string."""
    if not texts:
        raise BadInput(400, "no_texts", "the request holds no text")
    if len(texts) > limits.max_images:
        raise BadInput(413, "too_many_texts", f"the request holds {len(texts)} texts; the limit is "
                       f"{limits.max_images} (--max-images)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadInput(400, "invalid_text", f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise BadInput(400, "empty_text", f"text {i} is empty")
    return texts


@dataclass
class Parsed:
    """A request after its cheap checks: the raw inputs, not yet decoded or preprocessed. ``decode``
    does the rest (decoding images, tokenizing); ``work`` is how much of it there is (pixels), so
    the server can keep a huge image off its event loop. A request that sent the model's input
    tensor itself (the Open Inference Protocol) carries it as ``batch`` instead: nothing to decode."""

    raw: list
    decode: Callable[[Any], Any]  # raw item -> what the task's preprocess takes
    work: int = 0
    context: Any = None  # what the response needs of the request (e.g. original sizes)
    batch: Any = None  # the model's inputs, as sent
    notes: dict[str, Any] = field(default_factory=dict)  # what the answer should say of how it was made


# --- tensors of the Open Inference Protocol (KServe V2), HTTP-free ---------------------------------
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
             "FP32": np.float32, "FP64": np.float64}  # and BYTES: a list of byte strings


@dataclass
class Tensor:
    """One tensor of a request or an answer: numbers as a numpy array of ``shape``, BYTES as a flat list
    of byte strings (encoded images, UTF-8 texts, JSON)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any  # np.ndarray, or list[bytes] for BYTES
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as model metadata declares it: -1 for a dynamic dimension (the batch first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: str = ""  # what else the input takes, for the docs (e.g. BYTES holding encoded images)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def one_input(tensors: list[Tensor], specs: list[TensorSpec]) -> Tensor:
    """The request's one input tensor, named as the model metadata names it; a BadInput otherwise."""
    names = [spec.name for spec in specs]
    if len(tensors) != 1 or tensors[0].name not in names:
        got = ", ".join(t.name for t in tensors) or "none"
        raise BadInput(400, "invalid_input", f"this model takes one input tensor named {' or '.join(names)!r}; got {got}")
    return tensors[0]


def batch_of(tensor: Tensor, limits: Limits) -> int:
    """The batch size of an input tensor (its first dimension), held to ``limits.max_images``."""
    if not tensor.shape or tensor.shape[0] < 1:
        raise BadInput(400, "invalid_shape", f"input {tensor.name!r} has shape {tensor.shape}; its first dimension is "
                       "the batch and must be at least 1")
    if tensor.shape[0] > limits.max_images:
        raise BadInput(413, "too_many_inputs", f"input {tensor.name!r} holds {tensor.shape[0]} inputs; the limit is "
                       f"{limits.max_images} (--max-images)")
    return tensor.shape[0]


def byte_items(tensor: Tensor, limits: Limits, what: str) -> list[bytes]:
    """The elements of a BYTES input of shape [N] or [N, 1]: one ``what`` each."""
    if tensor.datatype != "BYTES":
        raise BadInput(400, "invalid_datatype", f"input {tensor.name!r} must be BYTES ({what}); got {tensor.datatype}")
    n = batch_of(tensor, limits)
    if list(tensor.shape) not in ([n], [n, 1]):
        raise BadInput(400, "invalid_shape", f"input {tensor.name!r} holds one {what} per element: shape [N] or "
                       f"[N, 1]; got {tensor.shape}")
    return list(tensor.data)


def float_batch(tensor: Tensor, spec: TensorSpec, limits: Limits) -> np.ndarray:
    """An FP32 input tensor, already preprocessed, checked against the declared shape (-1: any size)."""
    if tensor.datatype != "FP32":
        raise BadInput(400, "invalid_datatype", f"input {tensor.name!r} must be FP32 {list(spec.shape)} (preprocessed) "
                       f"or {spec.accepts or 'as declared'}; got {tensor.datatype}")
    batch_of(tensor, limits)
    fits = len(tensor.shape) == len(spec.shape) and all(d == s or s == -1 for d, s in zip(tensor.shape, spec.shape))
    if not fits:
        raise BadInput(400, "invalid_shape", f"input {tensor.name!r} has shape {tensor.shape}; this model takes "
                       f"{list(spec.shape)} (-1: any size)")
    return np.ascontiguousarray(tensor.data, np.float32)


class Codec:
    """A task's codec: ``requests`` (bytes and a content type -> raw inputs; OpenAPI request body)
    and ``responses`` (predictions -> JSON-able answers per input; query parameters and OpenAPI
    response schema)."""

    def __init__(self, requests, responses):
        self.requests, self.responses = requests, responses

    @property
    def accepts(self) -> str:
        return self.requests.accepts

    @property
    def request_body(self) -> dict[str, Any]:
        return self.requests.request_body

    @property
    def params(self):
        """A pydantic model of the query parameters (or None)."""
        return self.responses.params

    @property
    def response_schema(self) -> dict[str, Any]:
        return self.responses.schema

    def parse(self, body: bytes, content_type: str, limits: Limits) -> Parsed:
        return self.requests.parse(body, content_type, limits)

    def warmup(self, spec) -> list:
        """Raw inputs for warming a model up (before any request)."""
        return self.requests.warmup(spec)

    def encode(self, raw: list) -> tuple[bytes, str]:
        """The client's side: raw inputs as a request body and its content type."""
        return self.requests.encode(raw)

    def answer(self, model, raw: list, params: Any = None) -> dict[str, Any]:
        """What a server answers for ``raw`` (an ``OnnxModel``'s predictions through this codec), computed
        offline: the reference a server's answers are checked against."""
        batch = model.preprocess(raw)
        predictions = model.task.postprocess(model.outputs(batch), batch, model.info)
        params = params if params is not None else (self.params() if self.params else None)
        return self.respond(predictions, params, model.info)

    def respond(self, predictions: Any, params: Any, info: dict[str, Any]) -> dict[str, Any]:
        return self.responses.respond(predictions, params, info)

    # --- the Open Inference Protocol --------------------------------------------------------------
    def tensor_inputs(self, model) -> list[TensorSpec]:
        """The inputs model metadata declares for an ``OnnxModel``."""
        return self.requests.tensor_inputs(model)

    def from_tensors(self, tensors: list[Tensor], model, limits: Limits) -> Parsed:
        """A request's input tensors -> raw inputs to decode, or the model's inputs as sent (``batch``)."""
        return self.requests.from_tensors(tensors, model, limits)

    def tensor_outputs(self, info: dict[str, Any]) -> list[TensorSpec]:
        return self.responses.tensor_outputs(info)

    def encode_tensor(self, raw: list, model) -> Tensor:
        """The client's side: raw inputs as the BYTES input tensor (encoded images, UTF-8 texts)."""
        return self.requests.encode_tensor(raw, model)

    def to_tensors(self, predictions: Any, params: Any, info: dict[str, Any]) -> dict[str, Tensor]:
        """Predictions -> every output tensor the metadata declares, by name."""
        return self.responses.to_tensors(predictions, params, info)

    def classify(self, predictions: Any, output: str, k: int, info: dict[str, Any]) -> list[list[str]]:
        """The classification extension: the ``k`` best ``"score:index:label"`` per input, or a BadInput
        where the task's outputs are not one class score per label."""
        classify = getattr(self.responses, "classify", None)
        if classify is None:
            raise BadInput(400, "classification_unsupported", f"output {output!r}: the classification extension "
                           "needs one score per label and input; this model's outputs are not")
        return classify(predictions, k, info)

    def compare(self, got: Any, expected: Any) -> tuple[bool, int]:
        """Whether a served answer is the one computed offline (:meth:`answer`, default parameters):
        (the same, differences excused as near-ties). The task's responses say what "the same" is
        (a detector's boxes at IoU 0.99); by default, the same structure and strings, numbers within 1e-4."""
        compare = getattr(self.responses, "compare", None)
        return compare(got, expected) if compare is not None else (same_structure(got, expected), 0)


def same_structure(got: Any, expected: Any, tol: float = 1e-4) -> bool:
    """Two JSON answers alike: the same structure and strings, numbers within ``tol``.

    >>> same_structure({"a": [1.0, "x"]}, {"a": [1.00001, "x"]}), same_structure([1], [1, 2])
    (True, False)
    """
    if isinstance(expected, dict):
        return isinstance(got, dict) and got.keys() == expected.keys() and all(
            same_structure(got[k], expected[k], tol) for k in expected)
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(
            same_structure(g, e, tol) for g, e in zip(got, expected))
    if isinstance(expected, float) and isinstance(got, (int, float)):
        return abs(got - expected) <= tol
    return got == expected
