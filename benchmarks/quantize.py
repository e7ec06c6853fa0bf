"""INT8 against FP32 in onnxruntime for models fine-tuned on the embedded digits, in one run.

Each model is fine-tuned (ftdeploy train), exported (ftdeploy export) and quantized (ftdeploy
quantize: the preflight, the calibrated static QDQ model and the measured exclusion search), and
the report's FP32 and INT8 figures are tabulated: the batch-1 speedup in the search and in the
final side-by-side measurement (median and interquartile range of per-round ratios), the noise floor, accuracy
drop, top-1 agreement and size.

    python benchmarks/quantize.py --json benchmarks/results/quantize.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ftdeploy.config import QuantizeConfig, load_config
from ftdeploy.export import export
from ftdeploy.latency import format_table
from ftdeploy.machine import machine_info
from ftdeploy.quantize import quantize
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
    q = report["quantization"]
    row = {"fp32_accuracy": fp32["accuracy"], "fp32_p50_ms": fp32["latency_ms"]["1"]["p50"], "shipped": q["shipped"],
           "not_shipped_reason": q["not_shipped_reason"], "chosen": q["chosen"], "excluded_nodes": q["excluded_nodes"],
           "tried": len(q["tried"]), "noise_floor": q["noise_floor"]}
    if int8:
        row.update(int8_accuracy=int8["accuracy"], int8_p50_ms=int8["latency_ms"]["1"]["p50"],
                   speedup=q["final_speedup"]["median"], speedup_low=q["final_speedup"]["low"],
                   speedup_high=q["final_speedup"]["high"], search_speedup=q["search_speedup"]["median"],
                   search_final_agree=q["search_final_agree"],
                   accuracy_drop_points=100 * (fp32["accuracy"] - int8["accuracy"]),
                   top1_agreement=int8["parity"]["top1_agreement"], size_ratio=int8["size_bytes"] / fp32["size_bytes"])
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
    """Export + quantize a run; returns the export directory's report (INT8 refused or not)."""
    out = export(run_dir, run_dir / "export", cfg.export)
    quantize(out, None, QuantizeConfig())
    return json.loads((out / "report.json").read_text())


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
                              ("int8_p50_ms", "INT8 p50 ms @1", ".2f"), ("speedup", "INT8 speedup (final)", ".2f"),
                              ("speedup_low", "low", ".2f"), ("speedup_high", "high", ".2f"),
                              ("search_speedup", "speedup in search", ".2f"), ("noise_floor", "noise floor", ".3f"),
                              ("accuracy_drop_points", "acc drop (pts)", "+.2f"), ("top1_agreement", "agreement", ".4f"),
                              ("size_ratio", "size ratio", ".3f"), ("shipped", "shipped", "")]))
    print()
    write_results(args.json, results)


if __name__ == "__main__":
    main()
