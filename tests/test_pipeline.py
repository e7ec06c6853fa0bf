import json

from conftest import TINY, run_cli


def test_run_chains_train_prune_and_export(tmp_path):
    """ftdeploy run with train, prune and export sections: each stage reads the previous one's run."""
    out = tmp_path / "chain"
    sets = [*TINY, "preprocessing.input_size=32", "data.image_size=32", "prune.ratio=0.25", "prune.finetune_epochs=1",
            "prune.latency_seconds=0.1", "export.batch_sizes=[1]", "export.latency_seconds=0.05"]
    result = run_cli("run", *[a for s in sets for a in ("--set", s)], "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    pruned = tmp_path / "chain-pruned"
    report = json.loads((pruned / "export" / "report.json").read_text())
    assert report["source_run"] == str(pruned) and report["gates"]["passed"]
    assert json.loads((pruned / "manifest.json").read_text())["parent"] == str(out)
    assert json.loads((pruned / "prune_report.json").read_text())["ratios"]["params"] < 0.8
    assert f"ONNX file(s): {pruned / 'export' / 'model.onnx'}" in result.stdout
