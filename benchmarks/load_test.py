"""Load test of ``ftdeploy serve`` on loopback, against the raw onnxruntime path on the same inputs.

Starts the server itself (micro-batching on, then off), sends N requests at concurrency C from an
async HTTP client, and checks every answer against the ONNX file run offline: the whole answer the
task's codec gives (labels, scores, boxes, spans), numbers within 1e-4. The inputs are the
validation examples of the export directory the file lies in, sent as the task's codec encodes
them. Reports throughput, p50/p99 latency, errors and the batch sizes the server formed.

    python benchmarks/load_test.py runs/digits/export/model.onnx --requests 2000 --concurrency 16 \
        --json benchmarks/results/load_test.json

``--protocol oip`` speaks the Open Inference Protocol instead, through tritonclient (the client users
have): the overhead of ``/v2`` with binary and with JSON tensors beside ``/v1`` and the raw in-process
call at concurrency 1 (one minimal HTTP client for all three), then, per ``--concurrency-levels``, what
perf_analyzer reports: throughput, p50/p90/p95/p99 and the server-side split of a request's time
(queue, decoding, onnxruntime, answer) read from ``/v2/models/{m}/stats``. ``--swap`` serves a model
repository under ``--poll-seconds`` and, under load, drops in a new version, then a corrupt file and a
file with perturbed weights: every answer must name the version that gave it and equal that version's
file run offline; the two bad versions must be refused while the good one keeps serving.

``--workers 1,2`` instead compares server processes (each with ``--threads``) side by side;
``--drain`` sends SIGTERM in the middle of the load and counts answered, refused and reset requests,
from keep-alive connections or, with ``--client urllib``, from a client that opens one connection per
request (as urllib, curl and many proxies do).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np

from ftdeploy.codecs import same_structure
from ftdeploy.latency import format_table
from ftdeploy.machine import machine_info
from ftdeploy.onnx_model import OnnxModel


def requests_for(model: OnnxModel, path: Path, limit: int = 2000) -> tuple[list, list[tuple[bytes, str]], list]:
    """(raw inputs, request bodies, the answers the file gives offline) for the validation examples of
    the export directory ``path`` lies in, one input per request, encoded as the task's codec does."""
    from ftdeploy.data import build_datasets
    from ftdeploy.rundir import load_export

    export = load_export(path.parent)
    val = build_datasets(export.data.model_copy(update={"augment": False}), export.preprocessing).val
    raw = [val.raw(i) for i in range(min(limit, len(val)))]
    codec = model.task.codec
    return raw, [codec.encode([r]) for r in raw], [Expected(codec, codec.answer(model, [r])) for r in raw]


