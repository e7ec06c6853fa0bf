"""The task's metric (with its interval, where the task gives one) on the test split no stage saw, for the
unpruned export and every file of an optimize directory's levels and of a pruned run: what optimize's
summary gives for its chosen point only.

    python benchmarks/compare.py --models minilm-ner --output OUT --workdir RUNS
    python benchmarks/test_split.py RUNS/minilm-ner/export RUNS/minilm-ner-optimize RUNS/minilm-ner-pruned50/export \
        --json OUT/test_split.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ftdeploy.evaluation import held_out_test, onnx_predictor
from ftdeploy.machine import physical_cores
from ftdeploy.onnx_model import open_session
from ftdeploy.rundir import load_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="the unpruned run's export directory (its data and test split)")
    parser.add_argument("others", type=Path, nargs="*", help="optimize output directories or export directories")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    source = load_export(args.export)
    test = held_out_test(source.data, source.preprocessing, source.task)
    if test is None:
        parser.error(f"{args.export}'s data holds out no test split (data.test_fraction)")
    inputs, targets = test
    files = [args.export / "model.onnx", args.export / "model.int8.onnx"]
    for other in args.others:
        files += sorted(other.glob("levels/*/export/model*.onnx")) + sorted(other.glob("model*.onnx"))
    out = {}
    for f in files:
        if not f.is_file() or "unoptimized" in f.name or "rejected" in f.name:
            continue
        scores = source.task.evaluate(source.task.outputs(onnx_predictor(open_session(f, physical_cores())), inputs, 32),
                                      inputs, targets, source.info)
        primary = scores.primary
        name = os.path.relpath(f, args.export.parent.parent)  # the runs' folder
        out[name] = {k: round(100 * v, 2) for k, v in scores.values.items()
                     if k in (primary, f"{primary}_low", f"{primary}_high", "untyped_f1")}
        print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"samples": len(inputs), "files": out}, indent=1))


if __name__ == "__main__":
    main()
