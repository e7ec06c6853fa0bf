"""benchmarks/gpu_check.py's CPU dry run (--device cpu --tiny): every step of the GPU check runs on the
tiny model, so that the prepared script cannot rot while no GPU is lent."""

import importlib.util
import json

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_dry_run_runs_every_step(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.main(["--device", "cpu", "--tiny", "--seconds", "0.05", "--output", str(tmp_path)])
    # the default through `accelerate launch --mixed_precision P`, each recording the precision that ran
    assert [(t["launched"], t.get("recorded"), t.get("device")) for t in result["trainings"]] == [
        ("no", "no", "cpu"), ("bf16", "bf16", "cpu"), ("fp16", "fp16", "cpu")], result["trainings"]
    assert all(t["val_accuracy"] > 0.5 and t["images_per_second"] > 0 for t in result["trainings"])
    assert {(r["precision"], r["channels_last"]) for r in result["resnet50"]} == {
        (p, cl) for p in ("fp32", "bf16", "fp16") for cl in (False, True)}
    assert all(r["images_per_second"] > 0 for r in result["resnet50"])
    assert [r["precision"] for r in result["encoder"]] == ["fp32", "bf16"]
    assert result["export"]["passed"] and result["export"]["onnx_error"] <= result["export"]["allowed_error"]
    assert len(result["checks"]) == 6
    assert json.loads((tmp_path / "gpu_check.json").read_text())["checks"] == result["checks"]
    assert "not judged (no GPU)" in (tmp_path / "gpu_check.md").read_text()