class Expected:
    """The answer the file gives offline for one request, and how a served answer is checked against it
    (the task's codec: a detector's boxes at IoU 0.99 and scores within 1e-4, the detections whose score
    lies within that of the threshold counted as near-ties)."""

    def __init__(self, codec, answer):
        self.codec, self.answer = codec, answer

    def check(self, got, tally: "Tally") -> None:
        same, near = self.codec.compare(got, self.answer)
        tally.wrong += not same
        tally.near_threshold += near


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ftdeploy", "serve", str(model), "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def batch_counts(self) -> dict[str, float]:
        """The server's batch-size histogram so far: cumulative counts per bucket, and the image total."""
        text = httpx.get(self.url + "/metrics").text
        counts = {m[0]: float(m[1]) for m in re.findall(r'^ftdeploy_batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}
        counts["images"] = float(re.search(r"^ftdeploy_batch_size_sum (\S+)$", text, re.M).group(1))
        return counts

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def batches_formed(before: dict[str, float], after: dict[str, float]) -> dict:
    """The batches a phase of the test formed, from histogram snapshots taken around it."""
    delta = {k: after[k] - before[k] for k in after}
    images, runs = delta.pop("images"), delta["+Inf"]
    return {"runs": runs, "mean": images / runs, "cumulative_buckets": delta}


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a general-purpose client spends
    milliseconds of the same two cores per request, which would be charged to the server."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "text/plain",
                      headers: str = "") -> tuple[int, bytes]:
        """Raises ConnectionRefusedError when the server does not accept the connection, and
        Reset when a connection it accepted ends without an answer."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status_line = await self.reader.readline()
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and value.strip().lower() == b"close":
                    close = True
            status, payload = int(status_line.split()[1]), await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            raise Reset(f"{type(e).__name__}: {e}") from None
        if close:  # the server is shutting down this connection: the next request opens another
            self.close()
        return status, payload

    async def post(self, path: str, body: bytes, content_type: str, headers: str = "") -> tuple[int, bytes]:
        return await self.request("POST", path, body, content_type, headers)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Reset(Exception):
    """A connection the server had accepted ended without an answer."""


class Tally:
    """Latencies and failures of the requests sent so far."""

    def __init__(self):
        self.latencies: list[float] = []  # of the requests answered, whatever the status
        self.sent = self.errors = self.wrong = self.refused = self.reset = self.ok = self.near_threshold = 0
        self.wall = 0.0

    def result(self, concurrency: int) -> dict:
        ms = np.asarray(self.latencies) * 1000
        return {"requests": self.sent, "concurrency": concurrency, "errors": self.errors, "answered_200": self.ok,
                "refused": self.refused, "reset": self.reset,
                "mismatched_predictions": self.wrong, "near_threshold_excused": self.near_threshold, "throughput": len(self.latencies) / self.wall,
                "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def load(port: int, bodies: list[tuple[bytes, str]], expected: list, indices: range, concurrency: int,
               tally: Tally) -> None:
    """Send input ``i % len(bodies)`` for each i in ``indices`` from ``concurrency`` keep-alive connections."""
    queue = iter(indices)

    async def worker() -> None:
        conn = Connection(port)
        try:
            for i in queue:
                body, ctype = bodies[i % len(bodies)]
                tally.sent += 1
                t0 = time.perf_counter()
                try:
                    status, payload = await conn.post("/v1/predict", body, ctype)
                except (ConnectionRefusedError, Reset) as e:
                    tally.errors += 1
                    if isinstance(e, Reset):
                        tally.reset += 1
                    else:
                        tally.refused += 1
                    conn.close()
                    continue
                tally.latencies.append(time.perf_counter() - t0)
                if status != 200:
                    tally.errors += 1
                    continue
                tally.ok += 1
                expected[i % len(bodies)].check(json.loads(payload), tally)
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.wall += time.perf_counter() - start


def in_process(model: OnnxModel, raw_inputs: list, indices, tally: Tally) -> None:
    """The raw path a server cannot beat: preprocess + one session run + postprocess, in-process."""
    start = time.perf_counter()
    for i in indices:
        t0 = time.perf_counter()
        model.predict([raw_inputs[i % len(raw_inputs)]])
        tally.latencies.append(time.perf_counter() - t0)
        tally.sent += 1
    tally.wall += time.perf_counter() - start


def raw_and_server_c1(port: int, model: OnnxModel, raw_inputs: list, bodies: list[tuple[bytes, str]],
                      expected: list, n: int, rounds: int = 10) -> tuple[dict, dict]:
    """The raw path a server cannot beat (preprocess + one session run + postprocess, in-process) and the
    server at concurrency 1, on the same images in the same order, in alternating rounds: this VM's
    speed drifts by tens of percent over a minute, and the drift must hit both alike."""
    raw, server = Tally(), Tally()
    per_round = -(-n // rounds)
    for r in range(rounds):
        indices = range(r * per_round, (r + 1) * per_round)
        in_process(model, raw_inputs, indices, raw)
        asyncio.run(load(port, bodies, expected, indices, 1, server))
    return raw.result(1), server.result(1)


def workers_side_by_side(model: Path, counts: list[int], common: list[str], bodies, expected, n: int, concurrency: int,
                         rounds: int = 6) -> dict[int, dict]:
    """Servers with each worker count, all up at once, loaded in alternating rounds (the drift of
    this VM's speed hits all alike)."""
    servers = {w: Server(model, *common, "--workers", str(w)) for w in counts}
    tallies = {w: Tally() for w in counts}
    try:
        per_round = -(-n // rounds)
        for r in range(rounds):
            for w, server in servers.items():
                asyncio.run(load(server.port, bodies, expected, range(r * per_round, (r + 1) * per_round), concurrency,
                                 tallies[w]))
    finally:
        for server in servers.values():
            server.stop()
    return {w: t.result(concurrency) for w, t in tallies.items()}


def urllib_load(port: int, bodies, expected: list[Expected], indices: range, concurrency: int, tally: Tally) -> None:
    """Send image ``i % len(bodies)`` for each i in ``indices`` from ``concurrency`` threads with urllib,
    which opens a new connection for every request (``Connection: close``)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    lock, queue = threading.Lock(), iter(indices)

    def one(i: int) -> None:
        body, ctype = bodies[i % len(bodies)]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict", data=body,
                                         headers={"Content-Type": ctype})
        t0 = time.perf_counter()
        status, payload, failure = None, b"", None
        try:
            with opener.open(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as e:
            status = e.code
        except urllib.error.URLError as e:
            failure = "refused" if isinstance(e.reason, ConnectionRefusedError) else "reset"
        except (ConnectionError, http.client.HTTPException, OSError):  # reset, aborted, remote closed
            failure = "reset"
        with lock:
            tally.sent += 1
            if failure:
                tally.errors += 1
                setattr(tally, failure, getattr(tally, failure) + 1)
                return
            tally.latencies.append(time.perf_counter() - t0)
            if status != 200:
                tally.errors += 1
                return
            tally.ok += 1
            expected[i % len(bodies)].check(json.loads(payload), tally)

    def worker() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            one(i)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: worker(), range(concurrency)))
    tally.wall += time.perf_counter() - start


def drain_scenario(model: Path, common: list[str], bodies, expected, n: int, concurrency: int, drain_seconds: float,
                   client: str = "keepalive", signal_at: float = 0.5) -> dict:
    """SIGTERM once ``signal_at`` of ``n`` requests are answered, the load going on: every request is
    answered, refused (the server no longer accepts: fine) or reset (accepted, then dropped: lost).
    ``client``: ``keepalive`` connections, or ``urllib`` (a new connection per request)."""
    server = Server(model, *common, "--drain-seconds", str(drain_seconds))
    tally = Tally()
    probe = {}

    def readyz() -> int | None:
        try:
            return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{server.port}/readyz", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def signal_at_half() -> None:
        while len(tally.latencies) < n * signal_at and tally.sent < n:
            time.sleep(0.002)
        server.proc.send_signal(signal.SIGTERM)
        probe["signal_at_answered"] = len(tally.latencies)
        if drain_seconds > 0:  # a load balancer's health check, during the drain
            probe["readyz_status"] = readyz()

    trigger = threading.Thread(target=signal_at_half)
    trigger.start()
    if client == "urllib":
        urllib_load(server.port, bodies, expected, range(n), concurrency, tally)
    else:
        asyncio.run(load(server.port, bodies, expected, range(n), concurrency, tally))
    trigger.join()
    exit_code = server.proc.wait(timeout=60)
    probe["closed_before_the_load_ended"] = tally.refused > 0  # the load went on past the close
    return {**tally.result(concurrency), **probe, "client": client, "drain_seconds": drain_seconds,
            "exit_code": exit_code, "answered_other": len(tally.latencies) - tally.ok}


# --- the Open Inference Protocol, through tritonclient ----------------------------------------------
def oip_inputs(model: OnnxModel, raw, binary: bool = True) -> list:
    """One raw input as tritonclient's BYTES input (encoded image, UTF-8 text): binary, or JSON where
    the bytes are text (an encoded image is not)."""
    import tritonclient.http as triton

    tensor = model.task.codec.encode_tensor([raw], model)
    x = triton.InferInput(tensor.name, tensor.shape, tensor.datatype)
    try:
        as_text = not binary and all(item.decode("utf-8") is not None for item in tensor.data)
    except UnicodeDecodeError:
        as_text = False
    x.set_data_from_numpy(np.array(tensor.data, dtype=object), binary_data=not as_text)
    return [x]


def oip_expected(model: OnnxModel, raw) -> dict[str, np.ndarray]:
    """The output tensors the file gives ``raw`` offline (the codec's default parameters)."""
    codec = model.task.codec
    batch = model.preprocess([raw])
    predictions = model.task.postprocess(model.outputs(batch), batch, model.info)
    params = codec.params() if codec.params else None
    return {name: np.asarray(t.data, dtype=object if t.datatype == "BYTES" else None)
            for name, t in codec.to_tensors(predictions, params, model.info).items()}


def same_tensors(result, expected: dict[str, np.ndarray]) -> bool:
    """Numbers within 1e-4; BYTES elements (JSON: a token classifier's entities) as the same JSON, numbers
    within 1e-4 (batched float32 rounds a score differently in its last digits)."""
    def same(got: np.ndarray, want: np.ndarray) -> bool:
        if np.shape(got) != want.shape:
            return False
        if want.dtype == object:
            return all(same_structure(json.loads(g), json.loads(w)) for g, w in zip(got.ravel(), want.ravel()))
        return bool(np.allclose(got, want, atol=1e-4))

    return all(same(result.as_numpy(k), v) for k, v in expected.items())


def oip_bodies(model: OnnxModel, raw) -> dict[str, tuple[bytes, str, str]]:
    """/v2 request bodies for one input, as tritonclient makes them: binary BYTES, and JSON tensors
    (the preprocessed FP32 tensor of an image model; the texts of a text model): (body, type, headers)."""
    import tritonclient.http as triton
    from ftdeploy.tasks.base import feeds

    client = triton.InferenceServerClient
    body, length = client.generate_request_body(oip_inputs(model, raw))
    spec = model.task.codec.tensor_inputs(model)[0]
    if spec.datatype == "BYTES":
        x = triton.InferInput(spec.name, [1], "BYTES")
        x.set_data_from_numpy(np.array(model.task.codec.encode_tensor([raw], model).data, dtype=object), binary_data=False)
    else:
        array = next(iter(feeds(model.preprocess([raw]), model.input_names).values()))
        x = triton.InferInput(spec.name, list(array.shape), "FP32")
        x.set_data_from_numpy(array, binary_data=False)
    json_body, _ = client.generate_request_body([x], [triton.InferRequestedOutput(o.name, binary_data=False)
                                                      for o in model.task.codec.tensor_outputs(model.info)])
    return {"binary": (body, "application/octet-stream", f"Inference-Header-Content-Length: {length}\r\n"),
            "json": (json_body, "application/json", "")}


def overhead_c1(port: int, model: OnnxModel, raw_inputs: list, bodies, n: int, rounds: int = 10) -> dict:
    """At concurrency 1, on the same inputs in alternating rounds: the raw in-process call, /v1, and /v2
    with binary and with JSON tensors, all sent by the same minimal HTTP client."""
    v2 = [oip_bodies(model, r) for r in raw_inputs[:200]]
    tallies = {k: Tally() for k in ("raw", "v1", "v2_binary", "v2_json")}
    per_round = -(-n // rounds)

    async def send(kind: str, indices) -> None:
        conn = Connection(port)
        tally = tallies[kind]
        start = time.perf_counter()
        for i in indices:
            if kind == "v1":
                body, ctype = bodies[i % len(bodies)]
                path, headers = "/v1/predict", ""
            else:
                body, ctype, headers = v2[i % len(v2)]["binary" if kind == "v2_binary" else "json"]
                path = "/v2/models/model/infer"
            t0 = time.perf_counter()
            status, _ = await conn.post(path, body, ctype, headers)
            tally.latencies.append(time.perf_counter() - t0)
            tally.sent += 1
            tally.ok += status == 200
            tally.errors += status != 200
        tally.wall += time.perf_counter() - start
        conn.close()

    for r in range(rounds):
        indices = range(r * per_round, (r + 1) * per_round)
        in_process(model, raw_inputs, indices, tallies["raw"])
        for kind in ("v1", "v2_binary", "v2_json"):
            asyncio.run(send(kind, indices))
    return {k: t.result(1) for k, t in tallies.items()}


def stats_of(url: str, name: str = "model") -> dict:
    return httpx.get(f"{url}/v2/models/{name}/stats").json()["model_stats"]


def server_split(before: list, after: list) -> dict:
    """Microseconds per request in each of the server's stages over a phase (every version's stats)."""
    def totals(stats):
        out: dict = {}
        for s in stats:
            for kind, v in s["inference_stats"].items():
                count, ns = out.get(kind, (0, 0))
                out[kind] = (count + v["count"], ns + v["ns"])
        return out

    a, b = totals(before), totals(after)
    requests = b["success"][0] - a.get("success", (0, 0))[0]
    return {f"{kind}_us": (b[kind][1] - a.get(kind, (0, 0))[1]) / max(1, requests) / 1000
            for kind in ("queue", "compute_input", "compute_infer", "compute_output", "success")} | {"requests": requests}


def tritonclient_load(url: str, model: OnnxModel, raw_inputs: list, expected: list, n: int, concurrency: int,
                      on_answer=None) -> list[dict]:
    """``n`` requests from ``concurrency`` threads, each with its own tritonclient HTTP client (binary
    tensors, as it sends them by default). One record per request: start and end time, the version
    that answered, failures and mismatches against ``expected`` (per version: {version: [tensors]})."""
    import tritonclient.http as triton

    inputs = [oip_inputs(model, r) for r in raw_inputs]
    records: list[dict] = []
    counter, lock = iter(range(n)), threading.Lock()

    def worker() -> None:
        client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    result = client.infer("model", inputs[i % len(inputs)])
                    version = result.get_response()["model_version"]
                    answers = expected.get(version)
                    record = {"start": t0, "end": time.perf_counter(), "version": version, "error": None,
                              "match": answers is not None and same_tensors(result, answers[i % len(inputs)])}
                except Exception as e:  # tritonclient raises its own and the socket's errors
                    record = {"start": t0, "end": time.perf_counter(), "version": None, "error": str(e)[:200], "match": False}
                with lock:
                    records.append(record)
                if on_answer:
                    on_answer(len(records))
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarize(records: list[dict], concurrency: int) -> dict:
    ms = np.asarray([(r["end"] - r["start"]) * 1000 for r in records if r["error"] is None])
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    return {"requests": len(records), "concurrency": concurrency, "errors": sum(r["error"] is not None for r in records),
            "mismatched_predictions": sum(r["error"] is None and not r["match"] for r in records),
            "throughput": len(ms) / wall, **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}}


def protocol_calls(url: str, model: OnnxModel, raw, v1_body: tuple[bytes, str]) -> dict[str, str]:
    """Every call of the protocol through tritonclient, once: "ok" or what went wrong. The
    classification extension (where the task answers one score per label) must equal /v1's top-k."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    outputs = [o.name for o in model.task.codec.tensor_outputs(model.info)]
    checks = {
        "is_server_live": lambda: client.is_server_live(),
        "is_server_ready": lambda: client.is_server_ready(),
        "is_model_ready": lambda: client.is_model_ready("model") and client.is_model_ready("model", "1"),
        "get_server_metadata": lambda: "binary_tensor_data" in client.get_server_metadata()["extensions"],
        "get_model_metadata": lambda: [o["name"] for o in client.get_model_metadata("model")["outputs"]] == outputs,
        "get_model_config": lambda: client.get_model_config("model")["platform"] == "onnxruntime_onnx",
        "get_model_repository_index": lambda: client.get_model_repository_index()[0]["state"] == "READY",
        "infer_binary": lambda: same_tensors(client.infer("model", oip_inputs(model, raw)), oip_expected(model, raw)),
        "infer_json": lambda: same_tensors(client.infer("model", oip_inputs(model, raw, binary=False), outputs=[
            triton.InferRequestedOutput(o, binary_data=False) for o in outputs]), oip_expected(model, raw)),
        "infer_version_1": lambda: client.infer("model", oip_inputs(model, raw), model_version="1"
                                                ).get_response()["model_version"] == "1",
        "get_inference_statistics": lambda: client.get_inference_statistics("model")["model_stats"][0][
            "inference_stats"]["success"]["count"] > 0,
    }

    def wrong_name() -> bool:
        inputs = oip_inputs(model, raw)
        inputs[0]._name = "not_an_input"
        try:
            client.infer("model", inputs)
        except InferenceServerException as e:
            return e.status() == "400" and client.is_server_live()
        return False

    def classification() -> bool | str:
        try:
            result = client.infer("model", oip_inputs(model, raw), outputs=[triton.InferRequestedOutput(outputs[0], class_count=3)])
        except InferenceServerException as e:
            return "not applicable (a 400: this task's outputs are not one score per label)" if e.status() == "400" else str(e)
        answer = json.loads(httpx.post(f"{url}/v1/predict?k=3", content=v1_body[0],
                                       headers={"content-type": v1_body[1]}).content)["predictions"][0]["top_k"]
        return [s.decode() for s in result.as_numpy(outputs[0])[0]] == [
            f"{t['probability']!r}:{t['index']}:{t['label']}" for t in answer]

    checks["infer_wrong_input_name_400"] = wrong_name
    checks["classification_equals_v1_top_k"] = classification
    found = {}
    try:
        for name, check in checks.items():
            try:
                ok = check()
                found[name] = "ok" if ok is True else (ok if isinstance(ok, str) else "failed")
            except Exception as e:  # the report names the call and what it raised
                found[name] = f"{type(e).__name__}: {e}"[:200]
    finally:
        client.close()
    return found


def oip_levels(model_path: Path, common: list[str], model: OnnxModel, raw_inputs, bodies, n: int, levels: list[int]) -> dict:
    server = Server(model_path, *common)
    try:
        results = {"protocol_calls": protocol_calls(server.url, model, raw_inputs[0], bodies[0])}
        results["overhead_c1"] = overhead_c1(server.port, model, raw_inputs, bodies, max(200, n // 5))
        expected = {"1": [oip_expected(model, r) for r in raw_inputs]}
        for c in levels:
            before = stats_of(server.url)
            records = tritonclient_load(server.url, model, raw_inputs, expected, n, c)
            results[f"c{c}"] = {**summarize(records, c), "server_split": server_split(before, stats_of(server.url))}
        return results
    finally:
        server.stop()


def perturbed_copy(src: Path, dst: Path) -> None:
    """A file whose largest weight tensor is scaled by 1.5: it loads and answers, wrongly."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(src))
    largest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) * 1.5, largest.name))
    onnx.save(graph, str(dst))


def drop_version(repo: Path, number: int, write) -> float:
    """Stage a version beside the others and rename it into place; returns when it landed."""
    staging = repo / "model" / f".staging-{number}"
    staging.mkdir()
    write(staging / "model.onnx")
    staging.rename(repo / "model" / str(number))
    return time.perf_counter()


def swap_scenario(model_path: Path, common: list[str], model: OnnxModel, raw_inputs: list, n: int, concurrency: int,
                  poll_seconds: float, workers: int) -> dict:
    """A repository served with ``--poll-seconds``; under load, version 2 (the export's INT8 file when
    there is one, else a copy) is dropped in at 30 % of the requests, a corrupt file as version 3 at
    60 %, a perturbed one as version 4 at 75 %."""
    import shutil
    import tempfile

    v2_source = model_path.parent / "model.int8.onnx"
    v2_source = v2_source if v2_source.is_file() and v2_source != model_path else model_path
    expected = {"1": [oip_expected(model, r) for r in raw_inputs],
                "2": [oip_expected(OnnxModel(v2_source, 1), r) for r in raw_inputs]}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "model" / "1").mkdir(parents=True)
        shutil.copy(model_path, repo / "model" / "1" / "model.onnx")
        server = Server(repo, *common, "--poll-seconds", str(poll_seconds), "--workers", str(workers))
        events: dict[str, float] = {}
        plan = [(0.3, "v2", lambda: drop_version(repo, 2, lambda p: shutil.copy(v2_source, p))),
                (0.6, "v3_corrupt", lambda: drop_version(repo, 3, lambda p: p.write_bytes(model_path.read_bytes()[:4096]))),
                (0.75, "v4_perturbed", lambda: drop_version(repo, 4, lambda p: perturbed_copy(model_path, p)))]
        lock = threading.Lock()

        def on_answer(answered: int) -> None:
            with lock:
                for share, name, act in plan:
                    if name not in events and answered >= share * n:
                        events[name] = act()

        try:
            records = tritonclient_load(server.url, model, raw_inputs, expected, n, concurrency, on_answer)
            time.sleep(2 * poll_seconds)  # a version dropped near the end has been read by now
            index = httpx.get(f"{server.url}/v2/repository/index").json()
        finally:
            server.stop()
    start = time.perf_counter()  # what a worker spends on a new version before it routes to it
    loaded = OnnxModel(v2_source, 1)
    loaded.check_answers()
    loaded.predict(raw_inputs[:1])
    load_s = time.perf_counter() - start
    dropped = events["v2"]
    late_v1 = [r["start"] - dropped for r in records if r["version"] == "1" and r["start"] > dropped]
    first_v2 = min((r["end"] - dropped for r in records if r["version"] == "2"), default=None)
    return {**summarize(records, concurrency), "poll_seconds": poll_seconds, "workers": workers,
            "v2_file": v2_source.name,
            "answers_by_version": {v: sum(r["version"] == v for r in records) for v in ("1", "2", "3", "4")},
            "answers_naming_no_version": sum(r["error"] is None and r["version"] is None for r in records),
            "first_v2_answer_after_drop_s": first_v2,
            "last_v1_request_sent_after_drop_s": max(late_v1, default=0.0),
            "load_and_check_s": load_s,
            "repository_index": index}


