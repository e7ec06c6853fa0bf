"""The Open Inference Protocol, driven as users drive it: tritonclient's HTTP client against a real
uvicorn server (in a thread of the test process: no interpreter to start), and every JSON body checked
against the protocol's published schema (tests/data/open_inference_rest.schemas.json)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import numpy as np

from conftest import REPO, free_port

SCHEMAS = json.loads((REPO / "tests" / "data" / "open_inference_rest.schemas.json").read_text())


def check_schema(body, name: str) -> None:
    """``body`` against the protocol's ``components/schemas/<name>``."""
    schema = {**SCHEMAS, "$ref": f"#/components/schemas/{name}"}
    jsonschema.validate(body, schema)


class ThreadedServer:
    """uvicorn serving ``app`` on a free loopback port from a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, port=self.port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://{self.url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.02)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://{self.url}{path}", timeout=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def drive(server: ThreadedServer, model: str, inputs, outputs: list[str]) -> dict:
    """Every call of the protocol through tritonclient against ``model``: health, server and model
    metadata (their JSON checked against the schema), config, statistics, the repository index, infer
    with JSON tensors and with binary ones (both answers alike), a versioned request, and a wrong
    input name (a 400, after which the server is still live). ``inputs(binary)`` -> InferInputs.
    Returns the outputs by name (as numpy), from the binary answer."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(model) and client.is_model_ready(model, "1")
        assert not client.is_model_ready("no-such-model")
        check_schema(server.get("/v2").json(), "metadata_server_response")
        assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata()["extensions"])
        metadata = client.get_model_metadata(model)
        check_schema(server.get(f"/v2/models/{model}").json(), "metadata_model_response")
        assert metadata["versions"] == ["1"] and [o["name"] for o in metadata["outputs"]] == outputs
        config = client.get_model_config(model)
        assert config["platform"] == "onnxruntime_onnx" and [o["name"] for o in config["output"]] == outputs
        assert {"name": model, "version": "1", "state": "READY"} in client.get_model_repository_index()

        answers = {}
        for binary in (False, True):
            requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in outputs]
            body, header_length = client.generate_request_body(inputs(binary), requested)
            header = json.loads(body[:header_length])  # the JSON part, before any binary tensor data
            if all("data" in i for i in header["inputs"]):
                check_schema(header, "inference_request")
            result = client.infer(model, inputs(binary), outputs=requested)
            response = result.get_response()
            if not binary:
                check_schema(response, "inference_response")
            assert response["model_name"] == model and response["model_version"] == "1"
            answers[binary] = {name: result.as_numpy(name) for name in outputs}
        for name in outputs:
            a, b = answers[False][name], answers[True][name]
            if a.dtype == object:  # BYTES: tritonclient gives str from JSON and bytes from binary data
                a, b = (np.vectorize(lambda x: x.decode() if isinstance(x, bytes) else x, otypes=[object])(t) for t in (a, b))
            assert a.shape == b.shape and (np.allclose(a, b, atol=1e-6) if a.dtype != object else (a == b).all()), name
        assert client.infer(model, inputs(True), model_version="1").get_response()["model_version"] == "1"

        wrong = inputs(True)
        wrong[0]._name = "not_an_input"
        try:
            client.infer(model, wrong)
            raise AssertionError("a wrong input name was answered")
        except InferenceServerException as e:
            assert e.status() == "400" and "not_an_input" in e.message(), (e.status(), e.message())
        error = httpx.post(f"http://{server.url}/v2/models/{model}/infer", content=b"{", timeout=30)
        assert error.status_code == 400
        check_schema(error.json(), "error_response")
        assert client.is_server_live()
        stats = client.get_inference_statistics(model)["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] >= 3 and stats["inference_stats"]["fail"]["count"] >= 2
        assert stats["batch_stats"] and stats["inference_stats"]["compute_infer"]["ns"] > 0
        return answers[True]
    finally:
        client.close()


def classification(server: ThreadedServer, model: str, inputs, output: str, k: int) -> list[list[tuple[float, int, str]]]:
    """The classification extension through tritonclient: (score, index, label) per input, best first."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url)
    try:
        result = client.infer(model, inputs(True), outputs=[triton.InferRequestedOutput(output, class_count=k)])
        rows = result.as_numpy(output)
    finally:
        client.close()
    parsed = []
    for row in rows:
        entries = []
        for item in row:
            score, index, label = item.decode().split(":", 2)
            entries.append((float(score), int(index), label))
        parsed.append(entries)
    return parsed
