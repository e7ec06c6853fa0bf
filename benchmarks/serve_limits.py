"""What ``ftdeploy serve`` does with hostile uploads, measured on a real server process.

1. A chunked upload of ``--upload-mb`` MB (no Content-Length): the status it gets, how many bytes the
   server read before answering, and the server's resident memory (VmRSS, and its peak VmHWM, from
   /proc) before and after, against ``--max-request-bytes``.
2. Clients that send their whole body before they read the answer (urllib and ``requests``, as most
   scripts use them): a ``--whole-mb`` MB multipart upload with a Content-Length, and chunked; the
   status and JSON each gets (the server answers 413 and reads and discards the rest: a lingering
   close) and the server's memory around them.
3. Small requests at concurrency 1, alone and then beside a client that keeps sending a 6000x6000
   PNG of under 100 KB (36 M pixels: decoding it takes the better part of a second): their p50 and
   p99, alternating rounds of each so that the machine's drift hits both alike.

    python benchmarks/serve_limits.py runs/digits/export/model.onnx --json benchmarks/results/serve_limits.json
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from load_test import Server, requests_for  # noqa: E402

from ftdeploy.latency import format_table  # noqa: E402
from ftdeploy.machine import machine_info  # noqa: E402
from ftdeploy.onnx_model import OnnxModel  # noqa: E402
from ftdeploy.tasks.image import png_bytes  # noqa: E402


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def chunked_upload(port: int, megabytes: int, chunk: int = 65536) -> dict:
    """Send ``megabytes`` MB with Transfer-Encoding: chunked, whole frames only; stop sending once an
    answer has come back."""
    import select

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    frame = b"%x\r\n" % chunk + b"\0" * chunk + b"\r\n"
    sent, response, start = 0, b"", time.perf_counter()
    try:
        while sent < megabytes * 2**20:
            if select.select([sock], [], [], 0)[0]:  # the server answered: no point sending more
                response += sock.recv(65536)
                break
            sock.sendall(frame)
            sent += chunk
        else:
            sock.sendall(b"0\r\n\r\n")
        while b"\r\n\r\n" not in response and (data := sock.recv(65536)):
            response += data
    except (BrokenPipeError, ConnectionResetError) as e:
        response = response or f"HTTP/1.1 none ({type(e).__name__})".encode()
    finally:
        sock.close()
    status = response.split(b" ", 2)[1].decode() if response.startswith(b"HTTP/") else "none"
    return {"status": status, "sent_mb_before_answer": sent / 2**20, "seconds": time.perf_counter() - start}


def whole_body_clients(port: int, megabytes: int, pid: int) -> list[dict]:
    """urllib and ``requests`` uploading ``megabytes`` MB of multipart before reading: what each reads back."""
    import os
    import urllib.error
    import urllib.request

    import requests

    boundary = "b"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + os.urandom(megabytes * 2**20) + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    url = f"http://127.0.0.1:{port}/v1/predict"

    def with_urllib():
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        return 200, None

    def with_requests(chunked: bool):
        data = (body[i:i + 2**16] for i in range(0, len(body), 2**16)) if chunked else body
        r = requests.post(url, data=data, headers=headers, timeout=60)
        return r.status_code, r.json()

    rows = []
    for name, send in (("urllib, Content-Length", with_urllib), ("requests, Content-Length", lambda: with_requests(False)),
                       ("requests, chunked", lambda: with_requests(True))):
        before = memory_kb(pid)
        start = time.perf_counter()
        try:
            status, answer = send()
        except OSError as e:  # a reset: what clients got before the lingering close
            status, answer = f"none ({type(e).__name__})", None
        after = memory_kb(pid)
        rows.append({"client": name, "status": status, "error_code": (answer or {}).get("error", {}).get("code"),
                     "seconds": time.perf_counter() - start, "rss_growth_mb": (after["VmRSS"] - before["VmRSS"]) / 1024,
                     "peak_rss_growth_mb": (after["VmHWM"] - before["VmHWM"]) / 1024})
    return rows


def huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def c1_latencies(port: int, bodies: list[bytes], seconds: float) -> list[float]:
    import httpx

    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, trust_env=False) as client:
        end, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            r = client.post("/v1/predict", content=bodies[i % len(bodies)], headers={"content-type": "image/png"})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            i += 1
    return times


def beside_huge_images(port: int, bodies: list[bytes], big: bytes, rounds: int, seconds: float) -> dict:
    import httpx

    alone, beside, big_answers = [], [], []
    for _ in range(rounds):
        alone += c1_latencies(port, bodies, seconds)
        stop = threading.Event()

        def send_big():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as client:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = client.post("/v1/predict", content=big, headers={"content-type": "image/png"})
                    big_answers.append((r.status_code, time.perf_counter() - t0))

        sender = threading.Thread(target=send_big)
        sender.start()
        time.sleep(0.05)
        beside += c1_latencies(port, bodies, seconds)
        stop.set()
        sender.join()

    def stats(times):
        ms = np.asarray(times) * 1000
        return {"requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max())}

    return {"alone": stats(alone), "beside_huge_png": stats(beside),
            "huge_png": {"bytes": len(big), "pixels": 6000 * 6000, "answered": len(big_answers),
                         "statuses": sorted({s for s, _ in big_answers}),
                         "mean_seconds": float(np.mean([t for _, t in big_answers])) if big_answers else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--upload-mb", type=int, default=100)
    parser.add_argument("--whole-mb", type=int, default=60, help="the uploads of clients that send everything first")
    parser.add_argument("--max-request-bytes", type=int, default=None, help="the server's (default: its own, 32 MiB)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round and phase")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    limit = args.max_request_bytes or 32 * 2**20
    server = Server(args.model, "--threads", "1", "--drain-seconds", "0",
                    *(["--max-request-bytes", str(args.max_request_bytes)] if args.max_request_bytes else []))
    try:
        before = memory_kb(server.proc.pid)
        upload = chunked_upload(server.port, args.upload_mb)
        time.sleep(0.5)
        after = memory_kb(server.proc.pid)
        upload.update(rss_before_mb=before["VmRSS"] / 1024, rss_after_mb=after["VmRSS"] / 1024,
                      peak_rss_growth_mb=(after["VmHWM"] - before["VmHWM"]) / 1024,
                      rss_growth_mb=(after["VmRSS"] - before["VmRSS"]) / 1024,
                      limit_mb=limit / 2**20)
        print(f"chunked upload of {args.upload_mb} MB: HTTP {upload['status']} after {upload['sent_mb_before_answer']:.1f} MB "
              f"sent; server RSS {upload['rss_before_mb']:.0f} -> {upload['rss_after_mb']:.0f} MB, peak grew "
              f"{upload['peak_rss_growth_mb']:.1f} MB (limit {upload['limit_mb']:.0f} MB)")
        whole = whole_body_clients(server.port, args.whole_mb, server.proc.pid)
        print(format_table(whole, [("client", f"{args.whole_mb} MB multipart, sent whole", ""), ("status", "status", ""),
                                   ("error_code", "error", ""), ("seconds", "s", ".2f"),
                                   ("rss_growth_mb", "RSS growth MB", ".1f"),
                                   ("peak_rss_growth_mb", "peak RSS growth MB", ".1f")]))
        images = [png_bytes(img) for img in requests_for(OnnxModel(args.model, 1), args.model, 64)[0]]
        latency = beside_huge_images(server.port, images, huge_png(), args.rounds, args.seconds)
    finally:
        server.stop()
    rows = [{"phase": name, **latency[name]} for name in ("alone", "beside_huge_png")]
    print(format_table(rows, [("phase", "small requests, c=1", ""), ("requests", "requests", "d"),
                              ("p50_ms", "p50 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"), ("max_ms", "max ms", ".1f")]))
    print(f"6000x6000 PNG ({latency['huge_png']['bytes']} bytes): {latency['huge_png']['answered']} answered "
          f"{latency['huge_png']['statuses']}, {latency['huge_png']['mean_seconds'] or 0:.2f} s each")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "machine": machine_info(1), "command": " ".join(sys.argv),
                                         "chunked_upload": upload, "whole_body_clients": whole,
                                         "c1_beside_huge_png": latency}, indent=2))


if __name__ == "__main__":
    main()
