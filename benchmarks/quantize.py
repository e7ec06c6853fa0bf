"""INT8 against FP32 in onnxruntime for models fine-tuned on the embedded digits, in one run.

Each model is fine-tuned (ftdeploy train), exported and quantized (ftdeploy export --quantize: the
preflight, the calibrated static QDQ model and the measured exclusion search), and the report's
FP32 and INT8 figures are tabulated: batch-1 latency ratio, accuracy drop, top-1 agreement, size.

    python benchmarks/quantize.py --json benchmarks/results/quantize.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftdeploy.config import QuantizeConfig, load_config
from ftdeploy.errors import GateError
from ftdeploy.export import export_run
from ftdeploy.latency import format_table
from ftdeploy.machine import machine_info
from ftdeploy.train import train

# name -> overrides of configs/digits.yaml (EfficientNet-Lite0 is the embedded default itself)
MODELS = {
    "efficientnet_lite0": [],
    "resnet18": ["model.name=torchvision:resnet18", "model.weights=none", "preprocessing.input_size=224",
                 "preprocessing.resize_size=224", "train.epochs=2", "train.lr=0.001"],
    # timm's MobileNetV3-Large: torchvision's uses BatchNorm momentum 0.01, whose running statistics
    # are still far off after the ~200 steps of a from-scratch digits run (eval accuracy at chance).
    "mobilenet_v3_large": ["model.name=timm:mobilenetv3_large_100", "model.weights=none",
                           "preprocessing.input_size=128", "preprocessing.resize_size=128", "train.epochs=4"],
}


def summarize(report: dict) -> dict:
    fp32, int8 = report["variants"]["fp32"], report["variants"].get("int8")
    row = {"fp32_accuracy": fp32["accuracy"], "fp32_p50_ms": fp32["latency_ms"]["1"]["p50"],
           "gates_passed": report["gates"]["passed"], "failures": report["gates"]["failures"],
           "chosen": report["quantization"]["chosen"], "excluded_nodes": report["quantization"]["excluded_nodes"],
           "tried": len(report["quantization"]["tried"])}
    if int8:
        row.update(int8_accuracy=int8["accuracy"], int8_p50_ms=int8["latency_ms"]["1"]["p50"],
                   speedup=fp32["latency_ms"]["1"]["p50"] / int8["latency_ms"]["1"]["p50"],
                   accuracy_drop_points=100 * (fp32["accuracy"] - int8["accuracy"]),
                   top1_agreement=int8["parity"]["top1_agreement"], size_ratio=int8["size_bytes"] / fp32["size_bytes"])
        chosen = next(t for t in report["quantization"]["tried"] if t["name"] == row["chosen"])
        row["search_speedup"] = chosen["speedup"]
    return row


def fine_tuned(name: str, workdir: Path):
    """(run directory, config) of ``name`` fine-tuned on the digits, trained now unless already there."""
    run_dir = workdir / name
    cfg = load_config("configs/digits.yaml", [*MODELS[name], f"output_dir={run_dir}", "train.progress=false"])
    if not (run_dir / "metrics.json").is_file():
        print(f"== {name}: fine-tuning", flush=True)
        train(cfg)
    return run_dir, cfg


def exported(run_dir: Path, cfg) -> dict:
    """Export + INT8 report of a run; a failed gate still leaves its report, which is returned."""
    try:
        return export_run(run_dir, run_dir / "export", cfg.export, QuantizeConfig())
    except GateError as e:
        print(e)
        return json.loads((run_dir / "export" / "report.json").read_text())


def models_parser(doc: str, models: str = ",".join(MODELS)) -> argparse.ArgumentParser:
    """The options of a benchmark over the fine-tuned MODELS: which ones, where their runs live, JSON out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_quantize"))
    parser.add_argument("--json", type=Path, default=None)
    return parser


def write_results(path: Path | None, results: dict, **extra) -> None:
    """Print the machine the figures come from, and write them with it as JSON when ``path`` is given."""
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['threads']} threads, isa {info['isa']}")
    if path:
        path.write_text(json.dumps({"machine": info, **extra, "results": results}, indent=2))


def main() -> None:
    args = models_parser(__doc__).parse_args()

    results = {}
    for name in args.models.split(","):
        run_dir, cfg = fine_tuned(name, args.workdir)
        print(f"== {name}: export + int8", flush=True)
        report = exported(run_dir, cfg)
        results[name] = summarize(report)

    rows = [{"model": k, **v} for k, v in results.items()]
    print()
    print(format_table(rows, [("model", "model", ""), ("fp32_p50_ms", "FP32 p50 ms @1", ".2f"),
                              ("int8_p50_ms", "INT8 p50 ms @1", ".2f"), ("speedup", "INT8 speedup", ".2f"),
                              ("search_speedup", "speedup in search", ".2f"),
                              ("accuracy_drop_points", "acc drop (pts)", "+.2f"), ("top1_agreement", "agreement", ".4f"),
                              ("size_ratio", "size ratio", ".3f"), ("gates_passed", "shipped", "")]))
    print()
    write_results(args.json, results)


if __name__ == "__main__":
    main()