def main() -> None:
    try:  # the client shares the server's cores: its own event loop should cost as little as the server's
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (the client needs a core too)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--workers", default=None,
                        help="compare server worker counts side by side instead, e.g. 1,2 (--threads each)")
    parser.add_argument("--drain", action="store_true", help="instead: SIGTERM in the middle of the load")
    parser.add_argument("--drain-seconds", type=float, default=1.0, help="the server's --drain-seconds in --drain")
    parser.add_argument("--client", choices=("keepalive", "urllib"), default="keepalive",
                        help="--drain: keep-alive connections, or urllib's new connection per request")
    parser.add_argument("--signal-at", type=float, default=0.5,
                        help="--drain: SIGTERM once this share of the requests is answered")
    parser.add_argument("--protocol", choices=("v1", "oip"), default="v1",
                        help="oip: the Open Inference Protocol through tritonclient (see above)")
    parser.add_argument("--concurrency-levels", default="1,4,16", help="--protocol oip: concurrency levels")
    parser.add_argument("--swap", action="store_true", help="--protocol oip: version swaps under load (see above)")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="--swap: the server's --poll-seconds")
    parser.add_argument("--server-workers", type=int, default=2, help="--swap: the server's --workers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model = OnnxModel(args.model, threads=args.threads)
    raw_inputs, bodies, expected = requests_for(model, args.model)
    common = ["--threads", str(args.threads), "--max-wait-ms", str(args.max_wait_ms), "--max-batch-size",
              str(args.max_batch_size), "--drain-seconds", "0"]
    columns = [("run", "run", ""), ("requests", "requests", "d"), ("answered_200", "200", "d"), ("errors", "errors", "d"),
               ("refused", "refused", "d"), ("reset", "reset", "d"), ("mismatched_predictions", "wrong", "d"),
               ("near_threshold_excused", "near-ties", "d"),
               ("throughput", "req/s", ".1f"), ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f")]
    if args.protocol == "oip" and args.swap:
        result = swap_scenario(args.model, common, model, raw_inputs, args.requests, args.concurrency, args.poll_seconds,
                               args.server_workers)
        summary = {"zero_failed": result["errors"] == 0 and result["mismatched_predictions"] == 0
                   and result["answers_naming_no_version"] == 0,
                   "switched_within_one_poll": result["last_v1_request_sent_after_drop_s"]
                   <= args.poll_seconds + result["load_and_check_s"],
                   "bad_versions_refused": result["answers_by_version"]["3"] == result["answers_by_version"]["4"] == 0
                   and {r["version"] for r in result["repository_index"] if r["state"] == "UNAVAILABLE"} == {"3", "4"}}
        print(format_table([{"run": f"swap under load, c{args.concurrency}, --workers {args.server_workers}", **result}],
                           [c for c in columns if c[0] not in ("answered_200", "refused", "reset", "near_threshold_excused")]
                           + [("p90_ms", "p90 ms", ".2f"), ("p95_ms", "p95 ms", ".2f")]))
        print(f"\nanswers by version {result['answers_by_version']}; first v2 answer {result['first_v2_answer_after_drop_s']:.2f} s "
              f"after the drop; last request answered by v1 was sent {result['last_v1_request_sent_after_drop_s']:.2f} s "
              f"after it (--poll-seconds {args.poll_seconds}; loading and checking the file takes "
              f"{result['load_and_check_s']:.2f} s)")
        for row in result["repository_index"]:
            print(f"  {row['name']} v{row['version']}: {row['state']} {row.get('reason', '')[:160]}")
        print(", ".join(f"{k}: {v}" for k, v in summary.items()))
        write_json(args, {"swap": result}, summary)
        return
    if args.protocol == "oip":
        levels = [int(c) for c in args.concurrency_levels.split(",")]
        results = oip_levels(args.model, common, model, raw_inputs, bodies, args.requests, levels)
        over = results["overhead_c1"]
        p50 = {k: v["p50_ms"] for k, v in over.items()}
        summary = {"v2_binary_minus_v1_p50_ms": p50["v2_binary"] - p50["v1"],
                   "v2_binary_minus_raw_p50_ms": p50["v2_binary"] - p50["raw"],
                   "v2_json_minus_v1_p50_ms": p50["v2_json"] - p50["v1"],
                   "zero_errors": all(results[f"c{c}"]["errors"] == 0 and results[f"c{c}"]["mismatched_predictions"] == 0
                                      for c in levels)}
        print("tritonclient, every call: " + ", ".join(f"{k}: {v}" for k, v in results["protocol_calls"].items()) + "\n")
        summary["every_call_ok"] = all(v == "ok" or v.startswith("not applicable") for v in results["protocol_calls"].values())
        print(format_table([{"run": name, **r} for name, r in over.items()],
                           [("run", "c1, one HTTP client", ""), ("requests", "requests", "d"), ("errors", "errors", "d"),
                            ("p50_ms", "p50 ms", ".3f"), ("p99_ms", "p99 ms", ".3f")]))
        rows = [{"run": f"tritonclient c{c}", **results[f"c{c}"], **results[f"c{c}"]["server_split"]} for c in levels]
        print()
        print(format_table(rows, [("run", "run", ""), ("requests", "requests", "d"), ("errors", "errors", "d"),
                                  ("mismatched_predictions", "wrong", "d"), ("throughput", "req/s", ".1f"),
                                  ("p50_ms", "p50 ms", ".2f"), ("p90_ms", "p90 ms", ".2f"), ("p95_ms", "p95 ms", ".2f"),
                                  ("p99_ms", "p99 ms", ".2f"), ("queue_us", "queue us", ".0f"),
                                  ("compute_input_us", "input us", ".0f"), ("compute_infer_us", "infer us", ".0f"),
                                  ("compute_output_us", "output us", ".0f")]))
        print("\n" + ", ".join(f"{k}: {v:+.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
        write_json(args, results, summary)
        return
    if args.drain:
        result = drain_scenario(args.model, common, bodies, expected, args.requests, args.concurrency, args.drain_seconds,
                                args.client, args.signal_at)
        summary = {"zero_resets": result["reset"] == 0, "every_answer_200": result["answered_other"] == 0,
                   "exit_code": result["exit_code"], "readyz_during_drain": result.get("readyz_status")}
        print(format_table([{"run": f"{args.client}, SIGTERM at {result['signal_at_answered']} answered", **result}],
                           columns))
        print(f"\nexit code {result['exit_code']}; /readyz during the drain: {result.get('readyz_status')}")
        write_json(args, {"drain": result}, summary)
        return
    if args.workers:
        counts = [int(w) for w in args.workers.split(",")]
        results = workers_side_by_side(args.model, counts, common, bodies, expected, args.requests, args.concurrency)
        base = results[counts[0]]["throughput"]
        summary = {f"throughput_workers{w}_to_workers{counts[0]}": r["throughput"] / base for w, r in results.items()}
        summary["zero_errors"] = all(r["errors"] == 0 and r["mismatched_predictions"] == 0 for r in results.values())
        print(format_table([{"run": f"--workers {w} --threads {args.threads}, c{args.concurrency}", **r}
                            for w, r in results.items()], columns))
        print("\n" + ", ".join(f"{k}: {v:.2f}x" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items()))
        write_json(args, {f"workers{w}": r for w, r in results.items()}, summary)
        return

    results = {}
    for mode, batch in (("batching_on", args.max_batch_size), ("batching_off", 1)):
        server = Server(args.model, *common, "--max-batch-size", str(batch))
        try:
            if mode == "batching_on":
                results["raw_c1"], results["c1"] = raw_and_server_c1(server.port, model, raw_inputs, bodies, expected,
                                                                     max(200, args.requests // 5))
            tally, before = Tally(), server.batch_counts()
            asyncio.run(load(server.port, bodies, expected, range(args.requests), args.concurrency, tally))
            results[mode] = {**tally.result(args.concurrency),
                             "batch_sizes": batches_formed(before, server.batch_counts())}
        finally:
            server.stop()

    raw, c1, on, off = results["raw_c1"], results["c1"], results["batching_on"], results["batching_off"]
    budget = raw["p50_ms"] * 1.2 + 2
    summary = {
        "raw_p50_ms": raw["p50_ms"], "server_c1_p50_ms": c1["p50_ms"], "overhead_budget_ms": budget,
        "overhead_ok": c1["p50_ms"] <= budget,
        "throughput_ratio_c16_to_c1": on["throughput"] / c1["throughput"],
        "batching_on_to_off": on["throughput"] / off["throughput"],
        "zero_errors": all(r["errors"] == 0 and r["mismatched_predictions"] == 0 for r in (c1, on, off)),
    }
    rows = [{"run": name, **r} for name, r in (("raw path (in-process)", raw), ("concurrency 1", c1),
                                                 (f"c{args.concurrency} batching on", on),
                                                 (f"c{args.concurrency} batching off", off))]
    print(format_table(rows, columns))
    print(f"\nraw path p50 {raw['p50_ms']:.2f} ms; server p50 at c1 {c1['p50_ms']:.2f} ms (budget {budget:.2f} ms)")
    print(f"throughput c{args.concurrency}/c1: {summary['throughput_ratio_c16_to_c1']:.2f}x; "
          f"batching on/off: {summary['batching_on_to_off']:.2f}x")
    buckets, previous, counts = on["batch_sizes"]["cumulative_buckets"], 0.0, []
    for bound, cumulative in buckets.items():
        counts.append(f"<={bound}: {cumulative - previous:.0f}")
        previous = cumulative
    print(f"batches formed at c{args.concurrency} with batching on: {on['batch_sizes']['runs']:.0f} runs, "
          f"mean {on['batch_sizes']['mean']:.2f} images ({', '.join(counts)})")
    write_json(args, results, summary)


def write_json(args, results: dict, summary: dict) -> None:
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "machine": machine_info(args.threads),
                                         "command": " ".join(sys.argv), "results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
