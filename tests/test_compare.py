"""benchmarks/compare.py --quick end to end: every contender's row has every field, whichever
peers are installed (a missing one records its error and the script goes on)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

NAMES = {"torch_eager", "ort_fp32", "ort_dynamic_default", "ort_static_default", "optimum_preset",
         "olive_static_default", "openvino_fp32", "openvino_nncf_int8", "ort_openvino_ep_fp32",
         "ort_openvino_ep_int8", "ftdeploy_int8", "grid_best"}
FIELDS = {"engine", "int8", "metric", "metric_drop_points", "agreement", "size_bytes", "p50_ms_bs1",
          "p90_ms_bs1", "throughput_bs32", "quantize_seconds", "error"}


@pytest.mark.slow
def test_compare_quick_records_every_field_for_every_contender(tmp_path):
    # onnxruntime-openvino would be installed into a venv of its own (a download): left out here
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compare.py"), "--quick", "--output", "out",
                             "--skip", "ort_openvino_ep_fp32,ort_openvino_ep_int8"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=1500)  # any working directory
    tmp_path = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert {"cpu", "cores", "isa"} <= set(data["machine"]) and data["versions"]["onnxruntime"] != "not installed"
    (model,) = data["models"].values()
    assert 0 <= model["noise_floor"] < 1
    search = model["ftdeploy_search"]
    assert len(search["decisions"]["runs"]) == 2 and isinstance(search["decisions"]["same_decision"], bool)
    contenders = model["contenders"]
    assert NAMES <= set(contenders)
    for name, row in contenders.items():
        assert FIELDS <= set(row), name
        assert row["engine"] in {"torch", "onnxruntime", "onnxruntime-openvino", "openvino"} and isinstance(row["int8"], bool)
        if row["error"] is None:
            assert 0 <= row["metric"] <= 1 and 0 <= row["agreement"] <= 1, name
            assert 0 < row["p50_ms_bs1"] <= row["p90_ms_bs1"] and row["throughput_bs32"] > 0, name
            assert name in ("torch_eager", "openvino_fp32") or row["size_bytes"] > 0, name
        else:
            assert all(row[k] is None for k in ("metric", "p50_ms_bs1", "throughput_bs32")), name
    for name in ("torch_eager", "ort_fp32", "ort_dynamic_default", "ort_static_default"):
        assert contenders[name]["error"] is None, (name, contenders[name]["error"])
    assert model["metric"] == "accuracy"  # the task's primary metric judges every contender
    assert contenders["ort_fp32"]["agreement"] == 1 and contenders["ort_fp32"]["metric_drop_points"] == 0
    assert contenders["ort_openvino_ep_fp32"]["error"] == "skipped (--skip)"
    int8 = contenders["ftdeploy_int8"]
    assert int8["error"] is None or "no configuration" in int8["error"] or "final measurement" in int8["error"]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "ftdeploy_int8" in (tmp_path / "compare.md").read_text()
