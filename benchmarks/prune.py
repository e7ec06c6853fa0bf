"""Structured pruning, recovery and INT8 against the unpruned FP32 model, in one run.

For each model (fine-tuned on the embedded digits by benchmarks/quantize.py's settings, reused when
already there), ftdeploy prune removes channels down to the MAC target and fine-tunes, then
ftdeploy export --quantize exports both runs. The same code path serves every model.

    python benchmarks/prune.py --json benchmarks/results/prune.json
"""

from __future__ import annotations

import json

from ftdeploy.config import PruneConfig
from ftdeploy.latency import format_table
from ftdeploy.prune import prune_run

from quantize import exported, fine_tuned, models_parser, write_results  # the INT8 benchmark's models


def main() -> None:
    parser = models_parser(__doc__, models="resnet18,efficientnet_lite0,mobilenet_v3_large")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()

    results = {}
    for name in args.models.split(","):
        run_dir, cfg = fine_tuned(name, args.workdir)
        base = exported(run_dir, cfg) if not (run_dir / "export" / "report.json").is_file() else \
            json.loads((run_dir / "export" / "report.json").read_text())
        pruned_dir = run_dir.with_name(f"{name}-pruned{round(100 * args.target_macs)}")
        prune_run(run_dir, pruned_dir, PruneConfig(target_macs=args.target_macs, finetune_epochs=args.finetune_epochs,
                                                   distill_alpha=0.5))
        small = exported(pruned_dir, cfg)
        prune_report = json.loads((pruned_dir / "prune_report.json").read_text())
        fp32 = base["variants"]["fp32"]
        row = {"macs_ratio": prune_report["ratios"]["macs"], "params_ratio": prune_report["ratios"]["params"],
               "unpruned_fp32_accuracy": fp32["accuracy"], "unpruned_fp32_p50_ms": fp32["latency_ms"]["1"]["p50"],
               "unpruned_fp32_bytes": fp32["size_bytes"]}
        for variant in ("fp32", "int8"):
            v = small["variants"].get(variant)
            if v:
                row[f"pruned_{variant}_accuracy_drop_points"] = 100 * (fp32["accuracy"] - v["accuracy"])
                row[f"pruned_{variant}_speedup"] = fp32["latency_ms"]["1"]["p50"] / v["latency_ms"]["1"]["p50"]
                row[f"pruned_{variant}_size_reduction"] = fp32["size_bytes"] / v["size_bytes"]
        results[name] = row

    rows = [{"model": k, **v} for k, v in results.items()]
    print()
    print(format_table(rows, [("model", "model", ""), ("macs_ratio", "MACs", ".2f"),
                              ("pruned_fp32_speedup", "pruned FP32 speedup", ".2f"),
                              ("pruned_fp32_accuracy_drop_points", "pruned FP32 drop (pts)", "+.2f"),
                              ("pruned_int8_speedup", "pruned INT8 speedup", ".2f"),
                              ("pruned_int8_accuracy_drop_points", "pruned INT8 drop (pts)", "+.2f"),
                              ("pruned_int8_size_reduction", "INT8 file smaller by", ".1f")]))
    print("\nspeedups and drops are against the unpruned FP32 ONNX model, batch 1")
    write_results(args.json, results, target_macs=args.target_macs)


if __name__ == "__main__":
    main()
