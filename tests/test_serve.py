"""A real uvicorn process on a loopback port, driven over HTTP."""

import asyncio
import base64
import concurrent.futures
import io
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

from conftest import FAST_EXPORT, REPO, make_run

LIMITS = ["--max-image-bytes", "60000", "--max-image-pixels", "1000000", "--max-images", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(seed: int, size=(24, 24)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    def __init__(self, model, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ("--drain-seconds", "0", *args)  # a later --drain-seconds wins
        self.proc = subprocess.Popen([sys.executable, "-m", "ftdeploy", "serve", str(model), "--port", str(self.port), *args],
                                     cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def wait_ready(self):
        deadline = time.time() + 60
        while self.client.get("/readyz").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM, as an orchestrator sends it; returns the server's log."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out  # drained: in-flight requests finished, then exit 0
        return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    tmp = tmp_path_factory.mktemp("serve")
    run = make_run(tmp / "run")
    export(run, tmp / "onnx", ExportConfig(**FAST_EXPORT))
    return tmp / "onnx" / "model.onnx"


@pytest.fixture(scope="module")
def server(model_file):
    srv = Server(model_file, *LIMITS)
    srv.wait_ready()
    yield srv
    assert "Application shutdown complete" in srv.stop()


def offline(model_file, blobs):
    from ftdeploy.onnx_model import OnnxClassifier

    clf = OnnxClassifier(model_file, threads=1)
    return [clf.classes[i] for i in clf.predict([Image.open(io.BytesIO(b)) for b in blobs])]


@pytest.mark.slow
def test_predict_multipart_and_json_match_offline(server, model_file):
    blobs = [png(i) for i in range(3)]
    r = server.client.post("/v1/predict?k=2", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3 and all(len(p["top_k"]) == 2 for p in preds)
    assert [p["top_k"][0]["label"] for p in preds] == offline(model_file, blobs)
    assert all(1 >= p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] > 0 for p in preds)
    r = server.client.post("/v1/predict", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert r.status_code == 200
    assert [p["top_k"][0]["label"] for p in r.json()["predictions"]] == offline(model_file, blobs)


@pytest.mark.slow
def test_model_info_and_openapi(server):
    info = server.client.get("/v1/model").json()
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["input_size"] == 32 and info["variant"] == "fp32" and info["source_run"].endswith("run")
    assert "/v1/predict" in server.client.get("/openapi.json").json()["paths"]


@pytest.mark.slow
def test_docs_page_loads_nothing_from_the_network(server):
    """Every script and stylesheet of /docs comes from the server itself (Swagger UI 5, OpenAPI 3.1)."""
    page = server.client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("/docs/assets/") for a in assets), assets
    for asset in assets:
        r = server.client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "SwaggerUIBundle" in server.client.get("/docs/assets/swagger-ui-bundle.js").text
    assert server.client.get("/openapi.json").json()["openapi"].startswith("3.1")


@pytest.mark.slow
@pytest.mark.parametrize("query,status,code", [("k=0", 422, "invalid_parameter"), ("k=abc", 422, "invalid_parameter")])
def test_a_bad_query_parameter_gets_the_error_shape_of_every_other_error(server, query, status, code):
    r = server.client.post(f"/v1/predict?{query}", files=[("files", ("ok.png", png(9), "image/png"))])
    assert r.status_code == status
    assert set(r.json()) == {"error"} and r.json()["error"]["code"] == code and "k" in r.json()["error"]["message"]


@pytest.mark.slow
def test_unknown_paths_and_methods_get_the_error_shape(server):
    missing = server.client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = server.client.get("/v1/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 M pixels in a few KB
    return buf.getvalue()


def big_uniform_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000), (10, 20, 30)).save(buf, format="PNG")  # 1.1 M pixels, few bytes
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
    ("too many pixels", {"files": [("files", ("wide.png", big_uniform_png(), "image/png"))]}, 413, "too_many_pixels"),
    ("decompression bomb", {"files": [("files", ("bomb.png", bomb(), "image/png"))]}, 413, "decompression_bomb"),
    ("too many images", {"files": [("files", (f"{i}.png", png(i), "image/png")) for i in range(5)]}, 413, "too_many_images"),
    ("truncated image", {"files": [("files", ("t.png", png(3)[:300], "image/png"))]}, 400, "invalid_image"),
    ("truncated multipart", {"content": b"--XYZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                             b"Content-Type: image/png\r\n\r\n\x89PNG", "headers": {"content-type": "multipart/form-data; boundary=XYZ"}},
     400, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_and_the_next_request_succeeds(server, name, kwargs, status, code):
    r = server.client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    good = server.client.post("/v1/predict", files=[("files", ("ok.png", png(9), "image/png"))])
    assert good.status_code == 200


@pytest.mark.slow
def test_metrics_count_requests_and_images_under_concurrent_load(model_file):
    srv = Server(model_file, "--max-batch-size", "8", "--max-wait-ms", "20", "--threads", "1")
    try:
        srv.wait_ready()
        blobs = [png(100 + i) for i in range(24)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda b: httpx.post(srv.url + "/v1/predict", files={"f": ("a.png", b, "image/png")},
                                                           timeout=30), blobs))
        assert all(r.status_code == 200 for r in responses)
        assert [r.json()["predictions"][0]["top_k"][0]["label"] for r in responses] == offline(model_file, blobs)
        srv.client.post("/v1/predict", content=b"nope", headers={"content-type": "text/plain"})
        text = srv.client.get("/metrics").text
        assert 'ftdeploy_requests_total{path="/v1/predict",status="200"} 24.0' in text
        assert 'ftdeploy_requests_total{path="/v1/predict",status="415"} 1.0' in text
        count = int(float(re.search(r"^ftdeploy_batch_size_count (\S+)$", text, re.M).group(1)))
        total = int(float(re.search(r"^ftdeploy_batch_size_sum (\S+)$", text, re.M).group(1)))
        assert total == 24 + 3  # 24 images plus the 3 warm-up runs
        # How many runs these shared depends on arrival timing (see the in-process batching test).
        assert 3 <= count <= 24 + 3
    finally:
        srv.stop()


@pytest.mark.slow
def test_readyz_is_false_until_the_warmup_has_run(model_file):
    srv = Server(model_file, "--warmup-runs", "3000", "--threads", "1")
    try:
        first = srv.client.get("/readyz")
        assert first.status_code == 503 and first.json() == {"ready": False, "draining": False}
        srv.wait_ready()
        assert srv.client.get("/readyz").json() == {"ready": True, "draining": False}
    finally:
        srv.stop()


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
        srv.wait_ready()
        r = srv.client.post("/v1/predict", files={"f": ("a.png", png(5), "image/png")})
        assert r.status_code == 200 and r.json()["predictions"][0]["top_k"]
    finally:
        srv.stop()


class RecordingModel:
    """Stands in for the session to see which thread and how many images each run took; ``delay``
    makes it a slow model."""

    def __init__(self, delay: float):
        self.delay, self.threads, self.sizes = delay, [], []

    def logits(self, batch):
        time.sleep(self.delay)
        self.threads.append(threading.current_thread())
        self.sizes.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :2]


def test_requests_waiting_together_share_runs_under_the_cap_and_each_gets_its_own_answer():
    from ftdeploy.serve import Metrics, MicroBatcher

    model = RecordingModel(0.0)
    # All queued before the batcher first wakes: fourteen requests of one image, then one of three.
    requests = [np.full((1, 3, 2, 2), i, np.float32) for i in range(14)] + [np.full((3, 3, 2, 2), 14, np.float32)]

    async def scenario():
        batcher = MicroBatcher(model, Metrics(8), max_batch_size=8, max_wait_ms=5)
        batcher.start()
        answers = await asyncio.gather(*(batcher.infer(r) for r in requests))
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert model.sizes == [8, 6, 3]  # 6 + 3 would pass the cap of 8: the 3-image request starts a run
    for r, logits in zip(requests, answers):
        np.testing.assert_array_equal(logits, r.reshape(len(r), -1)[:, :2])


@pytest.mark.parametrize("delay,lone_inline", [(0.0, True), (0.02, False)], ids=["fast model", "slow model"])
def test_only_a_lone_request_to_a_fast_model_runs_on_the_event_loop(delay, lone_inline):
    from ftdeploy.serve import Metrics, MicroBatcher

    model = RecordingModel(delay)
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)

    async def scenario():
        batcher = MicroBatcher(model, Metrics(8), max_batch_size=8, max_wait_ms=5)
        batcher.start()
        first = await batcher.infer(x)  # not yet timed: goes to a thread
        batcher.active = 1
        lone = await batcher.infer(x + 1)
        batcher.active = 2  # another request is in the server: the loop stays free for it
        busy = await batcher.infer(x + 2)
        await batcher.stop()
        return first, lone, busy

    results = asyncio.run(scenario())
    loop_thread = threading.main_thread()
    assert [t is loop_thread for t in model.threads] == [False, lone_inline, False]
    for i, logits in enumerate(results):  # same answers on either path
        np.testing.assert_array_equal(logits, (x + i).reshape(1, -1)[:, :2])


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(model_file):
    srv = Server(model_file, "--threads", "1")
    srv.wait_ready()
    body = png(11)
    head = (f"POST /v1/predict?k=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head + body[:20])  # the request has begun; its body is still on the way
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        while True:  # shutting down: new connections are refused, the open request carries on
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
            except OSError:
                break
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


@pytest.mark.slow
def test_a_temperature_in_the_file_scales_the_probabilities_served(model_file, tmp_path):
    """`ftdeploy report --calibrate` stores a temperature; the server divides the logits by it."""

    import onnx

    from ftdeploy.onnx_model import OnnxClassifier, model_metadata, write_metadata

    model = onnx.load(str(model_file))
    write_metadata(model, {**model_metadata(model), "temperature": 3.0})
    onnx.save(model, str(tmp_path / "calibrated.onnx"))
    srv = Server(tmp_path / "calibrated.onnx", "--threads", "1")
    try:
        srv.wait_ready()
        assert srv.client.get("/v1/model").json()["temperature"] == 3.0
        body = png(21)
        served = srv.client.post("/v1/predict?k=3", files={"f": ("a.png", body, "image/png")}).json()
    finally:
        srv.stop()
    clf = OnnxClassifier(tmp_path / "calibrated.onnx", threads=1)
    logits = clf.logits(clf.preprocess([Image.open(io.BytesIO(body))]))[0] / 3.0
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {p["index"]: p["probability"] for p in served["predictions"][0]["top_k"]}
    assert got == pytest.approx({i: float(expected[i]) for i in range(3)}, rel=1e-5)


def load_test_module():
    """benchmarks/load_test.py: its client tells answered, refused and reset requests apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("drain_seconds", [0, 1])
def test_sigterm_in_the_middle_of_the_load_loses_no_accepted_request(model_file, drain_seconds):
    """300 requests at c=8 from keep-alive connections, SIGTERM once half are answered, the load
    going on. Draining 1 s: /readyz says 503 while requests are still answered. Either way: no
    connection is reset, every answer is 200 and right, the rest are refused, the exit is 0."""
    lt = load_test_module()
    blobs = [png(300 + i) for i in range(20)]
    expected = offline(model_file, blobs)
    result = lt.drain_scenario(model_file, ["--threads", "1"], [lt.multipart(b) for b in blobs], expected, 300, 8,
                               drain_seconds)
    assert result["reset"] == 0 and result["answered_other"] == 0 and result["mismatched_predictions"] == 0, result
    assert result["answered_200"] + result["refused"] == 300 and result["answered_200"] > result["signal_at_answered"]
    assert result["exit_code"] == 0
    if drain_seconds:
        assert result["readyz_status"] == 503


@pytest.mark.slow
def test_workers_share_the_port_and_the_metrics(model_file):
    """--workers 2: two processes answer on one port; /metrics, from whichever answers, counts the
    requests of both; SIGTERM to the parent drains both and it exits 0."""
    srv = Server(model_file, "--workers", "2", "--threads", "1")
    try:
        srv.wait_ready()
        blobs = [png(400 + i) for i in range(16)]
        pids = set()
        for blob in blobs:  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                r = fresh.post("/v1/predict?k=1", files={"f": ("a.png", blob, "image/png")})
                assert r.status_code == 200
                pids.add(fresh.get("/v1/model").json()["pid"])
        text = srv.client.get("/metrics").text
        assert len(pids) == 2, pids
        assert re.search(r'^ftdeploy_requests_total\{path="/v1/predict",status="200"\} 16\.0$', text, re.M), text
        assert float(re.search(r"^ftdeploy_batch_size_sum (\S+)$", text, re.M).group(1)) == 16 + 2 * 3  # + warm-ups
    finally:
        out = srv.stop()
    assert out.count("Application shutdown complete") == 2


@pytest.mark.slow
def test_provider_auto_falls_back_to_cpu_and_openvino_says_how_to_get_it(model_file):
    import onnxruntime as ort

    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-openvino is installed here")
    srv = Server(model_file, "--provider", "auto", "--threads", "1")
    try:
        srv.wait_ready()
        assert srv.client.get("/v1/model").json()["provider"] == "cpu"
    finally:
        out = srv.stop()
    assert "provider: cpu (onnxruntime-openvino is not installed" in out
    refused = subprocess.run([sys.executable, "-m", "ftdeploy", "serve", str(model_file), "--provider", "openvino"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "onnxruntime-openvino" in refused.stderr and "Traceback" not in refused.stderr


def test_auto_takes_the_provider_measured_fastest_for_this_file(model_file, tmp_path, monkeypatch):
    import json
    import shutil

    from ftdeploy import serve

    shutil.copy(model_file, tmp_path / "model.int8.onnx")
    (tmp_path / "report.json").write_text(json.dumps({"variants": {
        "fp32": {"path": "x/model.onnx", "providers_p50_ms": {"cpu": 1.0, "openvino": 2.0}},
        "int8": {"path": "x/model.int8.onnx", "providers_p50_ms": {"cpu": 0.9, "openvino": 0.6}}}}))
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
    from ftdeploy.onnx_model import OnnxClassifier
    from ftdeploy.serve import check_agreement

    model = OnnxClassifier(model_file, threads=1)
    assert model.samples() is not None and len(model.samples()) == 8
    assert check_agreement(model, OnnxClassifier(model_file, threads=1))["top1_agreement"] == 1.0

    class Swapped(OnnxClassifier):  # a provider whose outputs come out in the wrong order
        def logits(self, batch):
            return super().logits(batch)[:, ::-1]

    with pytest.raises(FtdeployError, match="disagrees with the CPU provider"):
        check_agreement(Swapped(model_file, threads=1), model)
