"""Structured pruning, recovery and INT8 against the unpruned FP32 model, in one run.

For each model (fine-tuned on the embedded digits by benchmarks/quantize.py's settings, reused when
already there), ftdeploy prune removes channels down to the MAC target and fine-tunes, then both
runs are exported and quantized. The unpruned FP32 file, the pruned FP32 file and the pruned INT8
file are then timed side by side in this run, under ftdeploy's latency protocol: every speedup is
the median (and range) of per-round ratios against the unpruned FP32 file, never a ratio across runs.
The same code path serves every model.

    python benchmarks/prune.py --json benchmarks/results/prune.json
"""

from __future__ import annotations

import json

from ftdeploy.config import PruneConfig
from ftdeploy.evaluation import EvalData
from ftdeploy.latency import compare, format_table, ort_runner, ort_session, tile_batch
from ftdeploy.machine import physical_cores
from ftdeploy.prune import prune
from ftdeploy.rundir import load_run

from quantize import exported, fine_tuned, models_parser, write_results  # the INT8 benchmark's models


def side_by_side(files: dict[str, str], inputs, seconds: float) -> dict[str, dict]:
    """Batch-1 speedup of every file against ``base`` (the unpruned FP32 file), timed in one comparison."""
    batch = tile_batch(inputs, 1)
    threads = physical_cores()
    result = compare({name: ort_runner(ort_session(path, threads), batch) for name, path in files.items()}, 1,
                     rounds=7, seconds=seconds)
    return {name: {"p50_ms": result.stats[name].p50, **result.speedup("base", name).as_dict()} for name in files}


def main() -> None:
    parser = models_parser(__doc__, models="resnet18,efficientnet_lite0,mobilenet_v3_large")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=7.0, help="timed seconds per file in the final comparison")
    args = parser.parse_args()

    results = {}
    for name in args.models.split(","):
        run_dir, cfg = fine_tuned(name, args.workdir)
        base = exported(run_dir, cfg)
        pruned_dir = run_dir.with_name(f"{name}-pruned{round(100 * args.target_macs)}")
        prune(run_dir, pruned_dir, PruneConfig(target_macs=args.target_macs, finetune_epochs=args.finetune_epochs,
                                               distill_alpha=0.5))
        small = exported(pruned_dir, cfg)
        prune_report = json.loads((pruned_dir / "prune_report.json").read_text())
        fp32, metric = base["variants"]["fp32"], base["metric"]
        files = {"base": fp32["path"], "pruned_fp32": small["variants"]["fp32"]["path"]}
        if "int8" in small["variants"]:
            files["pruned_int8"] = small["variants"]["int8"]["path"]
        timing = side_by_side(files, EvalData.from_run(load_run(run_dir), 64, 1).inputs, args.seconds)
        row = {"macs_ratio": prune_report["ratios"]["macs"], "params_ratio": prune_report["ratios"]["params"],
               "unpruned_fp32_metric": fp32["scores"][metric], "unpruned_fp32_p50_ms": timing["base"]["p50_ms"],
               "unpruned_fp32_bytes": fp32["size_bytes"], "pruned_int8_not_shipped": small["quantization"]["not_shipped_reason"]}
        for variant in ("fp32", "int8"):
            v = small["variants"].get(variant)
            if v:
                t = timing[f"pruned_{variant}"]
                row[f"pruned_{variant}_metric_drop_points"] = 100 * (fp32["scores"][metric] - v["scores"][metric])
                row.update({f"pruned_{variant}_speedup": t["median"], f"pruned_{variant}_speedup_low": t["low"],
                            f"pruned_{variant}_speedup_high": t["high"]})
                row[f"pruned_{variant}_size_reduction"] = fp32["size_bytes"] / v["size_bytes"]
        results[name] = row

    rows = [{"model": k, **v} for k, v in results.items()]
    print()
    print(format_table(rows, [("model", "model", ""), ("macs_ratio", "MACs", ".2f"),
                              ("pruned_fp32_speedup", "pruned FP32 speedup", ".2f"), ("pruned_fp32_speedup_low", "low", ".2f"),
                              ("pruned_fp32_metric_drop_points", "pruned FP32 drop (pts)", "+.2f"),
                              ("pruned_int8_speedup", "pruned INT8 speedup", ".2f"), ("pruned_int8_speedup_low", "low", ".2f"),
                              ("pruned_int8_metric_drop_points", "pruned INT8 drop (pts)", "+.2f"),
                              ("pruned_int8_size_reduction", "INT8 file smaller by", ".1f")]))
    print("\nspeedups and drops are against the unpruned FP32 ONNX model, batch 1, timed side by side in this run")
    write_results(args.json, results, target_macs=args.target_macs)


if __name__ == "__main__":
    main()
