"""The server: its HTTP contract in-process (httpx's ASGI transport, the app's lifespan running), and
real uvicorn processes for what only a process shows: signals, drain, workers, ports, exit codes and
the torch-free install."""

import asyncio
import base64
import inspect
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, free_port

LIMITS = dict(max_image_bytes=60000, max_image_pixels=1000000, max_images=4)
LIMIT_FLAGS = ["--max-image-bytes", "60000", "--max-image-pixels", "1000000", "--max-images", "4"]


def png(seed: int, size=(24, 24)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def uniform_png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")  # many pixels in few bytes
    return buf.getvalue()


class InProcess:
    """The app on an event loop in a background thread, its lifespan entered (the batcher and the
    warm-up run), driven through httpx's ASGI transport: the HTTP contract without a process."""

    def __init__(self, app, wait_ready: bool = True):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lifespan = app.router.lifespan_context(app)
        self.call(self.lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in-process")
        deadline = time.time() + 60
        while wait_ready and self.get("/readyz").status_code != 200:
            assert time.time() < deadline, "not ready"
            time.sleep(0.01)

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.call(self.client.get(url, **kwargs))

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.call(self.client.post(url, **kwargs))

    def gather(self, requests: list[dict]) -> list[httpx.Response]:
        """Concurrent POSTs to /v1/predict, as many clients would send them."""
        async def everything():
            return await asyncio.gather(*(self.client.post("/v1/predict", **r) for r in requests))
        return self.call(everything())

    def close(self) -> None:
        self.call(self.client.aclose())
        self.call(self.lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def app_for(model_file, **kwargs):
    from ftdeploy.serve import Limits, create_app

    return create_app(model_file, threads=1, **{"limits": Limits(**LIMITS), **kwargs})


@pytest.fixture(scope="module")
def model_file(tiny_export):
    return tiny_export / "model.onnx"


@pytest.fixture(scope="module")
def served(model_file):
    server = InProcess(app_for(model_file))
    yield server
    server.close()


def offline(model_file, blobs):
    from ftdeploy.onnx_model import OnnxModel

    clf = OnnxModel(model_file, threads=1)
    return [clf.classes[i] for i in clf.predict([Image.open(io.BytesIO(b)) for b in blobs]).argmax(-1)]


def test_predict_multipart_and_json_match_offline(served, model_file):
    blobs = [png(i) for i in range(3)]
    r = served.post("/v1/predict?k=2", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p["top_k"]) == 2 for p in preds)
    assert [p["top_k"][0]["label"] for p in preds] == offline(model_file, blobs)
    assert all(1 >= p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] > 0 for p in preds)
    r = served.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert r.status_code == 200
    assert [p["top_k"][0]["label"] for p in r.json()["predictions"]] == offline(model_file, blobs)
    raw = served.post("/v1/predict", content=blobs[1], headers={"content-type": "image/png"})
    assert raw.json()["predictions"][0]["top_k"][0]["label"] == offline(model_file, blobs[1:2])[0]


def test_model_info_and_openapi(served, tiny_run, tiny_export):
    info = served.get("/v1/model").json()
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["input_size"] == 16 and info["variant"] == "fp32"
    assert info["source_run"] == os.path.relpath(tiny_run, tiny_export)  # relative to the file's folder
    assert info["max_queue"] == 256 and info["limits"]["max_request_bytes"] == 32 * 2**20
    assert "/v1/predict" in served.get("/openapi.json").json()["paths"]


def test_docs_page_loads_nothing_from_the_network(served):
    """Every script and stylesheet of /docs comes from the server itself (Swagger UI 5, OpenAPI 3.1)."""
    page = served.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for asset in assets:
        r = served.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "SwaggerUIBundle" in served.get("/docs/assets/swagger-ui-bundle.js").text
    assert served.get("/openapi.json").json()["openapi"].startswith("3.1")


@pytest.mark.parametrize("query", ["k=0", "k=abc"])
def test_a_bad_query_parameter_gets_the_error_shape_of_every_other_error(served, query):
    r = served.post(f"/v1/predict?{query}", files=[("files", ("ok.png", png(9), "image/png"))])
    assert r.status_code == 422
    assert set(r.json()) == {"error"} and r.json()["error"]["code"] == "invalid_parameter" and "k" in r.json()["error"]["message"]


def test_unknown_paths_and_methods_get_the_error_shape(served):
    missing = served.get("/v3/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    protocol = served.get("/v2/nothing")  # the Open Inference Protocol's own shape under /v2
    assert protocol.status_code == 404 and isinstance(protocol.json()["error"], str)
    wrong = served.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 M pixels in a few KB
    return buf.getvalue()


BAD = [
    ("not an image", {"files": [("files", ("x.png", b"hello, I am text", "image/png"))]}, 400, "invalid_image"),
    ("empty file", {"files": [("files", ("x.png", b"", "image/png"))]}, 400, "empty_image"),
    ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_image"),
    ("no images", {"json": {"images": []}}, 400, "no_images"),
    ("wrong content type", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("bad json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_body"),
    ("bad base64", {"json": {"images": ["***"]}}, 400, "invalid_base64"),
    ("too many bytes", {"files": [("files", ("big.png", png(1, (200, 200)), "image/png"))]}, 413, "image_too_large"),
    ("too many pixels", {"files": [("files", ("wide.png", uniform_png((1100, 1000)), "image/png"))]}, 413, "too_many_pixels"),
    ("decompression bomb", {"files": [("files", ("bomb.png", bomb(), "image/png"))]}, 413, "decompression_bomb"),
    ("too many images", {"files": [("files", (f"{i}.png", png(i), "image/png")) for i in range(5)]}, 413, "too_many_images"),
    ("truncated image", {"files": [("files", ("t.png", png(3)[:300], "image/png"))]}, 400, "invalid_image"),
    ("truncated multipart", {"content": b"--XYZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                             b"Content-Type: image/png\r\n\r\n\x89PNG", "headers": {"content-type": "multipart/form-data; boundary=XYZ"}},
     400, None),
    ("bad content-length", {"content": b"abc", "headers": {"content-type": "image/png", "content-length": "x"}}, 400,
     "invalid_body"),
]


@pytest.mark.parametrize("name,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_and_the_next_request_succeeds(served, name, kwargs, status, code):
    r = served.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    good = served.post("/v1/predict", files=[("files", ("ok.png", png(9), "image/png"))])
    assert good.status_code == 200


def test_a_chunked_upload_is_refused_once_it_passes_the_limit_and_the_rest_is_discarded(model_file):
    """No Content-Length: the limit (32 MB by default) holds on the bytes read (413 as it passes), and
    what the client still sends is read and thrown away, not stored, so that it can read its answer
    (the lingering close; its memory is measured by benchmarks/serve_limits.py)."""
    from ftdeploy.serve import create_app

    server = InProcess(create_app(model_file, threads=1))
    pulled = []

    async def chunks():  # 100 MB in 64 KB chunks, counted as the server pulls them
        for _ in range(1600):
            pulled.append(1)
            yield b"\0" * 65536

    try:
        r = server.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert "passed 33554432 bytes" in r.json()["error"]["message"]  # decided at the limit
        assert len(pulled) == 1600  # the rest was read to the end (and discarded), not left to a reset
        declared = server.post("/v1/predict", content=b"\0" * (32 * 2**20 + 1), headers={"content-type": "image/png"})
        assert declared.status_code == 413  # refused on its Content-Length, before reading
    finally:
        server.close()


def test_images_with_many_pixels_are_decoded_off_the_event_loop_whatever_their_bytes(model_file, monkeypatch):
    """A 3000x3000 PNG of one colour is a few KB: the decision to decode on the loop or in a thread
    is made on its pixel count, read from the header."""
    from PIL import ImageFile

    from ftdeploy import serve

    threads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: threads.append(threading.current_thread()) or load(img))
    server = InProcess(app_for(model_file, limits=serve.Limits(max_image_pixels=10_000_000)))
    try:
        big = uniform_png((3000, 3000))
        assert len(big) < 64 * 1024
        for body in (png(1), big):
            threads.clear()
            r = server.post("/v1/predict", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 200
            assert threads and all(t is server.thread for t in threads) == (body != big), body[:8]
    finally:
        server.close()


def test_metrics_count_requests_images_and_the_batches_run(model_file):
    server = InProcess(app_for(model_file, max_batch_size=8, max_wait_ms=20))
    runs = []
    model = server.app.state.repository.get("model").batcher.model
    outputs = model.outputs
    model.outputs = lambda batch: runs.append(len(batch)) or outputs(batch)
    try:
        blobs = [png(100 + i) for i in range(24)]
        responses = server.gather([{"files": {"f": ("a.png", b, "image/png")}} for b in blobs])
        assert [r.json()["predictions"][0]["top_k"][0]["label"] for r in responses] == offline(model_file, blobs)
        server.post("/v1/predict", content=b"nope", headers={"content-type": "text/plain"})
        text = server.get("/metrics").text
    finally:
        server.close()
    assert 'ftdeploy_requests_total{path="/v1/predict",status="200"} 24.0' in text
    assert 'ftdeploy_requests_total{path="/v1/predict",status="415"} 1.0' in text
    count = float(re.search(r"^ftdeploy_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^ftdeploy_batch_size_sum (\S+)$", text, re.M).group(1))
    assert (count, total) == (len(runs) + 3, sum(runs) + 3)  # every session run, plus the 3 warm-up runs
    assert sum(runs) == 24 and max(runs) <= 8


def test_readyz_is_false_until_the_warmup_has_run(model_file):
    server = InProcess(app_for(model_file, warmup_runs=3000), wait_ready=False)
    try:
        first = server.get("/readyz")
        assert first.status_code == 503 and first.json() == {"ready": False, "draining": False, "failed": None}
        deadline = time.time() + 60
        while server.get("/readyz").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert server.get("/readyz").json() == {"ready": True, "draining": False, "failed": None}
    finally:
        server.close()


def test_a_temperature_in_the_file_scales_the_probabilities_served(model_file, tmp_path):
    """`ftdeploy report --calibrate` stores a temperature; the server divides the logits by it."""
    import shutil

    from ftdeploy.onnx_model import OnnxModel, update_metadata

    calibrated = tmp_path / "calibrated.onnx"
    shutil.copy(model_file, calibrated)
    update_metadata(calibrated, {"temperature": 3.0})
    server = InProcess(app_for(calibrated))
    try:
        assert server.get("/v1/model").json()["temperature"] == 3.0
        body = png(21)
        served = server.post("/v1/predict?k=3", files={"f": ("a.png", body, "image/png")}).json()
    finally:
        server.close()
    clf = OnnxModel(calibrated, threads=1)
    logits = clf.outputs(clf.preprocess([Image.open(io.BytesIO(body))]))[0][0] / 3.0
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {p["index"]: p["probability"] for p in served["predictions"][0]["top_k"]}
    assert got == pytest.approx({i: float(expected[i]) for i in range(3)}, rel=1e-5)


class RecordingModel:
    """Stands in for the session to see which thread and how many images each run took; ``delay``
    makes it a slow model."""

    def __init__(self, delay: float):
        self.delay, self.threads, self.sizes = delay, [], []

    def outputs(self, batch):
        time.sleep(self.delay)
        self.threads.append(threading.current_thread())
        self.sizes.append(len(batch))
        return [batch.reshape(len(batch), -1)[:, :2]]


def batcher(model, **kwargs):
    from ftdeploy.serve import Metrics, MicroBatcher

    return MicroBatcher(model, Metrics(8), max_batch_size=8, max_wait_ms=5, **kwargs)


def test_requests_waiting_together_share_runs_under_the_cap_and_each_gets_its_own_answer():
    model = RecordingModel(0.0)
    # All queued before the batcher first wakes: fourteen requests of one image, then one of three.
    requests = [np.full((1, 3, 2, 2), i, np.float32) for i in range(14)] + [np.full((3, 3, 2, 2), 14, np.float32)]

    async def scenario():
        b = batcher(model)
        b.start()
        answers = await asyncio.gather(*(b.infer(r) for r in requests))
        await b.stop()
        return answers

    answers = asyncio.run(scenario())
    assert model.sizes == [8, 6, 3]  # 6 + 3 would pass the cap of 8: the 3-image request starts a run
    for r, (logits,) in zip(requests, answers):
        np.testing.assert_array_equal(logits, r.reshape(len(r), -1)[:, :2])


@pytest.mark.parametrize("delay,lone_inline", [(0.0, True), (0.02, False)], ids=["fast model", "slow model"])
def test_only_a_lone_request_to_a_fast_model_runs_on_the_event_loop(delay, lone_inline):
    model = RecordingModel(delay)
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)

    async def scenario():
        b = batcher(model)
        b.start()
        first = await b.infer(x)  # not yet timed: goes to a thread
        b.active = 1
        lone = await b.infer(x + 1)
        b.active = 2  # another request is in the server: the loop stays free for it
        busy = await b.infer(x + 2)
        await b.stop()
        return first, lone, busy

    results = asyncio.run(scenario())
    loop_thread = threading.main_thread()
    assert [t is loop_thread for t in model.threads] == [False, lone_inline, False]
    for i, (logits,) in enumerate(results):  # same answers on either path
        np.testing.assert_array_equal(logits, (x + i).reshape(1, -1)[:, :2])


def test_a_full_queue_answers_503_with_retry_after_and_a_late_answer_504():
    """max_queue=2: while one batch runs, two requests wait and the next is refused at once. A request
    that waits longer than its timeout gets 504, and is not run when its turn comes."""
    from ftdeploy.errors import RequestError

    model = RecordingModel(0.3)
    x = np.zeros((1, 3, 2, 2), np.float32)

    async def scenario():
        b = batcher(model, max_queue=2)
        b.start()
        running = asyncio.ensure_future(b.infer(x))
        await asyncio.sleep(0.05)  # the batcher took it and runs it in a thread for 0.3 s
        waiting = [asyncio.ensure_future(b.infer(x + i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as refused:
            await b.infer(x + 3)
        await asyncio.gather(running, *waiting)
        slow = asyncio.ensure_future(b.infer(x + 4))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as late:
            await b.infer(x + 5, timeout=0.05)  # queued behind a 0.3 s run
        await slow
        await asyncio.sleep(0.05)  # the batcher reaches the abandoned request
        await b.stop()
        return refused.value, late.value

    refused, late = asyncio.run(scenario())
    assert (refused.status, refused.code, refused.headers) == (503, "overloaded", {"Retry-After": "1"})
    assert (late.status, late.code) == (504, "timeout")
    assert model.sizes == [1, 2, 1]  # x; x+1 and x+2 together; x+4. Nobody waited for x+5: not run


def test_a_batcher_that_dies_turns_readyz_503_and_answers_waiting_requests(model_file):
    server = InProcess(app_for(model_file))
    batcher_ = server.app.state.repository.get("model").batcher

    async def broken(items):
        raise RuntimeError("simulated bug in the batch loop")

    batcher_._run = broken
    try:
        r = server.post("/v1/predict", files={"f": ("a.png", png(1), "image/png")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
        ready = server.get("/readyz")
        assert ready.status_code == 503 and "simulated bug" in ready.json()["failed"]
        again = server.post("/v1/predict", files={"f": ("a.png", png(1), "image/png")})
        assert again.status_code == 503  # refused at once, not left waiting
    finally:
        server.close()


def test_auto_takes_the_provider_measured_fastest_for_this_file(model_file, tmp_path, monkeypatch):
    import shutil

    from ftdeploy.serve import providers as serve

    shutil.copy(model_file, tmp_path / "model.int8.onnx")
    report = json.loads((model_file.parent / "report.json").read_text())
    report["variants"] = {"fp32": {"path": "model.onnx", "providers_p50_ms": {"cpu": 1.0, "openvino": 2.0}},
                          "int8": {"path": "model.int8.onnx", "providers_p50_ms": {"cpu": 0.9, "openvino": 0.6}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr(serve, "installed_providers", lambda: ["cpu", "openvino"])
    assert serve.choose_provider(tmp_path / "model.int8.onnx", "auto")[0] == "openvino"
    shutil.copy(model_file, tmp_path / "other.onnx")  # no measurements for this file
    name, why = serve.choose_provider(tmp_path / "other.onnx", "auto")
    assert name == "cpu" and "no provider measurements for other.onnx" in why
    monkeypatch.setattr(serve, "installed_providers", lambda: ["cpu"])
    assert serve.choose_provider(tmp_path / "model.int8.onnx", "auto")[0] == "cpu"


def test_a_provider_that_disagrees_on_the_files_samples_is_refused(model_file):
    """The agreement check runs the file's own sample inputs (validation images stored at export)
    through the provider and through the CPU provider."""
    from ftdeploy.errors import FtdeployError
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.serve import check_agreement

    model = OnnxModel(model_file, threads=1)
    assert model.samples() is not None and len(model.samples()) == 8
    assert check_agreement(model, OnnxModel(model_file, threads=1))["decision_agreement"] == 1.0

    class Swapped(OnnxModel):  # a provider whose outputs come out in the wrong order
        def outputs(self, batch):
            return [o[:, ::-1] for o in super().outputs(batch)]

    with pytest.raises(FtdeployError, match="disagrees with the CPU provider"):
        check_agreement(Swapped(model_file, threads=1), model)


def test_provider_auto_falls_back_to_cpu_when_openvino_is_missing(model_file):
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-openvino is installed here")
    info = InProcess(app_for(model_file, provider="auto"))
    try:
        model = info.get("/v1/model").json()
    finally:
        info.close()
    assert model["provider"] == "cpu" and "onnxruntime-openvino is not installed" in model["provider_reason"]


def test_the_uvicorn_internals_the_drain_relies_on_are_there():
    """DrainingServer hands accepted sockets to uvicorn's own protocol and closes uvicorn's servers:
    this fails when a uvicorn release renames what it uses (pyproject.toml bounds uvicorn for that)."""
    import uvicorn

    from ftdeploy.serve import DrainingServer, Lifecycle

    async def app(scope, receive, send):
        pass

    config = uvicorn.Config(app, lifespan="off")
    config.load()
    server = DrainingServer(config, Lifecycle(), 0.0)
    parameters = inspect.signature(config.http_protocol_class.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(parameters)
    assert isinstance(server.server_state.connections, set)
    assert "servers" in inspect.getsource(uvicorn.Server.startup)
    assert "self.lifespan = config.lifespan_class(config)" in inspect.getsource(uvicorn.Server._serve)
    assert hasattr(config.lifespan_class(config), "state")
    for hook in ("on_tick", "handle_exit", "main_loop", "shutdown"):
        assert callable(getattr(uvicorn.Server, hook))


# --- real server processes --------------------------------------------------------------------

class Server:
    def __init__(self, model, *args, env=None, wait=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ("--drain-seconds", "0", *args)  # a later --drain-seconds wins
        self.proc = subprocess.Popen([sys.executable, "-m", "ftdeploy", "serve", str(model), "--port", str(self.port), *args],
                                     cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.time() + 60
        while wait and time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        if wait:
            raise RuntimeError("server did not become ready")

    def stop(self) -> str:
        """SIGTERM, as an orchestrator sends it; returns the server's log."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out  # drained: in-flight requests finished, then exit 0
        return out


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(model_file):
    srv = Server(model_file, "--threads", "1")
    body = png(11)
    head = (f"POST /v1/predict?k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body[:20])  # the request has begun; its body is still on the way
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        while True:  # shutting down: new connections are refused, the open request carries on
            probe = socket.socket()
            probe.settimeout(0.5)
            try:
                probe.connect(("127.0.0.1", srv.port))
            except OSError:  # refused, or a SYN the draining listener dropped
                break
            finally:
                probe.close()
            assert time.time() < deadline, "the server kept accepting connections after SIGTERM"
            time.sleep(0.05)
        sock.sendall(body[20:])
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line, _, payload = response.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 200"), response
    assert httpx.Response(200, content=payload).json()["predictions"][0]["top_k"][0]["label"] == offline(model_file, [body])[0]
    out, _ = srv.proc.communicate(timeout=30)
    assert srv.proc.returncode == 0 and "Application shutdown complete" in out


def load_test_module():
    """benchmarks/load_test.py: its clients tell answered, refused and reset requests apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("client", ["keepalive", "urllib"])
def test_sigterm_in_the_middle_of_the_load_loses_no_accepted_request(model_file, client):
    """Keep-alive connections, and a client that opens a connection per request (urllib), send at
    c=8 while SIGTERM comes early and the load goes on past the close: no connection is reset,
    every answer is 200 and right, the rest are refused, /readyz says 503 during the drain, exit 0."""
    from ftdeploy.onnx_model import OnnxModel

    lt = load_test_module()
    model = OnnxModel(model_file, threads=1)
    images = [Image.open(io.BytesIO(png(300 + i))) for i in range(20)]
    codec = model.task.codec
    bodies, expected = [codec.encode([i]) for i in images], [lt.Expected(codec, codec.answer(model, [i])) for i in images]
    n = 2000
    result = lt.drain_scenario(model_file, ["--threads", "1"], bodies, expected, n, 8, 0.3, client, signal_at=0.1)
    assert result["reset"] == 0 and result["answered_other"] == 0 and result["mismatched_predictions"] == 0, \
        {k: result[k] for k in ("reset", "answered_other", "mismatched_predictions", "refused", "answered_200")}
    assert result["answered_200"] + result["refused"] == n and result["answered_200"] > result["signal_at_answered"]
    assert result["refused"] > 0, result  # the load went on after the listener closed
    assert result["exit_code"] == 0 and result["readyz_status"] == 503


@pytest.mark.slow
def test_workers_share_the_port_and_the_metrics(model_file):
    """--workers 2: two processes answer on one port; /metrics, from whichever answers, counts the
    requests of both; SIGTERM to the parent drains both and it exits 0."""
    srv = Server(model_file, "--workers", "2", "--threads", "1")
    try:
        pids, deadline = set(), time.time() + 60
        while len(pids) < 2:  # both workers bound: new connections reach each of them
            assert time.time() < deadline, pids
            with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                response = fresh.get("/readyz")
                if response.status_code == 200:
                    pids.add(fresh.get("/v1/model").json()["pid"])
        for blob in [png(400 + i) for i in range(16)]:
            with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                assert fresh.post("/v1/predict?k=1", files={"f": ("a.png", blob, "image/png")}).status_code == 200
        text = srv.client.get("/metrics").text
        assert re.search(r'^ftdeploy_requests_total\{path="/v1/predict",status="200"\} 16\.0$', text, re.M), text
        assert float(re.search(r"^ftdeploy_batch_size_sum (\S+)$", text, re.M).group(1)) == 16 + 2 * 3  # + warm-ups
    finally:
        out = srv.stop()
    assert out.count("Application shutdown complete") == 2


@pytest.mark.slow
def test_a_second_server_on_a_busy_port_exits_2_with_one_line(model_file):
    """A port held by another server that shares with SO_REUSEPORT (as --workers do): one worker
    does not join it silently."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(8)
    port = str(holder.getsockname()[1])
    try:
        for workers in ("1", "2"):
            result = subprocess.run([sys.executable, "-m", "ftdeploy", "serve", str(model_file), "--port", port,
                                     "--workers", workers], capture_output=True, text=True, cwd=REPO, timeout=60)
            assert result.returncode == 2, (workers, result.stdout, result.stderr)
            assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
            assert "Traceback" not in result.stderr
    finally:
        holder.close()


@pytest.mark.slow
def test_sigterm_while_workers_start_exits_cleanly(model_file):
    srv = Server(model_file, "--workers", "2", "--threads", "1", wait=False)
    started = srv.proc.stdout.readline()
    assert "2 workers: pids" in started, started  # the parent has started them; they are still importing
    srv.proc.send_signal(signal.SIGTERM)
    out, _ = srv.proc.communicate(timeout=60)
    assert srv.proc.returncode == 0, out
    assert "Traceback" not in out and "exited with code" not in out


@pytest.mark.slow
def test_a_server_whose_batcher_dies_exits_1(model_file):
    """The batch loop breaks (a bug, simulated): /readyz turns 503 and the process exits non-zero, so
    that an orchestrator restarts it instead of routing requests to a server that cannot answer."""
    port = free_port()
    code = f"""
import ftdeploy.serve as serve
from ftdeploy.cli import main
async def broken(self, items):
    if sum(len(a) for a, *_ in items) > 1:
        raise RuntimeError("simulated bug in the batch loop")
    return await original(self, items)
original, serve.MicroBatcher._run = serve.MicroBatcher._run, broken
main(["serve", {str(model_file)!r}, "--port", "{port}", "--drain-seconds", "0"])
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.time() + 60
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    two = client.post("/v1/predict", files=[("a", ("a.png", png(1), "image/png")), ("b", ("b.png", png(2), "image/png"))])
    assert two.status_code == 503
    try:
        assert client.get("/readyz").status_code == 503
    except httpx.TransportError:
        pass  # already exiting
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "error: the micro-batcher stopped (RuntimeError: simulated bug" in out


@pytest.mark.slow
def test_serving_works_where_importing_torch_fails(model_file, tmp_path):
    blocker = tmp_path / "blocked" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed in this environment')\n")
    check = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, "PYTHONPATH": str(blocker.parent)},
                           capture_output=True, text=True)
    assert "torch is not installed" in check.stderr
    srv = Server(model_file, env={"PYTHONPATH": str(blocker.parent)})
    try:
        r = srv.client.post("/v1/predict", files={"f": ("a.png", png(5), "image/png")})
        assert r.status_code == 200 and r.json()["predictions"][0]["top_k"]
    finally:
        srv.stop()


def test_openvino_without_its_provider_says_how_to_get_it(model_file):
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-openvino is installed here")
    refused = subprocess.run([sys.executable, "-m", "ftdeploy", "serve", str(model_file), "--provider", "openvino"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "onnxruntime-openvino" in refused.stderr and "Traceback" not in refused.stderr


# --- the Open Inference Protocol, the repository, threads -------------------------------------

def test_tritonclient_drives_an_image_classifier_and_its_classification_equals_v1_top_k(model_file):
    import tritonclient.http as triton

    from ftdeploy.onnx_model import OnnxModel
    from oip import ThreadedServer, classification, drive

    blobs = [png(i) for i in range(2)]
    tensor = OnnxModel(model_file, 1).preprocess([Image.open(io.BytesIO(b)) for b in blobs])

    def inputs(binary):
        if not binary:  # JSON: the preprocessed tensor (encoded images are not UTF-8 text)
            x = triton.InferInput("input", list(tensor.shape), "FP32")
            x.set_data_from_numpy(tensor, binary_data=False)
        else:  # binary: the PNG files, preprocessed by the server with the file's own preprocessing
            x = triton.InferInput("input", [len(blobs)], "BYTES")
            x.set_data_from_numpy(np.array(blobs, dtype=object), binary_data=True)
        return [x]

    server = ThreadedServer(app_for(model_file))
    try:
        probs = drive(server, "model", inputs, ["probabilities"])["probabilities"]
        v1 = httpx.post(f"http://{server.url}/v1/predict?k=3", files=[("files", (f"{i}.png", b, "image/png"))
                                                                         for i, b in enumerate(blobs)]).json()
        served = [[t["probability"] for t in sorted(p["top_k"], key=lambda t: t["index"])] for p in v1["predictions"]]
        assert np.allclose(probs, served, atol=1e-6)
        top = classification(server, "model", inputs, "probabilities", 3)
        assert top == [[(t["probability"], t["index"], t["label"]) for t in p["top_k"]] for p in v1["predictions"]]
        bad = httpx.post(f"http://{server.url}/v2/models/model/infer", json={"inputs": [
            {"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]})
        assert bad.status_code == 400 and "[-1, 3, 16, 16]" in bad.json()["error"]
        missing = httpx.get(f"http://{server.url}/v2/models/model/versions/7")
        assert missing.status_code == 404 and "version '7'" in missing.json()["error"]
    finally:
        server.close()


def perturbed(model_file, out):
    """A copy of the file whose largest weight tensor is scaled: it loads and answers, wrongly (the
    load test's own, which drops such a version in under load)."""
    load_test_module().perturbed_copy(model_file, out)


def put_version(repo, number: int, write) -> None:
    """A version staged beside the others and renamed into place, as a deploy script does it."""
    import shutil

    staging = repo / "tiny" / f".staging-{number}"
    staging.mkdir(parents=True)
    write(staging / "model.onnx")
    time.sleep(0.01)  # the rename comes after the file was written, as it does for real
    staging.rename(repo / "tiny" / str(number))
    shutil.rmtree(staging, ignore_errors=True)


def test_a_repository_swaps_in_a_checked_version_and_refuses_a_corrupt_and_a_perturbed_one(model_file, tmp_path, caplog):
    import shutil

    repo = tmp_path / "repo"
    (repo / "tiny" / "1").mkdir(parents=True)
    shutil.copy(model_file, repo / "tiny" / "1" / "model.onnx")
    server = InProcess(app_for(repo, poll_seconds=0.1))

    def wait_for(version: str, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while server.get("/v2/models/tiny").json()["versions"] != [version]:
            assert time.time() < deadline, server.get("/v2/repository/index").json()
            time.sleep(0.05)

    def answered_by() -> str:
        r = server.post("/v1/models/tiny/predict", content=png(1), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.headers["x-model-name"] == "tiny"
        return r.headers["x-model-version"]

    try:
        assert answered_by() == "1"
        assert server.post("/v1/predict", content=png(1), headers={"content-type": "image/png"}).status_code == 200
        put_version(repo, 2, lambda path: shutil.copy(model_file, path))
        wait_for("2")
        assert answered_by() == "2"
        put_version(repo, 3, lambda path: path.write_bytes(model_file.read_bytes()[:5000]))
        put_version(repo, 4, lambda path: perturbed(model_file, path))
        deadline = time.time() + 20
        while len([r for r in server.get("/v2/repository/index").json() if r["state"] == "UNAVAILABLE"]) < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        index = {r["version"]: r for r in server.get("/v2/repository/index").json()}
        assert index["2"]["state"] == "READY" and "1" not in index  # unloaded by the policy (latest:1)
        assert "cannot load" in index["3"]["reason"] and "fails its own check" in index["4"]["reason"]
        assert answered_by() == "2"
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused tiny version")]
        assert len(refusals) == 2, refusals  # one line each, once (not again at every poll)
        # a second model makes /v1/predict ambiguous: it says which to name
        (repo / "other" / "1").mkdir(parents=True)
        shutil.copy(model_file, repo / "other" / "1" / "model.onnx")
        deadline = time.time() + 20
        while "other" not in {r["name"] for r in server.get("/v2/repository/index").json()}:
            assert time.time() < deadline
            time.sleep(0.05)
        r = server.post("/v1/predict", content=png(1), headers={"content-type": "image/png"})
        assert r.status_code == 400 and "/v1/models/{model}/predict" in r.json()["error"]["message"]
        assert "other, tiny" in r.json()["error"]["message"]
    finally:
        server.close()


def test_a_file_that_fails_its_own_check_is_not_served_and_validate_says_why(model_file, tiny_run, tmp_path):
    from ftdeploy.errors import FtdeployError
    from ftdeploy.serve import create_app
    from conftest import cli

    bad = tmp_path / "model.onnx"
    perturbed(model_file, bad)
    with pytest.raises(FtdeployError, match="fails its own check"):
        create_app(bad, threads=1)
    result = cli("validate", str(bad), "--run", str(tiny_run), "-o", str(tmp_path / "v"), "--batch-sizes", "1")
    assert result.returncode != 0 and "self-check" in result.stdout + result.stderr


def test_an_upload_over_the_limit_gets_its_413_in_urllib_and_requests_with_a_length_and_chunked(model_file):
    import urllib.error
    import urllib.request

    import requests

    from oip import ThreadedServer

    from ftdeploy.codecs import Limits

    limit = 2 * 2**20
    server = ThreadedServer(app_for(model_file, limits=Limits(**{**LIMITS, "max_request_bytes": limit})))
    boundary = "b"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + os.urandom(12 * limit) + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    url = f"http://{server.url}/v1/predict"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=30)
        assert refused.value.code == 413 and json.loads(refused.value.read())["error"]["code"] == "request_too_large"
        r = requests.post(url, data=body, headers=headers, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        chunked = requests.post(url, data=(body[i:i + 2**16] for i in range(0, len(body), 2**16)), headers=headers, timeout=30)
        assert chunked.status_code == 413 and "passed" in chunked.json()["error"]["message"]
        v2 = requests.post(f"http://{server.url}/v2/models/model/infer", data=body, timeout=30)
        assert v2.status_code == 413 and "limit" in v2.json()["error"]
        assert requests.get(f"http://{server.url}/healthz", timeout=30).status_code == 200
    finally:
        server.close()


def test_threads_follow_the_cgroup_cpu_quota_and_the_affinity_mask(model_file, tmp_path, monkeypatch):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "cpu.max").write_text("100000 100000\n")  # 1 CPU, as a Kubernetes limit of 1 sets it
    monkeypatch.setenv("FTDEPLOY_CGROUP_DIR", str(cgroup))
    from ftdeploy.serve import create_app

    server = InProcess(create_app(model_file))
    try:
        info = server.get("/v1/model").json()
        assert info["threads"] == 1 and "cpu.max" in info["threads_reason"] and str(cgroup) in info["threads_reason"]
        session = server.app.state.repository.get("model").onnx.session
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        server.close()
    code = ("from ftdeploy.serve import intra_op_threads; from ftdeploy.onnx_model import OnnxModel; "
            "n, why = intra_op_threads(None); "
            f"m = OnnxModel({str(model_file)!r}, n); print(n, m.session.get_session_options().intra_op_num_threads, why)")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={k: v for k, v in os.environ.items() if k != "FTDEPLOY_CGROUP_DIR"}, timeout=120)
    assert out.stdout.split()[:2] == ["1", "1"] and "affinity mask: 1 CPUs" in out.stdout, out.stdout + out.stderr
