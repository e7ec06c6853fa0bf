"""ONNX Runtime FP32 against PyTorch eager: the same model, inputs, threads and timing, in one run.

The model is exported by ftdeploy's own path (dynamo exporter, checks, offline onnxruntime
optimization), then both engines are timed with warm-up and percentiles, alternating rounds so
that machine noise hits both alike.

    python benchmarks/export_latency.py --model torchvision:resnet18 --input-size 224 --json results/export_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
import tempfile
from pathlib import Path

import numpy as np
import torch

from ftdeploy.config import ModelConfig
from ftdeploy.export import export_onnx, finalize, torch_predictor
from ftdeploy.latency import format_table, measure, ort_runner, ort_session
from ftdeploy.machine import machine_info, physical_cores
from ftdeploy.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine, batch size and round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Latency does not depend on the weight values: random init keeps this runnable offline for any model.
    model = build_model(ModelConfig(name=args.model, weights="none"), num_classes=10).model.eval()
    shape = (3, args.input_size, args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw, shipped = Path(tmp) / "model.onnx", Path(tmp) / "shipped.onnx"
        exporter, _ = export_onnx(model, torch.zeros(2, *shape), raw)
        finalize(raw, shipped, {"model": args.model})
        session = ort_session(shipped, args.threads)
        rng = np.random.default_rng(0)
        rows, results = [], {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            batch = rng.standard_normal((bs, *shape), dtype=np.float32)
            torch_run, onnx_run = torch_predictor(model), ort_runner(session, batch)
            torch_p50, onnx_p50 = [], []
            for _ in range(args.rounds):
                torch_p50.append(measure(partial(torch_run, batch), bs, min_seconds=args.seconds).p50)
                onnx_p50.append(measure(onnx_run, bs, min_seconds=args.seconds).p50)
            t, o = statistics.median(torch_p50), statistics.median(onnx_p50)
            results[str(bs)] = {"torch_p50_ms": torch_p50, "onnx_fp32_p50_ms": onnx_p50, "speedup": t / o}
            rows.append({"batch": bs, "torch": t, "onnx": o, "speedup": t / o})
            print(f"batch {bs}: torch {t:.2f} ms, onnxruntime {o:.2f} ms, {t / o:.2f}x", flush=True)
    print()
    print(format_table(rows, [("batch", "batch", "d"), ("torch", "PyTorch eager p50 ms", ".2f"),
                              ("onnx", "ORT FP32 p50 ms", ".2f"), ("speedup", "speedup", ".2f")]))
    info = machine_info(args.threads)
    print(f"\n{args.model} at {args.input_size}x{args.input_size}, exporter {exporter}; machine: {info['cpu']}, "
          f"{args.threads} threads, isa {info['isa']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "input_size": args.input_size, "exporter": exporter,
                                         "machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
