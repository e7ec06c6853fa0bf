import json

import numpy as np
import onnx
import pytest
import torch

from conftest import make_run, run_cli
from ftdeploy.config import QuantizeConfig
from ftdeploy.quantize import Evaluator, preflight, quantize_variant


def test_preflight_follows_the_cpu():
    vnni = preflight({"avx2", "avx512f", "avx512bw", "avx512_vnni"})
    assert (vnni.activation_type, vnni.weight_type, vnni.reduce_range, vnni.expect_speedup) == ("uint8", "int8", False, True)
    assert preflight({"avx2", "avx_vnni"}).isa == "avx_vnni"
    no_vnni = preflight({"avx2", "fma"})  # e.g. this AMD EPYC: vpmaddubsw can saturate
    assert no_vnni.isa == "avx2" and no_vnni.reduce_range is True and no_vnni.expect_speedup
    assert preflight({"avx512f", "avx512bw"}).reduce_range is True
    arm = preflight({"asimd", "asimddp"})
    assert (arm.isa, arm.activation_type) == ("arm_dotprod", "int8")
    amx = preflight({"avx512_vnni", "amx_tile", "amx_int8"})
    assert amx.isa == "amx" and amx.reduce_range is False
    bare = preflight({"sse4_2"})
    assert bare.expect_speedup is False and "cannot be expected" in bare.reason


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from ftdeploy.export import export_onnx, finalize, run_splits, split_arrays
    from ftdeploy.rundir import load_run

    tmp = tmp_path_factory.mktemp("q")
    run = load_run(make_run(tmp / "run", "torchvision:resnet18", "train.epochs=3"))
    export_onnx(run.load_model(), torch.zeros(2, 3, 32, 32), tmp / "raw.onnx")
    finalize(tmp / "raw.onnx", tmp / "fp32.onnx", {"classes": run.classes})
    inputs, labels = split_arrays(run_splits(run).val, 100)
    return run, tmp, inputs, labels


def test_gate_refuses_int8_that_breaks_the_accuracy_budget(tiny_export):
    """A calibration set of blank images gives useless activation ranges: with a zero budget the
    INT8 model must be refused, and no file written, whatever its speed."""
    run, tmp, inputs, labels = tiny_export
    bad_calibration = np.zeros((8, 3, 32, 32), np.float32)
    out = tmp / "model.int8.onnx"
    record, failures = quantize_variant(tmp / "raw.onnx", tmp / "fp32.onnx", out,
                                        QuantizeConfig(max_accuracy_drop=0.0, search=False, latency_seconds=0.1),
                                        bad_calibration, Evaluator(inputs, labels, 1, 0.1), {"classes": run.classes})
    assert not out.exists()
    assert len(failures) == 1 and "no int8 file was written" in failures[0]
    (only,) = record["tried"]
    assert only["accuracy_drop_points"] > 0 and only["passed"] is False
    assert record["chosen"] is None and record["calibration_samples"] == 8


def test_export_quantize_ships_only_a_measured_better_model(tiny_export, tmp_path):
    """Whatever this CPU makes of INT8, the invariant holds: a shipped int8 file was measured faster
    and within budget; otherwise the command fails with the reason and ships nothing."""
    run, *_ = tiny_export
    result = run_cli("export", str(run.path), "-o", str(tmp_path), "--quantize", "--batch-sizes", "1",
                     "--max-accuracy-drop", "5")
    report = json.loads((tmp_path / "report.json").read_text())
    q = report["quantization"]
    assert q["mode"] == "static" and q["per_channel"] is True and q["tried"]
    assert set(q) >= {"mode", "activation_type", "weight_type", "calibration", "per_channel", "excluded_nodes", "tried"}
    if (tmp_path / "model.int8.onnx").exists():
        assert result.returncode == 0, result.stderr
        chosen = next(t for t in q["tried"] if t["name"] == q["chosen"])
        assert chosen["passed"] and chosen["speedup"] >= 1.1 and chosen["accuracy_drop_points"] <= 5
        assert report["variants"]["int8"]["latency_ms"]["1"]["p50"] < report["variants"]["fp32"]["latency_ms"]["1"]["p50"]
        int8 = report["variants"]["int8"]
        assert int8["parity"]["reference"] == "fp32" and int8["size_bytes"] < report["variants"]["fp32"]["size_bytes"]
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.int8.onnx")).metadata_props}
        assert json.loads(meta["ftdeploy.variant"]) == "int8"
        assert "| int8 |" in (tmp_path / "report.md").read_text()
    else:
        assert result.returncode == 2
        assert "no int8 file was written" in result.stderr or "the int8 file was removed" in result.stderr
        assert "int8" not in report["variants"] and report["gates"]["passed"] is False
