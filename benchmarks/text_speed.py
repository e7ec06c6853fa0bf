"""Text model speed (a text classifier or a token classifier), one run: PyTorch eager, ORT FP32, INT8
and (optionally) a pruned model's FP32 and INT8, all at batch 1 on real validation texts, timed side
by side under the latency protocol (alternating blocks, per-round ratios, an A/A session for the
noise floor), padded to each of ``--lengths`` tokens and at each text's own length. The task's metric
of every variant on the same validation texts (with its interval, where the task gives one).

    ftdeploy run --config configs/text.yaml          # runs/text/export: model.onnx (+ model.int8.onnx)
    python benchmarks/text_speed.py runs/text/export [--pruned runs/text-pruned/export] --json out.json
    ftdeploy run --config configs/ner.yaml
    python benchmarks/text_speed.py runs/ner/export --lengths 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ftdeploy.evaluation import EvalData, onnx_predictor, torch_predictor
from ftdeploy.latency import compare, format_table, ort_runner
from ftdeploy.machine import machine_info, physical_cores
from ftdeploy.onnx_model import open_session
from ftdeploy.rundir import load_export


class Cycle:
    """Each call runs the next sentence (batch 1): every variant sees the same sentences in turn."""

    def __init__(self, make, sentences):
        self.calls = [make(sentences[i:i + 1]) for i in range(len(sentences))]
        self.i = 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.calls)
        return self.calls[self.i]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--pruned", type=Path, default=None, help="the export directory of a pruned run")
    parser.add_argument("--sentences", type=int, default=64, help="sentences cycled through in the timing")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per variant and shape")
    parser.add_argument("--lengths", default="128,32", help="token counts the texts are padded (or cut) to, besides their own")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    threads = physical_cores()
    torch.set_num_threads(threads)
    source = load_export(args.export)
    data = EvalData.from_export(source, 2000, calibration_samples=1)
    run = source.load_source_run()
    model = run.load_model()
    predictors = {"torch eager": torch_predictor(model, run.input_names)}
    files = {"ort fp32": source.variant_path("fp32"), "ort int8": source.variant_path("int8")}
    if args.pruned:
        pruned = load_export(args.pruned)
        files.update({"pruned fp32": pruned.variant_path("fp32"), "pruned int8": pruned.variant_path("int8")})
    sessions = {name: open_session(path, threads) for name, path in files.items() if path is not None}
    sessions["ort fp32 A/A"] = open_session(files["ort fp32"], threads)
    predictors.update({name: onnx_predictor(s) for name, s in sessions.items()})

    scores = {name: data.score(data.outputs(p, 32)) for name, p in predictors.items() if "A/A" not in name}
    metrics = {name: s.value for name, s in scores.items()}
    intervals = {name: [s.values[f"{s.primary}_low"], s.values[f"{s.primary}_high"]] for name, s in scores.items()
                 if f"{s.primary}_low" in s.values}
    label = data.task.metric_label
    lengths = [int(n) for n in args.lengths.split(",") if n]
    shapes = {**{f"{n} tokens": data.inputs.at_length(n) for n in lengths}, "unpadded": data.inputs}
    results: dict = {"metric": data.task.metric, "values": metrics, "intervals": intervals, "shapes": {}}
    for shape, inputs in shapes.items():
        sentences = inputs[:args.sentences]
        fns = {"torch eager": Cycle(lambda b: (lambda: predictors["torch eager"](b)), sentences)}
        fns.update({name: Cycle(lambda b, s=s: ort_runner(s, b), sentences) for name, s in sessions.items()})
        comparison = compare(fns, 1, rounds=7, seconds=args.seconds)
        noise = comparison.speedup("ort fp32", "ort fp32 A/A").noise
        rows = {}
        for name in fns:
            if "A/A" in name:
                continue
            vs_fp32 = comparison.speedup("ort fp32", name)
            rows[name] = {"p50_ms": comparison.stats[name].p50, "p90_ms": comparison.stats[name].p90,
                          "vs_ort_fp32": vs_fp32.as_dict(), "vs_torch": comparison.speedup("torch eager", name).as_dict(),
                          "verdict_vs_ort_fp32": vs_fp32.verdict(noise)}
        results["shapes"][shape] = {"noise_floor": noise, "variants": rows}
        print(f"\n{shape} (batch 1, {len(sentences)} sentences cycled; A/A noise floor ±{noise:.3f})")
        print(format_table([{"variant": n, "acc": 100 * metrics[n], "p50": r["p50_ms"],
                             "x_fp32": r["vs_ort_fp32"]["median"], "lo": r["vs_ort_fp32"]["low"],
                             "hi": r["vs_ort_fp32"]["high"], "x_torch": r["vs_torch"]["median"]}
                            for n, r in rows.items()],
                           [("variant", "variant", ""), ("acc", f"val {label} %", ".2f"), ("p50", "p50 ms", ".2f"),
                            ("x_fp32", "x ORT FP32", ".2f"), ("lo", "low", ".2f"), ("hi", "high", ".2f"),
                            ("x_torch", "x torch eager", ".2f")]))
    for name, (low, high) in intervals.items():
        print(f"{name}: val {label} {100 * metrics[name]:.2f} % (95 % interval {100 * low:.2f}-{100 * high:.2f})")
    info = machine_info(threads)
    print(f"\nmachine: {info['cpu']}, {threads} threads, isa {info['isa']}; {len(data)} validation rows")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "command": "python benchmarks/text_speed.py "
                                         + " ".join(str(a) for a in [args.export, "--lengths", args.lengths]
                                                    + (["--pruned", args.pruned] if args.pruned else [])),
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
