"""INT8 against FP32 in onnxruntime for models fine-tuned on the embedded digits, in one run.

Each model is fine-tuned (ftdeploy train), exported (ftdeploy export) and quantized (ftdeploy
quantize: the preflight, the calibrated static QDQ model and the measured exclusion search), and
the report's FP32 and INT8 figures are tabulated: the batch-1 speedup in the search and in the
final side-by-side measurement (median and interquartile range of per-round ratios), the noise floor, metric
drop, top-1 agreement and size.

    python benchmarks/quantize.py --json benchmarks/results/quantize.json

``--search-paths N`` instead times ``ftdeploy quantize`` itself, on a copy of each FP32 export: the
quick path (``quantize.search=auto``, the default) N times and the full search N times, each a
command of its own. It records the command's wall time and the search's own seconds (what
compare.py's "quantize s" column holds for every contender), the path taken and why, and whether
each quick decision matches each full one: the same configuration, or speedups within the noise floor.

    python benchmarks/quantize.py --search-paths 2 --json benchmarks/results/quantize_search_paths.json
    python benchmarks/quantize.py --search-paths 2 --models efficientnet_lite0,resnet18_128 --json ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
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
    # compare.py's ResNet-18 (128 px, three epochs), where its "quantize s" column was measured
    "resnet18_128": ["model.name=torchvision:resnet18", "model.weights=none", "preprocessing.input_size=128",
                     "preprocessing.resize_size=128", "train.epochs=3", "train.lr=0.001"],
    # timm's MobileNetV3-Large: torchvision's uses BatchNorm momentum 0.01, whose running statistics
    # are still far off after the ~200 steps of a from-scratch digits run (eval accuracy at chance).
    "mobilenet_v3_large": ["model.name=timm:mobilenetv3_large_100", "model.weights=none",
                           "preprocessing.input_size=128", "preprocessing.resize_size=128", "train.epochs=4"],
}


def summarize(report: dict) -> dict:
    fp32, int8, metric = report["variants"]["fp32"], report["variants"].get("int8"), report["metric"]
    q = report["quantization"]
    row = {"metric": metric, "fp32_metric": fp32["scores"][metric], "fp32_p50_ms": fp32["latency_ms"]["1"]["p50"],
           "shipped": q["shipped"], "not_shipped_reason": q["not_shipped_reason"], "chosen": q["chosen"],
           "excluded_nodes": q["excluded_nodes"], "tried": len(q["tried"]), "noise_floor": q["noise_floor"]}
    if int8:
        row.update(int8_metric=int8["scores"][metric], int8_p50_ms=int8["latency_ms"]["1"]["p50"],
                   speedup=q["final_speedup"]["median"], speedup_low=q["final_speedup"]["low"],
                   speedup_high=q["final_speedup"]["high"], search_speedup=q["search_speedup"]["median"],
                   search_final_agree=q["search_final_agree"],
                   metric_drop_points=100 * (fp32["scores"][metric] - int8["scores"][metric]),
                   agreement=int8["agreement"]["decision_agreement"], size_ratio=int8["size_bytes"] / fp32["size_bytes"])
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


def search_paths(export_dir: Path, runs: int) -> dict:
    """``ftdeploy quantize -o`` on ``export_dir``, search=auto then search=full, ``runs`` times each."""
    rows = []
    for search in ("auto", "full"):
        for i in range(runs):
            out = export_dir.with_name(f"quantize-{search}{i}")
            shutil.rmtree(out, ignore_errors=True)
            print(f"   quantize, search={search}, run {i + 1}", flush=True)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "ftdeploy", "quantize", str(export_dir), "-o", str(out),
                                   "--set", f"quantize.search={search}"], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"quantize failed: {done.stderr.strip()[-500:]}")
            q = json.loads((out / "report.json").read_text())["quantization"]
            final = (q.get("final_speedup") or {}).get("median")
            rows.append({"search": search, "run": i + 1, "command_seconds": wall, "search_seconds": q["seconds"],
                         "path": q["search"], "why": q["search_why"], "tried": len(q["tried"]), "chosen": q["chosen"],
                         "shipped": q["shipped"], "final_speedup": final, "noise_floor": q["noise_floor"]})
            print(f"     {wall:.1f} s command, {q['seconds']:.1f} s search: {q['search']}, chose {q['chosen']}, "
                  f"shipped {q['shipped']}" + (f" at {final:.2f}x" if final else ""), flush=True)
    return {"runs": rows, "decisions_match": [
        {"quick_run": a["run"], "full_run": b["run"], "match": same_decision(a, b)}
        for a in rows if a["search"] == "auto" for b in rows if b["search"] == "full"]}


def same_decision(a: dict, b: dict) -> bool:
    """Both refused, or both shipped the same configuration or files whose final speedups lie within
    the larger of the two noise floors of each other."""
    if not (a["shipped"] and b["shipped"]):
        return a["shipped"] == b["shipped"]
    noise = max(a["noise_floor"], b["noise_floor"])
    return a["chosen"] == b["chosen"] or abs(a["final_speedup"] / b["final_speedup"] - 1) <= noise


def models_parser(doc: str, models: str = "efficientnet_lite0,resnet18,mobilenet_v3_large") -> argparse.ArgumentParser:
    """The options of a benchmark over the fine-tuned MODELS: which ones, where their runs live, JSON out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=models, help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_quantize"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--search-paths", type=int, default=0, metavar="N",
                        help="time ftdeploy quantize's quick path and its full search, N runs each")
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
        if args.search_paths:
            export_dir = run_dir / "export"
            if not (export_dir / "report.json").is_file():
                print(f"== {name}: export", flush=True)
                export(run_dir, export_dir, cfg.export)
            print(f"== {name}: quick path and full search", flush=True)
            results[name] = search_paths(export_dir, args.search_paths)
            continue
        print(f"== {name}: export + int8", flush=True)
        report = exported(run_dir, cfg)
        results[name] = summarize(report)
    if args.search_paths:
        for name, r in results.items():
            print(name, [(row["search"], round(row["command_seconds"], 1), round(row["search_seconds"], 1), row["chosen"])
                         for row in r["runs"]], "decisions match:", all(m["match"] for m in r["decisions_match"]))
        return write_results(args.json, results)

    rows = [{"model": k, **v} for k, v in results.items()]
    print()
    print(format_table(rows, [("model", "model", ""), ("fp32_p50_ms", "FP32 p50 ms @1", ".2f"),
                              ("int8_p50_ms", "INT8 p50 ms @1", ".2f"), ("speedup", "INT8 speedup (final)", ".2f"),
                              ("speedup_low", "low", ".2f"), ("speedup_high", "high", ".2f"),
                              ("search_speedup", "speedup in search", ".2f"), ("noise_floor", "noise floor", ".3f"),
                              ("metric_drop_points", "metric drop (pts)", "+.2f"), ("agreement", "agreement", ".4f"),
                              ("size_ratio", "size ratio", ".3f"), ("shipped", "shipped", "")]))
    print()
    write_results(args.json, results)


if __name__ == "__main__":
    main()
