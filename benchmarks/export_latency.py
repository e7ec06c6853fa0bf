"""ONNX Runtime FP32 against PyTorch eager: the same model, inputs, threads and timing, in one run.

The model is exported by ftdeploy's own path (dynamo exporter, checks, offline onnxruntime
optimization), then both engines are timed under ftdeploy's latency protocol: alternating blocks
with a settle gap and warm-up at each switch, the speedup as the median of per-round ratios.

    python benchmarks/export_latency.py --model torchvision:resnet18 --input-size 224 --json results/export_latency.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ftdeploy.config import ModelConfig
from ftdeploy.conversion import export_onnx, finalize
from ftdeploy.evaluation import torch_predictor
from ftdeploy.latency import compare, format_table, ort_runner, ort_session, session_policy
from ftdeploy.machine import machine_info, physical_cores
from ftdeploy.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per engine and batch size, in all")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Latency does not depend on the weight values: random init keeps this runnable offline for any model.
    model = build_model(ModelConfig(name=args.model, weights="none"), num_classes=10).model.eval()
    shape = (3, args.input_size, args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw, shipped = Path(tmp) / "model.onnx", Path(tmp) / "shipped.onnx"
        exporter, _ = export_onnx(model, [torch.zeros(2, *shape)], raw)
        finalize(raw, shipped, {"model": args.model})
        session = ort_session(shipped, args.threads)
        rng = np.random.default_rng(0)
        rows, results = [], {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            batch = rng.standard_normal((bs, *shape), dtype=np.float32)
            predict = torch_predictor(model)
            result = compare({"torch": lambda: predict(batch), "onnx": ort_runner(session, batch)}, bs,
                             rounds=args.rounds, seconds=args.seconds)
            speedup = result.speedup("torch", "onnx")
            t, o = result.stats["torch"].p50, result.stats["onnx"].p50
            results[str(bs)] = {"torch_p50_ms": t, "onnx_fp32_p50_ms": o, "speedup": speedup.as_dict()}
            rows.append({"batch": bs, "torch": t, "onnx": o, "speedup": speedup.median, "low": speedup.low,
                         "high": speedup.high})
            print(f"batch {bs}: torch {t:.2f} ms, onnxruntime {o:.2f} ms, {speedup.median:.2f}x "
                  f"[{speedup.low:.2f}-{speedup.high:.2f}]", flush=True)
    print()
    print(format_table(rows, [("batch", "batch", "d"), ("torch", "PyTorch eager p50 ms", ".2f"),
                              ("onnx", "ORT FP32 p50 ms", ".2f"), ("speedup", "speedup", ".2f"), ("low", "low", ".2f"),
                              ("high", "high", ".2f")]))
    info = machine_info(args.threads)
    print(f"\n{args.model} at {args.input_size}x{args.input_size}, exporter {exporter}; machine: {info['cpu']}, "
          f"{args.threads} threads, isa {info['isa']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "input_size": args.input_size, "exporter": exporter,
                                         "machine": info, "session": session_policy(args.threads),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
